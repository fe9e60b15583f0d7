"""rules/ is what tools/build_rules.py makes of tools/sources/, and its new rule shapes load.

The generator is run in --check mode against the committed files; the builder features it
relies on (HCPCS, CPT/HCPCS ranges, ICD-10-CM 6th-character filters) are checked on small
rule documents, including the one-line errors for bad ones.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from gateway.core.labels import HCPCS, ICD10CM, CPT, LabelIndex, RuleDataError
from gateway.core.model import covered_codes
from gateway.core.sensitivity_codes import BROADER

REPO = Path(__file__).resolve().parents[2]
SCOPES = {"kind": "scopes", "sensitivity": {"NORMAL": []}, "resource": {"DIAGNOSES": ["Condition"]}}


def _tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("build_rules", REPO / "tools" / "build_rules.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("build_rules", module)  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_committed_rules_are_what_the_sources_generate() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "build_rules.py"), "--check"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


def test_check_reports_a_hand_edited_rules_file(tmp_path: Path) -> None:
    for part in ("tools", "rules"):
        shutil.copytree(REPO / part, tmp_path / part)
    (tmp_path / "gateway" / "core").mkdir(parents=True)
    shutil.copy(REPO / "gateway" / "core" / "sensitivity_codes.py", tmp_path / "gateway" / "core")
    edited = tmp_path / "rules" / "genetic.yaml"
    edited.write_text(edited.read_text(encoding="utf-8").replace("GDIS", "PSY"), encoding="utf-8")
    script = str(tmp_path / "tools" / "build_rules.py")
    result = subprocess.run([sys.executable, script, "--check"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip() == "build_rules: out of date: rules/genetic.yaml"
    subprocess.run([sys.executable, script], capture_output=True, check=True, timeout=120)
    assert subprocess.run([sys.executable, script, "--check"], capture_output=True, timeout=120).returncode == 0
    assert edited.read_text(encoding="utf-8") == (REPO / "rules" / "genetic.yaml").read_text(encoding="utf-8")


def test_hierarchy_is_the_published_code_system() -> None:
    tool = _tool()
    rows = tool.read_extract(REPO / "tools" / "sources" / "v3-ActCode-sensitivity.tsv").rows
    parent = {code: parents for code, parents, _ in rows}
    # v3-ActCode 11.0.0: OPIOIDUD and ETHUD under SUD, COGN under BH, SUD/BH/PSY under SPI.
    assert parent["OPIOIDUD"] == parent["ETHUD"] == "SUD"
    assert parent["COGN"] == "BH" and parent["SUD"] == parent["BH"] == parent["PSY"] == "SPI"
    assert {"SUD", "SPI", "ETH"} <= BROADER["OPIOIDUD"]
    assert "OPIOIDUD" not in BROADER.get("SUD", frozenset())
    assert "BH" not in BROADER["PSY"]


def test_a_site_naming_eth_requires_consent_for_the_narrower_labels() -> None:
    assert covered_codes(frozenset({"ETH"})) >= {"ETH", "SUD", "ETHUD", "OPIOIDUD"}
    assert covered_codes(frozenset({"PSY"})) == {"PSY"}


def _index(code_set: dict[str, Any]) -> LabelIndex:
    document = {"kind": "category", "category": "t", "sets": [{"name": "t", "source": "test", "labels": ["PSY"], **code_set}]}
    return LabelIndex.from_documents({"t.yaml": document, "scopes.yaml": SCOPES})


def _labels(index: LabelIndex, system: str, code: str) -> set[str]:
    return {x.code for x in index.labels_for({"resourceType": "Procedure", "code": {"coding": [{"system": system, "code": code}]}})}


def test_cpt_and_hcpcs_ranges_expand_to_each_code() -> None:
    cpt = _index({"system": "cpt", "codes": [{"90785-90899": "Psychiatry"}]})
    assert _labels(cpt, CPT, "90839") == {"PSY"} and _labels(cpt, CPT, "90900") == set()
    hcpcs = _index({"system": "hcpcs", "codes": [{"S2260-S2267": "Induced abortion"}]})
    assert _labels(hcpcs, HCPCS, "S2265") == {"PSY"} and _labels(hcpcs, HCPCS, "S2268") == set()


def test_sixth_character_filters_icd_descendants() -> None:
    index = _index({"system": "icd-10-cm", "sixth_character": "2", "codes": [{"T36-T50": "Poisoning"}]})
    assert _labels(index, ICD10CM, "T43.222A") == {"PSY"}
    resource = {"resourceType": "Condition", "code": {"coding": [{"system": ICD10CM, "code": "T43.222A"}]}}
    assert [rule for _, rule in index.explain(resource)] == ["t.yaml: ICD-10-CM T43 (in T36-T50: Poisoning), 6th character 2"]
    assert _labels(index, ICD10CM, "T43.221A") == set()
    assert _labels(index, ICD10CM, "T43") == set()  # too short to have a 6th character


@pytest.mark.parametrize(
    ("code_set", "words"),
    [
        ({"system": "cpt", "codes": [{"90899-90785": "backwards"}]}, "bad range"),
        ({"system": "hcpcs", "codes": [{"S2260-T2267": "two letters"}]}, "bad range"),
        ({"system": "hcpcs", "codes": [{"12345": "not HCPCS"}]}, "bad HCPCS code"),
        ({"system": "cpt", "sixth_character": "2", "codes": [{"90785": "x"}]}, "sixth_character"),
        ({"system": "icd-10-cm", "sixth_character": "2-", "codes": [{"T36": "x"}]}, "sixth_character"),
    ],
)
def test_bad_new_rule_shapes_are_one_clear_error(code_set: dict[str, Any], words: str) -> None:
    with pytest.raises(RuleDataError) as caught:
        _index(code_set)
    assert words in str(caught.value) and "\n" not in str(caught.value)


def test_every_extract_feeds_the_rules() -> None:
    sources = REPO / "tools" / "sources"
    policy = (sources / "policy.yaml").read_text(encoding="utf-8")
    extracts = {p.relative_to(sources).as_posix() for p in sources.rglob("*.tsv")}
    assert {e for e in extracts if e not in policy} == set()
