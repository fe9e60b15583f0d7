"""Views of an answer (core.view) decide exactly as the whole resources do.

1. Over generated resources of every patient-compartment type (and a few others), the view
   and the whole resource give the same labels, scopes, patients, date, main codes, authors,
   profiles, deciding references and per-resource decision (for consents a summary settles).
2. Decision code reads no top-level element outside the type's field plan (``view_elements``);
   the tracker that checks it is shown to catch a plan missing one element.
3. Search sets splice back from the upstream's bytes; texts a view cannot vouch for are not
   viewed at all.
"""

from __future__ import annotations

import copy
from collections.abc import Awaitable, Callable, Hashable, Iterator, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

import msgspec
import orjson
import pytest
from aiohttp import web
from hypothesis import event, given
from hypothesis import strategies as st

from gateway.core.memo import TextMemo
from gateway.core import view as view_module
from gateway.core.compartment import authors_of, clinical_date, main_codes, patients_of, profiles_of
from gateway.core.consent import CompiledConsent
from gateway.core.decision import Policy, decide_resource, summary_reads
from gateway.core.enforce import Enforcer, owners_index
from gateway.core.fhir import resource_reference
from gateway.core.judge import binaries_as_contexts
from gateway.core.model import Actor, Decision, RequestContext
from gateway.core.references import Resolved, deciding_references, medication_reference, security_context
from gateway.core.view import WHOLE_TYPES, AnswerView, read_answer, spans_of, view_elements
from gateway.web.enforcement import ConsentEnforcement, Looked, bind_contexts
from tests.conftest import GatewayUnderTest
from tests.fakes import FakeFhir
from tests.fixtures import clinical
from tests.strategies import (
    by_patient,
    decision_policies,
    fast,
    request_contexts,
    ALL_TYPES,
    JSON,
    consent_specs,
    resources,
    rules_index,
    searchset_texts,
    sensitive_codings,
    with_decimals,
)

LABELS = rules_index()
NOW = datetime(2024, 6, 1, 12, tzinfo=timezone.utc)


_fast = fast


# ---------------------------------------------------------------------- helpers


def entry_view(resource: JSON) -> tuple[JSON, frozenset[Any]]:
    """The resource as a search answer's pipeline decides it (its view, or the whole resource
    for the types read whole), and its labels as the pipeline computes them (through the
    label memo when the view has a key)."""
    raw = orjson.dumps({"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": resource, "search": {"mode": "match"}}]})
    answer = read_answer(raw)
    assert answer is not None
    found: JSON = answer.body["entry"][0]["resource"]
    key = answer.label_keys.get(id(found))
    return found, (LABELS.labels_keyed(key, found) if key is not None else LABELS.labels_for(found))


def facts(res: JSON, strays: bool = True) -> dict[str, object]:
    """Everything the pipeline reads of one resource besides the consent decision; with
    ``strays``, the labels of extensions off the plans too (a walk of every element)."""
    return {
        "labels": LABELS.labels_for(res) if strays else LABELS.planned_labels(res),
        "scopes": LABELS.scopes_for(res),
        "patients": patients_of(res),
        "date": clinical_date(res),
        "main_codes": main_codes(res),
        "authors": authors_of(res),
        "profiles": profiles_of(res),
        "security_context": security_context(res),
        "medication_reference": medication_reference(res),
        "reference": resource_reference(res),
    }


policies, contexts = decision_policies, request_contexts


def decisions(
    consents: Mapping[str, Sequence[CompiledConsent]], resource: JSON, labels: frozenset[Any],
    ctx: RequestContext, policy: Policy,
) -> tuple[Decision, Decision]:
    """The decision with the patients read from the resource, and with them given (as the
    judge gives them)."""
    scopes = LABELS.scopes_for(resource)
    return (
        decide_resource(consents, resource, labels, scopes, ctx, policy),
        decide_resource(consents, resource, labels, scopes, ctx, policy, patients=patients_of(resource)),
    )


