"""The demo's in-memory FHIR server keeps what the gateway's change feeds read: type histories
(updates and deletions, newest first, after ``_since``) and ``_lastUpdated=gt`` searches."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson

from gateway.demo.server import DemoFhirServer
from tests.conftest import serving


async def test_type_history_and_last_updated_list_what_changed_after_an_instant() -> None:
    server = DemoFhirServer()
    server.put({"resourceType": "CareTeam", "id": "t1", "status": "active"})
    server.put({"resourceType": "Consent", "id": "c1", "status": "active"})
    async with serving(server.app()) as root:
        async with aiohttp.ClientSession() as http:
            async def get(path: str) -> Any:
                async with http.get(f"{root}/fhir/{path}") as resp:
                    assert resp.status == 200, path
                    return orjson.loads(await resp.read())

            first = await get("CareTeam/_history?_count=1")
            stamp = first["entry"][0]["resource"]["meta"]["lastUpdated"]
            assert await get(f"CareTeam/_history?_since={stamp}") == {"resourceType": "Bundle", "type": "history", "entry": []}
            await asyncio.sleep(0.01)  # instants are to the millisecond
            server.put({"resourceType": "CareTeam", "id": "t1", "status": "inactive"})
            server.delete("CareTeam/t1")
            server.put({"resourceType": "Group", "id": "g1", "type": "person", "actual": True})
            changed = (await get(f"CareTeam/_history?_since={stamp}"))["entry"]
            assert [e["request"]["method"] for e in changed] == ["DELETE", "PUT"]
            assert changed[1]["resource"]["meta"]["versionId"] == "2"
            assert (await get(f"Consent?_lastUpdated=gt{stamp}"))["entry"] == []
            assert len((await get("Consent?_lastUpdated=gt2000-01-01T00:00:00.000Z"))["entry"]) == 1
