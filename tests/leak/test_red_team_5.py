"""Red team, fifth pass: the CPU work on the hot path. What is remembered under an entry's exact
text (patients, labels, shared across requests), the Bundle loop that runs its Composition and
orphan passes only where it saw a Composition / an include, remembered labels looked up before
labelling, the privacy officer skipping unlabelled resources, and escape checks that look for a
backslash first.

The attacker controls the upstream's bytes (a compromised or buggy FHIR server, or
patient-entered text) and the client's request. Every test goes through the real request path
(HTTP to the gateway, the fake FHIR server on a real socket answering raw bytes) and searches
the RAW response bytes and headers; the leak conftest runs each test on both paths (answers
parsed whole, where entry texts key the memos, and answers decided on views).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest
from aiohttp import web

import gateway.core.enforce as enforce
from tests.conftest import LABELS, GatewayUnderTest
from tests.fakes import FakeFhir
from tests.fixtures import clinical as c
from tests.leak.test_red_team_4 import kept, serving
from tests.leak.test_red_team_3 import (
    HIV_DISPLAY, HIV_SECRETS, answer, observation, path_of, search, searchset, serve,
)
from tests.sources.conftest import clinikapi, vendor_key  # noqa: F401 (fixtures)
from tests.leak.test_side_doors import (
    BUPNAL_MEDICATION, LISINOPRIL, MED_SECRETS, batch, call, entries, ids_in, leaks, med_request,
)

MakeGateway = Callable[..., Awaitable[GatewayUnderTest]]
HIV_ID = c.HIV_CONDITION["id"]
ANA_ID = c.PAT_ANA.split("/", 1)[1]
BEN_ID = c.PAT_BEN.split("/", 1)[1]
CONDITIONS = f"/Condition?patient={c.PAT_ANA}"
BEN_CONDITIONS = f"/Condition?patient={c.PAT_BEN}"


async def invalidate(gw: GatewayUnderTest, patient: str) -> None:
    async with gw.session.post(gw.admin_url + "/cache/invalidate", json={"patient": patient}) as resp:
        assert resp.status == 200


def security(resource: dict[str, Any]) -> set[str]:
    return {s.get("code") for s in (resource.get("meta") or {}).get("security") or ()}


def by_id(body: bytes) -> dict[str, dict[str, Any]]:
    return {e["resource"]["id"]: e["resource"] for e in entries(body) if "id" in e.get("resource", {})}


def ben_hiv(rid: str = "cond-hiv-ben-5a1") -> dict[str, Any]:
    return {**c.HIV_CONDITION, "id": rid, "subject": {"reference": c.PAT_BEN}}


# ================================================================ 1. what is remembered under an entry's text


async def test_one_answer_text_is_decided_anew_when_the_consent_changes(
    request: pytest.FixtureRequest, world: FakeFhir, make_gateway: MakeGateway,
) -> None:
    """The same bytes, served again and again: Ben's HIV record withheld under his general
    opt-in, released (DS4P-labelled HIV, from remembered labels) once he opens HIV, withheld
    again once he closes it; Ana's HIV record in the same answer never released."""
    raw = orjson.dumps(searchset([ben_hiv(), c.BEN_HYPERTENSION, {**c.HIV_CONDITION}], world.base_url))
    serve(world, {("GET", "/Condition"): lambda r: answer(raw)})
    gw = await make_gateway(world.base_url)
    ordinary = {c.BEN_HYPERTENSION["id"]}
    for opens, expected in ((False, ordinary), (True, ordinary | {"cond-hiv-ben-5a1"}), (True, None),
                            (False, ordinary), (True, None)):
        world.add(c.opt_in(c.PAT_BEN, "consent-ben-in", labels=("HIV",) if opens else ()))
        await invalidate(gw, c.PAT_BEN)
        status, headers, body = await search(gw, BEN_CONDITIONS)
        assert status == 200, body
        want = expected or ordinary | {"cond-hiv-ben-5a1"}
        assert ids_in(body) == want, (opens, body[:300])
        if opens:
            assert "HIV" in security(by_id(body)["cond-hiv-ben-5a1"]), body
        assert "meta" not in by_id(body)[c.BEN_HYPERTENSION["id"]]
        assert leaks(body, headers, (HIV_ID,)) == []
        assert_remembered(request, raw)


async def test_one_answer_text_is_decided_for_each_requester(
    world: FakeFhir, make_gateway: MakeGateway,
) -> None:
    """Ana's consent closes her records to one doctor: the same answer bytes read by that
    doctor, by another, and by the banned one again; the remembered patients and labels of the
    entries are the same, the decisions are each requester's own."""
    world.add(c.not_this_doctor(c.PAT_ANA, c.BANNED_DOCTOR))
    del world.resources["Consent/consent-optin"]
    raw = orjson.dumps(searchset([c.ANA_HYPERTENSION, c.HIV_CONDITION, c.ANA_CBC], world.base_url))
    serve(world, {("GET", "/Condition"): lambda r: answer(raw)})
    gw = await make_gateway(world.base_url)
    for actor, expected in ((c.DOCTOR, {c.ANA_HYPERTENSION["id"], c.ANA_CBC["id"]}), (c.BANNED_DOCTOR, set()),
                            (c.DOCTOR, {c.ANA_HYPERTENSION["id"], c.ANA_CBC["id"]}), (c.BANNED_DOCTOR, set())):
        status, headers, body = await search(gw, CONDITIONS, actor=actor)
        assert status in (200, 403), body
        assert (ids_in(body) if status == 200 else set()) == expected, actor
        assert leaks(body, headers, HIV_SECRETS) == []


