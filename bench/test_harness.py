"""Tests of the benchmark harness: the fixture's data, the load client and the report figures.

Run with ``.venv/bin/python -m pytest -q bench/test_harness.py``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from bench import instructions, load
from bench.run import Sample, paired, rotated
from bench.upstream import (
    W2_PATH, W3_PATH, Fixture, build_app, cold_path, cold_patient, search_entries,
)
from gateway.rules import load_rules


def test_w2_search_is_forty_percent_sensitive_with_real_codes() -> None:
    index = load_rules()
    entries = search_entries("Patient/p1")
    labelled = [r for r in entries if any(label.code in index.sensitive for label in index.labels_for(r))]
    assert len(entries) == 100
    assert len(labelled) == 40
    codes = {c["code"] for r in labelled for c in r["code"]["coding"]}
    assert {"75622-1", "F11.20", "F32.9"} <= codes


def test_fixture_serves_a_thousand_resources_for_everything() -> None:
    fixture = Fixture("http://127.0.0.1:1/fhir", [], 0)
    bundle = orjson.loads(fixture.answers[W3_PATH])
    assert len(bundle["entry"]) == 1000
    assert len({e["fullUrl"] for e in bundle["entry"]}) == 1000


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[Fixture, TestServer]]:
    fixture = Fixture("http://127.0.0.1:1/fhir", ["0"], 3)
    server = TestServer(build_app(fixture), host="127.0.0.1")
    await server.start_server()
    yield fixture, server
    await server.close()


async def test_consent_queries_are_counted_per_patient(upstream: tuple[Fixture, TestServer]) -> None:
    fixture, server = upstream
    assert server.port is not None
    a, b = cold_patient("0", 0), cold_patient("0", 1)
    path = f"/fhir/Consent?patient={a},{b}&status=active&_count=100"
    result = await load.closed_loop(server.port, [load.raw_request(path, server.port, {})] * 3, connections=2, seconds=None)
    assert result.requests == 3 and result.statuses == {200: 3}
    assert fixture.queries == {a: 3, b: 3}
    bundle = orjson.loads(fixture.consent_bundle([a]))
    assert [e["resource"]["id"] for e in bundle["entry"]] == ["c0x0000-treat", "c0x0000-payer"]


async def test_closed_loop_reads_whole_answers_back_to_back(upstream: tuple[Fixture, TestServer]) -> None:
    _, server = upstream
    assert server.port is not None
    requests = [load.raw_request(p, server.port, {}) for p in (W2_PATH, cold_path(cold_patient("0", 2)), "/nope")] * 4
    result = await load.closed_loop(server.port, requests, connections=3, seconds=None)
    assert result.requests == 12
    assert result.statuses == {200: 8, 404: 4}
    assert result.errors == 0
    assert result.p50_us is not None and result.p99_us is not None and result.p50_us <= result.p99_us


async def test_open_loop_keeps_its_schedule() -> None:
    async def slow(_: web.Request) -> web.Response:
        return web.Response(body=b"{}", content_type="application/json")

    app = web.Application()
    app.router.add_get("/", slow)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    assert server.port is not None
    try:
        result = await load.open_loop(server.port, load.raw_request("/", server.port, {}), rate=200, seconds=0.25)
    finally:
        await server.close()
    assert result.requests == 50
    assert 0.2 < result.seconds < 1.0


def test_chunked_body_end_is_found_only_when_complete() -> None:
    body = bytearray(b"HEAD\r\n\r\n4\r\nabcd\r\n3\r\nefg\r\n0\r\n\r\n")
    assert load._chunked_end(body, 8) == len(body)
    assert load._chunked_end(body[:-2], 8) == -1
    assert load._chunked_end(bytearray(b"4\r\nab"), 0) == -1


def test_wrk_output_is_parsed() -> None:
    output = """Running 1s test @ http://127.0.0.1:1/fhir/Observation/obs-1
  1 threads and 32 connections
  Latency Distribution
     50%  412.00us
     75%  530.00us
     90%  700.00us
     99%    2.31ms
  2890 requests in 1.00s, 2.10MB read
  Socket errors: connect 0, read 1, write 0, timeout 2
  Non-2xx or 3xx responses: 5
Requests/sec:   2889.14
"""
    result = load.parse_wrk(output)
    assert result.requests == 2890 and result.seconds == 1.0
    assert result.p50_us == 412.0 and result.p99_us == 2310.0
    assert result.errors == 3 and result.statuses == {0: 5}


def test_percentile_is_nearest_rank() -> None:
    ordered = [float(n) for n in range(1, 101)]
    assert load.percentile(ordered, 50) == 50.0
    assert load.percentile(ordered, 99) == 99.0
    assert load.percentile([7.0], 99) == 7.0


def test_paired_figures_compare_within_each_round() -> None:
    gateway = [Sample(rps=50), Sample(rps=90), Sample(rps=40)]
    bare = [Sample(rps=100), Sample(rps=100), Sample(rps=50)]
    assert paired(gateway, bare, "rps", "/") == 0.8
    assert paired(gateway, bare, "rps", "-") == -10


def test_rounds_rotate_the_order_of_targets() -> None:
    targets = ("direct", "nginx", "bare", "gateway")
    orders = [rotated(targets, r) for r in range(4)]
    assert {order[0] for order in orders} == set(targets)


def test_callgrind_totals_are_read_from_a_dump() -> None:
    dump = b"version: 1\ncreator: callgrind-3.19.0\nevents: Ir\nsummary: 5380880\n\nfn=(1) main\n0 12\ntotals: 5380880\n"
    assert [int(n) for n in instructions._TOTALS.findall(dump)] == [5380880, 5380880]
    assert instructions._TOTALS.findall(b"events: Ir\nfn=(1) summary: 3\n") == []


async def test_instruction_counts_send_requests_one_after_another(upstream: tuple[Fixture, TestServer]) -> None:
    fixture, server = upstream
    assert server.port is not None
    await asyncio.to_thread(instructions.send, server.port, W2_PATH, instructions.headers_for("W2"), 3)
    with pytest.raises(RuntimeError, match="answered 404"):
        await asyncio.to_thread(instructions.send, server.port, "/nope", {}, 1)
    assert instructions.headers_for("W5")["X-Break-Glass"] == "Medical emergency"
