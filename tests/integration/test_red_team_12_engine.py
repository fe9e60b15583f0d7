"""Red team 12 against the real FHIR engine: searching by a hidden record, and audit trails of searches.

Bob's consent (gateway/demo/seed.json) gives Dr GP a general permit that does not open his HIV
test (``Observation/bob-hiv-test``). The engine holds a Provenance about that test (Bob's, and
open to Dr GP) and an AuditEvent recording that someone searched Bob's HIV results.

- In 404 mode, ``Provenance?target=Observation/bob-hiv-test`` answers exactly as the search by an
  id that holds nothing: the engine finds the Provenance, the gateway answers as if it had not.
- The AuditEvent is labelled by the codes its recorded search names and is Bob's data: Dr GP
  does not read it; Bob does.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

import orjson
import pytest

from tests.sealed import opaque
from tests.conftest import GatewayUnderTest
from tests.integration.engine import Engine
from tests.integration.test_gateway_engine import GP
from tests.integration.test_side_doors_engine import engine_put, fhir_client

pytestmark = pytest.mark.integration
BOB = "Patient/pat-bob"
PROVENANCE = {
    "resourceType": "Provenance", "id": "bob-hiv-import-rt12",
    "target": [{"reference": "Observation/bob-hiv-test"}, {"reference": BOB}],
    "recorded": "2024-07-01T11:00:00Z", "agent": [{"who": {"reference": "Practitioner/dr-gp"}}],
}
SEARCHED = {
    "resourceType": "AuditEvent", "id": "bob-hiv-search-rt12",
    "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-event-type", "code": "rest"},
    "action": "E", "recorded": "2024-07-01T12:00:00Z", "outcome": "0",
    "agent": [{"who": {"reference": "Practitioner/dr-gp"}, "requestor": True}],
    "source": {"observer": {"display": "FHIR server"}},
    "entity": [
        {"what": {"reference": BOB}},
        {"role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "24"},
         "query": base64.b64encode(f"Observation?subject={BOB}&code=http://loinc.org|75622-1".encode()).decode()},
    ],
}


@pytest.fixture
async def engine(fhir_engine: Engine) -> Engine:
    for resource in (PROVENANCE, SEARCHED):
        await engine_put(fhir_engine, resource)
    return fhir_engine


async def _get(gw: GatewayUnderTest, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
    async with gw.session.get(gw.url + path, headers=headers) as resp:
        return resp.status, await resp.read()


async def test_404_mode_a_search_by_the_hidden_test_finds_what_a_missing_one_does(
    engine: Engine, make_gateway: Callable[..., Any],
) -> None:
    gw = await make_gateway(engine.base_url, enforcement={"denied_read_status": 404})
    found = await fhir_client(gw, GP).resources("Provenance").search(target="Observation/bob-hiv-test").fetch()
    assert found == []
    hidden = await _get(gw, "/Provenance?target=Observation/bob-hiv-test", GP)
    missing = await _get(gw, "/Provenance?target=Observation/bob-nothing-0", GP)
    assert hidden[0] == missing[0] == 200
    # A client compares sealed links by their length (tests.sealed.opaque).
    assert opaque(hidden[1]).replace(b"bob-hiv-test", b"bob-nothing-0") == opaque(missing[1]), (hidden, missing)
    # Control: the engine finds it, and Bob, who may see his test, finds it through the gateway.
    status, raw = await _get(gw, "/Provenance?target=Observation/bob-hiv-test", {"X-Actor": BOB})
    assert status == 200 and PROVENANCE["id"] in raw.decode(), raw


async def test_an_audit_trail_of_a_search_for_the_hidden_test_is_hidden_with_it(
    engine: Engine, make_gateway: Callable[..., Any],
) -> None:
    gw = await make_gateway(engine.base_url)
    status, raw = await _get(gw, f"/AuditEvent/{SEARCHED['id']}", GP)
    assert status == 403, raw
    status, raw = await _get(gw, f"/AuditEvent?_id={SEARCHED['id']}", GP)
    assert status == 200 and SEARCHED["id"] not in [e["resource"].get("id") for e in orjson.loads(raw).get("entry", [])]
    status, raw = await _get(gw, f"/AuditEvent/{SEARCHED['id']}", {"X-Actor": BOB})
    assert status == 200, raw
