"""``listen.workers``: several ``consent-gateway serve`` processes on one port (SO_REUSEPORT).

Real processes: a supervisor started as operators start it, its workers, and the fake FHIR
server on this test's loop. Every client request opens a new connection, so the kernel's
SO_REUSEPORT hash spreads them; the JSON log line of each request names the worker that
answered it, which is how these tests know both answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.config import build_settings
from tests.fakes import FakeFhir
from tests.fixtures import clinical as c
from tests.unit._util import clean_env, free_port, gateway_command

DOCTOR = {"X-Actor": c.DOCTOR}
BREAK_GLASS = {"X-Actor": c.DOCTOR, "X-Break-Glass": "Medical emergency"}
SEARCH = f"/Observation?patient={c.PAT_ANA}"
READ = f"/Observation/{c.ANA_CBC['id']}"
# With N fresh connections spread by a hash, all landing on one of 2 workers has odds 2**-(N-1).
SPREAD = 30


@dataclass
class Workers:
    process: asyncio.subprocess.Process
    url: str
    admin_url: str
    log: Path
    run_tmp: Path  # TMPDIR of the supervisor: its private run directory goes there
    audit: Path

    def lines(self) -> list[dict[str, Any]]:
        return [orjson.loads(line) for line in self.log.read_bytes().splitlines() if line.startswith(b"{")]

    def listening(self) -> Counter[int]:
        """How many times each worker said it listens."""
        return Counter(int(e["worker"]) for e in self.lines() if e["msg"].startswith("listening") and "worker" in e)

    def answered_by(self) -> Counter[int]:
        """Requests answered, per worker (from the access log lines)."""
        return Counter(int(e["worker"]) for e in self.lines() if e["msg"] == "request")

    def children(self) -> dict[int, int]:
        """Worker index -> pid of the supervisor's live worker processes."""
        pid = self.process.pid
        found = {}
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            with contextlib.suppress(OSError):
                argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
                if b"gateway.workers" in argv:
                    found[int(argv[argv.index(b"gateway.workers") + 2])] = int(child)
        return found

    async def stop(self) -> int:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.process.wait(), 30)


def write_config(
    tmp_path: Path, upstream: str, workers: object, port: int, admin: int, extra: str = "", audit: str = ""
) -> Path:
    config = tmp_path / "gateway.yaml"
    config.write_text(
        f"upstream: {{url: {upstream}, timeout_s: 5}}\n"
        f"listen: {{host: 127.0.0.1, port: {port}, workers: {workers}, shutdown_timeout_s: 2}}\n"
        f"admin: {{host: 127.0.0.1, port: {admin}}}\n"
        # Consents stay cached far longer than a test: only an invalidation can change them.
        "consent: {change_poll_s: 0, cache_ttl_s: 600}\n"
        f"audit: {{path: {tmp_path / 'audit.jsonl'}{audit}}}\n" + extra,
        encoding="utf-8",
    )
    return config


async def start_workers(tmp_path: Path, upstream: str, count: int = 2, extra: str = "", audit: str = "") -> Workers:
    port, admin = free_port(), free_port()
    config = write_config(tmp_path, upstream, count, port, admin, extra, audit)
    run_tmp = tmp_path / "tmp"
    run_tmp.mkdir()
    log = tmp_path / "gateway.log"
    with open(log, "wb") as stderr:
        process = await asyncio.create_subprocess_exec(
            *gateway_command(), "serve", "--config", str(config), stdout=asyncio.subprocess.DEVNULL,
            stderr=stderr, env=clean_env((("TMPDIR", str(run_tmp)),)), cwd=tmp_path,
        )
    gw = Workers(process, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin}", log, run_tmp, tmp_path / "audit.jsonl")
    deadline = time.monotonic() + 30
    while sorted(gw.listening()) != list(range(count)):
        assert process.returncode is None, log.read_text()
        assert time.monotonic() < deadline, "workers did not start"
        await asyncio.sleep(0.05)
    return gw


@pytest.fixture
async def launch(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Workers]]]:
    started: list[Workers] = []

    async def factory(upstream: str, count: int = 2, extra: str = "", audit: str = "") -> Workers:
        gw = await start_workers(tmp_path, upstream, count, extra, audit)
        started.append(gw)
        return gw

    yield factory
    for gw in started:
        await gw.stop()


