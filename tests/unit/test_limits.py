"""Limits: an upstream answer over ``upstream.max_response_bytes`` is a 502 and is never
buffered beyond the cap; the process's peak memory for a large answer stays bounded; a client
that trickles its request head is disconnected after ``listen.header_timeout_s``."""

from __future__ import annotations

import asyncio
import base64
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiohttp import web

from tests.conftest import GatewayUnderTest
from tests.fakes import FakeFhir
from tests.unit._util import MakeGateway, assert_outcome, free_port, start_serving

MiB = 1024 * 1024
OPT_IN = {
    "resourceType": "Consent", "id": "c-p1", "status": "active",
    "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]},
    "patient": {"reference": "Patient/p1"},
    "policyRule": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTIN"}]},
}


def documents(entries: int, attachment_bytes: int) -> bytes:
    """A searchset of Patient/p1's discharge summaries with their PDFs inline (LOINC 18842-5)."""
    blob = base64.b64encode(os.urandom(attachment_bytes)).decode()
    return orjson.dumps({"resourceType": "Bundle", "type": "searchset", "entry": [
        {"fullUrl": f"http://upstream.invalid/fhir/DocumentReference/d{i}", "search": {"mode": "match"}, "resource": {
            "resourceType": "DocumentReference", "id": f"d{i}", "status": "current",
            "subject": {"reference": "Patient/p1"},
            "type": {"coding": [{"system": "http://loinc.org", "code": "18842-5", "display": "Discharge summary"}]},
            "content": [{"attachment": {"contentType": "application/pdf", "data": blob}}],
        }} for i in range(entries)
    ]})


