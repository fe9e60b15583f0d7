"""The FHIR server's own response headers tell nothing of the records the gateway withholds.

A server, or a facade in front of it, writes what it likes in its answer's headers: the ids it
matched (``X-Resource-Ids``, ``X-Matched-Ids``, ``X-Last-Id``), a search warning naming the
record it filtered, a debug header echoing the SQL it ran, a ``Warning``, a download's file
name, a cookie, a ``Link`` to a related record, the search's ``Content-Location``. The gateway
passed every one of them but hop-by-hop and recomputed ones (a deny-list): each test below
read the hidden record's id in the raw answer. An answer now passes only the headers the
gateway knows say nothing of records (``core.answer_headers``): for a read, a search, a batch,
an operation and error answers, the raw bytes on the wire (headers and body, every
occurrence of a header given twice or in another casing) hold no hidden id.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from aiohttp import web
from multidict import CIMultiDict

from tests.fakes import FakeFhir
from tests.fixtures import clinical as c
from tests.hidden import hidden_in
from tests.leak.test_side_doors import MakeGateway, routes, world
from tests.unit._util import raw_http, split_http

__all__ = ["world"]  # fixtures

HIV_ID = c.HIV_CONDITION["id"]
HIV_REF = f"Condition/{HIV_ID}"
HTN_ID = c.ANA_HYPERTENSION["id"]
PUBLIC = "http://gw.example.test"  # the Host of every request below
SECRETS = (HIV_ID, "B20", "HIV", "86406008", "Human immunodeficiency", "SELECT")


def leaky_headers(base: str, *, bundle: bool) -> CIMultiDict[str]:
    """What servers and facades write in an answer's headers, each naming the hidden record."""
    headers = CIMultiDict([
        ("Content-Type", f'application/fhir+json; charset=utf-8; x-source="{HIV_REF}"'),
        ("X-Resource-Ids", f"{HIV_REF},Condition/{HTN_ID}"),
        ("X-Matched-Ids", HIV_REF), ("x-MATCHED-ids", HIV_REF),  # twice, in another casing
        ("X-Search-Warnings", f"{HIV_REF} filtered"),
        ("X-Last-Id", HIV_ID), ("X-Cursor", f"after:{HIV_ID}"), ("X-Progress", f"2/2 {HIV_REF}"),
        ("X-Debug-Query", f"SELECT res_text FROM hfj_resource WHERE res_id = '{HIV_ID}'"),
        ("X-Request-Duration", f"12ms {HIV_REF}"),
        ("Warning", f'299 fhir "{HIV_REF} holds restricted data"'),
        ("Content-Disposition", f'attachment; filename="{HIV_ID}.json"'),
        ("Set-Cookie", f"last-read={HIV_ID}; Path=/"),
        ("Link", f'<{base}/{HIV_REF}>; rel="related"'),
        ("Link", f'<{base}/Condition?_getpagesoffset=2>; rel="next"; title="{HIV_REF}"'),
        ("Connection", "keep-alive, X-Hop-Note"), ("X-Hop-Note", HIV_REF),
        ("X-Consent-Decision", f"permit {HIV_REF}"), ("X-Break-Glass-Audit-Id", HIV_ID),
        ("Cache-Control", "no-store"), ("Vary", "Accept"),
    ])
    if bundle:
        # A Bundle's Content-Location (the search as the server ran it) and tags name its matches.
        headers.add("Content-Location", f"{base}/{HIV_REF}")
        headers.add("Location", f"{base}/{HIV_REF}/_history/1")
        headers.add("ETag", f'W/"{HIV_ID}"')
    return headers


def answer(data: Any, headers: CIMultiDict[str], status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, headers=headers)


async def on_the_wire(gw: Any, method: str, path: str, body: Any = None, actor: str = c.DOCTOR) -> bytes:
    """The gateway's whole raw answer, as bytes: every header line, every occurrence."""
    data = b"" if body is None else orjson.dumps(body)
    head = (f"{method} {path} HTTP/1.1\r\nHost: {PUBLIC[7:]}\r\nX-Actor: {actor}\r\nConnection: close\r\n"
            f"Content-Length: {len(data)}\r\n")
    if body is not None:
        head += "Content-Type: application/fhir+json\r\n"
    return await raw_http(gw.running.proxy_port, head.encode() + b"\r\n" + data)


def kept(wire: bytes) -> dict[str, str]:
    return split_http(wire)[1]


@pytest.mark.parametrize("status", [403, 404])
async def test_a_read_passes_no_header_naming_a_hidden_record(
    world: FakeFhir, make_gateway: MakeGateway, status: int,
) -> None:
    """A released record's read keeps its own ETag, Last-Modified and Content-Location (rewritten)
    and the caching headers; nothing else the server wrote."""
    headers = leaky_headers(world.base_url, bundle=False)
    headers.add("ETag", 'W/"3"')
    headers.add("Content-Location", f"{world.base_url}/Condition/{HTN_ID}/_history/3")
    world.override = routes({("GET", f"/Condition/{HTN_ID}"): lambda r: answer(c.ANA_HYPERTENSION, headers)})
    gw = await make_gateway(world.base_url, enforcement={"denied_read_status": status})
    wire = await on_the_wire(gw, "GET", f"/Condition/{HTN_ID}")
    assert wire.startswith(b"HTTP/1.1 200"), wire[:300]
    assert hidden_in(wire, SECRETS) == [], wire.split(b"\r\n\r\n")[0]
    got = kept(wire)
    assert got["etag"] == 'W/"3"' and got["cache-control"] == "no-store" and got["vary"] == "Accept"
    assert got["content-location"] == f"{PUBLIC}/Condition/{HTN_ID}/_history/3"
    assert got["content-type"] == "application/fhir+json; charset=utf-8"
    assert got["x-consent-decision"] == "permit"
    assert "set-cookie" not in got and "link" not in got and "x-break-glass-audit-id" not in got


