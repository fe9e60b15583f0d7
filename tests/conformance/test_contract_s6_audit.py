"""CONTRACT §6 ("Enforcing") as an outside acceptance tester reads it, clause by clause.

Everything goes through the running gateway over real sockets, in front of the in-process fake
FHIR server (``tests/fakes.py``). Ana (``c.PAT_ANA``) and Ben hold a general opt-in: a clinician
(``c.DOCTOR``) sees their ordinary records, never Ana's sensitive ones (HIV, opioid use, ...).
Each test names the clause it checks and asserts what a client observes: status, headers, the
body's shape, and that no hidden id, code or text is in the raw bytes.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote

import orjson
import pytest
from aiohttp import web

from tests.conftest import GatewayUnderTest
from tests.fakes import FakeFhir
from tests.fixtures import clinical as c
from tests.hidden import hidden_in
from tests.unit._util import raw_http, split_http
from tests.leak.test_side_doors import call, fhir, routes as answer_path

MakeGateway = Callable[..., Awaitable[GatewayUnderTest]]
JSON = dict[str, Any]
FHIR_JSON = "application/fhir+json"
FORM = "application/x-www-form-urlencoded"
ANA_ID = c.PAT_ANA.split("/", 1)[1]
ANA_OBS = f"/Observation?patient={c.PAT_ANA}"
HIV_REF = f"Observation/{c.HIV_TEST['id']}"
CBC_REF = f"Observation/{c.ANA_CBC['id']}"
DECISIONS = {"permit", "filtered", "deny"}

HIDDEN_BINARY = {"resourceType": "Binary", "id": "bin-hiv-s6", "contentType": "text/plain",
                 "securityContext": {"reference": HIV_REF},
                 "data": base64.b64encode(b"HIV 1 and 2 positive printout").decode()}
OPEN_BINARY = {"resourceType": "Binary", "id": "bin-cbc-s6", "contentType": "text/plain",
               "securityContext": {"reference": CBC_REF},
               "data": base64.b64encode(b"CBC printout").decode()}
BUPNAL = {"resourceType": "Medication", "id": "med-bupnal-s6",
          "code": c.concept(c.RXNORM, "1010600", c.BUPRENORPHINE_DISPLAY)}
LISINOPRIL = {"resourceType": "Medication", "id": "med-lisinopril-s6",
              "code": c.concept(c.RXNORM, "314076", "lisinopril 10 MG Oral Tablet")}
HIV_ENCOUNTER = {"resourceType": "Encounter", "id": "enc-hiv-s6", "status": "finished",
                 "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
                 "subject": {"reference": c.PAT_ANA},
                 "reasonCode": [c.concept(c.ICD10CM, "B20", "Human immunodeficiency virus [HIV] disease")]}
SECRETS = (*c.SECRETS, "enc-hiv-s6", HIDDEN_BINARY["data"], "bin-hiv-s6", "med-bupnal-s6", "medrx-s6-bup")


def med_order(rid: str, medication: str, contained: list[JSON] | None = None) -> JSON:
    order: JSON = {"resourceType": "MedicationRequest", "id": rid, "status": "active", "intent": "order",
                   "medicationReference": {"reference": medication}, "subject": {"reference": c.PAT_ANA},
                   "authoredOn": "2022-06-10"}
    if contained:
        order["contained"] = contained
    return order


def assert_outcome(status: int, headers: dict[str, str], body: bytes, expected: int) -> JSON:
    """An error answer: the status, a FHIR OperationOutcome, ``application/fhir+json``."""
    assert status == expected, body[:300]
    assert headers.get("Content-Type", "").split(";")[0] == FHIR_JSON, headers
    outcome: JSON = orjson.loads(body)
    assert outcome["resourceType"] == "OperationOutcome" and outcome["issue"], outcome
    return outcome


def suppressed_entries(bundle: JSON) -> list[JSON]:
    return [e for e in bundle.get("entry", []) if (e.get("search") or {}).get("mode") == "outcome"]


def upstream_queries(fake: FakeFhir) -> list[str]:
    return [r.path_qs for r in fake.requests if not r.path_qs.startswith(("/fhir/Consent", "/fhir/metadata"))]


@pytest.fixture
def world(fake_fhir: FakeFhir) -> FakeFhir:
    c.seed_all(fake_fhir)
    fake_fhir.add(c.opt_in(c.PAT_ANA), c.opt_in(c.PAT_BEN, "consent-ben-in"), BUPNAL, LISINOPRIL,
                  HIDDEN_BINARY, OPEN_BINARY, HIV_ENCOUNTER)
    return fake_fhir


@pytest.fixture
async def gw(world: FakeFhir, make_gateway: MakeGateway) -> GatewayUnderTest:
    return await make_gateway(world.base_url)


# ---------------------------------------------------------------- single read denied


@pytest.mark.parametrize("status", [403, 404])
async def test_single_read_denied_is_the_configured_status_with_an_outcome(
        world: FakeFhir, make_gateway: MakeGateway, status: int) -> None:
    gw = await make_gateway(world.base_url, enforcement={"denied_read_status": status})
    got, headers, body = await call(gw, "GET", f"/{HIV_REF}")
    assert_outcome(got, headers, body, status)
    assert not hidden_in(body, SECRETS) and not hidden_in(str(headers), SECRETS)
    assert headers["X-Consent-Decision"] in DECISIONS
    ok, ok_headers, _ = await call(gw, "GET", f"/{CBC_REF}")
    assert ok == 200 and ok_headers["X-Consent-Decision"] == "permit"


# ---------------------------------------------------------------- filtered answers


def _history_with_a_hidden_version(request: web.Request) -> JSON:
    now = {**c.ANA_HYPERTENSION, "id": "cond-s6", "meta": {"versionId": "2"}}
    was = {**c.HIV_CONDITION, "id": "cond-s6", "meta": {"versionId": "1"}}
    return c.history_bundle([now, was], "http://fhir.invalid")


def _everything(request: web.Request) -> JSON:
    return c.bundle([c.ANA, *c.ANA_ORDINARY, *c.ANA_SENSITIVE], str(request.url.origin()) + "/fhir")


def _revinclude(request: web.Request) -> JSON:
    return c.bundle([c.ANA], str(request.url.origin()) + "/fhir", include=(c.ANA_CBC, c.HIV_TEST))


FILTERED_DOORS = {
    "search": ("GET", ANA_OBS, None),
    "revinclude": ("GET", f"/Patient?_id={ANA_ID}&_revinclude=Observation:subject", _revinclude),
    "everything": ("GET", f"/Patient/{ANA_ID}/$everything", _everything),
    "instance-history": ("GET", "/Condition/cond-s6/_history", _history_with_a_hidden_version),
}


@pytest.mark.parametrize("door", sorted(FILTERED_DOORS))
async def test_filtered_answers_drop_hidden_entries_add_suppressed_outcome_and_drop_total(
        world: FakeFhir, gw: GatewayUnderTest, door: str) -> None:
    method, path, make = FILTERED_DOORS[door]
    if make is not None:
        world.add({**c.ANA_HYPERTENSION, "id": "cond-s6"})
        world.override = answer_path({(method, path.split("?")[0]): make})
    status, headers, body = await call(gw, method, path)
    assert status == 200, body[:300]
    assert headers["X-Consent-Decision"] == "filtered"
    assert not hidden_in(body, SECRETS), hidden_in(body, SECRETS)
    bundle = orjson.loads(body)
    assert "total" not in bundle
    outcomes = suppressed_entries(bundle)
    assert len(outcomes) == 1
    outcome = outcomes[0]["resource"]
    assert outcome["resourceType"] == "OperationOutcome"
    assert [i["code"] for i in outcome["issue"]] == ["suppressed"]
    assert len(bundle["entry"]) > 1  # what is open stays


async def test_batch_response_slot_of_a_hidden_read_holds_no_record(gw: GatewayUnderTest) -> None:
    batch = {"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": CBC_REF}}, {"request": {"method": "GET", "url": HIV_REF}}]}
    status, headers, body = await call(gw, "POST", "/", body=batch)
    assert status == 200 and headers["X-Consent-Decision"] in ("filtered", "deny")
    assert not hidden_in(body, SECRETS)
    slots = orjson.loads(body)["entry"]
    assert len(slots) == 2 and slots[0]["resource"]["id"] == c.ANA_CBC["id"]
    assert "resource" not in slots[1] and slots[1]["response"]["status"].startswith("403")


@pytest.mark.parametrize("actor,total_kept", [(c.DOCTOR, False), (c.PAT_ANA, True)])
async def test_total_goes_whenever_filtering_could_hide_something(
        gw: GatewayUnderTest, actor: str, total_kept: bool) -> None:
    """A search of Ben-like ordinary data hides nothing, yet a consent-conditional requester
    gets no count; only a requester every named patient permits outright (self) keeps it."""
    path = ANA_OBS if actor == c.PAT_ANA else f"/Observation?patient={c.PAT_BEN}"
    status, headers, body = await call(gw, "GET", path, actor=actor)
    bundle = orjson.loads(body)
    assert status == 200 and not suppressed_entries(bundle)
    assert ("total" in bundle) is total_kept
    if total_kept:
        assert bundle["total"] == len(bundle["entry"])


# ---------------------------------------------------------------- URLs point at the gateway


@pytest.mark.parametrize("how", ["host", "forwarded", "configured"])
async def test_every_upstream_url_is_rewritten_to_the_public_base(
        world: FakeFhir, make_gateway: MakeGateway, how: str) -> None:
    up = world.base_url

    def page(request: web.Request) -> JSON:
        found = c.bundle([c.BEN_CBC], up, self_url=f"{up}/Observation?patient={c.PAT_BEN}")
        found["link"].append({"relation": "next", "url": f"{up}/Observation?patient={c.PAT_BEN}&_page=2"})
        return found

    world.override = answer_path({
        ("GET", "/Observation"): page,
        ("GET", f"/{CBC_REF}"): lambda r: fhir(c.ANA_CBC, headers={"Content-Location": f"{up}/{CBC_REF}/_history/1"}),
    })
    settings: dict[str, Any] = {}
    headers: dict[str, str] = {}
    base = "http://gw.example.org:8443/fhir-gw"
    if how == "configured":
        settings["public_base_url"] = base
    elif how == "forwarded":
        headers = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "gw.example.org"}
        base = "https://gw.example.org"
    gw = await make_gateway(up, **settings)
    if how == "host":
        base = gw.url
    _, _, body = await call(gw, "GET", f"/Observation?patient={c.PAT_BEN}", **headers)
    bundle = orjson.loads(body)
    urls = [link["url"] for link in bundle["link"]] + [e["fullUrl"] for e in bundle["entry"] if "fullUrl" in e]
    assert urls and all(u.startswith(base + "/") for u in urls), urls
    assert up.split("://")[1] not in body.decode()
    _, read_headers, _ = await call(gw, "GET", f"/{CBC_REF}", **headers)
    assert read_headers["Content-Location"] == f"{base}/{CBC_REF}/_history/1"
    status, write_headers, _ = await call(gw, "POST", "/Observation", body={**c.BEN_CBC, "id": "new-s6"}, **headers)
    assert status == 201 and write_headers["Location"].startswith(base + "/Observation/"), write_headers


async def test_a_next_link_is_followed_through_the_gateway(world: FakeFhir, gw: GatewayUnderTest) -> None:
    up = world.base_url

    def page(request: web.Request) -> JSON:
        if request.query.get("_page") == "2":
            return c.bundle([c.BEN_HYPERTENSION], up)
        found = c.bundle([c.BEN_CBC], up)
        found["link"].append({"relation": "next", "url": f"{up}/Observation?patient={c.PAT_BEN}&_page=2"})
        return found

    world.override = answer_path({("GET", "/Observation"): page})
    _, _, body = await call(gw, "GET", f"/Observation?patient={c.PAT_BEN}")
    nxt = next(link["url"] for link in orjson.loads(body)["link"] if link["relation"] == "next")
    assert nxt.startswith(gw.url)
    status, _, second = await call(gw, "GET", nxt.removeprefix(gw.url))
    assert status == 200 and c.BEN_HYPERTENSION["id"] in second.decode()


# ---------------------------------------------------------------- projection after deciding


@pytest.mark.parametrize("projection", ["_elements=id,status", "_summary=true", "_summary=data", "_elements=subject"])
async def test_projection_is_applied_after_deciding_and_never_sent_upstream(
        world: FakeFhir, gw: GatewayUnderTest, projection: str) -> None:
    status, _, body = await call(gw, "GET", f"{ANA_OBS}&{projection}")
    assert status == 200 and not hidden_in(body, SECRETS)
    sent = upstream_queries(world)
    assert sent and not any("_elements" in q or "_summary" in q for q in sent), sent
    bundle = orjson.loads(body)
    kept = [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Observation"]
    assert [r["id"] for r in kept] == [c.ANA_CBC["id"]]
    if projection.startswith("_elements"):
        assert "code" not in kept[0]
        assert any(t.get("code") == "SUBSETTED" for t in kept[0].get("meta", {}).get("tag", []))


async def test_projection_of_a_single_read_is_applied_by_the_gateway(world: FakeFhir, gw: GatewayUnderTest) -> None:
    status, _, body = await call(gw, "GET", f"/{CBC_REF}?_elements=status")
    assert status == 200 and "code" not in orjson.loads(body)
    assert not any("_elements" in q for q in upstream_queries(world))
    status, headers, body = await call(gw, "GET", f"/{HIV_REF}?_elements=status")
    assert_outcome(status, headers, body, 403)


# ---------------------------------------------------------------- refusals


REFUSED = {
    "has": f"/Patient?_has:Observation:patient:code=75622-1",
    "graphql-system": "/$graphql?query=%7BPatientList%7Bid%7D%7D",
    "graphql-instance": f"/Patient/{ANA_ID}/$graphql?query=%7Bid%7D",
    "type-history": "/Observation/_history",
    "system-history": "/_history",
    "summary-count": f"{ANA_OBS}&_summary=count",
}


@pytest.mark.parametrize("kind", sorted(REFUSED))
async def test_unfilterable_requests_are_refused_before_the_upstream(
        world: FakeFhir, gw: GatewayUnderTest, kind: str) -> None:
    status, headers, body = await call(gw, "GET", REFUSED[kind])
    assert_outcome(status, headers, body, 403)
    assert upstream_queries(world) == []


@pytest.mark.parametrize("path", [f"{ANA_OBS}&_summary=count",
                                  f"/Condition?patient={c.PAT_ANA}&_has:Observation:subject:code=58410-2"])
async def test_a_patient_asking_about_her_own_record_is_not_refused(
        world: FakeFhir, gw: GatewayUnderTest, path: str) -> None:
    """'unless every patient involved is unconditionally permitted': self access is."""
    status, _, body = await call(gw, "GET", path, actor=c.PAT_ANA)
    assert status == 200, body[:300]
    assert upstream_queries(world)


@pytest.mark.parametrize("form", ["_summary=count&patient=" + c.PAT_ANA, "_has:Observation:patient:code=75622-1"])
async def test_a_form_encoded_search_body_is_refused_like_its_query(
        world: FakeFhir, gw: GatewayUnderTest, form: str) -> None:
    status, headers, body = await call(gw, "POST", "/Observation/_search", body=form.encode(), **{"Content-Type": FORM})
    assert_outcome(status, headers, body, 403)
    assert upstream_queries(world) == []


async def test_a_form_encoded_search_body_loses_its_projection_upstream(world: FakeFhir, gw: GatewayUnderTest) -> None:
    seen: list[tuple[str, bytes]] = []

    async def search(request: web.Request) -> web.StreamResponse | None:
        if request.path.endswith("/_search"):
            seen.append((request.query_string, await request.read()))
            return fhir(c.bundle([c.ANA_CBC, c.HIV_TEST], world.base_url))
        return None

    world.override = search
    form = f"patient={c.PAT_ANA}&_elements=id".encode()
    status, _, body = await call(gw, "POST", "/Observation/_search", body=form, **{"Content-Type": FORM})
    assert status == 200 and not hidden_in(body, SECRETS)
    assert seen and all(b"_elements" not in b and "_elements" not in q for q, b in seen), seen
    kept = [e["resource"] for e in orjson.loads(body)["entry"] if e["resource"]["resourceType"] == "Observation"]
    assert kept and all("code" not in r for r in kept)


# ---------------------------------------------------------------- only JSON


@pytest.mark.parametrize("how", [
    {"Accept": "application/fhir+xml"}, {"Accept": "application/xml"}, {"_format": "xml"},
    {"_format": "application/fhir+xml"}, {"_format": "text/xml"},
])
async def test_xml_is_answered_406_with_a_json_outcome(world: FakeFhir, gw: GatewayUnderTest, how: dict[str, str]) -> None:
    query = f"?_format={quote(how['_format'])}" if "_format" in how else ""
    headers = {k: v for k, v in how.items() if k != "_format"}
    status, got, body = await call(gw, "GET", f"/{CBC_REF}{query}", **headers)
    assert_outcome(status, got, body, 406)


@pytest.mark.parametrize("how", [{"Accept": "application/fhir+json"}, {"Accept": "*/*"}, {"_format": "json"},
                                 {"_format": "application/fhir+json"}, {"_format": "application/json"},
                                 {"Accept": "application/fhir+xml;q=0.9, application/fhir+json"}])
async def test_json_is_answered(gw: GatewayUnderTest, how: dict[str, str]) -> None:
    query = f"?_format={quote(how['_format'])}" if "_format" in how else ""
    headers = {k: v for k, v in how.items() if k != "_format"}
    status, _, _ = await call(gw, "GET", f"/{CBC_REF}{query}", **headers)
    assert status == 200


# As curl sends them: a ``+`` left unescaped reads as a space; FHIR's mime type parameters.
@pytest.mark.parametrize("query", ["_format=application/fhir+json", "_format=application/fhir%2Bjson;%20fhirVersion=4.0",
                                   "_format=application/json+fhir"])
async def test_json_format_as_clients_write_it_is_answered(gw: GatewayUnderTest, query: str) -> None:
    status, _, body = await call(gw, "GET", f"/{CBC_REF}?{query}")
    assert status == 200, body


# ---------------------------------------------------------------- fail closed, upstream errors


async def test_a_failed_consent_lookup_is_503_never_a_permit(world: FakeFhir, gw: GatewayUnderTest) -> None:
    world.override = answer_path({("GET", "/Consent"): lambda r: fhir({"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": "exception"}]}, 500)})
    for path in (f"/{CBC_REF}", ANA_OBS):
        status, headers, body = await call(gw, "GET", path)
        assert_outcome(status, headers, body, 503)
        assert c.ANA_CBC["id"] not in body.decode()


async def test_an_unreadable_consent_answer_is_503(world: FakeFhir, gw: GatewayUnderTest) -> None:
    world.override = answer_path({("GET", "/Consent"): lambda r: web.Response(body=b"<html>oops</html>", content_type="text/html")})
    status, headers, body = await call(gw, "GET", f"/{CBC_REF}")
    assert_outcome(status, headers, body, 503)


async def test_upstream_down_is_502(dead_url: str, make_gateway: MakeGateway) -> None:
    gw = await make_gateway(dead_url)
    status, headers, body = await call(gw, "GET", f"/{CBC_REF}")
    assert_outcome(status, headers, body, 502)


async def test_upstream_timeout_is_504(world: FakeFhir, make_gateway: MakeGateway) -> None:
    gw = await make_gateway(world.base_url, upstream={"timeout_s": 0.5})

    async def slow(request: web.Request) -> web.StreamResponse | None:
        if request.path.startswith("/fhir/Observation"):
            await asyncio.sleep(2)
        return None

    world.override = slow
    status, headers, body = await call(gw, "GET", f"/{CBC_REF}")
    assert_outcome(status, headers, body, 504)


@pytest.mark.parametrize("where", ["read", "search-entry", "nested"])
async def test_duplicate_json_keys_in_patient_data_are_502(world: FakeFhir, gw: GatewayUnderTest, where: str) -> None:
    cbc = orjson.dumps(c.ANA_CBC)[:-1]
    if where == "nested":
        twice = cbc + b',"code":{"coding":[{"system":"http://loinc.org","code":"75622-1","code":"58410-2"}]}}'
    else:
        twice = cbc + b',"subject":{"reference":"' + c.PAT_BEN.encode() + b'"}}'
    raw = twice if where != "search-entry" else (
        b'{"resourceType":"Bundle","type":"searchset","entry":[{"resource":' + twice + b',"search":{"mode":"match"}}]}')
    path = f"/{CBC_REF}" if where != "search-entry" else "/Observation"
    world.override = answer_path({("GET", path): lambda r: web.Response(body=raw, content_type=FHIR_JSON)})
    status, headers, body = await call(gw, "GET", path + ("" if where != "search-entry" else f"?patient={c.PAT_ANA}"))
    assert_outcome(status, headers, body, 502)


@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_an_answer_over_max_response_bytes_is_502(world: FakeFhir, make_gateway: MakeGateway, framing: str) -> None:
    gw = await make_gateway(world.base_url, upstream={"max_response_bytes": 4096})
    big = orjson.dumps(c.bundle([c.BEN_CBC] * 40, world.base_url))
    assert len(big) > 4096

    async def answer(request: web.Request) -> web.StreamResponse:
        if framing == "length":
            return web.Response(body=big, content_type=FHIR_JSON)
        resp = web.StreamResponse(headers={"Content-Type": FHIR_JSON})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for i in range(0, len(big), 1000):
            await resp.write(big[i:i + 1000])
        await resp.write_eof()
        return resp

    world.override = answer_path({("GET", "/Observation"): answer})
    status, headers, body = await call(gw, "GET", f"/Observation?patient={c.PAT_BEN}")
    assert_outcome(status, headers, body, 502)


# ---------------------------------------------------------------- 404 mode: hidden == missing


def _same_headers(a: dict[str, str], b: dict[str, str]) -> None:
    varying = {"date", "x-request-id", "server"}
    assert {k: v for k, v in a.items() if k.lower() not in varying} == \
        {k: v for k, v in b.items() if k.lower() not in varying}


MISSING_OBS = "Observation/obs-none-s6"


@pytest.mark.parametrize("door", ["read", "vread", "history", "meta", "binary", "everything-of-encounter"])
async def test_404_mode_hidden_reads_exactly_like_missing(world: FakeFhir, make_gateway: MakeGateway, door: str) -> None:
    gw = await make_gateway(world.base_url, enforcement={"denied_read_status": 404})
    paths = {
        "read": ("/{}", HIV_REF, MISSING_OBS),
        "vread": ("/{}/_history/1", HIV_REF, MISSING_OBS),
        "history": ("/{}/_history", HIV_REF, MISSING_OBS),
        "meta": ("/{}/$meta", HIV_REF, MISSING_OBS),
        "binary": ("/{}", "Binary/bin-hiv-s6", "Binary/bin-none-s6"),
        "everything-of-encounter": ("/{}/$everything", "Encounter/enc-hiv-s6", "Encounter/enc-none-s6"),
    }
    template, hidden, missing = paths[door]
    got_hidden = await call(gw, "GET", template.format(hidden))
    got_missing = await call(gw, "GET", template.format(missing))
    assert got_hidden[0] == got_missing[0] == 404, (got_hidden, got_missing)
    assert got_hidden[2] == got_missing[2]
    _same_headers(got_hidden[1], got_missing[1])
    assert not hidden_in(got_hidden[2], SECRETS)


@pytest.mark.parametrize("method,template,hidden,missing", [
    ("GET", "{}", HIV_REF, MISSING_OBS), ("GET", "{}/$meta", HIV_REF, MISSING_OBS),
    ("GET", "{}/_history", HIV_REF, MISSING_OBS), ("DELETE", "{}", HIV_REF, MISSING_OBS),
    ("GET", "{}", "Binary/bin-hiv-s6", "Binary/bin-none-s6"),
])
async def test_404_mode_batch_of_a_hidden_record_reads_like_one_of_a_missing_record(
        world: FakeFhir, make_gateway: MakeGateway, method: str, template: str, hidden: str, missing: str) -> None:
    gw = await make_gateway(world.base_url, enforcement={"denied_read_status": 404})

    def batch(target: str) -> JSON:
        return {"resourceType": "Bundle", "type": "batch", "entry": [
            {"request": {"method": method, "url": template.format(target)}}, {"request": {"method": "GET", "url": CBC_REF}}]}

    got_hidden = await call(gw, "POST", "/", body=batch(hidden))
    got_missing = await call(gw, "POST", "/", body=batch(missing))
    assert got_hidden[0] == got_missing[0] == 200 and not hidden_in(got_hidden[2], SECRETS)
    assert got_hidden[2] == got_missing[2]
    _same_headers(got_hidden[1], got_missing[1])


async def test_404_mode_search_that_lost_a_record_looks_like_one_that_did_not(
        world: FakeFhir, make_gateway: MakeGateway) -> None:
    gw = await make_gateway(world.base_url, enforcement={"denied_read_status": 404})
    status, headers, body = await call(gw, "GET", ANA_OBS)
    bundle = orjson.loads(body)
    assert status == 200 and not suppressed_entries(bundle) and not hidden_in(body, SECRETS)
    assert headers["X-Consent-Decision"] == "permit"


# ---------------------------------------------------------------- the HTTP layer's own errors


@pytest.mark.parametrize("request_bytes", [
    b"GARBAGE-secret-token-s6\r\n\r\n",
    b"GET /Observation HTTP/1.1\r\nHost: x\r\nX-Actor: Practitioner/1\r\nX-Big: "
    + b"secret-token-s6" * 2000 + b"\r\nConnection: close\r\n\r\n",
    b"GET /Observation?" + b"secret-token-s6" * 2000 + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
])
async def test_http_layer_errors_are_outcomes_that_echo_nothing(gw: GatewayUnderTest, request_bytes: bytes) -> None:
    status, headers, body = split_http(await raw_http(gw.running.proxy_port, request_bytes))
    assert 400 <= status < 500
    assert headers["content-type"].split(";")[0] == FHIR_JSON
    if headers.get("transfer-encoding") != "chunked":
        assert orjson.loads(body)["resourceType"] == "OperationOutcome"
    assert b"secret-token-s6" not in body and b"GARBAGE" not in body


# ---------------------------------------------------------------- every error is an outcome


ERRORS: dict[str, tuple[str, str, Any, dict[str, str], int]] = {
    "no-actor": ("GET", f"/{CBC_REF}", None, {"X-Actor": ""}, 401),
    "actor-twice": ("GET", f"/{CBC_REF}", None, {"X-Actor": "Practitioner/a, Practitioner/b"}, 400),
    "unknown-purpose": ("GET", f"/{CBC_REF}", None, {"X-Purpose-Of-Use": "NOPE"}, 400),
    "bad-break-glass": ("GET", f"/{CBC_REF}", None, {"X-Break-Glass": "because"}, 400),
    "xml-body": ("POST", "/Observation", b"<Observation/>", {"Content-Type": "application/fhir+xml"}, 415),
    "bad-consent": ("POST", "/Consent", b"{not json", {"X-Actor": c.PAT_ANA}, 400),
    "refused": ("GET", "/_history", None, {}, 403),
    "denied": ("GET", f"/{HIV_REF}", None, {}, 403),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
async def test_every_error_is_a_json_operation_outcome(gw: GatewayUnderTest, case: str) -> None:
    method, path, body, headers, expected = ERRORS[case]
    actor = headers.pop("X-Actor", c.DOCTOR) or None
    headers = dict(headers)
    status, got, raw = await call(gw, method, path, actor=actor, body=body, **headers)
    assert_outcome(status, got, raw, expected)


async def test_consent_decision_header_on_every_decided_answer(world: FakeFhir, gw: GatewayUnderTest) -> None:
    seen = {}
    for path in (f"/{CBC_REF}", ANA_OBS, f"/{HIV_REF}", f"/Observation?patient={c.PAT_BEN}"):
        _, headers, _ = await call(gw, "GET", path)
        seen[path] = headers.get("X-Consent-Decision")
    assert seen == {f"/{CBC_REF}": "permit", ANA_OBS: "filtered", f"/{HIV_REF}": "deny",
                    f"/Observation?patient={c.PAT_BEN}": "permit"}


# ---------------------------------------------------------------- writes


async def test_writes_pass_through(world: FakeFhir, gw: GatewayUnderTest) -> None:
    status, headers, _ = await call(gw, "POST", "/Observation", body={**c.BEN_CBC, "id": "w-s6"})
    assert status == 201 and headers["Location"].startswith(gw.url)
    assert any(r.method == "POST" and r.path_qs == "/fhir/Observation" for r in world.requests)


CONSENT_WRITES = {
    # (actor, role, method, path, body) -> expected status
    "patient-own-create": (c.PAT_ANA, None, "POST", "/Consent", c.opt_out(c.PAT_ANA, "co-s6"), 201),
    "patient-other-create": (c.PAT_BEN, None, "POST", "/Consent", c.opt_out(c.PAT_ANA, "co-s6"), 403),
    "doctor-create": (c.DOCTOR, None, "POST", "/Consent", c.opt_in(c.PAT_ANA, "co-s6", ("HIV",)), 403),
    "writer-role-create": (c.DOCTOR, "PRCP", "POST", "/Consent", c.opt_out(c.PAT_ANA, "co-s6"), 201),
    "overwrite-other-patients-consent": (c.PAT_BEN, None, "PUT", "/Consent/consent-optin",
                                         {**c.opt_in(c.PAT_BEN), "id": "consent-optin"}, 403),
    "delete-other-patients-consent": (c.PAT_BEN, None, "DELETE", "/Consent/consent-optin", None, 403),
}


@pytest.mark.parametrize("case", sorted(CONSENT_WRITES))
async def test_consent_writes_alone_and_in_a_batch(world: FakeFhir, make_gateway: MakeGateway, case: str) -> None:
    actor, role, method, path, body, expected = CONSENT_WRITES[case]
    gw = await make_gateway(world.base_url, consent={"writer_roles": ["PRCP"]})
    headers = {"X-Actor-Role": role} if role else {}
    status, _, raw = await call(gw, method, path, actor=actor, body=body, **headers)
    if expected == 403:
        assert_outcome(status, {"Content-Type": FHIR_JSON}, raw, 403)
    else:
        assert status == expected, raw[:300]
    if expected == 201:
        return
    entry: JSON = {"request": {"method": method, "url": path.lstrip("/")}}
    if body is not None:
        entry["resource"] = body
    bundle = {"resourceType": "Bundle", "type": "batch", "entry": [entry]}
    sent_before = len(world.requests)
    status, _, raw = await call(gw, "POST", "/", actor=actor, body=bundle, **headers)
    assert status == 200
    assert orjson.loads(raw)["entry"][0]["response"]["status"].startswith("403")
    assert not any(r.method in ("POST", "PUT", "DELETE") and "Consent" in r.path_qs
                   for r in world.requests[sent_before:])


async def test_the_emergency_category_of_the_gateway_is_refused(world: FakeFhir, gw: GatewayUnderTest) -> None:
    from gateway.core.breakglass import GATEWAY_CODE_SYSTEM

    body = {**c.opt_in(c.PAT_ANA, "co-em-s6"), "category": [{"coding": [{"system": GATEWAY_CODE_SYSTEM, "code": "emergency"}]}]}
    status, headers, raw = await call(gw, "POST", "/Consent", actor=c.PAT_ANA, body=body)
    assert_outcome(status, headers, raw, 403)


async def test_a_consent_write_takes_effect_on_the_next_request(world: FakeFhir, gw: GatewayUnderTest) -> None:
    assert (await call(gw, "GET", f"/{CBC_REF}"))[0] == 200
    world.resources.pop("Consent/consent-optin")
    status, _, _ = await call(gw, "POST", "/Consent", actor=c.PAT_ANA, body=c.opt_out(c.PAT_ANA, "co-out-s6"))
    assert status == 201
    assert (await call(gw, "GET", f"/{CBC_REF}"))[0] == 403


# ---------------------------------------------------------------- every way in is the same door


async def test_a_batch_entry_is_refused_like_the_request_alone(world: FakeFhir, gw: GatewayUnderTest) -> None:
    entries = [{"request": {"method": "GET", "url": f"Patient?_has:Observation:patient:code=75622-1"}},
               {"request": {"method": "GET", "url": "Observation/_history"}},
               {"request": {"method": "GET", "url": f"Observation?patient={c.PAT_ANA}&_summary=count"}},
               {"request": {"method": "GET", "url": CBC_REF}}]
    status, _, raw = await call(gw, "POST", "/", body={"resourceType": "Bundle", "type": "batch", "entry": entries})
    assert status == 200
    slots = orjson.loads(raw)["entry"]
    assert [s["response"]["status"][:3] for s in slots] == ["403", "403", "403", "200"]
    status, headers, raw = await call(gw, "POST", "/", body={"resourceType": "Bundle", "type": "transaction", "entry": entries})
    assert_outcome(status, headers, raw, 403)


async def test_a_batch_entry_projection_is_applied_by_the_gateway(world: FakeFhir, gw: GatewayUnderTest) -> None:
    entries = [{"request": {"method": "GET", "url": f"Observation?patient={c.PAT_ANA}&_elements=id"}}]
    status, _, raw = await call(gw, "POST", "/", body={"resourceType": "Bundle", "type": "batch", "entry": entries})
    assert status == 200 and not hidden_in(raw, SECRETS)
    assert not any("_elements" in q for q in upstream_queries(world))


# ---------------------------------------------------------------- Binary, medication, display


BINARY_DOORS = {
    "read": ("GET", "/Binary/bin-hiv-s6", None),
    "search": ("GET", "/Binary?_id=bin-hiv-s6,bin-cbc-s6", None),
    "history": ("GET", "/Binary/bin-hiv-s6/_history", None),
    "batch": ("POST", "/", {"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": "Binary/bin-hiv-s6"}}]}),
}


@pytest.mark.parametrize("door", sorted(BINARY_DOORS))
async def test_a_binary_is_decided_by_its_security_context(gw: GatewayUnderTest, door: str) -> None:
    method, path, body = BINARY_DOORS[door]
    status, _, raw = await call(gw, method, path, body=body)
    assert status in (200, 403)
    found = orjson.loads(raw)
    found.pop("link", None)  # a search's self link echoes the ids the client asked for
    assert not hidden_in(orjson.dumps(found), SECRETS), hidden_in(orjson.dumps(found), SECRETS)
    assert (await call(gw, "GET", "/Binary/bin-cbc-s6"))[0] == 200


async def test_a_binary_included_beside_its_context_follows_it(world: FakeFhir, gw: GatewayUnderTest) -> None:
    world.override = answer_path({("GET", "/Observation"): lambda r: c.bundle(
        [c.ANA_CBC, c.HIV_TEST], world.base_url, include=(HIDDEN_BINARY, OPEN_BINARY))})
    status, _, raw = await call(gw, "GET", ANA_OBS)
    assert status == 200 and not hidden_in(raw, SECRETS)
    assert "bin-cbc-s6" in raw.decode()


@pytest.mark.parametrize("how", ["on-the-server", "contained", "in-the-answer"])
async def test_a_medication_reference_labels_the_order(world: FakeFhir, gw: GatewayUnderTest, how: str) -> None:
    if how == "contained":
        order = med_order("medrx-s6-bup", "#m1", [{**BUPNAL, "id": "m1"}])
    else:
        order = med_order("medrx-s6-bup", f"Medication/{BUPNAL['id']}")
    open_order = med_order("medrx-s6-lis", f"Medication/{LISINOPRIL['id']}")
    world.add(order, open_order)
    if how == "in-the-answer":
        world.resources.pop(f"Medication/{BUPNAL['id']}")
        world.override = answer_path({("GET", "/MedicationRequest"): lambda r: c.bundle(
            [order, open_order], world.base_url, include=(BUPNAL, LISINOPRIL))})
        status, _, raw = await call(gw, "GET", f"/MedicationRequest?patient={c.PAT_ANA}&_include=MedicationRequest:medication")
        assert status == 200 and not hidden_in(raw, SECRETS) and "medrx-s6-lis" in raw.decode()
        return
    status, _, raw = await call(gw, "GET", "/MedicationRequest/medrx-s6-bup")
    assert status == 403 and not hidden_in(raw, SECRETS)
    assert (await call(gw, "GET", "/MedicationRequest/medrx-s6-lis"))[0] == 200


async def test_a_display_naming_a_hidden_record_is_removed(world: FakeFhir, gw: GatewayUnderTest) -> None:
    report = {"resourceType": "DiagnosticReport", "id": "dr-s6", "status": "final",
              "code": c.concept(c.LOINC, "58410-2", "CBC panel - Blood by Automated count"),
              "subject": {"reference": c.PAT_ANA, "display": "Ana Reyes"},
              "result": [{"reference": CBC_REF, "display": "CBC normal"},
                         {"reference": HIV_REF, "display": "HIV 1 and 2 tests positive"}]}
    world.add(report)
    status, _, raw = await call(gw, "GET", "/DiagnosticReport/dr-s6")
    assert status == 200 and b"HIV 1 and 2" not in raw
    results = orjson.loads(raw)["result"]
    assert results[1] == {"reference": HIV_REF}
    assert results[0].get("display") in (None, "CBC normal")


# ---------------------------------------------------------------- counts


async def test_everything_counts_only_what_the_requester_sees(world: FakeFhir, gw: GatewayUnderTest) -> None:
    world.override = answer_path({("GET", f"/Patient/{ANA_ID}/$everything"): _everything})
    for actor in (c.DOCTOR, c.PAT_ANA):
        status, _, raw = await call(gw, "GET", f"/Patient/{ANA_ID}/$everything", actor=actor)
        bundle = orjson.loads(raw)
        assert status == 200
        matches = [e for e in bundle["entry"] if (e.get("search") or {}).get("mode") != "outcome"]
        assert "total" not in bundle or bundle["total"] == len(matches)


# A Consent written at another type's URL: a server that stores what the body says (the body's
# resourceType and id) would take it as a Consent the Consent-write rules never saw.
SNEAKY = {**c.opt_in(c.PAT_ANA, "sneaky-s6", ("HIV",)), "provision": {
    "type": "permit", "actor": [{"reference": {"reference": c.DOCTOR}}],
    "provision": [{"type": "permit", "securityLabel": [{"system": c.V3_ACT_CODE, "code": "HIV"}]}]}}
MISMATCHED_WRITES = {
    "create-at-another-type": ("POST", "/Observation", SNEAKY),
    "update-at-another-type": ("PUT", "/Observation/sneaky-s6", SNEAKY),
    "update-of-another-id": ("PUT", "/Consent/ana-own-s6", {**c.opt_out(c.PAT_ANA), "id": "consent-ben-in"}),
}


@pytest.mark.parametrize("case", sorted(MISMATCHED_WRITES))
async def test_a_body_that_is_not_what_its_url_names_is_refused_at_every_door(
        world: FakeFhir, gw: GatewayUnderTest, case: str) -> None:
    method, path, body = MISMATCHED_WRITES[case]
    actor = c.PAT_ANA if case == "update-of-another-id" else c.DOCTOR
    status, headers, raw = await call(gw, method, path, actor=actor, body=body)
    assert_outcome(status, headers, raw, 400)
    entry = {"request": {"method": method, "url": path.lstrip("/")}, "resource": body}
    for kind in ("batch", "transaction"):
        status, headers, raw = await call(gw, "POST", "/", actor=actor,
                                          body={"resourceType": "Bundle", "type": kind, "entry": [entry]})
        if kind == "transaction":
            assert_outcome(status, headers, raw, 400)
        else:
            assert status == 200 and orjson.loads(raw)["entry"][0]["response"]["status"].startswith("400")
    assert not any(r.method in ("POST", "PUT") and r.path_qs != "/fhir/" for r in world.requests)
    assert "Consent/sneaky-s6" not in world.resources
    assert world.resources["Consent/consent-ben-in"]["patient"]["reference"] == c.PAT_BEN


@pytest.mark.parametrize("path", [ANA_OBS, f"/Patient/{ANA_ID}/$everything"])
async def test_self_access_counts_never_count_a_record_shared_with_a_patient_who_opted_out(
        world: FakeFhir, gw: GatewayUnderTest, path: str) -> None:
    """Ana sees her own record, but one Ben performed (his compartment too) needs Ben's consent."""
    world.resources.pop("Consent/consent-ben-in")
    world.add(c.opt_out(c.PAT_BEN, "ben-out-s6"))
    joint = {**c.ANA_CBC, "id": "obs-joint-s6", "performer": [{"reference": c.PAT_BEN}]}
    world.add(joint)
    world.override = answer_path({("GET", f"/Patient/{ANA_ID}/$everything"): lambda r: c.bundle(
        [c.ANA, c.ANA_CBC, joint, c.HIV_TEST], world.base_url)})
    status, _, raw = await call(gw, "GET", path, actor=c.PAT_ANA)
    bundle = orjson.loads(raw)
    matches = [e for e in bundle["entry"] if (e.get("search") or {}).get("mode") != "outcome"]
    assert status == 200 and b"obs-joint-s6" not in raw
    assert c.HIV_TEST["id"] in raw.decode()  # her own sensitive record is hers
    assert "total" not in bundle or bundle["total"] == len(matches)


