"""The proxy port: forwarding, who-is-asking headers, gateway errors, URL rewriting, request ids.

Reads use resources outside every patient compartment (Practitioner, Organization, Medication),
so these tests exercise the pass-through path and no consent lookup runs.
"""

from __future__ import annotations

import io
import logging
import os
import re
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer, make_mocked_request
from multidict import CIMultiDict

from gateway.core.errors import BadRequest
from gateway.core.model import Actor
from gateway.web import request as request_module
from gateway.web.middleware import JsonLogFormatter, fresh_request_id, fresh_uuid
from tests.sealed import inner, is_sealed
from tests.conftest import GatewayUnderTest
from tests.fakes import FakeFhir, Recorded
from tests.unit._util import (
    FHIR_JSON,
    MakeGateway,
    assert_outcome,
    diagnostics,
    free_port,
    host_port,
    raw_http,
    split_http,
)

DOC = "Practitioner/doc-1"
OSLER = {
    "resourceType": "Practitioner", "id": "pr-osler",
    "identifier": [{"system": "http://hl7.org/fhir/sid/us-npi", "value": "1234567893"}],
    "name": [{"family": "Osler", "given": ["William"]}],
}
METFORMIN = {
    "resourceType": "Medication", "id": "med-metformin",
    "code": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "860975",
                         "display": "metformin hydrochloride 500 MG Extended Release Oral Tablet"}]},
}


@pytest.fixture
def fhir(fake_fhir: FakeFhir) -> FakeFhir:
    fake_fhir.add(OSLER, METFORMIN)
    return fake_fhir


@pytest.fixture
async def gw(fhir: FakeFhir, make_gateway: MakeGateway) -> GatewayUnderTest:
    return await make_gateway(fhir.base_url)


def forwarded(fake: FakeFhir, path_prefix: str) -> list[Recorded]:
    """Requests the upstream received whose path starts with ``path_prefix`` (pings excluded)."""
    return [r for r in fake.requests if r.path_qs.startswith(path_prefix)]


