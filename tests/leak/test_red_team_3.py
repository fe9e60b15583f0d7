"""Red team, third pass: answers decided on views and spliced from the upstream's bytes, and
decisions shared across requests (core.view, core.judge.DecisionCache, the label memo).

The question each test asks: which bytes does the client read that the gateway did not
decide on, or decided for someone else? Every test goes through the real request path (HTTP
to the gateway, the fake FHIR server on a real socket answering raw bytes) and searches the
RAW response bytes and headers. The leak conftest runs each test twice: answers parsed whole,
and answers decided on views (``upstream.views_above_bytes: 0``). Every door here held or
was closed: escaped meta keys, escaped display keys, displays in answers without ids and at
the Bundle level, unknown resource types, repeated keys anywhere, escaped upstream URLs.
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from collections.abc import Awaitable, Callable, Iterable
from datetime import datetime, timezone
from typing import Any

import orjson
import pytest
from aiohttp import web

from gateway.demo.issuer import LocalIssuer
from tests.conftest import GatewayUnderTest
from tests.fakes import FakeFhir
from tests.fixtures import clinical as c
from tests.leak.test_red_team_2 import bearer, jcall, jwt_config
from tests.leak.test_side_doors import FHIR_JSON, call, entries, ids_in, leaks, routes

MakeGateway = Callable[..., Awaitable[GatewayUnderTest]]
ANA_ID = c.PAT_ANA.split("/", 1)[1]
BEN_ID = c.PAT_BEN.split("/", 1)[1]
V3_CONF = c.V3_CONFIDENTIALITY
PURPOSE_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
RESOURCE_TYPES = "http://hl7.org/fhir/resource-types"
HIDDEN_PROFILE = "http://example.org/fhir/StructureDefinition/forensic-finding"

HIV_SECRETS = ("B20", "86406008", "Human immunodeficiency virus", c.HIV_CONDITION["id"])


# ---------------------------------------------------------------- fixtures and helpers


def path_of(request: pytest.FixtureRequest) -> str:
    """``whole`` or ``views``: how the leak conftest runs this test."""
    callspec = getattr(request.node, "callspec", None)
    return str(callspec.params.get("make_gateway", "whole")) if callspec is not None else "whole"


def answer(body: bytes, status: int = 200) -> web.Response:
    return web.Response(body=body, status=status, content_type=FHIR_JSON)


def searchset(resources: Iterable[dict[str, Any]], base: str, self_url: str = "") -> dict[str, Any]:
    return c.bundle(list(resources), base, self_url=self_url or f"{base}/Observation?patient={c.PAT_ANA}")


def observation(rid: str, subject: str = c.PAT_ANA, **extra: Any) -> dict[str, Any]:
    """An ordinary lab result (a CBC) with ``extra`` elements."""
    return {**c.ANA_CBC, "id": rid, "subject": {"reference": subject}, **extra}


def hiv_condition(rid: str, subject: str) -> dict[str, Any]:
    return {**c.HIV_CONDITION, "id": rid, "subject": {"reference": subject}}


def serve(fake: FakeFhir, table: dict[tuple[str, str], Callable[[web.Request], Any]]) -> None:
    fake.override = routes(table)


async def search(gw: GatewayUnderTest, path: str = f"/Observation?patient={c.PAT_ANA}", actor: str = c.DOCTOR,
                 **headers: str) -> tuple[int, dict[str, str], bytes]:
    return await call(gw, "GET", path, actor=actor, **headers)


def consent(cid: str, subject: str, provision: dict[str, Any], rule: str = "OPTIN") -> dict[str, Any]:
    return c._consent(cid, subject, rule, provision)


def fhir_instant(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def soon(seconds: float) -> tuple[datetime, str]:
    """A whole second at least ``seconds`` from now, and its FHIR text."""
    moment = datetime.fromtimestamp(math.ceil(time.time() + seconds), timezone.utc)
    return moment, fhir_instant(moment)


async def sleep_past(moment: datetime) -> None:
    await asyncio.sleep(max(0.0, moment.timestamp() - time.time()) + 0.15)


# ================================================================ 1. meta spelled oddly


def _escaped(body: bytes, key: bytes) -> bytes:
    """``body`` with every ``"key"`` written with its first letter as a \\u escape (same JSON)."""
    escaped = b'"\\u%04x' % key[0] + key[1:] + b'"'
    out = body.replace(b'"' + key + b'"', escaped)
    assert out != body
    return out


RESTRICTED_NOTE = "Restricted finding: disclosed under seal"


def _restricted_cbc() -> dict[str, Any]:
    return observation(
        "obs-sealed-r-4e1", meta={"versionId": "3", "security": [{"system": V3_CONF, "code": "R"}]},
        note=[{"text": RESTRICTED_NOTE}],
    )


@pytest.mark.parametrize("interaction", ["search", "read"])
async def test_meta_security_spelled_with_an_escape_still_labels(
    request: pytest.FixtureRequest, world: FakeFhir, make_gateway: MakeGateway, interaction: str,
) -> None:
    """``"\\u0073ecurity"`` is the key ``security`` to every JSON reader; a view that looks for
    the bytes ``"security"`` in ``meta`` leaves meta out and decides without the R label."""
    sealed = _restricted_cbc()
    if interaction == "search":
        raw = _escaped(orjson.dumps(searchset([c.ANA_CBC, sealed], world.base_url)), b"security")
        serve(world, {("GET", "/Observation"): lambda r: answer(raw)})
        path = f"/Observation?patient={c.PAT_ANA}"
    else:
        raw = _escaped(orjson.dumps(sealed), b"security")
        serve(world, {("GET", f"/Observation/{sealed['id']}"): lambda r: answer(raw)})
        path = f"/Observation/{sealed['id']}"
    gw = await make_gateway(world.base_url)
    status, headers, body = await search(gw, path)
    assert leaks(body, headers, (RESTRICTED_NOTE, sealed["id"])) == [], body[:400]
    if interaction == "search":
        assert status == 200 and ids_in(body) == {c.ANA_CBC["id"]}
    else:
        assert status == 403


async def test_meta_profile_spelled_with_an_escape_still_matches_a_profile_class(
    request: pytest.FixtureRequest, fake_fhir: FakeFhir, make_gateway: MakeGateway,
) -> None:
    """A consent denying a profile (class = canonical URL) must match ``"\\u0070rofile"``."""
    c.seed_all(fake_fhir)
    fake_fhir.add(consent("consent-noforensic", c.PAT_ANA, {
        "type": "permit",
        "provision": [{"type": "deny", "class": [{"system": "urn:ietf:rfc:3986", "code": HIDDEN_PROFILE}]}],
    }))
    forensic = observation("obs-forensic-7b2", meta={"profile": [HIDDEN_PROFILE]}, note=[{"text": RESTRICTED_NOTE}])
    raw = _escaped(orjson.dumps(searchset([c.ANA_CBC, forensic], fake_fhir.base_url)), b"profile")
    serve(fake_fhir, {("GET", "/Observation"): lambda r: answer(raw)})
    gw = await make_gateway(fake_fhir.base_url)
    status, headers, body = await search(gw)
    assert status == 200, body
    assert ids_in(body) == {c.ANA_CBC["id"]}
    assert leaks(body, headers, (RESTRICTED_NOTE, forensic["id"])) == []


@pytest.mark.parametrize("spelling", [
    b'"meta":{"versionId":"3","security" : [{"system":"%s","code":"R"}]}',
    b'"meta":{"versionId":"3","extension":[{"url":"urn:x","valueString":"a"}],"security":[{"system":"%s","code":"R"}]}',
    b'"meta":{"security":[{"system":"%s","code":"R"}],"lastUpdated":"2024-01-01T00:00:00Z"}',
    b'"meta":{\n  "security": [ {"system": "%s", "code": "R"} ]\n}',
])
async def test_meta_security_spelled_otherwise_still_labels(
    world: FakeFhir, make_gateway: MakeGateway, spelling: bytes,
) -> None:
    """Whitespace inside meta, security after other keys, a pretty-printed meta: the R label holds."""
    plain = observation("obs-sealed-r-4e1", note=[{"text": RESTRICTED_NOTE}])
    text = orjson.dumps(plain)
    text = text[:-1] + b"," + spelling.replace(b"%s", V3_CONF.encode()) + b"}"
    raw = orjson.dumps(searchset([c.ANA_CBC], world.base_url))
    raw = raw.replace(b'"entry":[', b'"entry":[{"fullUrl":"%s/Observation/obs-sealed-r-4e1","resource":%s,'
                      b'"search":{"mode":"match"}},' % (world.base_url.encode(), text))
    serve(world, {("GET", "/Observation"): lambda r: answer(raw)})
    gw = await make_gateway(world.base_url)
    status, headers, body = await search(gw)
    assert status == 200, body
    assert ids_in(body) == {c.ANA_CBC["id"]}
    assert leaks(body, headers, (RESTRICTED_NOTE, "obs-sealed-r-4e1")) == []


# ================================================================ 2. repeated keys at every level


def _with_entry_text(base: str, resource_text: bytes, rid: str, rtype: str = "Observation") -> bytes:
    """A search set of Ana's CBC and one more entry whose resource is written as ``resource_text``."""
    raw = orjson.dumps(searchset([c.ANA_CBC], base))
    entry = b'{"fullUrl":"%s/%s/%s","resource":%s,"search":{"mode":"match"}}' % (
        base.encode(), rtype.encode(), rid.encode(), resource_text)
    return raw.replace(b'"entry":[', b'"entry":[' + entry + b",")


