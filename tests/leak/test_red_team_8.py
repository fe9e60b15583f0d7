"""Red team 8: doors the earlier passes left untried.

1. A batch entry carries the conditional-read fields of ``Bundle.entry.request``
   (``ifNoneMatch``, ``ifModifiedSince``): a server that honours them answers a hidden record's
   slot "304 Not Modified" with no resource, which nothing decides, so the slot tells that the
   record exists and which version it is, where the request alone (whose ``If-None-Match``
   header is never forwarded) reads exactly like a missing record in 404 mode.
2. Operations whose answer is computed from a patient's records rather than made of them
   (``$evaluate-measure``, ``$care-gaps``, CQL ``$evaluate``, ``$apply``, ``$stats``,
   ``$populate``, ``$member-match``, type- and system-level ``$meta``): a MeasureReport or a
   Parameters that says Ana is in the numerator of an HIV measure, or which labels the records
   of a type carry, holds no hidden record to withhold, yet tells what was hidden.
3. A Composition or List read without the records it lists: its narrative says them.
4. The ``last`` link of a page: its offset is the count Bundle.total would have been.
5. A cascading delete (``_cascade=delete``, ``X-Cascade: delete``, HAPI FHIR) of a record the
   requester may read deletes every record that refers to it, hidden ones too, and its
   answer (a 200 OperationOutcome, passed on) lists them.
6. In 404 mode, what tells a search that lost a hidden record from one that found nothing:
   the decision header, the framing, an empty ``entry`` list.
7. Included patient data brought only by a withheld match: ``Condition?code=B20&_include=
   Condition:subject`` answers the Patient of everyone with HIV, each record permitted on its
   own, the match that brought it withheld.

Each test searches the RAW response bytes and headers for the hidden ids, codes and texts.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from aiohttp import web

from tests.sealed import inner, is_sealed
from tests.fakes import FakeFhir
from tests.fixtures import clinical as c
from tests.leak.test_side_doors import MakeGateway, call, fhir, ids_in, is_outcome, leaks, routes, sent_upstream, slots, world

__all__ = ["world"]  # fixtures

HIV_REF = f"Condition/{c.HIV_CONDITION['id']}"
MISSING_REF = "Condition/cond-nothing-here-000"
HTN_REF = f"Condition/{c.ANA_HYPERTENSION['id']}"


# ---------------------------------------------------------------- 1. conditional reads in a batch


def conditional_batches(fake: FakeFhir) -> Any:
    """A batch as a server that honours ``ifNoneMatch``/``ifModifiedSince`` answers it: an entry
    whose version matches (every stored record here is version 1, unchanged since 2020) is a 304
    without its resource, a missing record a 404, any other read the record."""

    async def override(request: web.Request) -> web.StreamResponse | None:
        if request.method != "POST" or request.path.rstrip("/") != "/fhir":
            return None
        bundle = orjson.loads(await request.read())
        out: list[dict[str, Any]] = []
        for entry in bundle["entry"]:
            asked = entry["request"]
            stored = fake.resources.get(asked["url"].split("?", 1)[0])
            if stored is None:
                out.append({"response": {"status": "404 Not Found"}})
            elif asked.get("ifNoneMatch") == 'W/"1"' or "ifModifiedSince" in asked:
                out.append({"response": {"status": "304 Not Modified", "etag": 'W/"1"',
                                         "lastModified": "2020-01-01T00:00:00Z"}})
            else:
                out.append({"resource": stored, "response": {"status": "200 OK", "etag": 'W/"1"'}})
        return fhir({"resourceType": "Bundle", "type": f"{bundle['type']}-response", "entry": out})

    return override


def conditional_read(url: str, field: str) -> dict[str, Any]:
    value = 'W/"1"' if field == "ifNoneMatch" else "2024-01-01T00:00:00Z"
    return {"request": {"method": "GET", "url": url, field: value}}


@pytest.mark.parametrize("field", ["ifNoneMatch", "ifModifiedSince"])
@pytest.mark.parametrize("status", [403, 404])
async def test_a_conditional_read_in_a_batch_tells_nothing_of_a_hidden_record(
    world: FakeFhir, make_gateway: MakeGateway, field: str, status: int,
) -> None:
    """The slot of Ana's hidden HIV record asked for conditionally reads like the slot of the
    same record asked for plainly: withheld (403), or exactly a missing record's (404 mode)."""
    world.override = conditional_batches(world)
    gateway = await make_gateway(world.base_url, enforcement={"denied_read_status": status})
    body_sent = {"resourceType": "Bundle", "type": "batch", "entry": [
        conditional_read(HIV_REF, field), conditional_read(MISSING_REF, field), {"request": {"method": "GET", "url": HIV_REF}},
        conditional_read(HTN_REF, field),
    ]}
    code, headers, body = await call(gateway, "POST", "/", body=body_sent)
    assert code == 200, body
    hidden, missing, plain, visible = slots(body)
    assert hidden == plain, hidden
    assert hidden["response"]["status"].startswith(str(status)) and "resource" not in hidden, hidden
    if status == 404:
        assert hidden == missing
    # A record the doctor may read is answered in full: the condition was not honoured for it either.
    assert visible["resource"]["id"] == c.ANA_HYPERTENSION["id"], visible
    assert leaks(body, headers, (c.HIV_CONDITION["id"], "B20", "HIV", "2020-01-01")) == []


