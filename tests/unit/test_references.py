"""The pure pieces of "one door": strict JSON reading and the references that decide."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from gateway.core import strict_json
from gateway.core.references import (
    UNREADABLE, Resolved, attachment_holders, attachments_by_binary, deciding_references, iter_resources, may_name_unreleased, medication_reference,
    scrub_displays,
    security_context, unreadable_context,
)
from tests.fixtures import clinical as c


@pytest.mark.parametrize("raw", [
    b'{"subject":{"reference":"Patient/a"},"subject":{"reference":"Patient/b"}}',
    b'{"a": {"x": 1, "x" : 2}}',                       # space before the colon: exact parser
    b'{"entry":[{"resource":{"id":"1","id":"2"}}]}',
    b'{"note":"say \\u0022:","note":"x"}',              # an escaped quote the count cannot see
    b'{"note":"say \\":","note":"x"}',
])
def test_repeated_keys_are_found(raw: bytes) -> None:
    assert strict_json.has_duplicate_keys(raw, orjson.loads(raw))
    with pytest.raises(ValueError):
        strict_json.loads(raw)


@pytest.mark.parametrize("raw", [
    b'{"a":1,"b":{"a":2}}',                               # the same key in two objects
    b'[{"a":1},{"a":2}]',
    b'{"div":"<div xmlns=\\"http://www.w3.org/1999/xhtml\\">a: b</div>","x":1}',
    b'{\n  "a": 1,\n  "b": "c:d"\n}',
    b'{"note":"say \\":"}',
])
def test_distinct_keys_pass(raw: bytes) -> None:
    assert not strict_json.has_duplicate_keys(raw, orjson.loads(raw))


def test_a_byte_order_mark_is_read_past() -> None:
    assert strict_json.loads(strict_json.BOM + b'{"resourceType":"Consent"}') == {"resourceType": "Consent"}


BINARY: dict[str, Any] = {
    "resourceType": "Binary", "id": "bin-1", "contentType": "text/plain", "data": "SElW",
    "securityContext": {"reference": "DocumentReference/doc-1"},
}
MED = {"resourceType": "Medication", "id": "med-1",
       "code": c.concept(c.RXNORM, "1010600", c.BUPRENORPHINE_DISPLAY)}
ORDER = {"resourceType": "MedicationRequest", "id": "rx-1", "subject": {"reference": c.PAT_ANA},
         "medicationReference": {"reference": "Medication/med-1"}}


def test_security_context_only_names_patient_data() -> None:
    assert security_context(BINARY) == "DocumentReference/doc-1"
    assert security_context({**BINARY, "securityContext": {"reference": "Organization/o1"}}) is None
    assert security_context({**BINARY, "resourceType": "Basic"}) is None


def test_targets_missing_from_the_answer_are_listed() -> None:
    bare = {"resourceType": "Binary", "id": "bin-2", "contentType": "application/pdf"}
    bundle = {"resourceType": "Bundle", "type": "searchset",
              "entry": [{"resource": BINARY}, {"resource": ORDER}, {"resource": bare}]}
    found = deciding_references(bundle)
    assert found is not None
    assert set(found.present) == {"Binary/bin-1", "MedicationRequest/rx-1", "Binary/bin-2"}
    assert found.contexts == {"DocumentReference/doc-1"} and found.medications == {"Medication/med-1"}
    assert found.unattached == {"Binary/bin-2"}
    with_med = deciding_references({"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": ORDER}, {"resource": MED}]})
    assert with_med is not None and not with_med.medications and not with_med.contexts
    # A Bundle that is not a search (a stored collection, a history) holds copies: read them.
    copies = deciding_references({"resourceType": "Bundle", "type": "collection", "entry": [{"resource": ORDER}, {"resource": MED}]})
    assert copies is not None and copies.medications == {"Medication/med-1"} and not copies.present
    assert deciding_references({"resourceType": "Bundle", "entry": [{"resource": c.ANA_CBC}]}) is None


def test_a_binary_is_decided_as_its_context_or_the_documents_attaching_it() -> None:
    doc = {"resourceType": "DocumentReference", "id": "doc-1", "content": [{"attachment": {"url": "Binary/bin-2"}}]}
    bare = {"resourceType": "Binary", "id": "bin-2"}
    assert Resolved({"DocumentReference/doc-1": doc}).contexts_of(BINARY) == (doc,)
    assert Resolved().contexts_of(BINARY) is None                      # unread: it closes
    # missing on the server (deleted): unknown, it closes; never released as no one's data
    assert Resolved({"DocumentReference/doc-1": None}).contexts_of(BINARY) is None
    assert Resolved(attached={"Binary/bin-2": (doc,)}).contexts_of(bare) == (doc,)
    assert Resolved(attached={"Binary/bin-2": None}).contexts_of(bare) is None
    assert attachments_by_binary([doc], frozenset({"Binary/bin-2", "Binary/bin-3"})) == {
        "Binary/bin-2": (doc,), "Binary/bin-3": ()}


def test_a_contained_medication_is_found_and_an_unread_one_is_unreadable() -> None:
    contained = {**ORDER, "contained": [{**MED, "id": "m"}], "medicationReference": {"reference": "#m"}}
    assert medication_reference(contained) == "#m"
    assert Resolved().medication_of(contained) == {**MED, "id": "m"}
    assert Resolved().medication_of(ORDER) is UNREADABLE
    assert Resolved({"Medication/med-1": None}).medication_of(ORDER) is None


def test_displays_of_unreleased_patient_data_are_removed() -> None:
    report = {
        "resourceType": "DiagnosticReport", "id": "dr-1", "subject": {"reference": c.PAT_ANA, "display": "Ana"},
        "performer": [{"reference": c.DOCTOR, "display": "Dr Gomez"}],
        "result": [{"reference": "Observation/hiv-vl", "display": "HIV-1 viral load 12000 copies/mL"},
                   {"reference": "Observation/cbc", "display": "CBC"}],
    }
    bundle = {"resourceType": "Bundle", "entry": [
        {"resource": report}, {"resource": {"resourceType": "Observation", "id": "cbc"}},
    ]}
    released = frozenset(r for r in (f"{x['resourceType']}/{x['id']}" for x in iter_resources(bundle)))
    assert scrub_displays(bundle, released)
    assert report["result"] == [{"reference": "Observation/hiv-vl"}, {"reference": "Observation/cbc", "display": "CBC"}]
    assert report["performer"][0]["display"] == "Dr Gomez"      # not patient data
    assert "display" not in report["subject"]                      # the Patient is not in the answer
    assert not scrub_displays(bundle, released)                    # nothing left to remove


@pytest.mark.parametrize("raw, expected", [
    (b'{"subject":{"reference":"Patient/a","display":"Ana"}}', True),
    (b'{"result":[{"reference":"Observation\\/hiv","display":"HIV-1 viral load"}]}', True),
    (b'{"result":[{"refer\\u0065nce":"Observation/hiv","display":"HIV-1 viral load"}]}', True),
    (b'{"result":[{"reference" : "Observation/hiv", "display":"x"}]}', True),
    (b'{"performer":[{"reference":"Practitioner/p","display":"Dr"}],"code":{"text":"x"}}', False),
    (b'{"subject":{"reference":"Patient/a"}}', False),
    (b'{"result":[{"reference":"Observation/cbc","display":"CBC"}]}', False),
])
def test_the_byte_check_never_misses_a_display_to_remove(raw: bytes, expected: bool) -> None:
    released = frozenset({"Observation/cbc"})
    assert may_name_unreleased(raw, released) is expected
    if not expected:
        parsed = {"resourceType": "Basic", **orjson.loads(raw)}
        assert not scrub_displays(parsed, released) or b'"display"' not in raw


@pytest.mark.parametrize("raw, expected", [
    (b'{"subject":{"reference":"Patient/a"},"code":{"coding":[{"code":"x","display":"y"}]}}', False),
    (b'{"result":[{"reference":"Observation/hiv","type":"Observation","display":"HIV"}]}', True),
    (b'{"result":[{"display":"HIV","reference":"Observation/hiv"}]}', True),
    (b'{"result":[{"reference":"Observation/hiv","identifier":{"value":"1"},"display":"HIV"}]}', True),
    (b'{"result":[{"identifier":{"value":"1"},"reference":"Observation/hiv","display":"HIV"}]}', True),
    (b'{"result":[{"reference":"Observation/hiv","extension":[{"url":"u","valueString":"}"}],"display":"x"}]}', True),
    (b'{"result":[{"reference":"Observation/hiv","note":"{ \\"a\\": 1 }","display":"x"}]}', True),
])
def test_the_reference_object_is_read_exactly_or_the_walk_runs(raw: bytes, expected: bool) -> None:
    assert may_name_unreleased(raw, frozenset()) is expected


@pytest.mark.parametrize("context, unreadable", [
    ({"reference": "Condition/c1"}, False),                      # patient data: decided as it
    ({"reference": "http://fhir.example/fhir/Condition/c1"}, False),  # under this server's base
    ({"reference": "http://elsewhere.example/fhir/Condition/c1"}, True),  # another server's record
    ({"reference": "Organization/o1"}, False),                   # not patient data: decided as itself
    ({"reference": "Binary/b2"}, True),                          # what that one stands for is not followed
    ({"reference": "#c1"}, True),                                # a Binary contains nothing
    ({"reference": "Condition?code=B20"}, True),                 # conditional: anyone's record
    ({"reference": "Conditoin/c1"}, True),                       # no R4 type
    ({"reference": "Condition/"}, True),
    ({"display": "HIV care plan"}, True),                        # no reference
    (None, True),
])
def test_a_security_context_the_gateway_cannot_decide_by_closes_the_binary(context: object, unreadable: bool) -> None:
    binary = {"resourceType": "Binary", "id": "b1", "contentType": "text/plain", "securityContext": context}
    ours = frozenset({"http://fhir.example/fhir"})
    assert unreadable_context(binary, ours) is unreadable
    if unreadable:
        resolved = Resolved({"Condition/c1": {"resourceType": "Condition", "id": "c1"}}, ours=ours)
        assert resolved.contexts_of(binary) is None


def test_a_listing_loses_the_narratives_that_may_name_unreleased_entries() -> None:
    """A Composition's sections (nested too) and a List: the narrative of what lists patient data
    the answer does not release goes, with the narratives around it; entries stay; a narrative
    over released data or data that is no one's stays; an entry naming nothing readable closes."""
    said = {"status": "generated", "div": "<div>HIV disease</div>"}
    summary = {"resourceType": "Composition", "id": "s", "text": dict(said), "section": [
        {"title": "Problems", "text": dict(said), "section": [
            {"title": "Active", "text": dict(said), "entry": [{"reference": "Condition/hiv"}]}]},
        {"title": "Labs", "text": dict(said), "entry": [{"reference": "Observation/cbc"}]},
        {"title": "Team", "text": dict(said), "entry": [{"reference": c.DOCTOR}, {"reference": "#c1"}]},
    ]}
    released = frozenset({"Observation/cbc"})
    assert scrub_displays(summary, released)
    problems, labs, team = summary["section"]
    assert "text" not in summary and "text" not in problems and "text" not in problems["section"][0]
    assert problems["section"][0]["entry"] == [{"reference": "Condition/hiv"}]
    assert labs["text"] == said and team["text"] == said
    assert not scrub_displays(summary, released)
    listed = {"resourceType": "List", "id": "l", "text": dict(said), "entry": [{"item": {"reference": "Observation/cbc"}}]}
    assert not scrub_displays(listed, released) and listed["text"] == said
    listed["entry"].append({"item": {"display": "HIV disease"}})
    assert scrub_displays(listed, released) and "text" not in listed