SUBJECT_ANA = b'{"reference":"%s"}' % c.PAT_ANA.encode()
SUBJECT_BEN = b'{"reference":"%s"}' % c.PAT_BEN.encode()
HIV_CODE = orjson.dumps(c.HIV_CONDITION["code"])
HTN_CODE = orjson.dumps(c.ANA_HYPERTENSION["code"])


@pytest.mark.parametrize("where", [
    # a deciding element named twice at the resource's top level: the subject, the code
    b'{"resourceType":"Condition","id":"cond-dup-1","subject":%(ben)s,"code":%(hiv)s,"subject":%(ana)s}',
    b'{"resourceType":"Condition","id":"cond-dup-1","code":%(hiv)s,"subject":%(ana)s,"code":%(htn)s}',
    # a key twice inside a deciding element: the coding's code, the subject's reference
    b'{"resourceType":"Condition","id":"cond-dup-1","code":{"coding":[{"system":"%(icd)s","code":"B20","code":"I10"}]},'
    b'"subject":%(ana)s}',
    b'{"resourceType":"Condition","id":"cond-dup-1","code":%(hiv)s,'
    b'"subject":{"reference":"%(pana)s","reference":"%(pben)s"}}',
    # meta.security named twice (the second empty)
    b'{"resourceType":"Condition","id":"cond-dup-1","meta":{"security":[{"system":"%(conf)s","code":"R"}],"security":[]},'
    b'"code":%(htn)s,"subject":%(ana)s,"note":[{"text":"Human immunodeficiency virus"}]}',
    # the resourceType itself twice
    b'{"resourceType":"Condition","id":"cond-dup-1","code":%(hiv)s,"subject":%(ana)s,"resourceType":"Basic"}',
])
async def test_repeated_deciding_keys_are_refused(world: FakeFhir, make_gateway: MakeGateway, where: bytes) -> None:
    """A key given twice where the decision reads is a 502 on either path (CONTRACT §6)."""
    text = where % {b"ben": SUBJECT_BEN, b"ana": SUBJECT_ANA, b"hiv": HIV_CODE, b"htn": HTN_CODE,
                    b"icd": c.ICD10CM.encode(), b"pana": c.PAT_ANA.encode(), b"pben": c.PAT_BEN.encode(),
                    b"conf": V3_CONF.encode()}
    raw = _with_entry_text(world.base_url, text, "cond-dup-1", "Condition")
    serve(world, {("GET", "/Observation"): lambda r: answer(raw)})
    gw = await make_gateway(world.base_url)
    status, headers, body = await search(gw)
    assert status == 502, body
    assert leaks(body, headers, (*HIV_SECRETS, "cond-dup-1")) == []


@pytest.mark.parametrize("where", [
    b'"entry":[{"fullUrl":"u1","fullUrl":"u2",',
    b'"entry":[{"search":{"mode":"include"},"search":{"mode":"match"},',
    b'"type":"searchset","type":"batch-response",',
    b'"entry":[],"entry":[{',
])
async def test_repeated_keys_at_the_bundle_and_entry_levels_are_refused(
    world: FakeFhir, make_gateway: MakeGateway, where: bytes,
) -> None:
    hidden = hiv_condition("cond-hiv-dup-2", c.PAT_ANA)
    raw = orjson.dumps(searchset([hidden, c.ANA_CBC], world.base_url))
    if where.startswith(b'"entry":[],'):
        raw = raw.replace(b'"entry":[{', where, 1)  # an empty list first, the hidden one after
    elif where.startswith(b'"entry"'):
        raw = raw.replace(b'"entry":[{', where, 1)
    else:
        raw = raw.replace(b'"type":"searchset",', where, 1)
    serve(world, {("GET", "/Observation"): lambda r: answer(raw)})
    gw = await make_gateway(world.base_url)
    status, headers, body = await search(gw)
    assert status == 502, body
    assert leaks(body, headers, (*HIV_SECRETS, "cond-hiv-dup-2")) == []


