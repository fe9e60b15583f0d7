"""Against the real FHIR engine: what decides a record that lives in another resource the
gateway reads from the engine (a PractitionerRole named as its author; the ingredient a
Medication names by reference). The engine answers its own way (its Bundles, its ``_include``,
its batch); the records are written straight to it, as another system would.

Dora's consent opens her record to her doctors except what Dr Ferreira wrote; Dr Ferreira
writes through a PractitionerRole, as US Core data does. Dora's methadone is ordered as a
compounded product whose ingredient, named by reference, is methadone (42 CFR Part 2); her
general consent does not open Part 2 data.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
import pytest
from fhirpy import AsyncFHIRClient
from fhirpy.base.exceptions import ForbiddenError

from tests.conftest import GatewayUnderTest
from tests.hidden import hidden_in
from tests.integration.engine import Engine
from tests.integration.test_side_doors_engine import fhir_client, seeded_gateway

pytestmark = pytest.mark.integration
DORA = "Patient/pat-hop-dora"
GP = {"X-Actor": "Practitioner/dr-gp"}
SNOMED = "http://snomed.info/sct"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
FERREIRA = "Practitioner/dr-hop-ferreira"


def concept(system: str, code: str, display: str | None = None) -> dict[str, Any]:
    """A CodeableConcept of one coding."""
    coding = {"system": system, "code": code}
    if display:
        coding["display"] = display
    return {"coding": [coding]}


def _condition(rid: str, recorder: str, **extra: Any) -> dict[str, Any]:
    return {"resourceType": "Condition", "id": rid, "subject": {"reference": DORA},
            "code": concept(SNOMED, "37796009", "Migraine"), "onsetDateTime": "2023-09-14",
            "recorder": {"reference": recorder}, "asserter": {"reference": recorder}, **extra}


def _order(rid: str, medication: str) -> dict[str, Any]:
    return {"resourceType": "MedicationRequest", "id": rid, "status": "active", "intent": "order",
            "subject": {"reference": DORA}, "medicationReference": {"reference": medication}, "authoredOn": "2024-03-02"}


NOTE = [{"text": "Hemiplegic aura; family history reviewed with neurology"}]
RESOURCES: list[dict[str, Any]] = [
    {"resourceType": "Patient", "id": "pat-hop-dora", "name": [{"family": "Lima", "given": ["Dora"]}]},
    {"resourceType": "Practitioner", "id": "dr-hop-ferreira", "name": [{"family": "Ferreira"}]},
    {"resourceType": "Practitioner", "id": "dr-hop-other", "name": [{"family": "Okafor"}]},
    {"resourceType": "Organization", "id": "org-hop-neuro", "name": "Neurology clinic"},
    {"resourceType": "PractitionerRole", "id": "role-hop-ferreira", "practitioner": {"reference": FERREIRA},
     "organization": {"reference": "Organization/org-hop-neuro"}},
    {"resourceType": "PractitionerRole", "id": "role-hop-other", "practitioner": {"reference": "Practitioner/dr-hop-other"}},
    {"resourceType": "Consent", "id": "consent-hop-dora", "status": "active",
     "scope": concept("http://terminology.hl7.org/CodeSystem/consentscope", "patient-privacy"),
     "category": [concept("http://loinc.org", "59284-0")], "patient": {"reference": DORA},
     "dateTime": "2024-01-15T10:00:00Z", "policyRule": concept("http://terminology.hl7.org/CodeSystem/v3-ActCode", "OPTIN"),
     "provision": {"type": "permit", "provision": [
         {"type": "deny", "actor": [{"role": concept(PARTICIPATION, "AUT"), "reference": {"reference": FERREIRA}}]},
     ]}},
    _condition("cond-hop-ferreira", "PractitionerRole/role-hop-ferreira", note=NOTE),
    _condition("cond-hop-other", "PractitionerRole/role-hop-other"),
    {"resourceType": "Medication", "id": "med-hop-methadone", "code": concept(RXNORM, "864706", "methadone hydrochloride 10 MG Oral Tablet")},
    {"resourceType": "Medication", "id": "med-hop-lisinopril", "code": concept(RXNORM, "314076", "lisinopril 10 MG Oral Tablet")},
    {"resourceType": "Medication", "id": "med-hop-compound", "code": {"text": "Compounded oral solution"},
     "ingredient": [{"itemReference": {"reference": "Medication/med-hop-methadone"}, "isActive": True}]},
    {"resourceType": "Medication", "id": "med-hop-ordinary", "code": {"text": "Ordinary compound"},
     "ingredient": [{"itemReference": {"reference": "Medication/med-hop-lisinopril"}, "isActive": True}]},
    _order("medrx-hop-compound", "Medication/med-hop-compound"),
    _order("medrx-hop-ordinary", "Medication/med-hop-ordinary"),
]
ROLE_HIDDEN = ("cond-hop-ferreira", "Hemiplegic", "neurology")
MED_HIDDEN = ("medrx-hop-compound", "med-hop-compound", "med-hop-methadone", "864706", "methadone", "Compounded")


@pytest.fixture
async def gw(fhir_engine: Engine, make_gateway: Callable[..., Any]) -> GatewayUnderTest:
    return await seeded_gateway(fhir_engine, make_gateway, RESOURCES)


def client(gw: GatewayUnderTest) -> AsyncFHIRClient:
    return fhir_client(gw, GP)


async def raw(gw: GatewayUnderTest, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
    headers = {"X-Actor": GP["X-Actor"], "Accept": "application/fhir+json", "Content-Type": "application/fhir+json"}
    async with gw.session.request(method, gw.url + path, headers=headers,
                                  data=orjson.dumps(body) if body is not None else None) as resp:
        return resp.status, await resp.read()


def _batch(*paths: str) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "batch",
            "entry": [{"request": {"method": "GET", "url": p}} for p in paths]}


async def test_what_the_excluded_doctor_wrote_in_a_role_stays_hidden(gw: GatewayUnderTest) -> None:
    fhir = client(gw)
    conditions = await fhir.resources("Condition").search(patient=DORA).fetch_all()
    assert {r["id"] for r in conditions} == {"cond-hop-other"}
    with pytest.raises(ForbiddenError):
        await fhir.reference("Condition", "cond-hop-ferreira").to_resource()
    assert (await fhir.reference("Condition", "cond-hop-other").to_resource())["id"] == "cond-hop-other"
    for path in (f"/Condition?patient={DORA}", f"/Condition?patient={DORA}&_include=Condition:asserter",
                 "/Condition/cond-hop-ferreira"):
        status, body = await raw(gw, "GET", path)
        assert status in (200, 403), (path, body[:300])
        assert hidden_in(body, ROLE_HIDDEN) == [], (path, body[:300])
    status, body = await raw(gw, "POST", "/", _batch("Condition/cond-hop-ferreira", "Condition/cond-hop-other"))
    assert status == 200, body[:300]
    slots = orjson.loads(body)["entry"]
    assert slots[0]["response"]["status"].startswith("403") and slots[1]["resource"]["id"] == "cond-hop-other"
    assert hidden_in(body, ROLE_HIDDEN) == []


async def test_an_order_whose_drug_is_an_ingredient_stays_hidden(gw: GatewayUnderTest) -> None:
    fhir = client(gw)
    orders = await fhir.resources("MedicationRequest").search(patient=DORA).fetch_all()
    assert {r["id"] for r in orders} == {"medrx-hop-ordinary"}
    with pytest.raises(ForbiddenError):
        await fhir.reference("MedicationRequest", "medrx-hop-compound").to_resource()
    included = await fhir.resources("MedicationRequest").search(patient=DORA).include(
        "MedicationRequest", "medication").fetch_raw()
    kept = {e["resource"]["id"] for e in included.get("entry") or () if e["resource"]["resourceType"] == "MedicationRequest"}
    assert kept == {"medrx-hop-ordinary"}
    for path in (f"/MedicationRequest?patient={DORA}", f"/MedicationRequest?patient={DORA}&_include=MedicationRequest:medication",
                 "/MedicationRequest/medrx-hop-compound"):
        status, body = await raw(gw, "GET", path)
        assert status in (200, 403), (path, body[:300])
        assert hidden_in(body, MED_HIDDEN) == [], (path, body[:300])
    status, body = await raw(gw, "POST", "/", _batch("MedicationRequest/medrx-hop-compound", "MedicationRequest/medrx-hop-ordinary"))
    assert status == 200, body[:300]
    slots = orjson.loads(body)["entry"]
    assert slots[0]["response"]["status"].startswith("403") and slots[1]["resource"]["id"] == "medrx-hop-ordinary"
    assert hidden_in(body, MED_HIDDEN) == []
    # The compound itself is not patient data: it passes, labelled like its ingredient (DS4P).
    compound = await fhir.reference("Medication", "med-hop-compound").to_resource()
    assert "42CFRPart2" in {s.get("code") for s in compound.get("meta", {}).get("security", [])}
