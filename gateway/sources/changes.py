"""The consent change feed (CONTRACT §9): each replica asks the consent source what changed.

Replicas share nothing but the FHIR server, so each one polls it every ``change_poll_s``
for Consents changed since its last poll and evicts those patients: a consent written
through another replica, or straight to the FHIR server, takes effect here within one
poll (plus the request that reads it again). Emergency windows are Consents too, so a
window one replica records is honoured by all within the same bound.

Instants come from the source's clock only (``meta.lastUpdated``), never this machine's,
so clock skew between replicas and the server loses nothing. Each poll reads again the
last ``OVERLAP`` of the listing, because a server can stamp a change before it commits it
(a transaction that commits late appears "in the past"); versions already seen are not
evicted twice. A source without a change listing (the vendor APIs) has its cached
patients re-read on every poll instead. A failed poll changes nothing: entries then
expire by ``cache_ttl_s`` as without the feed, and the next poll resumes from the same
instant.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime, timedelta, timezone

from gateway.metrics import Metrics
from gateway.sources.store import ConsentStore

log = logging.getLogger("gateway.changes")

OVERLAP = timedelta(seconds=10)
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


class ChangeFeed:
    """Polls the consent source's change listing and evicts changed patients from the store."""

    def __init__(self, store: ConsentStore, metrics: Metrics, interval_s: float) -> None:
        self.store = store
        self.metrics = metrics
        self.interval_s = interval_s
        self.since: datetime | None = None  # newest change seen, by the source's clock
        self._seen: dict[str, datetime] = {}  # change keys read within the overlap
        self.last_ok: float | None = None  # monotonic time of the last successful poll
        self._started = time.monotonic()
        metrics.change_poll_age.set_function(self.age)

    def age(self) -> float:
        """Seconds since the last successful poll (since start-up when none succeeded yet)."""
        return time.monotonic() - (self.last_ok if self.last_ok is not None else self._started)

    async def poll_once(self) -> int:
        """One poll; returns how many patients were evicted. Raises on any failure."""
        source = self.store.source
        if self.since is None:
            # The first poll only learns where the listing ends: the cache is still empty.
            self.since = await source.latest_change() or _EPOCH
            return 0
        changes = await source.changes(self.since - OVERLAP)
        if changes is None:
            await self.store.refresh_cached()
            return self.store.size
        fresh = [c for c in changes if c.key not in self._seen]
        for change in fresh:
            self._seen[change.key] = change.updated or self.since
        evicted = self.store.evict_changed(fresh) if fresh else 0
        newest = max((c.updated for c in changes if c.updated is not None), default=self.since)
        self.since = max(self.since, newest)
        horizon = self.since - OVERLAP
        self._seen = {k: v for k, v in self._seen.items() if v >= horizon}
        return evicted

    async def run(self) -> None:
        """Poll forever, every ``interval_s``; failures are counted and logged, never raised."""
        self._started = time.monotonic()
        while True:
            try:
                evicted = await self.poll_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.metrics.change_poll_errors.inc()
                self.store.failed_at = time.monotonic()
                log.warning("consent change poll failed: %s", type(exc).__name__)
            else:
                self.last_ok = self.store.answered_at = time.monotonic()
                if evicted:
                    log.info("consent changes: %d patients evicted", evicted)
            # Read through ``set_function`` in one process; with several workers the metric
            # files hold what was last set, so set it after every poll too.
            self.metrics.change_poll_age.set(self.age())
            await asyncio.sleep(self.interval_s)