def test_the_generated_codes_earn_labels() -> None:
    """The strategies draw from the bundled rules' sensitive codes, so labels are exercised."""
    assert len(sensitive_codings()) >= 40
    categories = {label.code for c in sensitive_codings() for label in LABELS.labels_for({"resourceType": "Basic", "code": c})}
    assert {"HIV", "PSY", "SUD", "SEX", "42CFRPart2"} <= categories


# ---------------------------------------------------------------------- 1. view == whole


@pytest.mark.parametrize("rtype", ALL_TYPES)
@_fast(6)
@given(data=st.data())
def test_the_view_decides_as_the_whole_resource(rtype: str, data: st.DataObject) -> None:
    whole = data.draw(resources(rtype), label="resource")
    specs = data.draw(st.lists(consent_specs, max_size=4), label="consents")
    consents = by_patient(specs, data.draw(st.sampled_from([None, "Patient/p3"]), label="not looked up"))
    assert all(summary_reads(c) is not None for c in consents.values())
    ctx, policy = data.draw(contexts, label="context"), data.draw(policies, label="policy")

    viewed, pipeline_labels = entry_view(whole)
    if rtype in WHOLE_TYPES:
        assert viewed == whole
    else:
        # The view holds exactly the planned elements (meta only when it holds what decides:
        # profiles or security labels), and a single read gives the same view.
        planned = {k: v for k, v in whole.items() if k in view_elements(rtype)}
        meta = planned.pop("meta", None)
        assert {k: v for k, v in viewed.items() if k != "meta"} == planned
        if isinstance(meta, dict) and ("profile" in meta or "security" in meta):
            assert viewed["meta"] == meta
        assert viewed.get("meta", meta) == meta
        single = read_answer(orjson.dumps(whole))
        assert single is not None and single.body == viewed

    assert facts(viewed) == facts(whole)
    assert pipeline_labels == LABELS.labels_for(whole)
    labels = LABELS.labels_for(whole)
    found = decisions(consents, viewed, labels, ctx, policy)
    assert found == decisions(consents, whole, labels, ctx, policy)
    event(f"{'labelled' if labels else 'unlabelled'} {found[0].verdict.value}")