# ---------------------------------------------------------------- 2. operations that compute over records

ANA_ID = c.PAT_ANA.split("/", 1)[1]
HIV_MEASURE = "http://example.org/fhir/Measure/hiv-viral-suppression"


def measure_report(request: web.Request) -> dict[str, Any]:
    """What the server computes: Ana is in the HIV measure's population (her hidden records)."""
    return {
        "resourceType": "MeasureReport", "id": "mr-ana-hiv-e51", "status": "complete", "type": "individual",
        "measure": HIV_MEASURE, "subject": {"reference": c.PAT_ANA}, "date": "2024-05-01",
        "period": {"start": "2024-01-01", "end": "2024-12-31"},
        "group": [{"population": [
            {"code": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/measure-population",
                                  "code": "denominator"}]}, "count": 1},
            {"code": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/measure-population",
                                  "code": "numerator"}]}, "count": 1}]}],
    }


def parameters(request: web.Request) -> dict[str, Any]:
    return {"resourceType": "Parameters", "parameter": [
        {"name": "In HIV care", "valueBoolean": True},
        {"name": "MemberIdentifier", "valueIdentifier": {"system": "urn:oid:1.2.36.1", "value": ANA_ID}},
        {"name": "return", "valueMeta": {"security": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                                                       "code": "HIV"}]}},
    ]}


COMPUTING = {
    "evaluate-measure": ("GET", f"/Measure/hiv-viral-suppression/$evaluate-measure?subject={c.PAT_ANA}"
                                "&periodStart=2024-01-01&periodEnd=2024-12-31", None),
    "evaluate-measure-population": ("GET", "/Measure/hiv-viral-suppression/$evaluate-measure?reportType=population"
                                           "&periodStart=2024-01-01&periodEnd=2024-12-31", None),
    "evaluate-measure-type": ("POST", "/Measure/$evaluate-measure", {"resourceType": "Parameters", "parameter": [
        {"name": "measure", "valueString": HIV_MEASURE}, {"name": "subject", "valueString": c.PAT_ANA}]}),
    "collect-data": ("GET", f"/Measure/hiv-viral-suppression/$collect-data?subject={c.PAT_ANA}", None),
    "care-gaps": ("GET", f"/Measure/$care-gaps?subject={c.PAT_ANA}&status=open-gap", None),
    "cql-evaluate": ("POST", "/Library/hiv-care/$evaluate", {"resourceType": "Parameters", "parameter": [
        {"name": "subject", "valueString": c.PAT_ANA}, {"name": "expression", "valueString": "In HIV care"}]}),
    "cql": ("GET", f"/$cql?subject={c.PAT_ANA}&expression=exists%20%5BCondition%5D", None),
    "apply": ("GET", f"/PlanDefinition/hiv-followup/$apply?subject={c.PAT_ANA}", None),
    "stats": ("GET", f"/Observation/$stats?subject={c.PAT_ANA}&code=http://loinc.org|20447-9&statistic=count", None),
    "populate": ("GET", f"/Questionnaire/hiv-intake/$populate?subject={c.PAT_ANA}", None),
    "member-match": ("POST", "/Patient/$member-match", {"resourceType": "Parameters", "parameter": [
        {"name": "MemberPatient", "resource": {"resourceType": "Patient", "name": [{"family": "Reyes"}]}}]}),
    "meta-type": ("GET", "/Condition/$meta", None),
    "meta-system": ("GET", "/$meta", None),
    "evaluate-measure-encoded": ("GET", f"/Measure/hiv-viral-suppression/%24evaluate-measure?subject={c.PAT_ANA}", None),
}


