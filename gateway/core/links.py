"""Rewriting upstream URLs to the gateway's public base, so paging stays behind the gateway."""

from __future__ import annotations

import re
from collections.abc import Iterable

import orjson

from gateway.core.fhir import normal_base


class LinkRewriter:
    """Replaces the upstream base with the public base in JSON bytes and header values.

    Works on serialized JSON: any string value that starts with the upstream base (a link,
    a fullUrl, a location, an absolute reference) is rewritten in one pass per pattern.
    ``also``: other bases the FHIR server writes for itself (``upstream.reference_bases``, its
    external name when the gateway reaches it by an internal one), rewritten alike: a ``next``
    link under them would send paging around the gateway.
    """

    __slots__ = ("upstream", "public", "_bases", "_pairs")

    def __init__(self, upstream_base: str, public_base: str, also: Iterable[str] = ()) -> None:
        self.upstream = upstream_base.rstrip("/")
        self.public = public_base.rstrip("/")
        # Each base as configured and in its normal spelling (as bases are compared), the
        # upstream's own first; none that is the public base (nothing to rewrite there).
        bases: list[str] = []
        for base in (upstream_base, *also):
            for spelling in (base.rstrip("/"), normal_base(base)):
                if spelling not in bases and spelling != self.public:
                    bases.append(spelling)
        # The longest first: a base inside another is rewritten as itself.
        self._bases = tuple(sorted(bases, key=len, reverse=True))
        pub = orjson.dumps(self.public)[:-1]
        self._pairs = tuple(
            (orjson.dumps(base)[:-1] + tail, pub + tail)  # '"http://h/fhir' with JSON escaping
            for base in self._bases for tail in (b"/", b'"', b"?")
        )

    def body(self, payload: bytes) -> bytes:
        """JSON bytes with every upstream-based string rewritten."""
        if not self._pairs:
            return payload
        # One byte first: a search for it runs at memory speed, a two-byte one does not.
        if b"\\" in payload and (b"\\u" in payload or b"\\/" in payload):
            # The base may be spelled with escapes (texts passed on as the upstream wrote them
            # keep them): written anew, plainly, when the text is one JSON value.
            try:
                payload = orjson.dumps(orjson.loads(payload))
            except orjson.JSONDecodeError:
                pass
        for old, new in self._pairs:
            if old in payload:
                payload = payload.replace(old, new)
        return payload

    def link_header(self, value: str) -> str:
        """An RFC 8288 ``Link`` header with each ``<url>`` rewritten like ``header``."""
        return re.sub(r"<([^>]*)>", lambda m: f"<{self.header(m.group(1))}>", value)

    def header(self, value: str) -> str:
        """A Location-style header value rewritten when it points at the upstream."""
        for base in self._bases:
            if under_base(value, base):
                return self.public + value[len(base):]
        return value

    def upstream_url(self, url: str) -> str | None:
        """``url`` as the gateway reaches it when it names something of the FHIR server (under
        the upstream base or one of the other bases it writes for itself); None otherwise (another
        host or base, never read)."""
        for base in self._bases:
            if under_base(url, base):
                return self.upstream + url[len(base):]
        return None


def under_base(url: str, base: str) -> bool:
    """Whether ``url`` names something of the FHIR server at ``base`` (never another host or base)."""
    base = base.rstrip("/")
    return url == base or url.startswith((base + "/", base + "?"))


_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_QUOTED = r'"(?:[^"\\]|\\.)*"'
# One RFC 8288 link-value and the comma (or end) after it.
_LINK_VALUE = re.compile(
    rf"\s*<[^>]*>((?:\s*;\s*{_TOKEN}\s*(?:=\s*(?:{_QUOTED}|[^\s,;\"]+))?)*)\s*(?:,|$)"
)
_LINK_PARAM = re.compile(rf";\s*({_TOKEN})\s*(?:=\s*({_QUOTED}|[^\s,;\"]+))?")


def _links_of(value: str) -> list[tuple[str, list[str]]] | None:
    """Each link-value of an RFC 8288 ``Link`` header value (as written, with the comma after
    it) and its relations in lower case; None when the value cannot be read link by link."""
    links: list[tuple[str, list[str]]] = []
    pos = 0
    while pos < len(value):
        found = _LINK_VALUE.match(value, pos)
        if found is None or found.end() == pos:
            return None
        rels: list[str] = []
        for param in _LINK_PARAM.finditer(found.group(1)):
            if param.group(1).lower() == "rel":
                rels.extend((param.group(2) or "").strip('"').lower().split())
        links.append((found.group(0), rels))
        pos = found.end()
    return links


def without_last_links(value: str) -> str | None:
    """An RFC 8288 ``Link`` header value without its ``rel="last"`` links (the last page's
    offset counts the matches, like ``Bundle.total``); None when the value cannot be read
    link by link (then it may hold one anywhere)."""
    links = _links_of(value)
    if links is None:
        return None
    return ", ".join(text.strip().rstrip(",").rstrip() for text, rels in links if "last" not in rels)


# The relations of a search's pages (R4 Bundle.link, RFC 8288 and RFC 5005).
PAGING_RELATIONS = frozenset({"self", "first", "previous", "prev", "next", "last"})


def paging_links(value: str) -> str | None:
    """An RFC 8288 ``Link`` header value with its paging links alone, each written anew as
    ``<url>; rel="..."``; None when none is left or the value cannot be read link by link.

    SECURITY: another relation (``related``, ``item``, a server's own) or another parameter
    (``title``, ``anchor``) can name any record, hidden ones too; a paging link names only the
    search's own pages, as Bundle.link does."""
    links = _links_of(value)
    if links is None:
        return None
    kept = [f'<{text[text.index("<") + 1:text.index(">")]}>; rel="{" ".join(rels)}"'
            for text, rels in links if rels and PAGING_RELATIONS.issuperset(rels)]
    return ", ".join(kept) or None