MEDICATION: JSON = {"resourceType": "Medication", "id": "m1", "code": {"coding": [
    {"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "352364"}]}}  # buprenorphine / naloxone: OPIOIDUD
RESOLVED = Resolved(targets={"Medication/m1": MEDICATION, "Patient/p1": {"resourceType": "Patient", "id": "p1"}})


# One gateway per policy, its decision cache shared by every example: decisions made on one
# example's views are served to later examples whose facts agree, under the consents' version.
_GATEWAYS: dict[Policy, ConsentEnforcement] = {}


def filtered(
    body: JSON, keys: Mapping[int, Any] | None, consents: Mapping[str, Sequence[CompiledConsent]],
    ctx: RequestContext, policy: Policy, versions: Mapping[str, Hashable] | None = None,
) -> tuple[Any, ...]:
    """What the gateway's enforcement leaves of ``body`` (changed in place) and why, as
    ConsentEnforcement.enforce runs it once the consents are looked up; with ``versions``
    through the decision cache shared across requests, else deciding afresh."""
    looked = Looked(ctx, {p: tuple(c) for p, c in consents.items()}, versions=versions)
    if versions is None:
        enforcement = ConsentEnforcement(None, LABELS, policy)  # type: ignore[arg-type]
    else:
        enforcement = _GATEWAYS.setdefault(policy, ConsentEnforcement(None, LABELS, policy))  # type: ignore[arg-type]
    judge = binaries_as_contexts(enforcement.judge(looked, RESOLVED, None, keys), RESOLVED)
    binaries: list[JSON] = []
    index = owners_index(body, binaries)
    bind_contexts(binaries, index, RESOLVED)
    result = Enforcer(judge, drop_total=True, index=index).body(body)
    return result.denied, result.removed, result.deciding, result.changed


@_fast(60)
@given(raw=searchset_texts(), data=st.data())
def test_a_viewed_search_set_is_filtered_as_the_whole_one(raw: bytes, data: st.DataObject) -> None:
    specs: list[JSON] = data.draw(st.lists(consent_specs, max_size=4), label="consents")
    consents = by_patient(specs, None)
    # A version names one consent set: equal sets share cached decisions across examples.
    versions = {p: repr([s for s in specs if s["patient"]["reference"] == p]) for p in consents}
    ctx, policy = data.draw(contexts, label="context"), data.draw(policies, label="policy")
    whole = orjson.loads(raw)
    answer = read_answer(raw)
    assert answer is not None
    found = filtered(answer.body, answer.label_keys, consents, ctx, policy, versions)
    assert found == filtered(whole, None, consents, ctx, policy)
    event(f"entries removed: {min(len(found[1]), 2)}, left: {min(len(whole.get('entry', [])), 2)}")
    # What goes out is the whole answer filtered the same way.
    assert orjson.loads(answer.splice()) == whole


# ---------------------------------------------------------------------- 2. reads within the plan


class Tracked(dict[str, Any]):
    """A resource that records every top-level key asked of it."""

    asked: set[str]

    def __init__(self, items: Mapping[str, Any]) -> None:
        super().__init__(items)
        self.asked = set()

    def get(self, key: str, default: Any = None) -> Any:
        self.asked.add(key)
        return super().get(key, default)

    def __getitem__(self, key: str) -> Any:
        self.asked.add(key)
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        self.asked.add(str(key))
        return super().__contains__(key)

    def _all(self) -> None:
        self.asked.update(super().keys())

    def keys(self) -> Any:
        self._all()
        return super().keys()

    def items(self) -> Any:
        self._all()
        return super().items()

    def values(self) -> Any:
        self._all()
        return super().values()

    def __iter__(self) -> Iterator[str]:
        self._all()
        return super().__iter__()


def read_by_decision(
    resource: JSON, consents: Mapping[str, Sequence[CompiledConsent]], ctx: RequestContext, policy: Policy
) -> set[str]:
    """The top-level keys the whole pipeline asks of ``resource``: the facts, the decision, and
    the gateway's enforcement of a search set holding it (the references it resolves, its
    owners, the judge with its label and decision memos, the enforcer). The walk for extensions
    off the plans (``LabelIndex.stray_labels``, for a text that holds one) reads every element
    and is left out: a view holds each element whose text holds an extension
    (``test_a_view_holds_the_elements_whose_extensions_label``)."""
    tracked = Tracked(resource)
    facts(tracked, strays=False)
    labels = LABELS.planned_labels(tracked)
    decisions(consents, tracked, labels, ctx, policy)
    body: JSON = {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": tracked}]}
    deciding_references(tracked)  # the resource itself: entries are walked only when exactly dicts
    looked = Looked(ctx, {p: tuple(c) for p, c in consents.items()})
    judge = ConsentEnforcement(None, LABELS, policy).judge(looked, RESOLVED, strays=False)  # type: ignore[arg-type]
    binaries: list[JSON] = []
    index = owners_index(body, binaries)
    bind_contexts(binaries, index, RESOLVED)
    Enforcer(binaries_as_contexts(judge, RESOLVED), drop_total=True, index=index).body(body)
    return tracked.asked


def check_reads_planned(
    resource: JSON, consents: Mapping[str, Sequence[CompiledConsent]], ctx: RequestContext, policy: Policy
) -> None:
    """Fails when decision code asks for an element the type's view does not hold."""
    rtype = str(resource["resourceType"])
    unplanned = read_by_decision(resource, consents, ctx, policy) - view_module.view_elements(rtype)
    assert not unplanned, f"{rtype}: decision code reads {sorted(unplanned)}, which its view does not hold"


@pytest.mark.parametrize("rtype", ALL_TYPES)
@_fast(3)
@given(data=st.data())
def test_decision_code_reads_only_what_the_view_holds(rtype: str, data: st.DataObject) -> None:
    whole = data.draw(resources(rtype), label="resource")
    consents = by_patient(data.draw(st.lists(consent_specs, max_size=3), label="consents"), None)
    check_reads_planned(whole, consents, data.draw(contexts), data.draw(policies))


def test_a_view_holds_the_elements_whose_extensions_label() -> None:
    """In an answer whose text holds an extension, a view also holds each element off the plan
    whose text does (and its label key names it), so its stray labels are the whole resource's;
    in an answer without one, views hold the plan only."""
    f11 = {"url": "u", "valueCodeableConcept": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "F11.20"}]}}
    noted = {**OBSERVATION, "id": "o2", "note": [{"text": "x", "extension": [f11]}], "valueString": "plain"}
    plain = {**OBSERVATION, "id": "o3", "note": [{"text": "x"}]}
    answer = read_answer(orjson.dumps({"resourceType": "Bundle", "type": "searchset",
                                       "entry": [{"resource": noted}, {"resource": plain}]}))
    assert answer is not None and answer.extended
    viewed, unviewed = (e["resource"] for e in answer.body["entry"])
    assert "note" in viewed and "valueString" not in viewed and "note" not in unviewed
    assert LABELS.stray_labels(viewed) == LABELS.stray_labels(noted) != frozenset()
    assert any(part == "note" for part in answer.label_keys[id(viewed)])
    quiet = read_answer(orjson.dumps({"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": plain}]}))
    assert quiet is not None and not quiet.extended and "note" not in quiet.body["entry"][0]["resource"]


