"""The reference scans of ``core.references`` answer exactly as their first versions did.

``unreleased_named`` reads an answer's bytes once (one pattern scan, each distinct value judged
once) and the resource walks (``iter_resources``, ``in_answer``, ``deciding_references``,
``may_refer``) are lighter; none may change a decision. The first versions are kept below as
oracles, and generated texts and bodies must get the same answer (or the same kind of error)
from both: JSON texts with references and displays, ``\\u`` and other escapes, whitespace JSON
does not know, nested objects, braces and quotes inside strings, conditional, ``#`` and
absolute references, released and unreleased targets, and byte soups that are no JSON at all.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import orjson
from hypothesis import HealthCheck, Phase, example, find, given, settings
from hypothesis import strategies as st

from gateway.core import references
from gateway.core.compartment import is_patient_data
from gateway.core.fhir import R4_RESOURCE_TYPES, relative_reference, resource_reference
from tests.strategies import ALL_TYPES, PATIENTS, resources

JSON = dict[str, Any]
Draw = Callable[[st.SearchStrategy[Any]], Any]


def _fast(examples: int) -> settings:
    """Reproducible runs (CI sees the same examples every time) without deadlines."""
    return settings(derandomize=True, database=None, deadline=None, max_examples=examples,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ``find`` stops at the first example that fits (no shrinking: only that one exists matters).
_FIRST = settings(_fast(5000), phases=[Phase.generate])


# ---------------------------------------------------------------------- the oracles (first versions)

_OLD_REFERENCE = re.compile(rb'"reference"\s*:\s*"((?:[^"\\]|\\.)*)"')
_OLD_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")


def old_may_be_patient_data(target: str) -> bool:
    rtype, _, rid = target.partition("/")
    return not (rtype in R4_RESOURCE_TYPES and not is_patient_data(rtype) and _OLD_ID.fullmatch(rid) is not None)


def old_unreleased_named(raw: bytes, released: frozenset[str]) -> frozenset[bytes] | None:
    if b"\\u" in raw:
        return None
    if b'"display"' not in raw:
        return frozenset()
    values = _OLD_REFERENCE.findall(raw)
    if len(values) != raw.count(b'"reference"'):
        return None
    suspects: set[bytes] = set()
    for value in set(values):
        ref = json.loads(b'"' + value + b'"') if b"\\" in value else value.decode("utf-8", "replace")
        if ref.startswith("#"):
            continue
        target = relative_reference(ref)
        if target not in released and old_may_be_patient_data(target):
            suspects.add(value)
    if not suspects:
        return frozenset()
    named: set[bytes] = set()
    objects: dict[bytes, bool] = {}
    for match in _OLD_REFERENCE.finditer(raw):
        value = match.group(1)
        if value in suspects and value not in named and _old_may_have_display(raw, match.start(), match.end(), objects):
            named.add(value)
    return frozenset(named)


def _old_names_display(text: bytes) -> bool:
    try:
        node = orjson.loads(text)
    except orjson.JSONDecodeError:
        return True
    return not isinstance(node, dict) or "display" in node


def _old_may_have_display(raw: bytes, start: int, end: int, seen: dict[bytes, bool]) -> bool:
    first, last = raw.rfind(b"{", 0, start), raw.find(b"}", end)
    if first < 0 or last < 0:
        return True
    text = raw[first:last + 1]
    if text not in seen:
        seen[text] = _old_names_display(text)
    return seen[text]


def old_iter_resources(node: JSON) -> list[JSON]:
    found: list[JSON] = []
    stack: list[JSON] = [node]
    while stack:
        current = stack.pop()
        rtype = current.get("resourceType")
        if rtype == "Bundle":
            for entry in current.get("entry") or ():
                if type(entry) is dict:
                    resource = entry.get("resource")
                    if type(resource) is dict:
                        stack.append(resource)
        elif rtype == "Parameters":
            params = list(current.get("parameter") or ())
            while params:
                param = params.pop()
                if type(param) is dict:
                    resource = param.get("resource")
                    if type(resource) is dict:
                        stack.append(resource)
                    params.extend(param.get("part") or ())
        else:
            found.append(current)
            contained = current.get("contained")
            if type(contained) is list:
                found.extend(inner for inner in contained if type(inner) is dict)
            elif type(contained) is dict:
                found.append(contained)
    return found


def old_in_answer(body: JSON) -> dict[str, JSON]:
    """The first version, changed since in one way: a contained resource is not addressable, so
    it never stands for a ``Type/id`` of the answer (as in ``old_deciding_references``)."""
    found: dict[str, JSON] = {}
    resources = old_iter_resources(body)
    inner = {id(c) for r in resources if type(r.get("contained")) is list for c in r["contained"]}
    inner |= {id(r["contained"]) for r in resources if type(r.get("contained")) is dict}
    for resource in resources:
        ref = resource_reference(resource)
        if ref is not None and id(resource) not in inner:
            found.setdefault(ref, resource)
    return found


def old_may_refer(raw: bytes) -> bool:
    """Changed since in one way: an ``itemReference`` (a Medication's ingredient) refers too,
    and one scan finds any ``...Reference"`` key, so it may say True where nothing refers,
    never False where something does."""
    return b"\\u" in raw or b'"Binary"' in raw or b'"medicationReference"' in raw or b'Reference"' in raw


def old_current(body: JSON) -> set[int]:
    """The resources that are the server's current ones: the answer when a resource, a
    searchset's entries (not a stored, versioned Bundle's), the entries of a batch answer's searchsets (written out, not walked)."""
    if body.get("resourceType") == "Parameters":
        return set()
    if body.get("resourceType") != "Bundle":
        return {id(body)}
    if isinstance(body.get("meta"), dict) and "versionId" in body["meta"]:
        return set()  # stored on the server: copies
    resources = [e["resource"] for e in body.get("entry") or () if type(e) is dict and type(e.get("resource")) is dict]
    if body.get("type") == "searchset":
        return {id(r) for r in resources}
    if body.get("type") not in ("batch-response", "transaction-response"):
        return set()
    return {i for r in resources if r.get("resourceType") == "Bundle" and r.get("type") == "searchset"
            for i in old_current(r)}


