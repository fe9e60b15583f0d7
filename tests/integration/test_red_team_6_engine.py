"""Red team, sixth pass, against the real FHIR engine: consents with ``code`` conditions and
author actors decide records the engine stores and answers its own way (its Bundles, its
``_include``, the Medication read from it).

Carla's consent (written straight to the engine, as another system would) opens her record to
her doctors but closes her lisinopril prescriptions, her hypertension (named in ICD-10-CM by
its URI; her record writes the system's OID) and whatever her cardiologist reported.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from fhirpy import AsyncFHIRClient
from fhirpy.base.exceptions import ForbiddenError

from tests.conftest import GatewayUnderTest
from tests.hidden import hidden_in
from tests.integration.engine import Engine
from tests.integration.test_side_doors_engine import fhir_client, seeded_gateway

pytestmark = pytest.mark.integration
CARLA = "Patient/pat-rt6-carla"
GP = {"X-Actor": "Practitioner/dr-gp"}
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
CARDIOLOGIST = "Practitioner/dr-rt6-cardio"
HIDDEN = ("314076", "lisinopril", "medrx-rt6-lis", "med-rt6-lis", "cond-rt6-htn", "I10", "ms-rt6-told")


def _code(system: str, code: str) -> dict[str, Any]:
    return {"coding": [{"system": system, "code": code}]}


RESOURCES: list[dict[str, Any]] = [
    {"resourceType": "Patient", "id": "pat-rt6-carla", "name": [{"family": "Duarte", "given": ["Carla"]}]},
    {"resourceType": "Consent", "id": "consent-rt6-carla", "status": "active",
     "scope": _code("http://terminology.hl7.org/CodeSystem/consentscope", "patient-privacy"),
     "category": [_code("http://loinc.org", "59284-0")], "patient": {"reference": CARLA},
     "dateTime": "2024-01-15T10:00:00Z", "policyRule": _code("http://terminology.hl7.org/CodeSystem/v3-ActCode", "OPTIN"),
     "provision": {"type": "permit", "provision": [
         {"type": "deny", "code": [_code(RXNORM, "314076"), _code(ICD10CM, "I10")]},
         {"type": "deny", "actor": [{"role": _code(PARTICIPATION, "INF"), "reference": {"reference": CARDIOLOGIST}}]},
     ]}},
    {"resourceType": "Medication", "id": "med-rt6-lis", "code": _code(RXNORM, "314076")},
    {"resourceType": "MedicationRequest", "id": "medrx-rt6-lis", "status": "active", "intent": "order",
     "subject": {"reference": CARLA}, "medicationReference": {"reference": "Medication/med-rt6-lis"},
     "authoredOn": "2024-02-01"},
    {"resourceType": "MedicationRequest", "id": "medrx-rt6-other", "status": "active", "intent": "order",
     "subject": {"reference": CARLA}, "medicationCodeableConcept": _code(RXNORM, "197361"), "authoredOn": "2024-02-01"},
    {"resourceType": "Condition", "id": "cond-rt6-htn", "subject": {"reference": CARLA},
     "code": _code("urn:oid:2.16.840.1.113883.6.90", "I10"), "onsetDateTime": "2019-08-21"},
    {"resourceType": "Condition", "id": "cond-rt6-other", "subject": {"reference": CARLA},
     "code": _code(ICD10CM, "J45.909"), "onsetDateTime": "2019-08-21"},
    {"resourceType": "MedicationStatement", "id": "ms-rt6-told", "status": "active", "subject": {"reference": CARLA},
     "medicationCodeableConcept": _code(RXNORM, "197361"), "informationSource": {"reference": CARDIOLOGIST}},
    {"resourceType": "MedicationStatement", "id": "ms-rt6-self", "status": "active", "subject": {"reference": CARLA},
     "medicationCodeableConcept": _code(RXNORM, "197361"), "informationSource": {"reference": CARLA}},
]


@pytest.fixture
async def gw(fhir_engine: Engine, make_gateway: Callable[..., Any]) -> GatewayUnderTest:
    return await seeded_gateway(fhir_engine, make_gateway, RESOURCES)


def client(gw: GatewayUnderTest) -> AsyncFHIRClient:
    return fhir_client(gw, GP)


async def test_code_and_informant_consents_hide_what_the_engine_answers(gw: GatewayUnderTest) -> None:
    fhir = client(gw)
    orders = await fhir.resources("MedicationRequest").search(patient=CARLA).include(
        "MedicationRequest", "medication").fetch_raw()
    kept = {e["resource"]["id"] for e in orders.get("entry") or () if e["resource"]["resourceType"] != "OperationOutcome"}
    assert kept == {"medrx-rt6-other"}, kept
    conditions = await fhir.resources("Condition").search(patient=CARLA).fetch_all()
    assert {r["id"] for r in conditions} == {"cond-rt6-other"}
    statements = await fhir.resources("MedicationStatement").search(patient=CARLA).fetch_all()
    assert {r["id"] for r in statements} == {"ms-rt6-self"}
    for path in ("MedicationRequest/medrx-rt6-lis", "Condition/cond-rt6-htn", "MedicationStatement/ms-rt6-told"):
        with pytest.raises(ForbiddenError):
            await fhir.reference(*path.split("/")).to_resource()
    for path in (f"/MedicationRequest?patient={CARLA}&_include=MedicationRequest:medication",
                 f"/Condition?patient={CARLA}", f"/MedicationStatement?patient={CARLA}",
                 "/MedicationRequest/medrx-rt6-lis"):
        resp = await gw.get(path, actor="Practitioner/dr-gp")
        raw = await resp.read()
        assert hidden_in(raw, HIDDEN) == [], (path, raw[:300])
