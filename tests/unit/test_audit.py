"""The audit file and its delivery to a FHIR server (gateway/audit.py, issue 7).

``AuditLog`` appends one JSON line per event and returns only once it is fsynced; concurrent
appends share a write. ``AuditDelivery`` PUTs each line to ``audit.fhir_url`` from a durable
offset, so a server that is down loses nothing. The HTTP path is in ``test_breakglass.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.audit import AuditDelivery, AuditLog
from gateway.core.errors import AuditUnavailable, GatewayError
from gateway.upstream import Upstream
from tests.conftest import GatewayUnderTest
from tests.fakes import FakeFhir
from tests.fixtures import clinical as c
from tests.unit._util import free_port

MakeGateway = Callable[..., Awaitable[GatewayUnderTest]]
JSON = dict[str, Any]


def event(note: str = "") -> JSON:
    """A minimal AuditEvent with a fresh id; ``note`` rides in outcomeDesc."""
    return {
        "resourceType": "AuditEvent", "id": str(uuid.uuid4()),
        "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-event-type", "code": "rest"},
        "recorded": "2024-05-01T10:00:00Z", "outcomeDesc": note,
        "agent": [{"who": {"reference": c.DOCTOR}, "requestor": True}],
        "source": {"observer": {"display": "FHIR Consent Gateway"}},
    }


def lines(path: Path) -> list[JSON]:
    raw = path.read_bytes()
    assert raw == b"" or raw.endswith(b"\n")
    return [orjson.loads(line) for line in raw.splitlines()]


def puts(fake: FakeFhir) -> list[tuple[str, JSON]]:
    """``(AuditEvent id in the URL, body)`` of every PUT the fake received."""
    return [
        (r.path_qs.rsplit("/", 1)[1], orjson.loads(r.body))
        for r in fake.requests if r.method == "PUT" and r.path_qs.startswith("/fhir/AuditEvent/")
    ]


@pytest.fixture
async def audit_server(fake_fhir: FakeFhir) -> AsyncIterator[Upstream]:
    """An Upstream client pointed at ``fake_fhir``, the audit FHIR server."""
    server = Upstream(fake_fhir.base_url, timeout_s=5, max_connections=4)
    await server.open()
    yield server
    await server.close()


@pytest.fixture
def audit_log(tmp_path: Path) -> Iterator[AuditLog]:
    log = AuditLog(tmp_path / "audit.jsonl")
    yield log
    log.close()


# ---------------------------------------------------------------- AuditLog


async def test_append_returns_after_the_line_is_on_disk(audit_log: AuditLog) -> None:
    first, second = event("first"), event("second")
    await audit_log.append(first)
    assert lines(audit_log.path) == [first]
    await audit_log.append(second)
    assert lines(audit_log.path) == [first, second]


async def test_audit_file_is_private_to_the_gateway(audit_log: AuditLog) -> None:
    await audit_log.append(event())
    assert stat.S_IMODE(audit_log.path.stat().st_mode) == 0o600


async def test_appends_to_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    old = event("from the last run")
    path.write_bytes(orjson.dumps(old) + b"\n")
    log = AuditLog(path)
    new = event("this run")
    await log.append(new)
    log.close()
    assert lines(path) == [old, new]


async def test_text_that_could_break_a_line_stays_on_one_line(audit_log: AuditLog) -> None:
    tricky = event("line one\nline two\r\u2028\u2029 \"quoted\" {not json")
    await audit_log.append(tricky)
    raw = audit_log.path.read_bytes()
    assert raw.count(b"\n") == 1
    assert lines(audit_log.path) == [tricky]


async def test_concurrent_appends_are_group_committed_whole(
    audit_log: AuditLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_fsync = os.fsync
    calls: list[int] = []

    def counting_fsync(fd: int) -> None:
        calls.append(fd)
        time.sleep(0.01)  # a realistic disk: appends arriving meanwhile join the next batch
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counting_fsync)
    events = [event("x" * (i * 97 % 5000)) for i in range(200)]  # up to 5 kB: beyond atomic pipe writes
    await asyncio.gather(*(audit_log.append(e) for e in events))
    written = lines(audit_log.path)
    assert sorted(e["id"] for e in written) == sorted(e["id"] for e in events)
    by_id = {e["id"]: e for e in events}
    assert all(w == by_id[w["id"]] for w in written)
    assert 1 <= len(calls) < 20, f"{len(calls)} fsyncs for 200 concurrent appends"


@pytest.mark.parametrize("where", ["missing-directory", "disk-full"])
async def test_unwritable_audit_raises_audit_unavailable(where: str, tmp_path: Path) -> None:
    path = tmp_path / "gone" / "audit.jsonl" if where == "missing-directory" else Path("/dev/full")
    log = AuditLog(path)
    with pytest.raises(AuditUnavailable) as raised:
        await log.append(event())
    assert raised.value.status == 503
    log.close()


async def test_every_waiter_of_a_failed_batch_gets_503_then_the_log_recovers(tmp_path: Path) -> None:
    path = tmp_path / "later" / "audit.jsonl"
    log = AuditLog(path)
    results = await asyncio.gather(*(log.append(event()) for _ in range(10)), return_exceptions=True)
    assert all(isinstance(r, AuditUnavailable) for r in results), results
    path.parent.mkdir()
    ok = event("after recovery")
    await log.append(ok)
    log.close()
    assert lines(path) == [ok]


async def test_event_after_a_torn_line_still_parses(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    kept = event("kept")
    torn = orjson.dumps(event("torn by a crash"))
    path.write_bytes(orjson.dumps(kept) + b"\n" + torn[:40])  # the process died inside os.write
    log = AuditLog(path)
    after = event("answered after the restart")
    await log.append(after)
    log.close()
    parsed = []
    for line in path.read_bytes().splitlines():
        with contextlib.suppress(orjson.JSONDecodeError):
            parsed.append(orjson.loads(line))
    assert parsed == [kept, after]


# ---------------------------------------------------------------- AuditDelivery


async def test_delivery_puts_each_event_once_in_order(
    audit_log: AuditLog, audit_server: Upstream, fake_fhir: FakeFhir
) -> None:
    events = [event(str(i)) for i in range(3)]
    for e in events:
        await audit_log.append(e)
    delivery = AuditDelivery(audit_log, audit_server)
    assert await delivery.deliver_once() is True
    assert puts(fake_fhir) == [(e["id"], e) for e in events]
    assert all(
        r.headers.get("Content-Type", "").startswith("application/fhir+json")
        for r in fake_fhir.requests if r.method == "PUT"
    )
    assert await delivery.deliver_once() is True
    assert len(puts(fake_fhir)) == 3  # nothing is sent twice
    assert int(delivery.offset_path.read_text().split()[1]) == audit_log.path.stat().st_size


async def test_server_answering_errors_loses_nothing(
    audit_log: AuditLog, audit_server: Upstream, fake_fhir: FakeFhir
) -> None:
    events = [event(str(i)) for i in range(3)]
    for e in events:
        await audit_log.append(e)
    down = True

    async def unavailable(request: web.Request) -> web.StreamResponse | None:
        if down and request.method == "PUT":
            return web.json_response({"resourceType": "OperationOutcome", "issue": []}, status=503)
        return None

    fake_fhir.override = unavailable
    delivery = AuditDelivery(audit_log, audit_server)
    assert await delivery.deliver_once() is False
    assert await delivery.deliver_once() is False
    assert [e["id"] for e in fake_fhir.resources.values()] == []
    later = event("while down")
    await audit_log.append(later)
    down = False
    assert await delivery.deliver_once() is True
    assert [fake_fhir.resources[f"AuditEvent/{e['id']}"] for e in (*events, later)] == [*events, later]
    assert lines(audit_log.path) == [*events, later]  # the local file keeps everything


async def test_server_unreachable_then_back(audit_log: AuditLog, tmp_path: Path) -> None:
    port = free_port()
    server = Upstream(f"http://127.0.0.1:{port}/fhir", timeout_s=2, max_connections=2)
    await server.open()
    events = [event(str(i)) for i in range(2)]
    for e in events:
        await audit_log.append(e)
    delivery = AuditDelivery(audit_log, server)
    try:
        with contextlib.suppress(GatewayError):  # a refused connection: run() catches it and retries
            assert await delivery.deliver_once() is False
        fake = FakeFhir()
        test_server = TestServer(fake.app(), host="127.0.0.1", port=port)
        await test_server.start_server()
        try:
            assert await delivery.deliver_once() is True
            assert [i for i, _ in puts(fake)] == [e["id"] for e in events]
        finally:
            await test_server.close()
    finally:
        await server.close()


async def test_delivery_resumes_after_a_restart_from_the_durable_offset(
    tmp_path: Path, audit_server: Upstream, fake_fhir: FakeFhir
) -> None:
    path = tmp_path / "audit.jsonl"
    first_run = AuditLog(path)
    early = [event("early-1"), event("early-2")]
    for e in early:
        await first_run.append(e)
    assert await AuditDelivery(first_run, audit_server).deliver_once() is True
    first_run.close()
    second_run = AuditLog(path)  # a new process: nothing in memory survives
    late = event("late")
    await second_run.append(late)
    assert await AuditDelivery(second_run, audit_server).deliver_once() is True
    second_run.close()
    assert [i for i, _ in puts(fake_fhir)] == [e["id"] for e in (*early, late)]


async def test_a_partly_written_line_waits(audit_log: AuditLog, audit_server: Upstream, fake_fhir: FakeFhir) -> None:
    whole = event("whole")
    await audit_log.append(whole)
    partial = orjson.dumps(event("half"))
    with open(audit_log.path, "ab") as fh:
        fh.write(partial[: len(partial) // 2])
    delivery = AuditDelivery(audit_log, audit_server)
    assert await delivery.deliver_once() is True
    assert [i for i, _ in puts(fake_fhir)] == [whole["id"]]
    with open(audit_log.path, "ab") as fh:
        fh.write(partial[len(partial) // 2:] + b"\n")
    assert await delivery.deliver_once() is True
    assert [i for i, _ in puts(fake_fhir)] == [whole["id"], orjson.loads(partial)["id"]]


async def test_a_line_that_does_not_parse_does_not_stop_delivery(
    audit_log: AuditLog, audit_server: Upstream, fake_fhir: FakeFhir
) -> None:
    audit_log.path.write_bytes(b'{"resourceType":"AuditEv\n')  # torn by a crash, then terminated
    good = event("after the crash")
    await audit_log.append(good)
    delivery = AuditDelivery(audit_log, audit_server)
    assert await delivery.deliver_once() is True
    assert [i for i, _ in puts(fake_fhir)] == [good["id"]]


async def test_gateway_delivers_break_glass_events_to_audit_fhir_url(
    fake_fhir: FakeFhir, make_gateway: MakeGateway
) -> None:
    c.seed_all(fake_fhir)
    fake_fhir.add(c.opt_in(c.PAT_ANA))
    audit_fhir = FakeFhir()
    server = TestServer(audit_fhir.app(), host="127.0.0.1")
    await server.start_server()
    try:
        audit_fhir.base_url = f"http://127.0.0.1:{server.port}/fhir"
        gw = await make_gateway(fake_fhir.base_url, audit={"fhir_url": audit_fhir.base_url})
        async with gw.session.get(
            gw.url + f"/Observation?patient={c.PAT_ANA}",
            headers={"X-Actor": c.DOCTOR, "X-Break-Glass": "Medical emergency"},
        ) as resp:
            assert resp.status == 200
            audit_id = resp.headers["X-Break-Glass-Audit-Id"]
        deadline = time.monotonic() + 5
        while f"AuditEvent/{audit_id}" not in audit_fhir.resources and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        delivered = audit_fhir.resources[f"AuditEvent/{audit_id}"]
        assert delivered == lines(gw.state.settings.audit.path)[0]
        assert not any(r.path_qs.startswith("/fhir/AuditEvent") for r in fake_fhir.requests)
    finally:
        await server.close()


def delivered(fake: FakeFhir) -> list[str]:
    """Ids of the AuditEvents the audit server stored, in order."""
    return [k.split("/", 1)[1] for k in fake.resources if k.startswith("AuditEvent/")]


def down_while(fake: FakeFhir, flag: list[bool]) -> None:
    async def answer(request: web.Request) -> web.StreamResponse | None:
        if flag[0] and request.method == "PUT":
            return web.json_response({"resourceType": "OperationOutcome", "issue": []}, status=503)
        return None

    fake.override = answer


async def test_backlog_is_a_metric_and_delivery_resumes_after_a_restart(
    tmp_path: Path, audit_server: Upstream, fake_fhir: FakeFhir
) -> None:
    from prometheus_client import CollectorRegistry

    from gateway.metrics import Metrics

    path = tmp_path / "audit.jsonl"
    down = [True]
    down_while(fake_fhir, down)
    first_metrics = Metrics(CollectorRegistry())
    first_run = AuditLog(path)
    events = [event("a"), event("b")]
    for e in events:
        await first_run.append(e)
    delivery = AuditDelivery(first_run, audit_server, metrics=first_metrics)
    assert await delivery.deliver_once() is False
    backlog = first_metrics.registry.get_sample_value("consent_gateway_audit_delivery_backlog_bytes")
    assert backlog == path.stat().st_size > 0
    delivery.close()
    first_run.close()
    # A new process on the same storage (the StatefulSet's volume): the backlog goes out.
    down[0] = False
    second_metrics = Metrics(CollectorRegistry())
    second_run = AuditLog(path)
    restarted = AuditDelivery(second_run, audit_server, metrics=second_metrics)
    assert await restarted.deliver_once() is True
    assert delivered(fake_fhir) == [e["id"] for e in events]
    assert second_metrics.registry.get_sample_value("consent_gateway_audit_delivery_backlog_bytes") == 0
    restarted.close()
    second_run.close()


@pytest.mark.parametrize("how", ["rotated", "deleted"])
async def test_undelivered_lines_of_a_rotated_or_deleted_file_are_still_delivered(
    how: str, audit_log: AuditLog, audit_server: Upstream, fake_fhir: FakeFhir
) -> None:
    down = [True]
    down_while(fake_fhir, down)
    before = [event("before-1"), event("before-2")]
    for e in before:
        await audit_log.append(e)
    delivery = AuditDelivery(audit_log, audit_server)
    assert await delivery.deliver_once() is False  # delivery holds the file open from here
    if how == "rotated":
        audit_log.path.rename(audit_log.path.with_name("audit.jsonl.1"))
    else:
        audit_log.path.unlink()
    after = event("after")
    await audit_log.append(after)  # the log reopens a new file at the configured path
    assert lines(audit_log.path) == [after]
    down[0] = False
    assert await delivery.deliver_once() is True
    assert delivered(fake_fhir) == [e["id"] for e in (*before, after)]
    inode, offset = delivery.offset_path.read_text().split()
    assert (int(inode), int(offset)) == (audit_log.path.stat().st_ino, audit_log.path.stat().st_size)
    delivery.close()
