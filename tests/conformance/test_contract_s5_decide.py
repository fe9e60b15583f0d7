"""CONTRACT §5 on the wire of ``consent-gateway decide --json`` and ``POST /decision``: the same
case, the same answer from both, and the consents whose root has conditions but no type named
under ``ambiguous_consents`` (whichever way the site reads them), no others."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from gateway.commands import decide as command
from tests.conftest import GatewayUnderTest

HL7 = Path(__file__).resolve().parents[1] / "data" / "hl7-consent-examples"
ACT = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
CONF = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"
SCOPE = "http://terminology.hl7.org/CodeSystem/consentscope"
AT = "2024-06-01T12:00:00Z"
JSON = dict[str, Any]


def hl7(name: str) -> JSON:
    data: JSON = json.loads((HL7 / f"Consent-consent-example-{name}.json").read_text())
    return data


def consent(cid: str, provision: JSON | None, rule: JSON | None = None, **more: Any) -> JSON:
    found: JSON = {
        "resourceType": "Consent", "id": cid, "status": "active",
        "scope": {"coding": [{"system": SCOPE, "code": "patient-privacy"}]},
        "patient": {"reference": "Patient/f001"}, "dateTime": "2024-01-01",
        "policyRule": rule or {"coding": [{"system": ACT, "code": "OPTIN"}]},
    }
    if provision is not None:
        found["provision"] = provision
    found.update(more)
    return {k: v for k, v in found.items() if v is not None}


def observation(**more: Any) -> JSON:
    return {"resourceType": "Observation", "id": "o1", "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "2345-7"}]},
            "subject": {"reference": "Patient/f001"}, "effectiveDateTime": "2024-03-01", **more}


def actor(ref: str, role: str) -> JSON:
    return {"role": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "code": role}]},
            "reference": {"reference": ref}}


@dataclass
class Case:
    consents: list[JSON]
    actor: str
    decision: str
    ambiguous: list[str] = field(default_factory=list)
    resource: JSON = field(default_factory=observation)
    organization: str | None = None
    groups: list[str] = field(default_factory=list)
    purpose: str | None = None
    at: str = AT


CASES: dict[str, Case] = {
    # the official examples: untyped roots with conditions are named, CST- or period-only roots not
    "notThem-named-nurse": Case([hl7("notThem")], "Practitioner/f204", "deny", ["Consent/consent-example-notThem"]),
    "notThem-other-nurse": Case([hl7("notThem")], "Practitioner/f205", "permit", ["Consent/consent-example-notThem"]),
    "grantor-grantee": Case([hl7("grantor")], "Patient/example", "permit", ["Consent/consent-example-grantor"]),
    "grantor-other": Case([hl7("grantor")], "Practitioner/f204", "deny", ["Consent/consent-example-grantor"]),
    "Out-custodian-only-root": Case([hl7("Out")], "Practitioner/f204", "deny", organization="Organization/f001"),
    "notOrg-typed-root": Case([hl7("notOrg")], "Practitioner/x", "deny", organization="Organization/f001"),
    "notTime-expired": Case([hl7("notTime")], "Practitioner/x", "deny"),
    "notTime-in-its-window": Case([hl7("notTime")], "Practitioner/x", "permit", at="2015-01-15T10:00:00Z"),
    "basic-expired": Case([hl7("basic")], "Practitioner/x", "deny"),
    # in force: scope and purpose
    "research-consent-for-research": Case(
        [consent("res", {"type": "permit"}, scope={"coding": [{"system": SCOPE, "code": "research"}]})],
        "Practitioner/x", "permit", purpose="CLINTRCH"),
    "research-consent-not-for-treatment": Case(
        [consent("res", {"type": "permit"}, scope={"coding": [{"system": SCOPE, "code": "research"}]})],
        "Practitioner/x", "deny", purpose="TREAT"),
    "etreat-counts-as-treat": Case(
        [consent("tr", {"type": "permit", "purpose": [{"system": ACT, "code": "TREAT"}]})],
        "Practitioner/x", "permit", purpose="ETREAT"),
    # actors: organization and CareTeam of the requester
    "organization-of-the-requester": Case(
        [consent("org", {"type": "permit", "actor": [actor("Organization/ghh", "IRCP")]})],
        "Practitioner/x", "permit", organization="Organization/ghh"),
    "careteam-of-the-requester": Case(
        [consent("ct", {"type": "permit", "actor": [actor("CareTeam/ct1", "PRCP")]})],
        "Practitioner/x", "permit", groups=["CareTeam/ct1"]),
    "careteam-not-of-the-requester": Case(
        [consent("ct", {"type": "permit", "actor": [actor("CareTeam/ct1", "PRCP")]})],
        "Practitioner/x", "deny", groups=["CareTeam/ct2"]),
    # an untyped root naming an author is ambiguous too; OPTIN: the author's records are the exception
    "author-exception-root": Case(
        [consent("aut", {"actor": [actor("Practitioner/psych", "AUT")]})],
        "Practitioner/x", "deny", ["Consent/aut"], resource=observation(performer=[{"reference": "Practitioner/psych"}])),
    # a policyRule's OPTIN counts wherever it stands among its codings
    "policy-rule-known-code-after-a-local-one": Case(
        [consent("pr", {}, {"coding": [{"system": "urn:example:local", "code": "GENERAL"}, {"system": ACT, "code": "OPTIN"}]}),
         consent("pr2", {}, {"coding": [{"code": "hospital-general"}, {"system": ACT, "code": "OPTIN"}]})],
        "Practitioner/x", "permit"),
    # class: a resource scope of rules/scopes.yaml (a laboratory Observation is LABS, vital signs not)
    "class-resource-scope-labs": Case(
        [consent("labs", {"type": "permit", "class": [{"system": "urn:consent-gateway:resource-scope", "code": "LABS"}]})],
        "Practitioner/x", "permit", resource=observation(category=[{"coding": [
            {"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "laboratory"}]}])),
    "class-resource-scope-labs-not-vitals": Case(
        [consent("labs", {"type": "permit", "class": [{"system": "urn:consent-gateway:resource-scope", "code": "LABS"}]})],
        "Practitioner/x", "deny", resource=observation(category=[{"coding": [
            {"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs"}]}])),
    # code anywhere: a deny on a code in an extension withholds the record (default permit via
    # an opt-in base)
    "code-in-an-extension": Case(
        [consent("code", {"provision": [{"type": "deny", "code": [{"coding": [
            {"system": "http://snomed.info/sct", "code": "38341003"}]}]}]})],
        "Practitioner/x", "deny", resource=observation(extension=[{
            "url": "http://hl7.org/fhir/StructureDefinition/workflow-reasonCode",
            "valueCodeableConcept": {"coding": [{"system": "http://snomed.info/sct", "code": "38341003"}]}}])),
    # confidentiality: the rules make R sensitive; a permit naming V opens it, naming N does not
    "restricted-opened-by-a-v-permit": Case(
        [consent("v", {"type": "permit", "securityLabel": [{"system": CONF, "code": "V"}]})],
        "Practitioner/x", "permit", resource=observation(meta={"security": [{"system": CONF, "code": "R"}]})),
    "restricted-not-reached-by-an-n-permit": Case(
        [consent("n", {"type": "permit", "securityLabel": [{"system": CONF, "code": "N"}]})],
        "Practitioner/x", "deny", resource=observation(meta={"security": [{"system": CONF, "code": "R"}]})),
}


def _cli(tmp_path: Path, case: Case, *extra: str) -> tuple[int, Any]:
    parser = argparse.ArgumentParser()
    command.add_parser(parser.add_subparsers())
    argv = ["decide"]
    for i, item in enumerate(case.consents):
        path = tmp_path / f"consent-{i}.json"
        path.write_text(json.dumps(item))
        argv += ["--consent", str(path)]
    (tmp_path / "resource.json").write_text(json.dumps(case.resource))
    argv += ["--resource", str(tmp_path / "resource.json"), "--actor", case.actor, "--at", case.at, "--json"]
    if case.organization:
        argv += ["--org", case.organization]
    for group in case.groups:
        argv += ["--group", group]
    if case.purpose:
        argv += ["--purpose", case.purpose]
    return command.run(parser.parse_args([*argv, *extra])), None


async def _admin(gw: GatewayUnderTest, case: Case) -> Any:
    body: JSON = {"consents": case.consents, "resource": case.resource, "actor": case.actor, "at": case.at,
                  "groups": case.groups}
    if case.organization:
        body["organization"] = case.organization
    if case.purpose:
        body["purpose"] = case.purpose
    async with gw.session.post(gw.admin_url + "/decision", json=body) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


@pytest.mark.parametrize("name", list(CASES))
async def test_decide_and_post_decision_agree_with_the_contract(
    name: str, gateway: GatewayUnderTest, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    case = CASES[name]
    code, _ = _cli(tmp_path, case)
    printed = json.loads(capsys.readouterr().out)
    answered = await _admin(gateway, case)
    assert printed["decision"] == case.decision, printed["reasons"]
    assert code == (0 if case.decision == "permit" else 1)
    assert printed["ambiguous_consents"] == case.ambiguous
    assert answered == printed


@pytest.mark.parametrize("reading", ["exception", "scope"])
def test_an_ambiguous_consent_is_named_under_either_reading(
    reading: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    case = CASES["notThem-named-nurse"]
    _cli(tmp_path, case, "--untyped-root", reading)
    printed = json.loads(capsys.readouterr().out)
    assert printed["ambiguous_consents"] == ["Consent/consent-example-notThem"]
    assert [c["root_reading"] for c in printed["consents"]] == [reading]
    # exception: the named nurse is the exception to OPTIN; scope: the root names who it is for
    assert printed["decision"] == {"exception": "deny", "scope": "permit"}[reading]


@pytest.mark.parametrize(
    ("dates", "decision"),
    [
        (("2023-01-01", "2024-05-01"), "permit"),   # the later permit wins
        ((None, "2024-05-01"), "deny"),             # an undated deny is not outranked
        (("2020-01-01", None), "deny"),             # an undated permit outranks no dated deny
    ],
)
def test_latest_wins_places_undated_consents_the_safe_way(
    dates: tuple[str | None, str | None], decision: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    deny_date, permit_date = dates
    case = Case([consent("deny", {"type": "deny"}, dateTime=deny_date),
                 consent("permit", {"type": "permit"}, dateTime=permit_date)], "Practitioner/x", decision)
    code, _ = _cli(tmp_path, case, "--combining", "latest-wins")
    printed = json.loads(capsys.readouterr().out)
    assert printed["decision"] == decision, printed["reasons"]
    assert printed["combining"] == "latest-wins"
    assert code == (0 if decision == "permit" else 1)
