"""Search pages refilled in 404 mode: a page that lost matches to withholding is completed
from the upstream's further pages, so its size says nothing of what was hidden.

Semantics:

- The page size is the number of matches of the first upstream page. An entry is a match
  when its ``search.mode`` says so (any case or spacing), or when it has no readable mode and
  is no OperationOutcome; ``include`` and any other mode are includes; ``outcome`` entries
  (or an OperationOutcome without mode) are outcomes.
- ``PageWindow`` cuts one decided page to the kept matches a refilled answer takes from it
  (``skip`` kept matches left out first, at most ``take`` after them). Includes stay only
  when at least one match of the page stays (those of matches cut off may go, never those of
  a match sent); a further page's outcome entries go (the first page's stay).
- Only links under the upstream base, or a base the server writes for itself, are ever followed
  (``LinkRewriter.upstream_url``, by the test ``LinkRewriter.header`` rewrites by): a link to
  another host or base is never read.
- A link the upstream made after entries that were withheld may name them: a cursor of the
  page's last entry (``_cursor=<base64 of "Observation/<id>|<lastUpdated>">``, ``ct=<base64 JSON>``,
  ``_id:above=<id>``). ``names_any`` reads a link as a client could (percent-decoded, each query
  value also as base64 or base64url, JSON included) for the ids and times (``withheld_marks``:
  as written, and as epoch seconds and milliseconds) of the entries withheld; such a link is
  never handed out: the answer continues from an anchor instead, a page whose link names nothing
  withheld (the request itself, or a link that was safe) plus the kept matches sent from it on.
- The gateway's own continuation parameter (``SKIP_PARAM``) says how many kept matches of the
  page it names (and of the pages after it) were already sent. It counts only what the requester may see, so a value a
  client chooses can only skip its own visible records; anything but a whole number from 0 to
  ``SKIP_MAX``, or the parameter given twice, is a BadRequest.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl, unquote_plus, urlsplit

import msgspec
import orjson

from gateway.core.ds4p import NOTICE_EXTENSION, add_notice
from gateway.core.errors import BadRequest
from gateway.core.fhir import JSON

SKIP_PARAM = "gateway-skip"
SKIP_MAX = 10_000
_SKIP_VALUE = re.compile(r"[0-9]{1,5}")
MATCH, INCLUDE, OUTCOME = "match", "include", "outcome"
# Links that would point at pages cut otherwise than this one (CONTRACT §6).
_DROPPED_RELATIONS = frozenset({"previous", "prev"})


def read_skip(raw_query: str) -> tuple[str, int | None]:
    """``raw_query`` without ``SKIP_PARAM`` (any spelling of its name), and its value (None when
    absent). BadRequest for a value that is no whole number from 0 to ``SKIP_MAX`` or a
    parameter given twice."""
    kept: list[str] = []
    found: list[str] = []
    for item in raw_query.split("&"):
        name, _, value = item.partition("=")
        if unquote_plus(name) == SKIP_PARAM:
            found.append(unquote_plus(value))
        else:
            kept.append(item)
    if not found:
        return raw_query, None
    problem = f"The {SKIP_PARAM} parameter must be one whole number from 0 to {SKIP_MAX}."
    if len(found) > 1 or not _SKIP_VALUE.fullmatch(found[0]) or int(found[0]) > SKIP_MAX:
        raise BadRequest(problem)
    return "&".join(kept), int(found[0])


def with_skip(url: str, skip: int) -> str:
    """``url`` (a page the gateway answers) continued after ``skip`` of its kept matches."""
    if skip <= 0:
        return url
    joiner = "&" if "?" in url else "?"
    return f"{url}{joiner}{SKIP_PARAM}={skip}"


def entry_kind(entry: object) -> str:
    """``MATCH``, ``INCLUDE`` or ``OUTCOME`` for a parsed search-set entry (module docstring)."""
    if not isinstance(entry, dict):
        return INCLUDE
    search = entry.get("search")
    resource = entry.get("resource")
    return _kind(search.get("mode") if isinstance(search, dict) else None,
                 resource.get("resourceType") if isinstance(resource, dict) else None)


def _kind(mode: object, rtype: object) -> str:
    if isinstance(mode, str):
        mode = mode.strip().lower()
        return mode if mode in (MATCH, OUTCOME) else INCLUDE
    return OUTCOME if rtype == "OperationOutcome" else MATCH


@dataclass(slots=True)
class PageWindow:
    """The part of one decided page a refilled answer takes (module docstring); after ``trim``,
    ``matches`` is how many matches the page kept and ``taken`` how many of them stay."""

    skip: int = 0
    take: int | None = None
    further: bool = False   # a page after the first: decided for the refill only
    matches: int = 0
    taken: int = 0

    def trim(self, bundle: JSON) -> bool:
        """Cut ``bundle``'s kept entries to the window, in place; True when it changed."""
        entries = bundle.get("entry")
        if bundle.get("resourceType") != "Bundle" or not isinstance(entries, list):
            return False
        end = None if self.take is None else self.skip + self.take
        kept: list[object] = []
        kinds: list[str] = []
        matches = taken = 0
        for entry in entries:
            kind = entry_kind(entry)
            if kind == MATCH:
                if matches >= self.skip and (end is None or matches < end):
                    kept.append(entry)
                    kinds.append(kind)
                    taken += 1
                matches += 1
            elif kind == INCLUDE or not self.further:
                kept.append(entry)
                kinds.append(kind)
        if taken == 0:
            kept = [entry for entry, kind in zip(kept, kinds) if kind != INCLUDE]
        self.matches, self.taken = matches, taken
        if len(kept) == len(entries):
            return False
        if kept:
            bundle["entry"] = kept
        else:
            # A page that holds nothing has no entry list (FHIR JSON has no empty arrays).
            del bundle["entry"]
        return True


