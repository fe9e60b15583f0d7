"""Kill ``consent-gateway serve`` right after a break-glass answer: the AuditEvent is on disk.

The gateway runs as a real process in front of a fake upstream served from this test's
event loop; SIGKILL gives it no chance to flush anything after the answer left.
"""

from __future__ import annotations

import signal
from pathlib import Path

import aiohttp
import orjson

from tests.fakes import FakeFhir
from tests.fixtures import clinical as c
from tests.unit._util import free_port, start_serving


async def test_sigkill_right_after_the_answer_leaves_the_audit_line_on_disk(
    fake_fhir: FakeFhir, tmp_path: Path
) -> None:
    c.seed_all(fake_fhir)
    fake_fhir.add(c.opt_in(c.PAT_ANA))
    proxy_port, admin_port = free_port(), free_port()
    audit = tmp_path / "audit.jsonl"
    config = tmp_path / "gateway.yaml"
    config.write_text(
        f"upstream: {{url: '{fake_fhir.base_url}', timeout_s: 10}}\n"
        f"listen: {{host: 127.0.0.1, port: {proxy_port}}}\n"
        f"admin: {{host: 127.0.0.1, port: {admin_port}}}\n"
        f"audit: {{path: '{audit}'}}\n",
        encoding="utf-8",
    )
    proc = await start_serving(config, admin_port, tmp_path, capture=False, timeout_s=15)
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(
                f"http://127.0.0.1:{proxy_port}/Observation?patient={c.PAT_ANA}",
                headers={"X-Actor": c.DOCTOR, "X-Break-Glass": "Imminent threat to life"},
            ) as resp:
                # Killed the moment the status line arrives: nothing after the answer can run.
                proc.send_signal(signal.SIGKILL)
                status, audit_id = resp.status, resp.headers.get("X-Break-Glass-Audit-Id")
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert status == 200 and audit_id
    raw = audit.read_bytes()
    assert raw.endswith(b"\n")
    [event] = [orjson.loads(line) for line in raw.splitlines()]
    assert event["resourceType"] == "AuditEvent" and event["id"] == audit_id
    assert "Imminent threat to life" in [p.get("text") for p in event["purposeOfEvent"]]
    assert f"Observation/{c.HIV_TEST['id']}" in {e["what"]["reference"] for e in event["entity"]}
