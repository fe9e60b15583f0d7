"""Against the real FHIR engine: an old version of a PractitionerRole in a batch's answer does
not decide the record that names the role now.

Dora's consent opens her records except what Dr Ferreira wrote. The role a migraine was
recorded through was Dr Okafor's a year ago (version 1) and is Dr Ferreira's now (version 2).
A batch that asks for the role's history (or its first version) beside the migraine gets an
answer holding the old role: the migraine must stay hidden all the same.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
import pytest

from tests.conftest import GatewayUnderTest
from tests.hidden import hidden_in
from tests.integration.engine import Engine
from tests.integration.test_role_authors_and_ingredients_engine import FERREIRA, NOTE, RESOURCES, _batch, _condition, raw
from tests.integration.test_side_doors_engine import engine_put

pytestmark = pytest.mark.integration
ROLE = "role-red7-shifted"
RECORD = _condition("cond-red7-shifted", f"PractitionerRole/{ROLE}", note=NOTE)
HIDDEN = (RECORD["id"], "Hemiplegic", "neurology")


@pytest.fixture
async def gw(fhir_engine: Engine, make_gateway: Callable[..., Any]) -> GatewayUnderTest:
    for resource in RESOURCES:
        await engine_put(fhir_engine, resource)
    await engine_put(fhir_engine, {"resourceType": "PractitionerRole", "id": ROLE,
                                   "practitioner": {"reference": "Practitioner/dr-hop-other"}})
    await engine_put(fhir_engine, {"resourceType": "PractitionerRole", "id": ROLE, "practitioner": {"reference": FERREIRA}})
    await engine_put(fhir_engine, RECORD)
    gut: GatewayUnderTest = await make_gateway(fhir_engine.base_url)
    return gut


async def first_version(engine: Engine) -> str:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{engine.base_url}/PractitionerRole/{ROLE}/_history") as resp:
            history = orjson.loads(await resp.read())
    versions = [e["resource"] for e in history["entry"]]
    old = [v for v in versions if v["practitioner"]["reference"] != FERREIRA]
    assert len(versions) >= 2 and old, history
    return str(old[0]["meta"]["versionId"])


async def test_an_old_version_of_the_role_does_not_open_what_the_doctor_wrote(
    gw: GatewayUnderTest, fhir_engine: Engine,
) -> None:
    status, body = await raw(gw, "GET", f"/Condition/{RECORD['id']}")
    assert status == 403 and hidden_in(body, HIDDEN) == [], body[:300]
    version = await first_version(fhir_engine)
    for asked in (f"PractitionerRole/{ROLE}/_history", f"PractitionerRole/{ROLE}/_history/{version}"):
        status, body = await raw(gw, "POST", "/", _batch(asked, f"Condition/{RECORD['id']}"))
        assert status == 200, body[:300]
        slots = orjson.loads(body)["entry"]
        assert slots[0]["response"]["status"].startswith("200"), (asked, slots[0])  # the role is no secret
        assert slots[1]["response"]["status"].startswith("403") and "resource" not in slots[1], (asked, slots[1])
        assert hidden_in(body, HIDDEN) == [], (asked, body[:300])