@pytest.mark.parametrize("name", list(COMPUTING))
@pytest.mark.parametrize("actor", [c.DOCTOR, c.PAT_ANA])
async def test_an_operation_computed_over_records_is_refused(
    world: FakeFhir, make_gateway: MakeGateway, name: str, actor: str,
) -> None:
    """Its answer cannot be decided resource by resource, so it is refused (403) and never sent,
    even to Ana herself (a measure or a CQL expression reads other patients' records too)."""
    method, path, body = COMPUTING[name]

    async def answer(request: web.Request) -> web.StreamResponse | None:
        if "$" not in request.path or request.path.endswith("/metadata"):
            return None
        computed = measure_report(request) if "measure" in request.path else parameters(request)
        return fhir(computed)

    world.override = answer
    gateway = await make_gateway(world.base_url)
    status, headers, got = await call(gateway, method, path, actor=actor, body=body)
    is_outcome(status, headers, got, 403)
    assert not [s for s in sent_upstream(world) if "$" in s], sent_upstream(world)
    assert leaks(got, headers, ("numerator", "In HIV care", ANA_ID, "HIV")) == []


async def test_instance_meta_of_a_readable_record_still_answers(world: FakeFhir, make_gateway: MakeGateway) -> None:
    """The instance ``$meta`` is not refused: its record is decided first (the refusal is for
    type and system level only)."""
    gateway = await make_gateway(world.base_url)
    status, _, got = await call(gateway, "GET", f"/{HTN_REF}/$meta")
    assert status == 200, got
    assert orjson.loads(got)["resourceType"] == "Parameters"


# ---------------------------------------------------------------- 3. a summary's narrative, read without its entries

IPS_NARRATIVE = ('<div xmlns="http://www.w3.org/1999/xhtml"><ul><li>Essential (primary) hypertension</li>'
                 "<li>Human immunodeficiency virus [HIV] disease</li><li>Opioid dependence, uncomplicated</li></ul></div>")
NARRATIVE_SECRETS = ("Human immunodeficiency", "HIV", "Opioid")


def summary(rid: str, narrative_at: str) -> dict[str, Any]:
    """Ana's patient summary as a server stores it: its sections list her problems by reference
    and say them in a narrative (the section's, or the Composition's own)."""
    section: dict[str, Any] = {
        "title": "Active Problems", "code": c.concept(c.LOINC, "11450-4", "Problem list - Reported"),
        "entry": [{"reference": HTN_REF}, {"reference": HIV_REF}, {"reference": f"Condition/{c.OUD_CONDITION['id']}"}],
    }
    composition: dict[str, Any] = {
        "resourceType": "Composition", "id": rid, "status": "final",
        "type": c.concept(c.LOINC, "60591-5", "Patient summary Document"),
        "subject": {"reference": c.PAT_ANA}, "date": "2024-07-01T10:00:00Z",
        "author": [{"reference": c.DOCTOR}], "title": "Patient Summary", "section": [section],
    }
    owner = section if narrative_at == "section" else composition
    owner["text"] = {"status": "generated", "div": IPS_NARRATIVE}
    return composition


@pytest.mark.parametrize("narrative_at", ["section", "composition"])
@pytest.mark.parametrize("how", ["read", "search", "batch"])
async def test_a_summary_read_without_its_entries_does_not_name_the_hidden_ones(
    world: FakeFhir, make_gateway: MakeGateway, narrative_at: str, how: str,
) -> None:
    """Read alone (or found by a search, or in a batch), Ana's summary lists her HIV and opioid
    records, which the doctor may not see and which the answer does not hold: the narratives that
    say them go; the rest of the summary stays."""
    composition = summary("ips-ana-rt8", narrative_at)
    world.add(composition)
    gateway = await make_gateway(world.base_url)
    path = "Composition/ips-ana-rt8"
    if how == "read":
        status, headers, body = await call(gateway, "GET", f"/{path}")
    elif how == "search":
        status, headers, body = await call(gateway, "GET", f"/Composition?patient={c.PAT_ANA}")
    else:
        status, headers, body = await call(gateway, "POST", "/", body={"resourceType": "Bundle", "type": "batch",
                                                                       "entry": [{"request": {"method": "GET", "url": path}}]})
    assert status == 200, body
    assert leaks(body, headers, NARRATIVE_SECRETS) == []
    assert b"Patient Summary" in body and b"Active Problems" in body, body


