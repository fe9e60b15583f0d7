from __future__ import annotations
from typing import Any
import orjson, pytest
from aiohttp import web
from tests.fakes import FakeFhir
from tests.fixtures import clinical as c
from tests.leak.test_side_doors import MakeGateway, call, fhir, leaks, routes, world

__all__ = ["world"]


async def test_probe_link_header(world: FakeFhir, make_gateway: MakeGateway) -> None:
    def search(r: web.Request) -> Any:
        page = c.bundle([c.HIV_CONDITION, c.ANA_HYPERTENSION], world.base_url, self_url=str(r.url))
        page["total"] = 7
        nxt = f"{world.base_url}/Condition?patient={c.PAT_ANA}&_count=2&_getpagesoffset=2"
        last = f"{world.base_url}/Condition?patient={c.PAT_ANA}&_count=2&_getpagesoffset=6"
        page["link"] += [{"relation": "next", "url": nxt}, {"relation": "last", "url": last}]
        return fhir(page, headers={"Link": f'<{nxt}>; rel="next", <{last}>; rel="last"',
                                   "ETag": 'W/"abc"', "Last-Modified": "Wed, 01 May 2024 10:00:00 GMT"})
    world.override = routes({("GET", "/Condition"): search})
    gw = await make_gateway(world.base_url)
    code, headers, body = await call(gw, "GET", f"/Condition?patient={c.PAT_ANA}&_count=2")
    print(code, headers, body[-400:])
