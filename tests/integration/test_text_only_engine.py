"""Sensitive facts carried only as text, against the real FHIR engine, read through fhirpy by a
doctor whom Eve's general opt-in admits.

Eve's opt-in names no sensitive label. Her hospital codes problems and labs with its own local
code system (display only) and writes flags and medications in words: an HIV flag, an opioid
use disorder coded ``urn:oid:1.2.3.4.local|L123``, an HIV viral load under a local lab code, a
buprenorphine-naloxone order and a Medication (named by reference) of text alone. The term lists
(rules/terms-*.yaml) label them, so they stay closed. Her ordinary records stay open: a local
hypertension code, and a LOINC glucose whose text mentions the methadone clinic (a standard
code no rule names is a known non-sensitive fact: its text is not read).
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
EVE = "Patient/pat-text-eve"
DOCTOR = {"X-Actor": "Practitioner/dr-gp"}
LOCAL = "urn:oid:1.2.3.4.local"
SUBJECT = {"subject": {"reference": EVE}}


def _local(code: str, display: str) -> dict[str, Any]:
    return {"coding": [{"system": LOCAL, "code": code, "display": display}]}


HIDDEN_RESOURCES: list[dict[str, Any]] = [
    {"resourceType": "Flag", "id": "flag-text-hiv", "status": "active", **SUBJECT, "code": {"text": "HIV-1 positive"}},
    {"resourceType": "Condition", "id": "cond-text-oud", **SUBJECT, "code": _local("L123", "Opioid use disorder, moderate")},
    {"resourceType": "Observation", "id": "obs-text-vl", "status": "final", **SUBJECT,
     "code": {"coding": [{"system": LOCAL, "code": "LAB-VL1"}], "text": "HIV-1 RNA viral load"},
     "valueQuantity": {"value": 5400, "unit": "copies/mL"}},
    {"resourceType": "MedicationRequest", "id": "mr-text-bup", "status": "active", "intent": "order", **SUBJECT,
     "medicationCodeableConcept": {"text": "Buprenorphine-naloxone 8 mg/2 mg film"}},
    {"resourceType": "MedicationRequest", "id": "mr-text-medref", "status": "active", "intent": "order", **SUBJECT,
     "medicationReference": {"reference": "Medication/med-text-methadone"}},
]
SHOWN_RESOURCES: list[dict[str, Any]] = [
    {"resourceType": "Condition", "id": "cond-text-htn", **SUBJECT, "code": _local("L200", "Essential hypertension")},
    {"resourceType": "Observation", "id": "obs-text-glucose", "status": "final", **SUBJECT,
     "code": {"coding": [{"system": c.LOINC, "code": "2345-7"}], "text": "Glucose (drawn at methadone clinic)"}},
]
RESOURCES: list[dict[str, Any]] = [
    {"resourceType": "Patient", "id": "pat-text-eve", "name": [{"family": "Lindqvist", "given": ["Eve"]}]},
    c.opt_in(EVE, "consent-text-eve"),
    {"resourceType": "Medication", "id": "med-text-methadone", "code": {"text": "Methadone 10 mg/mL oral concentrate"}},
    *HIDDEN_RESOURCES,
    *SHOWN_RESOURCES,
]
HIDDEN = ("HIV-1", "Opioid use disorder", "L123", "LAB-VL1", "Buprenorphine", "flag-text-hiv", "cond-text-oud",
          "obs-text-vl", "mr-text-bup", "mr-text-medref")


@pytest.fixture
async def gw(fhir_engine: Engine, make_gateway: Callable[..., Any]) -> GatewayUnderTest:
    return await seeded_gateway(fhir_engine, make_gateway, RESOURCES)


async def test_a_general_opt_in_keeps_text_only_sensitive_records_closed(gw: GatewayUnderTest) -> None:
    await assert_closed_to(gw, DOCTOR, EVE, ("Flag", "Condition", "Observation", "MedicationRequest"), HIDDEN_RESOURCES, SHOWN_RESOURCES, HIDDEN)