@pytest.mark.parametrize("how", ["read", "search"])
async def test_a_problem_list_read_without_its_items_does_not_name_the_hidden_ones(
    world: FakeFhir, make_gateway: MakeGateway, how: str,
) -> None:
    problems = {"resourceType": "List", "id": "list-ana-rt8", "status": "current", "mode": "working",
                "title": "Problem list", "subject": {"reference": c.PAT_ANA},
                "text": {"status": "generated", "div": IPS_NARRATIVE},
                "entry": [{"item": {"reference": HTN_REF}}, {"item": {"reference": HIV_REF}}]}
    world.add(problems)
    gateway = await make_gateway(world.base_url)
    path = "/List/list-ana-rt8" if how == "read" else f"/List?patient={c.PAT_ANA}"
    status, headers, body = await call(gateway, "GET", path)
    assert status == 200 and b"Problem list" in body, body
    assert leaks(body, headers, NARRATIVE_SECRETS) == []


async def test_a_summary_whose_listed_records_are_all_released_keeps_its_narrative(
    world: FakeFhir, make_gateway: MakeGateway,
) -> None:
    """The narrative goes only where it may name what the answer does not hold: a summary of
    the hypertension alone, found with it, keeps it."""
    composition = summary("ips-ana-htn-rt8", "section")
    composition["section"][0]["entry"] = [{"reference": HTN_REF}]
    world.add(composition)
    world.override = routes({("GET", "/Composition"): lambda r: c.bundle(
        [composition, c.ANA_HYPERTENSION], world.base_url)})
    gateway = await make_gateway(world.base_url)
    status, _, body = await call(gateway, "GET", f"/Composition?patient={c.PAT_ANA}&_include=Composition:entry")
    assert status == 200, body
    assert b"Essential (primary) hypertension" in body  # the narrative, over released records only


# ---------------------------------------------------------------- 4. the last page's link counts the matches


def paged(world: FakeFhir, records: list[dict[str, Any]], total: int, offset: int = 0) -> dict[str, Any]:
    """A page of a search with ``_count=1`` as HAPI FHIR answers it: a ``last`` link whose
    offset is the number of matches less one, hidden ones included."""
    page = c.bundle(records, world.base_url)
    page["total"] = total
    url = f"{world.base_url}/Condition?patient={c.PAT_ANA}&_count=1"
    page["link"] = [{"relation": "self", "url": f"{url}&_offset={offset}"}, {"relation": "first", "url": f"{url}&_offset=0"},
                    {"relation": "next", "url": f"{url}&_offset={offset + 1}"},
                    {"relation": "last", "url": f"{url}&_offset={total - 1}"}]
    return page


@pytest.mark.parametrize("status", [403, 404])
@pytest.mark.parametrize("page_one", ["hidden", "visible"])
async def test_the_last_link_does_not_count_hidden_matches(
    world: FakeFhir, make_gateway: MakeGateway, status: int, page_one: str,
) -> None:
    """Bundle.total goes whenever filtering could hide anything; so does the ``last`` link, the
    same count written as an offset (seven matches: ``_offset=6``). Paging on stays possible
    (in 404 mode a page that lost its match is refilled from the next: it continues at 2)."""
    record = c.HIV_CONDITION if page_one == "hidden" else c.ANA_HYPERTENSION

    def page(request: web.Request) -> dict[str, Any]:
        offset = int(request.query.get("_offset", "0"))
        return paged(world, [record if offset == 0 else c.ANA_HYPERTENSION], 7, offset)

    world.override = routes({("GET", "/Condition"): page})
    gateway = await make_gateway(world.base_url, enforcement={"denied_read_status": status})
    code, headers, body = await call(gateway, "GET", f"/Condition?patient={c.PAT_ANA}&_count=1")
    assert code == 200, body
    links = {link["relation"]: link["url"] for link in orjson.loads(body)["link"]}
    assert "last" not in links and b"_offset=6" not in body and b'"total"' not in body, links
    following = "_offset=2" if (page_one, status) == ("hidden", 404) else "_offset=1"
    assert is_sealed(links["next"]) and b"_offset" not in body, links
    assert inner(gateway, links["next"]).startswith(gateway.url) and inner(gateway, links["next"]).endswith(following), links


# ---------------------------------------------------------------- 5. cascading deletes