class _Resource(msgspec.Struct):
    resourceType: Any = None


class _Head(msgspec.Struct):
    """What tells an entry's kind, its other elements skipped."""

    search: Any = None
    resource: _Resource | None = None


class _Page(msgspec.Struct):
    resourceType: Any = None
    type: Any = None
    link: Any = None
    entry: list[_Head] | None = None


_PAGE = msgspec.json.Decoder(_Page)
_HEAD = msgspec.json.Decoder(_Head)
_FIELDS = msgspec.json.Decoder(dict[str, msgspec.Raw])
_ITEMS = msgspec.json.Decoder(list[msgspec.Raw])


@dataclass(frozen=True, slots=True)
class UpstreamPage:
    """One upstream search-set page as paging reads it: its matches, its ``next`` link, and
    whether it has a ``previous``/``prev`` link."""

    matches: int
    next: str | None
    previous: bool = False
    previous_urls: tuple[str, ...] = ()


def upstream_page(raw: bytes) -> UpstreamPage | None:
    """The paging facts of an upstream answer; None unless it is a search set one can read."""
    try:
        page = _PAGE.decode(raw)
    except msgspec.DecodeError:
        return None
    if page.resourceType != "Bundle" or page.type != "searchset":
        return None
    matches = sum(1 for head in page.entry or () if _head_kind(head) == MATCH)
    links = page.link if isinstance(page.link, list) else []
    previous = tuple(link.get("url") for link in links
                     if isinstance(link, dict) and link.get("relation") in _DROPPED_RELATIONS)
    return UpstreamPage(matches, next_link(links), bool(previous), tuple(u for u in previous if isinstance(u, str)))


def _head_kind(head: _Head) -> str:
    search = head.search
    return _kind(search.get("mode") if isinstance(search, dict) else None,
                 head.resource.resourceType if head.resource is not None else None)


def next_link(links: object) -> str | None:
    """The first ``next`` link's URL of a Bundle's ``link`` list."""
    for link in links if isinstance(links, list) else ():
        if isinstance(link, dict) and link.get("relation") == "next":
            url = link.get("url")
            return url if isinstance(url, str) and url else None
    return None


