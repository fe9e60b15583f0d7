"""Sealed paging links (CONTRACT §6): a client pages through the gateway by tokens, never by
the FHIR server's own paging parameters.

Out: in enforce mode, the links of a search set or history Bundle the gateway answers (at the
top, or as a batch slot's resource) are written anew once everything else is decided (which
link goes out, ``web.refill`` and ``core.paging.names_any``, is decided before): ``self`` is
the URL the client asked, every other relation is ``<public base>/?gateway-page=<token>``,
the token sealing the gateway's link relative to its public base (``gateway.sealing``); a
link under another base goes. The server's ``Link`` header goes.

SECURITY: an offset (``_offset=13`` after ten visible matches), a page number, a row number
or a server's cursor counts or names what the answer withheld; a token says nothing, and its
length is padded.

In: a request whose query names ``gateway-page`` (in any spelling) is the request of the link
the token seals, read as if it had been asked (route, every check, the requester asking now:
a token carries no authority, only a place). A token that does not open, a path other than the
base, another parameter beside it, a method other than GET or HEAD, or the parameter in a form
body is a 400 (``PagingLinkInvalid``) and nothing is sent.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Protocol
from urllib.parse import unquote_plus

import msgspec
import orjson
from aiohttp import web

from gateway.core.errors import PagingLinkInvalid
from gateway.core.links import under_base
from gateway.sealing import PageSeal

PAGE_PARAM = "gateway-page"
# Bundles whose links go to the pages of one search (or history).
_PAGED = frozenset({"searchset", "history"})
_SLOTTED = frozenset({"batch-response", "transaction-response"})
# A registered link relation's syntax (RFC 8288 reg-rel-type).
_RELATION = re.compile(r"[a-z][a-z0-9.\-]{0,63}")
_FIELDS = msgspec.json.Decoder(dict[str, msgspec.Raw])
_ITEMS = msgspec.json.Decoder(list[msgspec.Raw])


def names_page(pairs: list[tuple[str, str]]) -> bool:
    """Whether decoded query or form ``pairs`` name the gateway's page parameter."""
    return any(name.strip().lower() == PAGE_PARAM for name, _ in pairs)


def page_token(raw_query: str) -> str | None:
    """The token of a query that names ``PAGE_PARAM`` (any case, any percent-encoding); None
    when it does not. PagingLinkInvalid when it names it with anything else, or twice."""
    if "page" not in raw_query.lower() and "%" not in raw_query:
        return None
    items = raw_query.split("&")
    named = [item for item in items if unquote_plus(item.partition("=")[0]).strip().lower() == PAGE_PARAM]
    if not named:
        return None
    if len(items) != 1:
        raise PagingLinkInvalid()
    return unquote_plus(named[0].partition("=")[2])


def opened(pages: PageSeal, token: str, public: str, method: str, at_base: bool) -> tuple[str, str]:
    """(path, raw query) of the link ``token`` seals, relative to the public base ``public``:
    the path is empty or starts with ``/``. PagingLinkInvalid when it does not open here."""
    if method not in ("GET", "HEAD") or not at_base:
        raise PagingLinkInvalid()
    relative = pages.open(token, public.rstrip("/"))
    if relative is None or not (relative == "" or relative.startswith(("/", "?"))):
        raise PagingLinkInvalid()
    path, _, query = relative.partition("#")[0].partition("?")
    if page_token(query) is not None:
        raise PagingLinkInvalid()  # never a token inside a token
    return path, query


def sealed_link(public: str, token: str) -> str:
    """The URL a client follows: the public base itself, the token its only parameter."""
    return f"{public}/?{PAGE_PARAM}={token}"


class Sealer:
    """Writes an answer's paging links anew for one request (module docstring)."""

    __slots__ = ("pages", "public")

    def __init__(self, pages: PageSeal, public: str) -> None:
        self.pages = pages
        self.public = public.rstrip("/")

    def sealed(self, url: str) -> str | None:
        """The gateway's sealed link for ``url``; None when it is not under the public base."""
        if not under_base(url, self.public):
            return None
        return sealed_link(self.public, self.pages.seal(url[len(self.public):], self.public))

    def links(self, links: object, asked: str | None, rewrite: Callable[[str], str] | None = None) -> list[dict[str, str]]:
        """A Bundle's ``link`` list written anew: ``self`` is ``asked`` (none when None), every
        other relation sealed; a link under another base, or not a relation name (in lower
        case) and a URL, goes.
        ``rewrite``: the links are not yet under the public base (LinkRewriter.header)."""
        out: list[dict[str, str]] = []
        for link in links if isinstance(links, list) else ():
            relation = link.get("relation") if isinstance(link, dict) else None
            url = link.get("url") if isinstance(link, dict) else None
            if not isinstance(relation, str) or not isinstance(url, str):
                continue
            relation = relation.strip().lower()
            if not _RELATION.fullmatch(relation):
                continue  # SECURITY: a relation is a name (RFC 8288), never a text that could name a record
            if relation == "self":
                written = asked
            else:
                written = self.sealed(rewrite(url) if rewrite is not None else url)
            if written is not None:
                out.append({"relation": relation, "url": written})
        return out