# The bodies' one base: the first versions read every absolute reference as this server's (another
# server's references: tests/unit/test_foreign_references.py).
_THE_BASE = frozenset({"http://example.org/fhir", "https://example.org/fhir"})


def old_deciding_references(body: JSON) -> tuple[Any, ...] | None:
    """The first version, its answer as (present, contexts, medications, unattached); changed
    since in two ways: a contained resource is not addressable from outside its container, so it
    is never ``present`` (a contained ``#m1`` once stood for the server's ``Medication/m1``); and
    only the server's current resources are (``old_current``: a vread, a history, a stored
    Bundle may hold another version of the same ``Type/id``)."""
    present: dict[str, JSON] = {}
    contexts: set[str] = set()
    medications: set[str] = set()
    unattached: set[str] = set()
    refers = False
    resources = old_iter_resources(body)
    inner = {id(c) for r in resources if type(r.get("contained")) is list for c in r["contained"]}
    inner |= {id(r["contained"]) for r in resources if type(r.get("contained")) is dict}
    current = old_current(body)
    for resource in resources:
        ref = resource_reference(resource)
        if ref is not None and id(resource) not in inner and id(resource) in current:
            present.setdefault(ref, resource)
        context = references.security_context(resource, _THE_BASE)  # unchanged since the first version
        if context is not None:
            refers = True
            contexts.add(context)
        elif ref is not None and resource.get("resourceType") == "Binary" and "securityContext" not in resource:
            refers = True
            unattached.add(ref)
        elif references.unreadable_context(resource, _THE_BASE):  # a per-resource rule, tested on its own
            refers = True
        med = references.medication_reference(resource, _THE_BASE)  # unchanged since the first version
        if med is not None:
            refers = True
            if not med.startswith("#"):
                medications.add(med)
    if not refers:
        return None
    return (present, frozenset(contexts - present.keys()), frozenset(medications - present.keys()),
            frozenset(unattached))


def outcome(call: Callable[[], Any]) -> tuple[str, Any]:
    """What a call answers, or the kind of error it raises (which one of several bad values
    raises first may differ; that it raises, and as a ValueError, may not)."""
    try:
        return "answer", call()
    except ValueError:
        return "raises", ValueError


# ---------------------------------------------------------------------- generated JSON texts

# Targets as a released set names them: patient data, data outside the compartment, an
# unknown type, an id no server would give.
TARGETS = ("Patient/p1", "Patient/p2", "Observation/hiv", "Observation/cbc", "Practitioner/dr1",
           "Organization/o1", "Medication/m1", "Unknown/x1", "Observation/a b")
