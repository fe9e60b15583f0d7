"""Red team 12: what the FHIR server says beside the data, and the doors around a read.

Scenario: a clinician (``c.DOCTOR``) holds Ana's general opt-in, which does not open her HIV
viral load (``VIRAL_LOAD``). Each test goes through the real request path (HTTP to the
gateway, the fake FHIR server on a real socket) and searches the RAW response bytes and
headers for the hidden id, codes and texts. The leak conftest runs each test on both paths
(answers parsed whole, and decided on views).
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from aiohttp import web

from tests.conftest import GatewayUnderTest
from tests.fakes import FakeFhir
from tests.fixtures import clinical as c
from tests.leak.test_side_doors import (
    VIRAL_LOAD, VL_REF, VL_SECRETS, batch, call, entries, fhir, ids_in, leaks, routes, slots, world,
)

__all__ = ["world"]  # fixtures

CBC_REF = f"Observation/{c.ANA_CBC['id']}"
SECRETS = (*VL_SECRETS, "HIV-1", "viral load")


# ---------------------------------------------------------------- 1. the server's own outcomes


def _telling_outcome(severity: str = "information") -> dict[str, Any]:
    """An OperationOutcome as servers write them beside results: texts naming what was left out."""
    return {"resourceType": "OperationOutcome", "issue": [{
        "severity": severity, "code": "informational",
        "details": {"coding": [{"system": "http://example.org/msg", "code": "FILTERED_20447-9"}],
                    "text": f"Resource {VL_REF} was filtered"},
        "diagnostics": "HIV 1 RNA result (12000 copies/mL) not returned",
        "expression": [f"Observation.where(id='{VIRAL_LOAD['id']}')"],
        "location": [f"/f:Observation[@id='{VIRAL_LOAD['id']}']"],
    }]}


def _bare_issue(outcome: dict[str, Any]) -> list[tuple[str, str]]:
    return [(i["severity"], i["code"]) for i in outcome["issue"]]


async def test_a_search_outcome_entry_keeps_only_its_codes(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    """A search.mode ``outcome`` entry the server adds says which record it left out."""
    answer = c.bundle([c.ANA_CBC], world.base_url)
    answer["entry"].append({"resource": _telling_outcome("warning"), "search": {"mode": "outcome"}})
    world.override = routes({("GET", "/Observation"): lambda r: answer})
    status, headers, body = await call(gateway, "GET", f"/Observation?patient={c.PAT_ANA}")
    assert status == 200, body
    assert leaks(body, headers, (*SECRETS, "filtered")) == [], body
    assert c.ANA_CBC["id"] in ids_in(body)
    outcomes = [e["resource"] for e in entries(body) if e["resource"]["resourceType"] == "OperationOutcome"]
    assert [_bare_issue(o) for o in outcomes] == [[("warning", "informational")]]


async def test_an_outcome_entry_without_mode_keeps_only_its_codes(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    answer = c.bundle([c.ANA_CBC], world.base_url)
    answer["entry"].append({"resource": _telling_outcome()})
    world.override = routes({("GET", "/Observation"): lambda r: answer})
    status, headers, body = await call(gateway, "GET", f"/Observation?patient={c.PAT_ANA}")
    assert status == 200, body
    assert leaks(body, headers, SECRETS) == [], body


async def test_a_successful_read_answered_with_an_outcome_keeps_only_its_codes(
    world: FakeFhir, gateway: GatewayUnderTest,
) -> None:
    """A 200 OperationOutcome in place of a search set (a lenient server's answer to a search
    it could not run whole) or of an operation's result."""
    world.override = routes({("GET", "/Observation"): lambda r: _telling_outcome("warning"),
                             ("GET", "/Observation/$lastn"): lambda r: _telling_outcome()})
    for path in (f"/Observation?patient={c.PAT_ANA}", f"/Observation/$lastn?patient={c.PAT_ANA}"):
        status, headers, body = await call(gateway, "GET", path)
        assert status == 200, body
        assert leaks(body, headers, SECRETS) == [], body
        assert orjson.loads(body)["resourceType"] == "OperationOutcome"


async def test_a_batch_slot_outcome_keeps_only_its_codes(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    """A batch slot's ``response.outcome`` (200) and an outcome as a slot's resource."""
    answer = {"resourceType": "Bundle", "type": "batch-response", "entry": [
        {"resource": c.ANA_CBC, "response": {"status": "200 OK", "outcome": _telling_outcome()}},
        {"resource": _telling_outcome("warning"), "response": {"status": "200 OK"}},
    ]}
    world.override = routes({("POST", "/"): lambda r: answer})
    status, headers, body = await call(gateway, "POST", "/", body=batch(
        ("GET", CBC_REF), ("GET", f"Observation?patient={c.PAT_ANA}&code=http://loinc.org|718-7")))
    assert status == 200, body
    assert leaks(body, headers, SECRETS) == [], body
    first, second = slots(body)
    assert first["resource"]["id"] == c.ANA_CBC["id"]
    assert _bare_issue(first["response"]["outcome"]) == [("information", "informational")]
    assert _bare_issue(second["resource"]) == [("warning", "informational")]


async def test_an_outcome_inside_parameters_keeps_only_its_codes(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    world.override = routes({("GET", "/Observation/$lastn"): lambda r: {
        "resourceType": "Parameters", "parameter": [{"name": "return", "resource": _telling_outcome()}]}})
    status, headers, body = await call(gateway, "GET", f"/Observation/$lastn?patient={c.PAT_ANA}")
    assert status == 200, body
    assert leaks(body, headers, SECRETS) == [], body


async def test_the_gateways_own_suppressed_outcome_keeps_its_text(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    answer = c.bundle([c.ANA_CBC, VIRAL_LOAD], world.base_url)
    world.override = routes({("GET", "/Observation"): lambda r: answer})
    status, headers, body = await call(gateway, "GET", f"/Observation?patient={c.PAT_ANA}")
    assert status == 200, body
    assert VIRAL_LOAD["id"] not in ids_in(body)
    assert b"Some results were withheld by consent policy." in body
