"""CONTRACT §2 admin port, as an outsider checks it: ``POST /decision`` gives the answer of
``consent-gateway decide`` (the installed script, JSON out), ``POST /cache/invalidate`` with
both body forms makes the next request read the consents again."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from gateway.demo.server import DemoFhirServer
from tests.conftest import GatewayUnderTest
from tests.unit._util import MakeGateway, clean_env, gateway_command

SEED = json.loads((Path(__file__).resolve().parents[2] / "gateway" / "demo" / "seed.json").read_text())
RESOURCES = {f"{e['resource']['resourceType']}/{e['resource']['id']}": e["resource"] for e in SEED["entry"]}
HL7 = Path(__file__).resolve().parents[1] / "data" / "hl7-consent-examples"

CASES: dict[str, tuple[list[str], str, str, str | None]] = {
    "sensitive-label-not-opened": (["Consent/consent-bob-optin-not-jones"], "Observation/bob-hiv-test", "Practitioner/dr-gp", None),
    "plain-data-permitted": (["Consent/consent-bob-optin-not-jones"], "Observation/bob-cbc", "Practitioner/dr-gp", "TREAT"),
    "named-clinician-denied": (["Consent/consent-bob-optin-not-jones"], "Observation/bob-cbc", "Practitioner/dr-jones", "TREAT"),
    "label-opened-for-psychiatrist": (["Consent/consent-alice-optin"], "Condition/alice-depression", "Practitioner/dr-psych", None),
    "opt-out": (["Consent/consent-carol-optout"], "Observation/carol-cbc", "Practitioner/dr-gp", None),
    "two-consents-research-purpose": (
        ["Consent/consent-dana-hospital", "Consent/consent-dana-research"], "Observation/dana-cbc", "Practitioner/dr-gp", "HRESCH",
    ),
}


def _decide_cli(tmp_path: Path, consents: list[dict[str, Any]], resource: dict[str, Any], actor: str, purpose: str | None) -> tuple[int, Any]:
    args = [*gateway_command(), "decide"]
    for i, consent in enumerate(consents):
        path = tmp_path / f"consent-{i}.json"
        path.write_text(json.dumps(consent))
        args += ["--consent", str(path)]
    (tmp_path / "resource.json").write_text(json.dumps(resource))
    args += ["--resource", str(tmp_path / "resource.json"), "--actor", actor, "--json"]
    if purpose is not None:
        args += ["--purpose", purpose]
    done = subprocess.run(args, capture_output=True, text=True, env=clean_env(), timeout=60, check=False)
    return done.returncode, json.loads(done.stdout)


async def _decide_admin(gw: GatewayUnderTest, consents: list[dict[str, Any]], resource: dict[str, Any], actor: str, purpose: str | None) -> Any:
    body: dict[str, Any] = {"consents": consents, "resource": resource, "actor": actor}
    if purpose is not None:
        body["purpose"] = purpose
    async with gw.session.post(gw.admin_url + "/decision", json=body) as resp:
        assert resp.status == 200
        assert resp.content_type == "application/json"
        return await resp.json()


@pytest.mark.parametrize("case", list(CASES))
async def test_post_decision_answers_what_decide_prints(case: str, gateway: GatewayUnderTest, tmp_path: Path) -> None:
    consent_refs, resource_ref, actor, purpose = CASES[case]
    consents = [RESOURCES[ref] for ref in consent_refs]
    code, printed = _decide_cli(tmp_path, consents, RESOURCES[resource_ref], actor, purpose)
    answered = await _decide_admin(gateway, consents, RESOURCES[resource_ref], actor, purpose)
    assert answered == printed
    assert code == (0 if printed["decision"] == "permit" else 1)


async def test_post_decision_reads_an_official_example_as_decide_does(gateway: GatewayUnderTest, tmp_path: Path) -> None:
    not_them = json.loads((HL7 / "Consent-consent-example-notThem.json").read_text())
    patient = not_them["patient"]["reference"]
    resource = {"resourceType": "Observation", "id": "o1", "status": "final", "subject": {"reference": patient},
                "code": {"coding": [{"system": "http://loinc.org", "code": "2345-7"}]}}
    for actor in ("Practitioner/f204", "Practitioner/f001"):
        code, printed = _decide_cli(tmp_path, [not_them], resource, actor, None)
        assert await _decide_admin(gateway, [not_them], resource, actor, None) == printed
    assert printed["decision"] == "permit"


async def test_post_decision_refuses_what_decide_refuses_with_an_outcome(gateway: GatewayUnderTest) -> None:
    async with gateway.session.post(gateway.admin_url + "/decision", json={"consents": [], "resource": {}}) as resp:
        assert resp.status == 400
        assert resp.content_type == "application/fhir+json"
        assert (await resp.json())["resourceType"] == "OperationOutcome"


async def _read(gw: GatewayUnderTest, path: str, actor: str) -> int:
    async with gw.session.get(gw.url + path, headers={"X-Actor": actor}) as resp:
        await resp.read()
        return resp.status


def _opt_out(consent_id: str, patient: str) -> dict[str, Any]:
    consent = dict(RESOURCES["Consent/consent-carol-optout"])
    return {**consent, "id": consent_id, "patient": {"reference": patient}}


@pytest.mark.parametrize("body", [{"patient": "Patient/pat-bob"}, {}], ids=["one-patient", "all"])
async def test_cache_invalidate_makes_the_next_request_read_the_consents_again(
    body: dict[str, str], demo_fhir: DemoFhirServer, make_gateway: MakeGateway,
) -> None:
    gw = await make_gateway(demo_fhir.base_url, consent={"cache_ttl_s": 3600})
    assert await _read(gw, "/Observation/bob-cbc", "Practitioner/dr-gp") == 200
    # Bob opts out straight at the FHIR server: the cached opt-in still decides...
    demo_fhir.put(_opt_out("consent-bob-optin-not-jones", "Patient/pat-bob"))
    assert await _read(gw, "/Observation/bob-cbc", "Practitioner/dr-gp") == 200
    async with gw.session.post(gw.admin_url + "/cache/invalidate", json=body) as resp:
        assert resp.status == 200
    # ...until the cache is told to forget it.
    assert await _read(gw, "/Observation/bob-cbc", "Practitioner/dr-gp") == 403


async def test_cache_invalidate_of_one_patient_keeps_the_others(demo_fhir: DemoFhirServer, make_gateway: MakeGateway) -> None:
    gw = await make_gateway(demo_fhir.base_url, consent={"cache_ttl_s": 3600})
    assert await _read(gw, "/Observation/bob-cbc", "Practitioner/dr-gp") == 200
    assert await _read(gw, "/Observation/alice-cbc", "Practitioner/dr-gp") == 200
    misses = gw.metric("consent_gateway_consent_cache_misses_total")
    async with gw.session.post(gw.admin_url + "/cache/invalidate", json={"patient": "Patient/pat-bob"}) as resp:
        assert resp.status == 200
    assert await _read(gw, "/Observation/alice-cbc", "Practitioner/dr-gp") == 200
    assert gw.metric("consent_gateway_consent_cache_misses_total") == misses
    assert await _read(gw, "/Observation/bob-cbc", "Practitioner/dr-gp") == 200
    assert gw.metric("consent_gateway_consent_cache_misses_total") == misses + 1


@pytest.mark.parametrize("body", [b"[]", b"not json", b'{"patient": "Observation/1"}', b'{"patients": []}'])
async def test_cache_invalidate_refuses_other_bodies_with_an_outcome(body: bytes, gateway: GatewayUnderTest) -> None:
    async with gateway.session.post(gateway.admin_url + "/cache/invalidate", data=body) as resp:
        assert resp.status == 400
        assert resp.content_type == "application/fhir+json"


def test_decide_takes_consents_repeated_or_listed_alike(tmp_path: Path) -> None:
    hospital, opt_out = RESOURCES["Consent/consent-dana-hospital"], RESOURCES["Consent/consent-carol-optout"]
    opt_out = {**opt_out, "patient": {"reference": "Patient/pat-dana"}}
    for i, consent in enumerate((hospital, opt_out)):
        (tmp_path / f"c{i}.json").write_text(json.dumps(consent))
    (tmp_path / "r.json").write_text(json.dumps(RESOURCES["Observation/dana-cbc"]))
    common = ["--resource", str(tmp_path / "r.json"), "--actor", "Practitioner/dr-gp", "--org", "Organization/org-hospital", "--json"]
    outputs = []
    for consents in (["--consent", str(tmp_path / "c0.json"), str(tmp_path / "c1.json")],
                     ["--consent", str(tmp_path / "c0.json"), "--consent", str(tmp_path / "c1.json")]):
        done = subprocess.run([*gateway_command(), "decide", *consents, *common], capture_output=True, text=True,
                              env=clean_env(), timeout=60, check=False)
        outputs.append((done.returncode, json.loads(done.stdout)))
    assert outputs[0] == outputs[1]
    # The opt-out (deny-overrides) decides: the hospital's permit alone would let it through.
    assert outputs[1][0] == 1 and outputs[1][1]["decision"] == "deny"


async def test_an_unknown_purpose_is_refused_by_decide_as_by_post_decision(gateway: GatewayUnderTest, tmp_path: Path) -> None:
    consent, resource = RESOURCES["Consent/consent-bob-optin-not-jones"], RESOURCES["Observation/bob-cbc"]
    async with gateway.session.post(gateway.admin_url + "/decision", json={
        "consents": [consent], "resource": resource, "actor": "Practitioner/dr-gp", "purpose": "NOPE",
    }) as resp:
        assert resp.status == 400
    (tmp_path / "c.json").write_text(json.dumps(consent))
    (tmp_path / "r.json").write_text(json.dumps(resource))
    done = subprocess.run(
        [*gateway_command(), "decide", "--consent", str(tmp_path / "c.json"), "--resource", str(tmp_path / "r.json"),
         "--actor", "Practitioner/dr-gp", "--purpose", "NOPE"],
        capture_output=True, text=True, env=clean_env(), timeout=60, check=False,
    )
    assert done.returncode == 2 and done.stdout == ""
    [line] = done.stderr.splitlines()
    assert "--purpose" in line and "NOPE" in line


async def test_cache_entries_gauge_follows_invalidation(demo_fhir: DemoFhirServer, make_gateway: MakeGateway) -> None:
    gw = await make_gateway(demo_fhir.base_url, consent={"cache_ttl_s": 3600})
    for path in ("/Observation/bob-cbc", "/Observation/alice-cbc", "/Observation/carol-cbc"):
        await _read(gw, path, "Practitioner/dr-gp")
    entries = "consent_gateway_consent_cache_entries"
    assert gw.metric(entries) == 3
    async with gw.session.post(gw.admin_url + "/cache/invalidate", json={"patient": "Patient/pat-bob"}) as resp:
        assert resp.status == 200
    assert gw.metric(entries) == 2
    async with gw.session.post(gw.admin_url + "/cache/invalidate", json={}) as resp:
        assert resp.status == 200
    assert gw.metric(entries) == 0


async def test_post_decision_explains_every_kind_of_requester_the_gateway_accepts(gateway: GatewayUnderTest, tmp_path: Path) -> None:
    # jwt mode names requesters by fhirUser, which may be a Person (CONTRACT §4).
    consents, resource = [RESOURCES["Consent/consent-bob-optin-not-jones"]], RESOURCES["Observation/bob-cbc"]
    for actor in ("Person/pe-1", "PractitionerRole/pr-1", "RelatedPerson/rp-1", "Device/d-1", "Organization/org-hospital"):
        _, printed = _decide_cli(tmp_path, consents, resource, actor, None)
        assert await _decide_admin(gateway, consents, resource, actor, None) == printed, actor


async def test_post_decision_reads_a_bundle_of_consents_as_decide_does(gateway: GatewayUnderTest, tmp_path: Path) -> None:
    # decide --consent takes "a Bundle of Consents" too; the same JSON posted gets the same answer.
    hospital, opt_out = RESOURCES["Consent/consent-dana-hospital"], RESOURCES["Consent/consent-carol-optout"]
    opt_out = {**opt_out, "patient": {"reference": "Patient/pat-dana"}}
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": hospital}, {"resource": opt_out}]}
    resource = RESOURCES["Observation/dana-cbc"]
    code, printed = _decide_cli(tmp_path, [bundle], resource, "Practitioner/dr-gp", None)
    assert code == 1 and printed["reasons"][0]["consent"] == "Consent/consent-carol-optout"
    assert await _decide_admin(gateway, [bundle], resource, "Practitioner/dr-gp", None) == printed


@pytest.mark.parametrize("consents", [
    [{"resourceType": "Observation", "id": "o1"}],
    [{"resourceType": "Bundle", "type": "collection", "entry": [{"resource": {"resourceType": "Patient", "id": "p1"}}]}],
], ids=["not-a-consent", "bundle-of-other-things"])
async def test_post_decision_refuses_what_is_not_a_consent_as_decide_does(
    consents: list[dict[str, Any]], gateway: GatewayUnderTest, tmp_path: Path,
) -> None:
    resource = RESOURCES["Observation/bob-cbc"]
    async with gateway.session.post(gateway.admin_url + "/decision", json={
        "consents": consents, "resource": resource, "actor": "Practitioner/dr-gp",
    }) as resp:
        assert resp.status == 400
        assert resp.content_type == "application/fhir+json"
        assert (await resp.json())["resourceType"] == "OperationOutcome"
    (tmp_path / "c.json").write_text(json.dumps(consents[0]))
    (tmp_path / "r.json").write_text(json.dumps(resource))
    done = subprocess.run(
        [*gateway_command(), "decide", "--consent", str(tmp_path / "c.json"), "--resource", str(tmp_path / "r.json"),
         "--actor", "Practitioner/dr-gp"],
        capture_output=True, text=True, env=clean_env(), timeout=60, check=False,
    )
    assert done.returncode == 2 and done.stdout == ""


def test_decide_prints_the_decision_the_consent_the_provision_path_and_the_labels(tmp_path: Path) -> None:
    # CONTRACT §2: "prints the decision and why (which consent, which provision path, which labels)".
    (tmp_path / "c.json").write_text(json.dumps(RESOURCES["Consent/consent-alice-optin"]))
    (tmp_path / "r.json").write_text(json.dumps(RESOURCES["Condition/alice-depression"]))
    printed = {}
    for actor in ("Practitioner/dr-psych", "Practitioner/dr-gp"):
        done = subprocess.run(
            [*gateway_command(), "decide", "--consent", str(tmp_path / "c.json"), "--resource", str(tmp_path / "r.json"),
             "--actor", actor, "--purpose", "TREAT"],
            capture_output=True, text=True, env=clean_env(), timeout=60, check=False,
        )
        printed[actor] = (done.returncode, done.stdout)
    code, text = printed["Practitioner/dr-psych"]
    assert code == 0 and "decision: permit" in text
    assert "Consent/consent-alice-optin" in text and "provision.provision[" in text
    assert "labels: " in text and "PSY" in text.split("labels: ", 1)[1].splitlines()[0]
    code, text = printed["Practitioner/dr-gp"]
    assert code == 1 and "decision: deny" in text and "Consent/consent-alice-optin" in text
