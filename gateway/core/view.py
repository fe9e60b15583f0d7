"""Reading an answer once and sending back the upstream's own bytes of what is kept.

Two readings, both keeping each search-set entry's bytes beside what is decided:

- ``spans_of``: the answer parsed whole (orjson, repeated keys checked over the whole text),
  with every entry's byte span (``msgspec.Raw``): the reading for answers under
  ``upstream.views_above_bytes``, where the C parse is faster than anything per element;
- ``read_answer``: views. Each resource's top-level elements are located without being
  parsed; only those its type's field plan names are parsed (``view_elements``: what the
  labeler, the compartment, the consent conditions, the scopes and the reference resolution
  read), element texts written alike are parsed once and shared, and each entry is checked
  whole for repeated keys and let go. Memory stays near the answer's size.

The decision pipeline runs over either exactly as over whole resources, and ``splice`` (or
``pieces``, to send without joining) puts the answer back together from the upstream's bytes
of every kept entry, so a kept ``4.10`` stays ``4.10`` and an unfiltered answer goes out byte
for byte; only entries changed in place are written anew.

What views cannot vouch for takes the whole-resource path:

- a text that is not compact at the levels a view locates, or names a key twice anywhere in an
  entry (the whole-resource path then refuses it, 502);
- Bundles other than search sets, Parameters, OperationOutcomes, documents, included
  resources (their orphan check reads every reference of every kept resource);
- Bundles, Parameters, Compositions and Binaries inside a search set are parsed whole, one
  entry at a time, and re-serialized when kept;
- consents whose ``code`` or ``data`` conditions read codes or references anywhere in a
  resource (``ViewsInsufficient``, raised by the judge before anything is decided).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import msgspec
import orjson

from gateway.core import native
from gateway.core.compartment import deciding_elements, is_patient_data
from gateway.core.enforce import may_be_included
from gateway.core.fhir import NO_BASES, Bases, JSON
from gateway.core.labels import label_elements, may_extend
from gateway.core.references import scrub_narrative_read
from gateway.core.strict_json import DuplicateKey, has_duplicate_keys

_FIELDS = msgspec.json.Decoder(dict[str, msgspec.Raw])
_ITEMS = msgspec.json.Decoder(list[msgspec.Raw])


class _Entries(msgspec.Struct):
    """A Bundle's entries as their texts (every other element skipped)."""

    entry: list[msgspec.Raw] = []


_ENTRIES = msgspec.json.Decoder(_Entries)

# Entry resources read whole: they hold resources (Bundle, Parameters), are rewritten by
# enforcement (a document's Composition, the server's OperationOutcome) or decided through what
# they point at (Binary).
WHOLE_TYPES = frozenset({"Bundle", "Parameters", "Composition", "Binary", "OperationOutcome"})
# Answers the whole-resource path handles: they are rewritten, never filtered.
_NOT_VIEWED = frozenset({"OperationOutcome", "Parameters", "Composition", "Binary"})
# Elements every view holds: what reference resolution and the scopes read.
_ALWAYS = frozenset({"resourceType", "id", "meta", "category", "contained", "medicationReference",
                     "securityContext", "extension", "modifierExtension"})


class ViewsInsufficient(Exception):
    """The consents read elements a view does not hold: decide on whole resources."""


class _Unviewable(Exception):
    """The text cannot be vouched for at the levels a view reads."""


@lru_cache(maxsize=512)
def view_elements(rtype: str) -> frozenset[str]:
    """The top-level elements a view of a resource of this type holds: every element the
    decision pipeline reads of it (its field plan)."""
    return label_elements(rtype) | deciding_elements(rtype) | _ALWAYS


@lru_cache(maxsize=4096)
def _key_text(key: str) -> bytes:
    return msgspec.json.encode(key) + b":"


def _fields(raw: msgspec.Raw | bytes) -> dict[str, msgspec.Raw]:
    """The top-level elements of a JSON object, unparsed; only when the object's own text is
    compact and names each key once (its compact re-encoding, computed from the lengths, is
    exactly as long: a repeated key or any whitespace makes the text longer)."""
    try:
        found = _FIELDS.decode(raw)
    except msgspec.DecodeError:
        raise _Unviewable from None
    expected = 1 + max(len(found), 1) + sum(len(_key_text(k)) + len(v) for k, v in found.items())
    if expected != len(raw):
        raise _Unviewable
    return found