@dataclass(slots=True)
class AnswerParts:
    """A search-set answer the gateway made, as its texts: its top-level elements (entries
    apart) and each entry's text, kept byte for byte; ``entry_at``: how many top-level elements
    came before its entries (None: it had none), so a refilled answer keeps its order."""

    top: dict[str, msgspec.Raw]
    entries: list[msgspec.Raw]
    entry_at: int | None = None

    def matches(self) -> int:
        """How many of the entries are matches."""
        count = 0
        for text in self.entries:
            try:
                head = _HEAD.decode(text)
            except msgspec.DecodeError:
                head = _Head()
            if _head_kind(head) == MATCH:
                count += 1
        return count


def answer_parts(raw: bytes) -> AnswerParts | None:
    """``raw`` split into its elements and entry texts; None unless it is a search set."""
    try:
        top = _FIELDS.decode(raw)
        if _value(top.get("resourceType")) != "Bundle" or _value(top.get("type")) != "searchset":
            return None
        entry_at = list(top).index("entry") if "entry" in top else None
        entries = _ITEMS.decode(top.pop("entry")) if "entry" in top else []
    except (msgspec.DecodeError, orjson.JSONDecodeError):
        return None
    return AnswerParts(top, entries, entry_at)


def carries_notice(answer: AnswerParts) -> bool:
    """Whether the answer's Bundle carries the 42 CFR Part 2 redisclosure notice (core.ds4p)."""
    meta = answer.top.get("meta")
    return meta is not None and NOTICE_EXTENSION.encode() in bytes(meta)


def with_notice(answer: AnswerParts) -> None:
    """Put the redisclosure notice on the answer's Bundle, in place: a refilled answer holds
    Part 2 data that one of its further pages brought."""
    bundle = {"meta": _value(answer.top.get("meta"))} if "meta" in answer.top else {}
    if add_notice(bundle):
        answer.top["meta"] = msgspec.Raw(orjson.dumps(bundle["meta"]))


def without_previous(answer: AnswerParts) -> bytes:
    """``answer`` as it is but for its ``previous``/``prev`` links."""
    return refilled(answer, answer.entries, next_link(_value(answer.top.get("link"))))


class _Meta(msgspec.Struct):
    lastUpdated: Any = None


class _Marked(msgspec.Struct):
    resourceType: Any = None
    id: Any = None
    meta: _Meta | None = None


class _MarkedEntry(msgspec.Struct):
    resource: _Marked | None = None


class _MarkedPage(msgspec.Struct):
    entry: list[_MarkedEntry] | None = None


_MARKED_PAGE = msgspec.json.Decoder(_MarkedPage)
_MARKED_ENTRY = msgspec.json.Decoder(_MarkedEntry)


def _marks(resource: _Marked) -> tuple[str, ...]:
    """How a cursor may name a resource: its id, its ``meta.lastUpdated`` as written and as epoch
    seconds and milliseconds."""
    marks: list[str] = [resource.id] if isinstance(resource.id, str) and resource.id else []
    stamp = resource.meta.lastUpdated if resource.meta is not None else None
    if isinstance(stamp, str) and stamp:
        marks.append(stamp)
        try:
            moment = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
        except ValueError:
            moment = None
        if moment is not None and moment.tzinfo is not None:
            seconds = moment.timestamp()
            marks += [str(int(seconds)), str(int(seconds * 1000))]
    return tuple(marks)


def paging_relations(body: JSON) -> frozenset[str]:
    """The relations (lower case) of a Bundle's own links that go to other pages (``next``,
    ``previous``, ``prev``, in any case); empty for anything else."""
    links = body.get("link") if body.get("resourceType") == "Bundle" else None
    if type(links) is not list:
        return _NO_RELATIONS
    found = {rel for link in links if type(link) is dict and type(rel := link.get("relation")) is str}
    return frozenset(rel.strip().lower() for rel in found) & _PAGING if found else _NO_RELATIONS


_NO_RELATIONS: frozenset[str] = frozenset()
_PAGING = frozenset({"next", "previous", "prev"})


