"""Red team, fifth pass, the pure parts: what is remembered under an entry's exact text, the
repeated-key check's compact-text shortcut, the Bundle loop's Composition and include flags,
facts built without their constructor, and escape checks that look for a backslash first.

Each property is checked against a plain reference (the exact parser, the resource itself,
the passes run unconditionally, an answer rewritten and parsed again), over generated inputs.
"""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gateway.core.enforce as enforce
from gateway.core.compartment import patients_of
from gateway.core.enforce import (
    Enforced, Enforcer, _identities, owners_index, total_is_visible, scrub_compositions, withheld_slot,
    without_orphan_includes, SUPPRESSED_OUTCOME,
)
from gateway.core.decision import NOT_READ
from gateway.core.judge import Facts, facts_of
from gateway.core.labels import LabelIndex
from gateway.core.memo import TextMemo, text_size
from gateway.core.links import LinkRewriter
from gateway.core.model import Decision, Reason, Verdict
from gateway.core.strict_json import has_duplicate_keys
from gateway.core.view import spans_of
from gateway.core.judge import binaries_as_contexts
from gateway.web.enforcement import ConsentEnforcement, Looked, bind_contexts
from tests.conftest import LABELS
from tests.strategies import consent_specs, searchset_texts
from tests.unit.test_views import RESOLVED, by_patient, contexts, policies

JSON = dict[str, Any]


# ================================================================ 2. the repeated-key check


def exact_repeats(text: bytes) -> bool:
    """A key given twice in some object, by the exact (pairs-keeping) parser."""
    found = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        if len({k for k, _ in items}) != len(items):
            found.append(True)
        return dict(items)

    json.loads(text, object_pairs_hook=pairs)
    return bool(found)


KEYS = st.sampled_from(["a", "b", "id", "code", "subject", "\u00e9", '"', "\\", "x\":", "\u2028", "a\u0000", ""])
SCALARS = st.one_of(
    st.text(max_size=6), st.integers(-2**63, 2**64 - 1), st.booleans(), st.none(),
    st.floats(allow_nan=False, allow_infinity=False),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(KEYS, inner, max_size=4)),
    max_leaves=10,
)


def compact_with_repeat(value: Any, draw: Any, repeated: list[bool]) -> bytes:
    """``value`` written exactly as orjson writes it, except that some objects name one of
    their keys a second time (with the same value text, or another)."""
    if isinstance(value, dict):
        pairs = [orjson.dumps(k) + b":" + compact_with_repeat(v, draw, repeated) for k, v in value.items()]
        if value and draw(st.booleans()):
            keys = list(value)
            at = draw(st.integers(0, len(keys) - 1))
            again = orjson.dumps(keys[at]) + b":" + draw(st.sampled_from([
                orjson.dumps(value[keys[at]]), b"null", b"1", b'"x"', b"{}", b"[]",
            ]))
            pairs.insert(draw(st.integers(0, len(pairs))), again)
            repeated.append(True)
        return b"{" + b",".join(pairs) + b"}"
    if isinstance(value, list):
        return b"[" + b",".join(compact_with_repeat(v, draw, repeated) for v in value) + b"]"
    return orjson.dumps(value)


@settings(max_examples=600, derandomize=True, deadline=None)
@given(st.data())
def test_a_compact_text_with_a_repeated_key_is_never_its_own_re_serialisation(data: st.DataObject) -> None:
    """The shortcut ``orjson.dumps(parsed) == raw`` must never vouch for a text that names a key
    twice: texts written exactly as orjson writes them, but for one object repeating a key."""
    value = data.draw(VALUES)
    repeated: list[bool] = []
    raw = compact_with_repeat(value, data.draw, repeated)
    parsed = orjson.loads(raw)
    assert exact_repeats(raw) == bool(repeated), raw
    if repeated:
        assert orjson.dumps(parsed) != raw, raw
    assert has_duplicate_keys(raw, parsed) == bool(repeated), raw


@settings(max_examples=300, derandomize=True, deadline=None)
@given(VALUES)
def test_whatever_is_its_own_re_serialisation_names_each_key_once(value: Any) -> None:
    """The claim the shortcut rests on, by the exact parser: a text equal to its compact
    re-serialisation has no repeated key."""
    raw = orjson.dumps(value)
    assert orjson.dumps(orjson.loads(raw)) == raw
    assert not exact_repeats(raw) and not has_duplicate_keys(raw, orjson.loads(raw))


