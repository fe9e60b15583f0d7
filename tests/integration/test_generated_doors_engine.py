"""Generated requests (Hypothesis) against the real FHIR engine: what the engine itself does.

``tests/leak/test_generated_doors.py`` composes requests from the doors' parts and holds every
answer to four properties, against a fake server that ignores most search parameters. Here
the same strategies and the same property checks (imported, not copied) run against the real
engine (Medplum's FhirRouter behind ``tests/upstream/server.mjs``), which answers what a real
server answers: ``_include``/``_revinclude`` of every reference path (``:iterate``, ``*``),
chains (``subject.name=``, ``patient:Patient.birthdate=``), ``_has`` (the gateway refuses it),
``_list``, ``_type``, ``_id``, ``identifier``, ``_tag``, ``_security``, ``_sort``, ``_count``
and its paging (each answer's ``next`` link is followed for a few pages), history at every
level, compartment searches, conditional writes (``If-None-Exist``, conditional update and
delete) and batch and transaction Bundles of the same entries.

The world is the fake's: Ana holds a general opt-in (her HIV, opioid-use, mental-health and
psychotherapy records and her restricted notes stay closed, also the Binary of a restricted
note), Ben opted out. Ordinary records point at hidden ones, with displays naming them:
a CBC derived from the HIV test, a Provenance, a Task, an AuditEvent, a DocumentReference,
an Encounter and a List. Hidden records carry an identifier and a tag, each shared with
nothing but the search that names it. After every request the engine's records are put back
as seeded (``server.mjs --rollback``) and the gateways forget the consents they read.

The properties, for every request on each gateway (decided whole, on views, whole in 404 mode):
(1) no unhandled failure, an error answer is a FHIR JSON OperationOutcome; (2) no hidden id,
code, display text, identifier or Binary content in the raw answer or in any page after it,
unless the request carried it; (3) in 404 mode a hidden record answers as a missing one; (4)
a read sent as the one entry of a batch or a transaction answers in its slot as it does alone.

Derandomized by default (the suite runs the same examples each time). To search further:
``GATEWAY_FUZZ_EXAMPLES=3000 GATEWAY_FUZZ_RANDOM=1 pytest --timeout=0 tests/integration/test_generated_doors_engine.py``.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fixtures import clinical as c
from tests.integration.conftest import NOT_INSTALLED
from tests.integration.engine import Engine, engine_installed, start_engine
from tests.leak.test_generated_doors import (
    ACTORS,
    EXAMPLES,
    EXTRA,
    HEADER_CHOICES,
    HIDDEN,
    HIV_TEST_REF,
    IDS,
    MARKERS,
    PARAMS,
    RANDOM,
    SECRETS,
    SELF_ACTORS,
    TYPES,
    VALUES,
    Attempt,
    Doors,
    Words,
    attempts,
    check_answer,
    check_slot,
    check_twins,
    hidden_attempts,
    missing_twin,
    parts,
    plain_reads,
    unsaid,
)

pytestmark = pytest.mark.integration

# ---------------------------------------------------------------- the world

HIV_CONDITION_REF = f"Condition/{c.HIV_CONDITION['id']}"
OUD_CONDITION_REF = f"Condition/{c.OUD_CONDITION['id']}"
DEPRESSION_REF = f"Condition/{c.DEPRESSION['id']}"
PSYNOTE_REF = f"DocumentReference/{c.PSYCHOTHERAPY_NOTE['id']}"
LAB_IDS = "urn:oid:2.16.840.1.113883.19.5.99"  # the lab's accession numbers
TAGS = "urn:oid:2.16.840.1.113883.19.5.98"  # the clinic's own workflow tags
# Hidden records as the engine holds them: each with an accession number of its own (a
# document: its masterIdentifier) and the follow-up tag an ordinary record carries too.
HIDDEN_WITH_IDENTIFIERS = tuple(
    {**record, "meta": {**record.get("meta", {}), "tag": [{"system": TAGS, "code": "follow-up"}]},
     **({"masterIdentifier": {"system": LAB_IDS, "value": f"DOC-{n:04d}-77"}}
        if record["resourceType"] == "DocumentReference"
        else {"identifier": [{"system": LAB_IDS, "value": f"ACC-{n:04d}-77"}]})}
    for n, record in enumerate(c.ANA_SENSITIVE, start=3101)
)
HIDDEN_IDENTIFIERS = tuple(
    r["identifier"][0]["value"] if "identifier" in r else r["masterIdentifier"]["value"] for r in HIDDEN_WITH_IDENTIFIERS
)
HYPERTENSION_TAGGED = {**c.ANA_HYPERTENSION, "meta": {"tag": [{"system": TAGS, "code": "follow-up"}]},
                       "identifier": [{"system": LAB_IDS, "value": "ACC-3099-77"}]}
RESTRICTED_NOTE_DATA = base64.b64encode(b"Admission note: injuries consistent with the reported assault.").decode()
RESTRICTED_BINARY = {
    "resourceType": "Binary", "id": "bin-r-61f", "contentType": "text/plain", "data": RESTRICTED_NOTE_DATA,
    "securityContext": {"reference": f"DocumentReference/{c.RESTRICTED_DOCUMENT['id']}"},
}
CONTAINED_REPORT = c.cbc_report_with_contained_hiv()
TASK = {
    "resourceType": "Task", "id": "task-follow-7", "status": "requested", "intent": "order",
    "focus": {"reference": HIV_CONDITION_REF, "display": "HIV disease"}, "for": {"reference": c.PAT_ANA},
    "requester": {"reference": c.DOCTOR}, "description": "Book a follow-up visit",
}
AUDIT_EVENT = {
    "resourceType": "AuditEvent", "id": "audit-read-5",
    "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-event-type", "code": "rest"},
    "recorded": "2023-03-01T10:00:00Z",
    "agent": [{"who": {"reference": c.DOCTOR}, "requestor": True}],
    "source": {"observer": {"reference": c.DOCTOR}},
    "entity": [{"what": {"reference": HIV_TEST_REF, "display": "HIV 1 and 2 tests"}}, {"what": {"reference": c.PAT_ANA}}],
}
SUMMARY = {
    "resourceType": "DocumentReference", "id": "docref-summary-4", "status": "current",
    "type": c.concept(c.LOINC, "18842-5", "Discharge summary"), "subject": {"reference": c.PAT_ANA},
    "relatesTo": [{"code": "appends", "target": {"reference": PSYNOTE_REF, "display": "Psychology Progress note"}}],
    "content": [{"attachment": {"contentType": "text/plain", "data": base64.b64encode(b"Discharged home.").decode()}}],
}
ENCOUNTER = {
    "resourceType": "Encounter", "id": "enc-visit-6", "status": "finished",
    "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
    "subject": {"reference": c.PAT_ANA}, "participant": [{"individual": {"reference": c.DOCTOR}}],
    "reasonReference": [{"reference": OUD_CONDITION_REF, "display": "Opioid dependence, uncomplicated"}],
    "diagnosis": [{"condition": {"reference": HIV_CONDITION_REF, "display": "HIV disease"}}],
}
PROBLEM_LIST = {
    "resourceType": "List", "id": "list-problems-8", "status": "current", "mode": "working", "title": "Problem list",
    "subject": {"reference": c.PAT_ANA},
    "entry": [{"item": {"reference": f"Condition/{c.ANA_HYPERTENSION['id']}"}},
              {"item": {"reference": HIV_CONDITION_REF, "display": "HIV disease"}},
              {"item": {"reference": DEPRESSION_REF}}],
}
# Ana's records that name Ben (who opted out): his records by reference, with displays naming him.
HOUSEHOLD = {
    "resourceType": "List", "id": "list-household-3", "status": "current", "mode": "snapshot", "title": "Household",
    "subject": {"reference": c.PAT_ANA},
    "entry": [{"item": {"reference": c.PAT_BEN, "display": "Ben Okafor"}},
              {"item": {"reference": f"Observation/{c.BEN_CBC['id']}", "display": "CBC of Ben Okafor"}}],
}
SHARED_PROVENANCE = {
    "resourceType": "Provenance", "id": "prov-shared-9", "recorded": "2023-05-02T09:00:00Z",
    "target": [{"reference": f"Observation/{c.ANA_CBC['id']}"},
               {"reference": f"Observation/{c.BEN_CBC['id']}", "display": "CBC of Ben Okafor"}],
    "agent": [{"who": {"reference": c.DOCTOR}}],
}
POINTERS = (TASK, AUDIT_EVENT, SUMMARY, ENCOUNTER, PROBLEM_LIST, CONTAINED_REPORT, HOUSEHOLD, SHARED_PROVENANCE)
# History: a record of Ana's first written as fatigue, then as HIV disease (its current version
# hidden), and an HIV diagnosis of hers written and then deleted.
REVISED_BEFORE = c.condition("cond-rev-r5383-2", c.PAT_ANA, c.concept(c.ICD10CM, "R53.83", "Other fatigue"), "2020-05-02")
REVISED = {**REVISED_BEFORE, "code": c.HIV_CONDITION["code"]}
DELETED = {**c.HIV_CONDITION, "id": "cond-hiv-gone-4"}
ENGINE_HIDDEN = (*HIDDEN, RESTRICTED_BINARY, REVISED)


def world() -> list[dict[str, Any]]:
    """Every record of the world, in an order the engine accepts."""
    ordinary = (c.ANA, c.BEN, c.PRACTITIONER, HYPERTENSION_TAGGED, c.ANA_CBC, *c.BEN_ORDINARY)
    return [*ordinary, *HIDDEN_WITH_IDENTIFIERS, *EXTRA, RESTRICTED_BINARY, *POINTERS,
            c.opt_in(c.PAT_ANA), c.opt_out(c.PAT_BEN, "consent-ben-out")]


def seed_bundles() -> tuple[dict[str, Any], dict[str, Any]]:
    """The world as written, then the revision and the deletion that make its history."""
    first = [*world(), REVISED_BEFORE, DELETED]
    return ({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}} for r in first
    ]}, {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": REVISED, "request": {"method": "PUT", "url": f"Condition/{REVISED['id']}"}},
        {"request": {"method": "DELETE", "url": f"Condition/{DELETED['id']}"}},
    ]})


ENGINE_SECRETS = (*SECRETS, *HIDDEN_IDENTIFIERS, "bin-r-61f", RESTRICTED_NOTE_DATA, "Binary/bin-r-61f", "cond-hiv-gone-4")
# A released record keeps its references (CONTRACT §6 removes their displays): a hidden record's
# id may show there, as a reference's value, and nowhere else.
KEPT = tuple(orjson.dumps({"reference": f"{r['resourceType']}/{r['id']}"})[1:-1]
             for r in (*ENGINE_HIDDEN, *c.BEN_ORDINARY))

# ---------------------------------------------------------------- the words of requests to the engine

INCLUDES = (
    "Observation:subject", "Observation:patient", "Observation:derived-from", "Observation:has-member",
    "Observation:focus", "Observation:encounter", "Condition:subject", "Condition:patient", "Condition:encounter",
    "MedicationRequest:subject", "MedicationRequest:requester", "MedicationRequest:medication",
    "DocumentReference:subject", "DocumentReference:relatesto", "DocumentReference:author", "DocumentReference:patient",
    "Provenance:target", "Provenance:agent", "Provenance:entity", "Provenance:patient", "Task:focus", "Task:patient",
    "Task:subject", "Task:requester", "AuditEvent:entity", "AuditEvent:patient", "AuditEvent:agent",
    "Encounter:patient", "Encounter:subject", "Encounter:reason-reference", "Encounter:diagnosis",
    "List:item", "List:subject", "List:patient", "Flag:patient", "Flag:subject", "DiagnosticReport:result",
    "DiagnosticReport:subject", "Consent:patient", "Patient:general-practitioner", "Patient:link", "*",
    "Condition:*", "Encounter:*", "List:*", "Task:*", "AuditEvent:*", "Provenance:*", "DocumentReference:*",
)
ENGINE_PARAMS = (
    *PARAMS, "_include", "_include", "_revinclude", "_revinclude", "_include:iterate", "_revinclude:iterate",
    "subject.name", "subject:Patient.name", "patient:Patient.birthdate", "patient.birthdate", "patient.family",
    "_has:Condition:subject:code", "_has:Observation:patient:_id", "_offset", "_id", "_id", "identifier", "identifier",
    "_tag", "_security", "_sort", "_count", "_count", "_list", "_type", "code:not", "date", "encounter", "derived-from",
    "agent", "item", "relatesto", "reason-reference", "diagnosis", "for", "_source", "code:text", "title",
    "description", "_lastUpdated", "patient", "subject", "_content", "_text",
)
ENGINE_VALUES = (
    *VALUES, *INCLUDES, *(f"Patient/{i}" for i in ("pat-ana-5581", "pat-ben-7702")), "Reyes", "Ana", "Okafor",
    "1984-07-19", "ge1950-01-01", "lt1990-01-01", f"{LAB_IDS}|ACC-3101-77", "ACC-3102-77", f"{LAB_IDS}|ACC-3099-77",
    f"{LAB_IDS}|DOC-3107-77", f"{TAGS}|follow-up", "follow-up", "http://terminology.hl7.org/CodeSystem/v3-ActCode|PSYTHPN",
    "http://terminology.hl7.org/CodeSystem/v3-Confidentiality|R", "V", "list-problems-8", "List/list-problems-8",
    "Observation,Condition", "Condition", "DocumentReference,Binary", "Task,Encounter,List", "_lastUpdated", "-date",
    "code", "_id", "-_id", "2", "3", "1,2", f"{c.HIV_CONDITION['id']},{c.ANA_HYPERTENSION['id']}", "Condition/cond-hiv-b20-91a",
    "Encounter/enc-visit-6", "task-follow-7", "audit-read-5", "docref-summary-4", "enc-visit-6", "Discharge", "HIV disease",
    "I10", "http://hl7.org/fhir/sid/icd-10-cm|F32.9", "assault", "grief",
)
ENGINE_WORDS = Words(
    types=(*TYPES, "Task", "DiagnosticReport"),
    ids=(*IDS, "bin-r-61f", "task-follow-7", "audit-read-5", "docref-summary-4", "enc-visit-6", "list-problems-8",
         CONTAINED_REPORT["id"], "list-household-3", "prov-shared-9", REVISED["id"], DELETED["id"]),
    markers=MARKERS, params=ENGINE_PARAMS, values=ENGINE_VALUES, wider_history=True,
)
CONDITIONS = (
    f"identifier={LAB_IDS}|ACC-3101-77", f"_id={c.HIV_CONDITION['id']}", "code=http://loinc.org|75622-1",
    f"patient={c.PAT_ANA}", "code=B20", f"identifier={LAB_IDS}|ACC-3099-77", "_id=nope-1", f"_tag={TAGS}|follow-up",
)
ENGINE_CHOICES = (
    *HEADER_CHOICES, ("If-None-Exist", (None,) * 6 + CONDITIONS), ("If-Match", (None,) * 10 + ('W/"1"', 'W/"2"')),
)
# A record as a client creates or updates it: valid, so that the engine does what is asked.
WRITTEN = (
    {"resourceType": "Observation", "status": "final", "code": c.concept(c.LOINC, "8867-4", "Heart rate"),
     "subject": {"reference": c.PAT_ANA}, "valueQuantity": {"value": 72, "unit": "/min"}},
    {"resourceType": "Condition", "code": c.concept("http://hl7.org/fhir/sid/icd-10-cm", "I10", "Essential (primary) hypertension"),
     "subject": {"reference": c.PAT_ANA}},
    {"resourceType": "Flag", "status": "active", "code": {"text": "Falls risk"}, "subject": {"reference": c.PAT_BEN}},
)


@st.composite
def conditional_writes(draw: st.DrawFn) -> Attempt:
    """A conditional create (``If-None-Exist``), update (``PUT Type?search``) or delete
    (``DELETE Type?search``) with a valid record, alone or as an entry of a batch or a
    transaction."""
    record = dict(draw(st.sampled_from(WRITTEN)))
    rtype, condition = record["resourceType"], draw(st.sampled_from(CONDITIONS))
    method = draw(st.sampled_from(("POST", "POST", "PUT", "DELETE")))
    actor = ("X-Actor", draw(st.sampled_from(SELF_ACTORS)))
    json_type = ("Content-Type", "application/fhir+json")
    kind = draw(st.sampled_from(("alone", "alone", "batch", "transaction")))
    if kind != "alone":
        request = {"method": method, "url": rtype if method == "POST" else f"{rtype}?{condition}"}
        if method == "POST":
            request["ifNoneExist"] = condition
        entry: dict[str, Any] = {"request": request}
        if method != "DELETE":
            entry["resource"] = record
        read = {"request": {"method": "GET", "url": f"{rtype}?{draw(st.sampled_from(CONDITIONS))}"}}
        return Attempt("POST", "/fhir", (actor, json_type),
                       orjson.dumps({"resourceType": "Bundle", "type": kind, "entry": [entry, read]}))
    if method == "POST":
        return Attempt("POST", f"/fhir/{rtype}", (actor, json_type, ("If-None-Exist", condition)), orjson.dumps(record))
    if method == "PUT":
        return Attempt("PUT", f"/fhir/{rtype}?{condition}", (actor, json_type), orjson.dumps(record))
    return Attempt("DELETE", f"/fhir/{rtype}?{condition}", (actor,), b"")


HIDDEN_REFERENCES = tuple(f"{r['resourceType']}/{r['id']}" for r in ENGINE_HIDDEN)
_SEARCH_PAIRS = st.one_of(
    st.tuples(st.sampled_from(("_include", "_revinclude", "_include:iterate", "_revinclude:iterate")), st.sampled_from(INCLUDES)),
    st.tuples(st.sampled_from(("patient", "subject", "subject:Patient", "for")), st.sampled_from((c.PAT_ANA, c.PAT_BEN, "pat-ana-5581"))),
    st.tuples(st.sampled_from(("subject.name", "subject:Patient.name", "patient.family", "patient:Patient.birthdate",
                               "patient.birthdate", "patient._id")),
              st.sampled_from(("Reyes", "Ana", "Okafor", "1984-07-19", "ge1950-01-01", "pat-ana-5581"))),
    st.tuples(st.just("_id"), st.sampled_from(ENGINE_WORDS.ids)),
    st.tuples(st.just("identifier"), st.sampled_from((f"{LAB_IDS}|ACC-3101-77", "ACC-3102-77", f"{LAB_IDS}|ACC-3099-77",
                                                      f"{LAB_IDS}|DOC-3107-77", f"{LAB_IDS}|", "ACC-3104-77"))),
    st.tuples(st.sampled_from(("_tag", "_tag:not", "_security", "_security:not")),
              st.sampled_from((f"{TAGS}|follow-up", "follow-up", "http://terminology.hl7.org/CodeSystem/v3-ActCode|PSYTHPN",
                               "http://terminology.hl7.org/CodeSystem/v3-Confidentiality|R", "R", "V"))),
    st.tuples(st.just("_list"), st.sampled_from(("list-problems-8", "List/list-problems-8", "$current-problems"))),
    st.tuples(st.just("_count"), st.sampled_from(("0", "1", "1", "2", "3"))),
    st.tuples(st.just("_sort"), st.sampled_from(("_lastUpdated", "-_lastUpdated", "-date", "code", "_id", "-_id", "subject"))),
    st.tuples(st.just("_type"), st.sampled_from(("Observation,Condition", "Condition", "DocumentReference,Binary",
                                                  "Task,Encounter,List,AuditEvent,Provenance", "Flag,MedicationRequest"))),
    st.tuples(st.sampled_from(("_has:Condition:subject:code", "_has:Observation:patient:code")), st.sampled_from(("B20", "75622-1"))),
    st.tuples(st.sampled_from(("code", "code:text", "_text", "_content", "code:not", "description", "title")),
              st.sampled_from(("B20", "HIV", "http://loinc.org|75622-1", "assault", "grief", "I10", "Problem", "Discharge"))),
    st.tuples(st.sampled_from(("focus", "target", "entity", "item", "reason-reference", "diagnosis", "relatesto",
                               "derived-from", "securitycontext")), st.sampled_from(HIDDEN_REFERENCES)),
    st.tuples(st.sampled_from(("_summary", "_elements", "_total", "_contained", "_containedType")),
              st.sampled_from(("true", "count", "data", "id,subject", "accurate", "both", "contained"))),
)
_SEARCH_TYPES = (
    "Observation", "Condition", "MedicationRequest", "DocumentReference", "Binary", "Provenance", "Task", "AuditEvent",
    "Encounter", "List", "Flag", "DiagnosticReport", "Patient", "Consent",
)


@st.composite
def engine_searches(draw: st.DrawFn) -> Attempt:
    """A search, history or compartment read as a client writes it, with the parameters the
    engine acts on (GET, or POST ``_search`` with a form body)."""
    rtype = draw(st.sampled_from(_SEARCH_TYPES))
    rid = draw(st.sampled_from(ENGINE_WORDS.ids))
    path = draw(st.sampled_from(([rtype],) * 6 + (["Patient", "pat-ana-5581", rtype], ["Patient", "pat-ben-7702", rtype], [],
                                 [rtype, "_history"], ["_history"], [rtype, rid, "_history"], [rtype, rid])))
    pairs = draw(st.lists(_SEARCH_PAIRS, min_size=0 if path else 1, max_size=4))
    if not path:
        pairs.insert(0, ("_type", draw(st.sampled_from(_SEARCH_TYPES))))
    query = "&".join(f"{name}={quote(value, safe='/:,|')}" for name, value in pairs)
    headers: tuple[tuple[str, str], ...] = (("X-Actor", draw(st.sampled_from(SELF_ACTORS))),)
    target = "/fhir/" + "/".join(path)
    if len(path) == 1 and path[0] != "_history" and draw(st.integers(0, 4)) == 0:
        form = ("Content-Type", "application/x-www-form-urlencoded")
        return Attempt("POST", f"{target}/_search", (*headers, form), query.encode())
    return Attempt("GET", f"{target}?{query}" if query else target, headers, b"")


ENGINE_ATTEMPTS = st.one_of(attempts(ENGINE_WORDS, ENGINE_CHOICES), engine_searches(), engine_searches(), conditional_writes())
PAGES_FOLLOWED = 3

# ---------------------------------------------------------------- the engine and three gateways


class EngineDoors(Doors):
    """The real engine, seeded with the world, and the three gateways of ``Doors`` in front."""

    def __init__(self, audit_dir: Path) -> None:
        self.seed_files = [audit_dir / "world.json", audit_dir / "history.json"]
        for path, bundle in zip(self.seed_files, seed_bundles()):
            path.write_text(json.dumps(bundle))
        super().__init__(audit_dir)

    async def _start(self) -> bool:
        self._engine = start_engine(seeds=self.seed_files, rollback=True)
        self.engine: Engine = self._engine.__enter__()
        self.session = aiohttp.ClientSession()
        self.changes_url = f"http://127.0.0.1:{self.engine.port}/__engine/changes"
        self.seeded_changes = await self._changes("GET")
        await self.start_gateways(self.engine.base_url)
        return True

    async def _changes(self, method: str, to: int | None = None) -> int:
        params = {"to": str(to)} if to is not None else {}
        async with self.session.request(method, self.changes_url, params=params) as resp:
            assert resp.status == 200, await resp.text()
            count: int = (await resp.json(content_type=None))["count"]
            return count

    async def restore(self) -> None:
        """Undo what the last request wrote, and let the gateways forget the consents they read
        (one might have been written and undone)."""
        if await self._changes("GET") == self.seeded_changes:
            return
        await self._changes("POST", self.seeded_changes)
        for _, _, running in self.gateways:
            url = f"http://127.0.0.1:{running.admin_port}/cache/invalidate"
            async with self.session.post(url, json={}) as resp:
                assert resp.status == 200, await resp.text()

    async def answers(self, name: str, state: Any, running: Any, attempt: Attempt) -> list[tuple[str, bytes, float]]:
        """The gateway's answer, and after it the pages its ``next`` links lead to."""
        found = await super().answers(name, state, running, attempt)
        headers = tuple((n, v) for n, v in attempt.headers if n.lower() in ("x-actor", "accept", "x-purpose-of-use"))
        for page in range(2, PAGES_FOLLOWED + 1):
            link = next_link(found[-1][1])
            if link is None:
                break
            answer = await self.answer(running.proxy_port, Attempt("GET", link, headers, b""), name)
            found.append((f"{name} page {page}", answer, self.internal_errors(state)))
        return found

    async def _stop_servers(self) -> None:
        await self.session.close()
        self._engine.__exit__(None, None, None)