@pytest.mark.parametrize("where", [
    b'"note":[{"text":"first reading","text":"second reading"}]',
    b'"meta":{"versionId":"1","versionId":"2"}',
])
async def test_repeated_keys_in_elements_no_decision_reads_are_refused_too(
    request: pytest.FixtureRequest, world: FakeFhir, make_gateway: MakeGateway, where: bytes,
) -> None:
    """CONTRACT §6: duplicate JSON keys in patient data -> 502, on either path; the kept entry
    would otherwise reach a first-key reader as one text and a last-key reader as another."""
    text = orjson.dumps(observation("obs-dup-note-3"))
    text = text[:-1] + b"," + where + b"}"
    raw = _with_entry_text(world.base_url, text, "obs-dup-note-3")
    serve(world, {("GET", "/Observation"): lambda r: answer(raw)})
    gw = await make_gateway(world.base_url)
    status, _, body = await search(gw)
    assert status == 502, body[:300]


# ================================================================ 3. displays on spliced entries


HIV_DISPLAY = "Human immunodeficiency virus [HIV] disease"


def _cbc_naming_hiv(reference: bytes = b"Condition/cond-hiv-b20-91a", key: bytes = b"display",
                    rid: str = "obs-cbc-names-hiv") -> bytes:
    text = orjson.dumps(observation(rid, hasMember=[{"reference": "REF", "display": HIV_DISPLAY}]))
    return text.replace(b'"REF"', b'"' + reference + b'"').replace(
        b'"display":"' + HIV_DISPLAY.encode() + b'"', b'"' + key + b'":"' + HIV_DISPLAY.encode() + b'"')


@pytest.mark.parametrize("reference", [
    b"Condition/cond-hiv-b20-91a",
    b"Condition\\/cond-hiv-b20-91a",
    b"http:\\/\\/fhir.example\\/Condition\\/cond-hiv-b20-91a\\/_history\\/2",
    b"Condition/cond-hiv-b20-\\u0039\\u0031a",
])
async def test_display_of_a_hidden_record_is_scrubbed_from_a_kept_entry(
    world: FakeFhir, make_gateway: MakeGateway, reference: bytes,
) -> None:
    """The kept CBC names Ana's hidden HIV condition (withheld in the same answer) with a display,
    its reference spelled with ``\\/`` or ``\\u`` escapes: the display goes."""
    text = _cbc_naming_hiv(reference)
    raw = orjson.dumps(searchset([c.HIV_CONDITION, c.ANA_CBC], world.base_url))
    raw = raw.replace(b'"entry":[', b'"entry":[{"fullUrl":"x","resource":%s,"search":{"mode":"match"}},' % text)
    serve(world, {("GET", "/Observation"): lambda r: answer(raw)})
    gw = await make_gateway(world.base_url)
    status, headers, body = await search(gw)
    assert status == 200, body
    assert ids_in(body) == {c.ANA_CBC["id"], "obs-cbc-names-hiv"}
    assert leaks(body, headers, (HIV_DISPLAY, "B20")) == []
    # the other kept entry goes out as the upstream wrote it
    assert orjson.dumps(c.ANA_CBC) in body


async def test_display_key_spelled_with_an_escape_is_scrubbed_too(
    request: pytest.FixtureRequest, world: FakeFhir, make_gateway: MakeGateway,
) -> None:
    """``"displa\\u0079"`` is ``display`` to the client."""
    text = _cbc_naming_hiv(key=b"displa\\u0079")
    raw = orjson.dumps(searchset([c.HIV_CONDITION, c.ANA_CBC], world.base_url))
    raw = raw.replace(b'"entry":[', b'"entry":[{"fullUrl":"x","resource":%s,"search":{"mode":"match"}},' % text)
    raw = raw.replace(b'"display"', b'"displa\\u0079"')  # every display key spelled alike
    serve(world, {("GET", "/Observation"): lambda r: answer(raw)})
    gw = await make_gateway(world.base_url)
    status, headers, body = await search(gw)
    assert status == 200, body
    assert "obs-cbc-names-hiv" in ids_in(body)
    assert leaks(body, headers, (HIV_DISPLAY,)) == []


async def test_display_in_a_read_without_id_is_scrubbed(
    request: pytest.FixtureRequest, world: FakeFhir, make_gateway: MakeGateway,
) -> None:
    """A read whose answer has no ``id`` (nothing released by Type/id) still loses the display of
    the hidden record it names."""
    text = orjson.loads(_cbc_naming_hiv())
    del text["id"]
    serve(world, {("GET", "/Observation/obs-cbc-names-hiv"): lambda r: answer(orjson.dumps(text))})
    gw = await make_gateway(world.base_url)
    status, headers, body = await search(gw, "/Observation/obs-cbc-names-hiv")
    assert status == 200, body
    assert leaks(body, headers, (HIV_DISPLAY,)) == []


async def test_a_contained_resource_never_releases_the_display_of_a_hidden_record_of_its_id(
    world: FakeFhir, make_gateway: MakeGateway,
) -> None:
    """The kept CBC contains an unrelated Condition whose local id is the hidden HIV
    condition's, and names the hidden one by ``Condition/<id>`` with a display: a contained
    resource is not addressable, so it does not make the server's record released."""
    text = orjson.loads(_cbc_naming_hiv())
    text["contained"] = [{"resourceType": "Condition", "id": c.HIV_CONDITION["id"],
                          "code": {"text": "essential hypertension"}, "subject": {"reference": c.PAT_ANA}}]
    raw = orjson.dumps(searchset([c.HIV_CONDITION, c.ANA_CBC], world.base_url))
    raw = raw.replace(b'"entry":[', b'"entry":[{"fullUrl":"x","resource":%s,"search":{"mode":"match"}},'
                      % orjson.dumps(text))
    serve(world, {("GET", "/Observation"): lambda r: answer(raw)})
    gw = await make_gateway(world.base_url)
    status, headers, body = await search(gw)
    assert status == 200, body
    assert "obs-cbc-names-hiv" in ids_in(body)
    assert leaks(body, headers, (HIV_DISPLAY,)) == []


# ================================================================ 4. element texts shared between resources


US_CORE_CONDITION = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-condition-problems-health-concerns"
SHARED_META = {"versionId": "1", "profile": [US_CORE_CONDITION]}


@pytest.fixture
def ben_opens_hiv(fake_fhir: FakeFhir) -> FakeFhir:
    """Ben's consent opens his HIV records; Ana's general opt-in does not."""
    c.seed_all(fake_fhir)
    fake_fhir.add(c.opt_in(c.PAT_ANA), c.opt_in(c.PAT_BEN, "consent-ben-hiv", labels=("HIV",)))
    return fake_fhir