async def fresh_gets(url: str, headers: dict[str, str], times: int = SPREAD) -> list[tuple[int, dict[str, str]]]:
    """``times`` GETs, each on a new connection; (status, headers) of each."""
    answers = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        for _ in range(times):
            async with session.get(url, headers=headers) as resp:
                await resp.read()
                answers.append((resp.status, dict(resp.headers)))
    return answers


async def metric(gw: Workers, name: str, labels: str = "") -> float:
    async with aiohttp.ClientSession() as session, session.get(gw.admin_url + "/metrics") as resp:
        text = await resp.text()
    wanted = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(wanted + " "):
            return float(line.split()[-1])
    return 0.0


def seed(fake: FakeFhir, consent: dict[str, Any]) -> None:
    c.seed_all(fake)
    fake.add(consent)


async def test_both_workers_answer_and_metrics_add_up_over_them(fake_fhir: FakeFhir, launch: Any) -> None:
    seed(fake_fhir, c.opt_in(c.PAT_ANA))
    gw = await launch(fake_fhir.base_url)
    answers = await fresh_gets(gw.url + SEARCH, DOCTOR)
    assert [status for status, _ in answers] == [200] * SPREAD
    assert sorted(gw.answered_by()) == [0, 1]
    assert await metric(gw, "consent_gateway_requests_total", 'code="200",interaction="search",method="GET"') == SPREAD
    # Each worker has its own consent cache and single-flight: a cold patient is looked up
    # once per worker process.
    assert await metric(gw, "consent_gateway_consent_cache_misses_total") == 2
    assert await metric(gw, "consent_gateway_consent_cache_entries") == 2
    assert await gw.stop() == 0


@pytest.mark.parametrize("body", [{"patient": c.PAT_ANA}, {}], ids=["one patient", "everyone"])
async def test_cache_invalidation_reaches_every_worker(
    body: dict[str, str], fake_fhir: FakeFhir, launch: Any
) -> None:
    optin = c.opt_in(c.PAT_ANA)
    seed(fake_fhir, optin)
    gw = await launch(fake_fhir.base_url)
    assert {s for s, _ in await fresh_gets(gw.url + READ, DOCTOR)} == {200}
    assert sorted(gw.answered_by()) == [0, 1]  # both caches hold Ana's opt-in now
    del fake_fhir.resources[f"Consent/{optin['id']}"]
    fake_fhir.add(c.opt_out(c.PAT_ANA))
    assert {s for s, _ in await fresh_gets(gw.url + READ, DOCTOR)} == {200}  # still cached
    async with aiohttp.ClientSession() as session:
        async with session.post(gw.admin_url + "/cache/invalidate", json=body) as resp:
            assert resp.status == 200, await resp.text()
    before = gw.answered_by()
    assert {s for s, _ in await fresh_gets(gw.url + READ, DOCTOR)} == {403}
    after = gw.answered_by()
    assert all(after[w] > before[w] for w in (0, 1))  # both workers answered the 403s


async def test_a_consent_written_through_one_worker_evicts_in_every_worker(fake_fhir: FakeFhir, launch: Any) -> None:
    optin = c.opt_in(c.PAT_ANA)
    seed(fake_fhir, optin)
    gw = await launch(fake_fhir.base_url)  # no change feed: only the workers telling each other
    assert {s for s, _ in await fresh_gets(gw.url + READ, DOCTOR)} == {200}
    assert sorted(gw.answered_by()) == [0, 1]
    revoked = {**optin, "status": "inactive"}
    async with aiohttp.ClientSession() as session:
        async with session.put(
            f"{gw.url}/Consent/{optin['id']}", data=orjson.dumps(revoked),
            headers={"Content-Type": "application/fhir+json", "X-Actor": c.PAT_ANA},
        ) as resp:
            assert resp.status == 200, await resp.text()
    deadline = time.monotonic() + 1.0
    while {s for s, _ in await fresh_gets(gw.url + READ, DOCTOR)} != {403}:
        assert time.monotonic() < deadline, "a worker still decides from the revoked consent"


