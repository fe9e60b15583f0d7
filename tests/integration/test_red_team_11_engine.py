"""Red team 11 against the real FHIR engine: narratives that render a hidden record.

Bob's lab report and a Provenance about his HIV test, stored on the engine, refer to his HIV
test (which Dr GP may not see) and say it in their narratives. Read through fhirpy, alone or
found by a search (with the report's results included), they come without those narratives;
the report that lists only his open CBC keeps its narrative.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
import pytest

from tests.conftest import GatewayUnderTest
from tests.hidden import hidden_in
from tests.integration.engine import Engine
from tests.integration.test_gateway_engine import GP
from tests.integration.test_side_doors_engine import fhir_client, seeded_gateway

pytestmark = pytest.mark.integration
BOB = "Patient/pat-bob"
SAID = ("HIV", "Reactive", "75622-1")


def _div(text: str) -> dict[str, str]:
    return {"status": "generated", "div": f'<div xmlns="http://www.w3.org/1999/xhtml">{text}</div>'}


REPORT = {
    "resourceType": "DiagnosticReport", "id": "bob-labs-rt11", "status": "final",
    "code": {"coding": [{"system": "http://loinc.org", "code": "11502-2", "display": "Laboratory report"}]},
    "subject": {"reference": BOB}, "effectiveDateTime": "2024-07-01T10:00:00Z",
    "result": [{"reference": "Observation/bob-cbc"}, {"reference": "Observation/bob-hiv-test"}],
    "text": _div("CBC within range; HIV 1 and 2 test: Reactive"),
}
CBC_ONLY = {**REPORT, "id": "bob-cbc-report-rt11", "result": [{"reference": "Observation/bob-cbc"}],
            "text": _div("CBC within range")}
PROVENANCE = {
    "resourceType": "Provenance", "id": "bob-hiv-import-rt11",
    "target": [{"reference": "Observation/bob-hiv-test"}, {"reference": BOB}],
    "recorded": "2024-07-01T11:00:00Z", "agent": [{"who": {"reference": "Practitioner/dr-gp"}}],
    "text": _div("Imported from the county lab: HIV 1 and 2 test, Reactive"),
}


@pytest.fixture
async def gw(fhir_engine: Engine, make_gateway: Callable[..., Any]) -> GatewayUnderTest:
    return await seeded_gateway(fhir_engine, make_gateway, [REPORT, CBC_ONLY, PROVENANCE])


async def test_a_report_and_a_provenance_do_not_narrate_the_hidden_test(gw: GatewayUnderTest) -> None:
    fhir = fhir_client(gw, GP)
    report = await fhir.reference("DiagnosticReport", REPORT["id"]).to_resource()
    provenance = await fhir.reference("Provenance", PROVENANCE["id"]).to_resource()
    for resource in (report, provenance):
        text = repr(resource.serialize())
        assert hidden_in(text, SAID) == [], text[:400]
        assert "text" not in resource.serialize()
    # fhirpy's fetch keeps the matches only: the included results are read from the Bundle itself.
    async with gw.session.get(f"{gw.url}/DiagnosticReport?subject={BOB}&_include=DiagnosticReport:result",
                              headers=GP) as resp:
        assert resp.status == 200
        raw = await resp.read()
    by_id = {e["resource"].get("id"): e["resource"] for e in orjson.loads(raw)["entry"]}
    assert REPORT["id"] in by_id and "bob-hiv-test" not in by_id and "bob-cbc" in by_id
    assert hidden_in(raw.decode(), SAID) == [], raw[:400]
    assert by_id[CBC_ONLY["id"]]["text"]["div"] == CBC_ONLY["text"]["div"]
