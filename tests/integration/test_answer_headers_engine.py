"""The response-header allow-list in front of the real FHIR engine, driven by fhirpy.

The engine's front (tests/upstream/server.mjs, on Node's HTTP server) writes ``Content-Type``
with a charset, ``ETag`` and ``Last-Modified`` on a resource, ``Location`` on a write, and Node's
``Connection``/``Keep-Alive``. Through the gateway a client's whole flow still works (create,
read, update, search, delete), a read keeps its ETag and Last-Modified, a write its Location
(rewritten to the gateway), a search answer none of them, and nothing else of the server's
passes.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pytest

from tests.conftest import GatewayUnderTest
from tests.integration.engine import Engine
from tests.integration.test_gateway_engine import GP, client

pytestmark = pytest.mark.integration
BOB = "Patient/pat-bob"
# What an answer may carry: the allow-list, the gateway's own and what aiohttp writes.
ALLOWED = {
    "content-type", "cache-control", "pragma", "expires", "vary", "content-language", "preference-applied",
    "retry-after", "allow", "www-authenticate", "x-content-type-options", "etag", "last-modified", "location",
    "content-location", "link", "x-consent-decision", "x-request-id", "x-break-glass-audit-id",
    "date", "server", "content-length", "transfer-encoding",
}


@pytest.fixture
async def gw(fhir_engine: Engine, make_gateway: Callable[..., Any]) -> GatewayUnderTest:
    gut: GatewayUnderTest = await make_gateway(fhir_engine.base_url)
    return gut


def hypertension(rid: str) -> dict[str, Any]:
    return {
        "resourceType": "Condition", "id": rid, "subject": {"reference": BOB},
        "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "I10",
                             "display": "Essential (primary) hypertension"}]},
        "recorder": {"reference": "Practitioner/dr-gp"},
    }


async def headers_of(gw: GatewayUnderTest, method: str, path: str) -> dict[str, str]:
    async with gw.session.request(method, gw.url + path, headers=GP) as resp:
        await resp.read()
        assert resp.status == 200, (path, resp.status)
        headers = {k.lower(): v for k, v in resp.headers.items()}
    assert set(headers) <= ALLOWED, set(headers) - ALLOWED
    assert "keep-alive" not in headers
    return headers


async def test_a_client_flow_works_and_carries_only_allowed_headers(gw: GatewayUnderTest) -> None:
    fhir = client(gw, GP)
    rid = f"hdr-{uuid.uuid4().hex[:12]}"
    created = fhir.resource("Condition", **{k: v for k, v in hypertension(rid).items() if k != "id"})
    await created.save()
    assert created["id"]
    rid = created["id"]
    # The write's own headers: its Location, under the gateway's base.
    async with gw.session.put(f"{gw.url}/Condition/{rid}", json={**hypertension(rid), "onsetDateTime": "2024-03-01"},
                              headers={**GP, "Content-Type": "application/fhir+json"}) as resp:
        await resp.read()
        assert resp.status == 200
        assert resp.headers["Location"].startswith(f"{gw.url}/Condition/{rid}/_history/"), resp.headers
        assert resp.headers["ETag"].startswith('W/"')
    read = await fhir.reference("Condition", rid).to_resource()
    assert read["onsetDateTime"] == "2024-03-01"
    headers = await headers_of(gw, "GET", f"/Condition/{rid}")
    assert headers["etag"] == f'W/"{read["meta"]["versionId"]}"' and "last-modified" in headers
    assert headers["content-type"].startswith("application/fhir+json")
    found = await fhir.resources("Condition").search(subject=BOB, code="I10").fetch_all()
    assert rid in {r["id"] for r in found}
    headers = await headers_of(gw, "GET", f"/Condition?subject={BOB}")
    assert "etag" not in headers and "last-modified" not in headers and "location" not in headers
    await read.delete()
    async with gw.session.get(f"{gw.url}/Condition/{rid}", headers=GP) as resp:
        assert resp.status in (404, 410)
