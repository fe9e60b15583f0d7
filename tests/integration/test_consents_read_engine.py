"""A patient's Consents read through fhirpy against the real FHIR engine: one naming the record
it hides (``provision.data``) or the codes it hides (``provision.code``) does not reach Dr GP;
Bob reads both."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests.conftest import GatewayUnderTest
from tests.hidden import hidden_in
from tests.integration.engine import Engine
from tests.integration.test_gateway_engine import GP
from tests.integration.test_side_doors_engine import fhir_client, seeded_gateway

pytestmark = pytest.mark.integration
BOB = "Patient/pat-bob"
# Inactive: they decide nothing (the engine is shared by the session's tests), but are records
# a search finds like any other.
_COMMON = {
    "resourceType": "Consent", "status": "inactive",
    "policyRule": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTIN"}]},
    "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]},
    "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
    "patient": {"reference": BOB}, "dateTime": "2024-03-01",
}
NOT_THIS = {**_COMMON, "id": "bob-not-this-cr", "provision": {"type": "permit", "provision": [
    {"type": "deny", "data": [{"meaning": "instance", "reference": {"reference": "Condition/bob-hiv"}}]}]}}
NOT_THESE = {**_COMMON, "id": "bob-not-codes-cr", "provision": {"type": "permit", "provision": [
    {"type": "deny", "code": [{"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "F11.20"}]}]}]}}


@pytest.fixture
async def gw(fhir_engine: Engine, make_gateway: Callable[..., Any]) -> GatewayUnderTest:
    return await seeded_gateway(fhir_engine, make_gateway, [NOT_THIS, NOT_THESE])


async def test_a_clinician_reads_no_consent_that_says_what_it_hides(gw: GatewayUnderTest) -> None:
    found = await fhir_client(gw, GP).resources("Consent").search(patient=BOB).fetch_all()
    text = repr([r.serialize() for r in found])
    assert hidden_in(text, ("bob-hiv", "F11.20", NOT_THIS["id"], NOT_THESE["id"])) == [], text[:400]


async def test_the_patient_reads_both(gw: GatewayUnderTest) -> None:
    found = await fhir_client(gw, {"X-Actor": BOB}).resources("Consent").search(patient=BOB).fetch_all()
    assert {NOT_THIS["id"], NOT_THESE["id"]} <= {r["id"] for r in found}