@pytest.mark.parametrize("raw", [
    b'{"a":1,"a":1}',
    b'{"a":{"b":1,"b":1}}',
    b'[{"a":null,"a":null}]',
    b'{"a":1,"\\u0061":1}',
    b'{"\\u0061":1,"a":1}',
    b'{"resourceType":"Condition","subject":{"reference":"Patient/a"},"subject":{"reference":"Patient/a"}}',
])
def test_repeats_that_read_like_one_key_are_repeats(raw: bytes) -> None:
    assert has_duplicate_keys(raw, orjson.loads(raw))


# ================================================================ 1. what is remembered under an entry's text


def _labels_copy() -> LabelIndex:
    """The bundled rules with a memo of their own (the session's is shared by every test)."""
    index = LabelIndex.__new__(LabelIndex)
    for name in LabelIndex.__slots__:
        setattr(index, name, getattr(LABELS, name))
    index._memo = TextMemo(LABELS._memo.max_entries, LABELS._memo.max_bytes)
    return index


@settings(max_examples=120, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(searchset_texts())
def test_an_entry_text_fixes_the_resource_it_keys(raw: bytes) -> None:
    """Every content key is the text of the very entry whose resource it keys, and what is
    remembered under it (patients, labels) is what that resource gives, on a first reading and
    on a second one served from the memos."""
    index = _labels_copy()
    for _ in range(2):
        body = orjson.loads(raw)
        view = spans_of(raw, body)
        if view is None:
            return
        entries = body.get("entry") or []
        by_id = {id(e["resource"]): e for e in entries if isinstance(e.get("resource"), dict)}
        for key, text in view.content_keys.items():
            assert key in by_id
            assert orjson.loads(text) == by_id[key]
            assert len(text) <= 4096
        keyed = owners_index(body, [], view.content_keys)
        plain = owners_index(orjson.loads(raw), [])
        assert sorted(map(sorted, keyed.values())) == sorted(map(sorted, plain.values()))
        for key in view.content_keys:
            resource = by_id[key]["resource"]
            assert keyed[key] == patients_of(resource)
            assert index.labels_keyed(view.content_keys[key], resource) == LABELS.labels_for(resource)


def test_memos_account_their_bytes_exactly_and_stay_within_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """With small bounds, after every answer: the bytes the memos count are the bytes of their
    keys, never above the bound, and entries never above their count bound."""
    monkeypatch.setattr(enforce._OWNERS, "max_bytes", 3_000)
    monkeypatch.setattr(enforce._OWNERS, "max_entries", 5)
    index = _labels_copy()
    index._memo.max_bytes, index._memo.max_entries = 3_000, 5
    for n in range(60):
        resources = [
            {"resourceType": "Condition", "id": f"c{n}-{i}", "subject": {"reference": f"Patient/p{i}"},
             "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "B20" if i % 2 else "I10"}]},
             "note": [{"text": "x" * (100 * i)}]}
            for i in range(1 + n % 4)
        ]
        raw = orjson.dumps({"resourceType": "Bundle", "type": "searchset",
                            "entry": [{"resource": r} for r in resources]})
        body = orjson.loads(raw)
        view = spans_of(raw, body)
        assert view is not None
        found = owners_index(body, [], view.content_keys)
        for resource in body["entry"]:
            r = resource["resource"]
            assert found[id(r)] == patients_of(r)
            assert index.labels_keyed(view.content_keys[id(r)], r) == LABELS.labels_for(r)
        assert enforce._OWNERS.held == sum(len(k) for k in enforce._OWNERS.entries if isinstance(k, bytes))
        assert enforce._OWNERS.held <= 3_000 and len(enforce._OWNERS) <= 5
        assert index._memo.held == sum(text_size(k) for k in index._memo.entries)
        assert index._memo.held <= 3_000 and len(index._memo) <= 5


def test_a_remembered_empty_label_set_is_a_hit_not_a_miss() -> None:
    """``remembered`` answers None only for what was never labelled: an unlabelled record's
    empty set is remembered as such (a miss would label it again; a falsy test would too)."""
    index = _labels_copy()
    plain = {"resourceType": "Observation", "id": "o1", "subject": {"reference": "Patient/p1"}}
    look = index._memo.get
    assert look(b"k1") is None
    assert index.labels_keyed(b"k1", plain) == frozenset()
    assert look(b"k1") == frozenset() and look(b"k1") is not None
    index._memo.clear()
    assert look(b"k1") is None  # the lookup follows the memo when it is cleared


# ================================================================ 4. facts built without their constructor


def test_facts_built_by_tuple_new_are_facts_with_every_field() -> None:
    resource = {"resourceType": "Observation", "meta": {"profile": ["http://x/p"]},
                "effectiveDateTime": "2023-01-02", "subject": {"reference": "Patient/p"}}
    owners, labels = frozenset({"Patient/p"}), frozenset()
    for reads in (frozenset(), frozenset({"date", "scopes"})):
        facts = facts_of(resource, owners, labels, frozenset({"s"}), reads)
        assert type(facts) is Facts and len(facts) == len(Facts._fields)
        expected = Facts(facts.rtype, owners, labels, frozenset({"s"}) if "scopes" in reads else frozenset(),
                         frozenset({"http://x/p"}), facts.date)
        assert facts == expected and hash(facts) == hash(expected)
        assert (facts.date is NOT_READ) == ("date" not in reads)
    odd = facts_of({"resourceType": 7, "meta": {"profile": "x"}}, owners, labels, frozenset(), frozenset())
    assert odd.rtype == "" and len(odd) == len(Facts._fields)


# ================================================================ 3. the Bundle loop's flags, against the passes run always

HIDDEN = "B20"


def judge(resource: JSON, owners: frozenset[str]) -> Decision:
    code = resource.get("code")
    codings = code.get("coding") if isinstance(code, dict) else None
    first = codings[0] if isinstance(codings, list) and codings and isinstance(codings[0], dict) else {}
    if first.get("code") == HIDDEN:
        return Decision(Verdict.DENY, (Reason("c1", "", "deny"),))
    return Decision(Verdict.PERMIT, (Reason("c1", "", "permit"),))


class ReferenceEnforcer(Enforcer):
    """The Bundle loop as it was: every entry judged through ``_keep``, the Composition and
    orphan passes run whenever something was withheld."""

    def body(self, body: JSON) -> Enforced:
        """The Bundle body filtered in place as it is decided."""
        if body.get("resourceType") != "Bundle":
            return super().body(body)
        self.result.kept = []
        self.bundle(body, self.result.kept)
        return self.result

    def bundle(self, bundle: JSON, kept_indices: list[int] | None = None) -> None:
        entries = bundle.get("entry")
        removed_before = len(self.result.removed)
        if entries is not None and not (isinstance(entries, list) and all(isinstance(e, dict) for e in entries)):
            self._malformed()
            return
        if entries:
            response_bundle = bundle.get("type") in ("batch-response", "transaction-response")
            kept: list[object] = []
            gone: set[str] = set()
            for index, entry in enumerate(entries):
                resource = entry.get("resource")
                if response_bundle:
                    self._scrub_response(entry)
                if resource is not None and not isinstance(resource, dict):
                    self._malformed()
                    return
                if resource is None or self._keep(resource):
                    kept.append(entry)
                    if kept_indices is not None:
                        kept_indices.append(index)
                    continue
                gone.update(_identities(entry, resource))
                if response_bundle:
                    kept.append({"response": withheld_slot(self.withheld_status)})
            if gone and scrub_compositions(kept, gone):
                self.result.changed = True
            if len(self.result.removed) > removed_before and not response_bundle:
                # Which entries may be included depends on the Bundle type (core.enforce.may_be_included).
                orphans = without_orphan_includes(kept, bundle.get("type") == "searchset")
                if kept_indices is not None and len(orphans) != len(kept):
                    left = {id(e) for e in orphans}
                    kept_indices[:] = [i for i in kept_indices if id(entries[i]) in left]
                kept = orphans
                if not self.withheld_status.startswith("404"):
                    kept.append({"resource": SUPPRESSED_OUTCOME, "search": {"mode": "outcome"}})
            if len(self.result.removed) > removed_before:
                bundle["entry"] = kept
                self.result.changed = True
        if "total" in bundle and (
            self.drop_total or len(self.result.removed) > removed_before or not total_is_visible(bundle)
        ):
            del bundle["total"]
            self.result.changed = True
        if bundle.get("entry") == [] and bundle.get("type") not in ("batch-response", "transaction-response"):
            del bundle["entry"]  # since: an entry list left empty goes (FHIR JSON has no empty arrays)
            self.result.changed = True


def _cond(rid: str, code: str) -> JSON:
    return {"resourceType": "Condition", "id": rid, "subject": {"reference": "Patient/p1"},
            "code": {"coding": [{"code": code}]}}


SEARCHES = st.sampled_from([
    None, {"mode": "match"}, {"mode": "include"}, {"mode": "Include"}, {"mode": "include "},
    {"score": 1, "mode": "include"}, {"mode": "outcome"}, {}, "include", ["include"], {"mode": None},
])


@st.composite
def entries_of(draw: Any, depth: int = 0) -> list[JSON]:
    out: list[JSON] = []
    for n in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["ordinary", "hidden", "composition", "medication", "practitioner",
                                     "order", "none", "bundle" if depth < 2 else "ordinary"]))
        rid = f"r{depth}-{n}"
        resource: JSON | None
        if kind == "ordinary":
            resource = _cond(rid, "I10")
        elif kind == "hidden":
            resource = _cond(rid, HIDDEN)
        elif kind == "composition":
            targets = draw(st.lists(st.sampled_from([f"Condition/r{depth}-{i}" for i in range(6)]
                                                    + ["Medication/med1", "Practitioner/pr1"]), max_size=3))
            resource = {"resourceType": "Composition", "id": rid, "text": {"div": "<div>narrative</div>"},
                        "section": [{"title": "s", "text": {"div": "<div>s</div>"},
                                     "entry": [{"reference": t} for t in targets],
                                     "section": [{"entry": [{"reference": t} for t in targets[:1]],
                                                  "text": {"div": "<div>inner</div>"}}]}]}
        elif kind == "medication":
            resource = {"resourceType": "Medication", "id": "med1", "code": {"coding": [{"code": "1010600"}]}}
        elif kind == "practitioner":
            resource = {"resourceType": "Practitioner", "id": "pr1"}
        elif kind == "order":
            resource = {"resourceType": "MedicationRequest", "id": rid, "subject": {"reference": "Patient/p1"},
                        "medicationReference": {"reference": "Medication/med1"},
                        "requester": {"reference": "Practitioner/pr1"},
                        "code": {"coding": [{"code": draw(st.sampled_from([HIDDEN, "I10"]))}]}}
        elif kind == "bundle":
            resource = {"resourceType": "Bundle", "id": rid,
                        "type": draw(st.sampled_from(["collection", "document", "searchset"])),
                        "entry": draw(entries_of(depth + 1))}
        else:
            resource = None
        entry: JSON = {"fullUrl": f"http://x/{(resource or {}).get('resourceType')}/{rid}"}
        if resource is not None:
            entry["resource"] = resource
        search = draw(SEARCHES)
        if search is not None:
            entry["search"] = search
        out.append(entry)
    return out


