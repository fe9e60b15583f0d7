"""Red team 8: doors the earlier passes left untried.

1. A batch entry carries the conditional-read fields of ``Bundle.entry.request``
   (``ifNoneMatch``, ``ifModifiedSince``): a server that honours them answers a hidden record's
   slot "304 Not Modified" with no resource, which nothing decides, so the slot tells that the
   record exists and which version it is, where the request alone (whose ``If-None-Match``
   header is never forwarded) reads exactly like a missing record in 404 mode.

Each test searches the RAW response bytes and headers for the hidden ids, codes and texts.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from aiohttp import web

from tests.fakes import FakeFhir
from tests.fixtures import clinical as c
from tests.leak.test_side_doors import MakeGateway, batch, call, fhir, leaks, slots, world

__all__ = ["world"]  # fixtures

HIV_REF = f"Condition/{c.HIV_CONDITION['id']}"
MISSING_REF = "Condition/cond-nothing-here-000"
HTN_REF = f"Condition/{c.ANA_HYPERTENSION['id']}"


# ---------------------------------------------------------------- 1. conditional reads in a batch


def conditional_batches(fake: FakeFhir) -> Any:
    """A batch as a server that honours ``ifNoneMatch``/``ifModifiedSince`` answers it: an entry
    whose version matches (every stored record here is version 1, unchanged since 2020) is a 304
    without its resource, a missing record a 404, any other read the record."""

    async def override(request: web.Request) -> web.StreamResponse | None:
        if request.method != "POST" or request.path.rstrip("/") != "/fhir":
            return None
        bundle = orjson.loads(await request.read())
        out: list[dict[str, Any]] = []
        for entry in bundle["entry"]:
            asked = entry["request"]
            stored = fake.resources.get(asked["url"].split("?", 1)[0])
            if stored is None:
                out.append({"response": {"status": "404 Not Found"}})
            elif asked.get("ifNoneMatch") == 'W/"1"' or "ifModifiedSince" in asked:
                out.append({"response": {"status": "304 Not Modified", "etag": 'W/"1"',
                                         "lastModified": "2020-01-01T00:00:00Z"}})
            else:
                out.append({"resource": stored, "response": {"status": "200 OK", "etag": 'W/"1"'}})
        return fhir({"resourceType": "Bundle", "type": f"{bundle['type']}-response", "entry": out})

    return override


def conditional_read(url: str, field: str) -> dict[str, Any]:
    value = 'W/"1"' if field == "ifNoneMatch" else "2024-01-01T00:00:00Z"
    return {"request": {"method": "GET", "url": url, field: value}}


@pytest.mark.parametrize("field", ["ifNoneMatch", "ifModifiedSince"])
@pytest.mark.parametrize("status", [403, 404])
async def test_a_conditional_read_in_a_batch_tells_nothing_of_a_hidden_record(
    world: FakeFhir, make_gateway: MakeGateway, field: str, status: int,
) -> None:
    """The slot of Ana's hidden HIV record asked for conditionally reads like the slot of the
    same record asked for plainly: withheld (403), or exactly a missing record's (404 mode)."""
    world.override = conditional_batches(world)
    gateway = await make_gateway(world.base_url, enforcement={"denied_read_status": status})
    body_sent = {"resourceType": "Bundle", "type": "batch", "entry": [
        conditional_read(HIV_REF, field), conditional_read(MISSING_REF, field), {"request": {"method": "GET", "url": HIV_REF}},
        conditional_read(HTN_REF, field),
    ]}
    code, headers, body = await call(gateway, "POST", "/", body=body_sent)
    assert code == 200, body
    hidden, missing, plain, visible = slots(body)
    assert hidden == plain, hidden
    assert hidden["response"]["status"].startswith(str(status)) and "resource" not in hidden, hidden
    if status == 404:
        assert hidden == missing
    # A record the doctor may read is answered in full: the condition was not honoured for it either.
    assert visible["resource"]["id"] == c.ANA_HYPERTENSION["id"], visible
    assert leaks(body, headers, (c.HIV_CONDITION["id"], "B20", "HIV", "2020-01-01")) == []
