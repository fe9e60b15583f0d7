"""``consent-gateway decide``: exit codes, text and JSON explanations."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from gateway.commands import decide as command

OPT_OUT = {
    "resourceType": "Consent", "id": "out", "status": "active",
    "scope": {"coding": [{"code": "patient-privacy"}]},
    "patient": {"reference": "Patient/p1"},
    "policyRule": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTOUT"}]},
    "provision": {
        "type": "deny",
        "actor": [{"reference": {"reference": "Organization/ghh"}}],
        "provision": [{"type": "permit", "actor": [{"reference": {"reference": "Practitioner/gp"}}]}],
    },
}
GLUCOSE = {
    "resourceType": "Observation", "id": "o1", "status": "final",
    "code": {"coding": [{"system": "http://loinc.org", "code": "2345-7"}]},
    "subject": {"reference": "Patient/p1"}, "effectiveDateTime": "2024-03-01",
}


def run(tmp_path: Path, *argv: str) -> int:
    parser = argparse.ArgumentParser()
    command.add_parser(parser.add_subparsers())
    (tmp_path / "consent.json").write_text(json.dumps(OPT_OUT))
    (tmp_path / "obs.json").write_text(json.dumps(GLUCOSE))
    base = ["decide", "--consent", str(tmp_path / "consent.json"),
            "--resource", str(tmp_path / "obs.json"), "--at", "2024-06-01T00:00:00Z"]
    return command.run(parser.parse_args([*base, *argv]))


def test_deny_exits_1_and_names_consent_and_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(tmp_path, "--actor", "Practitioner/x", "--org", "Organization/ghh") == 1
    out = capsys.readouterr().out
    assert "decision: deny" in out
    assert "deny (Consent/out provision)" in out


def test_permit_exits_0_with_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = run(tmp_path, "--actor", "Practitioner/gp", "--org", "Organization/ghh", "--json")
    assert code == 0
    body = json.loads(capsys.readouterr().out)
    assert body["decision"] == "permit"
    assert body["reasons"] == [
        {"consent": "Consent/out", "provision": "provision.provision[0]", "rule": "permit"}
    ]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--actor", "nobody"], "--actor must be a reference"),
        (["--actor", "Practitioner/1", "--at", "tomorrow"], "--at must be an ISO date-time"),
    ],
)
def test_bad_input_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert run(tmp_path, *argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_unreadable_consent_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    command.add_parser(parser.add_subparsers())
    (tmp_path / "obs.json").write_text(json.dumps(GLUCOSE))
    (tmp_path / "bad.json").write_text("{not json")
    args = parser.parse_args(["decide", "--consent", str(tmp_path / "bad.json"),
                              "--resource", str(tmp_path / "obs.json"), "--actor", "Practitioner/1"])
    assert command.run(args) == 2
    assert "is not JSON" in capsys.readouterr().err


HL7 = Path(__file__).resolve().parents[1] / "data" / "hl7-consent-examples"


def _run_json(tmp_path: Path, capsys: pytest.CaptureFixture[str], consent: Path,
              resource: dict[str, object], *argv: str) -> dict[str, object]:
    parser = argparse.ArgumentParser()
    command.add_parser(parser.add_subparsers())
    (tmp_path / "res.json").write_text(json.dumps(resource))
    args = parser.parse_args(["decide", "--consent", str(consent), "--resource", str(tmp_path / "res.json"),
                              "--at", "2026-01-15T10:00:00Z", "--json", *argv])
    command.run(args)
    body: dict[str, object] = json.loads(capsys.readouterr().out)
    return body


OBS_F001 = {"resourceType": "Observation", "id": "o1", "status": "final", "subject": {"reference": "Patient/f001"}}


def test_json_explains_exception_reading_and_role_rules(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    body = _run_json(tmp_path, capsys, HL7 / "Consent-consent-example-grantor.json", OBS_F001,
                     "--actor", "Patient/example")
    assert body["decision"] == "permit"
    assert body["ambiguous_consents"] == ["Consent/consent-example-grantor"]
    [consent] = body["consents"]  # type: ignore[misc]
    assert consent["root_reading"] == "exception" and consent["ambiguous"] is True
    rules = {(a["actor"], a["role_rule"], a["matches"]) for a in consent["actors"]}
    assert rules == {("Organization/f001", "custodian-no-condition", True), ("Patient/example", "recipient", True)}


def test_json_scope_reading_is_chosen_by_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    body = _run_json(tmp_path, capsys, HL7 / "Consent-consent-example-notThem.json", OBS_F001,
                     "--actor", "Practitioner/f204", "--untyped-root", "scope")
    assert body["decision"] == "permit"
    assert body["consents"][0]["root_reading"] == "scope"  # type: ignore[index]


def test_json_explains_high_water_mark(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    body = _run_json(tmp_path, capsys, HL7 / "Consent-consent-example-pkb.json",
                     {**OBS_F001, "subject": {"reference": "Patient/example"}},
                     "--actor", "Practitioner/gp", "--org", "Organization/f001")
    marks = body["consents"][0]["high_water_marks"]  # type: ignore[index]
    assert {"provision": "provision", "names": "N", "resource": "N (no confidentiality label)", "covers": True} in marks


def test_json_explains_resolved_related_reference(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    task = {"resourceType": "Task", "id": "example3", "status": "requested", "intent": "order",
            "for": {"reference": "Patient/f001"}, "focus": {"reference": "Observation/o1"}}
    (tmp_path / "task.json").write_text(json.dumps(task))
    body = _run_json(tmp_path, capsys, HL7 / "Consent-consent-example-notThis.json", OBS_F001,
                     "--actor", "Practitioner/f204", "--related", str(tmp_path / "task.json"))
    assert body["decision"] == "deny"
    assert body["consents"][0]["related"] == [  # type: ignore[index]
        {"provision": "provision", "target": "Task/example3", "resolved": "in the answer", "covers_resource": True}
    ]


def test_text_names_ambiguous_consent(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    command.add_parser(parser.add_subparsers())
    (tmp_path / "res.json").write_text(json.dumps(OBS_F001))
    args = parser.parse_args(["decide", "--consent", str(HL7 / "Consent-consent-example-notThem.json"),
                              "--resource", str(tmp_path / "res.json"), "--actor", "Practitioner/f204"])
    assert command.run(args) == 1
    assert "ambiguous: Consent/consent-example-notThem" in capsys.readouterr().out
