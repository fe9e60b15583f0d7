"""Which of the FHIR server's response headers an answer passes on: an allow-list.

Every answer that comes from the FHIR server through the proxy carries only the server's
headers named here (and those the deployment names in ``upstream.passed_response_headers``);
any other header is dropped, whatever the server or a facade in front of it writes there
(``X-Resource-Ids``, ``X-Debug-Query``, ``Warning``, ``Content-Disposition``, ``Set-Cookie``,
...): the gateway cannot decide what it does not know the meaning of (fail closed).

- ``ANSWER_HEADERS``, on every answer, say how to cache, negotiate, retry or authenticate,
  never which records there are.
- ``RECORD_HEADERS`` describe the one resource of the answer: passed only on a 2xx read, vread
  or write whose resource was decided and released (or a write's own answer without one).
- ``WWW-Authenticate`` is passed only on a 401.
- ``Link`` is passed only on a 2xx Bundle answer of a search, history, operation or batch, and
  only its paging links (``core.links.paging_links``).
- ``Content-Type`` is passed on every answer as its media type with its ``charset`` and
  ``fhirVersion`` parameters alone (``content_type``): other parameters are free text.
"""

from __future__ import annotations

import re

# RFC 9110 §7.6.1 hop-by-hop headers: never passed from one connection to the other.
HOP_BY_HOP = frozenset(
    {
        "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
        "te", "trailer", "trailers", "transfer-encoding", "upgrade",
    }
)

# Every answer: what none of them says anything of records.
ANSWER_HEADERS = (
    "Cache-Control",       # RFC 9111: how the answer may be cached (no-store must reach the client)
    "Pragma",              # the HTTP/1.0 form of Cache-Control: no-cache
    "Expires",             # RFC 9111: an HTTP-date for caches
    "Vary",                # the request header names the answer depends on
    "Content-Language",    # language tags
    "Preference-Applied",  # RFC 7240: which of the client's own Prefer tokens were honoured
    "Retry-After",         # seconds or an HTTP-date: the server's load (429, 503)
    "Allow",               # the methods a 405 answer allows
    "X-Content-Type-Options",  # nosniff: a browser never reads a JSON answer as HTML
    # CORS (the Fetch standard), which browser apps need and the CapabilityStatement the
    # gateway serves announces (security.cors): origins, methods, header names and a lifetime.
    "Access-Control-Allow-Origin",
    "Access-Control-Allow-Credentials",
    "Access-Control-Allow-Methods",
    "Access-Control-Allow-Headers",
    "Access-Control-Expose-Headers",
    "Access-Control-Max-Age",
)
# A 401's challenge, which it must carry (the client's own token is sent on when
# upstream.auth.kind is none): the credentials were refused before any record was read. On any
# other answer its free text (error_description) could name what the request met.
CHALLENGE_HEADER = "WWW-Authenticate"
# The one resource of a decided and released read, vread or write.
RECORD_HEADERS = ("ETag", "Last-Modified", "Location", "Content-Location")
PAGING_HEADER = "Link"
CONTENT_TYPE = "Content-Type"

# The gateway's own answer headers and those it or aiohttp computes: never the server's.
OWN_HEADERS = frozenset(
    {
        "x-consent-decision", "x-consent-decision-shadow", "x-break-glass-audit-id", "x-request-id",
        "content-length", "content-encoding", "date", "server",
    }
)
# Request headers the gateway reads itself (identity and break-glass, CONTRACT §4).
_OWN_PREFIXES = ("x-actor", "x-purpose-of-use", "x-break-glass")
# Passed under rules of their own (above), never as named.
_RULED = frozenset(name.lower() for name in (*RECORD_HEADERS, PAGING_HEADER, CONTENT_TYPE, CHALLENGE_HEADER))

_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


def check_passed_name(name: str) -> None:
    """A header name a deployment passes beyond the allow-list, or ValueError saying why not:
    not a header name, hop-by-hop, the gateway's own, or one passed under its own rule."""
    lower = name.lower()
    if not _TOKEN.match(name):
        raise ValueError(f"{name!r} is not a header name")
    if lower in HOP_BY_HOP:
        raise ValueError(f"{name!r} is hop-by-hop, never passed")
    if lower in OWN_HEADERS or lower.startswith(_OWN_PREFIXES):
        raise ValueError(f"{name!r} is the gateway's own header")
    if lower in _RULED:
        raise ValueError(f"{name!r} is passed under the gateway's own rule, only where it describes what is released")


def passed_names(names: tuple[str, ...], extra: tuple[str, ...] = ()) -> dict[str, str]:
    """Lower-case name -> the name as the answer writes it, for ``names`` and the deployment's
    ``extra`` names (``upstream.passed_response_headers``)."""
    return {name.lower(): name for name in (*names, *extra)}


_MEDIA_TYPE = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+/[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_CHARSETS = frozenset({"utf-8", "utf8", '"utf-8"'})
_DEFAULT_TYPE = "application/fhir+json"


def content_type(value: str) -> str:
    """A ``Content-Type`` as its media type, with the ``charset`` (UTF-8, as JSON is) and
    ``fhirVersion`` (digits and dots) parameters alone; a value that is no media type becomes
    ``application/fhir+json`` (the gateway passes JSON only, or the capability statement)."""
    media, sep, params = value.partition(";")
    media = media.strip()
    if not _MEDIA_TYPE.match(media):
        return _DEFAULT_TYPE
    if not sep:
        return media
    kept = [media]
    parts = params.split(";")
    for param in parts:
        key, _, val = param.strip().partition("=")
        key, val = key.strip().lower(), val.strip()
        if key == "charset" and val.lower() in _CHARSETS:
            kept.append(f"charset={val}")
        elif key == "fhirversion" and val and all(ch.isdigit() or ch == "." for ch in val):
            kept.append(f"fhirVersion={val}")
    # As the server wrote it when nothing goes (``application/fhir+json;charset=UTF-8``).
    return value.strip() if len(kept) == len(parts) + 1 else "; ".join(kept)
