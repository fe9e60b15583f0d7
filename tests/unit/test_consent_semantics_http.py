"""Consent lookups that follow R4 and the servers people run (CONTRACT §5): a server that
rejects ``status``, ``related`` targets read once per consent version, ambiguous consents
counted and named."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson
import pytest
from aiohttp import web

from tests.conftest import GatewayUnderTest
from tests.fakes import FakeFhir
from tests.fixtures import clinical as c
from tests.unit.test_enforcement import MakeGateway, call

CBC = "/Observation/obs-cbc-58410-ana"
AMBIGUOUS = "consent_gateway_ambiguous_consents_total"
OUTCOME_400 = {"resourceType": "OperationOutcome",
               "issue": [{"severity": "error", "code": "not-supported", "diagnostics": "Unknown parameter"}]}


def _consent(cid: str, status: str, provision: dict[str, Any], rule: str = "OPTIN") -> dict[str, Any]:
    consent = c.opt_in(c.PAT_ANA, cid)
    consent["status"] = status
    consent["policyRule"] = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": rule}]}
    consent["provision"] = provision
    return consent


def _queries(fake: FakeFhir, path: str) -> list[dict[str, list[str]]]:
    return [parse_qs(urlsplit(r.path_qs).query) for r in fake.requests
            if r.method == "GET" and urlsplit(r.path_qs).path == path]


@pytest.fixture
def world(fake_fhir: FakeFhir) -> FakeFhir:
    c.seed_all(fake_fhir)
    return fake_fhir


async def test_server_rejecting_status_is_asked_without_it_and_inactive_consents_are_dropped(
    world: FakeFhir, gateway: GatewayUnderTest
) -> None:
    # MedicaSoft-style: Consent search knows only patient and category.
    world.add(_consent("withdrawn-optout", "inactive", {"type": "deny"}, "OPTOUT"))
    world.add(_consent("general", "active", {"type": "permit"}))

    async def medicasoft(request: web.Request) -> web.StreamResponse | None:
        if request.path == "/fhir/Consent" and "status" in request.query:
            return web.json_response(OUTCOME_400, status=400, content_type="application/fhir+json")
        return None

    world.override = medicasoft
    status, _, _ = await call(gateway, "GET", CBC)
    # The inactive opt-out, returned because the server could not filter, does not deny.
    assert status == 200
    queries = _queries(world, "/fhir/Consent")
    assert "status" in queries[0] and "status" not in queries[1]
    assert len(queries) == 2


async def test_server_rejecting_status_still_fails_closed_on_other_errors(
    world: FakeFhir, gateway: GatewayUnderTest
) -> None:
    async def broken(request: web.Request) -> web.StreamResponse | None:
        if request.path == "/fhir/Consent":
            return web.json_response(OUTCOME_400, status=400, content_type="application/fhir+json")
        return None

    world.override = broken
    status, _, _ = await call(gateway, "GET", CBC)
    assert status == 503


async def test_related_target_outside_the_answer_is_read_once_and_covers_only_its_references(
    world: FakeFhir, gateway: GatewayUnderTest
) -> None:
    report = {"resourceType": "DiagnosticReport", "id": "dr-cbc", "status": "final",
              "subject": {"reference": c.PAT_ANA}, "code": {"coding": [{"system": c.LOINC, "code": "58410-2"}]},
              "result": [{"reference": "Observation/obs-cbc-58410-ana"}]}
    world.add(report)
    world.add(_consent("general", "active", {
        "type": "permit",
        "provision": [{"type": "deny", "data": [{"meaning": "related", "reference": {"reference": "DiagnosticReport/dr-cbc"}}]}],
    }))
    # The CBC result the report refers to is withheld; the rest of the chart is not.
    assert (await call(gateway, "GET", CBC))[0] == 403
    assert (await call(gateway, "GET", "/Condition/cond-htn-i10-ana"))[0] == 200
    status, _, raw = await call(gateway, "GET", f"/Observation?patient={c.PAT_ANA}")
    assert status == 200
    kept = {e["resource"]["id"] for e in orjson.loads(raw)["entry"] if e["resource"]["resourceType"] == "Observation"}
    assert "obs-cbc-58410-ana" not in kept
    assert len(_queries(world, "/fhir/DiagnosticReport/dr-cbc")) == 1


async def test_related_target_that_cannot_be_read_closes_only_what_it_could_cover(
    world: FakeFhir, gateway: GatewayUnderTest
) -> None:
    world.add(_consent("general", "active", {
        "type": "permit",
        "provision": [{"type": "deny", "data": [{"meaning": "related", "reference": {"reference": "DiagnosticReport/dr-x"}}]}],
    }))

    async def failing(request: web.Request) -> web.StreamResponse | None:
        if request.path == "/fhir/DiagnosticReport/dr-x":
            return web.Response(status=500)
        return None

    world.override = failing
    # Unknown on a deny: it could cover any of the patient's records, so they close...
    assert (await call(gateway, "GET", CBC))[0] == 403
    # ...but a lookup error is not what happened: no 503.
    assert gateway.metric("consent_gateway_consent_lookup_errors_total") == 0


async def test_ambiguous_consent_is_counted_once_per_version_and_named_in_the_decision_log(
    world: FakeFhir, make_gateway: MakeGateway, caplog: pytest.LogCaptureFixture
) -> None:
    world.add(_consent("untyped", "active", {"actor": [{"reference": {"reference": c.BANNED_DOCTOR}}]}))
    gateway = await make_gateway(world.base_url, consent={"cache_ttl_s": 0})
    with caplog.at_level(logging.INFO, logger="gateway.decision"):
        # R4 reading: the named doctor is the exception to the opt-in.
        assert (await call(gateway, "GET", CBC, actor=c.BANNED_DOCTOR))[0] == 403
        assert (await call(gateway, "GET", CBC))[0] == 200
    # Looked up twice (no cache), counted once: it is one consent version.
    assert len(_queries(world, "/fhir/Consent")) == 2
    assert gateway.metric(AMBIGUOUS) == 1
    named = [r for r in caplog.records if r.getMessage() == "ambiguous-consent"]
    assert named and named[0].reasons == ["Consent/untyped provision untyped-root-with-conditions"]  # type: ignore[attr-defined]


async def test_scope_reading_is_a_site_setting(world: FakeFhir, make_gateway: MakeGateway) -> None:
    world.add(_consent("untyped", "active", {"actor": [{"reference": {"reference": c.DOCTOR}}]}))
    gateway = await make_gateway(world.base_url, consent={"untyped_root": "scope"})
    # "applies to": the named doctor gets the opt-in; nobody else is covered (default deny).
    assert (await call(gateway, "GET", CBC))[0] == 200
    assert (await call(gateway, "GET", CBC, actor=c.BANNED_DOCTOR))[0] == 403
    assert gateway.metric(AMBIGUOUS) == 1


HL7 = Path(__file__).resolve().parents[1] / "data" / "hl7-consent-examples"


async def test_admin_decision_gives_the_same_explanation_as_decide(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    not_this = json.loads((HL7 / "Consent-consent-example-notThis.json").read_text())
    task = {"resourceType": "Task", "id": "example3", "status": "requested", "intent": "order",
            "for": {"reference": "Patient/f001"}, "focus": {"reference": "Observation/o1"}}
    body = {"consents": [not_this], "actor": "Practitioner/f204", "at": "2026-01-15T10:00:00Z",
            "resource": {"resourceType": "Observation", "id": "o1", "status": "final",
                         "subject": {"reference": "Patient/f001"}},
            "related": [task]}
    async with gateway.session.post(gateway.admin_url + "/decision", json=body) as resp:
        assert resp.status == 200
        answer = await resp.json()
    assert answer["decision"] == "deny"
    assert answer["ambiguous_consents"] == ["Consent/consent-example-notThis"]
    [consent] = answer["consents"]
    assert consent["root_reading"] == "exception"
    assert consent["related"] == [{"provision": "provision", "target": "Task/example3",
                                   "resolved": "in the answer", "covers_resource": True}]
    # A record the Task does not refer to is not covered: the opt-in permits it.
    body["resource"] = {**body["resource"], "id": "o2"}  # type: ignore[dict-item]
    async with gateway.session.post(gateway.admin_url + "/decision", json=body) as resp:
        assert (await resp.json())["decision"] == "permit"