def lower_keys(headers: dict[str, str]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


async def send(
    gut: GatewayUnderTest, method: str, path: str, *, actor: str | None = DOC,
    headers: dict[str, str] | None = None, data: Any = None,
) -> tuple[int, str, CIMultiDict[str], bytes]:
    """One request through the gateway: status, content type, headers, raw body."""
    hdrs = dict(headers or {})
    if actor is not None:
        hdrs["X-Actor"] = actor
    async with gut.session.request(method, gut.url + path, headers=hdrs, data=data) as resp:
        return resp.status, resp.content_type, CIMultiDict(resp.headers), await resp.read()


# --- forwarding ---------------------------------------------------------------------------


async def test_read_is_forwarded_below_the_base_at_root_and_under_fhir(gw: GatewayUnderTest, fhir: FakeFhir) -> None:
    for path in ("/Practitioner/pr-osler", "/fhir/Practitioner/pr-osler"):
        status, ctype, _, body = await send(gw, "GET", path)
        assert status == 200 and ctype == FHIR_JSON
        assert orjson.loads(body)["name"][0]["family"] == "Osler"
    assert [r.path_qs for r in forwarded(fhir, "/fhir/Practitioner")] == ["/fhir/Practitioner/pr-osler"] * 2


async def test_upstream_at_root_is_served_at_root(make_gateway: MakeGateway) -> None:
    fake = FakeFhir(base_path="")
    server = TestServer(fake.app(), host="127.0.0.1")
    await server.start_server()
    try:
        fake.base_url = f"http://127.0.0.1:{server.port}"
        fake.add(OSLER)
        gut = await make_gateway(fake.base_url)
        status, _, _, body = await send(gut, "GET", "/Practitioner/pr-osler")
        assert status == 200 and orjson.loads(body)["id"] == "pr-osler"
        assert forwarded(fake, "/Practitioner")[0].path_qs == "/Practitioner/pr-osler"
    finally:
        await server.close()


async def test_query_string_is_forwarded_with_repeats_in_order(gw: GatewayUnderTest, fhir: FakeFhir) -> None:
    query = (
        "family=Osler&given=William&family=Bean&_lastUpdated=ge2024-01-01&_lastUpdated=lt2025-01-01"
        "&identifier=http://hl7.org/fhir/sid/us-npi|1234567893&_count=2&_sort=-_lastUpdated"
    )
    answer = await raw_http(
        gw.running.proxy_port,
        f"GET /Practitioner?{query} HTTP/1.1\r\nHost: gw\r\nX-Actor: {DOC}\r\nConnection: close\r\n\r\n".encode(),
    )
    assert split_http(answer)[0] == 200
    assert forwarded(fhir, "/fhir/Practitioner")[-1].path_qs == "/fhir/Practitioner?" + query


async def test_percent_encoded_query_values_reach_the_upstream_unchanged(gw: GatewayUnderTest, fhir: FakeFhir) -> None:
    seen: list[list[tuple[str, str]]] = []

    async def record_query(request: web.Request) -> web.StreamResponse | None:
        if request.path == "/fhir/Practitioner":
            seen.append(list(request.query.items()))
        return None

    fhir.override = record_query
    sent = [
        ("given", "Mary Ann"),            # %20: a raw space breaks the upstream request line
        ("identifier", "urn:oid:2.16.840.1.113883.4.1|123-45-6789"),
        ("identifier", "MRN#00423"),      # %23: a raw '#' cuts the rest of the query off
        ("name", "100%41"),               # %25: decoded twice it becomes "100A"
        ("family", "Smith&Jones"),        # %26: must stay one value
    ]
    answer = await raw_http(
        gw.running.proxy_port,
        b"GET /Practitioner?given=Mary%20Ann&identifier=urn%3Aoid%3A2.16.840.1.113883.4.1%7C123-45-6789"
        b"&identifier=MRN%2300423&name=100%2541&family=Smith%26Jones HTTP/1.1\r\n"
        b"Host: gw\r\nX-Actor: Practitioner/doc-1\r\nConnection: close\r\n\r\n",
    )
    assert split_http(answer)[0] == 200
    assert seen == [sent]


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE"])
async def test_method_body_and_content_type_are_forwarded(gw: GatewayUnderTest, fhir: FakeFhir, method: str) -> None:
    path = "/Practitioner" if method == "POST" else "/Practitioner/pr-osler"
    if method == "PATCH":
        body = b'[{"op":"replace","path":"/name/0/family","value":"Osler-Revere"}]'
        ctype = "application/json-patch+json"
    else:
        body = orjson.dumps({**OSLER, "active": True}) if method != "DELETE" else b""
        ctype = FHIR_JSON
    await send(gw, method, path, headers={"Content-Type": ctype} if body else None, data=body or None)
    got = forwarded(fhir, "/fhir/Practitioner")[-1]
    assert (got.method, got.path_qs, got.body) == (method, "/fhir" + path, body)
    if body:
        assert lower_keys(got.headers)["content-type"] == ctype


async def test_end_to_end_request_headers_reach_the_upstream(gw: GatewayUnderTest, fhir: FakeFhir) -> None:
    sent = {
        "Authorization": "Bearer upstream-token",
        "Prefer": "return=representation",
        "Cache-Control": "no-cache",
        "X-Correlation-Context": "ward-7",
    }
    status, _, _, _ = await send(gw, "GET", "/Practitioner/pr-osler", headers=sent)
    assert status == 200
    got = lower_keys(forwarded(fhir, "/fhir/Practitioner")[-1].headers)
    for name, value in sent.items():
        assert got[name.lower()] == value
    assert got["accept"] == FHIR_JSON
    # A conditional read would let the upstream answer 304 without a decision.
    await send(gw, "GET", "/Practitioner/pr-osler", headers={"If-None-Match": 'W/"3"'})
    assert "if-none-match" not in lower_keys(forwarded(fhir, "/fhir/Practitioner")[-1].headers)


async def test_hop_by_hop_request_headers_are_dropped(gw: GatewayUnderTest, fhir: FakeFhir) -> None:
    request = (
        b"GET /Practitioner/pr-osler HTTP/1.1\r\nHost: gw.example.test\r\n"
        b"X-Actor: Practitioner/doc-1\r\n"
        b"Connection: close, X-Hop-Secret\r\nX-Hop-Secret: only-for-the-gateway\r\n"
        b"Keep-Alive: timeout=5\r\nTE: trailers\r\nTrailer: Expires\r\n"
        b"Proxy-Authorization: Basic Z2F0ZXdheTpwcm94eQ==\r\nProxy-Connection: keep-alive\r\n"
        b"X-Still-End-To-End: yes\r\n\r\n"
    )
    status, _, _ = split_http(await raw_http(gw.running.proxy_port, request))
    assert status == 200
    got = lower_keys(forwarded(fhir, "/fhir/Practitioner")[-1].headers)
    for name in ("x-hop-secret", "keep-alive", "te", "trailer", "proxy-authorization", "proxy-connection"):
        assert name not in got, name
    assert got.get("connection", "").lower() in ("", "keep-alive")
    assert got["x-still-end-to-end"] == "yes"


async def test_hop_by_hop_response_headers_are_dropped(fhir: FakeFhir, make_gateway: MakeGateway) -> None:
    """Even one the deployment passes (``upstream.passed_response_headers``) is dropped when the
    server's Connection header names it; one it passes and no Connection names is kept."""
    gw = await make_gateway(fhir.base_url, upstream={"passed_response_headers": ["X-Upstream-Hop", "x-upstream-note"]})

    async def answer(request: web.Request) -> web.StreamResponse | None:
        return web.Response(
            body=orjson.dumps(OSLER), content_type=FHIR_JSON,
            headers={
                "Connection": "X-Upstream-Hop", "X-Upstream-Hop": "internal", "Keep-Alive": "timeout=30",
                "Proxy-Authenticate": 'Basic realm="upstream"', "Trailer": "Expires",
                "ETag": 'W/"7"', "Last-Modified": "Tue, 05 Mar 2024 10:00:00 GMT", "X-Upstream-Note": "kept",
            },
        )

    fhir.override = answer
    status, _, headers, _ = await send(gw, "GET", "/Practitioner/pr-osler")
    assert status == 200
    got = {k.lower(): v for k, v in headers.items()}
    for name in ("x-upstream-hop", "keep-alive", "proxy-authenticate", "trailer"):
        assert name not in got, name
    assert "x-upstream-hop" not in got.get("connection", "").lower()
    assert (got["etag"], got["last-modified"], got["x-upstream-note"]) == (
        'W/"7"', "Tue, 05 Mar 2024 10:00:00 GMT", "kept"
    )


async def test_who_is_asking_headers_are_never_forwarded(
    fhir: FakeFhir, make_gateway: MakeGateway, tmp_path: Path
) -> None:
    gut = await make_gateway(fhir.base_url, audit={"path": str(tmp_path / "audit.jsonl")})
    headers = {
        "X-Actor-Organization": "Organization/org-stmary", "X-Actor-Role": "PRCP",
        "X-Purpose-Of-Use": "TREAT", "X-Break-Glass": "Medical emergency",
    }
    status, _, _, _ = await send(gut, "GET", "/Practitioner/pr-osler", headers=headers)
    assert status == 200
    got = lower_keys(forwarded(fhir, "/fhir/Practitioner")[-1].headers)
    leaked = [name for name in got if name.startswith(("x-actor", "x-purpose-of-use", "x-break-glass"))]
    assert leaked == []


async def test_connection_header_cannot_smuggle_gateway_headers_through(gw: GatewayUnderTest, fhir: FakeFhir) -> None:
    # Naming X-Actor in Connection must not make the gateway skip reading it, nor forward it.
    status, _, _, _ = await send(gw, "GET", "/Practitioner/pr-osler", headers={"Connection": "X-Actor"})
    got = lower_keys(forwarded(fhir, "/fhir/Practitioner")[-1].headers) if status == 200 else {}
    assert "x-actor" not in got


async def test_any_x_actor_prefixed_header_is_not_forwarded(gw: GatewayUnderTest, fhir: FakeFhir) -> None:
    headers = {"X-Actor-Name": "Dr William Osler", "X-Actor-Email": "w.osler@example.org"}
    status, _, _, _ = await send(gw, "GET", "/Practitioner/pr-osler", headers=headers)
    assert status == 200
    got = lower_keys(forwarded(fhir, "/fhir/Practitioner")[-1].headers)
    assert [name for name in got if name.startswith("x-actor")] == []


@pytest.mark.parametrize("path", [b"/Practitioner/../metadata", b"/fhir/../admin"])
async def test_dot_segments_are_refused_not_forwarded(gw: GatewayUnderTest, fhir: FakeFhir, path: bytes) -> None:
    before = len(fhir.requests)
    answer = await raw_http(
        gw.running.proxy_port,
        b"GET " + path + b" HTTP/1.1\r\nHost: gw\r\nX-Actor: Practitioner/doc-1\r\nConnection: close\r\n\r\n",
    )
    status, headers, body = split_http(answer)
    assert_outcome(status, headers["content-type"], body, 400, issue_code="invalid")
    assert [r for r in fhir.requests[before:] if "metadata" not in r.path_qs or ".." in r.path_qs] == []


@pytest.mark.parametrize("path", [b"/%2e%2e/admin", b"/fhir/Practitioner/%2E%2E/%2e%2e/%2e%2e/etc"])
async def test_encoded_dot_segments_are_refused_not_forwarded(gw: GatewayUnderTest, fhir: FakeFhir, path: bytes) -> None:
    answer = await raw_http(
        gw.running.proxy_port,
        b"GET " + path + b" HTTP/1.1\r\nHost: gw\r\nX-Actor: Practitioner/doc-1\r\nConnection: close\r\n\r\n",
    )
    status, _, _ = split_http(answer)
    assert [r.path_qs for r in fhir.requests if "%2e" in r.path_qs.lower()] == []
    assert status == 400


async def test_http10_client_without_host_gets_well_formed_links(gw: GatewayUnderTest) -> None:
    answer = await raw_http(
        gw.running.proxy_port, b"GET /Practitioner?family=Osler HTTP/1.0\r\nX-Actor: Practitioner/doc-1\r\n\r\n"
    )
    status, _, body = split_http(answer)
    assert status == 200
    for url in _links(orjson.loads(body)):
        assert re.fullmatch(r"https?://[A-Za-z0-9.\-]+(:\d+)?/Practitioner[?/].+", url), url


async def test_one_pooled_upstream_session_serves_every_request(gw: GatewayUnderTest) -> None:
    session = gw.state.upstream.session
    await send(gw, "GET", "/Practitioner/pr-osler")
    await send(gw, "GET", "/Medication/med-metformin")
    assert gw.state.upstream.session is session
    assert isinstance(session.connector, aiohttp.TCPConnector)
    assert session.connector.limit == gw.state.settings.upstream.max_connections


# --- who is asking ------------------------------------------------------------------------


async def test_missing_actor_is_401_and_nothing_is_forwarded(gw: GatewayUnderTest, fhir: FakeFhir) -> None:
    for headers in ({}, {"X-Actor": ""}):
        status, ctype, _, body = await send(gw, "GET", "/Practitioner/pr-osler", actor=None, headers=headers)
        outcome = assert_outcome(status, ctype, body, 401, issue_code="login", upstream=host_port(fhir.base_url))
        assert "X-Actor" in diagnostics(outcome)
    assert forwarded(fhir, "/fhir/Practitioner") == []


BAD_ACTORS = {
    "no-slash": "Practitioner",
    "no-id": "Practitioner/",
    "not-an-actor-type": "Observation/obs-1",
    "lower-case-type": "practitioner/doc-1",
    "underscore-in-id": "Practitioner/doc_1",
    "space-in-id": "Practitioner/doc 1",
    "extra-segment": "Practitioner/doc-1/_history/2",
    "absolute-url": "http://ehr.example.org/fhir/Practitioner/doc-1",
    "id-of-65-chars": "Practitioner/" + "a" * 65,
    "query-in-id": "Practitioner/doc-1?x=1",
}


@pytest.mark.parametrize("actor", list(BAD_ACTORS.values()), ids=list(BAD_ACTORS))
async def test_malformed_actor_is_401(gw: GatewayUnderTest, fhir: FakeFhir, actor: str) -> None:
    status, ctype, _, body = await send(gw, "GET", "/Practitioner/pr-osler", actor=actor)
    assert_outcome(status, ctype, body, 401, issue_code="login", upstream=host_port(fhir.base_url))
    assert forwarded(fhir, "/fhir/Practitioner") == []


@pytest.mark.parametrize(
    "actor",
    ["Practitioner/doc-1", "Patient/7", "Organization/3", "Device/9", "RelatedPerson/2", "PractitionerRole/pr.1",
     "Practitioner/" + "a" * 64],
)
async def test_well_formed_actor_is_accepted(gw: GatewayUnderTest, actor: str) -> None:
    status, _, _, _ = await send(gw, "GET", "/Practitioner/pr-osler", actor=actor)
    assert status == 200


async def test_malformed_actor_organization_is_401(gw: GatewayUnderTest) -> None:
    status, ctype, _, body = await send(
        gw, "GET", "/Practitioner/pr-osler", headers={"X-Actor-Organization": "Practitioner/doc-2"}
    )
    assert_outcome(status, ctype, body, 401)


async def test_unknown_purpose_is_400_naming_the_allowed_codes(gw: GatewayUnderTest, fhir: FakeFhir) -> None:
    status, ctype, _, body = await send(
        gw, "GET", "/Practitioner/pr-osler", headers={"X-Purpose-Of-Use": "TREATMENT"}
    )
    outcome = assert_outcome(status, ctype, body, 400, issue_code="invalid", upstream=host_port(fhir.base_url))
    allowed = set(re.findall(r"\b[A-Z][A-Z0-9]{2,}\b", diagnostics(outcome)))
    assert {"TREAT", "ETREAT", "HPAYMT", "HOPERAT", "HRESCH", "PUBHLTH"} <= allowed
    assert "TREATMENT" not in allowed
    assert forwarded(fhir, "/fhir/Practitioner") == []


@pytest.mark.parametrize("purpose", ["HPAYMT", "HOPERAT", "PUBHLTH", "ETREAT"])
async def test_known_purpose_is_accepted(gw: GatewayUnderTest, purpose: str) -> None:
    status, _, _, _ = await send(gw, "GET", "/Practitioner/pr-osler", headers={"X-Purpose-Of-Use": purpose})
    assert status == 200


# --- errors the gateway makes -------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        ("/Practitioner/pr-osler", {"Accept": "application/fhir+xml"}),
        ("/Practitioner/pr-osler", {"Accept": "application/xml"}),
        ("/Practitioner/pr-osler?_format=xml", {}),
        ("/Practitioner/pr-osler?_format=application/fhir%2Bxml", {}),
        ("/fhir/Practitioner?family=Osler&_format=text/xml", {}),
    ],
    ids=["accept-fhir-xml", "accept-xml", "format-xml", "format-fhir-xml", "format-text-xml"],
)
async def test_xml_is_406(gw: GatewayUnderTest, fhir: FakeFhir, path: str, headers: dict[str, str]) -> None:
    status, ctype, _, body = await send(gw, "GET", path, headers=headers)
    assert_outcome(status, ctype, body, 406, upstream=host_port(fhir.base_url))
    assert forwarded(fhir, "/fhir/Practitioner") == []


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        ("/Practitioner/pr-osler", {"Accept": "application/fhir+json"}),
        ("/Practitioner/pr-osler", {"Accept": "*/*"}),
        ("/Practitioner/pr-osler", {"Accept": "application/fhir+xml;q=0.9, application/fhir+json"}),
        ("/Practitioner/pr-osler?_format=json", {}),
        ("/Practitioner/pr-osler?_format=application/fhir%2Bjson", {}),
    ],
    ids=["accept-fhir-json", "accept-any", "accept-json-among-others", "format-json", "format-fhir-json"],
)
async def test_json_is_not_406(gw: GatewayUnderTest, path: str, headers: dict[str, str]) -> None:
    status, _, _, _ = await send(gw, "GET", path, headers=headers)
    assert status == 200