@pytest.mark.parametrize("status", [403, 404])
async def test_a_search_passes_no_header_naming_what_it_withheld(
    world: FakeFhir, make_gateway: MakeGateway, status: int,
) -> None:
    """The server's Link header goes: its ``next`` names its own offset, its title a record (the
    Bundle's own links are sealed and not repeated in a header); the Bundle's Location,
    Content-Location and ETag, which describe the server's whole answer, go."""
    def search(request: web.Request) -> web.Response:
        page = c.bundle([c.HIV_CONDITION, c.ANA_HYPERTENSION], world.base_url, self_url=str(request.url))
        return answer(page, leaky_headers(world.base_url, bundle=True))

    world.override = routes({("GET", "/Condition"): search})
    gw = await make_gateway(world.base_url, enforcement={"denied_read_status": status})
    wire = await on_the_wire(gw, "GET", f"/Condition?patient={c.PAT_ANA}")
    assert wire.startswith(b"HTTP/1.1 200"), wire[:300]
    assert hidden_in(wire, SECRETS) == [], wire.split(b"\r\n\r\n")[0]
    got = kept(wire)
    for name in ("link", "content-location", "location", "etag", "x-matched-ids", "x-resource-ids", "warning"):
        assert name not in got, name


async def test_a_batch_passes_no_header_naming_a_withheld_entry(world: FakeFhir, make_gateway: MakeGateway) -> None:
    def batch(request: web.Request) -> web.Response:
        slots = [{"resource": r, "response": {"status": "200 OK"}} for r in (c.HIV_CONDITION, c.ANA_HYPERTENSION)]
        return answer({"resourceType": "Bundle", "type": "batch-response", "entry": slots},
                      leaky_headers(world.base_url, bundle=True))

    world.override = routes({("POST", "/"): batch})
    gw = await make_gateway(world.base_url)
    wire = await on_the_wire(gw, "POST", "/", body={"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": HIV_REF}}, {"request": {"method": "GET", "url": f"Condition/{HTN_ID}"}},
    ]})
    assert wire.startswith(b"HTTP/1.1 200"), wire[:300]
    assert hidden_in(wire, SECRETS) == [], wire.split(b"\r\n\r\n")[0]
    assert HTN_ID.encode() in wire.split(b"\r\n\r\n", 1)[1]


async def test_an_operation_passes_no_header_naming_a_withheld_record(world: FakeFhir, make_gateway: MakeGateway) -> None:
    def everything(request: web.Request) -> web.Response:
        page = c.bundle([c.ANA, c.HIV_CONDITION, c.ANA_HYPERTENSION], world.base_url)
        return answer(page, leaky_headers(world.base_url, bundle=True))

    ana = c.PAT_ANA.split("/", 1)[1]
    world.override = routes({("GET", f"/Patient/{ana}/$everything"): everything})
    gw = await make_gateway(world.base_url, enforcement={"denied_read_status": 404})
    wire = await on_the_wire(gw, "GET", f"/Patient/{ana}/$everything")
    assert wire.startswith(b"HTTP/1.1 200"), wire[:300]
    assert hidden_in(wire, SECRETS) == [], wire.split(b"\r\n\r\n")[0]
    assert HTN_ID.encode() in wire.split(b"\r\n\r\n", 1)[1]


@pytest.mark.parametrize("method,path,status", [
    ("GET", f"/Condition?patient={c.PAT_ANA}", 500),
    ("GET", f"/Condition/{HTN_ID}", 503),
    ("PUT", f"/Condition/{HTN_ID}", 409),
    ("GET", f"/Condition?patient={c.PAT_ANA}&code=I10", 400),
    ("GET", f"/Condition?patient={c.PAT_ANA}&code=B20", 403),
], ids=["search-500", "read-503", "update-409", "search-400", "search-403"])
async def test_an_error_answer_passes_no_header_naming_a_hidden_record(
    world: FakeFhir, make_gateway: MakeGateway, method: str, path: str, status: int,
) -> None:
    """An error carries no record: not even a Location or ETag (a 409's current version, a
    412's), nor a challenge's free text but on a 401, only what says how to retry."""
    outcome = {"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": "conflict", "diagnostics": f"{HIV_REF} conflicts"}]}

    def failing(request: web.Request) -> web.Response:
        headers = leaky_headers(world.base_url, bundle=True)
        headers.add("Retry-After", "5")
        headers.add("WWW-Authenticate", f'Bearer error="insufficient_scope", error_description="{HIV_REF}"')
        return answer(outcome, headers, status)

    world.override = routes({(method, path.split("?")[0]): failing})
    gw = await make_gateway(world.base_url)
    wire = await on_the_wire(gw, method, path, body=c.ANA_HYPERTENSION if method == "PUT" else None)
    assert wire.startswith(f"HTTP/1.1 {status}".encode()), wire[:300]
    assert hidden_in(wire, SECRETS) == [], wire.split(b"\r\n\r\n")[0]
    got = kept(wire)
    assert got["retry-after"] == "5" and got["x-consent-decision"] == "deny"
    assert "link" not in got and "content-location" not in got and "location" not in got and "etag" not in got