def test_the_holders_of_a_binary_in_the_same_answer_are_found_wherever_its_url_is() -> None:
    """A report's presentedForm, a contained Media's content (its container holds it), an
    absolute URL under our base; another server's URL and a Binary not asked for hold nothing."""
    ours = frozenset({"http://fhir.example/fhir"})
    report = {"resourceType": "DiagnosticReport", "id": "r1", "presentedForm": [{"url": "Binary/b1"}]}
    container = {"resourceType": "Observation", "id": "o1", "contained": [
        {"resourceType": "Media", "id": "m", "content": {"url": "http://fhir.example/fhir/Binary/b2"}}]}
    foreign = {"resourceType": "DiagnosticReport", "id": "r2", "presentedForm": [{"url": "http://other.example/fhir/Binary/b1"}]}
    unasked = {"resourceType": "DiagnosticReport", "id": "r3", "presentedForm": [{"url": "Binary/b9"}]}
    binary = {"resourceType": "Binary", "id": "b1", "contentType": "text/plain"}
    body = {"resourceType": "Bundle", "type": "searchset",
            "entry": [{"resource": r} for r in (report, container, foreign, unasked, binary)]}
    found = attachment_holders(body, frozenset({"Binary/b1", "Binary/b2"}), ours)
    assert {b: [h["id"] for h in holders] for b, holders in found.items()} == {"Binary/b1": ["r1"], "Binary/b2": ["o1"]}