async def test_identical_texts_of_two_patients_are_decided_per_patient(
    ben_opens_hiv: FakeFhir, make_gateway: MakeGateway,
) -> None:
    """Ana's and Ben's HIV conditions write code, category, meta alike (one shared parse); Ben's
    consent opens his, Ana's does not; the DS4P label put on Ben's kept one reaches neither
    Ana's (withheld) nor Ben's ordinary record of the same meta, in this answer or the next."""
    world = ben_opens_hiv
    ben_hiv = {**hiv_condition("cond-hiv-ben-1", c.PAT_BEN), "meta": SHARED_META}
    ana_hiv = {**hiv_condition("cond-hiv-ana-2", c.PAT_ANA), "meta": SHARED_META}
    ben_htn = {**c.BEN_HYPERTENSION, "meta": SHARED_META}
    first = orjson.dumps(searchset([ben_hiv, ana_hiv, ben_htn], world.base_url))
    again = orjson.dumps(searchset([ana_hiv, ben_htn], world.base_url))
    answers = iter([first, again])
    serve(world, {("GET", "/Condition"): lambda r: answer(next(answers)),
                  ("GET", f"/Condition/{ben_htn['id']}"): lambda r: answer(orjson.dumps(ben_htn))})
    gw = await make_gateway(world.base_url)
    path = f"/Condition?patient={c.PAT_ANA},{c.PAT_BEN}"
    status, headers, body = await search(gw, path)
    assert status == 200, body
    assert ids_in(body) == {"cond-hiv-ben-1", ben_htn["id"]}
    kept = {e["resource"]["id"]: e["resource"] for e in entries(body) if "id" in e.get("resource", {})}
    assert {s["code"] for s in kept["cond-hiv-ben-1"]["meta"]["security"]} >= {"HIV"}
    assert kept[ben_htn["id"]]["meta"] == SHARED_META
    assert leaks(body, headers, ("cond-hiv-ana-2",)) == []
    # the next request (same element texts, parsed or remembered) is decided afresh per patient
    status, headers, body = await search(gw, path)
    assert status == 200 and ids_in(body) == {ben_htn["id"]}, body
    assert b'"security"' not in body and leaks(body, headers, ("cond-hiv-ana-2", "B20")) == []
    status, _, body = await search(gw, f"/Condition/{ben_htn['id']}")
    assert status == 200 and body == orjson.dumps(ben_htn)


async def test_long_identical_texts_are_decided_per_patient(ben_opens_hiv: FakeFhir, make_gateway: MakeGateway) -> None:
    """Element texts over the sharing limit (2 KiB) are parsed per resource and decided alike."""
    world = ben_opens_hiv
    long_code = {**c.HIV_CONDITION["code"], "text": "HIV disease; " + "history reviewed. " * 200}
    ben_hiv = {**hiv_condition("cond-hiv-ben-long", c.PAT_BEN), "code": long_code}
    ana_hiv = {**hiv_condition("cond-hiv-ana-long", c.PAT_ANA), "code": long_code}
    raw = orjson.dumps(searchset([ana_hiv, ben_hiv, c.ANA_HYPERTENSION], world.base_url))
    serve(world, {("GET", "/Condition"): lambda r: answer(raw)})
    gw = await make_gateway(world.base_url)
    status, headers, body = await search(gw, f"/Condition?patient={c.PAT_ANA},{c.PAT_BEN}")
    assert status == 200, body
    assert ids_in(body) == {"cond-hiv-ben-long", c.ANA_HYPERTENSION["id"]}
    assert leaks(body, headers, ("cond-hiv-ana-long",)) == []


# ================================================================ 5. labels remembered by text


def _report(rid: str, **extra: Any) -> dict[str, Any]:
    report = {k: v for k, v in c.cbc_report_with_contained_hiv().items() if k not in ("contained", "result")}
    return {**report, "id": rid, **extra}


@pytest.mark.parametrize("twin", ["contained", "security", "extension", "meta-security-after-profile",
                                  "escaped-security-after-profile"])
async def test_label_memo_does_not_cover_a_twin_that_differs_outside_the_remembered_text(
    request: pytest.FixtureRequest, world: FakeFhir, make_gateway: MakeGateway, twin: str,
) -> None:
    """Two DiagnosticReports whose code, category and subject are byte-identical; the second
    carries its sensitivity elsewhere (a contained HIV result, its own meta.security R, an
    extension coding B20): remembered labels of the first must not clear the second, in the
    same answer or in a later request."""
    plain = _report("dr-plain-1")
    sensitive: dict[str, Any]
    if twin == "contained":
        sensitive = {**c.cbc_report_with_contained_hiv(), "id": "dr-twin-2"}
    elif twin == "security":
        sensitive = _report("dr-twin-2", meta={"security": [{"system": V3_CONF, "code": "R"}]})
    elif twin == "extension":
        sensitive = _report("dr-twin-2", extension=[{
            "url": "http://hl7.org/fhir/StructureDefinition/condition-dueTo",
            "valueCodeableConcept": c.HIV_CONDITION["code"]}])
    else:
        sensitive = _report("dr-twin-2", meta={"profile": [US_CORE_CONDITION],
                                               "security": [{"system": V3_CONF, "code": "R"}]})
    together = orjson.dumps(searchset([plain, sensitive], world.base_url))
    plain_only = orjson.dumps(searchset([plain], world.base_url))
    alone = orjson.dumps(searchset([sensitive], world.base_url))
    if twin.startswith("escaped"):
        together, alone = _escaped(together, b"security"), _escaped(alone, b"security")
    answers = iter([plain_only, alone, together])
    serve(world, {("GET", "/DiagnosticReport"): lambda r: answer(next(answers))})
    gw = await make_gateway(world.base_url)
    path = f"/DiagnosticReport?patient={c.PAT_ANA}"
    for expected in ({"dr-plain-1"}, set(), {"dr-plain-1"}):
        status, headers, body = await search(gw, path)
        assert status == 200, body
        assert ids_in(body) == expected, body[:300]
        assert leaks(body, headers, ("dr-twin-2", "contained-hiv-1", "B20")) == []


# ================================================================ 6. decisions shared across requests


async def _kept(gw: GatewayUnderTest, actor: str = c.DOCTOR, path: str = f"/Observation?patient={c.PAT_ANA}",
                **headers: str) -> set[str]:
    status, _, body = await search(gw, path, actor=actor, **headers)
    assert status in (200, 403), body
    return ids_in(body) if status == 200 else set()


async def test_consent_revoked_and_invalidated_is_not_served_from_the_decision_cache(
    world: FakeFhir, make_gateway: MakeGateway,
) -> None:
    gw = await make_gateway(world.base_url)
    assert await _kept(gw) == {c.ANA_CBC["id"]}
    assert await _kept(gw) == {c.ANA_CBC["id"]}  # decided once, then served from the cache
    world.add(c.opt_out(c.PAT_ANA, "consent-optin"))  # the same Consent, now an opt-out
    async with gw.session.post(gw.admin_url + "/cache/invalidate", json={"patient": c.PAT_ANA}) as resp:
        assert resp.status == 200
    assert await _kept(gw) == set()


