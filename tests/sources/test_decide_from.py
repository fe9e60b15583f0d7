"""``consent-gateway decide --from VENDOR``: vendor consent files decided like the gateway does."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest

from gateway.commands import decide as command
from tests.vendors._fixtures import FIXTURES

GLUCOSE = "2345-7"
HIV_AB = "7917-8"


def observation(patient: str, loinc: str) -> dict[str, Any]:
    return {
        "resourceType": "Observation", "id": "o1", "status": "final",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                  "code": "laboratory"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": loinc}]},
        "subject": {"reference": patient}, "effectiveDateTime": "2024-03-10T08:00:00Z",
    }


def decide(tmp_path: Path, vendor: str, consent: Path, resource: dict[str, Any], actor: str, *argv: str) -> int:
    parser = argparse.ArgumentParser()
    command.add_parser(parser.add_subparsers())
    (tmp_path / "resource.json").write_text(json.dumps(resource))
    args = parser.parse_args([
        "decide", "--from", vendor, "--consent", str(consent), "--resource", str(tmp_path / "resource.json"),
        "--actor", actor, "--at", "2025-01-15T12:00:00Z", "--json", *argv,
    ])
    return command.run(args)


@pytest.mark.parametrize(
    ("vendor", "fixture", "patient", "loinc", "actor", "expected"),
    [
        ("clinikapi", "clinikapi-consents.json", "Patient/pat-100", GLUCOSE, "Practitioner/dr-ada", "permit"),
        ("clinikapi", "clinikapi-consents.json", "Patient/pat-100", HIV_AB, "Practitioner/dr-ada", "deny"),
        ("healthex", "healthex-consents.json", "Patient/hx-pat-7", HIV_AB, "Practitioner/any-doc", "permit"),
        ("healtheintent", "healtheintent-consents.json", "Patient/he-1", GLUCOSE,
         "Practitioner/f181b922-f5fd-401f-abaf-90475eb15f15", "deny"),
        ("healtheintent", "healtheintent-consents.json", "Patient/he-1", GLUCOSE, "Practitioner/elsewhere", "deny"),
    ],
)
def test_vendor_files_are_converted_then_decided(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
    vendor: str, fixture: str, patient: str, loinc: str, actor: str, expected: str,
) -> None:
    extra: list[str] = []
    if vendor == "clinikapi":
        # The consent's related target (a PHQ-9 the patient withheld), as the answer holds it.
        phq9 = {**observation(patient, "44249-1"), "id": "obs-phq9"}
        (tmp_path / "phq9.json").write_text(json.dumps(phq9))
        extra = ["--related", str(tmp_path / "phq9.json")]
    code = decide(tmp_path, vendor, FIXTURES / fixture, observation(patient, loinc), actor, *extra)
    body = json.loads(capsys.readouterr().out)
    assert (code, body["decision"]) == ({"permit": 0, "deny": 1}[expected], expected)
    if expected == "permit":
        assert body["reasons"] and all(r["consent"].startswith("Consent/") for r in body["reasons"])


def test_an_unconvertible_vendor_record_is_bad_input_naming_record_and_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    records = json.loads((FIXTURES / "clinikapi-consents.json").read_text())
    records[0]["provision"]["type"] = "allow"
    (tmp_path / "ck.json").write_text(json.dumps(records))
    code = decide(tmp_path, "clinikapi", tmp_path / "ck.json", observation("Patient/pat-100", GLUCOSE),
                  "Practitioner/dr-ada")
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "clinikapi consent ck-consent-1: provision.type" in err


def test_healtheintent_needs_a_resource_of_one_patient(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    practitioner = {"resourceType": "Practitioner", "id": "p1"}
    code = decide(tmp_path, "healtheintent", FIXTURES / "healtheintent-consents.json", practitioner, "Practitioner/x")
    assert code == 2
    assert "exactly one patient" in capsys.readouterr().err


def test_healtheintent_permit_needs_person_unit_and_group(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = decide(tmp_path, "healtheintent", FIXTURES / "healtheintent-consents.json",
                  observation("Patient/he-1", GLUCOSE), "Practitioner/f181b922-f5fd-401f-abaf-90475eb15f15",
                  "--org", "Organization/7582d101-c0bd-45a8-829c-a63f1587ea05",
                  "--group", "Group/f2467686-1bc8-4bcf-a768-2cb3541e437e")
    assert (code, json.loads(capsys.readouterr().out)["decision"]) == (0, "permit")


def test_related_target_not_given_is_unknown_and_closes_on_a_deny(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = decide(tmp_path, "clinikapi", FIXTURES / "clinikapi-consents.json",
                  observation("Patient/pat-100", GLUCOSE), "Practitioner/dr-ada")
    body = json.loads(capsys.readouterr().out)
    assert (code, body["decision"]) == (1, "deny")
    related = [r for c in body["consents"] for r in c["related"]]
    assert {"provision": "provision.provision[2]", "target": "Observation/obs-phq9", "resolved": "unknown",
            "covers_resource": None} in related