def cascade(world: FakeFhir) -> Any:
    """A delete as HAPI FHIR runs it with cascading on: the records that refer to the deleted
    one go with it, and the answer (200) names them."""

    async def override(request: web.Request) -> web.StreamResponse | None:
        cascading = request.query.get("_cascade") == "delete" or request.headers.get("X-Cascade") == "delete"
        if request.method != "DELETE" or not cascading:
            return None
        target = request.path.removeprefix("/fhir/")
        gone = [key for key, r in world.resources.items() if orjson.dumps(r).find(target.encode()) > 0 and key != target]
        for key in [target, *gone]:
            world.resources.pop(key, None)
        return fhir({"resourceType": "OperationOutcome", "issue": [{
            "severity": "information", "code": "informational",
            "diagnostics": f"Cascaded delete to {len(gone)} resources: {gone}"}]})

    return override


@pytest.mark.parametrize("how", ["parameter", "header", "batch"])
async def test_a_cascading_delete_is_refused(world: FakeFhir, make_gateway: MakeGateway, how: str) -> None:
    """The doctor may read Ana's hypertension, not the records that may refer to it: he may not
    delete those, nor learn them from the answer. A plain delete stays the server's to judge."""
    world.override = cascade(world)
    gateway = await make_gateway(world.base_url)
    target = f"Patient/{ANA_ID}"
    if how == "parameter":
        status, headers, body = await call(gateway, "DELETE", f"/{target}?_cascade=delete")
    elif how == "header":
        status, headers, body = await call(gateway, "DELETE", f"/{target}", **{"X-Cascade": "delete"})
    else:
        status, headers, body = await call(gateway, "POST", "/", body={"resourceType": "Bundle", "type": "batch", "entry": [
            {"request": {"method": "DELETE", "url": f"{target}?_cascade=delete"}}]})
    assert HIV_REF in world.resources and target in world.resources, sent_upstream(world)
    assert not [s for s in sent_upstream(world) if s.startswith("DELETE")], sent_upstream(world)
    if how == "batch":
        assert status == 200 and slots(body)[0]["response"]["status"].startswith(("400", "403")), body
    else:
        assert status in (400, 403), body
    assert leaks(body, headers, (c.HIV_CONDITION["id"], c.OUD_CONDITION["id"])) == []


# ---------------------------------------------------------------- 6. the decision header in 404 mode

VARYING = frozenset({"date", "x-request-id", "content-length"})


@pytest.mark.parametrize("door", ["search", "batch", "include", "batch-all-refused"])
async def test_404_mode_the_decision_header_does_not_tell_a_hidden_record_from_a_missing_one(
    world: FakeFhir, make_gateway: MakeGateway, door: str,
) -> None:
    """A search, batch or include that lost a hidden record answers exactly as one that found
    nothing, headers included: ``X-Consent-Decision`` must not say "filtered" (or, for a batch
    whose every entry was refused, "deny") for the one and "permit" for the other. The decision
    log and the metrics keep the true decision, for the operator."""
    gateway = await make_gateway(world.base_url, enforcement={"denied_read_status": 404})
    world.override = routes({
        ("GET", "/Patient"): lambda r: c.bundle(
            [c.ANA], world.base_url, include=(c.HIV_CONDITION,) if "_revinclude" in r.query and "hidden" in r.query.get("x", "") else ()),
    })
    answers = []
    for rid in (c.HIV_CONDITION["id"], "cond-nothing-here-000"):
        if door == "search":
            answers.append(await call(gateway, "GET", f"/Condition?_id={rid}"))
        elif door == "batch":
            answers.append(await call(gateway, "POST", "/", body={"resourceType": "Bundle", "type": "batch", "entry": [
                {"request": {"method": "GET", "url": f"Condition?_id={rid}"}}]}))
        elif door == "batch-all-refused":
            answers.append(await call(gateway, "POST", "/", body={"resourceType": "Bundle", "type": "batch", "entry": [
                {"request": {"method": "GET", "url": f"Condition/{rid}/$meta"}}]}))
        else:
            which = "hidden" if rid == c.HIV_CONDITION["id"] else "none"
            answers.append(await call(gateway, "GET", f"/Patient?_id={ANA_ID}&_revinclude=Condition:subject&x={which}"))
    (s1, h1, b1), (s2, h2, b2) = answers
    assert s1 == s2 == 200, (b1, b2)
    if door in ("search", "batch"):
        assert b1.replace(c.HIV_CONDITION["id"].encode(), b"cond-nothing-here-000") == b2
    assert {k.lower(): v for k, v in h1.items() if k.lower() not in VARYING} == \
        {k.lower(): v for k, v in h2.items() if k.lower() not in VARYING}