def _ordered(medication: dict[str, Any]) -> bytes:
    """A search for Ana's orders with their medications: one order naming Medication/med-rt5-1,
    included as ``medication`` (the order's entry bytes are the same whatever it is)."""
    order = med_request("medrx-rt5-1", "Medication/med-rt5-1")
    bundle = c.bundle([order, c.ANA_CBC], "http://fhir.example/fhir", include=({**medication, "id": "med-rt5-1"},))
    return orjson.dumps(bundle)


async def test_an_order_remembered_by_its_text_takes_its_medication_from_each_answer(
    world: FakeFhir, make_gateway: MakeGateway,
) -> None:
    """The order's entry is byte-identical in every answer; the Medication it names, included
    beside it, is lisinopril in one answer and buprenorphine/naloxone in the next. The order is
    kept with lisinopril, withheld with buprenorphine (the drug never named), kept again."""
    served = serving(world, "/MedicationRequest")
    gw = await make_gateway(world.base_url)
    path = f"/MedicationRequest?patient={c.PAT_ANA}&_include=MedicationRequest:medication"
    for sensitive in (False, True, False, True):
        served[0] = _ordered(BUPNAL_MEDICATION if sensitive else LISINOPRIL)
        status, headers, body = await search(gw, path)
        assert status == 200, body
        if sensitive:
            assert ids_in(body) == {c.ANA_CBC["id"]}, body[:400]
            assert leaks(body, headers, (*MED_SECRETS, "medrx-rt5-1", "med-rt5-1")) == []
        else:
            assert ids_in(body) == {"medrx-rt5-1", c.ANA_CBC["id"], "med-rt5-1"}, body[:400]


def _report_with_contained(hidden: bool) -> dict[str, Any]:
    report = c.cbc_report_with_contained_hiv()
    if not hidden:
        inner = {**c.ANA_CBC, "id": "contained-hiv-1"}
        inner.pop("subject")
        report["contained"] = [inner]
    return report


async def test_containers_remembered_by_their_text_are_decided_with_what_they_contain(
    world: FakeFhir, make_gateway: MakeGateway,
) -> None:
    """A CBC report smuggling a contained HIV result, and its twin containing a CBC (texts one
    code apart): the first withheld, the twin kept, in either order, across requests. An order
    whose medication is a contained buprenorphine is withheld every time."""
    order = med_request("medrx-cont-rt5", "#m1", contained=[{**BUPNAL_MEDICATION, "id": "m1"}])
    served = serving(world, "/DiagnosticReport")
    gw = await make_gateway(world.base_url)
    for hidden_first in (True, False, True):
        reports = [_report_with_contained(hidden_first), _report_with_contained(not hidden_first)]
        twin_id = "dr-cbc-twin-rt5"
        reports[1 if hidden_first else 0]["id"] = twin_id
        served[0] = orjson.dumps(searchset([*reports, order, c.ANA_CBC], world.base_url))
        status, headers, body = await search(gw, f"/DiagnosticReport?patient={c.PAT_ANA}")
        assert status == 200, body
        assert ids_in(body) == {twin_id, c.ANA_CBC["id"]}, body[:400]
        assert leaks(body, headers, ("75622-1", "10828004", "HIV 1 and 2", *MED_SECRETS, "medrx-cont-rt5")) == []


def _spellings(raw: bytes) -> dict[str, bytes]:
    """The answer ``raw`` (Ana's HIV record among ordinary ones) written other ways, each the same JSON."""
    ana = c.PAT_ANA.encode()
    return {
        "as written": raw,
        "code escaped": raw.replace(b'"B20"', b'"\\u004220"'),
        "subject slash escaped": raw.replace(b'"reference":"' + ana + b'"', b'"reference":"Patient\\/' + ANA_ID.encode() + b'"'),
        "subject key escaped": raw.replace(b'"subject":', b'"\\u0073ubject":'),
        "system escaped": raw.replace(b'"http://hl7.org/fhir/sid/icd-10-cm"', b'"http:\\/\\/hl7.org\\/fhir\\/sid\\/icd-10-cm"'),
        "pretty": orjson.dumps(orjson.loads(raw), option=orjson.OPT_INDENT_2),
        "spaced entries": raw.replace(b'},{"fullUrl"', b'} , \n{"fullUrl"'),
    }


async def test_every_spelling_of_a_hidden_record_is_withheld_whatever_was_remembered(
    world: FakeFhir, make_gateway: MakeGateway,
) -> None:
    """Ana's HIV record written with escapes and whitespace in every place (each a new text,
    remembered under its own bytes), interleaved with the plain answer: always withheld."""
    plain = orjson.dumps(searchset([c.ANA_HYPERTENSION, c.HIV_CONDITION, c.ANA_CBC], world.base_url))
    served = serving(world, "/Condition")
    gw = await make_gateway(world.base_url)
    for name, raw in _spellings(plain).items():
        for text in (raw, plain, raw):
            served[0] = text
            status, headers, body = await search(gw, CONDITIONS)
            assert status == 200, (name, body)
            assert ids_in(body) == {c.ANA_HYPERTENSION["id"], c.ANA_CBC["id"]}, name
            assert leaks(body, headers, HIV_SECRETS) == [], name


async def test_byte_identical_entries_in_one_answer_are_decided_alike(
    world: FakeFhir, make_gateway: MakeGateway,
) -> None:
    """The same entry text three times in one answer (one memo key, three resources): Ana's HIV
    record withheld every time it appears, her CBC kept every time."""
    bundle = searchset([c.HIV_CONDITION, c.ANA_CBC, c.HIV_CONDITION, c.ANA_CBC, c.HIV_CONDITION], world.base_url)
    raw = orjson.dumps(bundle)
    serve(world, {("GET", "/Condition"): lambda r: answer(raw)})
    gw = await make_gateway(world.base_url)
    for _ in range(2):
        status, headers, body = await search(gw, CONDITIONS)
        assert status == 200, body
        found = [e["resource"]["id"] for e in entries(body) if e["resource"]["resourceType"] != "OperationOutcome"]
        assert found == [c.ANA_CBC["id"], c.ANA_CBC["id"]], found
        assert leaks(body, headers, HIV_SECRETS) == []


