"""CONTRACT §10 end to end, as a privacy officer runs it: ``consent-gateway serve`` in shadow
mode with its log on stderr in a file; each answer passes unfiltered with
``X-Consent-Decision-Shadow``, counted and logged; the decision lines carry the request and its
counts without ids; ``consent-gateway whatif`` replays that very file."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from gateway.demo.server import DemoFhirServer
from tests.officer.test_whatif import draft_of
from tests.unit._util import clean_env, free_port, gateway_command


@pytest.fixture
async def shadow(demo_fhir: DemoFhirServer, tmp_path: Path) -> AsyncIterator[tuple[str, str, Path]]:
    proxy_port, admin_port = free_port(), free_port()
    log = tmp_path / "gateway.log"
    with log.open("wb") as stderr:
        proc = await asyncio.create_subprocess_exec(
            *gateway_command(), "serve", "--upstream", demo_fhir.base_url,
            stdout=asyncio.subprocess.DEVNULL, stderr=stderr, cwd=tmp_path,
            env=clean_env((("GATEWAY_LISTEN__HOST", "127.0.0.1"), ("GATEWAY_LISTEN__PORT", str(proxy_port)),
                           ("GATEWAY_ADMIN__PORT", str(admin_port)), ("GATEWAY_ENFORCEMENT__MODE", "shadow"),
                           ("GATEWAY_CONSENT__CHANGE_POLL_S", "0"))),
        )
    admin = f"http://127.0.0.1:{admin_port}"
    try:
        deadline = time.monotonic() + 30
        async with aiohttp.ClientSession() as session:
            while True:
                assert proc.returncode is None and time.monotonic() < deadline, log.read_text()
                try:
                    async with session.get(admin + "/healthz") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    pass
                await asyncio.sleep(0.05)
        yield f"http://127.0.0.1:{proxy_port}", admin, log
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 20)


READS = [
    ("Practitioner/dr-gp", "/Condition?patient=pat-bob", "filtered"),
    ("Practitioner/dr-gp", "/Observation?patient=pat-bob", "filtered"),
    ("Practitioner/dr-psych", "/Observation?patient=pat-bob", "filtered"),
    ("Practitioner/dr-jones", "/Observation/bob-hiv-test", "deny"),
    ("Practitioner/dr-gp", "/Observation/bob-cbc", "permit"),
]


async def test_shadow_mode_serve_decision_log_and_whatif(shadow: tuple[str, str, Path], demo_fhir: DemoFhirServer, tmp_path: Path) -> None:
    proxy, admin, log = shadow
    async with aiohttp.ClientSession() as session:
        for actor, path, would in READS:
            async with session.get(proxy + path, headers={"X-Actor": actor}) as resp:
                body = await resp.json(content_type=None)
                assert resp.status == 200, path
                assert resp.headers["X-Consent-Decision-Shadow"] == would, path
                assert resp.headers["X-Consent-Decision"] == "permit"
                # Passed unfiltered: what the FHIR server holds is all there.
                if body["resourceType"] == "Bundle":
                    assert not any(e["resource"]["resourceType"] == "OperationOutcome" for e in body["entry"])
        async with session.get(admin + "/metrics") as resp:
            metrics = await resp.text()
    for would in ("filtered", "deny", "permit"):
        expected = sum(1 for *_, w in READS if w == would)
        assert f'consent_gateway_shadow_decisions_total{{decision="{would}"}} {float(expected)}' in metrics
    await asyncio.sleep(0.2)
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    decisions = [line for line in lines if line.get("msg") == "decision"]
    assert len(decisions) == len(READS)
    first = decisions[0]
    for field in ("actor", "purpose", "method", "path", "query", "consents", "released", "withheld", "mode", "shadow"):
        assert field in first, field
    assert (first["actor"], first["purpose"], first["method"], first["path"], first["query"]) == (
        "Practitioner/dr-gp", "TREAT", "GET", "/Condition", "patient=pat-bob")
    assert first["mode"] == "shadow" and first["shadow"] == "filtered"
    assert first["withheld"] == {"Condition": 2}
    text = "\n".join(json.dumps(d) for d in decisions)
    for hidden in ("bob-hiv", "bob-oud", "B20", "75622-1"):
        assert hidden not in text, hidden

    draft = tmp_path / "draft.json"
    draft.write_text(json.dumps(draft_of(demo_fhir)))
    done = await asyncio.to_thread(
        subprocess.run,
        [*gateway_command(), "whatif", "--consent", str(draft), "--log", str(log), "--patient", "Patient/pat-bob",
         "--upstream", demo_fhir.base_url],
        capture_output=True, text=True, env=clean_env(), timeout=60, check=False,
    )
    assert done.returncode == 0, done.stderr
    rows = {tuple(line.split()[:2]): line.split()[2:] for line in done.stdout.splitlines() if line.startswith("Practitioner/")}
    assert rows == {
        ("Practitioner/dr-gp", "Condition"): ["0", "1"],
        ("Practitioner/dr-gp", "Observation"): ["0", "1"],
        ("Practitioner/dr-psych", "Observation"): ["1", "0"],
    }
    for hidden in ("bob-hiv", "bob-cbc", "B20", "75622"):
        assert hidden not in done.stdout
