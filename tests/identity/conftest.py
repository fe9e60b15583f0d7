"""A local token issuer on 127.0.0.1 (real RSA and EC keys) and a gateway in jwt mode."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from gateway.demo.issuer import LocalIssuer
from tests.conftest import GatewayUnderTest
from tests.fakes import FakeFhir

AUDIENCE = "https://gateway.example.org/fhir"
LOINC = "http://loinc.org"


def observation(oid: str, patient: str, code: str = "718-7", display: str = "Hemoglobin [Mass/volume] in Blood") -> dict[str, Any]:
    return {
        "resourceType": "Observation", "id": oid, "status": "final",
        "code": {"coding": [{"system": LOINC, "code": code, "display": display}]},
        "subject": {"reference": f"Patient/{patient}"},
    }


def condition(cid: str, patient: str) -> dict[str, Any]:
    # I10 essential hypertension: not sensitive under the bundled rules.
    return {
        "resourceType": "Condition", "id": cid,
        "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "I10", "display": "Essential (primary) hypertension"}]},
        "subject": {"reference": f"Patient/{patient}"},
    }


@pytest.fixture
def clinical(fake_fhir: FakeFhir) -> FakeFhir:
    fake_fhir.add(
        {"resourceType": "Patient", "id": "p1"}, {"resourceType": "Patient", "id": "p2"},
        observation("o1", "p1"), observation("o2", "p2"), condition("c1", "p1"),
        {"resourceType": "Practitioner", "id": "dr-1"},
    )
    return fake_fhir


def jwt_sections(issuer: LocalIssuer, **jwt: Any) -> dict[str, Any]:
    return {
        "auth": {"mode": "jwt", "jwt": {"issuer": issuer.base_url, "audience": AUDIENCE, **jwt}},
        "consent": {"default_decision": "permit"},
    }


@pytest.fixture
async def jwt_gateway(issuer: LocalIssuer, clinical: FakeFhir, make_gateway: Callable[..., Any]) -> GatewayUnderTest:
    gut: GatewayUnderTest = await make_gateway(
        clinical.base_url, **jwt_sections(issuer, purpose_claim="purpose_of_use", organization_claim="org")
    )
    return gut