# Reference values as written: relative, absolute with a version, conditional, local, escaped
# (a slash, a quote, a backslash, a newline), escapes JSON does not know, UTF-8 and bytes that
# are no UTF-8, empty, and an unescaped tab.
WRITTEN_REFERENCES = (
    *(t.encode() for t in TARGETS),
    b"http://example.org/fhir/Observation/hiv/_history/2", b"https://example.org/fhir/Patient/p1",
    b"Observation?code=http://loinc.org|75622-1", b"Patient?identifier=urn:oid:1.2|MRN-1",
    b"#m", b"#", b"#p1", b"Practitioner/dr1#x",
    b"Observation\\/hiv", b"Patient\\/p2", b'Obs\\"x', b"a\\\\b", b"Observation/hiv\\n",
    b"Obs\\x", b"Patient/p\xc3\xa9", b"Patient/p\xff", b"", b"Patient/\tp2", b"Patient/p2\\\t",
)
# Keys of the objects around them; now and then one spelled with escapes a pattern cannot read.
# A "reference" key with no string value is rare too: the text is unreadable then.
KEYS = (b"display", b"type", b"identifier", b"note", b"extension", b"subject", b"result", b"valueString", b"text")
ODD_KEYS = (b"displa\\u0079", b"refer\\u0065nce", b"display\\/", b"reference ", b"reference")
# Other string values: braces, escaped quotes, a reference written inside a string.
STRINGS = (b"x", b"HIV-1 viral load", b"{", b"}", b"}{", b'{ \\"a\\": 1 }', b'\\"reference\\": \\"Patient/p2\\"',
           b'say \\"}\\"', b"reference", b"display", b"\\\\", b"Observation/hiv")
# Whitespace as JSON writes it, and as only the pattern's \s reads it (form feed, vertical tab).
SPACES = (b"", b"", b" ", b"\n  ", b"\t", b"\r\n")


def _rarely(common: tuple[bytes, ...], rare: tuple[bytes, ...], one_in: int) -> st.SearchStrategy[bytes]:
    """One of ``common``, or one of ``rare`` about one time in ``one_in``."""
    return st.tuples(st.integers(1, one_in), st.sampled_from(common), st.sampled_from(rare)).map(
        lambda t: t[2] if t[0] == 1 else t[1])


space = _rarely(SPACES, (b"\x0c", b"\x0b"), 20)
keys = _rarely(KEYS, ODD_KEYS, 40)
quoted = _rarely(STRINGS, (b"Dr \\u0041na", b"\\u007d"), 150).map(lambda s: b'"' + s + b'"')
leaves = st.one_of(quoted, st.sampled_from([b"1", b"4.10", b"true", b"null", b"[]", b"{}"]))


@st.composite
def _object(draw: Draw, values: st.SearchStrategy[bytes]) -> bytes:
    """An object text: a Reference (a reference, often a display) or another object, its
    members in any order with any whitespace; its values may be nested objects and arrays."""
    members: list[tuple[bytes, bytes]] = []
    if draw(st.integers(0, 3)) > 0:
        members.append((b"reference", b'"' + draw(st.sampled_from(WRITTEN_REFERENCES)) + b'"'))
        if draw(st.integers(0, 2)) > 0:
            members.append((b"display", draw(quoted)))
    for _ in range(draw(st.integers(0, 3))):
        members.append((draw(keys), draw(values)))
    members = draw(st.permutations(members))
    parts = [draw(space) + b'"' + key + b'"' + draw(space) + b":" + draw(space) + value + draw(space)
             for key, value in members]
    return b"{" + b",".join(parts) + draw(space) + b"}"


