"""SMART scopes: parsed purely, then enforced before consent through the whole gateway."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
import pytest

from gateway.core.scopes import parse_scopes
from gateway.demo.issuer import LocalIssuer
from tests.conftest import GatewayUnderTest
from tests.fakes import FakeFhir
from tests.identity.conftest import AUDIENCE, jwt_sections, observation

P1 = frozenset({"Patient/p1"})


@pytest.mark.parametrize(("scope", "rtype", "released"), [
    ("user/*.read", "Condition", True),
    ("user/Observation.read", "Observation", True),
    ("user/Observation.read", "Condition", False),
    ("user/Observation.rs", "Observation", True),
    ("user/Observation.s", "Observation", True),
    ("user/Observation.cud", "Observation", False),
    ("user/Observation.write", "Observation", False),
    ("system/*.rs", "Observation", True),
    ("user/Observation.rs?category=laboratory", "Observation", False),   # granular: not evaluated, grants nothing
    ("user/Observation.sr", "Observation", False),                       # letters out of order: not a scope
    ("openid fhirUser launch offline_access", "Observation", False),
    ("user/observation.read", "Observation", False),
])
def test_what_a_scope_releases(scope: str, rtype: str, released: bool) -> None:
    assert parse_scopes(scope, None).releases(rtype, P1) is released


def test_patient_scopes_confine_to_the_launch_patient() -> None:
    grants = parse_scopes("patient/*.rs", "p1")
    assert grants.patient == "Patient/p1"
    assert grants.releases("Observation", P1)
    assert grants.releases("Observation", frozenset({"Patient/p1", "Patient/p2"}))
    assert not grants.releases("Observation", frozenset({"Patient/p2"}))
    assert not grants.releases("Observation", frozenset())
    assert grants.releases("Medication", frozenset())  # outside every compartment
    assert not grants.unrestricted
    # Without a patient claim a patient/ scope grants nothing.
    assert not parse_scopes("patient/*.rs", None).releases("Observation", P1)
    # A user/ scope beside it is not confined.
    mixed = parse_scopes("patient/Observation.rs user/Practitioner.rs", "p1")
    assert mixed.releases("Practitioner", frozenset()) and not mixed.releases("Condition", P1)


def test_writes_need_their_letter() -> None:
    grants = parse_scopes("user/Observation.rs user/Condition.cu patient/Encounter.c", "p1")
    assert not grants.permits_request("create", "Observation")
    assert grants.permits_request("read", "Observation")
    assert grants.permits_request("create", "Condition") and grants.permits_request("update", "Condition")
    assert not grants.permits_request("delete", "Condition")
    assert grants.permits_request("create", "Encounter")
    assert grants.permits_write("Encounter", P1) and not grants.permits_write("Encounter", frozenset({"Patient/p2"}))
    assert not parse_scopes("patient/Encounter.cruds", "p1").permits_request("delete", "Encounter")
    assert parse_scopes("user/*.write", None).unrestricted is False
    assert parse_scopes(["user/*.rs"], None).unrestricted


def _token(issuer: LocalIssuer, scope: str, **claims: Any) -> dict[str, str]:
    token = issuer.mint({"fhirUser": "Practitioner/dr-1", "scope": scope, **claims}, audience=AUDIENCE)
    return {"Authorization": f"Bearer {token}", "Content-Type": "application/fhir+json"}


async def _status(gw: GatewayUnderTest, method: str, path: str, headers: dict[str, str], body: Any = None) -> tuple[int, Any, dict[str, str]]:
    data = orjson.dumps(body) if body is not None else None
    async with gw.session.request(method, gw.url + path, headers=headers, data=data) as resp:
        raw = await resp.read()
        return resp.status, orjson.loads(raw) if raw else None, dict(resp.headers)


def _ids(bundle: dict[str, Any]) -> set[str]:
    return {e["resource"]["id"] for e in bundle.get("entry", []) if e["resource"]["resourceType"] != "OperationOutcome"}


async def test_type_not_granted_is_denied_like_consent(jwt_gateway: GatewayUnderTest, issuer: LocalIssuer) -> None:
    headers = _token(issuer, "user/Observation.read")
    status, body, hdrs = await _status(jwt_gateway, "GET", "/Observation/o1", headers)
    assert status == 200 and body["id"] == "o1"
    status, body, hdrs = await _status(jwt_gateway, "GET", "/Condition/c1", headers)
    assert status == 403 and hdrs["X-Consent-Decision"] == "deny"
    assert body["issue"][0]["details"]["coding"][0]["code"] == "consent-denied"
    assert b"I10" not in orjson.dumps(body)
    status, body, hdrs = await _status(jwt_gateway, "GET", "/Condition?patient=p1", headers)
    assert status == 200 and hdrs["X-Consent-Decision"] == "filtered"
    assert _ids(body) == set() and "total" not in body
    assert any(e["resource"]["resourceType"] == "OperationOutcome" for e in body["entry"])
    assert jwt_gateway.metric("consent_gateway_resources_filtered_total", {"resource_type": "Condition", "reason": "scope"}) == 1


async def test_denied_type_reads_as_missing_with_404_setting(issuer: LocalIssuer, clinical: FakeFhir, make_gateway: Callable[..., Any]) -> None:
    gw: GatewayUnderTest = await make_gateway(clinical.base_url, **jwt_sections(issuer), enforcement={"denied_read_status": 404})
    headers = _token(issuer, "user/Observation.read")
    hidden = await _status(gw, "GET", "/Condition/c1", headers)
    missing = await _status(gw, "GET", "/Condition/nope", headers)
    assert hidden[0] == missing[0] == 404
    assert hidden[1] == missing[1]


async def test_patient_token_is_confined_to_its_compartment(jwt_gateway: GatewayUnderTest, issuer: LocalIssuer) -> None:
    headers = _token(issuer, "launch/patient patient/*.rs", patient="p1")
    assert (await _status(jwt_gateway, "GET", "/Observation/o1", headers))[0] == 200
    status, body, _ = await _status(jwt_gateway, "GET", "/Observation/o2", headers)
    assert status == 403 and b"p2" not in orjson.dumps(body)
    status, body, _ = await _status(jwt_gateway, "GET", "/Observation", headers)
    assert _ids(body) == {"o1"} and "total" not in body
    status, body, _ = await _status(jwt_gateway, "GET", "/Patient/p2", headers)
    assert status == 403
    # Data outside every compartment is released as granted.
    assert (await _status(jwt_gateway, "GET", "/Practitioner/dr-1", headers))[0] == 200


async def test_break_glass_does_not_override_scopes(jwt_gateway: GatewayUnderTest, issuer: LocalIssuer) -> None:
    headers = {**_token(issuer, "user/Observation.rs"), "X-Break-Glass": "Medical emergency"}
    status, _, _ = await _status(jwt_gateway, "GET", "/Condition/c1", headers)
    assert status == 403


async def test_writes_need_the_scope_letter(jwt_gateway: GatewayUnderTest, issuer: LocalIssuer, clinical: FakeFhir) -> None:
    new = observation("o9", "p1")
    before = len(clinical.requests)
    status, body, hdrs = await _status(jwt_gateway, "POST", "/Observation", _token(issuer, "user/Observation.rs"), new)
    assert status == 403 and 'error="insufficient_scope"' in hdrs["WWW-Authenticate"]
    assert body["issue"][0]["details"]["coding"][0]["code"] == "insufficient-scope"
    assert len(clinical.requests) == before
    status, _, _ = await _status(jwt_gateway, "POST", "/Observation", _token(issuer, "user/Observation.cruds"), new)
    assert status == 201
    # A patient-confined token creates in its own compartment only, and never updates.
    confined = _token(issuer, "patient/Observation.crus", patient="p1")
    assert (await _status(jwt_gateway, "POST", "/Observation", confined, observation("o10", "p2")))[0] == 403
    assert (await _status(jwt_gateway, "POST", "/Observation", confined, observation("o11", "p1")))[0] == 201
    assert (await _status(jwt_gateway, "PUT", "/Observation/o1", confined, observation("o1", "p1")))[0] == 403


async def test_batch_write_entries_need_their_scope(jwt_gateway: GatewayUnderTest, issuer: LocalIssuer, clinical: FakeFhir) -> None:
    entries = [
        {"request": {"method": "GET", "url": "Observation/o1"}},
        {"request": {"method": "DELETE", "url": "Condition/c1"}},
    ]
    headers = _token(issuer, "user/*.rs user/Observation.d")
    before = len(clinical.requests)
    status, _, hdrs = await _status(jwt_gateway, "POST", "/", headers,
                                    {"resourceType": "Bundle", "type": "transaction", "entry": entries})
    assert status == 403 and "insufficient_scope" in hdrs["WWW-Authenticate"]
    assert len(clinical.requests) == before
    # In a batch the entry alone is refused; the DELETE never reaches the FHIR server.
    status, body, _ = await _status(jwt_gateway, "POST", "/", headers, {"resourceType": "Bundle", "type": "batch", "entry": entries})
    assert status == 200 and body["entry"][0]["resource"]["id"] == "o1"
    assert body["entry"][1]["response"]["status"].startswith("403")
    assert not any(r.method == "DELETE" or b"DELETE" in r.body for r in clinical.requests[before:])
