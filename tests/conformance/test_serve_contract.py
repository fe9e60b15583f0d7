"""CONTRACT §2, §7, §8 and §10 through ``consent-gateway serve`` as an operator runs it: no
config file, only ``--upstream`` and ``GATEWAY_*`` variables; the proxy port carries FHIR,
the admin port (127.0.0.1 unless configured) the operational endpoints; a break-glass read is
answered with ``X-Break-Glass-Audit-Id``, its AuditEvent is on disk and (``audit.stdout``) on
stdout, and counted by reason; the metrics carry the contract's names and label names."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.demo.server import DemoFhirServer
from tests.unit._util import clean_env, free_port, gateway_command


@dataclass
class Served:
    proc: asyncio.subprocess.Process
    proxy: str
    admin: str
    admin_port: int
    audit: Path


async def _start(upstream: str, tmp_path: Path, **env: str) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        *gateway_command(), "serve", "--upstream", upstream,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=clean_env(tuple(env.items())), cwd=tmp_path,
    )
    return proc


@pytest.fixture
async def served(demo_fhir: DemoFhirServer, tmp_path: Path) -> AsyncIterator[Served]:
    proxy_port, admin_port = free_port(), free_port()
    audit = tmp_path / "audit" / "bg.jsonl"
    audit.parent.mkdir()
    proc = await _start(
        demo_fhir.base_url, tmp_path,
        GATEWAY_LISTEN__HOST="127.0.0.1", GATEWAY_LISTEN__PORT=str(proxy_port),
        GATEWAY_ADMIN__PORT=str(admin_port), GATEWAY_AUDIT__PATH=str(audit), GATEWAY_AUDIT__STDOUT="true",
        GATEWAY_CONSENT__CHANGE_POLL_S="0",
    )
    admin = f"http://127.0.0.1:{admin_port}"
    deadline = time.monotonic() + 30
    async with aiohttp.ClientSession() as session:
        while True:
            assert proc.returncode is None, "gateway exited during start-up"
            assert time.monotonic() < deadline, "gateway did not start"
            try:
                async with session.get(admin + "/healthz") as resp:
                    if resp.status == 200:
                        break
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.05)
    try:
        yield Served(proc, f"http://127.0.0.1:{proxy_port}", admin, admin_port, audit)
    finally:
        if proc.returncode is None:
            proc.terminate()
            await asyncio.wait_for(proc.communicate(), 20)


def _listening_addresses(port: int) -> set[str]:
    """Local addresses of the TCP sockets listening on ``port`` (from /proc/net/tcp{,6})."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, hex_port = fields[1].rsplit(":", 1)
            if int(hex_port, 16) == port and fields[3] == "0A":  # 0A: LISTEN
                found.add(address)
    return found


async def test_admin_port_is_bound_to_loopback_unless_configured(served: Served) -> None:
    assert _listening_addresses(served.admin_port) == {"0100007F"}  # 127.0.0.1


async def test_each_port_serves_only_its_own(served: Served) -> None:
    async with aiohttp.ClientSession() as session:
        for path in ("/healthz", "/readyz", "/metrics"):
            async with session.get(served.admin + path) as resp:
                assert resp.status == 200, path
            async with session.get(served.proxy + path, headers={"X-Actor": "Practitioner/dr-gp"}) as resp:
                assert resp.status != 200 or resp.content_type == "application/fhir+json", path
                assert b"consent_gateway_" not in await resp.read()
        for path in ("/admin/break-glass", "/admin/disclosures?patient=Patient/pat-bob"):
            async with session.get(served.proxy + path, headers={"X-Actor": "Practitioner/dr-gp"}) as resp:
                body = await resp.read()
                assert b"<html" not in body.lower() and b"AuditEvent" not in body, path
        for path, payload in (("/decision", {"consents": [], "resource": {"resourceType": "Observation"}, "actor": "Practitioner/x"}),
                              ("/cache/invalidate", {})):
            async with session.post(served.proxy + path, json=payload, headers={"X-Actor": "Practitioner/dr-gp"}) as resp:
                body = await resp.read()
                assert b'"decision"' not in body and b'"invalidated"' not in body, path
        async with session.get(served.admin + "/Observation/bob-cbc", headers={"X-Actor": "Practitioner/dr-gp"}) as resp:
            assert resp.status == 404
        async with session.get(served.proxy + "/Observation/bob-cbc", headers={"X-Actor": "Practitioner/dr-gp"}) as resp:
            assert resp.status == 200
            assert resp.headers["X-Consent-Decision"] == "permit"


async def _ready(session: aiohttp.ClientSession, served: Served) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        async with session.get(served.admin + "/readyz") as resp:
            if resp.status == 200:
                assert await resp.json() == {"status": "ready"}
                return
        await asyncio.sleep(0.1)
    raise AssertionError("never ready")


