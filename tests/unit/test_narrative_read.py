"""``references.scrub_narrative_read`` (the narrative rule settled from an entry's text) decides
exactly as the walk it spares (``references.scrub_narrative``), on generated resources."""

from __future__ import annotations

import copy
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.enforce import owners_index
from gateway.core.references import scrub_narrative, scrub_narrative_read
from gateway.core.view import scrub_narratives, spans_of

BASE = "http://fhir.example/fhir"
OURS = frozenset({BASE})
TARGETS = ["Patient/p1", "Patient/p2", "Encounter/e1", "Encounter/e2", "Observation/o1", "Observation/o2",
           "Practitioner/d1", "Condition/c9", f"{BASE}/Observation/o2", f"{BASE}/Patient/p1",
           "http://other.example/fhir/Observation/o1", "#m1"]
RELEASED = [frozenset(), frozenset({"Observation/o1"}), frozenset({"Observation/o1", "Observation/o2", "Encounter/e1"}),
            frozenset({"Condition/c9", "Encounter/e2", "Patient/p2"})]


def _ref(target: str, display: bool) -> dict[str, Any]:
    return {"reference": target, **({"display": target} if display else {})}


@st.composite
def resources(draw: st.DrawFn) -> dict[str, Any]:
    rtype = draw(st.sampled_from(["Observation", "DiagnosticReport", "Provenance", "Task", "Condition"]))
    resource: dict[str, Any] = {"resourceType": rtype, "id": "r1",
                                "text": {"status": "generated", "div": "<div>x</div>"}}
    refs = st.builds(_ref, st.sampled_from(TARGETS), st.booleans())
    if draw(st.booleans()):
        resource["subject"] = draw(refs)
    if draw(st.booleans()):
        resource["encounter"] = draw(refs)
    for key in ("hasMember", "result", "target", "basedOn"):
        if draw(st.booleans()):
            resource[key] = draw(st.lists(refs, max_size=3))
    if draw(st.booleans()):
        resource["focus"] = {"reference": draw(st.sampled_from(TARGETS))}
    if draw(st.booleans()):
        resource["note"] = [{"text": draw(st.sampled_from(TARGETS))}]  # a reference's text elsewhere
    if draw(st.booleans()):
        resource["contained"] = [{"resourceType": "Observation", "id": "m1", "encounter": draw(refs),
                                  "subject": draw(refs)}]
    return resource


@settings(max_examples=600, derandomize=True, database=None, deadline=None)
@given(resources(), st.sampled_from(RELEASED), st.booleans())
def test_the_read_decides_as_the_walk(resource: dict[str, Any], released: frozenset[str], pretty: bool) -> None:
    walked, read = copy.deepcopy(resource), copy.deepcopy(resource)
    text = orjson.dumps(read, option=orjson.OPT_INDENT_2 if pretty else 0)
    assert scrub_narrative_read(read, text, released, OURS) == scrub_narrative(walked, released, OURS)
    assert read == walked


@settings(max_examples=300, derandomize=True, database=None, deadline=None)
@given(st.lists(resources(), min_size=1, max_size=4), st.sampled_from(RELEASED))
def test_an_answer_read_with_enforcements_patients_decides_as_the_walk(
    found: list[dict[str, Any]], released: frozenset[str]
) -> None:
    """The live path hands each entry's patients from enforcement's owners index
    (``enforce.owners_index``) instead of reading them again: the outcome is the walk's."""
    bundle = {"resourceType": "Bundle", "type": "searchset",
              "entry": [{"fullUrl": f"{BASE}/{r['resourceType']}/r{i}", "resource": {**r, "id": f"r{i}"}}
                        for i, r in enumerate(found)]}
    raw = orjson.dumps(bundle)
    walked = orjson.loads(raw)
    answer = spans_of(raw, orjson.loads(raw))
    index = owners_index(answer.body, ours=OURS)
    changed = scrub_narratives(answer, released, OURS, index)
    expected = [scrub_narrative(e["resource"], released, OURS) for e in walked["entry"]]
    assert changed == any(expected)
    assert answer.body == walked
