"""Pharmacy codes and codes in extensions, against the real FHIR engine: records the engine
stores and answers its own way, read through fhirpy by a doctor Dana's general opt-in admits.

Dana's opt-in names no sensitive label, so her substance-use and HIV records stay closed
however they are coded: a dispense by NDC (Suboxone 8 mg/2 mg film, 12496-1208-3, in the
10-digit 5-4-1 layout pharmacies print), an order whose Medication the engine holds coded by
NDC, a statement naming a branded component (RxNorm SBDC 1010601), a pneumonia whose standard
``condition-dueTo`` extension names HIV disease (B20). Her ordinary records stay open, an NDC the
rules do not name (gabapentin) and a ``condition-dueTo`` naming hypertension among them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests.conftest import GatewayUnderTest
from tests.fixtures import clinical as c
from tests.integration.engine import Engine
from tests.integration.test_side_doors_engine import assert_closed_to, seeded_gateway

pytestmark = pytest.mark.integration
DANA = "Patient/pat-codes-dana"
DOCTOR = {"X-Actor": "Practitioner/dr-gp"}
NDC = "http://hl7.org/fhir/sid/ndc"
DUE_TO = "http://hl7.org/fhir/StructureDefinition/condition-dueTo"
SUBJECT = {"subject": {"reference": DANA}}


def _code(system: str, code: str, display: str) -> dict[str, Any]:
    return {"coding": [{"system": system, "code": code, "display": display}]}


HIDDEN_RESOURCES: list[dict[str, Any]] = [
    {"resourceType": "MedicationDispense", "id": "md-codes-subx", "status": "completed", **SUBJECT,
     "medicationCodeableConcept": _code(NDC, "12496-1208-3", "Suboxone 8 mg-2 mg sublingual film")},
    {"resourceType": "MedicationStatement", "id": "ms-codes-sbdc", "status": "active", **SUBJECT,
     "medicationCodeableConcept": _code(c.RXNORM, "1010601", "buprenorphine 2 MG / naloxone 0.5 MG [Suboxone]")},
    {"resourceType": "MedicationRequest", "id": "mr-codes-ndcmed", "status": "active", "intent": "order", **SUBJECT,
     "medicationReference": {"reference": "Medication/med-codes-ndc"}},
    {"resourceType": "Condition", "id": "cond-codes-dueto", **SUBJECT,
     "code": _code(c.ICD10CM, "B59", "Pneumocystosis"),
     "extension": [{"url": DUE_TO, "valueCodeableConcept": _code(c.ICD10CM, "B20", "HIV disease")}]},
]
SHOWN_RESOURCES: list[dict[str, Any]] = [
    {"resourceType": "MedicationDispense", "id": "md-codes-gaba", "status": "completed", **SUBJECT,
     "medicationCodeableConcept": _code(NDC, "00182271901", "Gabarone 300 mg")},
    {"resourceType": "Condition", "id": "cond-codes-htn", **SUBJECT,
     "code": _code(c.ICD10CM, "I12.9", "Hypertensive chronic kidney disease"),
     "extension": [{"url": DUE_TO, "valueCodeableConcept": _code(c.ICD10CM, "I10", "Essential hypertension")}]},
]
RESOURCES: list[dict[str, Any]] = [
    {"resourceType": "Patient", "id": "pat-codes-dana", "name": [{"family": "Okafor", "given": ["Dana"]}]},
    c.opt_in(DANA, "consent-codes-dana"),
    {"resourceType": "Medication", "id": "med-codes-ndc", "code": _code(NDC, "12496120803", "Suboxone 8 mg-2 mg film")},
    *HIDDEN_RESOURCES,
    *SHOWN_RESOURCES,
]
HIDDEN = ("12496-1208-3", "1010601", "B20", "HIV disease", "Suboxone", "md-codes-subx", "ms-codes-sbdc",
          "mr-codes-ndcmed", "cond-codes-dueto")


@pytest.fixture
async def gw(fhir_engine: Engine, make_gateway: Callable[..., Any]) -> GatewayUnderTest:
    return await seeded_gateway(fhir_engine, make_gateway, RESOURCES)


async def test_a_general_opt_in_keeps_pharmacy_codes_and_extension_codes_closed(gw: GatewayUnderTest) -> None:
    await assert_closed_to(gw, DOCTOR, DANA, ("MedicationDispense", "MedicationStatement", "MedicationRequest", "Condition"), HIDDEN_RESOURCES, SHOWN_RESOURCES, HIDDEN)