async def test_each_audit_event_is_delivered_exactly_once(fake_fhir: FakeFhir, launch: Any) -> None:
    seed(fake_fhir, c.opt_out(c.PAT_ANA))
    audit_fhir = FakeFhir()
    server = TestServer(audit_fhir.app(), host="127.0.0.1")
    await server.start_server()
    try:
        audit_fhir.base_url = f"http://127.0.0.1:{server.port}/fhir"
        gw = await launch(
            fake_fhir.base_url,
            extra="break_glass: {record_consent: false}\n",
            audit=f", fhir_url: {audit_fhir.base_url}, disclosures: all",
        )
        answers = await fresh_gets(gw.url + SEARCH, BREAK_GLASS)
        answers += await fresh_gets(gw.url + SEARCH, {"X-Actor": c.PAT_ANA})  # disclosures only
        assert [status for status, _ in answers] == [200] * 2 * SPREAD
        ids = [headers["X-Break-Glass-Audit-Id"] for _, headers in answers[:SPREAD]]
        assert len(set(ids)) == SPREAD
        by_worker = Counter(int(e["worker"]) for e in gw.lines() if e.get("audit_id"))
        assert sorted(by_worker) == [0, 1]  # both workers wrote to the audit file
        written = [orjson.loads(line)["id"] for line in gw.audit.read_bytes().splitlines()]
        assert sorted(written) == sorted(ids)
        disclosed = [orjson.loads(line)["id"] for line in (gw.audit.parent / "audit.disclosures.jsonl").read_bytes().splitlines()]
        assert len(disclosed) >= SPREAD and not set(disclosed) & set(ids)
        deadline = time.monotonic() + 15
        while len(delivered(audit_fhir)) < len(written) + len(disclosed) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        await asyncio.sleep(2.5)  # more than two delivery polls: a second deliverer would show
        assert sorted(delivered(audit_fhir)) == sorted(written + disclosed)
        puts = Counter(r.path_qs for r in audit_fhir.requests if r.method == "PUT")
        assert set(puts.values()) == {1}
        assert await metric(gw, "consent_gateway_audit_delivery_backlog_bytes") == 0
        assert await gw.stop() == 0
    finally:
        await server.close()


def delivered(fake: FakeFhir) -> list[str]:
    return [key.split("/", 1)[1] for key in fake.resources if key.startswith("AuditEvent/")]


async def test_sigterm_stops_every_worker_and_removes_the_run_directory(fake_fhir: FakeFhir, launch: Any) -> None:
    seed(fake_fhir, c.opt_in(c.PAT_ANA))
    gw = await launch(fake_fhir.base_url)
    pids = gw.children()
    assert sorted(pids) == [0, 1]
    assert len(list(gw.run_tmp.iterdir())) == 1
    assert await gw.stop() == 0
    assert list(gw.run_tmp.iterdir()) == []
    for pid in pids.values():
        assert not Path(f"/proc/{pid}").exists()