class Pieces(Protocol):
    """An answer sent in pieces (``proxy.SplicedPayload``), its top-level elements each one."""

    def element(self, name: str) -> object: ...

    def replace_element(self, name: str, text: bytes | None) -> None: ...


def seal_response(
    response: web.StreamResponse, sealer: Sealer, asked: str, slots: Mapping[int, str] | None = None,
    pieces: Pieces | None = None, rewrite: Callable[[str], str] | None = None,
) -> None:
    """Seal the paging links of a 2xx answer in place: its Bundle's (``asked``: the URL the
    client asked, its ``self``) or its batch slots' (``slots``: each entry's URL as the client
    wrote it, by index); its ``Link`` header goes. ``pieces``:
    the answer's body when it is sent in pieces, not yet rewritten (``rewrite``)."""
    if not isinstance(response, web.Response) or not 200 <= response.status < 300:
        return
    body = response.body
    if pieces is not None:
        _sealed_pieces(pieces, sealer, asked, rewrite)
    elif isinstance(body, (bytes, bytearray)) and body:
        sealed = _sealed_answer(bytes(body), sealer, asked, slots or {})
        if sealed is not None:
            response.body = sealed[0]
    # The server's Link header names its own offsets or cursors; the Bundle's links are not
    # repeated there: three sealed links make a header of about 3.5 KB, near what proxies in
    # front of the gateway take by default (nginx: 4 or 8 KB of response headers), and FHIR
    # clients page by Bundle.link.
    response.headers.popall("Link", None)


def _top_level(text: bytes) -> dict[str, msgspec.Raw] | None:
    """The top-level elements of a JSON object text that may hold a ``link`` (keys as written, or
    \\u-escaped); None when it cannot (or is no object)."""
    if b'"link"' not in text and b"\\u" not in text:
        return None
    try:
        return _FIELDS.decode(text)
    except msgspec.DecodeError:
        return None


def _sealed_answer(
    raw: bytes, sealer: Sealer, asked: str | None, slots: Mapping[int, str],
) -> tuple[bytes, bool] | None:
    """The answer ``raw`` with its links sealed, and whether it is a paged Bundle (its own links
    sealed, not only its slots'); None when nothing in it is a paging link."""
    top = _top_level(raw)
    if top is None:
        return None
    if _text(top.get("resourceType")) != "Bundle":
        return None
    kind = _text(top.get("type"))
    if kind in _PAGED:
        if "link" not in top:
            return None
        links = sealer.links(orjson.loads(memoryview(top["link"])), asked)
        if links:
            top["link"] = msgspec.Raw(orjson.dumps(links))
        else:
            del top["link"]
        return _joined(top), True
    if kind in _SLOTTED and "entry" in top and asked is not None:
        try:
            entries = _ITEMS.decode(top["entry"])
        except msgspec.DecodeError:
            return None
        changed = False
        for index, text in enumerate(entries):
            slot = _sealed_slot(bytes(text), sealer, slots.get(index))
            if slot is not None:
                entries[index] = msgspec.Raw(slot)
                changed = True
        if not changed:
            return None
        top["entry"] = msgspec.Raw(b"[" + b",".join(bytes(e) for e in entries) + b"]")
        return _joined(top), False
    return None


def _sealed_slot(text: bytes, sealer: Sealer, asked: str | None) -> bytes | None:
    """A batch slot whose resource is a paged Bundle, its links sealed (``self``: the entry's
    URL as the client wrote it, under the public base); None when it has none."""
    slot = _top_level(text)
    if slot is None:
        return None
    resource = slot.get("resource")
    if resource is None:
        return None
    sealed = _sealed_answer(bytes(resource), sealer, _asked_in_batch(sealer.public, asked), {})
    if sealed is None or not sealed[1]:
        return None
    slot["resource"] = msgspec.Raw(sealed[0])
    return _joined(slot)


def _asked_in_batch(public: str, url: str | None) -> str | None:
    """An entry's ``request.url`` as a URL under the public base (None: another base, or none)."""
    if url is None:
        return None
    if "://" in url.partition("?")[0]:  # an absolute URL, not a relative one with a URL in its query
        return url if under_base(url, public) else None
    path, _, query = url.partition("?")
    try:
        token = page_token(query) if query and path in ("", "/") else None
    except PagingLinkInvalid:
        return None
    if token is not None:
        return sealed_link(public, token)  # as it was handed out
    return public + (url if url.startswith("?") else "/" + url.lstrip("/"))


def _sealed_pieces(
    pieces: Pieces, sealer: Sealer, asked: str, rewrite: Callable[[str], str] | None,
) -> None:
    """A spliced answer's top-level ``link`` element written anew, when it is a paged Bundle's."""
    links = pieces.element("link")
    if pieces.element("resourceType") != "Bundle" or pieces.element("type") not in _PAGED or links is None:
        return
    written = sealer.links(links, asked, rewrite)
    pieces.replace_element("link", orjson.dumps(written) if written else None)


def _text(raw: msgspec.Raw | None) -> str | None:
    if raw is None:
        return None
    try:
        value = orjson.loads(memoryview(raw))
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, str) else None


def _joined(fields: dict[str, msgspec.Raw]) -> bytes:
    return b"{" + b",".join(orjson.dumps(key) + b":" + bytes(value) for key, value in fields.items()) + b"}"