@pytest.mark.parametrize("size", [4_000, 4_096, 4_097, 9_000])
async def test_entries_around_the_remembered_size_are_decided_the_same(
    world: FakeFhir, make_gateway: MakeGateway, size: int,
) -> None:
    """Ana's HIV record and her hypertension padded so their entries are about ``size`` bytes
    (below, at and above the size remembered by text): HIV withheld, hypertension kept, twice."""
    def padded(record: dict[str, Any]) -> dict[str, Any]:
        entry = orjson.dumps({"fullUrl": f"{world.base_url}/Condition/{record['id']}", "resource": record,
                              "search": {"mode": "match"}})
        return {**record, "note": [{"text": "p" * max(0, size - len(entry) - len(b',"note":[{"text":""}]'))}]}

    raw = orjson.dumps(searchset([padded(c.HIV_CONDITION), padded(c.ANA_HYPERTENSION)], world.base_url))
    serve(world, {("GET", "/Condition"): lambda r: answer(raw)})
    gw = await make_gateway(world.base_url)
    for _ in range(2):
        status, headers, body = await search(gw, CONDITIONS)
        assert status == 200, body
        assert ids_in(body) == {c.ANA_HYPERTENSION["id"]}
        assert leaks(body, headers, HIV_SECRETS) == []


