from __future__ import annotations
import gzip, zlib, json
from typing import Any
import orjson, pytest
from aiohttp import web
from tests.fakes import FakeFhir
from tests.fixtures import clinical as c
from tests.leak.test_side_doors import MakeGateway, call, fhir, leaks, routes, world, VIRAL_LOAD, VL_REF, VL_SECRETS, ALL_SECRETS
from tests.leak.test_red_team_11 import LAB_REPORT, NARRATED

__all__ = ["world"]

def enc(data, how):
    raw = orjson.dumps(data)
    if how == "gzip": return gzip.compress(raw)
    if how == "deflate": return zlib.compress(raw)
    if how == "br": return b"\x1b\x00\x00garbage" + raw
    return raw

async def test_probe(world: FakeFhir, make_gateway: MakeGateway) -> None:
    world.add(LAB_REPORT)
    vl_bundle = c.bundle([c.ANA_CBC, {**VIRAL_LOAD}], world.base_url)
    def encoded(how, data, ctype="application/fhir+json"):
        return lambda r: web.Response(body=enc(data, how), headers={"Content-Type": ctype, "Content-Encoding": how})
    pretty = json.dumps({**LAB_REPORT, "result": [{"reference": "Observation/%s" % c.ANA_CBC["id"], "display": "CBC"}, {"reference": VL_REF, "display": "HIV-1 RNA 12000 copies/mL"}]}, indent=2).encode()
    world.override = routes({
        ("GET", "/ObsGzip"): encoded("gzip", vl_bundle),
        ("GET", "/ObsDeflate"): encoded("deflate", vl_bundle),
        ("GET", "/ObsBr"): encoded("br", vl_bundle),
        ("GET", "/metadata"): encoded("gzip", vl_bundle, "text/plain"),
        ("GET", f"/observation/{VIRAL_LOAD['id']}"): lambda r: VIRAL_LOAD,
        ("GET", f"/OBSERVATION"): lambda r: vl_bundle,
        ("GET", "/Patient"): lambda r: c.bundle([c.ANA], world.base_url),
        ("GET", "/Pretty"): lambda r: web.Response(body=pretty, headers={"Content-Type": "application/fhir+json"}),
        ("GET", "/$GRAPHQL"): lambda r: {"data": {"x": VIRAL_LOAD}},
        ("GET", "/Observation/$LASTN"): lambda r: vl_bundle,
    })
    gw = await make_gateway(world.base_url)
    for path in ["/ObsGzip", "/ObsDeflate", "/ObsBr", "/metadata", f"/observation/{VIRAL_LOAD['id']}", "/OBSERVATION?patient=x",
                 "/Patient?_HAS:Observation:patient:code=20447-9", "/Patient?_Has:Observation:patient:code=20447-9",
                 "/Pretty", "/$GRAPHQL?query=x", f"/Observation/$LASTN?patient={c.PAT_ANA}",
                 f"/DiagnosticReport/{LAB_REPORT['id']}?_summary=text", f"/DiagnosticReport/{LAB_REPORT['id']}?_elements=text",
                 f"/DiagnosticReport/{LAB_REPORT['id']}?_summary=data",
                 f"//Observation//{VIRAL_LOAD['id']}", f"/Observation/{VIRAL_LOAD['id']}/", f"/Observation/{VIRAL_LOAD['id']}?",
                 f"/Observation%2F{VIRAL_LOAD['id']}", f"/Observation/{VIRAL_LOAD['id']};x=1",
                 f"/Observation?_id={c.ANA_CBC['id']},{VIRAL_LOAD['id']}&_id={VIRAL_LOAD['id']}",
                 ]:
        code, headers, body = await call(gw, "GET", path)
        print("PROBE", path, code, headers.get("X-Consent-Decision"), leaks(body, headers, (*ALL_SECRETS, *NARRATED)), body[:160])
    for method in ["HEAD", "OPTIONS"]:
        code, headers, body = await call(gw, method, f"/Observation?patient={c.PAT_ANA}")
        print("PROBE", method, code, dict(headers), body[:200])
    assert False
