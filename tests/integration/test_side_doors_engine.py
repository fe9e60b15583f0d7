"""Side doors against the real FHIR engine: what the engine itself answers is decided alike.

Bob's consent (gateway/demo/seed.json) gives Dr GP a general permit that does not open his
HIV and opioid-use records. Every way in must keep them hidden, whatever the engine does with
the request; each test searches the raw bytes.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import aiohttp
import orjson
import pytest
from fhirpy import AsyncFHIRClient
from fhirpy.base.exceptions import ForbiddenError

from tests.conftest import GatewayUnderTest
from tests.hidden import hidden_in
from tests.integration.engine import Engine
from tests.integration.test_gateway_engine import BOB_HIDDEN, GP

pytestmark = pytest.mark.integration
FHIR_JSON = "application/fhir+json"


@pytest.fixture
async def gw(fhir_engine: Engine, make_gateway: Callable[..., Any]) -> GatewayUnderTest:
    gut: GatewayUnderTest = await make_gateway(fhir_engine.base_url)
    return gut


def leaks(raw: bytes) -> list[str]:
    return [s for s in BOB_HIDDEN if s.encode() in raw]


async def post(gw: GatewayUnderTest, path: str, body: bytes, ctype: str = FHIR_JSON) -> tuple[int, bytes]:
    async with gw.session.post(gw.url + path, data=body, headers={**GP, "Content-Type": ctype}) as resp:
        return resp.status, await resp.read()


async def engine_put(engine: Engine, resource: dict[str, Any]) -> None:
    """Write straight to the engine, as another system would (not through the gateway)."""
    async with aiohttp.ClientSession() as session:
        url = f"{engine.base_url}/{resource['resourceType']}/{resource['id']}"
        async with session.put(url, data=orjson.dumps(resource), headers={"Content-Type": FHIR_JSON}) as resp:
            assert resp.status in (200, 201), await resp.text()


async def opted_in_patient(engine: Engine, prefix: str, family: str, given: str) -> str:
    """A new patient (``Patient/<prefix>-<random>``) and her general opt-in (which opens no
    sensitive data), written to the engine; her reference."""
    pid = f"{prefix}-{uuid.uuid4().hex[:8]}"
    patient = f"Patient/{pid}"
    await engine_put(engine, {"resourceType": "Patient", "id": pid, "name": [{"family": family, "given": [given]}]})
    await engine_put(engine, {
        "resourceType": "Consent", "id": f"consent-{pid}", "status": "active",
        "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": patient}, "dateTime": "2026-01-15T10:00:00Z",
        "policyRule": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTIN"}]},
        "provision": {"type": "permit"},
    })
    return patient


async def engine_conditions(engine: Engine, patient: str, rows: Iterable[tuple[str, str, str]]) -> list[str]:
    """The patient's conditions written to the engine in order, one per row (kind ``v`` for
    visible, any other for closed; an ICD-10-CM code; its display); the visible ones' ids."""
    pid = patient.split("/", 1)[1]
    visible: list[str] = []
    for n, (kind, code, display) in enumerate(rows, start=1):
        rid = f"{pid}-{'open' if kind == 'v' else 'closed'}-{n:02d}"
        await engine_put(engine, {
            "resourceType": "Condition", "id": rid, "subject": {"reference": patient},
            "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": code, "display": display}],
                     "text": display},
            "onsetDateTime": f"2020-01-{n:02d}",
        })
        if kind == "v":
            visible.append(rid)
    return visible


async def seeded_gateway(
    engine: Engine, make_gateway: Callable[..., Any], resources: Iterable[dict[str, Any]],
) -> GatewayUnderTest:
    """A gateway in front of the engine once ``resources`` are written to it."""
    for resource in resources:
        await engine_put(engine, resource)
    gut: GatewayUnderTest = await make_gateway(engine.base_url)
    return gut


def fhir_client(gw: GatewayUnderTest, headers: dict[str, str]) -> AsyncFHIRClient:
    """fhirpy's client through the gateway, asking as ``headers`` say."""
    return AsyncFHIRClient(gw.url, extra_headers={"Accept": "application/fhir+json", **headers})