def _array(values: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    return st.lists(st.tuples(space, values), max_size=3).map(lambda items: b"[" + b",".join(s + v for s, v in items) + b"]")


json_values = st.recursive(
    st.one_of(leaves, _object(leaves)),
    lambda kids: st.one_of(_object(kids), _array(kids)),
    max_leaves=12,
)
json_texts = st.one_of(
    _object(json_values),
    # as a searchset: references inside entries
    st.lists(_object(json_values), max_size=4).map(
        lambda objects: b'{"resourceType":"Bundle","entry":[' + b",".join(b'{"resource":' + o + b"}" for o in objects) + b"]}"),
)
# Bytes that are no JSON: the pieces of references and objects in any order around a display
# (a "reference" key the pattern cannot read, a key that runs into another, unbalanced braces).
_pieces = st.lists(st.sampled_from([
    b'"reference"', b'"reference"reference"', b":", b" ", b"\x0c", b'"', b"{", b"}", b",", b"\\", b"\\u", b'"display"',
    b'"Patient/p2"', b'"Observation/hiv"', b'"#m"', b'"x"', b"[", b"]", b'"\\"', b'"Obs\\x"', b"reference", b"null",
]), max_size=12).map(b"".join)
soups = st.tuples(_pieces, _pieces).map(lambda halves: halves[0] + b'"display"' + halves[1])
texts = st.one_of(json_texts, json_texts, json_texts, soups)
released_sets = st.frozensets(st.sampled_from(TARGETS))


@_fast(800)
@given(texts, released_sets)
@example(b'{"r":{"reference":"Patient/p2","display":"Ana"}}', frozenset())
@example(b'{"r":{"reference":"Patient/p2","display":"Ana"}}', frozenset({"Patient/p2"}))
@example(b'{"reference":"\\"reference":"x","display":"y"}', frozenset())     # a key inside a value
@example(b'{"x":"reference"reference":"Patient/p2","display":"y"}', frozenset())  # keys that overlap
@example(b'{"reference":"Obs\\x","a":{"reference"  :"Patient/p2"}, "display":1}', frozenset())
@example(b'{"reference":"Obs\\x","reference":5,"display":1}', frozenset())   # unreadable beats a bad value
@example(b'{"reference":"Patient/p2","note":"}","display":"x"}', frozenset())
@example(b'{"reference"\x0c:"Patient/p2"},{"display":"x"}', frozenset())
@example(b'[{"reference":"Patient/p2"},{"reference":"Patient/p2","display":"x"}]', frozenset())
@example(b'{"a":{"reference":"Patient/p2"},"b":{"reference":"Patient/p2" ,"display":"x"}}', frozenset())
@example(b'{"a":{"reference":"Patient/p2"}},"display":"x"}', frozenset())  # a lone reference object
def test_the_byte_scans_answer_as_the_first_versions(raw: bytes, released: frozenset[str]) -> None:
    assert outcome(lambda: references.unreleased_named(raw, released, _THE_BASE)) == outcome(
        lambda: old_unreleased_named(raw, released))
    assert outcome(lambda: references.may_name_unreleased(raw, released, _THE_BASE)) == outcome(
        lambda: old_unreleased_named(raw, released) != frozenset())
    assert references.may_refer(raw) is old_may_refer(raw)


def _kind(case: tuple[bytes, frozenset[str]]) -> str:
    """What the first version answers for a generated text: ``unreadable``, ``nothing``,
    ``named`` (``named one of several`` when other values are not), or ``raises``."""
    raw, released = case
    kind, answer = outcome(lambda: old_unreleased_named(raw, released))
    if kind == "raises":
        return "raises"
    if answer is None:
        return "unreadable"
    if not answer:
        return "nothing" if b'"display"' in raw else "no display"
    return "named one of several" if len(set(_OLD_REFERENCE.findall(raw)) - answer) >= 2 else "named"


def test_the_texts_reach_every_answer() -> None:
    """The generated texts are unreadable (None), name nothing although a display is there,
    name some values and not others, or hold a value that is no JSON string: the property
    above compares all of them."""
    for kind in ("unreadable", "nothing", "named", "named one of several", "raises"):
        assert find(st.tuples(texts, released_sets), lambda c, kind=kind: _kind(c) == kind, settings=_FIRST)


# ---------------------------------------------------------------------- generated bodies


def _odd_binary(draw: Draw) -> JSON:
    binary: JSON = {"resourceType": "Binary", "contentType": "text/plain"}
    if draw(st.integers(0, 5)):
        binary["id"] = draw(st.sampled_from(["b1", "b2"]))
    if draw(st.booleans()):
        binary["securityContext"] = draw(st.sampled_from([
            {"reference": "DocumentReference/d1"}, {"reference": "Observation/hiv"}, {"reference": "Organization/o1"},
            {"reference": "#x"}, {"reference": "http://example.org/fhir/Observation/hiv/_history/1"}, {}, None,
            [], "DocumentReference/d1", [{"reference": "DocumentReference/d1"}], {"reference": 5},
        ]))
    return binary


@st.composite
def _resource(draw: Draw) -> JSON:
    """A leaf resource: a generated one of any type, a Binary with every kind of security
    context, an order naming its medication every way, or one with odd types and ids."""
    kind = draw(st.sampled_from(["typed", "binary", "order", "odd"]))
    if kind == "typed":
        resource: JSON = draw(st.sampled_from(ALL_TYPES).flatmap(resources))
    elif kind == "binary":
        resource = _odd_binary(draw)
    elif kind == "order":
        resource = {"resourceType": draw(st.sampled_from(sorted(references.MEDICATION_HOLDERS))),
                    "id": draw(st.sampled_from(["rx1", "rx2"])), "subject": {"reference": draw(st.sampled_from(PATIENTS))}}
        resource["medicationReference"] = draw(st.sampled_from([
            {"reference": "Medication/m1"}, {"reference": "#c1"}, {"reference": "http://example.org/fhir/Medication/m2"},
            {"display": "x"}, None, "Medication/m1",
        ]))
    else:
        resource = {"resourceType": draw(st.sampled_from(["Observation", "Medication", "Binary", 5, None])),
                    "id": draw(st.sampled_from(["r1", 7, None]))}
    if draw(st.integers(0, 4)) == 0:
        resource["contained"] = draw(st.sampled_from([
            {"resourceType": "Medication", "id": "c1"}, [{"resourceType": "Medication", "id": "c1"}, "x", 3],
            [_odd_binary(draw)], "x", None,
        ]))
    return resource


def _entries(kids: st.SearchStrategy[JSON]) -> st.SearchStrategy[list[object]]:
    return st.lists(st.one_of(
        kids.map(lambda r: {"resource": r}), st.just({"fullUrl": "urn:uuid:1"}), st.just("x"), st.just({"resource": "x"}),
    ), max_size=5)


def _containers(kids: st.SearchStrategy[JSON]) -> st.SearchStrategy[JSON]:
    bundle = _entries(kids).map(lambda entries: {"resourceType": "Bundle", "type": "searchset", "entry": entries})
    parameters = st.lists(st.one_of(
        kids.map(lambda r: {"name": "r", "resource": r}),
        st.lists(kids.map(lambda r: {"name": "p", "resource": r}), max_size=2).map(lambda parts: {"name": "x", "part": parts}),
        st.just("x"),
    ), max_size=4).map(lambda params: {"resourceType": "Parameters", "parameter": params})
    return st.one_of(bundle, parameters)


bodies = st.recursive(_resource(), _containers, max_leaves=10)


@_fast(300)
@given(bodies)
def test_the_walks_answer_as_the_first_versions(body: JSON) -> None:
    assert [id(r) for r in references.iter_resources(body)] == [id(r) for r in old_iter_resources(body)]
    found, expected = references.in_answer(body), old_in_answer(body)
    assert [(k, id(v)) for k, v in found.items()] == [(k, id(v)) for k, v in expected.items()]
    deciding, old = references.deciding_references(body, _THE_BASE), old_deciding_references(body)
    if old is None:
        assert deciding is None
    else:
        assert deciding is not None
        assert [(k, id(v)) for k, v in deciding.present.items()] == [(k, id(v)) for k, v in old[0].items()]
        assert (deciding.contexts, deciding.medications, deciding.unattached) == old[1:]
    raw = orjson.dumps(body)
    assert references.may_refer(raw) is old_may_refer(raw)


def test_the_bodies_reach_every_kind_of_reference() -> None:
    """Generated bodies name security contexts, medications and unattached Binaries, repeat a
    ``Type/id`` and nest containers: the property above compares them all."""
    cases: dict[str, Callable[[JSON], bool]] = {
        "context": lambda b: bool((old_deciding_references(b) or (0, ()))[1]),
        "medication": lambda b: bool((old_deciding_references(b) or (0, 0, ()))[2]),
        "unattached": lambda b: bool((old_deciding_references(b) or (0, 0, 0, ()))[3]),
        "a Type/id twice": lambda b: len(old_in_answer(b)) < sum(resource_reference(r) is not None for r in old_iter_resources(b)),
        "nested": lambda b: b"Parameters" in orjson.dumps(b) and b'"Bundle"' in orjson.dumps(b),
    }
    for name, condition in cases.items():
        assert find(bodies, condition, settings=_FIRST), name