@settings(max_examples=500, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(entries_of(), st.sampled_from(["searchset", "document", "collection", "batch-response"]), st.booleans())
def test_the_flagged_loop_decides_and_rewrites_exactly_as_the_passes_run_always(
    entries: list[JSON], btype: str, not_found: bool,
) -> None:
    """Compositions at any level, includes in odd shapes, nested Bundles: the answer after the
    loop that skips its passes where it saw no Composition / no include is the answer after
    the passes run every time, byte for byte, with the same kept indices."""
    body = {"resourceType": "Bundle", "type": btype, "entry": entries}
    status = "404 Not Found" if not_found else "403 Forbidden"
    new, old = orjson.loads(orjson.dumps(body)), orjson.loads(orjson.dumps(body))
    got = Enforcer(judge, drop_total=True, withheld_status=status).body(new)
    want = ReferenceEnforcer(judge, drop_total=True, withheld_status=status).body(old)
    assert orjson.dumps(new) == orjson.dumps(old)
    assert got.kept == want.kept and len(got.removed) == len(want.removed) and got.changed == want.changed


# ================================================================ 5. escape checks that look for a backslash first


def _spelled(text: str, draw: Any) -> str:
    """A JSON string literal of ``text``, each character maybe a \\u escape, each slash maybe ``\\/``."""
    out = ['"']
    for ch in text:
        how = draw(st.sampled_from(["plain", "u", "slash"]))
        if how == "u":
            out.append("\\u%04x" % ord(ch))
        elif how == "slash" and ch == "/":
            out.append("\\/")
        else:
            out.append(json.dumps(ch)[1:-1])
    out.append('"')
    return "".join(out)


@settings(max_examples=300, derandomize=True, deadline=None)
@given(st.data())
def test_every_spelling_of_the_upstream_base_is_rewritten(data: st.DataObject) -> None:
    """Links, fullUrls and references spelled with ``\\u`` escapes or ``\\/``, in answers with
    or without other backslashes: after rewriting, no string names the upstream base."""
    upstream, public = "http://10.0.0.7:8080/fhir", "https://gw.example/fhir"
    tail = data.draw(st.sampled_from(["/Observation?patient=p1&page=2", "/Observation/o1", "", "?x=1"]))
    other = data.draw(st.sampled_from(["", "plain", "line\\nbreak", "quote \\\" in", "back\\\\slash", "\\u00e9t\\u00e9"]))
    spelled = _spelled(upstream + tail, data.draw)
    raw = ('{"resourceType":"Bundle","type":"searchset","link":[{"relation":"next","url":%s}],'
           '"entry":[{"fullUrl":%s,"resource":{"resourceType":"Observation","id":"o1","note":[{"text":"%s"}]}}]}'
           % (spelled, spelled, other)).encode()
    out = LinkRewriter(upstream, public).body(raw)
    parsed = orjson.loads(out)
    assert parsed["link"][0]["url"] == public + tail, (raw, out)
    assert parsed["entry"][0]["fullUrl"] == public + tail
    assert "10.0.0.7" not in out.decode()
    assert orjson.loads(raw)["entry"][0]["resource"] == parsed["entry"][0]["resource"]


# ================================================================ 1+3+4. the whole pipeline with and without the memos


@settings(max_examples=80, derandomize=True, database=None, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(raw=searchset_texts(), data=st.data())
def test_an_answer_decided_through_the_memos_is_decided_as_without_them(raw: bytes, data: st.DataObject) -> None:
    """Generated search sets and consents: enforcement with the entry-text keys (labels and
    patients remembered, looked up before labelling, the common entry judged inline) leaves the
    same answer, for the same reasons, as enforcement that remembers nothing; a second pass,
    served from what the first remembered, too."""
    specs = data.draw(st.lists(consent_specs, max_size=4), label="consents")
    consents = by_patient(specs, None)
    ctx, policy = data.draw(contexts, label="context"), data.draw(policies, label="policy")
    memo = _labels_copy()

    def decided(keyed: bool) -> tuple[Any, ...]:
        body = orjson.loads(raw)
        view = spans_of(raw, body)
        keys = view.content_keys if keyed and view is not None else None
        looked = Looked(ctx, {p: tuple(c) for p, c in consents.items()})
        seen: dict[int, Any] = {}
        enforcement = ConsentEnforcement(None, memo if keyed else LABELS, policy)  # type: ignore[arg-type]
        judge = binaries_as_contexts(enforcement.judge(looked, RESOLVED, seen, keys), RESOLVED)
        binaries: list[JSON] = []
        index = owners_index(body, binaries, keys)
        bind_contexts(binaries, index, RESOLVED)
        result = Enforcer(judge, drop_total=True, index=index).body(body)
        released = sorted((str(r.get("id")), sorted(map(str, seen.get(id(r), ()))))
                          for e in body.get("entry") or () if isinstance(r := e.get("resource"), dict))
        return result.denied, result.removed, result.deciding, result.changed, result.kept, orjson.dumps(body), released

    plain = decided(False)
    assert decided(True) == plain
    assert decided(True) == plain