# Parsed elements by their exact text, shared by every resource that writes them the same
# way (a patient's subject, a lab's code and category): parsed and checked once. Shared values
# are never changed in place; the elements that are (``meta``, by DS4P labelling) or that are
# large and unique (``contained``) are parsed afresh for each resource.
_ELEMENTS: dict[bytes, tuple[bytes, Any]] = {}
_ELEMENTS_MAX = 16_384
_SHARED_MAX_BYTES = 2_048
_FRESH = frozenset({"meta", "contained"})
# What of ``meta`` decides: profiles (consent class) and security labels. A meta without
# either (versionId, lastUpdated, tags) stays out of the view.
_DECIDING_META = (b'"profile"', b'"security"')


def _element(raw: msgspec.Raw, fresh: bool = False, checked: bool = False) -> tuple[bytes, Any]:
    """One element's text and value (shared unless ``fresh``); a key given twice anywhere in it
    makes the answer unviewable (``checked``: the text around it was checked already)."""
    text = bytes(raw)
    if text[:1] not in (b"{", b"["):
        try:
            return text, orjson.loads(text)
        except orjson.JSONDecodeError:
            raise _Unviewable from None
    if not fresh:
        found = _ELEMENTS.get(text)
        if found is not None:
            return found
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise _Unviewable from None
    if not checked and has_duplicate_keys(text, value):
        raise _Unviewable
    if not fresh and len(text) <= _SHARED_MAX_BYTES:
        if len(_ELEMENTS) >= _ELEMENTS_MAX:
            _ELEMENTS.clear()
        _ELEMENTS[text] = (text, value)
    return text, value


def _parsed(fields: dict[str, msgspec.Raw], skip: str = "", fresh: bool = False, checked: bool = False) -> JSON:
    """Every element of ``fields`` but ``skip``, parsed; each afresh with ``fresh`` (a whole
    resource or Bundle, which enforcement may change)."""
    return {key: _element(value, fresh or key in _FRESH, checked)[1] for key, value in fields.items() if key != skip}


def _check_whole(raw: msgspec.Raw | bytes) -> None:
    """A key given twice anywhere in the text, read or not, makes it unviewable (the whole
    path then refuses the answer, as for any other): parsed once, then let go."""
    text = bytes(raw)
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise _Unviewable from None
    if has_duplicate_keys(text, value):
        raise _Unviewable


LabelKey = tuple[str | bytes, ...]


def _view(
    fields: dict[str, msgspec.Raw], rtype: str, checked: bool = True, extended: bool = False,
) -> tuple[JSON, LabelKey | None]:
    """The view of one resource, and what its labels depend on as text (the exact text of each
    label-bearing element; None when its own meta.security or contained resources label it).
    ``extended``: the answer may hold extensions (``labels.may_extend``); then an element off the
    plan whose text may (a note, a body site) is held too, and labels it (``stray_labels``)."""
    plan, labelled = view_elements(rtype), label_elements(rtype)
    view: JSON = {}
    key: list[str | bytes] | None = [rtype]
    for name, raw in fields.items():
        if name not in plan:
            if extended and may_extend(bytes(raw)):
                text, view[name] = _element(raw, False, checked)
                if key is not None:
                    key.append(name)
                    key.append(text)
            continue
        if name == "meta":
            meta = bytes(raw)
            escaped = b"\\u" in meta  # a \u escape can spell either key
            if not escaped and not any(part in meta for part in _DECIDING_META):
                continue
            if escaped or b'"security"' in meta:
                key = None
        elif name == "contained":
            key = None
        text, view[name] = _element(raw, name in _FRESH, checked)
        if key is not None and name in labelled and name != "meta":
            key.append(name)
            key.append(text)
    return view, tuple(key) if key is not None else None


def _string(raw: msgspec.Raw | None) -> str | None:
    if raw is None:
        return None
    try:
        value = orjson.loads(memoryview(raw))
    except orjson.JSONDecodeError:
        raise _Unviewable from None
    return value if isinstance(value, str) else None


