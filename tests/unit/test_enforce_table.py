"""The enforcer as a table: a body in, the indices of the entries kept out; and the bytes
spliced from those indices are exactly the upstream's bytes of those entries."""

from __future__ import annotations

from typing import Any

import msgspec
import orjson
import pytest

from gateway.core.enforce import Enforcer, apply
from gateway.core.model import Decision, Reason, Verdict
from gateway.core.view import WHOLE_TYPES, read_answer, spans_of

JSON = dict[str, Any]
HIDDEN = "B20"  # the code this table's judge withholds


def judge(resource: JSON, owners: frozenset[str]) -> Decision:
    code = resource.get("code", {}).get("coding", [{}])[0].get("code") if isinstance(resource.get("code"), dict) else None
    if code == HIDDEN:
        return Decision(Verdict.DENY, (Reason("c1", "", "deny"),))
    return Decision(Verdict.PERMIT, (Reason("c1", "", "permit"),))


def cond(rid: str, code: str, **more: Any) -> JSON:
    return {"resourceType": "Condition", "id": rid, "subject": {"reference": "Patient/p1"},
            "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": code}]}, **more}


def searchset(*entries: JSON) -> JSON:
    return {"resourceType": "Bundle", "type": "searchset", "entry": list(entries)}


def match(resource: JSON, mode: str = "match") -> JSON:
    return {"fullUrl": f"http://fhir.example/{resource['resourceType']}/{resource['id']}",
            "resource": resource, "search": {"mode": mode}}


ORDER = {"resourceType": "MedicationRequest", "id": "mr1", "subject": {"reference": "Patient/p1"},
         "medicationReference": {"reference": "Medication/med1"}, "code": {"coding": [{"code": HIDDEN}]}}
MEDICATION = {"resourceType": "Medication", "id": "med1", "code": {"coding": [{"code": "1010600"}]}}

TABLE: list[tuple[str, JSON, list[int] | None]] = [
    ("all kept", searchset(match(cond("a", "I10")), match(cond("b", "E11.9")), match(cond("c", "J45"))), [0, 1, 2]),
    ("one withheld", searchset(match(cond("a", "I10")), match(cond("b", HIDDEN)), match(cond("c", "J45"))), [0, 2]),
    ("all withheld", searchset(match(cond("a", HIDDEN)), match(cond("b", HIDDEN))), []),
    ("contained withheld closes its container",
     searchset(match(cond("a", "I10", contained=[cond("inner", HIDDEN)])), match(cond("b", "J45"))), [1]),
    ("entry without a resource is kept", searchset({"fullUrl": "urn:uuid:1"}, match(cond("b", HIDDEN))), [0]),
    ("nested Bundle kept, filtered inside",
     searchset(match({"resourceType": "Bundle", "id": "inner", "type": "collection",
                      "entry": [{"resource": cond("x", HIDDEN)}]})), [0]),
    ("the Medication included with a withheld order goes with it",
     searchset(match(cond("a", "I10")), match(ORDER), match(MEDICATION, "include")), [0]),
    ("a resource, not a Bundle", cond("a", "I10"), None),
    ("batch answer: a withheld slot is not a kept entry",
     {"resourceType": "Bundle", "type": "batch-response",
      "entry": [{"resource": cond("a", HIDDEN), "response": {"status": "200 OK"}},
                {"resource": cond("b", "I10"), "response": {"status": "200 OK"}}]}, [1]),
]


@pytest.mark.parametrize(("body", "kept"), [(b, k) for _, b, k in TABLE], ids=[n for n, _, _ in TABLE])
def test_kept_indices(body: JSON, kept: list[int] | None) -> None:
    parsed = orjson.loads(orjson.dumps(body))
    result = Enforcer(judge, drop_total=True).body(parsed)
    assert result.kept == kept


@pytest.mark.parametrize(("body", "kept"), [(b, k) for _, b, k in TABLE], ids=[n for n, _, _ in TABLE])
@pytest.mark.parametrize("status", ["403 Forbidden", "404 Not Found"])
def test_verdicts_are_applied_afterwards(body: JSON, kept: list[int] | None, status: str) -> None:
    """``decide`` gives the verdict per entry index and removes no entry; ``apply`` then gives
    exactly the body ``body()`` gives (which decides and applies), once."""
    decided, whole = orjson.loads(orjson.dumps(body)), orjson.loads(orjson.dumps(body))
    entries = decided.get("entry")
    result = Enforcer(judge, drop_total=True, withheld_status=status).decide(decided)
    assert result.kept == kept
    if entries is not None:
        assert decided["entry"] is entries and len(entries) == len(body["entry"])
    apply(decided, result)
    Enforcer(judge, drop_total=True, withheld_status=status).body(whole)
    assert orjson.dumps(decided) == orjson.dumps(whole)
    if kept is not None and body.get("type") == "searchset":
        # A page left with no entry has no entry list (FHIR JSON has no empty arrays).
        assert decided.get("entry", None) != []
        left = [e for e in decided.get("entry", []) if e.get("search", {}).get("mode") != "outcome"]
        assert len(left) == len(kept)
        for entry, index in zip(left, kept):  # the kept entries, in order (a nested Bundle filtered inside)
            assert entry.get("fullUrl") == body["entry"][index].get("fullUrl")
            if entry.get("resource", {}).get("resourceType") != "Bundle":
                assert orjson.dumps(entry) == orjson.dumps(body["entry"][index])
        # Something withheld, here or inside a kept entry: told in 403 mode, never in 404 mode.
        assert any(e.get("search", {}).get("mode") == "outcome" for e in decided.get("entry", [])) == (
            bool(result.removed) and status.startswith("403"))
        assert "total" not in decided
    apply(decided, result)  # once: a second apply changes nothing
    assert orjson.dumps(decided) == orjson.dumps(whole)


