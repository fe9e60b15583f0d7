"""load_rules: the bundled set, a swapped directory, and one clear line for each bad file."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from gateway.core.labels import LabelIndex
from gateway.rules import BUNDLED_RULES, RulesError, load_rules

SCOPES = """\
kind: scopes
sensitivity:
  NORMAL: []
  HIV_OR_STI: [HIV]
resource:
  DIAGNOSES: [Condition]
"""

HIV = """\
kind: category
category: hiv
sets:
  - name: HIV
    source: ICD-10-CM B20
    system: icd-10-cm
    labels: [HIV]
    codes:
      - B20: HIV disease
"""


def _write(directory: Path, **files: str) -> Path:
    directory.mkdir(exist_ok=True)
    for name, text in files.items():
        (directory / f"{name}.yaml").write_text(text, encoding="utf-8")
    return directory


def _error(directory: Path) -> str:
    with pytest.raises(RulesError) as caught:
        load_rules(directory)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_bundled_rules_load() -> None:
    index = load_rules()
    assert isinstance(index, LabelIndex)
    assert {"HIV", "ETH", "42CFRPart2", "PSY", "R", "V"} <= index.sensitive


def test_rules_dir_swaps_the_bundled_set(tmp_path: Path) -> None:
    index = load_rules(_write(tmp_path / "site-rules", scopes=SCOPES, hiv=HIV))
    b20 = {"resourceType": "Condition", "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "B20"}]}}
    f11 = {"resourceType": "Condition", "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "F11.20"}]}}
    assert {x.code for x in index.labels_for(b20)} == {"HIV"}
    assert index.labels_for(f11) == frozenset()
    assert index.explain(b20)[0][1] == "site-rules/hiv.yaml: ICD-10-CM B20 (HIV disease)"


def test_copy_of_bundled_rules_loads_from_elsewhere(tmp_path: Path) -> None:
    copy = shutil.copytree(BUNDLED_RULES, tmp_path / "rules")
    assert load_rules(copy).sensitive == load_rules().sensitive


def test_empty_directory(tmp_path: Path) -> None:
    assert "no rules" in _error(tmp_path)


def test_missing_directory(tmp_path: Path) -> None:
    assert _error(tmp_path / "absent") == f"{tmp_path / 'absent'}: not a directory"


def test_malformed_yaml(tmp_path: Path) -> None:
    message = _error(_write(tmp_path, scopes=SCOPES, hiv="kind: category\nsets: [\n  - {a: 1\n"))
    assert message.startswith(f"{tmp_path.name}/hiv.yaml: line ")
    assert "malformed YAML" in message


@pytest.mark.parametrize(
    ("broken", "entry", "problem"),
    [
        (HIV.replace("system: icd-10-cm", "system: icd-9-cm"), "sets[1] (HIV)", "unknown code system 'icd-9-cm'"),
        (HIV.replace("labels: [HIV]", "labels: [AIDS]"), "sets[1] (HIV) labels", "bad label 'AIDS'"),
        (HIV.replace("labels: [HIV]", "labels: []"), "sets[1] (HIV) labels", "no labels"),
        (HIV + "      - B20: again\n", "sets[1] (HIV) B20", "duplicate code (already in"),
        (HIV.replace("    source: ICD-10-CM B20\n", ""), "sets[1] (HIV)", "missing source"),
        (HIV.replace("- B20: HIV disease", "- B2: HIV disease"), "sets[1] (HIV) B2", "bad ICD-10-CM code"),
        (HIV.replace("- B20: HIV disease", "- B200: HIV disease"), "sets[1] (HIV) B200", "bad ICD-10-CM code"),
        (HIV.replace("- B20: HIV disease", "- F19-F10: backwards"), "sets[1] (HIV) F19-F10", "bad range"),
        (HIV.replace("- B20: HIV disease", "- B20:"), "sets[1] (HIV) codes B20", "missing display"),
        (HIV.replace("- B20: HIV disease", "- B20"), "sets[1] (HIV) codes", "expected 'CODE: display'"),
        (HIV + "    exclude:\n      - F17: Nicotine dependence\n", "sets[1] (HIV) exclude F17", "excludes no code of this set"),
        (HIV.replace("kind: category", "kind: categories"), "kind", "unknown kind 'categories'"),
        (HIV.replace("category: hiv\n", ""), "category", "missing category name"),
        ("- just a list\n", "document", "expected a mapping"),
        (
            HIV.replace("system: icd-10-cm", "system: loinc").replace("- B20: HIV disease", "- 7917: HIV 1 Ab"),
            "sets[1] (HIV) 7917",
            "bad LOINC code",
        ),
        (
            HIV.replace("system: icd-10-cm", "system: snomed").replace("- B20: HIV disease", "- 86406008: HIV\n    exclude:\n      - 1234567: x"),
            "sets[1] (HIV) exclude",
            "only for ICD-10-CM",
        ),
    ],
    ids=[
        "unknown-system", "bad-label", "no-labels", "duplicate-in-file", "missing-source", "short-icd",
        "dotless-icd-in-rules", "bad-range", "missing-display", "bare-code", "exclude-outside-set",
        "unknown-kind", "missing-category", "not-a-mapping", "bad-loinc", "exclude-non-icd",
    ],
)
def test_invalid_category_file(tmp_path: Path, broken: str, entry: str, problem: str) -> None:
    message = _error(_write(tmp_path, scopes=SCOPES, hiv=broken))
    assert message.startswith(f"{tmp_path.name}/hiv.yaml: {entry}: ")
    assert problem in message


def test_duplicate_code_across_files(tmp_path: Path) -> None:
    message = _error(_write(tmp_path, scopes=SCOPES, hiv=HIV, more=HIV.replace("category: hiv", "category: more")))
    assert message == f"{tmp_path.name}/more.yaml: sets[1] (HIV) B20: duplicate code (already in {tmp_path.name}/hiv.yaml)"


def test_missing_scopes_file(tmp_path: Path) -> None:
    assert "no scopes file" in _error(_write(tmp_path, hiv=HIV))


def test_scope_with_unknown_label(tmp_path: Path) -> None:
    message = _error(_write(tmp_path, scopes=SCOPES.replace("[HIV]", "[HIVV]"), hiv=HIV))
    assert message == f"{tmp_path.name}/scopes.yaml: sensitivity HIV_OR_STI: bad label 'HIVV'"


def test_resource_scope_with_bad_member(tmp_path: Path) -> None:
    message = _error(_write(tmp_path, scopes=SCOPES.replace("[Condition]", "[{category: laboratory}]"), hiv=HIV))
    assert message.startswith(f"{tmp_path.name}/scopes.yaml: resource DIAGNOSES")


def test_bad_confidentiality_code(tmp_path: Path) -> None:
    message = _error(_write(tmp_path, scopes=SCOPES, hiv=HIV, conf="kind: confidentiality\nsensitive: [R, X]\n"))
    assert message == f"{tmp_path.name}/conf.yaml: sensitive X: bad label: not a v3-Confidentiality code"