@dataclass(slots=True)
class AnswerView:
    """An answer read once. ``body`` is what the pipeline decides and filters in place (a
    Bundle of entry views, or one resource's view); ``splice`` gives the bytes to send."""

    raw: bytes
    body: JSON
    partial: bool = True         # resources are views (else parsed whole)
    # By id of each decided entry dict: its upstream bytes; for viewed resources, the resource's
    # bytes; and the entries enforcement may change untold (always re-serialized).
    spans: dict[int, msgspec.Raw] = field(default_factory=dict)
    resource_spans: dict[int, msgspec.Raw] = field(default_factory=dict)
    rewritten: set[int] = field(default_factory=set)
    label_keys: dict[int, LabelKey] = field(default_factory=dict)  # by id of the view
    # Parsed whole: by id of each entry's resource, the exact text of its entry, which fixes
    # everything about it; what is computed from a resource alone (its labels, its patients)
    # is remembered under it across requests (``content_keys``).
    content_keys: dict[int, bytes] = field(default_factory=dict)
    touched: set[int] = field(default_factory=set)  # ids of viewed resources changed in place
    extended: bool = True  # the answer may hold extensions (labels.may_extend)

    @property
    def is_bundle(self) -> bool:
        return self.body.get("resourceType") == "Bundle"

    def splice(self, entry_bytes: Callable[[bytes], bytes] | None = None) -> bytes:
        """The answer after filtering: kept entries as the upstream wrote them (or, for the
        few changed in place or parsed whole, re-serialized); ``entry_bytes`` may rewrite each
        kept entry's text (display scrubbing)."""
        return b"".join(self.pieces(entry_bytes))

    def pieces(self, entry_bytes: Callable[[bytes], bytes] | None = None) -> list[bytes | msgspec.Raw]:
        """``splice`` in pieces (the upstream's own bytes where kept as written), to be sent one
        after the other without joining them.

        Consumes the view: the decided entries are let go before the answer is put together,
        so the views and the answer are never in memory at once."""
        if not self.is_bundle:
            if id(self.body) not in self.touched:
                text = self.raw
            else:
                text = orjson.dumps(_merged(self.raw, self.body) if self.partial else self.body)
            return [entry_bytes(text) if entry_bytes is not None else text]
        pieces: list[bytes | msgspec.Raw] = [b"{"]
        at: list[int] = []  # where the entries' texts are
        for key, value in self.body.items():
            if len(pieces) > 1:
                pieces.append(b",")
            if key == "entry" and isinstance(value, list):
                pieces.append(b'"entry":[')
                for text in self._entry_texts(value):
                    if pieces[-1] != b'"entry":[':
                        pieces.append(b",")
                    at.append(len(pieces))
                    pieces.append(text)
                pieces.append(b"]")
            else:
                pieces.append(orjson.dumps(key) + b":" + orjson.dumps(value))
        pieces.append(b"}")
        entries = self.body.get("entry")
        if isinstance(entries, list):
            entries.clear()
        self.spans.clear()
        self.resource_spans.clear()
        self.label_keys.clear()
        self.content_keys.clear()
        if entry_bytes is not None:
            for index in at:
                text = bytes(pieces[index])
                rewritten = entry_bytes(text)
                if rewritten is not text:
                    pieces[index] = rewritten
        return pieces

    def _entry_texts(self, entries: Iterable[object]) -> Iterable[bytes | msgspec.Raw]:
        spans, touched = self.spans, self.touched
        for entry in entries:
            key = id(entry)
            span = spans.get(key)
            resource = entry.get("resource") if isinstance(entry, dict) else None
            if span is None or key in self.rewritten:
                yield orjson.dumps(entry)
            elif resource is None or id(resource) not in touched:
                yield span
            elif key in self.resource_spans and isinstance(entry, dict):
                yield orjson.dumps({**entry, "resource": _merged(self.resource_spans[key], resource)})
            else:
                yield orjson.dumps(entry)