async def test_break_glass_is_audited_on_disk_and_stdout_and_counted(served: Served) -> None:
    headers = {"X-Actor": "Practitioner/dr-er", "X-Break-Glass": "Medical emergency"}
    async with aiohttp.ClientSession() as session:
        await _ready(session, served)
        async with session.get(served.proxy + "/Observation/carol-cbc", headers=headers) as resp:
            assert resp.status == 200
            audit_id = resp.headers["X-Break-Glass-Audit-Id"]
        async with session.get(served.admin + "/metrics") as resp:
            metrics = await resp.text()
    lines = [json.loads(line) for line in served.audit.read_text().splitlines()]
    [event] = [e for e in lines if e["id"] == audit_id]
    assert event["resourceType"] == "AuditEvent"
    text = json.dumps(event)
    for part in ("Practitioner/dr-er", "Patient/pat-carol", "Observation/carol-cbc", "Medical emergency"):
        assert part in text, part
    assert event["recorded"]
    printed = await asyncio.wait_for(served.proc.stdout.readline(), 10)  # type: ignore[union-attr]
    assert json.loads(printed)["id"] == audit_id
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(metrics) for s in f.samples}
    assert samples[("consent_gateway_break_glass_total", (("reason", "Medical emergency"),))] == 1.0


# CONTRACT §8 (and §9, §10): name -> (type, label names of its samples).
METRICS = {
    "consent_gateway_requests": ("counter", {"method", "interaction", "code"}),
    "consent_gateway_request_duration_seconds": ("histogram", None),
    "consent_gateway_upstream_duration_seconds": ("histogram", set()),
    "consent_gateway_decisions": ("counter", {"decision"}),
    "consent_gateway_resources_filtered": ("counter", {"resource_type", "reason"}),
    "consent_gateway_consent_cache_hits": ("counter", set()),
    "consent_gateway_consent_cache_misses": ("counter", set()),
    "consent_gateway_consent_cache_entries": ("gauge", set()),
    "consent_gateway_consent_lookup_errors": ("counter", set()),
    "consent_gateway_break_glass": ("counter", {"reason"}),
    "consent_gateway_change_poll_errors": ("counter", set()),
    "consent_gateway_shadow_decisions": ("counter", {"decision"}),
}


async def test_metrics_carry_the_contract_names_and_label_names(served: Served) -> None:
    doctor = {"X-Actor": "Practitioner/dr-gp"}
    async with aiohttp.ClientSession() as session:
        await _ready(session, served)
        for path, actor, decision in (
            ("/Observation/bob-cbc", "Practitioner/dr-gp", "permit"),
            ("/Observation?patient=pat-bob", "Practitioner/dr-gp", "filtered"),
            ("/Observation/bob-cbc", "Practitioner/dr-jones", "deny"),
            ("/Observation/bob-cbc", "Practitioner/dr-gp", "permit"),
        ):
            async with session.get(served.proxy + path, headers={**doctor, "X-Actor": actor}) as resp:
                assert resp.headers["X-Consent-Decision"] == decision, path
        async with session.get(served.admin + "/metrics") as resp:
            text = await resp.text()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name, (kind, labels) in METRICS.items():
        assert name in families, name
        family = families[name]
        assert family.type == kind, name
        main = [s for s in family.samples if not s.name.endswith("_created")]
        if labels is not None:
            for sample in main:
                assert set(sample.labels) - {"le"} == labels, (name, sample)

    def value(name: str, **labels: str) -> float:
        return sum(s.value for s in families[name].samples
                   if s.name == name + ("_total" if families[name].type == "counter" else "")
                   and all(s.labels.get(k) == v for k, v in labels.items()))

    assert value("consent_gateway_decisions", decision="permit") == 2
    assert value("consent_gateway_decisions", decision="filtered") == 1
    assert value("consent_gateway_decisions", decision="deny") == 1
    assert value("consent_gateway_requests", method="GET", interaction="read", code="200") == 2
    assert value("consent_gateway_requests", method="GET", interaction="read", code="403") == 1
    assert value("consent_gateway_requests", method="GET", interaction="search", code="200") == 1
    assert value("consent_gateway_resources_filtered", resource_type="Observation") >= 1
    assert {s.labels["reason"] for s in families["consent_gateway_resources_filtered"].samples} <= {
        "consent", "sensitivity", "malformed", "compartment", "scope"}
    assert value("consent_gateway_consent_cache_misses") >= 1 and value("consent_gateway_consent_cache_hits") >= 1
    assert value("consent_gateway_consent_cache_entries") >= 1
    # No label value names a patient, a record or a code.
    for hidden in ("pat-bob", "bob-hiv", "bob-cbc", "dr-jones", "dr-gp", "75622-1", "HIV"):
        assert hidden not in text, hidden