async def test_upstream_urls_inside_resources_point_at_the_gateway(world: FakeFhir, gw: GatewayUnderTest) -> None:
    """'Every URL in the response that points at the upstream': an attachment's url, an absolute
    reference, an extension's URI, a history entry's request url."""
    up = world.base_url
    world.add({"resourceType": "DocumentReference", "id": "doc-s6", "status": "current",
               "subject": {"reference": c.PAT_BEN}, "type": c.concept(c.LOINC, "34117-2", "History and physical note"),
               "content": [{"attachment": {"contentType": "text/plain", "url": f"{up}/Binary/bin-cbc-s6"}}],
               "extension": [{"url": "http://example.org/x", "valueUri": f"{up}/Observation/x"}],
               "context": {"related": [{"reference": f"{up}/{CBC_REF}"}]}})
    history = c.history_bundle([c.BEN_CBC], up)
    history["entry"][0]["request"]["url"] = f"{up}/Observation/{c.BEN_CBC['id']}"
    world.override = answer_path({("GET", f"/Observation/{c.BEN_CBC['id']}/_history"): lambda r: history})
    for path in ("/DocumentReference/doc-s6", f"/Observation/{c.BEN_CBC['id']}/_history"):
        status, _, raw = await call(gw, "GET", path)
        assert status == 200 and up.encode() not in raw and gw.url.encode() in raw, raw