async def test_xml_request_body_is_an_outcome(gw: GatewayUnderTest, fhir: FakeFhir) -> None:
    status, ctype, _, body = await send(
        gw, "POST", "/Practitioner", headers={"Content-Type": "application/fhir+xml"},
        data=b'<Practitioner xmlns="http://hl7.org/fhir"><id value="x"/></Practitioner>',
    )
    assert_outcome(status, ctype, body, 415)
    assert forwarded(fhir, "/fhir/Practitioner") == []


LIMIT = 128


@pytest.fixture
async def small_body_gw(fhir: FakeFhir, make_gateway: MakeGateway) -> GatewayUnderTest:
    return await make_gateway(fhir.base_url, listen={"max_body_bytes": LIMIT})


def _body_of(size: int) -> bytes:
    head = b'{"resourceType":"Practitioner","id":"pr-x","name":[{"family":"'
    body = head + b"a" * (size - len(head) - 4) + b'"}]}'
    assert len(body) == size
    return body


async def _chunks(body: bytes) -> AsyncIterator[bytes]:
    for i in range(0, len(body), 16):
        yield body[i:i + 16]


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_body_over_the_limit_is_413(
    small_body_gw: GatewayUnderTest, fhir: FakeFhir, chunked: bool
) -> None:
    body = _body_of(LIMIT + 1)
    data: Any = _chunks(body) if chunked else body
    status, ctype, _, answer = await send(
        small_body_gw, "POST", "/Practitioner", headers={"Content-Type": FHIR_JSON}, data=data
    )
    assert_outcome(status, ctype, answer, 413, issue_code="too-costly", upstream=host_port(fhir.base_url))
    assert forwarded(fhir, "/fhir/Practitioner") == []


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_body_at_the_limit_is_forwarded(small_body_gw: GatewayUnderTest, fhir: FakeFhir, chunked: bool) -> None:
    body = _body_of(LIMIT)
    data: Any = _chunks(body) if chunked else body
    status, _, _, _ = await send(small_body_gw, "POST", "/Practitioner", headers={"Content-Type": FHIR_JSON}, data=data)
    assert status == 201
    assert forwarded(fhir, "/fhir/Practitioner")[-1].body == body


