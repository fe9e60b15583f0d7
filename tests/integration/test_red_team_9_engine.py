"""Red team 9 against the real FHIR engine, in 404 mode (``denied_read_status: 404``).

1. The engine creates a record on an update of an id it does not hold (update-as-create: 201),
   while the same update of Bob's HIV record, which Dr GP may not see, is answered 404: which
   ids are hidden could be told apart from which are missing. Through the gateway both are the
   same 404 and neither is sent.
2. Bob's problem was first recorded as fatigue (version 1, open to Dr GP) and is now coded as
   HIV disease (version 2, hidden). The engine keeps both versions: its history and its
   version 1 answered through the gateway, while the record itself read as missing. They now
   read as a missing record's, read through fhirpy too.

Tried against the engine and already closed: ``_format=xml`` (406 before it is sent), a
conditional update by a search that matches hidden records (refused before it is sent), type
history (refused).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
import pytest
from fhirpy.base.exceptions import ResourceNotFound

from tests.conftest import GatewayUnderTest
from tests.hidden import hidden_in
from tests.integration.engine import Engine
from tests.integration.test_gateway_engine import GP
from tests.integration.test_side_doors_engine import engine_put, fhir_client

pytestmark = pytest.mark.integration
FHIR_JSON = "application/fhir+json"
BOB = "Patient/pat-bob"
VARYING = {"date", "x-request-id", "content-length"}
SECRETS = ("B20", "Human immunodeficiency", "HIV", "Fatigue", "84229001")


def condition(rid: str, system: str, code: str, display: str) -> dict[str, Any]:
    return {
        "resourceType": "Condition", "id": rid, "subject": {"reference": BOB},
        "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                                       "code": "active"}]},
        "code": {"coding": [{"system": system, "code": code, "display": display}], "text": display},
        "onsetDateTime": "2024-02-10", "recorder": {"reference": "Practitioner/dr-gp"},
    }


HYPERTENSION = ("http://hl7.org/fhir/sid/icd-10-cm", "I10", "Essential (primary) hypertension")


async def answer(gw: GatewayUnderTest, method: str, path: str, body: Any = None) -> tuple[int, dict[str, str], bytes]:
    headers = {**GP, "Content-Type": FHIR_JSON} if body is not None else GP
    data = orjson.dumps(body) if body is not None else None
    async with gw.session.request(method, gw.url + path, headers=headers, data=data) as resp:
        return resp.status, {k.lower(): v for k, v in resp.headers.items() if k.lower() not in VARYING}, await resp.read()


async def engine_status(engine: Engine, method: str, path: str) -> int:
    async with aiohttp.ClientSession() as session:
        async with session.request(method, f"{engine.base_url}/{path}") as resp:
            return resp.status


@pytest.fixture
async def gw(fhir_engine: Engine, make_gateway: Callable[..., Any]) -> GatewayUnderTest:
    return await make_gateway(fhir_engine.base_url, enforcement={"denied_read_status": 404})  # type: ignore[no-any-return]


async def test_an_update_of_a_missing_id_answers_like_one_of_a_hidden_id(
    fhir_engine: Engine, gw: GatewayUnderTest,
) -> None:
    # The door: the engine itself creates on an update of an id it does not hold.
    await engine_put(fhir_engine, condition("bob-rt9-created", *HYPERTENSION))
    assert await engine_status(fhir_engine, "GET", "Condition/bob-rt9-created") == 200
    hidden = await answer(gw, "PUT", "/Condition/bob-hiv", condition("bob-hiv", *HYPERTENSION))
    missing = await answer(gw, "PUT", "/Condition/bob-rt9-never", condition("bob-rt9-never", *HYPERTENSION))
    assert hidden[0] == 404, hidden
    assert hidden == missing
    assert await engine_status(fhir_engine, "GET", "Condition/bob-rt9-never") == 404
    assert hidden_in(hidden[2] + repr(hidden[1]).encode(), SECRETS) == []
    # A record Dr GP may read is updated as before.
    status, _, body = await answer(gw, "PUT", "/Condition/bob-rt9-created", {
        **condition("bob-rt9-created", *HYPERTENSION), "onsetDateTime": "2024-03-01"})
    assert status == 200, body


async def test_old_versions_of_a_record_now_hidden_read_as_missing(
    fhir_engine: Engine, gw: GatewayUnderTest,
) -> None:
    await engine_put(fhir_engine, condition("bob-rt9-problem", "http://snomed.info/sct", "84229001", "Fatigue"))
    await engine_put(fhir_engine, condition(
        "bob-rt9-problem", "http://hl7.org/fhir/sid/icd-10-cm", "B20", "Human immunodeficiency virus [HIV] disease"))
    # The engine answers both versions (its version ids are its own).
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{fhir_engine.base_url}/Condition/bob-rt9-problem/_history") as resp:
            history = await resp.json(content_type=None)
    first = history["entry"][-1]["resource"]
    assert first["code"]["coding"][0]["code"] == "84229001" and len(history["entry"]) == 2
    version = first["meta"]["versionId"]
    assert await engine_status(fhir_engine, "GET", f"Condition/bob-rt9-problem/_history/{version}") == 200
    for path in ("Condition/{}/_history", "Condition/{}/_history/" + version, "Condition/{}"):
        hidden = await answer(gw, "GET", "/" + path.format("bob-rt9-problem"))
        missing = await answer(gw, "GET", "/" + path.format("bob-rt9-nothing"))
        assert hidden[0] == 404, (path, hidden)
        assert hidden == missing, path
        assert hidden_in(hidden[2], SECRETS) == []
    fhir = fhir_client(gw, GP)
    with pytest.raises(ResourceNotFound):
        await fhir.reference("Condition", "bob-rt9-problem").execute(f"_history/{version}", method="get")
    with pytest.raises(ResourceNotFound):
        await fhir.reference("Condition", "bob-rt9-problem").execute("_history", method="get")