def next_link(answer: bytes) -> str | None:
    """The path and query of a search page's ``next`` link, if it has one."""
    status, _, body = parts(answer)
    if status != 200 or not body.startswith(b"{"):
        return None
    bundle = orjson.loads(body)
    for link in bundle.get("link") or ():
        if link.get("relation") == "next" and isinstance(link.get("url"), str):
            url: str = link["url"]
            return "/" + url.split("://", 1)[-1].split("/", 1)[-1] if "://" in url else url
    return None


@pytest.fixture(scope="module")
def engine_doors(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EngineDoors]:
    if not engine_installed():
        pytest.skip(NOT_INSTALLED)
    running = EngineDoors(tmp_path_factory.mktemp("generated-doors-engine"))
    yield running
    running.close()


_SETTINGS = {"deadline": None, "derandomize": not RANDOM, "database": None,
             "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large]}


@settings(max_examples=EXAMPLES * 4, **_SETTINGS)
@given(attempt=ENGINE_ATTEMPTS)
def test_no_generated_request_to_the_engine_fails_unhandled_or_tells_a_hidden_record(
    engine_doors: EngineDoors, attempt: Attempt,
) -> None:
    secrets = unsaid(attempt, ENGINE_SECRETS)
    for name, answer, errors in engine_doors.send(attempt):
        check_answer(name, attempt, answer, errors, secrets, KEPT)


@settings(max_examples=EXAMPLES * 2, **_SETTINGS)
@given(case=hidden_attempts(ENGINE_HIDDEN))
def test_in_404_mode_a_hidden_record_on_the_engine_answers_as_a_missing_one(
    engine_doors: EngineDoors, case: tuple[Attempt, Attempt, str, str],
) -> None:
    check_twins(engine_doors, case)


# The searches that name a hidden record by a reference to it, by the type that refers to it:
# each finds an ordinary record pointing at the hidden one (the engine acts on all of them).
_REFERRING = (
    ("Provenance", "target"), ("Task", "focus"), ("List", "item"), ("Encounter", "diagnosis"),
    ("Encounter", "reason-reference"), ("AuditEvent", "entity"), ("Observation", "derived-from"),
    ("DocumentReference", "relatesto"), ("Binary", "_id"),
)
_IDENTIFIED = {r["id"]: (r.get("identifier") or [r.get("masterIdentifier")])[0]["value"] for r in HIDDEN_WITH_IDENTIFIERS}


@st.composite
def hidden_searches(draw: st.DrawFn) -> tuple[Attempt, Attempt, str, str]:
    """A search naming one of Ana's hidden records (by ``_id``, by its identifier, by a
    reference to it, with includes), alone or as a batch entry, the same search naming a
    missing record written alike, and the two names."""
    record = draw(st.sampled_from(ENGINE_HIDDEN))
    rtype, rid = record["resourceType"], record["id"]
    how = draw(st.sampled_from(("_id", "_id", "identifier", "reference", "reference")))
    if how == "identifier" and rid in _IDENTIFIED:
        name, query = _IDENTIFIED[rid], f"{rtype}?identifier={LAB_IDS}|{{}}"
    elif how == "reference":
        referring, param = draw(st.sampled_from(_REFERRING))
        name, query = rid, f"{referring}?{param}={rtype}/{{}}" if param != "_id" else f"{referring}?_id={{}}"
    else:
        name, query = rid, f"{rtype}?_id={{}}"
    extra = draw(st.sampled_from(("", "", "&_include=*", "&_revinclude=*", "&_revinclude=Provenance:target",
                                  "&_summary=count", "&_count=1", "&_total=accurate", "&_elements=id")))
    kind = draw(st.sampled_from(("alone", "alone", "alone", "batch", "transaction")))
    headers: tuple[tuple[str, str], ...] = (("X-Actor", draw(st.sampled_from(ACTORS))),)

    def naming(value: str) -> Attempt:
        url = query.format(value) + extra
        if kind == "alone":
            return Attempt("GET", f"/fhir/{url}", headers, b"")
        bundle = {"resourceType": "Bundle", "type": kind, "entry": [{"request": {"method": "GET", "url": url}}]}
        return Attempt("POST", "/fhir", (*headers, ("Content-Type", "application/fhir+json")), orjson.dumps(bundle))

    twin = missing_twin(name)
    return naming(name), naming(twin), name, twin


@settings(max_examples=EXAMPLES * 2, **_SETTINGS)
@given(case=hidden_searches())
def test_in_404_mode_a_search_naming_a_hidden_record_answers_as_one_naming_a_missing_one(
    engine_doors: EngineDoors, case: tuple[Attempt, Attempt, str, str],
) -> None:
    check_twins(engine_doors, case)


@settings(max_examples=EXAMPLES * 2, **_SETTINGS)
@given(alone=st.one_of(plain_reads(ENGINE_WORDS), engine_searches().filter(lambda a: a.method == "GET")), gateway=st.sampled_from(("whole", "views", "404")),
       kind=st.sampled_from(("batch", "transaction")))
def test_an_entry_of_a_batch_or_transaction_is_answered_by_the_engine_as_the_same_request_alone(
    engine_doors: EngineDoors, alone: Attempt, gateway: str, kind: str,
) -> None:
    check_slot(engine_doors, alone, gateway, kind)