def test_default_body_limit_is_16_mib(gw: GatewayUnderTest) -> None:
    assert gw.state.settings.listen.max_body_bytes == 16 * 1024 * 1024


async def test_upstream_refusing_connections_is_502(make_gateway: MakeGateway) -> None:
    port = free_port()
    gut = await make_gateway(f"http://127.0.0.1:{port}/fhir")
    status, ctype, _, body = await send(gut, "GET", "/Practitioner/pr-osler")
    assert_outcome(status, ctype, body, 502, issue_code="transient", upstream=f"127.0.0.1:{port}")
    assert str(port) not in body.decode()


async def test_upstream_resetting_the_connection_is_502(gw: GatewayUnderTest, fhir: FakeFhir) -> None:
    async def reset(request: web.Request) -> web.StreamResponse | None:
        if request.path.startswith("/fhir/Practitioner") and request.transport is not None:
            request.transport.abort()
            raise ConnectionResetError
        return None

    fhir.override = reset
    status, ctype, _, body = await send(gw, "GET", "/Practitioner/pr-osler")
    assert_outcome(status, ctype, body, 502, issue_code="transient", upstream=host_port(fhir.base_url))


async def test_upstream_timeout_is_504(fhir: FakeFhir, make_gateway: MakeGateway) -> None:
    gut = await make_gateway(fhir.base_url, upstream={"url": fhir.base_url, "timeout_s": 0.3})
    fhir.delay_s = 1.0
    status, ctype, _, body = await send(gut, "GET", "/Practitioner/pr-osler")
    assert_outcome(status, ctype, body, 504, issue_code="timeout", upstream=host_port(fhir.base_url))