async def assert_closed_to(
    gw: GatewayUnderTest, headers: dict[str, str], patient: str, types: Iterable[str],
    hidden: Iterable[dict[str, Any]], shown: Iterable[dict[str, Any]], secrets: tuple[str, ...],
) -> None:
    """Read through fhirpy as ``headers`` say: each of ``hidden`` is refused (403), each of
    ``shown`` is read, a search of each type for ``patient`` finds exactly the shown ones, and
    no secret is in its raw answer."""
    fhir = fhir_client(gw, headers)
    shown = list(shown)
    for resource in hidden:
        with pytest.raises(ForbiddenError):
            await fhir.reference(resource["resourceType"], resource["id"]).to_resource()
    for resource in shown:
        read = await fhir.reference(resource["resourceType"], resource["id"]).to_resource()
        assert read["id"] == resource["id"]
    for rtype in types:
        found = await fhir.resources(rtype).search(patient=patient).fetch_all()
        assert {r["id"] for r in found} == {r["id"] for r in shown if r["resourceType"] == rtype}, rtype
        resp = await gw.get(f"/{rtype}?patient={patient}", actor=headers["X-Actor"])
        raw = await resp.read()
        assert hidden_in(raw, secrets) == [], (rtype, raw[:300])


@pytest.mark.parametrize("kind", ["batch", "transaction"])
async def test_reverse_chain_in_a_batch_entry_is_refused(gw: GatewayUnderTest, kind: str) -> None:
    bundle = {"resourceType": "Bundle", "type": kind, "entry": [
        {"request": {"method": "GET", "url": "Patient?_has:Condition:subject:code=B20"}},
    ]}
    status, raw = await post(gw, "/", orjson.dumps(bundle))
    if kind == "transaction":
        assert status == 403
    else:
        assert status == 200
        assert orjson.loads(raw)["entry"][0]["response"]["status"].startswith("403")
    assert b"pat-bob" not in raw and leaks(raw) == []


async def test_projection_in_a_batch_entry_cannot_strip_the_codes(gw: GatewayUnderTest) -> None:
    bundle = {"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": "Condition/bob-hiv?_elements=id,subject,onsetDateTime"}},
        {"request": {"method": "GET", "url": "Observation?patient=Patient/pat-bob&_elements=id,subject,valueQuantity"}},
    ]}
    status, raw = await post(gw, "/", orjson.dumps(bundle))
    assert status == 200
    assert leaks(raw) == []
    assert orjson.loads(raw)["entry"][0]["response"]["status"].startswith("403")


async def test_form_body_of_an_operation_is_read_like_the_query(gw: GatewayUnderTest) -> None:
    status, raw = await post(gw, "/Patient/pat-bob/$everything", b"_elements=id,subject",
                             "application/x-www-form-urlencoded")
    assert leaks(raw) == [], status


async def test_binary_of_a_hidden_record_is_hidden_in_every_answer(gw: GatewayUnderTest, fhir_engine: Engine) -> None:
    bid = f"bin-{uuid.uuid4().hex[:8]}"
    await engine_put(fhir_engine, {
        "resourceType": "Binary", "id": bid, "contentType": "text/plain",
        "securityContext": {"reference": "Condition/bob-hiv"},
        "data": base64.b64encode(b"viral load 12000 copies/mL").decode(),
    })
    secret = base64.b64encode(b"viral load 12000 copies/mL")
    async with gw.session.get(f"{gw.url}/Binary/{bid}", headers=GP) as resp:
        assert resp.status == 403
        assert secret not in await resp.read()
    for path in (f"/Binary?_id={bid}", f"/Binary/{bid}/_history"):
        async with gw.session.get(gw.url + path, headers=GP) as resp:
            raw = await resp.read()
            assert secret not in raw, path
    batch = {"resourceType": "Bundle", "type": "batch", "entry": [{"request": {"method": "GET", "url": f"Binary/{bid}"}}]}
    status, raw = await post(gw, "/", orjson.dumps(batch))
    assert status == 200 and secret not in raw


async def test_order_naming_the_drug_by_reference_is_hidden(gw: GatewayUnderTest, fhir_engine: Engine) -> None:
    mid, rid = f"med-{uuid.uuid4().hex[:8]}", f"rx-{uuid.uuid4().hex[:8]}"
    await engine_put(fhir_engine, {
        "resourceType": "Medication", "id": mid,
        "code": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "1010600",
                             "display": "buprenorphine 2 MG / naloxone 0.5 MG Sublingual Film"}]},
    })
    await engine_put(fhir_engine, {
        "resourceType": "MedicationRequest", "id": rid, "status": "active", "intent": "order",
        "subject": {"reference": "Patient/pat-bob"}, "medicationReference": {"reference": f"Medication/{mid}"},
    })
    async with gw.session.get(f"{gw.url}/MedicationRequest/{rid}", headers=GP) as resp:
        assert resp.status == 403
    async with gw.session.get(f"{gw.url}/MedicationRequest?patient=Patient/pat-bob&_include=MedicationRequest:medication",
                              headers=GP) as resp:
        raw = await resp.read()
        assert resp.status == 200
        assert rid.encode() not in raw and b"naloxone" not in raw and mid.encode() not in raw
