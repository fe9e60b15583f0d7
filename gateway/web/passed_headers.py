"""The FHIR server's response headers an answer passes to the client (core.answer_headers).

One pass over the server's headers, one dict lookup each: a header not allowed for the kind
of answer is dropped, one allowed is written under its usual name (any casing the server
used), with the URLs it holds rewritten to the gateway's public base (CONTRACT §6).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass

from multidict import CIMultiDict, CIMultiDictProxy

from gateway.core.answer_headers import (
    ANSWER_HEADERS, CHALLENGE_HEADER, CONTENT_TYPE, PAGING_HEADER, RECORD_HEADERS, content_type, passed_names,
)
from gateway.core.fhir import JSON
from gateway.core.links import LinkRewriter, paging_links
from gateway.upstream import connection_named
from gateway.web.writes import WRITE_INTERACTIONS

# The interactions whose answer is one resource the request named (or wrote).
_RECORD_INTERACTIONS = WRITE_INTERACTIONS | {"read", "vread"}
# A server writes the same Content-Type on every answer: each value is cut once.
_content_type = functools.lru_cache(maxsize=32)(content_type)


@dataclass(frozen=True, slots=True)
class PassedHeaders:
    """Which server headers each kind of answer passes (lower-case name -> name written),
    built once from ``upstream.passed_response_headers`` (``extra``), which every kind passes.

    ``answer``: any answer (an error, an outcome, one the gateway withheld, the capability
    statement); ``record``: a 2xx read, vread or write, its resource released;
    ``bundle``: a 2xx Bundle of a search, history, operation or batch; ``challenge``: a 401."""

    answer: Mapping[str, str]
    record: Mapping[str, str]
    bundle: Mapping[str, str]
    challenge: Mapping[str, str]

    @classmethod
    def of(cls, extra: tuple[str, ...], clients_credentials: bool = True) -> PassedHeaders:
        """``clients_credentials``: the client's own Authorization reaches the server
        (``upstream.auth.kind: none``); otherwise a 401 refused the gateway's own credentials
        and its challenge is not the client's to answer."""
        plain = (CONTENT_TYPE, *ANSWER_HEADERS)
        return cls(
            answer=passed_names(plain, extra),
            record=passed_names((*plain, *RECORD_HEADERS), extra),
            bundle=passed_names((*plain, PAGING_HEADER), extra),
            challenge=passed_names((*plain, CHALLENGE_HEADER) if clients_credentials else plain, extra),
        )

    def decided(self, interaction: str, status: int, parsed: JSON) -> Mapping[str, str]:
        """For an answer whose resources were decided and (some) released."""
        if not 200 <= status < 300:
            return self.challenge if status == 401 else self.answer
        if interaction in _RECORD_INTERACTIONS:
            return self.record  # a Bundle's ETag and Last-Modified go (proxy.settle_bundle_headers)
        return self.bundle if parsed.get("resourceType") == "Bundle" else self.answer

    def unchecked(self, interaction: str, status: int) -> Mapping[str, str]:
        """For an answer with no resource decided: a write's own (its Location names what the
        requester wrote) keeps the record's headers; any other keeps none."""
        if status == 401:
            return self.challenge
        return self.record if interaction in WRITE_INTERACTIONS and 200 <= status < 300 else self.answer


def passed_headers(
    headers: CIMultiDictProxy[str], passed: Mapping[str, str], links: LinkRewriter
) -> CIMultiDict[str]:
    """The server's ``headers`` that ``passed`` allows, every occurrence (one Content-Type),
    none the Connection header names; URLs rewritten, Link cut to its paging links."""
    named = connection_named(headers) if "Connection" in headers else None
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        lower = name.lower()
        written = passed.get(lower)
        if written is None or (named is not None and lower in named):
            continue
        if lower == "location" or lower == "content-location":
            value = links.header(value)
        elif lower == "link":
            paging = paging_links(value)
            if paging is None:
                continue
            value = links.link_header(paging)
        elif lower == "content-type":
            if written in out:
                continue  # the first, as the answer was read (proxy.parse_body)
            value = _content_type(value)
        out.add(written, value)
    return out
