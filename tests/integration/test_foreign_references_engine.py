"""Against the real FHIR engine: records that name another FHIR server's resources by absolute
reference, under ids this server also uses (written straight to the engine, as an exchange's
import would write them).

Eva's consent opens her record to her doctors except what Dr Vidal wrote. On this server,
``PractitionerRole/role-frn-other`` is Dr Okafor's and ``Medication/med-frn-lisinopril`` is
lisinopril; on the exchange's server they may be anyone's and anything. Deciding by ours would
release the records; the gateway does not know the other server's, so they close. The same
references under the engine's own base decide as relative ones.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
import pytest
from fhirpy.base.exceptions import ForbiddenError

from tests.conftest import GatewayUnderTest
from tests.hidden import hidden_in
from tests.integration.engine import Engine
from tests.integration.test_role_authors_and_ingredients_engine import RXNORM, SNOMED, concept
from tests.integration.test_side_doors_engine import engine_put, fhir_client, seeded_gateway

pytestmark = pytest.mark.integration
EVA = "Patient/pat-frn-eva"
GP = {"X-Actor": "Practitioner/dr-gp"}
OTHER = "https://hie.elsewhere.example/fhir"
VIDAL = "Practitioner/dr-frn-vidal"


def _condition(rid: str, recorder: str, subject: str = EVA, **extra: Any) -> dict[str, Any]:
    return {"resourceType": "Condition", "id": rid, "subject": {"reference": subject},
            "code": concept(SNOMED, "37796009", "Migraine"), "onsetDateTime": "2023-09-14",
            "recorder": {"reference": recorder}, **extra}


def _order(rid: str, medication: str, **extra: Any) -> dict[str, Any]:
    return {"resourceType": "MedicationRequest", "id": rid, "status": "active", "intent": "order",
            "subject": {"reference": EVA}, "medicationReference": {"reference": medication},
            "authoredOn": "2024-03-02", **extra}


RESOURCES: list[dict[str, Any]] = [
    {"resourceType": "Patient", "id": "pat-frn-eva", "name": [{"family": "Moreau", "given": ["Eva"]}]},
    {"resourceType": "Practitioner", "id": "dr-frn-vidal", "name": [{"family": "Vidal"}]},
    {"resourceType": "Practitioner", "id": "dr-frn-other", "name": [{"family": "Okafor"}]},
    {"resourceType": "PractitionerRole", "id": "role-frn-other", "practitioner": {"reference": "Practitioner/dr-frn-other"}},
    {"resourceType": "Medication", "id": "med-frn-lisinopril", "code": concept(RXNORM, "314076", "lisinopril 10 MG Oral Tablet")},
    {"resourceType": "Consent", "id": "consent-frn-eva", "status": "active",
     "scope": concept("http://terminology.hl7.org/CodeSystem/consentscope", "patient-privacy"),
     "category": [concept("http://loinc.org", "59284-0")], "patient": {"reference": EVA},
     "dateTime": "2024-01-15T10:00:00Z", "policyRule": concept("http://terminology.hl7.org/CodeSystem/v3-ActCode", "OPTIN"),
     "provision": {"type": "permit", "provision": [
         {"type": "deny", "actor": [{"role": concept("http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "AUT"),
                                     "reference": {"reference": VIDAL}}]},
     ]}},
    _condition("cond-frn-role", f"{OTHER}/PractitionerRole/role-frn-other",
               note=[{"text": "Hemiplegic aura reviewed at the exchange"}]),
    _condition("cond-frn-local", "PractitionerRole/role-frn-other"),
    _condition("cond-frn-patient", "Practitioner/dr-frn-other", subject=f"{OTHER}/Patient/pat-frn-eva",
               note=[{"text": "another person's chart"}]),
    _order("medrx-frn-drug", f"{OTHER}/Medication/med-frn-lisinopril",
           note=[{"text": "Maintenance dose per opioid treatment program"}]),
    _order("medrx-frn-local", "Medication/med-frn-lisinopril"),
]
HIDDEN = ("cond-frn-role", "cond-frn-patient", "medrx-frn-drug", "Hemiplegic", "another person", "opioid treatment")


@pytest.fixture
async def gw(fhir_engine: Engine, make_gateway: Callable[..., Any]) -> GatewayUnderTest:
    return await seeded_gateway(fhir_engine, make_gateway, RESOURCES)


async def test_another_servers_role_drug_and_patient_close_their_records(gw: GatewayUnderTest) -> None:
    fhir = fhir_client(gw, GP)
    conditions = await fhir.resources("Condition").search(patient=EVA).fetch_all()
    assert {r["id"] for r in conditions} == {"cond-frn-local"}
    orders = await fhir.resources("MedicationRequest").search(patient=EVA).include(
        "MedicationRequest", "medication").fetch_raw()
    kept = {e["resource"]["id"] for e in orders.get("entry") or () if e["resource"]["resourceType"] == "MedicationRequest"}
    assert kept == {"medrx-frn-local"}
    for rtype, rid in (("Condition", "cond-frn-role"), ("Condition", "cond-frn-patient"), ("MedicationRequest", "medrx-frn-drug")):
        with pytest.raises(ForbiddenError):
            await fhir.reference(rtype, rid).to_resource()
    # Eva's own access never reaches the other server's patient of her id.
    with pytest.raises(ForbiddenError):
        await fhir_client(gw, {"X-Actor": EVA}).reference("Condition", "cond-frn-patient").to_resource()
    batch = {"resourceType": "Bundle", "type": "batch", "entry": [{"request": {"method": "GET", "url": u}} for u in (
        "Condition/cond-frn-role", "Condition/cond-frn-patient", "MedicationRequest/medrx-frn-drug",
        "Condition/cond-frn-local", f"Condition?patient={EVA}&_include=Condition:recorder")]}
    async with gw.session.post(gw.url + "/", data=orjson.dumps(batch), headers={
            **GP, "Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}) as resp:
        assert resp.status == 200
        body = await resp.read()
    slots = orjson.loads(body)["entry"]
    assert [s["response"]["status"][:3] for s in slots[:3]] == ["403"] * 3
    assert slots[3]["resource"]["id"] == "cond-frn-local"
    assert hidden_in(body, HIDDEN) == []


async def test_the_engines_own_base_is_this_server(
    fhir_engine: Engine, make_gateway: Callable[..., Any],
) -> None:
    """Control: the same references under the engine's own base are the engine's resources."""
    gw = await seeded_gateway(fhir_engine, make_gateway, RESOURCES)
    await engine_put(fhir_engine, _condition("cond-frn-own", f"{fhir_engine.base_url}/PractitionerRole/role-frn-other"))
    await engine_put(fhir_engine, _order("medrx-frn-own", f"{fhir_engine.base_url}/Medication/med-frn-lisinopril"))
    fhir = fhir_client(gw, GP)
    assert (await fhir.reference("Condition", "cond-frn-own").to_resource())["id"] == "cond-frn-own"
    assert (await fhir.reference("MedicationRequest", "medrx-frn-own").to_resource())["id"] == "medrx-frn-own"
