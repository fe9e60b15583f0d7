from __future__ import annotations
import orjson
from tests.fakes import FakeFhir
from tests.identity.conftest import observation

async def test_probe(fake_fhir: FakeFhir, make_gateway) -> None:
    fake_fhir.add(observation("o1", "p1"))
    gw = await make_gateway(fake_fhir.base_url, consent={"change_poll_s": 0, "default_decision": "permit"})
    for actor in ("Practitioner/1", "Patient/7", "Organization/3", "Device/9", "RelatedPerson/2", "Person/1", "PractitionerRole/1", "Group/1", "Observation/1", "dr-1", "http://x/fhir/Practitioner/1"):
        async with gw.session.get(gw.url + "/Observation/o1", headers={"X-Actor": actor, "X-Actor-Organization": "Organization/o1", "X-Actor-Role": "PRCP", "X-Purpose-Of-Use": "TREAT", "Authorization": "Bearer abc", "Cookie": "a=b"}) as resp:
            print(actor, resp.status, (await resp.read())[:120])
    last = fake_fhir.requests[-1]
    print("FORWARDED HEADERS", last.headers)
    for path in ("/metadata", "/.well-known/smart-configuration", "/Observation/o1"):
        async with gw.session.get(gw.url + path) as resp:
            print(path, resp.status, dict(resp.headers).get("WWW-Authenticate"), (await resp.read())[:200])
    async with gw.session.get(gw.url + "/Observation/o1", headers={"X-Actor": "Practitioner/1", "X-Break-Glass": "medical emergency"}) as resp:
        print("bg case", resp.status, await resp.read())
    async with gw.session.get(gw.url + "/Observation/o1", headers={"X-Actor": "Practitioner/1", "X-Purpose-Of-Use": "treat"}) as resp:
        print("purpose lower", resp.status)
    async with gw.session.get(gw.url + "/Observation/o1", headers={"X-Actor": "Practitioner/1", "X-Actor-Organization": "Practitioner/2"}) as resp:
        print("org bad", resp.status)
    async with gw.session.get(gw.url + "/Observation/o1", headers={"X-Actor": "Practitioner/1", "X-Actor-Role": "PRCP, IRCP"}) as resp:
        print("role comma", resp.status)