OBSERVATION: JSON = {
    "resourceType": "Observation", "id": "o1",
    "meta": {"profile": ["http://hl7.org/fhir/us/core/StructureDefinition/us-core-observation-lab"]},
    "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "laboratory"}]}],
    "code": {"coding": [{"system": "http://loinc.org", "code": "2345-7"}]},
    "subject": {"reference": "Patient/p1"}, "effectiveDateTime": "2024-03-01",
    "performer": [{"reference": "Practitioner/pr1"}],
}
PROCEDURE: JSON = {
    "resourceType": "Procedure", "id": "pr1", "subject": {"reference": "Patient/p1"},
    "performer": [{"actor": {"reference": "Patient/p2"}}], "performedDateTime": "2024-02-01",
}
DATED_CONSENT: JSON = {"provision": {"type": "deny", "dataPeriod": {"start": "2024-01-01"}}, "patient": {"reference": "Patient/p1"}}


@pytest.mark.parametrize(("resource", "dropped"), [
    (OBSERVATION, "code"),               # labels_for, main_codes
    (OBSERVATION, "category"),           # scopes_for
    (OBSERVATION, "subject"),            # patients_of
    (OBSERVATION, "effectiveDateTime"),  # clinical_date, a dataPeriod condition
    (OBSERVATION, "meta"),               # profiles_of, meta.security
    (OBSERVATION, "performer"),          # authors_of
    (PROCEDURE, "performer"),            # patients_of through performer.actor
])
def test_the_read_check_catches_an_element_missing_from_the_plan(
    monkeypatch: pytest.MonkeyPatch, resource: JSON, dropped: str
) -> None:
    consents = by_patient([DATED_CONSENT], None)
    ctx = RequestContext(Actor("Practitioner/pr1"), "TREAT", NOW)
    check_reads_planned(resource, consents, ctx, Policy())  # the real plan holds every read
    planned = view_module.view_elements
    monkeypatch.setattr(view_module, "view_elements", lambda rtype: planned(rtype) - {dropped})
    with pytest.raises(AssertionError, match=dropped):
        check_reads_planned(resource, consents, ctx, Policy())