async def test_consent_revoked_through_the_gateway_is_not_served_from_the_decision_cache(
    world: FakeFhir, make_gateway: MakeGateway,
) -> None:
    gw = await make_gateway(world.base_url)
    assert await _kept(gw) == {c.ANA_CBC["id"]}
    status, _, body = await call(gw, "PUT", "/Consent/consent-optin", actor=c.PAT_ANA,
                                 body=c.opt_out(c.PAT_ANA, "consent-optin"))
    assert status in (200, 201), body
    assert await _kept(gw) == set()
    # and a new permit opens again at once
    status, _, body = await call(gw, "PUT", "/Consent/consent-optin", actor=c.PAT_ANA,
                                 body=c.opt_in(c.PAT_ANA, "consent-optin"))
    assert status in (200, 201), body
    assert await _kept(gw) == {c.ANA_CBC["id"]}


async def test_consent_changed_upstream_is_not_served_from_the_decision_cache_after_the_ttl(
    world: FakeFhir, make_gateway: MakeGateway,
) -> None:
    """No invalidation at all: once the consent cache refills (``cache_ttl_s``), the decisions
    made on the old consents are not reused."""
    gw = await make_gateway(world.base_url, consent={"cache_ttl_s": 0.5})
    assert await _kept(gw) == {c.ANA_CBC["id"]}
    assert await _kept(gw) == {c.ANA_CBC["id"]}
    world.add(c.opt_out(c.PAT_ANA, "consent-optin"))
    await asyncio.sleep(0.8)
    assert await _kept(gw) == set()


async def test_requesters_differing_only_by_organization_get_their_own_decisions(
    fake_fhir: FakeFhir, make_gateway: MakeGateway,
) -> None:
    c.seed_all(fake_fhir)
    fake_fhir.add(c.not_this_doctor(c.PAT_ANA, "Organization/org-insurer-x"))
    gw = await make_gateway(fake_fhir.base_url)
    for org, expected in (("Organization/org-clinic-y", {c.ANA_CBC["id"]}), ("Organization/org-insurer-x", set()),
                          ("Organization/org-clinic-y", {c.ANA_CBC["id"]}), ("Organization/org-insurer-x", set())):
        assert await _kept(gw, **{"X-Actor-Organization": org}) == expected, org
    assert await _kept(gw) == {c.ANA_CBC["id"]}  # no organization at all


async def test_requests_differing_only_by_purpose_get_their_own_decisions(
    fake_fhir: FakeFhir, make_gateway: MakeGateway,
) -> None:
    c.seed_all(fake_fhir)
    fake_fhir.add(consent("consent-treat-only", c.PAT_ANA, {
        "type": "permit", "purpose": [{"system": PURPOSE_SYSTEM, "code": "TREAT"}]}))
    gw = await make_gateway(fake_fhir.base_url)
    for purpose, expected in (("TREAT", {c.ANA_CBC["id"]}), ("HPAYMT", set()), ("ETREAT", {c.ANA_CBC["id"]}),
                              ("HRESCH", set()), ("TREAT", {c.ANA_CBC["id"]})):
        assert await _kept(gw, **{"X-Purpose-Of-Use": purpose}) == expected, purpose


async def test_requesters_differing_only_by_actor_get_their_own_decisions(
    ben_opens_hiv: FakeFhir, make_gateway: MakeGateway,
) -> None:
    world = ben_opens_hiv
    world.add(c.not_this_doctor(c.PAT_ANA, c.BANNED_DOCTOR, "consent-ana-notdoc"))
    gw = await make_gateway(world.base_url)
    path = f"/Condition?patient={c.PAT_ANA}"
    ana_all = {r["id"] for r in (c.HIV_CONDITION, c.OUD_CONDITION, c.DEPRESSION, c.ANA_HYPERTENSION)}
    assert await _kept(gw, c.PAT_ANA, path) == ana_all  # self access
    assert await _kept(gw, c.DOCTOR, path) == {c.ANA_HYPERTENSION["id"]}
    assert await _kept(gw, c.BANNED_DOCTOR, path) == set()
    assert await _kept(gw, c.PAT_BEN, path) == {c.ANA_HYPERTENSION["id"]}  # the opt-in names no one
    assert await _kept(gw, c.DOCTOR, path) == {c.ANA_HYPERTENSION["id"]}


async def test_tokens_differing_only_by_scopes_get_their_own_answers(
    world: FakeFhir, issuer: LocalIssuer, make_gateway: MakeGateway,
) -> None:
    gw = await make_gateway(world.base_url, **jwt_config(issuer))
    path = f"/Observation?patient={c.PAT_ANA}"
    for scope, expected in (("user/*.rs", {c.ANA_CBC["id"]}), ("user/Condition.rs", set()),
                            ("user/Observation.rs", {c.ANA_CBC["id"]}), ("user/Patient.rs", set())):
        status, _, body = await jcall(gw, "GET", path, bearer(issuer, scope))
        assert status in (200, 403), body
        assert (ids_in(body) if status == 200 else set()) == expected, scope


async def test_a_consent_period_that_ends_is_not_served_from_an_earlier_decision(
    fake_fhir: FakeFhir, make_gateway: MakeGateway,
) -> None:
    """A permit valid until a second from now (the root period: the consent's validity) and a
    nested exception (deny) that starts then: decisions cached before either edge must expire."""
    c.seed_all(fake_fhir)
    ends, ends_text = soon(1.0)
    fake_fhir.add(c.opt_in(c.PAT_BEN, "consent-ben-in"))
    fake_fhir.add(consent("consent-ana-until", c.PAT_ANA, {"type": "permit", "period": {"end": ends_text}}))
    fake_fhir.add(consent("consent-ben-later", c.PAT_BEN, {
        "type": "permit", "provision": [{"type": "deny", "period": {"start": ends_text}}]}))
    gw = await make_gateway(fake_fhir.base_url)
    ana, ben = f"/Observation?patient={c.PAT_ANA}", f"/Observation?patient={c.PAT_BEN}"
    assert await _kept(gw, path=ana) == {c.ANA_CBC["id"]}
    assert await _kept(gw, path=ben) == {c.BEN_CBC["id"]}
    await sleep_past(ends)
    assert await _kept(gw, path=ana) == set()
    assert await _kept(gw, path=ben) == set()


# ================================================================ 7. what a spliced answer is made of


