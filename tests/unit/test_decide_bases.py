"""``decide`` and ``POST /decision`` read absolute references as the proxy does: under one of this
server's bases (``decide --base``; the gateway's upstream.url, public_base_url and
upstream.reference_bases) they are this server's, under any other base another server's (an
unknown patient, actor or record), never this server's of the same ``Type/id``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest

from gateway.commands import decide as command
from tests.fakes import FakeFhir
from tests.unit.test_enforcement import MakeGateway

OURS = "https://ehr.example/r4"
OTHER = "https://hie.example/fhir"
PUBLIC = "https://gateway.hospital.example/fhir"
AT = "2024-06-01T00:00:00Z"


def consent(provision: dict[str, Any], patient: str = "Patient/p1") -> dict[str, Any]:
    return {
        "resourceType": "Consent", "id": "c1", "status": "active",
        "scope": {"coding": [{"code": "patient-privacy"}]}, "patient": {"reference": patient},
        "provision": provision,
    }


def glucose(subject: str = "Patient/p1") -> dict[str, Any]:
    return {
        "resourceType": "Observation", "id": "o1", "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "2345-7"}]},
        "subject": {"reference": subject}, "effectiveDateTime": "2024-03-01",
    }


def permit_for(actor: str) -> dict[str, Any]:
    return {"type": "permit", "actor": [{"reference": {"reference": actor}}]}


def decide(tmp_path: Path, consents: dict[str, Any], resource: dict[str, Any], *argv: str,
           related: dict[str, Any] | None = None) -> int:
    parser = argparse.ArgumentParser()
    if related is not None:
        (tmp_path / "related.json").write_text(json.dumps(related))
        argv = (*argv, "--related", str(tmp_path / "related.json"))
    command.add_parser(parser.add_subparsers())
    (tmp_path / "consent.json").write_text(json.dumps(consents))
    (tmp_path / "resource.json").write_text(json.dumps(resource))
    return command.run(parser.parse_args([
        "decide", "--consent", str(tmp_path / "consent.json"), "--resource", str(tmp_path / "resource.json"),
        "--at", AT, "--actor", "Practitioner/gp", *argv,
    ]))


def test_decide_reads_a_subject_under_a_base_given_as_the_proxy_does(tmp_path: Path) -> None:
    resource = glucose(f"{OURS}/Patient/p1")
    assert decide(tmp_path, consent({"type": "permit"}), resource, "--base", OURS) == 0
    # Not one of the bases given: another server's patient, whose consents cannot be read.
    assert decide(tmp_path, consent({"type": "permit"}), resource) == 1
    assert decide(tmp_path, consent({"type": "permit"}), resource, "--base", OTHER) == 1


def test_decide_permits_no_actor_on_another_server(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert decide(tmp_path, consent(permit_for(f"{OTHER}/Practitioner/gp")), glucose()) == 1
    assert decide(tmp_path, consent(permit_for(f"{OTHER}/Practitioner/gp")), glucose(), "--base", OURS) == 1
    assert decide(tmp_path, consent(permit_for(f"{OURS}/Practitioner/gp")), glucose(), "--base", OURS) == 0
    capsys.readouterr()
    decide(tmp_path, consent(permit_for(f"{OTHER}/Practitioner/gp")), glucose(), "--base", OURS, "--json")
    body = json.loads(capsys.readouterr().out)
    assert body["decision"] == "deny"
    [explained] = body["consents"]
    assert explained["actors"] == [{"provision": "provision", "actor": "another server's resource",
                                    "role_rule": "recipient", "matches": "unknown"}]
    assert "\\u0000" not in json.dumps(body)


def test_decide_counts_no_consent_of_another_servers_patient(tmp_path: Path) -> None:
    theirs = consent({"type": "permit"}, patient=f"{OTHER}/Patient/p1")
    assert decide(tmp_path, theirs, glucose(), "--base", OURS) == 1
    ours = consent({"type": "permit"}, patient=f"{OURS}/Patient/p1")
    assert decide(tmp_path, ours, glucose(), "--base", OURS) == 0


def test_decide_reads_what_a_related_target_refers_to_by_its_base(tmp_path: Path) -> None:
    """The report (in the answer) lists another server's Observation of our record's id: our
    record is not what it refers to, so a permit of the report and what it refers to does not
    open ours; a deny of them closes it (that server may be this one under a name not given)."""
    def report(result: str) -> dict[str, Any]:
        return {"resourceType": "DiagnosticReport", "id": "r1", "status": "final",
                "subject": {"reference": "Patient/p1"}, "code": {"text": "CBC"}, "result": [{"reference": result}]}

    related = {"meaning": "related", "reference": {"reference": "DiagnosticReport/r1"}}
    permit = consent({"type": "deny", "provision": [{"type": "permit", "data": [related]}]})
    deny = consent({"type": "permit", "provision": [{"type": "deny", "data": [related]}]})
    assert decide(tmp_path, permit, glucose(), "--base", OURS, related=report(f"{OTHER}/Observation/o1")) == 1
    assert decide(tmp_path, permit, glucose(), "--base", OURS, related=report(f"{OURS}/Observation/o1")) == 0
    assert decide(tmp_path, deny, glucose(), "--base", OURS, related=report(f"{OTHER}/Observation/o1")) == 1
    assert decide(tmp_path, deny, glucose(), "--base", OURS, related=report(f"{OTHER}/Observation/o2")) == 0


def test_decide_refuses_a_base_that_is_no_url(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert decide(tmp_path, consent({"type": "permit"}), glucose(), "--base", "ehr.example/r4") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--base" in err


async def _decision(gateway: Any, body: dict[str, Any]) -> dict[str, Any]:
    async with gateway.session.post(gateway.admin_url + "/decision", json={"actor": "Practitioner/gp", "at": AT, **body}) as resp:
        assert resp.status == 200, await resp.text()
        answer: dict[str, Any] = await resp.json()
        return answer


@pytest.mark.parametrize("base", ["upstream", "public"])
async def test_post_decision_reads_references_under_the_gateways_bases_as_its_own(
    fake_fhir: FakeFhir, make_gateway: MakeGateway, base: str,
) -> None:
    gateway = await make_gateway(fake_fhir.base_url, public_base_url=PUBLIC)
    own = {"upstream": fake_fhir.base_url, "public": PUBLIC}[base]
    # A record of our patient written with our base: this patient's consent decides it.
    answer = await _decision(gateway, {"consents": [consent({"type": "permit"})], "resource": glucose(f"{own}/Patient/p1")})
    assert answer["decision"] == "permit", answer
    answer = await _decision(gateway, {"consents": [consent(permit_for(f"{own}/Practitioner/gp"))], "resource": glucose()})
    assert answer["decision"] == "permit", answer


async def test_post_decision_reads_another_servers_references_as_unknown(
    fake_fhir: FakeFhir, make_gateway: MakeGateway,
) -> None:
    gateway = await make_gateway(fake_fhir.base_url, public_base_url=PUBLIC)
    for body in (
        {"consents": [consent({"type": "permit"})], "resource": glucose(f"{OTHER}/Patient/p1")},
        {"consents": [consent(permit_for(f"{OTHER}/Practitioner/gp"))], "resource": glucose()},
        {"consents": [consent({"type": "permit"}, patient=f"{OTHER}/Patient/p1")], "resource": glucose()},
        {"consents": [consent({"type": "permit", "data": [
            {"meaning": "instance", "reference": {"reference": f"{OTHER}/Observation/o1"}}]})], "resource": glucose()},
    ):
        answer = await _decision(gateway, body)
        assert answer["decision"] == "deny", (body, answer)