@pytest.mark.parametrize("raw", [
    b"GET /Practitioner/pr-osler HTTP/1.1\r\nHost: gw\r\nNot a header line ECHO-ME\r\nConnection: close\r\n\r\n",
    b"GET /Practitioner?q=ECHO-ME HTTP/1.1 junk\r\nHost: gw\r\nConnection: close\r\n\r\n",
    b"GET /Practitioner HTTP/1.1\r\nHost: gw\r\nX-Big: " + b"ECHO-ME" * 3000 + b"\r\nConnection: close\r\n\r\n",
])
async def test_unparsable_request_is_an_outcome_echoing_nothing(gw: GatewayUnderTest, raw: bytes) -> None:
    answer = await raw_http(gw.running.proxy_port, raw)
    status, headers, body = split_http(answer)
    assert_outcome(status, headers["content-type"], body, 400)
    assert b"ECHO-ME" not in answer


# --- URL rewriting ------------------------------------------------------------------------


def _links(bundle: dict[str, Any]) -> list[str]:
    return [link["url"] for link in bundle.get("link", [])] + [e["fullUrl"] for e in bundle.get("entry", [])]


async def test_urls_use_the_configured_public_base(fhir: FakeFhir, make_gateway: MakeGateway) -> None:
    public = "https://fhir.example.org/api/r4"
    gut = await make_gateway(fhir.base_url, public_base_url=public)
    status, _, _, body = await send(gut, "GET", "/fhir/Practitioner?family=Osler")
    assert status == 200
    bundle = orjson.loads(body)
    assert _links(bundle) == [f"{public}/Practitioner?family=Osler", f"{public}/Practitioner/pr-osler"]
    assert host_port(fhir.base_url) not in body.decode()

    status, _, headers, _ = await send(
        gut, "POST", "/Practitioner", headers={"Content-Type": FHIR_JSON},
        data=orjson.dumps({"resourceType": "Practitioner", "id": "pr-bean", "name": [{"family": "Bean"}]}),
    )
    assert status == 201
    assert headers["Location"] == f"{public}/Practitioner/pr-bean/_history/1"


