"""Reading the references that decide resources of an answer (CONTRACT §6).

A Binary's security context is read afresh for each answer (it is patient data, decided
now); a Medication, the Medications and Substances it names as ingredients, and a
PractitionerRole are not patient data and change rarely, so they are kept for the consent
cache's TTL (a failed read is not kept). Targets are read concurrently, each once per answer:
an order's Medication first, then the ingredients the Medications name (one hop, no further).
PractitionerRoles are read only for an answer whose consents read authors (``resolve_roles``).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from urllib.parse import quote
from collections.abc import Awaitable, Callable, Iterable
from functools import partial

import orjson
from cachetools import TTLCache

from gateway.core.errors import GatewayError
from gateway.core.fhir import NO_BASES, Bases, JSON, normal_base
from gateway.core.strict_json import has_duplicate_keys
from gateway.core.references import (
    NOTHING_RESOLVED, UNREADABLE, Resolved, attachment_holders, attachment_urls, attachments_by_binary, author_roles,
    deciding_references, ingredients_to_read, iter_resources, may_refer,
)
from gateway.core.view import ViewsInsufficient
from gateway.upstream import Upstream
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.web.state import GatewayState

TARGET_CACHE_SIZE = 10_000


class TargetCache:
    """Resources that are not patient data (Medications, Substances, PractitionerRoles) read
    from the FHIR server by ``Type/id``, kept for ``ttl_s`` (failures are not kept)."""

    def __init__(self, ttl_s: float, maxsize: int = TARGET_CACHE_SIZE) -> None:
        self._cache: TTLCache[str, JSON | None] = TTLCache(maxsize=maxsize, ttl=max(ttl_s, 1.0), timer=time.monotonic)

    def get(self, reference: str) -> tuple[bool, JSON | None]:
        try:
            return True, self._cache[reference]
        except KeyError:
            return False, None

    def put(self, reference: str, value: JSON | None) -> None:
        if value is not UNREADABLE:
            self._cache[reference] = value

    def evict(self, rtype: str | None = None, rid: str | None = None) -> None:
        """Forget ``rtype/rid``, every one of ``rtype`` without an id, or everything."""
        if rtype is None:
            self._cache.clear()
        elif rid is not None:
            self._cache.pop(f"{rtype}/{rid}", None)
        else:
            for key in [k for k in self._cache if k.partition("/")[0] == rtype]:
                self._cache.pop(key, None)


async def read_target(upstream: Upstream, reference: str) -> JSON | None:
    """One resource by ``Type/id``: None when missing, ``UNREADABLE`` when it cannot be read (or
    has no single reading: a key given twice)."""
    try:
        answer = await upstream.request(
            "GET", upstream.url_for(reference), headers={"Accept": "application/fhir+json"}
        )
    except GatewayError:
        return UNREADABLE
    if answer.status in (404, 410):
        return None
    if answer.status >= 400:
        return UNREADABLE
    try:
        parsed = orjson.loads(answer.body)
    except orjson.JSONDecodeError:
        return UNREADABLE
    if not isinstance(parsed, dict) or f"{parsed.get('resourceType')}/{parsed.get('id')}" != reference:
        return UNREADABLE
    # SECURITY: a key given twice has no single reading (a role's practitioner, a drug's
    # ingredients, read one way or the other): never guessed at (core.strict_json).
    if has_duplicate_keys(answer.body, parsed):
        return UNREADABLE
    return parsed


async def _read_all(upstream: Upstream, references: Iterable[str]) -> dict[str, JSON | None]:
    refs = sorted(references)
    found = await asyncio.gather(*(read_target(upstream, r) for r in refs))
    return dict(zip(refs, found))


async def read_attachments(
    upstream: Upstream, binaries: frozenset[str], ours: Bases = NO_BASES,
) -> dict[str, tuple[JSON, ...] | None]:
    """The DocumentReferences attaching each Binary (``DocumentReference?location=``, by its
    relative URL and its URL under each of this server's bases), in one search; None for every
    Binary when the search fails (what they hold is then unknown)."""
    bases = sorted({upstream.base_url, *ours})
    urls = ",".join(u for b in sorted(binaries) for u in attachment_urls(b, bases))
    try:
        answer = await upstream.request(
            "GET", upstream.url_for("DocumentReference", f"location={quote(urls, safe=',/:')}&_count=1000"),
            headers={"Accept": "application/fhir+json"},
        )
        bundle = orjson.loads(answer.body) if answer.status == 200 else None
    except (GatewayError, orjson.JSONDecodeError):
        bundle = None
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle" or _has_next(bundle):
        return {b: None for b in binaries}
    documents = [r for r in iter_resources(bundle) if r.get("resourceType") == "DocumentReference"]
    return dict(attachments_by_binary(documents, binaries, ours or frozenset({normal_base(upstream.base_url)})))


def _has_next(bundle: JSON) -> bool:
    links = bundle.get("link")
    return isinstance(links, list) and any(isinstance(l, dict) and l.get("relation") == "next" for l in links)


async def resolve_references(state: GatewayState, body: JSON, raw: bytes | None = None, views: bool = False) -> Resolved:
    """What decides the resources of ``body`` beyond themselves: in the answer, or read.
    ``raw``, the text ``body`` was read from, spares the walk when it names nothing that refers.
    ``views``: ``body`` holds views (core.view), which leave out the attachments that tie a
    Binary without a security context to its holder: ViewsInsufficient when one is met."""
    ours = state.enforcement.ours
    withhold = state.settings.enforcement.unattached_binaries == "withhold"
    nothing = NOTHING_RESOLVED if not ours and not withhold else Resolved(ours=ours, withhold_unattached=withhold)
    if raw is not None and not may_refer(raw):
        return nothing
    found = deciding_references(body, ours)
    if found is None:
        return nothing
    if found.unattached and views:
        raise ViewsInsufficient("a Binary's holder is read whole")
    targets: dict[str, JSON | None] = dict(found.present)
    cache = state.medications
    unknown = _cached(cache, found.medications | found.ingredients, targets)
    reads = _read_all(state.upstream, [*found.contexts, *unknown])
    if found.unattached:
        read, attached = await asyncio.gather(reads, read_attachments(state.upstream, found.unattached, ours))
        for binary, holders in attachment_holders(body, found.unattached, ours).items():
            searched = attached.get(binary, ())
            # A failed search (None) leaves the Binary unknown whatever the answer holds.
            if searched is not None:
                attached[binary] = (*holders, *(d for d in searched if all(d is not h for h in holders)))
    else:
        read, attached = await reads, {}
    for ref in unknown:
        cache.put(ref, read[ref])
    targets.update(read)
    # One hop further: the ingredients the Medications read or cached name, never theirs.
    if found.medications:
        more = ingredients_to_read((targets.get(m) for m in found.medications), targets, ours)
        if more:
            await _read_cached(state.upstream, cache, more, targets)
    return Resolved(targets, attached, ours=ours, withhold_unattached=withhold)


def _cached(cache: TargetCache, references: frozenset[str], into: dict[str, JSON | None]) -> list[str]:
    """Put the cached ones of ``references`` into ``into``; the others, to be read."""
    unknown = []
    for ref in references:
        hit, value = cache.get(ref)
        if hit:
            into[ref] = value
        else:
            unknown.append(ref)
    return unknown


async def _read_cached(
    upstream: Upstream, cache: TargetCache, references: frozenset[str], into: dict[str, JSON | None]
) -> None:
    """``references`` into ``into``: from ``cache``, else read (and cached unless it failed)."""
    unknown = _cached(cache, references, into)
    if unknown:
        read = await _read_all(upstream, unknown)
        for ref in unknown:
            cache.put(ref, read[ref])
        into.update(read)


def role_resolver(upstream: Upstream, cache: TargetCache) -> Callable[[JSON, Resolved], Awaitable[Resolved]]:
    """``resolve_roles`` over this FHIR server and cache (``ConsentEnforcement.roles``)."""
    return partial(resolve_roles, upstream, cache)


async def resolve_roles(upstream: Upstream, cache: TargetCache, body: JSON, resolved: Resolved) -> Resolved:
    """``resolved`` with the PractitionerRoles the resources of ``body`` name as authors: in the
    answer, cached or read. One that cannot be read is left out (its author is unknown)."""
    present, named = author_roles(body, resolved.ours)
    if not present and not named:
        return resolved
    roles: dict[str, JSON | None] = dict(present)
    await _read_cached(upstream, cache, named, roles)
    return replace(resolved, roles={k: v for k, v in roles.items() if v is not UNREADABLE})
