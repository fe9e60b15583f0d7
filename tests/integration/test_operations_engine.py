"""Operations against the real FHIR engine, through fhirpy: an allow-list (core.operations).

Bob's consent (gateway/demo/seed.json) gives Dr GP a general permit that does not open his HIV
and opioid-use records. An operation the gateway knows runs at the engine (``$validate``, by
Medplum's validator, on what Dr GP may read); one nobody listed is refused before it is sent,
however it is spelt.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson
import pytest
from fhirpy.base.exceptions import ForbiddenError

from tests.conftest import GatewayUnderTest
from tests.integration.engine import Engine
from tests.integration.test_gateway_engine import BOB_HIDDEN, GP, gw  # noqa: F401 - the fixture
from tests.integration.test_side_doors_engine import fhir_client, leaks, post

pytestmark = pytest.mark.integration


async def engine_read(engine: Engine, reference: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{engine.base_url}/{reference}") as resp:
            assert resp.status == 200, reference
            found: dict[str, Any] = await resp.json(content_type=None)
            return found


async def test_validate_runs_at_the_engine_on_what_may_be_read(fhir_engine: Engine, gw: GatewayUnderTest) -> None:  # noqa: F811
    """Type and instance ``$validate`` reach Medplum's validator; an instance Dr GP may not read
    is refused before it is sent, and nothing of it comes back."""
    fhir = fhir_client(gw, GP)
    readable = await engine_read(fhir_engine, "Observation/bob-cbc")
    params = {"resourceType": "Parameters", "parameter": [{"name": "resource", "resource": readable}]}
    answer = await fhir.reference("Observation", "bob-cbc").execute("$validate", method="post", data=params)
    assert answer["resourceType"] == "OperationOutcome"
    assert answer["issue"][0]["severity"] == "information", answer
    broken = {**readable, "code": "58410-2"}  # a CodeableConcept given as a string
    answer = await fhir.execute("Observation/$validate", method="post", data=broken)
    assert any(i["severity"] == "error" for i in answer["issue"]), answer
    status, raw = await post(gw, "/Observation/bob-hiv-test/$validate", orjson.dumps(params))
    assert status == 403 and leaks(raw) == [], raw


@pytest.mark.parametrize("path", [
    "Condition/$summary-stats", "Condition/$SUMMARY-STATS", "Condition/%24summary-stats", "$count",
    "Patient/pat-bob/$care-summary",
])
async def test_an_operation_nobody_listed_is_refused_before_the_engine(
    fhir_engine: Engine, gw: GatewayUnderTest, path: str,  # noqa: F811
) -> None:
    """The engine answers an operation it does not run with 501; the gateway refuses it first
    (403), alone and as a batch entry."""
    fhir = fhir_client(gw, GP)
    with pytest.raises(ForbiddenError) as refused:
        await fhir.execute(path, method="get", params={"patient": "Patient/pat-bob", "code": "B20"})
    assert '"forbidden"' in str(refused.value) and leaks(str(refused.value).encode()) == []
    bundle = {"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": f"{path}?patient=Patient/pat-bob"}},
        {"request": {"method": "GET", "url": "Observation/bob-cbc"}}]}
    status, raw = await post(gw, "/", orjson.dumps(bundle))
    assert status == 200, raw
    refused_slot, kept = orjson.loads(raw)["entry"]
    assert refused_slot["response"]["status"].startswith("403"), refused_slot
    assert kept["resource"]["id"] == "bob-cbc"
    assert leaks(raw) == []
