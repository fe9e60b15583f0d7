"""Red team 13 against the real FHIR engine: a patient's conditional create, in 404 mode.

Mr Normal (``pat-normal``, self access) may create his records "if none exists". The engine runs
``If-None-Exist`` itself: one match answers 200 and creates nothing, none creates (201). His
record that Ms Oud asserted is hers too, and she opted out: he does not read it. Before this pass
the engine found it and answered 200 where a missing identifier gives 201, so he learnt that a
hidden record of his holds that identifier. Through the gateway both now create (201).
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
from tests.integration.test_side_doors_engine import engine_put, fhir_client

pytestmark = pytest.mark.integration
FHIR_JSON = "application/fhir+json"
NORMAL = "Patient/pat-normal"
SYSTEM = "urn:oid:2.16.840.1.113883.19.5.13"
JOINT = {
    "resourceType": "Condition", "id": "normal-rt13-joint", "subject": {"reference": NORMAL},
    "asserter": {"reference": "Patient/pat-oud"}, "identifier": [{"system": SYSTEM, "value": "rt13-asserted"}],
    "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "I10",
                         "display": "Essential (primary) hypertension"}]},
    "note": [{"text": "Told by Ms Oud at the neighbours' visit"}],
}
SECRETS = ("normal-rt13-joint", "Ms Oud", "neighbours")


def new_condition(value: str) -> dict[str, Any]:
    return {"resourceType": "Condition", "subject": {"reference": NORMAL}, "identifier": [{"system": SYSTEM, "value": value}],
            "code": JOINT["code"]}


async def create(base: str, value: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{base}/Condition", data=orjson.dumps(new_condition(value)), headers={
                "Content-Type": FHIR_JSON, "If-None-Exist": f"patient={NORMAL}&identifier={SYSTEM}|{value}", **headers}) as resp:
            return resp.status, dict(resp.headers), await resp.read()


async def test_404_mode_a_conditional_create_over_a_hidden_match_answers_as_over_none(
    fhir_engine: Engine, make_gateway: Callable[..., Any],
) -> None:
    await engine_put(fhir_engine, JOINT)
    # The door: the engine answers the condition with the record it found, creating nothing.
    status, _, body = await create(fhir_engine.base_url, "rt13-asserted", {})
    assert status == 200 and b"normal-rt13-joint" in body, body
    gw: GatewayUnderTest = await make_gateway(fhir_engine.base_url, enforcement={"denied_read_status": 404})
    me = {"X-Actor": NORMAL}
    hidden = await create(gw.url, "rt13-asserted", me)
    missing = await create(gw.url, "rt13-never-written", me)
    assert hidden[0] == missing[0] == 201, (hidden, missing)
    assert sorted(k for k in hidden[1] if k not in ("Date", "X-Request-ID", "Content-Length", "Location", "ETag", "Last-Modified")) \
        == sorted(k for k in missing[1] if k not in ("Date", "X-Request-ID", "Content-Length", "Location", "ETag", "Last-Modified"))
    assert hidden_in(hidden[2].decode() + repr(hidden[1]), SECRETS) == []
    # What he created he reads (fhirpy); the hidden one stays hidden.
    client = fhir_client(gw, me)
    mine = await client.resources("Condition").search(identifier=f"{SYSTEM}|rt13-asserted").fetch_all()
    assert [r["id"] for r in mine] == [orjson.loads(hidden[2])["id"]]


async def test_403_mode_the_conditional_create_is_refused_and_not_sent(
    fhir_engine: Engine, make_gateway: Callable[..., Any],
) -> None:
    await engine_put(fhir_engine, JOINT)
    gw: GatewayUnderTest = await make_gateway(fhir_engine.base_url)
    status, headers, body = await create(gw.url, "rt13-asserted", {"X-Actor": NORMAL})
    assert status == 403, body
    assert hidden_in(body.decode() + repr(headers), SECRETS) == []