# ---------------------------------------------------------------------- 3. splicing


def entry_texts(raw: bytes) -> list[bytes]:
    """The text of each entry of a Bundle, exactly as written."""
    fields = msgspec.json.decode(raw, type=dict[str, msgspec.Raw])
    entries = fields.get("entry")
    return [bytes(e) for e in msgspec.json.decode(entries, type=list[msgspec.Raw])] if entries is not None else []


def entry_type(text: bytes) -> object:
    return orjson.loads(text).get("resource", {}).get("resourceType")


def spliced(raw: bytes, reader: str) -> AnswerView | None:
    """The answer as the proxy reads it to splice: as views (large answers), or parsed whole
    with each entry's bytes beside it (not for a Bundle without entries: nothing to splice)."""
    if reader == "views":
        return read_answer(raw)
    parsed = orjson.loads(raw)
    return spans_of(raw, parsed) if "entry" in parsed else None


@pytest.mark.parametrize("reader", ["views", "whole"])
@_fast(40)
@given(raw=searchset_texts(), data=st.data())
def test_a_spliced_search_set_is_the_original_minus_the_removed_entries(
    reader: str, raw: bytes, data: st.DataObject
) -> None:
    answer = spliced(raw, reader)
    original = orjson.loads(raw)
    if answer is None:
        assert reader == "whole" and "entry" not in original
        return
    texts = entry_texts(raw)
    for viewed, whole in zip(answer.body.get("entry", []), original.get("entry", []), strict=True):
        assert facts(viewed["resource"]) == facts(whole["resource"])
    unfiltered = answer.splice()  # splicing consumes the view: read the answer afresh below
    assert orjson.loads(unfiltered) == original
    if not any(entry_type(t) in WHOLE_TYPES for t in texts):
        assert unfiltered == raw  # nothing removed, nothing read whole: byte for byte

    answer = spliced(raw, reader)
    assert answer is not None
    removed = data.draw(st.sets(st.integers(0, len(texts) - 1)) if texts else st.just(set()), label="removed")
    answer.body["entry"] = [e for i, e in enumerate(answer.body.get("entry", [])) if i not in removed]
    out = answer.splice()
    expected = dict(original)
    if "entry" in original:
        expected["entry"] = [e for i, e in enumerate(original["entry"]) if i not in removed]
    else:
        expected["entry"] = []
    assert orjson.loads(out) == expected
    kept = [t for i, t in enumerate(texts) if i not in removed]
    for before, after in zip(kept, entry_texts(out), strict=True):
        if entry_type(before) in WHOLE_TYPES:
            assert orjson.loads(after) == orjson.loads(before)  # read whole: re-serialized
        else:
            assert after == before  # the upstream's bytes, decimals as written


@pytest.mark.parametrize("reader", ["views", "whole"])
@_fast(25)
@given(resource=st.sampled_from(ALL_TYPES).flatmap(resources))
def test_an_unchanged_single_resource_goes_out_as_written(reader: str, resource: JSON) -> None:
    raw = with_decimals(orjson.dumps(resource))
    answer = read_answer(raw) if reader == "views" else spans_of(raw, orjson.loads(raw))
    if resource["resourceType"] in ("Composition", "Binary"):
        assert answer is None  # rewritten or decided as what it stands for: the whole path
        return
    assert answer is not None and answer.splice() == raw


def test_a_kept_entry_keeps_its_decimals_as_written() -> None:
    kept = (b'{"fullUrl":"http://x/Observation/a","resource":{"resourceType":"Observation","id":"a",'
            b'"subject":{"reference":"Patient/p1"},"valueQuantity":{"value":4.10,"unit":"mmol/L"}},'
            b'"search":{"mode":"match","score":1.000}}')
    dropped = b'{"resource":{"resourceType":"Observation","id":"b","subject":{"reference":"Patient/p2"}}}'
    raw = b'{"resourceType":"Bundle","type":"searchset","total":2,"entry":[' + dropped + b"," + kept + b"]}"
    answer = read_answer(raw)
    assert answer is not None
    del answer.body["entry"][0]
    out = answer.splice()
    assert out == b'{"resourceType":"Bundle","type":"searchset","total":2,"entry":[' + kept + b"]}"
    assert b'"value":4.10' in out and b'"score":1.000' in out