@pytest.mark.parametrize("rid", [c.HIV_CONDITION["id"], c.OUD_CONDITION["id"]])
async def test_404_mode_a_page_that_lost_every_entry_has_no_entry_list(
    world: FakeFhir, make_gateway: MakeGateway, rid: str,
) -> None:
    """A server leaves ``entry`` out of a page that found nothing (an empty array is no FHIR
    JSON): a page whose every match was withheld must read the same, not ``"entry":[]``."""

    def found(request: web.Request) -> dict[str, Any]:
        wanted = request.query["_id"]
        page = c.bundle([r for r in (c.HIV_CONDITION, c.OUD_CONDITION) if r["id"] == wanted], world.base_url,
                        self_url=f"{world.base_url}/Condition?_id=x")
        if not page["entry"]:
            del page["entry"]
        page.pop("total")
        return page

    world.override = routes({("GET", "/Condition"): found})
    gateway = await make_gateway(world.base_url, enforcement={"denied_read_status": 404})
    hidden = await call(gateway, "GET", f"/Condition?_id={rid}")
    missing = await call(gateway, "GET", "/Condition?_id=cond-nothing-here-000")
    assert hidden[0] == missing[0] == 200
    # The self link is the URL each asked.
    assert hidden[2].replace(rid.encode(), b"cond-nothing-here-000") == missing[2], (hidden[2], missing[2])
    assert b'"entry"' not in hidden[2]


# ---------------------------------------------------------------- 7. patient data included by a withheld match

ENCOUNTER = {"resourceType": "Encounter", "id": "enc-ana-rt8", "status": "finished",
             "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
             "subject": {"reference": c.PAT_ANA}, "period": {"start": "2021-03-04"}}
HIV_AT_VISIT = {**c.HIV_CONDITION, "encounter": {"reference": "Encounter/enc-ana-rt8"}}


def included(matches: list[dict[str, Any]], includes: list[dict[str, Any]], base: str) -> dict[str, Any]:
    page = c.bundle(matches, base, include=tuple(includes))
    page.pop("total")
    return page


@pytest.mark.parametrize("status", [403, 404])
@pytest.mark.parametrize("asked", ["subject", "encounter", "iterate"])
async def test_patient_data_included_only_by_a_withheld_match_is_not_sent(
    world: FakeFhir, make_gateway: MakeGateway, status: int, asked: str,
) -> None:
    """Ana's Patient record and her visit are open to the doctor, her HIV condition is not: a
    search for HIV conditions that includes their subjects (or encounters) must not answer
    with Ana, which would say she has HIV. What a kept match brings stays, iterated too."""
    world.add(ENCOUNTER, HIV_AT_VISIT)
    htn = {**c.ANA_HYPERTENSION, "encounter": {"reference": "Encounter/enc-ana-htn-rt8"}}
    htn_visit = {**ENCOUNTER, "id": "enc-ana-htn-rt8", "period": {"start": "2020-01-01"}}
    brought = {"subject": [c.ANA], "encounter": [ENCOUNTER], "iterate": [ENCOUNTER, c.ANA]}[asked]

    def answer(request: web.Request) -> dict[str, Any]:
        if request.query.get("code") == "B20":
            return included([HIV_AT_VISIT], brought, world.base_url)
        return included([htn, HIV_AT_VISIT], [htn_visit, *brought], world.base_url)

    world.override = routes({("GET", "/Condition"): answer})
    gateway = await make_gateway(world.base_url, enforcement={"denied_read_status": status})
    include = {"subject": "_include=Condition:subject", "encounter": "_include=Condition:encounter",
               "iterate": "_include=Condition:encounter&_include:iterate=Encounter:subject"}[asked]
    path = f"/Condition?code=B20&{include}"
    code, headers, body = await call(gateway, "GET", path)
    assert code == 200, body
    assert ids_in(body) == set(), body
    # What the client wrote itself (the code) comes back in the self link.
    assert leaks(body, headers, tuple(s for s in (ANA_ID, "Reyes", "enc-ana-rt8", *c.SECRETS) if s not in path)) == []
    # The same includes beside a kept match: what it brings is sent, what only the withheld one brings is not.
    code, headers, body = await call(gateway, "GET", f"/Condition?patient={c.PAT_ANA}&{include}")
    assert code == 200, body
    assert ids_in(body) == {c.ANA_HYPERTENSION["id"], "enc-ana-htn-rt8"} | (
        {ANA_ID} if asked != "encounter" else set()), body
