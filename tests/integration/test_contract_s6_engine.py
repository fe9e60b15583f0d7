"""CONTRACT §6 ("Enforcing") through the running gateway in front of the real FHIR engine.

The clauses whose outcome depends on what a real server answers: its Bundles (total, paging
links, search modes), its own 404s, its history, its Location headers. Bob's consent
(gateway/demo/seed.json) gives Dr GP a general permit that does not open his HIV and opioid-use
records; Dr Jones is excluded from Bob's records. fhirpy is the client where a client library
would be; raw bytes are read where the clause is about bytes.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from fhirpy.base.exceptions import ForbiddenError

from tests.conftest import GatewayUnderTest
from tests.integration.engine import Engine
from tests.integration.test_gateway_engine import BOB_HIDDEN, GP
from tests.integration.test_side_doors_engine import engine_put, fhir_client

pytestmark = pytest.mark.integration
JSON = dict[str, Any]
FHIR_JSON = "application/fhir+json"
LOINC = "http://loinc.org"
ACT = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
BOB_OBS = "/Observation?patient=Patient/pat-bob"


@pytest.fixture
async def gw(fhir_engine: Engine, make_gateway: Callable[..., Any]) -> GatewayUnderTest:
    gut: GatewayUnderTest = await make_gateway(fhir_engine.base_url)
    return gut


async def call(gw: GatewayUnderTest, method: str, path: str, headers: dict[str, str] | None = None,
               body: Any = None) -> tuple[int, dict[str, str], bytes]:
    hdrs = dict(GP if headers is None else headers)
    data = None
    if body is not None:
        data = orjson.dumps(body)
        hdrs["Content-Type"] = FHIR_JSON
    async with gw.session.request(method, gw.url + path, headers=hdrs, data=data) as resp:
        return resp.status, dict(resp.headers), await resp.read()


def leaks(raw: bytes) -> list[str]:
    return [s for s in BOB_HIDDEN if s.encode() in raw]


def is_outcome(headers: dict[str, str], raw: bytes) -> bool:
    return headers.get("Content-Type", "").startswith(FHIR_JSON) and orjson.loads(raw)["resourceType"] == "OperationOutcome"


def patient_with_records(tag: str) -> tuple[str, list[JSON]]:
    """A fresh patient with a general opt-in (sensitive data closed) and one ordinary result."""
    pid = f"s6-{tag}-{uuid.uuid4().hex[:8]}"
    ref = f"Patient/{pid}"
    return ref, [
        {"resourceType": "Patient", "id": pid, "name": [{"family": tag.title()}]},
        {"resourceType": "Observation", "id": f"{pid}-cbc", "status": "final", "subject": {"reference": ref},
         "code": {"coding": [{"system": LOINC, "code": "58410-2", "display": "CBC panel"}]}},
        {"resourceType": "Consent", "id": f"{pid}-optin", "status": "active",
         "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]},
         "category": [{"coding": [{"system": LOINC, "code": "59284-0"}]}], "patient": {"reference": ref},
         "dateTime": "2024-01-15T10:00:00Z", "policyRule": {"coding": [{"system": ACT, "code": "OPTIN"}]},
         "provision": {"type": "permit"}},
    ]


# ---------------------------------------------------------------- filtered answers


@pytest.mark.parametrize("path", [BOB_OBS, "/Condition?patient=Patient/pat-bob",
                                  "/Patient?_id=pat-bob&_revinclude=Condition:subject"])
async def test_a_filtered_search_has_a_suppressed_outcome_no_total_and_gateway_links(gw: GatewayUnderTest, path: str) -> None:
    status, headers, raw = await call(gw, "GET", path)
    assert status == 200 and headers["X-Consent-Decision"] == "filtered"
    assert leaks(raw) == []
    bundle = orjson.loads(raw)
    assert "total" not in bundle
    outcomes = [e for e in bundle["entry"] if e.get("search", {}).get("mode") == "outcome"]
    assert len(outcomes) == 1 and [i["code"] for i in outcomes[0]["resource"]["issue"]] == ["suppressed"]
    urls = [link["url"] for link in bundle.get("link", [])] + [e["fullUrl"] for e in bundle["entry"] if "fullUrl" in e]
    assert urls and all(u.startswith(gw.url + "/") for u in urls), urls


async def test_paging_stays_behind_the_gateway_and_never_shows_hidden(gw: GatewayUnderTest) -> None:
    client = fhir_client(gw, GP)
    found = await client.resources("Observation").search(patient="Patient/pat-bob").sort("_id").limit(1).fetch_all()
    assert [r["id"] for r in found] == ["bob-cbc"]
    status, _, raw = await call(gw, "GET", f"{BOB_OBS}&_count=1&_sort=_id")
    nxt = [link["url"] for link in orjson.loads(raw).get("link", []) if link["relation"] == "next"]
    assert status == 200 and nxt and nxt[0].startswith(gw.url + "/"), raw


async def test_an_instance_history_loses_its_hidden_versions(gw: GatewayUnderTest, fhir_engine: Engine) -> None:
    ref, resources = patient_with_records("hist")
    for resource in resources:
        await engine_put(fhir_engine, resource)
    obs = resources[1]
    hiv = {**obs, "code": {"coding": [{"system": LOINC, "code": "75622-1", "display": "HIV 1 and 2 tests"}]}}
    await engine_put(fhir_engine, hiv)
    await engine_put(fhir_engine, obs)  # corrected back: the current version is ordinary
    status, headers, raw = await call(gw, "GET", f"/Observation/{obs['id']}/_history")
    assert status == 200 and headers["X-Consent-Decision"] == "filtered"
    assert b"75622-1" not in raw and b"HIV" not in raw
    bundle = orjson.loads(raw)
    assert "total" not in bundle
    assert any(e.get("search", {}).get("mode") == "outcome" for e in bundle["entry"])


@pytest.mark.parametrize("self_access,total_kept", [(False, False), (True, True)])
async def test_total_is_kept_only_for_a_requester_permitted_outright(
        gw: GatewayUnderTest, fhir_engine: Engine, self_access: bool, total_kept: bool) -> None:
    ref, resources = patient_with_records("total")
    for resource in resources:
        await engine_put(fhir_engine, resource)
    status, _, raw = await call(gw, "GET", f"/Observation?patient={ref}", {"X-Actor": ref} if self_access else GP)
    bundle = orjson.loads(raw)
    assert status == 200 and len(bundle["entry"]) == 1
    assert ("total" in bundle) is total_kept
    if total_kept:
        assert bundle["total"] == 1


# ---------------------------------------------------------------- projection, refusals, JSON only


@pytest.mark.parametrize("projection", ["_elements=id", "_summary=true", "_elements=subject"])
async def test_projection_never_hides_the_codes_that_decide(gw: GatewayUnderTest, projection: str) -> None:
    status, _, raw = await call(gw, "GET", f"{BOB_OBS}&{projection}")
    assert status == 200 and leaks(raw) == []
    kept = [e["resource"] for e in orjson.loads(raw)["entry"] if e["resource"]["resourceType"] == "Observation"]
    assert [r["id"] for r in kept] == ["bob-cbc"]


@pytest.mark.parametrize("path", [f"{BOB_OBS}&_summary=count", "/Patient?_has:Condition:subject:code=B20",
                                  "/Condition/_history", "/_history", "/$graphql?query=%7BPatientList%7Bid%7D%7D"])
async def test_unfilterable_requests_are_refused(gw: GatewayUnderTest, path: str) -> None:
    status, headers, raw = await call(gw, "GET", path)
    assert status == 403 and is_outcome(headers, raw) and leaks(raw) == []


async def test_a_patients_own_count_is_answered(gw: GatewayUnderTest, fhir_engine: Engine) -> None:
    ref, resources = patient_with_records("count")
    for resource in resources:
        await engine_put(fhir_engine, resource)
    status, _, raw = await call(gw, "GET", f"/Observation?patient={ref}&_summary=count", {"X-Actor": ref})
    assert status == 200, raw
    assert orjson.loads(raw).get("total") == 1


@pytest.mark.parametrize("headers,query", [({"Accept": "application/fhir+xml"}, ""), ({}, "?_format=xml")])
async def test_xml_is_406(gw: GatewayUnderTest, headers: dict[str, str], query: str) -> None:
    status, got, raw = await call(gw, "GET", f"/Observation/bob-cbc{query}", {**GP, **headers})
    assert status == 406 and is_outcome(got, raw)


async def test_an_answer_over_max_response_bytes_is_502(fhir_engine: Engine, make_gateway: Callable[..., Any]) -> None:
    gw = await make_gateway(fhir_engine.base_url, upstream={"max_response_bytes": 1024})
    status, headers, raw = await call(gw, "GET", "/Observation?_count=50&patient=Patient/pat-alice")
    assert status == 502 and is_outcome(headers, raw)


# ---------------------------------------------------------------- 404 mode


@pytest.mark.parametrize("template", ["/{}", "/{}/_history", "/{}/_history/1"])
async def test_404_mode_a_hidden_record_reads_like_the_engines_missing_one(
        fhir_engine: Engine, make_gateway: Callable[..., Any], template: str) -> None:
    gw = await make_gateway(fhir_engine.base_url, enforcement={"denied_read_status": 404})
    hidden = await call(gw, "GET", template.format("Condition/bob-hiv"))
    missing = await call(gw, "GET", template.format("Condition/none-s6-x"))
    assert hidden[0] == missing[0] == 404
    assert hidden[2] == missing[2]
    varying = {"date", "x-request-id", "server"}
    assert {k: v for k, v in hidden[1].items() if k.lower() not in varying} == \
        {k: v for k, v in missing[1].items() if k.lower() not in varying}
    batch = {"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": "Condition/bob-hiv"}}, {"request": {"method": "GET", "url": "Condition/none-s6-x"}}]}
    status, _, raw = await call(gw, "POST", "/", body=batch)
    slots = orjson.loads(raw)["entry"]
    assert status == 200 and slots[0] == slots[1] and leaks(raw) == []


# ---------------------------------------------------------------- writes


async def test_a_create_passes_and_its_location_points_at_the_gateway(gw: GatewayUnderTest, fhir_engine: Engine) -> None:
    ref, resources = patient_with_records("write")
    for resource in (resources[0], resources[2]):
        await engine_put(fhir_engine, resource)
    status, headers, _ = await call(gw, "POST", "/Observation", body={k: v for k, v in resources[1].items() if k != "id"})
    assert status == 201, headers
    assert headers["Location"].startswith(gw.url + "/Observation/")


async def test_a_patients_consent_write_takes_effect_at_once_and_others_are_refused(
        gw: GatewayUnderTest, fhir_engine: Engine) -> None:
    ref, resources = patient_with_records("consent")
    for resource in resources:
        await engine_put(fhir_engine, resource)
    obs = f"/Observation/{resources[1]['id']}"
    assert (await call(gw, "GET", obs))[0] == 200
    revoked = {**resources[2], "status": "inactive"}
    doctor = await call(gw, "PUT", f"/Consent/{revoked['id']}", body=revoked)
    assert doctor[0] == 403 and is_outcome(doctor[1], doctor[2])
    status, _, raw = await call(gw, "PUT", f"/Consent/{revoked['id']}", {"X-Actor": ref}, body=revoked)
    assert status == 200, raw
    with pytest.raises(ForbiddenError):
        await fhir_client(gw, GP).reference("Observation", resources[1]["id"]).to_resource()


async def test_a_consent_sent_to_another_types_url_is_refused_by_the_gateway(gw: GatewayUnderTest, fhir_engine: Engine) -> None:
    ref, resources = patient_with_records("mismatch")
    consent = {k: v for k, v in resources[2].items() if k != "id"}
    status, headers, raw = await call(gw, "POST", "/Observation", body=consent)
    assert status == 400 and is_outcome(headers, raw)
    assert b"urn:consent-gateway:issue" in raw  # the gateway's own answer, not the engine's