def test_whitespace_inside_an_element_is_kept_and_decides_the_same() -> None:
    """Only the levels a view locates must be compact; inside an element the text is parsed
    (when it decides) or kept as written."""
    resource = (b'{"resourceType":"Condition","id":"c","subject":{"reference" : "Patient/p1"},'
                b'"code":{ "coding":[{"system":"http://hl7.org/fhir/sid/icd-10-cm","code":"B20"}]},'
                b'"note":[ {"text":"  spaced  "} ]}')
    raw = b'{"resourceType":"Bundle","type":"searchset","entry":[{"resource":' + resource + b"}]}"
    answer = read_answer(raw)
    assert answer is not None
    viewed = answer.body["entry"][0]["resource"]
    assert facts(viewed) == facts(orjson.loads(resource))
    assert {label.code for label in LABELS.labels_for(viewed)} >= {"HIV"}
    assert answer.splice() == raw


OBS = (b'{"resourceType":"Observation","id":"o1","status":"final",'
       b'"code":{"coding":[{"system":"http://loinc.org","code":"2345-7"}]},'
       b'"subject":{"reference":"Patient/p1"},"valueQuantity":{"value":4.10}}')


def searchset(*entries: bytes, head: bytes = b'"resourceType":"Bundle","type":"searchset"') -> bytes:
    return b"{" + head + b',"entry":[' + b",".join(entries) + b"]}"


def entry(resource: bytes, tail: bytes = b"") -> bytes:
    return b'{"fullUrl":"http://x/Observation/o1","resource":' + resource + tail + b"}"


NOT_VIEWED: dict[str, bytes] = {
    # whitespace at each level a view locates without parsing
    "bundle-indented": orjson.dumps(orjson.loads(searchset(entry(OBS))), option=orjson.OPT_INDENT_2),
    "bundle-space-after-colon": searchset(entry(OBS), head=b'"resourceType":"Bundle","type": "searchset"'),
    "bundle-space-before-entries": searchset(entry(OBS)).replace(b'"entry":[', b'"entry": ['),
    "between-entries": searchset(entry(OBS), entry(OBS)).replace(b"}},{", b"}}, {"),
    "entry-level": searchset(entry(OBS).replace(b'{"fullUrl"', b'{ "fullUrl"')),
    "resource-level": searchset(entry(OBS.replace(b'"subject":', b'"subject" :'))),
    "single-resource-level": OBS.replace(b'"status":"final",', b'"status":"final",\n'),
    "trailing-newline-in-resource": searchset(entry(OBS[:-1] + b"\n}")),
    # a key spelled with an escape where the view locates elements (it may hide a repeat)
    "escaped-resource-key": searchset(entry(OBS.replace(b'"subject":', b'"\\u0073ubject":'))),
    "escaped-entry-key": searchset(entry(OBS).replace(b'"resource":', b'"r\\u0065source":')),
    # a key given twice
    "duplicate-bundle-key": searchset(entry(OBS), head=b'"resourceType":"Bundle","type":"searchset","type":"searchset"'),
    "duplicate-entry-key": searchset(entry(OBS, tail=b',"fullUrl":"http://x/Observation/o2"')),
    "duplicate-resource-key": searchset(entry(OBS[:-1] + b',"subject":{"reference":"Patient/p2"}}')),
    "duplicate-single-resource-key": OBS[:-1] + b',"subject":{"reference":"Patient/p2"}}',
    "duplicate-in-a-reference": searchset(entry(OBS.replace(
        b'{"reference":"Patient/p1"}', b'{"reference":"Patient/p1","reference":"Patient/p2"}'))),
    "duplicate-in-a-coding": searchset(entry(OBS.replace(b'"code":"2345-7"', b'"code":"2345-7","code":"B20"'))),
    "duplicate-in-meta-security": searchset(entry(OBS[:-1] + b',"meta":{"security":[{"code":"N","code":"R"}]}}')),
    "duplicate-in-contained": searchset(entry(OBS[:-1] + b',"contained":[{"resourceType":"Medication","id":"m","id":"n"}]}')),
    "duplicate-in-entry-search": searchset(entry(OBS, tail=b',"search":{"mode":"match","mode":"include"}')),
    # answers the whole-resource path handles
    "collection": searchset(entry(OBS), head=b'"resourceType":"Bundle","type":"collection"'),
    "batch-response": searchset(entry(OBS), head=b'"resourceType":"Bundle","type":"batch-response"'),
    "history": searchset(entry(OBS), head=b'"resourceType":"Bundle","type":"history"'),
    "document": searchset(entry(OBS), head=b'"resourceType":"Bundle","type":"document"'),
    "no-type": searchset(entry(OBS), head=b'"resourceType":"Bundle"'),
    "included-entry": searchset(entry(OBS), entry(OBS, tail=b',"search":{"mode":"include"}')),
    "operation-outcome": b'{"resourceType":"OperationOutcome","issue":[]}',
    "parameters": b'{"resourceType":"Parameters","parameter":[]}',
    "not-an-object": b"[" + OBS + b"]",
}