@pytest.fixture
async def big_upstream() -> AsyncIterator[tuple[str, dict[str, object]]]:
    """An upstream whose DocumentReference search answers ``answer["body"]`` (bytes), either with
    a Content-Length or, with ``answer["chunked"]``, streamed without one."""
    answer: dict[str, object] = {"body": b"{}", "chunked": False}

    async def handle(request: web.Request) -> web.StreamResponse:
        if request.path.endswith("/metadata"):
            return web.json_response({"resourceType": "CapabilityStatement"})
        if request.path.endswith("/Consent"):
            bundle = {"resourceType": "Bundle", "type": "searchset",
                      "entry": [{"resource": OPT_IN, "search": {"mode": "match"}}]}
            return web.Response(body=orjson.dumps(bundle), content_type="application/fhir+json")
        body = answer["body"]
        assert isinstance(body, bytes)
        if not answer["chunked"]:
            return web.Response(body=body, content_type="application/fhir+json")
        resp = web.StreamResponse(headers={"Content-Type": "application/fhir+json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        view = memoryview(body)
        try:
            for start in range(0, len(body), MiB):
                await resp.write(view[start:start + MiB])
        except (ConnectionError, RuntimeError):
            pass  # the gateway hung up once it had seen enough
        return resp

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}/fhir", answer
    await runner.cleanup()


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_answer_over_max_response_bytes_is_502(
    chunked: bool, big_upstream: tuple[str, dict[str, object]], make_gateway: MakeGateway
) -> None:
    url, answer = big_upstream
    answer.update(body=documents(40, 100_000), chunked=chunked)  # about 5.4 MB
    gw: GatewayUnderTest = await make_gateway(url, upstream={"max_response_bytes": 2 * MiB})
    resp = await gw.get("/DocumentReference?patient=Patient/p1")
    body = await resp.read()
    outcome = assert_outcome(resp.status, resp.content_type, body, 502, issue_code="transient")
    assert outcome["issue"][0]["details"]["coding"][0]["code"] == "upstream-too-large"
    assert b"d1" not in body and b"18842-5" not in body
    answer.update(body=documents(2, 1000))
    resp = await gw.get("/DocumentReference?patient=Patient/p1")
    assert resp.status == 200  # under the cap


def peak_rss(pid: int) -> int:
    """The process's peak resident set (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


async def serve(tmp_path: Path, upstream: str, max_response_bytes: int) -> tuple[asyncio.subprocess.Process, int]:
    port, admin = free_port(), free_port()
    config = tmp_path / "gateway.yaml"
    config.write_text(
        f"upstream: {{url: {upstream}, max_response_bytes: {max_response_bytes}}}\n"
        f"listen: {{host: 127.0.0.1, port: {port}}}\nadmin: {{host: 127.0.0.1, port: {admin}}}\n"
        f"consent: {{change_poll_s: 0}}\naudit: {{path: {tmp_path / 'audit.jsonl'}}}\n",
        encoding="utf-8",
    )
    return await start_serving(config, admin, tmp_path, capture=False), port


async def test_peak_memory_for_a_large_answer_stays_under_4n_plus_100_mib(
    big_upstream: tuple[str, dict[str, object]], tmp_path: Path
) -> None:
    url, answer = big_upstream
    body = documents(200, 150_000)  # about 40 MB
    answer.update(body=body, chunked=True)
    process, port = await serve(tmp_path, url, 64 * MiB)
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/DocumentReference?patient=Patient/p1",
                                   headers={"X-Actor": "Practitioner/dr-1"}) as resp:
                assert resp.status == 200
                assert len(await resp.read()) >= len(body) - 200 * 100
        peak = peak_rss(process.pid)
    finally:
        process.terminate()
        await process.wait()
    n = len(body)
    print(f"answer {n / MiB:.1f} MiB: peak RSS {peak / MiB:.0f} MiB = {peak / n:.1f} N")
    assert peak < 4 * n + 100 * MiB


def observations(entries: int) -> bytes:
    """A searchset of Patient/p1's lab results: many small resources, each with its own id,
    meta and time, a few of them sensitive (HIV viral load, LOINC 20447-9)."""
    def lab(i: int) -> dict[str, object]:
        code = ("20447-9", "HIV 1 RNA [#/volume] in Serum or Plasma") if i % 50 == 0 else ("718-7", "Hemoglobin")
        return {"fullUrl": f"http://upstream.invalid/fhir/Observation/o{i}", "search": {"mode": "match"}, "resource": {
            "resourceType": "Observation", "id": f"o{i}",
            "meta": {"versionId": "1", "lastUpdated": f"2024-05-01T10:{i % 60:02d}:00Z"}, "status": "final",
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                      "code": "laboratory", "display": "Laboratory"}]}],
            "code": {"coding": [{"system": "http://loinc.org", "code": code[0], "display": code[1]}]},
            "subject": {"reference": "Patient/p1"}, "effectiveDateTime": f"2024-05-01T09:{i % 60:02d}:00Z",
            "valueQuantity": {"value": 13.2 + i % 7, "unit": "g/dL", "system": "http://unitsofmeasure.org", "code": "g/dL"},
            "referenceRange": [{"low": {"value": 12.0, "unit": "g/dL"}, "high": {"value": 16.0, "unit": "g/dL"}}],
        }}
    return orjson.dumps({"resourceType": "Bundle", "type": "searchset", "entry": [lab(i) for i in range(entries)]})


async def test_peak_memory_for_many_small_resources_stays_under_4n_plus_100_mib(
    big_upstream: tuple[str, dict[str, object]], tmp_path: Path
) -> None:
    """60,000 small Observations (about 50 MB): decided on views of their deciding elements,
    spliced from the upstream's bytes; the sensitive ones are withheld (the consent opts in
    without sensitive labels)."""
    url, answer = big_upstream
    body = observations(60_000)
    answer.update(body=body, chunked=True)
    process, port = await serve(tmp_path, url, 64 * MiB)
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/Observation?patient=Patient/p1",
                                   headers={"X-Actor": "Practitioner/dr-1"}) as resp:
                assert resp.status == 200
                sent = await resp.read()
        peak = peak_rss(process.pid)
    finally:
        process.terminate()
        await process.wait()
    n = len(body)
    assert b"20447-9" not in sent and b'"o1"' in sent and b'"o50"' not in sent
    print(f"answer {n / MiB:.1f} MiB of 60,000 resources: peak RSS {peak / MiB:.0f} MiB = {peak / n:.1f} N")
    assert peak < 4 * n + 100 * MiB


async def test_an_answer_far_over_the_cap_is_never_buffered(
    big_upstream: tuple[str, dict[str, object]], tmp_path: Path
) -> None:
    url, answer = big_upstream
    answer.update(body=documents(500, 150_000), chunked=True)  # about 100 MB, no Content-Length
    process, port = await serve(tmp_path, url, 4 * MiB)
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/DocumentReference?patient=Patient/p1",
                                   headers={"X-Actor": "Practitioner/dr-1"}) as resp:
                assert resp.status == 502
        peak = peak_rss(process.pid)
    finally:
        process.terminate()
        await process.wait()
    print(f"100 MB answer, 4 MiB cap: peak RSS {peak / MiB:.0f} MiB")
    assert peak < 4 * 4 * MiB + 100 * MiB


async def test_a_client_trickling_its_request_head_is_disconnected(
    fake_fhir: FakeFhir, make_gateway: MakeGateway
) -> None:
    gw: GatewayUnderTest = await make_gateway(fake_fhir.base_url, listen={"header_timeout_s": 0.5})
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.running.proxy_port)
    started = time.monotonic()
    head = b"GET /Patient HTTP/1.1\r\nHost: gw\r\nX-Actor: Practitioner/dr-1\r\nX-Padding: " + b"a" * 100
    closed_after: float | None = None
    try:
        for byte in head:  # one byte every 50 ms: 5 s for the whole head
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.05)
            if reader.at_eof():
                closed_after = time.monotonic() - started
                break
            try:
                if await asyncio.wait_for(reader.read(1), 0.001) == b"":
                    closed_after = time.monotonic() - started
                    break
            except asyncio.TimeoutError:
                pass
    except ConnectionError:
        closed_after = time.monotonic() - started
    finally:
        writer.close()
    assert closed_after is not None, "the connection stayed open for the whole trickled head"
    assert closed_after < 2.0
    assert not [r for r in fake_fhir.requests if r.path_qs.startswith("/fhir/Patient")]