async def test_memos_cleared_at_their_bounds_between_and_within_answers(
    world: FakeFhir, make_gateway: MakeGateway, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The memos bounded to a few entries and ~2 KB: cleared while an answer is being decided
    and between answers (shuffled, with Ben's and Ana's records alike but for their subjects);
    every decision stays what it is without the memos, and the counted bytes stay in bounds."""
    monkeypatch.setattr(enforce._OWNERS, "max_entries", 3)
    monkeypatch.setattr(enforce._OWNERS, "max_bytes", 2_000)
    monkeypatch.setattr(LABELS._memo, "max_entries", 3)
    monkeypatch.setattr(LABELS._memo, "max_bytes", 2_000)
    records = [c.ANA_HYPERTENSION, c.HIV_CONDITION, c.ANA_CBC, c.BEN_HYPERTENSION, c.BEN_CBC,
               ben_hiv(), c.OUD_CONDITION, c.DEPRESSION, {**c.ANA_CBC, "id": "obs-cbc-rt5-2"}]
    served = serving(world, "/Condition")
    gw = await make_gateway(world.base_url)
    shuffle = random.Random(5)
    expected = {c.ANA_HYPERTENSION["id"], c.ANA_CBC["id"], c.BEN_HYPERTENSION["id"], c.BEN_CBC["id"], "obs-cbc-rt5-2"}
    for _ in range(6):
        shuffle.shuffle(records)
        served[0] = orjson.dumps(searchset(records, world.base_url))
        status, headers, body = await search(gw, f"/Condition?patient={c.PAT_ANA},{c.PAT_BEN}")
        assert status == 200, body
        assert ids_in(body) == expected
        assert leaks(body, headers, (*HIV_SECRETS, "cond-hiv-ben-5a1", "F11.20", "F32.9")) == []
        assert len(enforce._OWNERS) <= 3 and enforce._OWNERS.held <= 2_000
        assert enforce._OWNERS.held == sum(len(k) for k in enforce._OWNERS.entries if isinstance(k, bytes))
        assert len(LABELS._memo) <= 3 and LABELS._memo.held <= 2_000


async def test_consent_source_labels_of_a_remembered_record_follow_the_source(
    fake_fhir: FakeFhir, clinikapi: Any, vendor_key: None, make_gateway: MakeGateway,
) -> None:
    """ClinikAPI labels a record R by its id (consent-source labels, never remembered with the
    text): the same Observation bytes are kept while the source says N, withheld once it says
    R (cache invalidated), kept again once it says N."""
    from tests.leak.test_red_team_4 import CK_PATIENT, _ck_document
    from tests.sources.test_vendor_sources import vendor_settings

    clinikapi.records["pat-100"] = [{
        "id": "ck-general", "patientId": "pat-100", "scope": "patient-privacy", "category": "59284-0",
        "status": "active", "policyRule": "OPTIN",
        "provision": {"type": "permit", "actor": [{"role": "PRCP", "reference": "Practitioner/dr-ada"}]},
    }]
    record = {"resourceType": "Composition", "id": "ck-doc-x", "status": "final", "type": {"text": "discharge-summary"},
              "subject": {"reference": CK_PATIENT}, "date": "2024-03-01", "title": "Discharge summary"}
    raw = orjson.dumps(searchset([record], fake_fhir.base_url))
    serve(fake_fhir, {("GET", "/Composition"): lambda r: answer(raw)})
    gw = await make_gateway(fake_fhir.base_url, consent=vendor_settings("clinikapi", clinikapi.base_url))
    path = f"/Composition?patient={CK_PATIENT}"
    for confidentiality, expected in (("N", {"ck-doc-x"}), ("R", set()), ("N", {"ck-doc-x"}), ("R", set())):
        clinikapi.documents["pat-100"] = [_ck_document("ck-doc-x", confidentiality)]
        await invalidate(gw, CK_PATIENT)
        assert await kept(gw, path, actor="Practitioner/dr-ada") == expected, confidentiality


@pytest.mark.parametrize("repeat", [
    "subject twice", "subject escaped twice", "code twice", "resource twice", "entry twice", "meta security twice",
])
async def test_an_entry_naming_a_key_twice_is_refused_whatever_was_remembered(
    world: FakeFhir, make_gateway: MakeGateway, repeat: str,
) -> None:
    """An entry whose text names a key twice reads two ways (Ben's record by the first key,
    Ana's HIV record by the last): after the plain answer has been remembered, such an answer
    is refused as a whole (502), never decided on one reading and sent as the other."""
    hiv = orjson.dumps(c.HIV_CONDITION)
    plain = orjson.dumps(searchset([c.ANA_HYPERTENSION, c.HIV_CONDITION], world.base_url))
    ben = b'"subject":{"reference":"' + c.PAT_BEN.encode() + b'"},'
    ordinary = b'"code":' + orjson.dumps(c.ANA_HYPERTENSION["code"]) + b","
    forms = {
        "subject twice": plain.replace(b'"subject":{"reference":"' + c.PAT_ANA.encode() + b'"},"onsetDateTime":"2021',
                                       ben + b'"subject":{"reference":"' + c.PAT_ANA.encode() + b'"},"onsetDateTime":"2021'),
        "subject escaped twice": plain.replace(b'"subject":{"reference":"' + c.PAT_ANA.encode() + b'"},"onsetDateTime":"2021',
                                               ben.replace(b'"subject"', b'"\\u0073ubject"') + b'"subject":{"reference":"'
                                               + c.PAT_ANA.encode() + b'"},"onsetDateTime":"2021'),
        "code twice": plain.replace(b'"code":{"coding":[{"system":"http://hl7.org/fhir/sid/icd-10-cm","code":"B20"',
                                    ordinary + b'"code":{"coding":[{"system":"http://hl7.org/fhir/sid/icd-10-cm","code":"B20"'),
        "resource twice": plain.replace(b'"resource":' + hiv, b'"resource":' + orjson.dumps(c.ANA_HYPERTENSION) + b',"resource":' + hiv),
        "entry twice": plain[:-1] + b',"entry":' + orjson.dumps(orjson.loads(plain)["entry"][1:]) + b"}",
        "meta security twice": plain.replace(b'"resource":' + hiv, b'"resource":' + hiv[:-1]
                                             + b',"meta":{"security":[{"code":"N"}],"security":[{"code":"R"}]}}'),
    }
    raw = forms[repeat]
    assert raw != plain
    served = serving(world, "/Condition")
    gw = await make_gateway(world.base_url)
    for text, refused in ((plain, False), (raw, True), (plain, False), (raw, True)):
        served[0] = text
        status, headers, body = await search(gw, CONDITIONS)
        assert status == (502 if refused else 200), (repeat, status, body[:300])
        assert leaks(body, headers, HIV_SECRETS) == []


def entry_texts(raw: bytes) -> list[bytes]:
    """Each entry's exact text in a compact searchset ``raw`` (the memos' keys when parsed whole)."""
    texts = [orjson.dumps(e) for e in orjson.loads(raw)["entry"]]
    assert all(t in raw for t in texts)
    return texts


def assert_remembered(request: pytest.FixtureRequest, raw: bytes) -> None:
    """On the path that parses answers whole, every entry of ``raw`` is remembered by its text
    (so the test went through the memos, not around them)."""
    if path_of(request) == "whole":
        for text in entry_texts(raw):
            assert text in enforce._OWNERS.entries or len(text) > 4096, text[:80]
            assert LABELS._memo.get(text) is not None, text[:80]


@pytest.mark.parametrize("first", ["shadow", "break-glass", "projection", "batch"])
async def test_an_answer_first_decided_where_nothing_is_spliced_is_decided_alike_after(
    request: pytest.FixtureRequest, world: FakeFhir, make_gateway: MakeGateway, first: str,
) -> None:
    """The same answer bytes read first where resources are copied, projected or rewritten
    (shadow mode, break-glass, ``_elements``, a batch), then as a plain search, then that way
    again: Ana's HIV record is withheld from every plain search and every projection; what
    break-glass releases carries its audit id and its DS4P label. On the whole path the plain
    search went through the memos (every entry remembered by its text)."""
    raw = orjson.dumps(searchset([c.ANA_HYPERTENSION, c.HIV_CONDITION, c.ANA_CBC], world.base_url))
    serve(world, {("GET", "/Condition"): lambda r: answer(raw)})
    gw = await make_gateway(world.base_url)
    other = await make_gateway(world.base_url, enforcement={"mode": "shadow"}) if first == "shadow" else gw
    plain = {c.ANA_HYPERTENSION["id"], c.ANA_CBC["id"]}
    for _ in range(2):
        if first == "shadow":
            status, headers, body = await search(other, CONDITIONS)
            assert status == 200 and HIV_ID in ids_in(body), body[:200]  # shadow: decided, passed unfiltered
        elif first == "break-glass":
            status, headers, body = await search(gw, CONDITIONS, **{"X-Break-Glass": "Medical emergency"})
            assert status == 200 and headers.get("X-Break-Glass-Audit-Id"), body
            assert "HIV" in security(by_id(body)[HIV_ID])
        elif first == "projection":
            status, headers, body = await search(gw, CONDITIONS + "&_elements=id,subject")
            assert status == 200, body
            assert ids_in(body) == plain and leaks(body, headers, HIV_SECRETS) == []
        else:
            batch = {"resourceType": "Bundle", "type": "batch",
                     "entry": [{"request": {"method": "GET", "url": CONDITIONS.lstrip("/")}}]}
            status, headers, body = await call(gw, "POST", "/", body=batch)
            assert status == 200, body
            assert leaks(body, headers, HIV_SECRETS) == [], body[:400]
        # (break-glass opens an emergency window for its doctor: another one reads plainly)
        status, headers, body = await search(gw, CONDITIONS, actor=c.PSYCHIATRIST if first == "break-glass" else c.DOCTOR)
        assert status == 200 and ids_in(body) == plain, body[:300]
        assert leaks(body, headers, HIV_SECRETS) == [] and "X-Break-Glass-Audit-Id" not in headers
        assert_remembered(request, raw)


# ================================================================ 3. Compositions and includes in shapes that dodge the flags

HIV_NARRATIVE = "<div xmlns=\"http://www.w3.org/1999/xhtml\">Human immunodeficiency virus [HIV] disease, on ART</div>"


def _composition(rid: str, *refs: str) -> dict[str, Any]:
    return {
        "resourceType": "Composition", "id": rid, "status": "final",
        "type": c.concept(c.LOINC, "60591-5", "Patient summary Document"),
        "subject": {"reference": c.PAT_ANA}, "date": "2024-07-01T10:00:00Z",
        "author": [{"reference": c.DOCTOR}], "title": "Patient Summary",
        "text": {"status": "generated", "div": HIV_NARRATIVE},
        "section": [{"title": "Problems", "text": {"status": "generated", "div": HIV_NARRATIVE},
                     "entry": [{"reference": r} for r in refs]}],
    }


def _document(composition: dict[str, Any], *records: dict[str, Any], urls: str = "relative") -> dict[str, Any]:
    def url(r: dict[str, Any]) -> str:
        return f"urn:uuid:{r['id']}" if urls == "urn" else f"http://fhir.example/fhir/{r['resourceType']}/{r['id']}"
    return {"resourceType": "Bundle", "id": "doc-rt5", "type": "document",
            "entry": [{"fullUrl": url(r), "resource": r} for r in (composition, *records)]}


HIV_REF = f"Condition/{HIV_ID}"
NARRATIVE_SECRETS = ("Human immunodeficiency virus", "on ART", *HIV_SECRETS)


@pytest.mark.parametrize("shape", [
    "document, composition first", "document, composition last", "document, urn fullUrls",
    "document in a searchset", "document in a collection in a searchset",
    "searchset, composition beside", "composition with a search list", "composition with a search string",
])
async def test_a_composition_listing_a_withheld_record_loses_its_narrative(
    world: FakeFhir, make_gateway: MakeGateway, shape: str,
) -> None:
    """A Composition whose narrative and section name Ana's HIV record, in every place the
    Bundle loop meets it: the record withheld, the narrative never sent."""
    comp = _composition("comp-rt5", HIV_REF, f"Condition/{c.ANA_HYPERTENSION['id']}")
    records = (c.HIV_CONDITION, c.ANA_HYPERTENSION)
    if shape.startswith("document,"):
        doc = _document(comp, *records, urls="urn" if "urn" in shape else "relative")
        if "last" in shape:
            doc["entry"] = doc["entry"][1:] + doc["entry"][:1]
        if "urn" in shape:
            comp["section"][0]["entry"] = [{"reference": f"urn:uuid:{r['id']}"} for r in records]
        body, path, route = doc, "/Bundle/doc-rt5", ("GET", "/Bundle/doc-rt5")
    elif shape == "document in a searchset":
        body = searchset([_document(comp, *records)], world.base_url)
        path, route = "/Bundle?type=document", ("GET", "/Bundle")
    elif shape == "document in a collection in a searchset":
        collection = {"resourceType": "Bundle", "id": "col-rt5", "type": "collection",
                      "entry": [{"resource": _document(comp, *records)}]}
        body = searchset([collection], world.base_url)
        path, route = "/Bundle?type=collection", ("GET", "/Bundle")
    else:
        body = searchset([comp, *records], world.base_url)
        if "search list" in shape:
            body["entry"][0]["search"] = ["match"]
        elif "search string" in shape:
            body["entry"][0]["search"] = "match"
        path, route = f"/Composition?patient={c.PAT_ANA}&_include=*", ("GET", "/Composition")
    raw = orjson.dumps(body)
    serve(world, {route: lambda r: answer(raw)})
    gw = await make_gateway(world.base_url)
    for _ in range(2):
        status, headers, got = await search(gw, path)
        assert status in (200, 403, 502), got
        assert leaks(got, headers, NARRATIVE_SECRETS) == [], (shape, got[:600])
        if status == 200:
            assert c.ANA_HYPERTENSION["id"].encode() in got, got[:300]


# An included entry whose search.mode is not exactly 'include' (odd case, trailing space, no
# mode, no search element: search is 0..1 in R4) must not pass for a match: the Medication
# (RxNorm 1010600, buprenorphine/naloxone) and the treatment-programme Practitioner brought by
# the withheld order would tell what it was (core.enforce.may_be_included).


@pytest.mark.parametrize("written", [
    {"mode": "include"},
    {"score": 1, "mode": "include"},
    b'{"\\u006dode":"include"}',
    b'{"mode":"incl\\u0075de"}',
    "key escaped",
    "match first",
    {"mode": "Include"}, {"mode": "INCLUDE"}, {"mode": "include "}, {}, "no search",
])
async def test_included_records_of_a_withheld_order_do_not_name_it(
    world: FakeFhir, make_gateway: MakeGateway, written: Any,
) -> None:
    """A withheld buprenorphine order (its drug named by reference) with its Medication and a
    treatment-programme Practitioner included, ``search`` written many ways (escaped keys and
    values, odd case, key order, a match before them): neither included record reaches the
    client (nothing kept refers to them)."""
    program = {"resourceType": "Practitioner", "id": "pr-otp-rt5",
               "name": [{"text": "Opioid Treatment Program Clinic"}]}
    order = med_request("medrx-bupnal-rt5", f"Medication/{BUPNAL_MEDICATION['id']}")
    order["requester"] = {"reference": "Practitioner/pr-otp-rt5"}
    bundle = c.bundle([c.ANA_CBC, order], world.base_url, include=(BUPNAL_MEDICATION, program))
    raw = orjson.dumps(bundle)
    include = b'"search":{"mode":"include"}'
    assert raw.count(include) == 2
    if isinstance(written, dict):
        raw = raw.replace(include, b'"search":' + orjson.dumps(written))
    elif isinstance(written, bytes):
        raw = raw.replace(include, b'"search":' + written)
    elif written == "no search":
        raw = raw.replace(b',' + include, b'')
    elif written == "key escaped":
        raw = raw.replace(include, b'"se\\u0061rch":{"mode":"include"}')
    else:  # the include entries first, before any match
        doc = orjson.loads(raw)
        doc["entry"] = doc["entry"][2:] + doc["entry"][:2]
        raw = orjson.dumps(doc)
    serve(world, {("GET", "/MedicationRequest"): lambda r: answer(raw)})
    gw = await make_gateway(world.base_url)
    path = f"/MedicationRequest?patient={c.PAT_ANA}&_include=MedicationRequest:medication&_include=MedicationRequest:requester"
    for _ in range(2):
        status, headers, body = await search(gw, path)
        assert status in (200, 502), body
        assert leaks(body, headers, (*MED_SECRETS, "Opioid Treatment", "pr-otp-rt5", "medrx-bupnal-rt5")) == [], body[:600]
        if status == 200:
            assert c.ANA_CBC["id"] in ids_in(body)


# ================================================================ 4. remembered labels, DS4P marking, disclosures


async def _disclosed(gw: GatewayUnderTest, patient: str) -> list[list[str]]:
    """Per disclosure event of ``patient``, the records it names (oldest first)."""
    async with gw.session.get(gw.admin_url + f"/admin/disclosures?patient={patient}") as resp:
        assert resp.status == 200
        bundle = await resp.json(content_type=None)
    events = [e["resource"] for e in bundle.get("entry") or ()]
    return [sorted(e["what"]["reference"] for e in event["entity"] if "Patient/" not in e["what"]["reference"])
            for event in events]


@pytest.mark.parametrize("mode", ["all", "sensitive"])
async def test_every_release_is_accounted_and_every_sensitive_one_labelled_each_time(
    world: FakeFhir, make_gateway: MakeGateway, mode: str, caplog: pytest.LogCaptureFixture,
) -> None:
    """Ben opens HIV; the same answer (his HIV record, his hypertension, his CBC) read three
    times, the later times from remembered labels: each release DS4P-labels the HIV record and
    leaves the rest as written; ``all`` records every released record each time, ``sensitive``
    the HIV one only; the decision log counts every released record either way."""
    caplog.set_level(logging.INFO, logger="gateway.decision")
    world.add(c.opt_in(c.PAT_BEN, "consent-ben-in", labels=("HIV",)))
    raw = orjson.dumps(searchset([c.BEN_HYPERTENSION, ben_hiv(), c.BEN_CBC], world.base_url))
    serve(world, {("GET", "/Condition"): lambda r: answer(raw)})
    gw = await make_gateway(world.base_url, audit={"disclosures": mode})
    for _ in range(3):
        status, headers, body = await search(gw, BEN_CONDITIONS)
        assert status == 200, body
        found = by_id(body)
        assert set(found) == {c.BEN_HYPERTENSION["id"], "cond-hiv-ben-5a1", c.BEN_CBC["id"]}
        assert "HIV" in security(found["cond-hiv-ben-5a1"])
        assert "meta" not in found[c.BEN_HYPERTENSION["id"]] and "meta" not in found[c.BEN_CBC["id"]]
    expected = (sorted([f"Condition/{c.BEN_HYPERTENSION['id']}", "Condition/cond-hiv-ben-5a1",
                        f"Observation/{c.BEN_CBC['id']}"]) if mode == "all" else ["Condition/cond-hiv-ben-5a1"])
    assert await _disclosed(gw, c.PAT_BEN) == [expected] * 3
    lines = [r for r in caplog.records if r.name == "gateway.decision" and r.getMessage() == "decision"]
    assert [r.__dict__["released"] for r in lines[-3:]] == [{"Condition": 2, "Observation": 1}] * 3


async def test_a_patient_reading_her_own_records_is_no_disclosure_in_all_mode(
    world: FakeFhir, make_gateway: MakeGateway,
) -> None:
    """``all`` mode: Ana reading her own ordinary and sensitive records discloses nothing;
    the doctor reading her ordinary ones discloses each, twice (the second from memos)."""
    raw = orjson.dumps(searchset([c.ANA_HYPERTENSION, c.HIV_CONDITION], world.base_url))
    serve(world, {("GET", "/Condition"): lambda r: answer(raw)})
    gw = await make_gateway(world.base_url, audit={"disclosures": "all"})
    status, _, body = await search(gw, CONDITIONS, actor=c.PAT_ANA)
    assert status == 200 and ids_in(body) == {c.ANA_HYPERTENSION["id"], HIV_ID}, body
    assert "HIV" in security(by_id(body)[HIV_ID])
    assert await _disclosed(gw, c.PAT_ANA) == []
    for _ in range(2):
        assert await kept(gw) == {c.ANA_HYPERTENSION["id"]}
    assert await _disclosed(gw, c.PAT_ANA) == [[f"Condition/{c.ANA_HYPERTENSION['id']}"]] * 2


def _consents_fail(world: FakeFhir) -> None:
    """Ana's conditions answered; every consent lookup fails (the consent source is down)."""
    def consents(request: web.Request) -> Any:
        return web.Response(status=500, body=b'{"resourceType":"OperationOutcome","issue":[]}',
                            content_type="application/fhir+json")

    raw = orjson.dumps(searchset([c.ANA_HYPERTENSION, c.HIV_CONDITION], world.base_url))
    serve(world, {("GET", "/Condition"): lambda r: answer(raw), ("GET", "/Consent"): consents})


async def _broken_glass(gw: GatewayUnderTest) -> dict[str, dict[str, Any]]:
    status, headers, body = await search(gw, CONDITIONS, **{"X-Break-Glass": "Medical emergency"})
    assert status == 200 and headers.get("X-Break-Glass-Audit-Id"), (status, body[:300])
    found = by_id(body)
    assert set(found) == {HIV_ID, c.ANA_HYPERTENSION["id"]}
    return found


async def test_break_glass_while_consents_cannot_be_read_labels_what_it_releases(
    world: FakeFhir, make_gateway: MakeGateway,
) -> None:
    """The consent source fails; the doctor breaks the glass for Ana's conditions: the HIV
    record is released with an audit id and, like every sensitive release, DS4P-labelled."""
    _consents_fail(world)
    gw = await make_gateway(world.base_url)
    found = await _broken_glass(gw)
    assert "HIV" in security(found[HIV_ID]), found[HIV_ID].get("meta")


async def test_break_glass_while_consents_cannot_be_read_accounts_the_disclosure(
    world: FakeFhir, make_gateway: MakeGateway,
) -> None:
    _consents_fail(world)
    gw = await make_gateway(world.base_url)
    await _broken_glass(gw)
    assert [f"Condition/{HIV_ID}"] in await _disclosed(gw, c.PAT_ANA)


def _binary(rid: str, context: str, text: str) -> dict[str, Any]:
    import base64
    return {"resourceType": "Binary", "id": rid, "contentType": "text/plain",
            "securityContext": {"reference": context}, "data": base64.b64encode(text.encode()).decode()}


def _everything_of(world: FakeFhir, resources: list[dict[str, Any]]) -> str:
    raw = orjson.dumps(searchset(resources, world.base_url))
    reads = {("GET", f"/Binary/{b['id']}"): (lambda b: lambda r: answer(orjson.dumps(b)))(b)
             for b in resources if b["resourceType"] == "Binary"}
    serve(world, {("GET", f"/{c.PAT_ANA}/$everything"): lambda r: answer(raw), **reads})
    return f"/{c.PAT_ANA}/$everything"


async def test_binaries_naming_each_other_do_not_crash_the_judge(
    world: FakeFhir, make_gateway: MakeGateway,
) -> None:
    """Two Binaries of one answer whose securityContexts name each other, and one naming
    itself: the Binary-as-context judge does not walk a loop forever (never a 500); Ana's CBC
    beside them is kept."""
    loop = [_binary("bin-a-rt5", "Binary/bin-b-rt5", "loop one"), _binary("bin-b-rt5", "Binary/bin-a-rt5", "loop two"),
            _binary("bin-c-rt5", "Binary/bin-c-rt5", "self")]
    path = _everything_of(world, [*loop, c.ANA_CBC])
    gw = await make_gateway(world.base_url)
    for where in (path, "/Binary/bin-a-rt5", "/Binary/bin-c-rt5"):
        status, headers, body = await search(gw, where)
        assert status in (200, 403, 502, 503), (where, status, body[:300])
    status, _, body = await search(gw, path)
    assert status == 200 and c.ANA_CBC["id"] in ids_in(body)


CHAINED = "Forensic photo log: bruising"


@pytest.mark.parametrize("where", ["everything", "read"])
async def test_a_binary_standing_for_a_hidden_binary_is_withheld(
    world: FakeFhir, make_gateway: MakeGateway, where: str,
) -> None:
    """securityContext is the proxy of a Binary's sensitivity: A stands for B, B for Ana's HIV
    condition (withheld): neither Binary's data reaches the doctor."""
    outer = _binary("bin-outer-rt5", "Binary/bin-inner-rt5", CHAINED)
    inner = _binary("bin-inner-rt5", HIV_REF, "inner " + CHAINED)
    path = _everything_of(world, [outer, inner, c.ANA_CBC])
    gw = await make_gateway(world.base_url)
    status, headers, body = await search(gw, path if where == "everything" else "/Binary/bin-outer-rt5")
    assert status in (200, 403), body
    assert leaks(body, headers, (outer["data"], inner["data"], HIV_ID)) == [], body[:400]


# ================================================================ 5. escapes: a backslash first


def _slashes_escaped(url: str) -> bytes:
    return url.replace("/", "\\/").encode()


@pytest.mark.parametrize("other", ["none", "newline", "quote", "backslash", "unicode"])
@pytest.mark.parametrize("spelling", ["slash", "unicode"])
async def test_escaped_upstream_urls_are_rewritten_beside_other_backslashes(
    world: FakeFhir, make_gateway: MakeGateway, other: str, spelling: str,
) -> None:
    """The upstream base spelled with ``\\/`` or ``\\u002f`` in the next link and fullUrls, the
    answer holding no other backslash or another kind of escape elsewhere: every URL the client
    reads leads back to the gateway; with something withheld too."""
    notes = {"none": "plain note", "newline": "line\nbreak", "quote": 'he said "fine"',
             "backslash": "C:\\path", "unicode": "caf\u00e9 \u2028"}
    cbc = {**c.ANA_CBC, "note": [{"text": notes[other]}]}
    bundle = searchset([cbc, c.HIV_CONDITION], world.base_url)
    bundle["link"].append({"relation": "next", "url": f"{world.base_url}/Observation?patient={c.PAT_ANA}&page=2"})
    raw = orjson.dumps(bundle)
    if other == "unicode":
        raw = raw.replace("caf\u00e9".encode(), b"caf\\u00e9")
    spelled = _slashes_escaped(world.base_url) if spelling == "slash" else world.base_url.replace("/", "\\u002f").encode()
    raw = raw.replace(world.base_url.encode(), spelled)
    assert world.base_url.encode() not in raw
    serve(world, {("GET", "/Observation"): lambda r: answer(raw)})
    gw = await make_gateway(world.base_url)
    status, headers, body = await search(gw)
    assert status == 200, body
    parsed = orjson.loads(body)
    urls = [link["url"] for link in parsed["link"]] + [e["fullUrl"] for e in parsed["entry"] if "fullUrl" in e]
    assert urls and all(url.startswith(gw.url) for url in urls), urls
    upstream_host = world.base_url.split("//", 1)[1].split("/", 1)[0]
    assert upstream_host not in body.decode() and upstream_host.replace(".", "") not in body.decode()
    assert by_id(body)[c.ANA_CBC["id"]]["note"] == [{"text": notes[other]}]
    assert leaks(body, headers, HIV_SECRETS) == []


@pytest.mark.parametrize("other", ["none", "newline", "backslash", "slash"])
@pytest.mark.parametrize("key", [b"displa\\u0079", b"\\u0064isplay", b"display"])
@pytest.mark.parametrize("how", ["search", "read"])
async def test_a_display_naming_a_withheld_record_is_scrubbed_whatever_else_is_escaped(
    world: FakeFhir, make_gateway: MakeGateway, other: str, key: bytes, how: str,
) -> None:
    """A kept result names Ana's withheld HIV record in a display whose key is spelled with a
    ``\\u`` escape (or plainly), the answer holding no other backslash, or a ``\\n``, a ``\\\\``
    or a ``\\/`` elsewhere: the display never reaches the client."""
    notes = {"none": "plain", "newline": "a\nb", "backslash": "a\\b", "slash": "a/b"}
    naming = observation("obs-names-hiv-rt5", hasMember=[{"reference": HIV_REF, "display": HIV_DISPLAY}],
                         note=[{"text": notes[other]}])
    body_of = searchset([c.HIV_CONDITION, naming, c.ANA_CBC], world.base_url) if how == "search" else naming
    raw = orjson.dumps(body_of).replace(b'"display":"' + HIV_DISPLAY.encode(), b'"' + key + b'":"' + HIV_DISPLAY.encode())
    if other == "slash":
        raw = raw.replace(b'"a/b"', b'"a\\/b"')
    assert HIV_DISPLAY.encode() in raw
    path = f"/Observation?patient={c.PAT_ANA}" if how == "search" else "/Observation/obs-names-hiv-rt5"
    serve(world, {("GET", path.split("?")[0]): lambda r: answer(raw)})
    gw = await make_gateway(world.base_url)
    for _ in range(2):
        status, headers, body = await search(gw, path)
        assert status == 200, body
        assert leaks(body, headers, (HIV_DISPLAY, "immunodeficiency")) == [], body[:500]
        got = orjson.loads(body)
        kept_one = by_id(body)["obs-names-hiv-rt5"] if how == "search" else got
        assert kept_one["note"] == [{"text": notes[other]}]
        assert kept_one["hasMember"] == [{"reference": HIV_REF}]


# ================================================================ 6. the fixes above, through the side doors


@pytest.mark.parametrize("status_mode", [403, 404])
async def test_a_binary_standing_for_a_hidden_binary_stays_closed_in_a_batch_and_in_404_mode(
    world: FakeFhir, make_gateway: MakeGateway, status_mode: int,
) -> None:
    """The Binary chain (A -> B -> Ana's HIV condition) read as batch entries and by its own
    search, in 403 and 404 modes: neither Binary's data is in the raw bytes."""
    outer = _binary("bin-outer-sd5", "Binary/bin-inner-sd5", CHAINED)
    inner = _binary("bin-inner-sd5", HIV_REF, "inner " + CHAINED)
    _everything_of(world, [outer, inner, c.ANA_CBC])
    world.add(outer, inner)
    gw = await make_gateway(world.base_url, enforcement={"denied_read_status": status_mode})
    status, headers, body = await call(gw, "POST", "/", body=batch(
        ("GET", "Binary/bin-outer-sd5"), ("GET", "Binary/bin-inner-sd5"), ("GET", f"Observation/{c.ANA_CBC['id']}")))
    assert status == 200, body
    assert leaks(body, headers, (outer["data"], inner["data"], HIV_ID)) == [], body[:400]
    status, headers, body = await search(gw, "/Binary?_id=bin-outer-sd5,bin-inner-sd5")
    assert status in (200, 403, 404), body
    assert leaks(body, headers, (outer["data"], inner["data"], HIV_ID)) == [], body[:400]


@pytest.mark.parametrize("status_mode", [403, 404])
async def test_included_records_without_a_search_mode_stay_out_in_a_batch_and_in_404_mode(
    world: FakeFhir, make_gateway: MakeGateway, status_mode: int,
) -> None:
    """The withheld buprenorphine order's Medication and Practitioner, included without any
    ``search`` element, asked as a batch entry and directly, in 403 and 404 modes."""
    program = {"resourceType": "Practitioner", "id": "pr-otp-sd5", "name": [{"text": "Opioid Treatment Program Clinic"}]}
    order = med_request("medrx-bupnal-sd5", f"Medication/{BUPNAL_MEDICATION['id']}")
    order["requester"] = {"reference": "Practitioner/pr-otp-sd5"}
    raw = orjson.dumps(c.bundle([c.ANA_CBC, order], world.base_url, include=(BUPNAL_MEDICATION, program)))
    raw = raw.replace(b',"search":{"mode":"include"}', b"")
    serve(world, {("GET", "/MedicationRequest"): lambda r: answer(raw)})
    gw = await make_gateway(world.base_url, enforcement={"denied_read_status": status_mode})
    query = f"MedicationRequest?patient={c.PAT_ANA}&_include=MedicationRequest:medication"
    secrets = (*MED_SECRETS, "Opioid Treatment", "pr-otp-sd5", "medrx-bupnal-sd5")
    for status, headers, body in (await search(gw, "/" + query), await call(gw, "POST", "/", body=batch(("GET", query)))):
        assert status == 200, body
        assert leaks(body, headers, secrets) == [], body[:600]
        assert c.ANA_CBC["id"].encode() in body