@pytest.mark.parametrize(
    ("path", "headers", "base"),
    [
        ("/Practitioner?family=Osler", {"Host": "ehr.example.test:8443"}, "http://ehr.example.test:8443"),
        ("/fhir/Practitioner?family=Osler", {"Host": "ehr.example.test:8443"}, "http://ehr.example.test:8443/fhir"),
        ("/Practitioner?family=Osler", {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "api.example.org"},
         "https://api.example.org"),
        ("/fhir/Practitioner?family=Osler",
         {"X-Forwarded-Proto": "https, http", "X-Forwarded-Host": "api.example.org, lb.internal"},
         "https://api.example.org/fhir"),
        ("/Practitioner?family=Osler", {"Host": "evil.example/phish?x="}, "http://localhost"),
        ("/Practitioner?family=Osler", {"Host": "gw.example", "X-Forwarded-Proto": "javascript"}, "http://gw.example"),
    ],
    ids=["host", "host-with-prefix", "forwarded", "forwarded-lists-with-prefix", "bad-host", "bad-proto"],
)
async def test_urls_use_the_base_the_client_used(
    gw: GatewayUnderTest, path: str, headers: dict[str, str], base: str
) -> None:
    status, _, _, body = await send(gw, "GET", path, headers=headers)
    assert status == 200
    assert _links(orjson.loads(body)) == [f"{base}/Practitioner?family=Osler", f"{base}/Practitioner/pr-osler"]


async def test_location_and_content_location_headers_are_rewritten(gw: GatewayUnderTest, fhir: FakeFhir) -> None:
    async def answer(request: web.Request) -> web.StreamResponse | None:
        if request.method == "PUT":
            return web.Response(
                status=200, body=orjson.dumps(OSLER), content_type=FHIR_JSON,
                headers={
                    "Location": f"{fhir.base_url}/Practitioner/pr-osler/_history/4",
                    "Content-Location": f"{fhir.base_url}/Practitioner/pr-osler/_history/4",
                },
            )
        return None

    fhir.override = answer
    status, _, headers, _ = await send(
        gw, "PUT", "/fhir/Practitioner/pr-osler", headers={"Content-Type": FHIR_JSON, "Host": "gw.example:8080"},
        data=orjson.dumps(OSLER),
    )
    assert status == 200
    assert headers["Location"] == "http://gw.example:8080/fhir/Practitioner/pr-osler/_history/4"
    assert headers["Content-Location"] == "http://gw.example:8080/fhir/Practitioner/pr-osler/_history/4"


async def test_following_next_stays_behind_the_gateway(gw: GatewayUnderTest, fhir: FakeFhir) -> None:
    async def paged(request: web.Request) -> web.StreamResponse | None:
        if request.path == "/fhir/Practitioner" or request.query.get("_getpages"):
            page = 2 if request.query.get("_getpages") else 1
            bundle = {
                "resourceType": "Bundle", "type": "searchset",
                "link": [
                    {"relation": "self", "url": f"{fhir.base_url}/Practitioner?family=Osler"},
                    {"relation": "next", "url": f"{fhir.base_url}?_getpages=b7c1&_getpagesoffset={page * 20}"},
                ],
                "entry": [{"fullUrl": f"{fhir.base_url}/Practitioner/pr-osler", "resource": OSLER,
                           "search": {"mode": "match"}}],
            }
            return web.Response(body=orjson.dumps(bundle), content_type=FHIR_JSON)
        return None

    fhir.override = paged
    status, _, _, body = await send(gw, "GET", "/fhir/Practitioner?family=Osler", headers={"Host": "gw.example"})
    assert status == 200
    next_url = next(link["url"] for link in orjson.loads(body)["link"] if link["relation"] == "next")
    assert is_sealed(next_url) and next_url.startswith("http://gw.example/fhir/?gateway-page=")
    assert inner(gw, next_url) == "http://gw.example/fhir?_getpages=b7c1&_getpagesoffset=20"
    status, _, _, body = await send(gw, "GET", next_url.removeprefix("http://gw.example"), headers={"Host": "gw.example"})
    assert status == 200
    assert forwarded(fhir, "/fhir?")[-1].path_qs == "/fhir?_getpages=b7c1&_getpagesoffset=20"
    assert host_port(fhir.base_url) not in body.decode()


async def test_urls_elsewhere_are_left_alone(gw: GatewayUnderTest, fhir: FakeFhir) -> None:
    other = "http://terminology.example.org/fhir/ValueSet/diabetes"
    near_miss = fhir.base_url + "x/Practitioner/1"

    async def answer(request: web.Request) -> web.StreamResponse | None:
        if request.path.startswith("/fhir/Medication"):
            res = {**METFORMIN, "extension": [{"url": other, "valueUri": near_miss}]}
            return web.Response(body=orjson.dumps(res), content_type=FHIR_JSON, headers={"Location": other})
        return None

    fhir.override = answer
    status, _, headers, body = await send(gw, "GET", "/Medication/med-metformin")
    assert status == 200
    ext = orjson.loads(body)["extension"][0]
    assert (ext["url"], ext["valueUri"], headers["Location"]) == (other, near_miss, other)


# --- X-Request-Id -------------------------------------------------------------------------


