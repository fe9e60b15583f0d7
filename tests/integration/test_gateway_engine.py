"""The gateway in front of the real FHIR engine, driven by a real FHIR client (fhirpy).

The engine is seeded with the demo data set (gateway/demo/seed.json): see its patients'
consents there. Each test that writes creates its own patient, so tests stay independent.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
import pytest
from fhirpy import AsyncFHIRClient
from fhirpy.base.exceptions import ForbiddenError

from tests.conftest import GatewayUnderTest
from tests.integration.engine import Engine

GP = {"X-Actor": "Practitioner/dr-gp"}
JONES = {"X-Actor": "Practitioner/dr-jones"}
PSYCH = {"X-Actor": "Practitioner/dr-psych"}
ACT = "http://terminology.hl7.org/CodeSystem/v3-ActCode"

# What a general permit must never show of Bob and Alice (ids, codes, display texts).
BOB_HIDDEN = ("bob-hiv", "bob-hiv-test", "bob-oud", "bob-bupe", "B20", "75622-1", "F11.20", "351267",
              "Human immunodeficiency virus", "Opioid dependence", "naloxone")
ALICE_HIDDEN = ("alice-depression", "alice-therapy-note", "F32.9", "35489007", "11510-5", "Depressive disorder")


@pytest.fixture
async def gw(fhir_engine: Engine, make_gateway: Callable[..., Any]) -> GatewayUnderTest:
    gut: GatewayUnderTest = await make_gateway(fhir_engine.base_url)
    return gut


def client(gw: GatewayUnderTest, headers: dict[str, str]) -> AsyncFHIRClient:
    return AsyncFHIRClient(gw.url, extra_headers={"Accept": "application/fhir+json", **headers})


async def test_read_permitted_through_fhirpy(gw: GatewayUnderTest) -> None:
    obs = await client(gw, GP).reference("Observation", "alice-cbc").to_resource()
    assert obs["id"] == "alice-cbc"
    assert obs["code"]["coding"][0]["code"] == "58410-2"


async def test_read_denied_is_403_without_reason(gw: GatewayUnderTest) -> None:
    resp = await gw.get("/Condition/bob-hiv", actor="Practitioner/dr-gp")
    body = await resp.read()
    assert resp.status == 403
    assert resp.headers["X-Consent-Decision"] == "deny"
    for secret in BOB_HIDDEN + ("HIV",):
        assert secret.encode() not in body


async def test_search_paging_followed_to_the_end_returns_only_permitted(gw: GatewayUnderTest) -> None:
    found = await client(gw, GP).resources("Observation").search(patient="Patient/pat-bob").limit(1).fetch_all()
    ids = {r["id"] for r in found}
    assert ids == {"bob-cbc"}


async def test_psychiatrist_sees_mental_health_gp_does_not(gw: GatewayUnderTest) -> None:
    psych = {r["id"] for r in await client(gw, PSYCH).resources("Condition").search(patient="Patient/pat-alice").fetch_all()}
    gp = {r["id"] for r in await client(gw, GP).resources("Condition").search(patient="Patient/pat-alice").fetch_all()}
    assert "alice-depression" in psych
    assert "alice-depression" not in gp
    assert "alice-htn" in gp and "alice-htn" in psych


async def test_not_this_doctor_sees_nothing_of_bob_across_pages(gw: GatewayUnderTest) -> None:
    url = f"{gw.url}/Observation?patient=Patient/pat-bob&_count=1"
    pages = 0
    seen: list[bytes] = []
    while url and pages < 20:
        resp = await gw.session.get(url, headers=JONES)
        body = await resp.read()
        assert resp.status == 200
        seen.append(body + str(dict(resp.headers)).encode())
        bundle = orjson.loads(body)
        assert "total" not in bundle
        assert all(e["resource"]["resourceType"] == "OperationOutcome" for e in bundle.get("entry", []))
        url = next((link["url"] for link in bundle.get("link", []) if link["relation"] == "next"), "")
        if url:
            assert url.startswith(gw.url), "paging must stay behind the gateway"
        pages += 1
    assert pages >= 2, "the engine paged the search"
    raw = b"".join(seen)
    for secret in BOB_HIDDEN + ("bob-cbc", "58410-2"):
        assert secret.encode() not in raw, secret


async def test_include_and_revinclude_entries_are_decided(gw: GatewayUnderTest) -> None:
    bundle = await client(gw, GP).resources("Patient").search(_id="pat-bob").revinclude("Condition", "subject").fetch_raw()
    ids = {e["resource"]["id"] for e in bundle.get("entry", []) if e["resource"]["resourceType"] != "OperationOutcome"}
    assert "pat-bob" in ids
    assert not ids & {"bob-hiv", "bob-oud"}
    raw = orjson.dumps(bundle)
    for secret in BOB_HIDDEN:
        assert secret.encode() not in raw
    included = await client(gw, GP).resources("MedicationRequest").search(patient="Patient/pat-alice").include("MedicationRequest", "requester").fetch_raw()
    kinds = {e["resource"]["resourceType"] for e in included.get("entry", [])}
    assert "Practitioner" in kinds


async def test_instance_history_of_hidden_resource_reveals_nothing(gw: GatewayUnderTest) -> None:
    resp = await gw.get("/Condition/bob-hiv/_history", actor="Practitioner/dr-gp")
    body = await resp.read()
    # Every version hidden: answered like the denied read itself.
    assert resp.status == 403
    assert resp.headers["X-Consent-Decision"] == "deny"
    for secret in BOB_HIDDEN:
        assert secret.encode() not in body
    permitted = await gw.get("/Condition/bob-hiv/_history", actor="Patient/pat-bob")
    bundle = orjson.loads(await permitted.read())
    assert permitted.status == 200
    assert any(e["resource"]["id"] == "bob-hiv" for e in bundle["entry"])


async def test_consent_transaction_write_is_reflected_at_once(gw: GatewayUnderTest) -> None:
    fhir = client(gw, GP)
    pid = f"pat-{uuid.uuid4().hex[:8]}"
    await fhir.resource("Patient", id=pid, name=[{"family": "Test"}]).save()
    obs = fhir.resource("Observation", id=f"{pid}-cbc", status="final", subject={"reference": f"Patient/{pid}"},
                        code={"coding": [{"system": "http://loinc.org", "code": "58410-2"}]})
    await obs.save()
    # No consent: default deny.
    assert [r["id"] for r in await fhir.resources("Observation").search(patient=f"Patient/{pid}").fetch_all()] == []
    consent = {
        "resourceType": "Consent", "status": "active",
        "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": f"Patient/{pid}"},
        "policyRule": {"coding": [{"system": ACT, "code": "OPTIN"}]},
        "provision": {"type": "permit"},
    }
    tx = {"resourceType": "Bundle", "type": "transaction",
          "entry": [{"resource": consent, "request": {"method": "POST", "url": "Consent"}}]}
    # Only the patient (or a listed writer role) writes her Consents, in a transaction as alone.
    resp = await gw.session.post(gw.url + "/", data=orjson.dumps(tx), headers={**GP, "Content-Type": "application/fhir+json"})
    assert resp.status == 403, await resp.text()
    patient = {"X-Actor": f"Patient/{pid}", "Content-Type": "application/fhir+json"}
    resp = await gw.session.post(gw.url + "/", data=orjson.dumps(tx), headers=patient)
    assert resp.status == 200, await resp.text()
    ids = [r["id"] for r in await fhir.resources("Observation").search(patient=f"Patient/{pid}").fetch_all()]
    assert ids == [f"{pid}-cbc"]


async def test_break_glass_through_fhirpy_is_audited(gw: GatewayUnderTest) -> None:
    headers = {"X-Actor": "Practitioner/dr-er", "X-Break-Glass": "Medical emergency"}
    with pytest.raises(ForbiddenError):
        await client(gw, {"X-Actor": "Practitioner/dr-er"}).reference("Condition", "carol-pregnancy").to_resource()
    cond = await client(gw, headers).reference("Condition", "carol-pregnancy").to_resource()
    assert cond["id"] == "carol-pregnancy"
    lines = gw.state.settings.audit.path.read_bytes().splitlines()
    event = orjson.loads(lines[-1])
    assert event["resourceType"] == "AuditEvent"
    assert any(e["what"]["reference"] == "Condition/carol-pregnancy" for e in event["entity"])
    assert event["agent"][0]["who"]["reference"] == "Practitioner/dr-er"


async def test_metadata_passes_and_xml_is_refused(gw: GatewayUnderTest) -> None:
    resp = await gw.get("/metadata")
    assert resp.status == 200
    assert (await resp.json(content_type=None))["resourceType"] == "CapabilityStatement"
    resp = await gw.get("/Patient/pat-alice", Accept="application/fhir+xml")
    assert resp.status == 406
    async with aiohttp.ClientSession() as raw:
        direct = await raw.get(gw.url + "/Patient/pat-alice", headers={"X-Actor": "Patient/pat-alice"})
        assert direct.status == 200