@pytest.mark.parametrize("index", [0, 1], ids=["worker 0 (admin port, audit delivery)", "worker 1"])
async def test_a_worker_that_dies_is_replaced(index: int, fake_fhir: FakeFhir, launch: Any) -> None:
    seed(fake_fhir, c.opt_in(c.PAT_ANA))
    gw = await launch(fake_fhir.base_url)
    assert {s for s, _ in await fresh_gets(gw.url + SEARCH, DOCTOR)} == {200}
    old = gw.children()[index]
    os.kill(old, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while gw.listening()[index] < 2:
        assert time.monotonic() < deadline, f"worker {index} was not replaced"
        await asyncio.sleep(0.05)
    assert gw.children()[index] != old
    before = gw.answered_by()
    assert {s for s, _ in await fresh_gets(gw.url + SEARCH, DOCTOR)} == {200}
    assert gw.answered_by()[index] > before[index]
    # The dead worker's requests stay counted; the admin port is back.
    assert await metric(gw, "consent_gateway_requests_total", 'code="200",interaction="search",method="GET"') == 2 * SPREAD
    assert await gw.stop() == 0


async def test_workers_stop_when_the_supervisor_is_killed(fake_fhir: FakeFhir, launch: Any) -> None:
    seed(fake_fhir, c.opt_in(c.PAT_ANA))
    gw = await launch(fake_fhir.base_url)
    pids = gw.children()
    gw.process.kill()
    await gw.process.wait()
    deadline = time.monotonic() + 15
    while any(Path(f"/proc/{pid}").exists() and b"gateway.workers" in Path(f"/proc/{pid}/cmdline").read_bytes()
              for pid in pids.values()):
        assert time.monotonic() < deadline, "orphaned workers kept running"
        await asyncio.sleep(0.05)


async def run_serve(tmp_path: Path, config: Path) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *gateway_command(), "serve", "--config", str(config), stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE, env=clean_env((("TMPDIR", str(tmp_path)),)), cwd=tmp_path,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, err.decode()


@pytest.mark.parametrize("value", ["0", "two", "1.5"])
async def test_a_bad_worker_count_is_one_line_and_exit_2(value: str, tmp_path: Path) -> None:
    config = write_config(tmp_path, "http://127.0.0.1:9/fhir", value, free_port(), free_port())
    code, err = await run_serve(tmp_path, config)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("consent-gateway: config error: listen.workers: "), err


async def test_several_workers_need_a_fixed_port(tmp_path: Path) -> None:
    config = write_config(tmp_path, "http://127.0.0.1:9/fhir", 2, 0, free_port())
    code, err = await run_serve(tmp_path, config)
    assert (code, err.count("\n")) == (2, 1)
    assert "listen.workers" in err and "port" in err


async def test_a_taken_port_stops_every_worker_with_exit_2(fake_fhir: FakeFhir, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = write_config(tmp_path, fake_fhir.base_url, 2, taken.getsockname()[1], free_port())
        code, err = await run_serve(tmp_path, config)
    assert code == 2
    assert "cannot listen" in err
    assert [p for p in tmp_path.iterdir() if p.name.startswith("consent-gateway-")] == []


def test_settings_reach_the_workers_unchanged() -> None:
    """The supervisor hands its validated settings to the workers as JSON."""
    settings = build_settings({
        "upstream": {"url": "https://fhir.example.org/fhir", "auth": {"kind": "bearer", "token_env": "TOKEN"}},
        "listen": {"port": 8443, "workers": 4, "shutdown_timeout_s": 3},
        "consent": {"source_kind": "healtheintent", "source_url": "https://hi.example.org", "population_id": "p1",
                    "source_api_key_env": "KEY", "consentDuration": 12, "writer_roles": ["registrar"]},
        "sensitivity": {"explicit_consent_required": ["HIV", "PSY"]},
        "enforcement": {"denied_read_status": 404},
        "break_glass": {"emergencyConsentReasons": "Trauma bay", "duration_h": 2},
        "audit": {"path": "/var/lib/audit.jsonl", "disclosures": "all"},
    })
    assert build_settings(orjson.loads(orjson.dumps(settings.model_dump(mode="json")))) == settings


def _paged(fake: FakeFhir) -> Any:
    """Ana's search answered with a next link naming the server's own offset."""
    async def override(request: Any) -> Any:
        if request.path != "/fhir/Observation":
            return None
        page = c.bundle([c.ANA_CBC], fake.base_url, self_url=str(request.url))
        page["link"].append({"relation": "next", "url": f"{fake.base_url}/Observation?patient={c.PAT_ANA}&_offset=1"})
        return web.json_response(page, content_type="application/fhir+json")
    return override


async def test_a_paging_link_one_worker_sealed_opens_at_every_worker(fake_fhir: FakeFhir, launch: Any) -> None:
    """Without enforcement.paging_key_file the supervisor makes one key for all its workers:
    the sealed next link is followed on fresh connections, which both workers accept."""
    seed(fake_fhir, c.opt_in(c.PAT_ANA))
    fake_fhir.override = _paged(fake_fhir)
    gw = await launch(fake_fhir.base_url)
    async with aiohttp.ClientSession() as session, session.get(gw.url + SEARCH, headers=DOCTOR) as resp:
        following = next(lk["url"] for lk in orjson.loads(await resp.read())["link"] if lk["relation"] == "next")
    assert "gateway-page=" in following and "_offset" not in following
    answers = await fresh_gets(following, DOCTOR)
    assert [status for status, _ in answers] == [200] * SPREAD
    assert sorted(gw.answered_by()) == [0, 1]
    followed = [r.path_qs for r in fake_fhir.requests if r.path_qs.startswith("/fhir/Observation")]
    assert followed.count(f"/fhir/Observation?patient={c.PAT_ANA}&_offset=1") == SPREAD
    # The key lives in the supervisor's private run directory, never in the settings file given.
    assert "paging_key_file" not in (gw.log.parent / "gateway.yaml").read_text()


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("problem", ["short", "missing"])
async def test_a_bad_paging_key_file_is_one_line_and_exit_2(workers: int, problem: str, tmp_path: Path) -> None:
    key = tmp_path / "paging.key"
    if problem == "short":
        key.write_text("too-short\n")
    config = write_config(tmp_path, "http://127.0.0.1:9/fhir", workers, free_port(), free_port(),
                          extra=f"enforcement: {{paging_key_file: {key}}}\n")
    code, err = await run_serve(tmp_path, config)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("consent-gateway: config error: enforcement.paging_key_file: "), err
    assert ("at least 32" if problem == "short" else "cannot read the key file") in err, err
    assert "too-short" not in err, "the secret is never printed"