MULTIPART = (b'--XyZ\r\nContent-Disposition: form-data; name="_summary"\r\n\r\ncount\r\n'
             b'--XyZ\r\nContent-Disposition: form-data; name="patient"\r\n\r\n' + c.PAT_ANA.encode() + b'\r\n--XyZ--\r\n')


@pytest.mark.parametrize("path,ctype,body", [
    ("/Observation/_search", "multipart/form-data; boundary=XyZ", MULTIPART),
    ("/Observation/_search", "text/plain", b"_summary=count&patient=" + c.PAT_ANA.encode()),
    ("/Observation/_search", FHIR_JSON, b"_summary=count&patient=" + c.PAT_ANA.encode()),
    ("/Patient/$everything", "multipart/form-data; boundary=XyZ", MULTIPART),
])
async def test_a_post_body_with_parameters_the_gateway_cannot_read_is_not_sent(
        world: FakeFhir, gw: GatewayUnderTest, path: str, ctype: str, body: bytes) -> None:
    """'Form-encoded bodies of any POST are read like the query string': a body of search
    parameters in another form (multipart form data, form text under another type) would be
    read by a lenient server and never by the gateway; it is refused (415), never sent."""
    status, headers, raw = await call(gw, "POST", path, body=body, **{"Content-Type": ctype})
    assert_outcome(status, headers, raw, 415)
    assert upstream_queries(world) == []


@pytest.mark.parametrize("ctype,body", [("text/plain", orjson.dumps(SNEAKY)), (FHIR_JSON, b'{"note": "no resourceType"}')])
async def test_raw_binary_content_and_bodies_that_are_no_resource_are_left_to_the_server(
        world: FakeFhir, gw: GatewayUnderTest, ctype: str, body: bytes) -> None:
    """A Binary's raw content may be any document (a Consent's JSON kept as a file); a body with no
    resourceType names no type a server could take it for."""
    path = "/Binary" if ctype == "text/plain" else "/Observation"
    world.override = answer_path({("POST", path): lambda r: fhir({"resourceType": "Binary", "id": "raw-s6"}, 201)})
    status, _, raw = await call(gw, "POST", path, body=body, **{"Content-Type": ctype})
    assert status == 201, raw