def scrub_narratives(
    answer: AnswerView, released: frozenset[str], ours: Bases = NO_BASES,
    owners: Mapping[int, frozenset[str]] | None = None,
) -> bool | None:
    """Remove the narrative of each kept resource of an answer parsed whole that refers to patient
    data ``released`` does not hold (``references.scrub_narrative``), deciding each from its
    entry's upstream text; the resources changed are re-serialized (``touched``). True if any
    was; None when an entry whose text holds a ``<`` cannot be read this way (no text of its own,
    or it holds resources): then every kept text is read again (``references.scrub_displays``).
    ``owners``: each resource's patients as enforcement found them (``enforce.owners_index``, by
    object identity, read under the same ``ours``), so they are not read again."""
    if answer.partial:
        return None
    memo: dict[bytes, bool] = {}
    if not answer.is_bundle:
        patients = owners.get(id(answer.body)) if owners else None
        if scrub_narrative_read(answer.body, answer.raw, released, ours, memo, patients):
            answer.touched.add(id(answer.body))
            return True
        return False
    changed = False
    for entry in answer.body.get("entry") or ():
        if id(entry) in answer.rewritten:
            return None  # it holds resources (a Bundle, Parameters) or is read through others
        span = answer.spans.get(id(entry))
        # An entry without upstream text is the gateway's own (a suppressed-entries outcome).
        text = bytes(span) if span is not None else orjson.dumps(entry)
        if b"<" not in text:
            continue
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if type(resource) is not dict:
            return None
        patients = owners.get(id(resource)) if owners else None
        if scrub_narrative_read(resource, text, released, ours, memo, patients):
            answer.touched.add(id(resource))
            changed = True
    return changed


def _merged(raw: msgspec.Raw | bytes, view: JSON) -> JSON:
    """The whole resource with the elements of its view (changed in place) put back; ``meta``
    (which a view may lack, or hold only since labelling added it) is merged key by key."""
    whole: JSON = orjson.loads(memoryview(raw))
    plan = view_elements(str(whole.get("resourceType")))
    for key in [k for k in whole if k in plan and k not in view and k != "meta"]:
        del whole[key]
    for key, value in view.items():
        if key == "meta" and isinstance(value, dict) and isinstance(whole.get("meta"), dict):
            whole["meta"].update(value)
        else:
            whole[key] = value
    return whole


def read_answer(raw: bytes) -> AnswerView | None:
    """A view of the upstream answer ``raw``, or None when it takes the whole-resource path."""
    try:
        top = _fields(raw)
        rtype = _string(top.get("resourceType"))
        if not rtype or rtype in _NOT_VIEWED:
            return None
        extended = may_extend(raw)
        if rtype != "Bundle":
            _check_whole(raw)
            view, key = _view(top, rtype, extended=extended)
            answer = AnswerView(raw, view, extended=extended)
            if key is not None:
                answer.label_keys[id(view)] = key
            return answer
        return _bundle(raw, top, extended)
    except _Unviewable:
        return None


def _bundle(raw: bytes, top: dict[str, msgspec.Raw], extended: bool) -> AnswerView | None:
    body = _parsed(top, skip="entry", fresh=True)
    if body.get("type") != "searchset":
        return None
    answer = AnswerView(raw, body, extended=extended)
    entries_raw = top.get("entry")
    if entries_raw is None:
        return answer
    try:
        items = _ITEMS.decode(entries_raw)
    except msgspec.DecodeError:
        return None
    if 1 + max(len(items), 1) + sum(len(i) for i in items) != len(entries_raw):
        return None  # whitespace between entries: vouch for nothing
    decided: list[object] = []
    for item in items:
        entry, resource_raw, whole = _entry(item, answer.label_keys, extended)
        if entry is None:
            return None
        key = id(entry)
        answer.spans[key] = item
        if whole:
            answer.rewritten.add(key)
        elif resource_raw is not None:
            answer.resource_spans[key] = resource_raw
        decided.append(entry)
    # The entries keep their place among the Bundle's elements.
    answer.body = {key: (decided if key == "entry" else body[key]) for key in top if key == "entry" or key in body}
    return answer