@pytest.mark.parametrize(("body", "kept"), [(b, k) for _, b, k in TABLE if b.get("type") == "searchset"],
                         ids=[n for n, b, _ in TABLE if b.get("type") == "searchset"])
@pytest.mark.parametrize("path", ["whole", "views"])
def test_spliced_answer_is_the_upstream_bytes_of_the_kept_entries(body: JSON, kept: list[int], path: str) -> None:
    raw = orjson.dumps(body).replace(b'"J45"', b'"J45","version":"4.10"')
    if path == "views":
        answer = read_answer(raw)
    else:
        answer = spans_of(raw, orjson.loads(raw))
    if answer is None:
        pytest.skip("takes the whole path (re-serialized), e.g. included entries on views")
    result = Enforcer(judge, drop_total=True, withheld_status="404 Not Found").body(answer.body)
    assert result.kept == kept
    spliced = answer.splice()
    entries = msgspec.json.decode(msgspec.json.decode(raw, type=dict[str, msgspec.Raw])["entry"], type=list[msgspec.Raw])
    top = msgspec.json.decode(spliced, type=dict[str, msgspec.Raw])
    # A page left with no entry has no entry list (FHIR JSON has no empty arrays).
    out = msgspec.json.decode(top["entry"], type=list[msgspec.Raw]) if kept else []
    assert ("entry" in top) == bool(kept)
    assert len(out) == len(kept)
    for index, text in zip(kept, out):
        if orjson.loads(bytes(entries[index])).get("resource", {}).get("resourceType") in WHOLE_TYPES:
            assert HIDDEN.encode() not in bytes(text)  # filtered inside, re-serialized
        else:
            assert bytes(text) == bytes(entries[index])
    if any(b'"J45"' in bytes(entries[i]) for i in kept):
        assert b'"4.10"' in spliced  # kept bytes as written


def test_what_is_remembered_by_an_entry_text_is_what_that_text_says() -> None:
    """Patients and labels remembered under an entry's exact text (answers parsed whole) are
    those of that very text: an answer repeating the entry gets them again, and an entry one
    byte apart (another patient, a sensitive code) is computed anew, never taken from the memo."""
    from gateway.core.compartment import patients_of
    from gateway.core.enforce import owners_index
    from tests.conftest import LABELS

    ana = {"resourceType": "Condition", "id": "c1", "subject": {"reference": "Patient/ana"},
           "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "I10"}]}}
    ben = {**ana, "subject": {"reference": "Patient/bea"}}                     # same length
    hiv = {**ana, "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "B20"}]}}
    for answer in ([ana, ben, hiv], [hiv, ana, ben], [ben, hiv, ana]):
        raw = orjson.dumps(searchset(*[match(r) for r in answer]))
        body = orjson.loads(raw)
        view = spans_of(raw, body)
        assert view is not None
        resources = [e["resource"] for e in body["entry"]]
        assert set(view.content_keys) == {id(r) for r in resources}
        index = owners_index(body, [], view.content_keys)
        assert [index[id(r)] for r in resources] == [patients_of(r) for r in resources]
        keyed = [LABELS.labels_keyed(view.content_keys[id(r)], r) for r in resources]
        assert keyed == [LABELS.labels_for(r) for r in resources]
    assert any(label.code == "HIV" for label in LABELS.labels_for(hiv))


def test_what_is_remembered_by_text_is_bounded_by_the_bytes_of_the_texts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Many distinct entries of the largest size remembered by their texts stay within a bound
    of bytes (not only of entries): patients and labels alike."""
    import gateway.core.enforce as enforce
    from gateway.core.labels import LabelIndex
    from gateway.core.memo import TextMemo
    from tests.conftest import LABELS

    monkeypatch.setattr(enforce._OWNERS, "max_bytes", 64 * 1024)
    index = LabelIndex.__new__(LabelIndex)
    for name in LabelIndex.__slots__:
        setattr(index, name, getattr(LABELS, name))
    index._memo = TextMemo(LABELS._memo.max_entries, 64 * 1024)
    enforce._OWNERS.clear()
    for n in range(200):
        resource = cond(f"c{n}", "I10", note=[{"text": "x" * 3000}])
        raw = orjson.dumps(searchset(match(resource)))
        body = orjson.loads(raw)
        view = spans_of(raw, body)
        assert view is not None and len(view.content_keys) == 1
        key = view.content_keys[id(body["entry"][0]["resource"])]
        enforce.owners_index(body, [], view.content_keys)
        index.labels_keyed(key, body["entry"][0]["resource"])
        assert sum(len(k) for k in enforce._OWNERS.entries if isinstance(k, bytes)) <= 64 * 1024
        assert sum(len(k) for k in index._memo.entries if isinstance(k, bytes)) <= 64 * 1024
    assert enforce._OWNERS and index._memo