async def test_spliced_answer_drops_total_rewrites_links_and_counts_its_own_bytes(
    request: pytest.FixtureRequest, world: FakeFhir, make_gateway: MakeGateway,
) -> None:
    """Withheld entries gone, Bundle.total gone, every upstream URL rewritten, the kept entries
    byte for byte as the upstream wrote them (4.10 stays 4.10), Content-Length the body's (a
    large answer, on views, is chunked instead)."""
    labs = [observation(f"obs-hb-{i}", valueQuantity={"value": 4.1, "unit": "g/dL"}) for i in range(3)]
    raw = orjson.dumps(searchset([labs[0], c.HIV_CONDITION, labs[1], c.OUD_CONDITION, labs[2]], world.base_url))
    raw = raw.replace(b'"value":4.1,', b'"value":4.10,')
    raw = raw.replace(b'"link":[', b'"link":[{"relation":"next","url":"%s/Observation?page=2"},' % world.base_url.encode())
    serve(world, {("GET", "/Observation"): lambda r: answer(raw)})
    gw = await make_gateway(world.base_url)
    status, headers, body = await search(gw)
    assert status == 200, body
    assert headers["X-Consent-Decision"] == "filtered"
    if path_of(request) == "views":
        # A large answer is sent in chunks, never joined whole in memory.
        assert "Content-Length" not in headers and headers.get("Transfer-Encoding") == "chunked"
    else:
        assert int(headers["Content-Length"]) == len(body)
    bundle = orjson.loads(body)
    assert "total" not in bundle
    assert [e["resource"]["id"] for e in bundle["entry"] if e["search"]["mode"] == "match"] == [r["id"] for r in labs]
    assert world.base_url.encode() not in body
    assert all(link["url"].startswith(gw.url) for link in bundle["link"])
    for lab in labs:
        written = orjson.dumps(lab).replace(b'"value":4.1,', b'"value":4.10,')
        assert written in body
    assert leaks(body, headers, HIV_SECRETS + ("F11.20", "Opioid")) == []


async def test_an_answer_nothing_is_withheld_from_goes_out_byte_for_byte(
    world: FakeFhir, make_gateway: MakeGateway,
) -> None:
    raw = orjson.dumps(searchset([c.ANA_CBC, c.ANA_HYPERTENSION], world.base_url))
    raw = raw.replace(b'"total":2,', b"").replace(b'"status":"final"', b'"status":"final","valueDecimal":1.50')
    serve(world, {("GET", "/Observation"): lambda r: answer(raw)})
    gw = await make_gateway(world.base_url)
    status, headers, body = await search(gw)
    assert status == 200 and headers["X-Consent-Decision"] == "permit", body
    assert body == raw.replace(world.base_url.encode(), gw.url.encode())


def kept_ids(body: bytes) -> set[str]:
    found = set()
    for entry in entries(body):
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if isinstance(resource, dict) and isinstance(resource.get("id"), str):
            found.add(resource["id"])
    return found


ODD_ENTRIES_HOLD = [
    b'{"search":{"mode":"outcome"},"resource":{"resourceType":"OperationOutcome","issue":[{"severity":"warning","code":"processing"}]}}',
    b'{"fullUrl":"urn:uuid:0d1f","search":{"mode":"match"}}',
    b'{"resource":null,"search":{"mode":"match"}}',
    b'{"resource":[%(hiv)s],"search":{"mode":"match"}}',
    b'{"resource":"%(hivs)s","search":{"mode":"match"}}',
    b'{"resource":{"resourceType":"Condition","id":"big-1","subject":{"reference":"%(ana)s"},"code":%(code)s,'
    b'"onsetAge":{"value":1e400}}}',
    b'{"resource":{"resourceType":"Condition","id":"nan-1","subject":{"reference":"%(ana)s"},"code":%(code)s,'
    b'"onsetAge":{"value":NaN}}}',
]
# Were passed as non-patient data: a type no table knows, or none, now closes.
ODD_ENTRIES_LEAK = [
    b'{"resource":{"resourceType":"FutureFinding","id":"ff-1","subject":{"reference":"%(ana)s"},"code":%(code)s}}',
    b'{"resource":{"id":"no-type-1","subject":{"reference":"%(ana)s"},"code":%(code)s}}',
    b'{"resource":{"resourceType":null,"id":"null-type-1","subject":{"reference":"%(ana)s"},"code":%(code)s}}',
]


@pytest.mark.parametrize("odd", [*ODD_ENTRIES_HOLD, *ODD_ENTRIES_LEAK])
async def test_odd_entries_beside_a_hidden_record(world: FakeFhir, make_gateway: MakeGateway, odd: bytes) -> None:
    """Outcome entries, entries without a resource, resources that are null, an array, a string,
    with a huge number or NaN, of a type no table knows, without a type: the hidden record stays
    hidden, and an odd entry carrying its codes goes or closes the answer (403/502)."""
    hiv = orjson.dumps(c.HIV_CONDITION)
    entry = odd % {b"hiv": hiv, b"hivs": hiv.replace(b'"', b'\\"'), b"ana": c.PAT_ANA.encode(),
                   b"code": orjson.dumps(c.HIV_CONDITION["code"])}
    raw = orjson.dumps(searchset([c.HIV_CONDITION, c.ANA_HYPERTENSION], world.base_url))
    raw = raw.replace(b'"entry":[', b'"entry":[' + entry + b",")
    serve(world, {("GET", "/Condition"): lambda r: answer(raw)})
    gw = await make_gateway(world.base_url)
    status, headers, body = await search(gw, f"/Condition?patient={c.PAT_ANA}")
    assert status in (200, 403, 502), body
    assert leaks(body, headers, HIV_SECRETS) == [], body[:500]
    if status == 200:
        assert c.ANA_HYPERTENSION["id"] in kept_ids(body)


# ================================================================ 8. large answers, fallbacks, owners, break-glass