@pytest.mark.parametrize("raw", NOT_VIEWED.values(), ids=NOT_VIEWED.keys())
def test_texts_a_view_cannot_vouch_for_take_the_whole_resource_path(raw: bytes) -> None:
    assert read_answer(raw) is None


# ---------------------------------------------------------------------- mismatches found and closed


@pytest.mark.parametrize("single", [True, False], ids=["read", "search"])
def test_a_repeated_key_inside_an_unread_element_is_not_viewed(single: bool) -> None:
    resource = OBS.replace(b'"valueQuantity":{"value":4.10}', b'"valueQuantity":{"value":4.10,"value":9.99}')
    assert read_answer(resource if single else searchset(entry(resource))) is None


ESCAPED_META = {
    "security": b'"meta":{"\\u0073ecurity":[{"system":"http://terminology.hl7.org/CodeSystem/v3-Confidentiality","code":"R"}]},',
    "profile": b'"meta":{"\\u0070rofile":["http://hl7.org/fhir/us/core/StructureDefinition/us-core-observation-lab"]},',
}
PROFILE_DENIED: JSON = {"patient": {"reference": "Patient/p1"}, "provision": {"type": "permit", "provision": [
    {"type": "deny", "class": [{"system": "http://hl7.org/fhir/StructureDefinition",
                                "code": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-observation-lab"}]}]}}


@pytest.mark.parametrize("spelled", sorted(ESCAPED_META))
def test_a_meta_key_spelled_with_an_escape_decides_as_written_plainly(spelled: str) -> None:
    plain = (b'{"resourceType":"Observation","id":"a","code":{"coding":[{"system":"http://loinc.org","code":"2345-7"}]},'
             b'"subject":{"reference":"Patient/p1"}}')
    escaped = plain.replace(b'"id":"a",', b'"id":"b",' + ESCAPED_META[spelled])
    index = copy.copy(LABELS)
    index._memo = TextMemo(LABELS._memo.max_entries, LABELS._memo.max_bytes)  # a memo of its own
    answer = read_answer(searchset(entry(plain), entry(escaped)))
    assert answer is not None
    consents = by_patient([PROFILE_DENIED], None)
    ctx = RequestContext(Actor("Practitioner/pr1"), "TREAT", NOW)
    policy = Policy(sensitive=LABELS.sensitive)
    for viewed, text in zip((e["resource"] for e in answer.body["entry"]), (plain, escaped), strict=True):
        whole = orjson.loads(text)
        key = answer.label_keys.get(id(viewed))
        labels = index.labels_keyed(key, viewed) if key is not None else index.labels_for(viewed)
        assert labels == index.labels_for(whole)
        assert facts(viewed) == facts(whole)
        assert decisions(consents, viewed, labels, ctx, policy) == decisions(consents, whole, labels, ctx, policy)


def lab(rid: bytes, extra: bytes = b"") -> bytes:
    return (b'{"resourceType":"Observation","id":"' + rid + b'",' + extra + b'"status":"final",'
            b'"code":{"coding":[{"system":"http://loinc.org","code":"2345-7"}]},'
            b'"subject":{"reference":"Patient/pat-ana-5581"}}')


async def search_answering(
    fake_fhir: FakeFhir, make_gateway: Callable[..., Awaitable[GatewayUnderTest]], body: bytes, views: bool
) -> Any:
    """Ana's Observation search through a gateway on views (or parsing whole), the FHIR server
    answering ``body``; Ana opts in in general (a restricted record needs a consent naming R)."""
    fake_fhir.add(clinical.opt_in(clinical.PAT_ANA))

    async def answer(request: web.Request) -> web.StreamResponse | None:
        if request.path.endswith("/Observation"):
            return web.Response(body=body, content_type="application/fhir+json")
        return None

    fake_fhir.override = answer
    gateway = await make_gateway(fake_fhir.base_url, upstream={"views_above_bytes": 0 if views else 1 << 30})
    return await gateway.get(f"/Observation?patient={clinical.PAT_ANA}")


@pytest.mark.parametrize("views", [
    pytest.param(False, id="whole"),
    pytest.param(True, id="views"),
])
async def test_a_restricted_record_stays_withheld_however_its_meta_is_spelled(
    fake_fhir: FakeFhir, make_gateway: Callable[..., Awaitable[GatewayUnderTest]], views: bool
) -> None:
    body = searchset(entry(lab(b"lab-plain")), entry(lab(b"lab-restricted", ESCAPED_META["security"])))
    response = await search_answering(fake_fhir, make_gateway, body, views)
    assert response.status == 200
    returned = [e["resource"]["id"] for e in (await response.json(content_type=None)).get("entry", [])
                if e.get("resource", {}).get("resourceType") == "Observation"]
    assert returned == ["lab-plain"]


# Texts the whole-resource path refuses (502) for a fault inside an element no decision reads.
REFUSED_INSIDE_UNREAD: dict[str, tuple[bytes, str]] = {
    "repeated-key": (b'"valueQuantity":{"value":4.10,"value":41.0}',
                     "CONTRACT: duplicate JSON keys in patient data are a 502"),
    "infinite-number": (b'"valueQuantity":{"value":1e400}', "a number no double holds is a malformed answer (502)"),
    "invalid-utf-8": (b'"note":[{"text":"\xff"}]', "a text that is not UTF-8 is a malformed answer (502)"),
}


@pytest.mark.parametrize(("fault", "views"), [
    pytest.param(fault, views, id=f"{fault}-{'views' if views else 'whole'}")
    for fault in REFUSED_INSIDE_UNREAD for views in (False, True)
])
async def test_a_fault_inside_an_unread_element_is_a_502_on_both_paths(
    fake_fhir: FakeFhir, make_gateway: Callable[..., Awaitable[GatewayUnderTest]], fault: str, views: bool
) -> None:
    body = searchset(entry(lab(b"lab-faulty")[:-1] + b"," + REFUSED_INSIDE_UNREAD[fault][0] + b"}"))
    response = await search_answering(fake_fhir, make_gateway, body, views)
    assert response.status == 502
    assert b"lab-faulty" not in await response.read()
