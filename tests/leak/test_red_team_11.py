"""Red team 11: read-side doors and encodings.

Scenario: a clinician (``c.DOCTOR``) holds Ana's general opt-in, which does not open her HIV
viral load (``VIRAL_LOAD``). Each test goes through the real request path (HTTP to the
gateway, the fake FHIR server on a real socket, answering as the server named does) and
searches the RAW response bytes and headers for the hidden id, codes and texts. The leak
conftest runs each test on both paths (answers parsed whole, and decided on views).

DOCSTRING-PLACEHOLDER
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl

import orjson
import pytest
from aiohttp import web

from tests.conftest import GatewayUnderTest
from tests.fakes import FakeFhir
from tests.fixtures import clinical as c
from tests.leak.test_side_doors import (
    FORM, VIRAL_LOAD, VL_REF, VL_SECRETS, Override, batch, call, entries, fhir, ids_in, leaks, sent_upstream, slots,
    world,
)

__all__ = ["world"]  # fixtures

CBC_REF = f"Observation/{c.ANA_CBC['id']}"
SECRETS = (*VL_SECRETS, "HIV-1", "viral load")


# ---------------------------------------------------------------- 1. Medplum's _fields


def _projected(resource: dict[str, Any], fields: str | None) -> dict[str, Any]:
    """What the server answers for a projection: the named elements only (codes gone)."""
    if not fields:
        return resource
    keep = {n.strip() for n in fields.split(",")} | {"resourceType", "id", "meta"}
    return {k: v for k, v in resource.items() if k in keep}


def _fields_of(pairs: list[tuple[str, str]]) -> str | None:
    # Medplum's search parser (@medplum/core) reads ``_fields`` exactly as ``_elements``.
    return next((v for k, v in pairs if k.split(":")[0] in ("_fields", "_elements")), None)


def _medplum_projection(fake: FakeFhir) -> Override:
    """Reads, searches and ``_search`` answered with ``_fields``/``_elements`` applied, as
    Medplum's server does."""

    async def override(request: web.Request) -> web.StreamResponse | None:
        parts = [p for p in request.path.removeprefix("/fhir").split("/") if p]
        pairs = list(request.query.items())
        if request.method == "POST" and parts[-1:] == ["_search"]:
            pairs += parse_qsl((await request.read()).decode(), keep_blank_values=True)
            parts = parts[:-1]
        fields = _fields_of(pairs)
        if request.method == "GET" and len(parts) == 2 and "/".join(parts) in fake.resources:
            return fhir(_projected(fake.resources["/".join(parts)], fields))
        if len(parts) == 1 and parts[0] == "Observation":
            found = [r for k, r in fake.resources.items() if k.startswith("Observation/")
                     and r.get("subject", {}).get("reference") == c.PAT_ANA]
            return fhir(c.bundle([_projected(r, fields) for r in found], fake.base_url))
        return None

    return override


FIELDS = "_fields=id,subject,valueQuantity,effectiveDateTime"


@pytest.mark.parametrize("door", ["read", "search", "form-search", "batch-read", "modifier"])
async def test_medplums_fields_projection_never_hides_the_code_that_decides(
    world: FakeFhir, gateway: GatewayUnderTest, door: str,
) -> None:
    world.override = _medplum_projection(world)
    if door == "read":
        status, headers, body = await call(gateway, "GET", f"/{VL_REF}?{FIELDS}")
        assert status == 403, body
    elif door == "search":
        status, headers, body = await call(gateway, "GET", f"/Observation?patient={c.PAT_ANA}&{FIELDS}")
        assert status == 200, body
        assert c.ANA_CBC["id"] in ids_in(body) and VIRAL_LOAD["id"] not in ids_in(body)
    elif door == "form-search":
        status, headers, body = await call(gateway, "POST", "/Observation/_search",
                                           body=f"patient={c.PAT_ANA}&{FIELDS}".encode(), **{"Content-Type": FORM})
        assert status == 200, body
        assert c.ANA_CBC["id"] in ids_in(body)
    elif door == "batch-read":
        status, headers, body = await call(gateway, "POST", "/", body=batch(
            ("GET", f"{VL_REF}?{FIELDS}"), ("GET", f"{CBC_REF}?{FIELDS}")))
        assert status == 200, body
        hidden, cbc = slots(body)
        assert hidden["response"]["status"].startswith("403") and "resource" not in hidden
        assert cbc["resource"]["id"] == c.ANA_CBC["id"]
    else:
        status, headers, body = await call(gateway, "GET", f"/{VL_REF}?_fields:x=id,subject,valueQuantity")
        assert status == 403, body
    assert leaks(body, headers, SECRETS) == []
    assert not any("_fields" in s for s in sent_upstream(world)), sent_upstream(world)


async def test_fields_still_projects_what_is_released(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    """The client asked for a projection: the gateway applies it after deciding, as for ``_elements``."""
    world.override = _medplum_projection(world)
    status, _, body = await call(gateway, "GET", f"/{CBC_REF}?_fields=id,subject")
    assert status == 200, body
    cbc = orjson.loads(body)
    assert cbc["id"] == c.ANA_CBC["id"] and "subject" in cbc and "code" not in cbc and "valueQuantity" not in cbc
    assert any(t.get("code") == "SUBSETTED" for t in cbc["meta"].get("tag", []))