@pytest.fixture
def access_log() -> Iterator[io.StringIO]:
    """JSON lines written by the ``gateway.access`` logger during the test."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonLogFormatter())
    logger = logging.getLogger("gateway.access")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield stream
    logger.removeHandler(handler)
    logger.setLevel(old_level)


def _log_entries(stream: io.StringIO) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


async def test_request_id_is_kept_forwarded_returned_and_logged(
    gw: GatewayUnderTest, fhir: FakeFhir, access_log: io.StringIO
) -> None:
    rid = "req-7f3a.42:ward_7"
    status, _, headers, _ = await send(gw, "GET", "/Practitioner/pr-osler", headers={"X-Request-Id": rid})
    assert status == 200
    assert headers["X-Request-Id"] == rid
    assert lower_keys(forwarded(fhir, "/fhir/Practitioner")[-1].headers)["x-request-id"] == rid
    entries = [e for e in _log_entries(access_log) if e.get("request_id") == rid]
    assert len(entries) == 1
    entry = entries[0]
    assert (entry["logger"], entry["method"], entry["status"], entry["interaction"]) == (
        "gateway.access", "GET", 200, "read"
    )
    assert "pr-osler" not in access_log.getvalue()


@pytest.mark.parametrize(
    "given", [None, "", "two words", "a" * 129, "<script>alert(1)</script>", "id\u00e9"],
    ids=["absent", "empty", "space", "too-long", "markup", "non-ascii"],
)
async def test_request_id_is_made_when_absent_or_malformed(
    gw: GatewayUnderTest, fhir: FakeFhir, access_log: io.StringIO, given: str | None
) -> None:
    headers = {} if given is None else {"X-Request-Id": given}
    status, _, answer, _ = await send(gw, "GET", "/Practitioner/pr-osler", headers=headers)
    assert status == 200
    made = answer["X-Request-Id"]
    assert made != given and re.fullmatch(r"[A-Za-z0-9._:\-]{8,128}", made)
    assert lower_keys(forwarded(fhir, "/fhir/Practitioner")[-1].headers)["x-request-id"] == made
    assert [e["request_id"] for e in _log_entries(access_log)] == [made]


async def test_request_ids_differ_per_request(gw: GatewayUnderTest) -> None:
    ids = {(await send(gw, "GET", "/Practitioner/pr-osler"))[2]["X-Request-Id"] for _ in range(3)}
    assert len(ids) == 3


async def test_upstream_request_id_does_not_replace_ours(gw: GatewayUnderTest, fhir: FakeFhir) -> None:
    async def answer(request: web.Request) -> web.StreamResponse | None:
        return web.Response(body=orjson.dumps(OSLER), content_type=FHIR_JSON, headers={"X-Request-Id": "upstream-own"})

    fhir.override = answer
    _, _, headers, _ = await send(gw, "GET", "/Practitioner/pr-osler", headers={"X-Request-Id": "client-1"})
    assert headers["X-Request-Id"] == "client-1"


async def test_error_answers_carry_and_log_the_request_id(gw: GatewayUnderTest, access_log: io.StringIO) -> None:
    status, _, headers, _ = await send(gw, "GET", "/Practitioner/pr-osler", actor=None, headers={"X-Request-Id": "req-401"})
    assert status == 401 and headers["X-Request-Id"] == "req-401"
    entries = [e for e in _log_entries(access_log) if e.get("request_id") == "req-401"]
    assert [e["status"] for e in entries] == [401]


def test_a_made_request_id_is_a_random_uuid4_in_hex() -> None:
    made = [fresh_request_id() for _ in range(700)]  # more than two pools of random bytes
    assert len(set(made)) == 700
    for value in made:
        parsed = uuid.UUID(hex=value)
        assert (len(value), parsed.hex, parsed.version, parsed.variant) == (32, value, 4, uuid.RFC_4122)


def test_an_audit_event_id_is_a_random_uuid4_in_its_canonical_form() -> None:
    made = [fresh_uuid() for _ in range(700)]
    assert len(set(made)) == 700
    for value in made:
        parsed = uuid.UUID(value)
        assert (str(parsed), parsed.version, parsed.variant) == (value, 4, uuid.RFC_4122)


@pytest.mark.parametrize("method", ["GET", "POST", "DELETE"])
@pytest.mark.parametrize("path", [
    "/fhir/Observation/obs-1", "/fhir/Observation", "/Patient/p1/$everything", "/fhir/Consent/c1/_history/2",
    "/fhir", "/metadata", "/fhir/%24graphql", "/fhir/Observation/_search",
])
def test_a_remembered_route_is_the_route_parsed_afresh(method: str, path: str) -> None:
    first = request_module.parse_route(method, f"{path}?patient=p1", "/fhir")
    again = request_module.parse_route(method, f"{path}?patient=p2&_count=5", "/fhir")
    fresh = request_module._route_of(method, path, "/fhir")
    assert first == again == fresh
    assert request_module.parse_route(method, path, "") == request_module._route_of(method, path, "")


def test_routes_of_long_paths_are_not_remembered_and_bad_paths_refused_each_time() -> None:
    long_path = "/fhir/Observation/" + "a" * 300
    before = request_module._remembered_route.cache_info().currsize
    assert request_module.parse_route("GET", long_path, "/fhir").resource_type == "Observation"
    assert request_module._remembered_route.cache_info().currsize == before
    for _ in range(2):
        with pytest.raises(BadRequest):
            request_module.parse_route("GET", "/fhir/Consent;x/1", "/fhir")


async def test_repeated_headers_pass_each_leg_every_value_filtered_or_rewritten(fhir: FakeFhir, make_gateway: MakeGateway) -> None:
    gw = await make_gateway(fhir.base_url, upstream={"passed_response_headers": ["X-Upstream-Note"]})
    seen: list[CIMultiDict[str]] = []

    async def answer(request: web.Request) -> web.StreamResponse | None:
        if request.path != "/fhir/Practitioner":
            return None
        seen.append(CIMultiDict(request.headers))
        page = {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": OSLER}], "link": [
            {"relation": "next", "url": f"{fhir.base_url}/Practitioner?page=2"},
            {"relation": "prev", "url": f"{fhir.base_url}/Practitioner?page=1"}]}
        return web.Response(body=orjson.dumps(page), content_type=FHIR_JSON, headers=CIMultiDict([
            ("Link", f'<{fhir.base_url}/Practitioner?page=2>; rel="next"'),
            ("Link", f'<{fhir.base_url}/Practitioner?page=1>; rel="prev"'),
            ("Server", "upstream-one"), ("Server", "upstream-two"),
            ("X-Upstream-Note", "a"), ("X-Upstream-Note", "b"),
        ]))

    fhir.override = answer
    sent = CIMultiDict([
        ("X-Actor", DOC), ("Accept", "application/json"), ("Accept", "application/fhir+json"),
        ("If-None-Match", 'W/"1"'), ("If-None-Match", 'W/"2"'), ("X-Note", "c"), ("X-Note", "d"),
    ])
    async with gw.session.get(gw.url + "/Practitioner?name=osler", headers=sent) as resp:
        status, headers = resp.status, resp.headers
        await resp.read()
    assert status == 200
    (got,) = seen
    assert (got.getall("Accept"), got.getall("X-Note"), "If-None-Match" in got) == ([FHIR_JSON], ["c", "d"], False)
    # Neither of the server's Link headers passes (its paging parameters count what was
    # withheld); the Bundle's links are sealed (web.pages) and not repeated in a header.
    assert headers.getall("Link", []) == []
    assert "upstream-" not in " ".join(headers.getall("Server", []))
    assert headers.getall("X-Upstream-Note") == ["a", "b"]


async def test_a_remembered_identity_is_the_identity_of_those_very_headers(gw: GatewayUnderTest) -> None:
    from gateway.web import identity

    first = identity._header_identity("Practitioner/doc-1", "Organization/org-stmary", "PRCP")
    assert identity._header_identity("Practitioner/doc-1", "Organization/org-stmary", "PRCP") is first
    assert first.actor == Actor("Practitioner/doc-1", organization="Organization/org-stmary", role="PRCP")
    assert identity._header_identity("Practitioner/doc-1", None, None).actor == Actor("Practitioner/doc-1")
    assert identity._header_identity("Practitioner/doc-2", "Organization/org-stmary", "PRCP").actor.reference == \
        "Practitioner/doc-2"
    for _ in range(2):  # a refusal is never remembered as an identity
        with pytest.raises(BadRequest):
            identity._header_identity("Practitioner/doc-1", None, "not a role")
        status, _, _, _ = await send(gw, "GET", "/Practitioner/pr-osler", headers={"X-Actor-Role": "not a role"})
        assert status == 400
    before = identity._header_identity.cache_info().currsize
    padded = make_mocked_request("GET", "/Practitioner/pr-osler", headers={"X-Actor": "Practitioner/doc-9" + " " * 600})
    found = await identity.identify(padded, gw.state)
    assert found.actor == Actor("Practitioner/doc-9") and identity._header_identity.cache_info().currsize == before


@pytest.mark.parametrize(("forwarded", "expected"), [
    ({}, "http://gw.example.test/fhir"),
    ({"X-Forwarded-Host": "ehr.example.org"}, "http://ehr.example.org/fhir"),
    ({"X-Forwarded-Proto": "HTTPS, http", "X-Forwarded-Host": "ehr.example.org:8443, inner"}, "https://ehr.example.org:8443/fhir"),
    ({"X-Forwarded-Proto": "gopher"}, "http://gw.example.test/fhir"),
    ({"X-Forwarded-Host": "evil.example/x"}, "http://localhost/fhir"),
])
async def test_a_remembered_public_base_follows_each_requests_headers(
    gw: GatewayUnderTest, forwarded: dict[str, str], expected: str
) -> None:
    from gateway.web.proxy import public_base

    route = request_module.parse_route("GET", "/fhir/Observation/obs-1", "/fhir")
    for _ in range(2):
        request = make_mocked_request("GET", "/fhir/Observation/obs-1", headers={"Host": "gw.example.test", **forwarded})
        assert public_base(request, gw.state, route) == expected


async def test_long_hosts_are_not_remembered(gw: GatewayUnderTest) -> None:
    from gateway.web import proxy

    route = request_module.parse_route("GET", "/Observation/obs-1", "")
    before = proxy._public_base.cache_info().currsize
    host = "h" * 600 + ".example.org"
    request = make_mocked_request("GET", "/Observation/obs-1", headers={"Host": "gw.example.test", "X-Forwarded-Host": host})
    assert proxy.public_base(request, gw.state, route) == f"http://{host}"
    assert proxy._public_base.cache_info().currsize == before


def test_a_forked_process_makes_request_ids_of_its_own() -> None:
    fresh_request_id()  # the pool holds bytes a child would otherwise share
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through the pipe
        try:
            os.write(write, " ".join(fresh_request_id() for _ in range(4)).encode())
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(child, 0)
    with os.fdopen(read) as pipe:
        theirs = set(pipe.read().split())
    ours = {fresh_request_id() for _ in range(4)}
    assert len(theirs) == 4 and not theirs & ours
