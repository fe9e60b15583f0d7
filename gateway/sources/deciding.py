"""The FHIR server's changes to what decides besides Consents, polled like Consents (CONTRACT §9).

A consent names Groups and CareTeams (``actor``): whether a requester is one of them is read
from the server (``Group?member=``, ``CareTeam?participant=``) and cached per requester. What a
record points at decides it too: its Medication or Substance (labels), the PractitionerRole
that authored it (``AUT`` actors). Those are read once and cached. A change made straight on
the FHIR server (a clinician taken off the care team a patient excluded, or put on it) would
otherwise be seen only when the cached copy expires; each replica therefore reads every
``consent.change_poll_s`` what changed of these types (``<Type>/_history?_since=``, which
lists updates and deletions alike) and forgets the cached copies they concern: a Group or
CareTeam change forgets every cached membership, a Medication, Substance or PractitionerRole
change forgets that one resource.

As for Consents, instants come from the server's clock only, each poll reads again the last
``OVERLAP`` of the listing and forgets nothing twice for a version it has seen. A server
without type history (a 4xx) is asked no more for that type: its cached copies then expire
as before (``cache_ttl_s`` for memberships, a minute for the others). A failed poll changes
nothing and the next one resumes from the same instant.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from yarl import URL

from gateway.core.fhir import JSON
from gateway.metrics import Metrics
from gateway.sources.fhir import bundle_of, instant_text, next_page, parse_instant
from gateway.upstream import Upstream

log = logging.getLogger("gateway.changes")

OVERLAP = timedelta(seconds=10)
# A listing longer than this many pages forgets every cached copy of its type instead.
MAX_PAGES = 20
PAGE_SIZE = 100
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_HEADERS = {"Accept": "application/fhir+json"}

# What a change of one type makes the gateway forget: ``Type/id``, or None for all of the type.
Forget = Callable[[str | None], None]


class _NoHistory(Exception):
    """The server answered a type history with a 4xx: it keeps none for this type."""


class _Unreadable(Exception):
    """The server's answer to a history read is no Bundle."""


@dataclass(frozen=True, slots=True)
class Changed:
    """One entry of a type history: ``Type/id`` (None when the entry names none) and the
    instant it was made, by the server's clock."""

    key: str
    reference: str | None
    updated: datetime | None


class TypeHistory:
    """``<Type>/_history`` of one FHIR server, read page by page (never off that server)."""

    def __init__(self, server: Upstream, rtype: str) -> None:
        self.server = server
        self.rtype = rtype

    async def latest(self) -> list[Changed]:
        """The newest change of the listing (a history is given newest first), if any."""
        changes, _ = await self._page(self.server.url_for(f"{self.rtype}/_history", "_count=1"))
        return changes

    async def since(self, when: datetime) -> list[Changed] | None:
        """Every change after ``when``; None when there are more than ``MAX_PAGES`` pages."""
        url: URL | None = self.server.url_for(f"{self.rtype}/_history", f"_since={instant_text(when)}&_count={PAGE_SIZE}")
        found: list[Changed] = []
        for _ in range(MAX_PAGES):
            if url is None:
                return found
            changes, url = await self._page(url)
            found.extend(changes)
        return None if url is not None else found

    async def _page(self, url: URL) -> tuple[list[Changed], URL | None]:
        resp = await self.server.request("GET", url, headers=_HEADERS)
        if 400 <= resp.status < 500:
            raise _NoHistory()
        failure = _Unreadable("The FHIR server's history could not be read.")
        bundle = bundle_of(resp, failure)
        changes = [self._changed(entry) for entry in bundle.get("entry") or () if isinstance(entry, dict)]
        return changes, next_page(bundle, self.server, failure)

    def _changed(self, entry: JSON) -> Changed:
        resource = entry.get("resource")
        request = entry.get("request")
        response = entry.get("response")
        ref: str | None = None
        version: object = None
        stamp: object = None
        if isinstance(resource, dict) and resource.get("resourceType") == self.rtype and isinstance(resource.get("id"), str):
            ref = f"{self.rtype}/{resource['id']}"
            meta = resource.get("meta")
            if isinstance(meta, dict):
                version, stamp = meta.get("versionId"), meta.get("lastUpdated")
        elif isinstance(request, dict) and isinstance(request.get("url"), str):
            # A deletion names its target in the request (``DELETE Group/7``).
            parts = request["url"].split("?")[0].split("/")
            if len(parts) >= 2 and parts[0] == self.rtype and parts[1]:
                ref = f"{self.rtype}/{parts[1]}"
        if isinstance(response, dict):
            stamp = stamp or response.get("lastModified")
            version = version or response.get("etag")
        updated = parse_instant(stamp)
        return Changed(f"{ref}|{version}|{stamp}", ref, updated)


class DecidingFeed:
    """Polls the type histories of ``watched`` (type → what to forget) on one server."""

    def __init__(self, server: Upstream, watched: Mapping[str, Forget], metrics: Metrics, interval_s: float) -> None:
        self.histories = {rtype: TypeHistory(server, rtype) for rtype in watched}
        self.watched = dict(watched)
        self.metrics = metrics
        self.interval_s = interval_s
        self.since: dict[str, datetime] = {}  # per type: the newest change seen, by the server's clock
        self._seen: dict[str, dict[str, datetime]] = {rtype: {} for rtype in watched}

    async def poll_once(self) -> int:
        """One poll of every watched type; how many changes were acted on. Raises on a failure
        (the types polled before it keep what they learned)."""
        acted = 0
        for rtype in list(self.histories):
            try:
                acted += await self._poll(rtype)
            except _NoHistory:
                log.warning("the FHIR server has no %s/_history; its changes are not polled", rtype)
                del self.histories[rtype]
        return acted

    async def _poll(self, rtype: str) -> int:
        history, forget = self.histories[rtype], self.watched[rtype]
        since = self.since.get(rtype)
        if since is None:
            # The first poll only learns where the listing ends: nothing is cached from before.
            latest = await history.latest()
            self.since[rtype] = max((c.updated for c in latest if c.updated is not None), default=_EPOCH)
            self._seen[rtype] = {c.key: self.since[rtype] for c in latest}
            return 0
        changes = await history.since(since - OVERLAP)
        if changes is None:
            forget(None)
            return 1
        seen = self._seen[rtype]
        fresh = [c for c in changes if c.key not in seen]
        for change in fresh:
            seen[change.key] = change.updated or since
        if any(c.reference is None for c in fresh):
            forget(None)
        else:
            for change in fresh:
                forget(change.reference)
        newest = max((c.updated for c in changes if c.updated is not None), default=since)
        self.since[rtype] = max(since, newest)
        horizon = self.since[rtype] - OVERLAP
        self._seen[rtype] = {k: v for k, v in seen.items() if v >= horizon}
        return len(fresh)

    async def run(self) -> None:
        """Poll forever, every ``interval_s``; failures are counted and logged, never raised."""
        while self.histories:
            try:
                acted = await self.poll_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.metrics.change_poll_errors.inc()
                log.warning("change poll of deciding resources failed: %s", type(exc).__name__)
            else:
                if acted:
                    log.info("deciding resources changed: %d", acted)
            await asyncio.sleep(self.interval_s)

