from __future__ import annotations
from typing import Any
import orjson, pytest
from aiohttp import web
from tests.fakes import FakeFhir
from tests.fixtures import clinical as c
from tests.leak.test_side_doors import MakeGateway, call, fhir, leaks, routes, world

__all__ = ["world"]
HIV_REF = f"Condition/{c.HIV_CONDITION['id']}"


@pytest.mark.parametrize("status", [404])
async def test_probe_formats(world: FakeFhir, make_gateway: MakeGateway, status: int) -> None:
    def answer(ctype: str, body: bytes, code: int = 200):
        return lambda r: web.Response(body=body, status=code, headers={"Content-Type": ctype})
    hiv = orjson.dumps(c.HIV_CONDITION)
    world.override = routes({
        ("GET", "/Condition/x1"): answer("application/fhir+xml", b"<Condition><id value='x'/></Condition>"),
        ("GET", "/Condition/x2"): answer("text/html", hiv),
        ("GET", "/Condition/x3"): answer("text/plain", hiv, 500),
        ("GET", "/Condition/x4"): answer("application/json; charset=utf-8", hiv),
        ("GET", "/Condition/x5"): answer("application/vnd.api+json", hiv),
        ("GET", "/Condition/x6"): answer("application/fhir+json", hiv, 302),
        ("GET", "/Condition/x7"): answer("application/fhir+json", hiv, 409),
        ("GET", "/Condition/x8"): answer("application/fhir+json", hiv, 206),
        ("GET", "/Condition/x9"): lambda r: web.Response(status=200, headers={"Content-Type": "application/fhir+json", "Location": world.base_url + "/" + HIV_REF, "ETag": 'W/"7"'}),
    })
    gw = await make_gateway(world.base_url, enforcement={"denied_read_status": status})
    for path in ["/Condition/x1", "/Condition/x2", "/Condition/x3", "/Condition/x4", "/Condition/x5", "/Condition/x6", "/Condition/x7", "/Condition/x8", "/Condition/x9",
                 f"/{HIV_REF}?_format=xml", f"/{HIV_REF}?_format=html", f"/{HIV_REF}?_format=application/fhir%2Bxml"]:
        code, headers, body = await call(gw, "GET", path)
        print(path, code, headers.get("X-Consent-Decision"), leaks(body, headers), body[:150])
    for acc in ["application/fhir+xml", "application/xml;q=1, application/json;q=0.1", "text/html", "application/fhir+xml, */*;q=0.1"]:
        code, headers, body = await call(gw, "GET", f"/{HIV_REF}", Accept=acc)
        print(acc, code, body[:100])
    code, headers, body = await call(gw, "OPTIONS", f"/{HIV_REF}")
    print("OPTIONS", code, headers, body[:200])
    code, headers, body = await call(gw, "PUT", "/Condition?code=B20", body=c.ANA_HYPERTENSION)
    print("cond PUT", code, body[:200])
    code, headers, body = await call(gw, "DELETE", "/Condition?code=B20")
    print("cond DELETE", code, body[:200])
    code, headers, body = await call(gw, "PATCH", "/Condition?code=B20", body=[])
    print("cond PATCH", code, body[:200])