async def test_an_answer_over_the_view_threshold_decides_and_splices_like_a_small_one(
    request: pytest.FixtureRequest, world: FakeFhir, make_gateway: MakeGateway,
) -> None:
    """The same records in a 1 MiB+ answer (views) and in a small one (parsed whole): the same
    entries withheld, the kept ones byte for byte (4.10 stays 4.10)."""
    if path_of(request) == "views":
        pytest.skip("sets the threshold itself: one run covers both paths")
    threshold = 1024 * 1024
    gw = await make_gateway(world.base_url, upstream={"views_above_bytes": threshold})
    hidden = [c.HIV_CONDITION, c.HIV_TEST, c.DEPRESSION, c.PSYCHOTHERAPY_NOTE, c.RESTRICTED_DOCUMENT]

    def page(count: int) -> bytes:
        labs = [observation(f"obs-hb-{i:05d}", valueQuantity={"value": 4.1, "unit": "g/dL"}) for i in range(count)]
        mixed: list[dict[str, Any]] = []
        for i, lab in enumerate(labs):
            mixed.append(lab)
            if i % 97 == 0:
                mixed.append(hidden[(i // 97) % len(hidden)])
        return orjson.dumps(searchset(mixed, world.base_url)).replace(b'"value":4.1,', b'"value":4.10,')

    large, small = page(1400), page(40)
    assert len(large) > threshold > len(small)
    for raw in (large, small):
        body_of: Callable[[web.Request], web.Response] = functools.partial(lambda text, _r: answer(text), raw)
        serve(world, {("GET", "/Observation"): body_of})
        status, headers, body = await search(gw)
        assert status == 200 and headers["X-Consent-Decision"] == "filtered", body[:300]
        kept = [e for e in entries(body) if e["search"]["mode"] == "match"]
        assert all(e["resource"]["id"].startswith("obs-hb-") for e in kept)
        upstream_entries = orjson.loads(raw)["entry"]
        assert len(kept) == sum(1 for e in upstream_entries if e["resource"]["id"].startswith("obs-hb-"))
        assert body.count(b'"value":4.10,') == len(kept)
        assert leaks(body, headers) == []


async def test_consents_reading_codes_anywhere_decide_whole_resources(
    fake_fhir: FakeFhir, make_gateway: MakeGateway,
) -> None:
    """A deny naming a code that only a component carries (no view holds it): the views step aside."""
    c.seed_all(fake_fhir)
    fake_fhir.add(consent("consent-no-cd4", c.PAT_ANA, {
        "type": "permit", "provision": [{"type": "deny", "code": [c.concept(c.LOINC, "24467-3", "CD4 count")]}]}))
    panel = observation("obs-panel-cd4", component=[{"code": c.concept(c.LOINC, "24467-3", "CD3+CD4+ cells"),
                                                     "valueQuantity": {"value": 310}}])
    raw = orjson.dumps(searchset([c.ANA_CBC, panel], fake_fhir.base_url))
    serve(fake_fhir, {("GET", "/Observation"): lambda r: answer(raw)})
    gw = await make_gateway(fake_fhir.base_url)
    status, headers, body = await search(gw)
    assert status == 200, body
    assert ids_in(body) == {c.ANA_CBC["id"]}
    assert leaks(body, headers, ("obs-panel-cd4", "24467-3", "CD3+CD4+")) == []


async def test_a_record_of_two_patients_follows_each_ones_revocation(
    world: FakeFhir, make_gateway: MakeGateway,
) -> None:
    """Ana's result performed on Ben belongs to both; Ben's revocation (a write through the
    gateway) closes it though Ana's consent, and the cached decision, did not change."""
    joint = observation("obs-joint-ab", performer=[{"reference": c.PAT_BEN}])
    raw = orjson.dumps(searchset([c.ANA_CBC, joint], world.base_url))
    serve(world, {("GET", "/Observation"): lambda r: answer(raw)})
    gw = await make_gateway(world.base_url)
    assert await _kept(gw) == {c.ANA_CBC["id"], "obs-joint-ab"}
    status, _, body = await call(gw, "PUT", "/Consent/consent-ben-in", actor=c.PAT_BEN,
                                 body=c.opt_out(c.PAT_BEN, "consent-ben-in"))
    assert status in (200, 201), body
    assert await _kept(gw) == {c.ANA_CBC["id"]}


async def test_break_glass_decisions_are_not_reused_without_the_header(
    world: FakeFhir, make_gateway: MakeGateway,
) -> None:
    gw = await make_gateway(world.base_url, break_glass={"record_consent": False})
    path = f"/Condition?patient={c.PAT_ANA}"
    status, headers, body = await search(gw, path, **{"X-Break-Glass": "Medical emergency"})
    assert status == 200 and c.HIV_CONDITION["id"] in ids_in(body), body[:300]
    assert await _kept(gw, path=path) == {c.ANA_HYPERTENSION["id"]}
    status, headers, body = await search(gw, path)
    assert leaks(body, headers, HIV_SECRETS) == []


def _whole_type_entry(kind: str, base: str) -> dict[str, Any]:
    if kind == "Bundle":
        return {"resourceType": "Bundle", "id": "coll-1", "type": "collection",
                "entry": [{"resource": c.ANA_CBC}, {"resource": c.HIV_CONDITION}]}
    if kind == "Composition":
        return {"resourceType": "Composition", "id": "comp-1", "status": "final",
                "type": c.concept(c.LOINC, "60591-5", "Patient summary Document"),
                "subject": {"reference": c.PAT_ANA}, "date": "2024-02-01", "title": "Summary",
                "author": [{"reference": c.DOCTOR}],
                "section": [{"title": "Problems", "text": {"status": "generated", "div": "<div>HIV disease</div>"},
                             "entry": [{"reference": f"Condition/{c.HIV_CONDITION['id']}"}]}]}
    return {"resourceType": "Binary", "id": "bin-hiv-1", "contentType": "text/plain",
            "securityContext": {"reference": f"Condition/{c.HIV_CONDITION['id']}"},
            "data": "SElWIGRpc2Vhc2UgY29uZmlybWVk"}


@pytest.mark.parametrize("kind", ["Bundle", "Composition", "Binary"])
async def test_entries_read_whole_inside_a_spliced_search(world: FakeFhir, make_gateway: MakeGateway, kind: str) -> None:
    """A collection Bundle, a Composition listing the withheld record, a Binary whose security
    context is it, each as an entry of a search set beside the hidden HIV condition."""
    inner = _whole_type_entry(kind, world.base_url)
    raw = orjson.dumps(searchset([c.HIV_CONDITION, inner, c.ANA_HYPERTENSION], world.base_url))
    serve(world, {("GET", "/Condition"): lambda r: answer(raw)})
    gw = await make_gateway(world.base_url)
    status, headers, body = await search(gw, f"/Condition?patient={c.PAT_ANA}")
    assert status == 200, body
    assert c.ANA_HYPERTENSION["id"] in ids_in(body)
    assert leaks(body, headers, (*HIV_SECRETS, "HIV disease", "SElWIGRpc2Vhc2UgY29uZmlybWVk")) == [], body[:600]


@pytest.mark.parametrize("spelling", [
    (b'"resource":', b'"resourc\\u0065":'),
    (b'"resourceType":"Condition"', b'"resourceType":"Conditio\\u006e"'),
    (b'"subject":{"reference":"Patient/', b'"subject":{"reference":"Patient\\/'),
    (b'"code":"B20"', b'"code":"B\\u0032\\u0030"'),
    (b'"subject":', b'"subjec\\u0074":'),
])
async def test_a_hidden_record_spelled_with_escapes_is_still_withheld(
    world: FakeFhir, make_gateway: MakeGateway, spelling: tuple[bytes, bytes],
) -> None:
    hidden = orjson.dumps(c.HIV_CONDITION)
    spelled = hidden.replace(*spelling) if spelling[0] in hidden else hidden
    entry = b'{"fullUrl":"x","resource":%s,"search":{"mode":"match"}}' % spelled
    if spelling[0] == b'"resource":':
        entry = entry.replace(*spelling)
    raw = orjson.dumps(searchset([c.ANA_HYPERTENSION], world.base_url))
    raw = raw.replace(b'"entry":[', b'"entry":[' + entry + b",")
    assert spelling[1] in raw
    serve(world, {("GET", "/Condition"): lambda r: answer(raw)})
    gw = await make_gateway(world.base_url)
    status, headers, body = await search(gw, f"/Condition?patient={c.PAT_ANA}")
    assert status in (200, 502), body
    assert leaks(body, headers, ("Human immunodeficiency virus", "86406008", c.HIV_CONDITION["id"])) == [], body[:500]


async def test_display_at_the_bundle_level_of_a_spliced_answer_is_scrubbed(
    request: pytest.FixtureRequest, world: FakeFhir, make_gateway: MakeGateway,
) -> None:
    """``Bundle.signature.who`` naming a patient the answer does not release, with a display:
    the display goes, as scrub_displays does over a whole body."""
    raw = orjson.dumps({**searchset([c.ANA_CBC, c.HIV_CONDITION], world.base_url), "signature": {
        "type": [{"system": "urn:iso-astm:E1762-95:2013", "code": "1.2.840.10065.1.12.1.1"}],
        "when": "2024-02-01T10:00:00Z", "who": {"reference": c.PAT_BEN, "display": "Ben Okafor"}}})
    serve(world, {("GET", "/Observation"): lambda r: answer(raw)})
    gw = await make_gateway(world.base_url)
    status, headers, body = await search(gw)
    assert status == 200, body
    assert ids_in(body) == {c.ANA_CBC["id"]}
    assert leaks(body, headers, ("Okafor",)) == []


async def test_upstream_urls_written_with_escaped_slashes_are_rewritten_in_kept_entries(
    request: pytest.FixtureRequest, world: FakeFhir, make_gateway: MakeGateway,
) -> None:
    """CONTRACT §6: every URL pointing at the upstream is rewritten to the gateway's base. A
    filtered answer whose kept entries write their fullUrl as ``http:\\/\\/upstream\\/fhir\\/...``."""
    raw = orjson.dumps(searchset([c.ANA_CBC, c.HIV_CONDITION], world.base_url))
    escaped_base = world.base_url.replace("/", "\\/").encode()
    raw = raw.replace(b'"fullUrl":"' + world.base_url.encode(), b'"fullUrl":"' + escaped_base)
    serve(world, {("GET", "/Observation"): lambda r: answer(raw)})
    gw = await make_gateway(world.base_url)
    status, headers, body = await search(gw)
    assert status == 200 and ids_in(body) == {c.ANA_CBC["id"]}, body
    upstream_host = world.base_url.split("//", 1)[1].split("/", 1)[0]
    assert [e["fullUrl"] for e in entries(body) if "fullUrl" in e] == [f"{gw.url}/Observation/{c.ANA_CBC['id']}"]
    assert upstream_host not in orjson.loads(body).__repr__()


async def test_emergency_window_reads_are_audited_each_time_though_decisions_are_shared(
    world: FakeFhir, make_gateway: MakeGateway,
) -> None:
    """After break-glass with a recorded window, the actor's later reads pass without the header;
    each is audited like the first, also when its decision was decided before."""
    gw = await make_gateway(world.base_url)
    path = f"/Condition?patient={c.PAT_ANA}"
    status, headers, body = await search(gw, path, **{"X-Break-Glass": "Medical emergency"})
    assert status == 200 and c.HIV_CONDITION["id"] in ids_in(body), body[:300]
    assert headers.get("X-Break-Glass-Audit-Id")
    seen = {headers["X-Break-Glass-Audit-Id"]}
    for _ in range(2):
        status, headers, body = await search(gw, path)
        assert status == 200 and c.HIV_CONDITION["id"] in ids_in(body), body[:300]
        audit_id = headers.get("X-Break-Glass-Audit-Id")
        assert audit_id and audit_id not in seen, headers
        seen.add(audit_id)
    # another clinician has no window: the shared decisions do not open it for them
    status, headers, body = await search(gw, path, actor=c.PSYCHIATRIST)
    assert "X-Break-Glass-Audit-Id" not in headers
    assert leaks(body, headers, HIV_SECRETS) == []


async def test_both_paths_send_the_same_answer_for_a_labelled_and_filtered_one(
    request: pytest.FixtureRequest, ben_opens_hiv: FakeFhir, make_gateway: MakeGateway,
) -> None:
    """One answer through a gateway that parses it whole and one that decides it on views: the
    same answer out (Ben's opened HIV records DS4P-labelled whatever their meta, Ana's withheld),
    the untouched entry byte for byte (decimals as written) on both."""
    if path_of(request) == "views":
        pytest.skip("sets the threshold itself: one run covers both paths")
    world = ben_opens_hiv
    records = [
        {**hiv_condition("cond-hiv-ben-nometa", c.PAT_BEN)},
        {**hiv_condition("cond-hiv-ben-plainmeta", c.PAT_BEN), "meta": {"versionId": "7", "lastUpdated": "2024-01-01T00:00:00Z"}},
        {**hiv_condition("cond-hiv-ben-profile", c.PAT_BEN), "meta": SHARED_META},
        {**hiv_condition("cond-hiv-ben-labelled", c.PAT_BEN),
         "meta": {"security": [{"system": c.V3_ACT_CODE, "code": "HIV"}], "tag": [{"code": "x"}]}},
        hiv_condition("cond-hiv-ana-x", c.PAT_ANA),
        {**c.BEN_HYPERTENSION, "onsetAge": {"value": 58.10, "unit": "a"}},
    ]
    raw = orjson.dumps(searchset(records, world.base_url)).replace(b'"value":58.1,', b'"value":58.10,')
    serve(world, {("GET", "/Condition"): lambda r: answer(raw)})
    whole = await make_gateway(world.base_url, upstream={"views_above_bytes": 1 << 30})
    views = await make_gateway(world.base_url, upstream={"views_above_bytes": 0})
    path = f"/Condition?patient={c.PAT_ANA},{c.PAT_BEN}"
    outs = []
    for gw in (whole, views):
        status, headers, body = await search(gw, path)
        assert status == 200, body
        outs.append(body.replace(gw.url.encode(), b"GATEWAY"))
    assert orjson.loads(outs[0]) == orjson.loads(outs[1])
    untouched = b'{"fullUrl":"GATEWAY/Condition/%s","resource":%s,"search":{"mode":"match"}}' % (
        c.BEN_HYPERTENSION["id"].encode(),
        orjson.dumps({**c.BEN_HYPERTENSION, "onsetAge": {"value": 58.10, "unit": "a"}}).replace(b"58.1,", b"58.10,"))
    assert untouched in outs[0] and untouched in outs[1]
    kept = {e["resource"]["id"]: e["resource"] for e in entries(outs[0]) if "id" in e.get("resource", {})}
    assert "cond-hiv-ana-x" not in kept and b'"value":58.10,' in outs[0]
    for rid, resource in kept.items():
        if rid.startswith("cond-hiv-ben"):
            assert "HIV" in {s["code"] for s in resource["meta"]["security"]}, rid
    assert kept["cond-hiv-ben-plainmeta"]["meta"]["versionId"] == "7"
    assert kept["cond-hiv-ben-labelled"]["meta"]["tag"] == [{"code": "x"}]