def withheld_marks(upstream_raw: bytes, sent: list[msgspec.Raw]) -> frozenset[str]:
    """The marks (``_marks``) of the entries of an upstream page that the answer made of it does
    not hold (``sent``: the answer's entry texts): what a link the upstream made may name."""
    try:
        page = _MARKED_PAGE.decode(upstream_raw)
    except msgspec.DecodeError:
        return frozenset()
    kept: set[tuple[object, object]] = set()
    for text in sent:
        try:
            entry = _MARKED_ENTRY.decode(text)
        except msgspec.DecodeError:
            continue
        if entry.resource is not None:
            kept.add((entry.resource.resourceType, entry.resource.id))
    marks: set[str] = set()
    for entry in page.entry or ():
        resource = entry.resource
        if resource is not None and (resource.resourceType, resource.id) not in kept:
            marks.update(_marks(resource))
    return frozenset(marks)


def _readings(url: str) -> list[str]:
    """A link as a client could read it: as written, percent-decoded, and each query value also
    decoded as base64 and base64url (a JSON cursor is read as its text)."""
    texts = [url, unquote_plus(url)]
    for _, value in parse_qsl(urlsplit(url).query, keep_blank_values=True):
        texts.append(value)
        padded = value.strip() + "=" * (-len(value.strip()) % 4)
        for decode in (base64.b64decode, base64.urlsafe_b64decode):
            try:
                text = decode(padded).decode("utf-8")
            except (binascii.Error, ValueError):
                continue
            texts += [text, unquote_plus(text)]
    return texts


def names_any(url: str, marks: frozenset[str] | set[str]) -> bool:
    """Whether the link ``url`` names any of ``marks`` in a reading a client could make of it."""
    if not marks:
        return False
    return any(mark in text for text in _readings(url) for mark in marks)


def outcomes_last(entries: list[msgspec.Raw]) -> list[msgspec.Raw]:
    """``entries`` with their outcome entries after every other (a page gathered from several
    upstream pages keeps the first page's "withheld" entry, at the end)."""
    kinds = []
    for text in entries:
        try:
            head = _HEAD.decode(text)
        except msgspec.DecodeError:
            head = _Head()
        kinds.append(_head_kind(head))
    return [e for e, k in zip(entries, kinds) if k != OUTCOME] + [e for e, k in zip(entries, kinds) if k == OUTCOME]


def _value(raw: msgspec.Raw | None) -> object:
    return None if raw is None else orjson.loads(memoryview(raw))


def refilled(first: AnswerParts, entries: list[msgspec.Raw], continuation: str | None, skip: int = 0) -> bytes:
    """The refilled answer: the first page's elements, ``entries`` (as written) in place of its
    own, and its links without ``previous``/``prev``, with ``next`` pointing at ``continuation``
    (none when None) and ``self`` saying the ``skip`` it was asked with."""
    parts: list[bytes] = [b"{"]

    def add(key: str, text: bytes) -> None:
        if len(parts) > 1:
            parts.append(b",")
        parts.append(orjson.dumps(key) + b":" + text)

    # SECURITY: the entries go where the first page had them (after its links when it had
    # none): an order of elements only a refilled page has would tell that it lost matches.
    placed = not entries
    for index, (key, value) in enumerate(first.top.items()):
        if not placed and index == first.entry_at:
            add("entry", b"[" + b",".join(bytes(e) for e in entries) + b"]")
            placed = True
        if key == "link":
            links = _links(_value(value), continuation, skip)
            if links:
                add(key, orjson.dumps(links))
            if not placed and first.entry_at is None:
                add("entry", b"[" + b",".join(bytes(e) for e in entries) + b"]")
                placed = True
        else:
            add(key, bytes(value))
    if not placed:
        add("entry", b"[" + b",".join(bytes(e) for e in entries) + b"]")
    parts.append(b"}")
    return b"".join(parts)


def _links(links: object, continuation: str | None, skip: int) -> list[object]:
    out: list[object] = []
    for link in links if isinstance(links, list) else ():
        relation = link.get("relation") if isinstance(link, dict) else None
        if relation in _DROPPED_RELATIONS or (relation == "next" and continuation is None):
            continue
        if relation == "next" and isinstance(link, dict):
            out.append({**link, "url": continuation})
            continuation = None
        elif relation == "self" and isinstance(link, dict) and isinstance(link.get("url"), str) and skip:
            out.append({**link, "url": with_skip(link["url"], skip)})
        else:
            out.append(link)
    if continuation is not None:
        out.append({"relation": "next", "url": continuation})
    return out
