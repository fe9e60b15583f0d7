"""Rewriting upstream URLs to the gateway's public base, so paging stays behind the gateway."""

from __future__ import annotations

import re

import orjson


class LinkRewriter:
    """Replaces the upstream base with the public base in JSON bytes and header values.

    Works on serialized JSON: any string value that starts with the upstream base (a link,
    a fullUrl, a location, an absolute reference) is rewritten in one pass per pattern.
    """

    __slots__ = ("upstream", "public", "_pairs")

    def __init__(self, upstream_base: str, public_base: str) -> None:
        self.upstream = upstream_base.rstrip("/")
        self.public = public_base.rstrip("/")
        up = orjson.dumps(self.upstream)[:-1]  # '"http://h/fhir' with JSON escaping
        pub = orjson.dumps(self.public)[:-1]
        self._pairs = tuple((up + tail, pub + tail) for tail in (b"/", b'"', b"?"))

    def body(self, payload: bytes) -> bytes:
        """JSON bytes with every upstream-based string rewritten."""
        if self.upstream == self.public:
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
        if under_base(value, self.upstream):
            return self.public + value[len(self.upstream):]
        return value


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


def without_last_links(value: str) -> str | None:
    """An RFC 8288 ``Link`` header value without its ``rel="last"`` links (the last page's
    offset counts the matches, like ``Bundle.total``); None when the value cannot be read
    link by link (then it may hold one anywhere)."""
    kept: list[str] = []
    pos = 0
    while pos < len(value):
        found = _LINK_VALUE.match(value, pos)
        if found is None or found.end() == pos:
            return None
        rels: list[str] = []
        for param in _LINK_PARAM.finditer(found.group(1)):
            if param.group(1).lower() == "rel":
                rels.extend((param.group(2) or "").strip('"').lower().split())
        if "last" not in rels:
            kept.append(value[found.start():found.end()].strip().rstrip(",").rstrip())
        pos = found.end()
    return ", ".join(kept)