def _entry(
    item: msgspec.Raw, keys: dict[int, LabelKey], extended: bool = True,
) -> tuple[JSON | None, msgspec.Raw | None, bool]:
    fields = _fields(item)
    _check_whole(item)
    entry = _parsed(fields, skip="resource", checked=True)
    search = entry.get("search")
    if isinstance(search, dict) and search.get("mode", "match") not in ("match", "outcome"):
        return None, None, False  # an included resource: the orphan check reads whole resources
    resource_raw = fields.get("resource")
    whole = False
    if resource_raw is not None:
        inner = _fields(resource_raw)
        rtype = _string(inner.get("resourceType"))
        if may_be_included(entry) and (rtype is None or not is_patient_data(rtype)):
            return None, None, False  # no readable mode: it may be an included one
        if rtype is None or rtype in WHOLE_TYPES:
            entry["resource"] = _parsed(inner, fresh=True, checked=True)
            whole = True
        else:
            entry["resource"], key = _view(inner, rtype, extended=extended)
            if key is not None:
                resource = entry["resource"]
                keys[id(resource)] = key
    return entry, resource_raw, whole


def spans_of(raw: bytes, body: JSON) -> AnswerView | None:
    """An answer parsed whole (``body``, from ``raw``, checked for repeated keys), with each
    search-set entry's upstream bytes beside it, so kept entries go out as written; None when
    it cannot be spliced (then it is re-serialized)."""
    rtype = body.get("resourceType")
    if not isinstance(rtype, str) or rtype in _NOT_VIEWED:
        return None
    extended = may_extend(raw)
    if rtype != "Bundle":
        return AnswerView(raw, body, partial=False, extended=extended)
    entries = body.get("entry")
    if body.get("type") != "searchset" or not isinstance(entries, list):
        return None
    answer = AnswerView(raw, body, partial=False, extended=extended)
    if type(entries) is list:
        indexed = native.index_entries(raw, entries, msgspec.Raw, WHOLE_TYPES, _CONTENT_KEY_MAX_BYTES,
                                       answer.spans, answer.rewritten, answer.content_keys)
        if indexed is not None:
            return answer if indexed == native.INDEXED else None
    return python_spans_of(raw, body, answer)


def checked_spans_of(raw: bytes, body: JSON) -> AnswerView | None:
    """``spans_of`` for an answer not yet checked for repeated keys: raises ``DuplicateKey``
    when ``raw`` names a key twice (``strict_json.has_duplicate_keys``). With the C reader, a
    search set's check and the reading of its entries' spans are one pass over ``raw``."""
    entries = body.get("entry")
    if (type(entries) is list and body.get("resourceType") == "Bundle" and body.get("type") == "searchset"
            and native.ENABLED):
        answer = AnswerView(raw, body, partial=False, extended=may_extend(raw))
        indexed = native.index_entries(raw, entries, msgspec.Raw, WHOLE_TYPES, _CONTENT_KEY_MAX_BYTES,
                                       answer.spans, answer.rewritten, answer.content_keys, check=True)
        if indexed == native.REPEATED:
            raise DuplicateKey("duplicate key")
        if indexed is not None:
            return answer if indexed == native.INDEXED else None
    if has_duplicate_keys(raw, body):
        raise DuplicateKey("duplicate key")
    return spans_of(raw, body)


def python_spans_of(raw: bytes, body: JSON, answer: AnswerView) -> AnswerView | None:
    """``spans_of``'s indexing of a search set's entries in Python alone (msgspec reads the
    spans): the reference the C reader is held to."""
    entries = body["entry"]
    try:
        items = _ENTRIES.decode(raw).entry
    except msgspec.DecodeError:
        return None
    if len(items) != len(entries):
        return None
    spans, rewritten, content = answer.spans, answer.rewritten, answer.content_keys
    for item, entry in zip(items, entries):
        if type(entry) is not dict:
            return None
        key = id(entry)
        spans[key] = item
        resource = entry.get("resource")
        if type(resource) is dict:
            rtype = resource.get("resourceType")
            if type(rtype) is str and rtype in WHOLE_TYPES:
                rewritten.add(key)
            elif len(item) <= _CONTENT_KEY_MAX_BYTES:
                content[id(resource)] = bytes(item)
    return answer


# Entries larger than this (an inline document) are not remembered by their text.
_CONTENT_KEY_MAX_BYTES = 4_096
