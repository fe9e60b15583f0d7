"""``consent-gateway label FILE``: one line per resource, exit 2 with one line on bad input."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from gateway.commands import label

ICD = "http://hl7.org/fhir/sid/icd-10-cm"
CONDITION = {"resourceType": "Condition", "id": "c1", "code": {"coding": [{"system": ICD, "code": "F11.20"}]}}
NORMAL = {"resourceType": "Observation", "id": "o1", "code": {"coding": [{"system": "http://loinc.org", "code": "58410-2"}]}}
HIV_MED = {
    "resourceType": "MedicationRequest",
    "id": "m1",
    "contained": [{"resourceType": "Medication", "id": "med", "code": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "1999667"}]}}],
    "medicationReference": {"reference": "#med"},
}
SUD_LINE = "Condition/c1  42CFRPart2,OPIOIDUD  rules/substance-use.yaml: ICD-10-CM F11 (Opioid related disorders)"


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    label.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["label", *argv])


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[str], list[str]]:
    code = label.run(_parse(*argv))
    out, err = capsys.readouterr()
    return code, out.splitlines(), err.splitlines()


def test_single_resource(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "condition.json"
    path.write_bytes(orjson.dumps(CONDITION))
    assert _run(capsys, str(path)) == (0, [SUD_LINE], [])


def test_bundle_entry_by_entry(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bundle = {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": r} for r in (CONDITION, NORMAL, HIV_MED)]}
    path = tmp_path / "bundle.json"
    path.write_bytes(orjson.dumps(bundle, option=orjson.OPT_INDENT_2))
    code, out, err = _run(capsys, str(path))
    assert code == 0 and err == []
    assert out == [
        SUD_LINE,
        "Observation/o1  -",
        "MedicationRequest/m1  HIV  rules/hiv-sti.yaml: RxNorm 1999667 "
        "(bictegravir 50 MG / emtricitabine 200 MG / tenofovir alafenamide 25 MG Oral Tablet)",
    ]


def test_ndjson_line_by_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "export.ndjson"
    path.write_bytes(b"\n".join(orjson.dumps(r) for r in (NORMAL, {"resourceType": "Composition", "confidentiality": "R"})) + b"\n")
    assert _run(capsys, str(path)) == (0, ["Observation/o1  -", "Composition#2  R  Composition.confidentiality"], [])


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"{\"resourceType\": \"Condition\"\n, oops", "line 1: not JSON"),
        (b"[1, 2]", "not a FHIR resource"),
        (orjson.dumps(NORMAL) + b"\n{\"id\": \"x\"}\n", "line 2: not a FHIR resource"),
        (b"\n\n", "empty"),
    ],
    ids=["broken-json", "not-a-resource", "ndjson-line-without-type", "empty"],
)
def test_bad_input_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes, problem: str) -> None:
    path = tmp_path / "input.json"
    path.write_bytes(content)
    code, out, err = _run(capsys, str(path))
    assert (code, out) == (2, [])
    assert len(err) == 1 and problem in err[0] and str(path) in err[0]


def test_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(capsys, str(tmp_path / "absent.json"))
    assert (code, out, len(err)) == (2, [], 1)
    assert "cannot read" in err[0]


def test_bad_rules_dir_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "condition.json"
    path.write_bytes(orjson.dumps(CONDITION))
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "bad.yaml").write_text("kind: nonsense\n")
    code, out, err = _run(capsys, str(path), "--rules-dir", str(tmp_path / "rules"))
    assert (code, out) == (2, [])
    assert err == ["consent-gateway label: rules/bad.yaml: kind: unknown kind 'nonsense' (category, terms, confidentiality, scopes)"]


def test_reads_stdin_in_a_subprocess() -> None:
    script = "import sys; from gateway.commands import label; from pathlib import Path; import argparse; " \
        "sys.exit(label.run(argparse.Namespace(file=Path('-'), rules_dir=None, coverage=False)))"
    done = subprocess.run([sys.executable, "-c", script], input=orjson.dumps(CONDITION), capture_output=True, timeout=60, check=False)
    assert done.returncode == 0
    assert done.stdout.decode().splitlines() == [SUD_LINE]


def test_coverage_counts_codes_per_category_and_system_with_sources(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(capsys, "--coverage")
    assert code == 0 and err == []
    rows = {tuple(line.split()[:2]): line.split()[2:] for line in out if line and not line.startswith((" ", "category", "ICD"))}
    assert rows[("substance-use", "HCPCS")][-1] == "42CFRPart2,SUD"
    assert int(rows[("substance-use", "HCPCS")][1]) >= 30  # the VSAC SUD treatment and MOUD codes
    assert int(rows[("mental-health", "CPT")][1]) >= 115  # the Psychiatry range 90785-90899
    assert any("2.16.840.1.113762.1.4.1046.269" in line and "substance-use / RxNorm" in line for line in out)
    assert any("SHIFT Task Force SLS value set" in line for line in out)


def test_label_needs_a_file_or_coverage(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(capsys)
    assert code == 2 and out == []
    assert err == ["consent-gateway label: give a FILE, or --coverage"]
