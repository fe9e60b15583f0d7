"""The privacy officer's view in front of the real FHIR engine: shadow mode and ``whatif``."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from fhirpy import AsyncFHIRClient

from gateway.demo.server import demo_server
from gateway.web.middleware import JsonLogFormatter
from tests.integration.engine import Engine
from tests.officer.test_whatif import _whatif, draft_of

REQUESTS = [
    ("Practitioner/dr-gp", "/Observation/alice-cbc"),
    ("Practitioner/dr-gp", "/Condition?patient=Patient/pat-bob"),
    ("Practitioner/dr-psych", "/Condition?patient=Patient/pat-alice"),
    ("Practitioner/dr-jones", "/Observation/bob-cbc"),
    ("Practitioner/dr-gp", "/Observation/carol-cbc"),
    ("Practitioner/dr-gp", "/MedicationRequest?patient=Patient/pat-bob"),
]


async def test_shadow_decides_like_enforce_against_the_engine(fhir_engine: Engine, make_gateway: Callable[..., Any]) -> None:
    enforcing = await make_gateway(fhir_engine.base_url)
    shadow = await make_gateway(fhir_engine.base_url, enforcement={"mode": "shadow"})
    seen = set()
    for actor, path in REQUESTS:
        async with enforcing.session.get(enforcing.url + path, headers={"X-Actor": actor}) as resp:
            enforced = resp.headers["X-Consent-Decision"]
        async with shadow.session.get(shadow.url + path, headers={"X-Actor": actor}) as resp:
            assert resp.status == 200, (actor, path)
            assert resp.headers["X-Consent-Decision-Shadow"] == enforced, (actor, path)
            assert resp.headers["X-Consent-Decision"] == "permit"
        seen.add(enforced)
    assert seen == {"permit", "filtered", "deny"}


async def test_whatif_replays_reads_against_the_engine(
    fhir_engine: Engine, make_gateway: Callable[..., Any], caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    caplog.set_level(logging.INFO, logger="gateway")
    gw = await make_gateway(fhir_engine.base_url)
    for actor, resource in (("Practitioner/dr-gp", "Condition"), ("Practitioner/dr-psych", "Observation")):
        client = AsyncFHIRClient(gw.url, extra_headers={"Accept": "application/fhir+json", "X-Actor": actor})
        await client.resources(resource).search(patient="Patient/pat-bob").fetch()
    log = tmp_path / "gateway.log"
    formatter = JsonLogFormatter()
    log.write_text("\n".join(formatter.format(r) for r in caplog.records if r.name.startswith("gateway")))
    draft = tmp_path / "draft.json"
    draft.write_bytes(orjson.dumps(draft_of(demo_server())))
    code, out, err = await _whatif("--consent", str(draft), "--log", str(log), "--upstream", fhir_engine.base_url)
    assert code == 0, err
    rows = {tuple(line.split()[:2]): line.split()[2:] for line in out.splitlines() if line.startswith("Practitioner/")}
    assert rows == {
        ("Practitioner/dr-gp", "Condition"): ["0", "1"],
        ("Practitioner/dr-psych", "Observation"): ["1", "0"],
    }
    for record in ("bob-hiv", "bob-cbc", "bob-oud"):
        assert record not in out
