"""The consent cache: compiled consents per patient, TTL-bound, single-flight, fail-closed.

Concurrent misses for one patient share one source query; the misses of one request are
fetched together, chunked. An invalidation during a fetch wins: the fetched answer is
used for the requests already waiting on it but not cached.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from types import MappingProxyType
from typing import Protocol, TypeVar

import orjson
from cachetools import LRUCache, TTLCache

from gateway.core.breakglass import EmergencyWindow, emergency_window
from gateway.core.consent import CompiledConsent, compile_consent
from gateway.core.errors import ConsentUnavailable
from gateway.core.fhir import NO_BASES, Bases, JSON
from gateway.core.model import Label
from gateway.metrics import Metrics

GROUP_TYPES = ("Group/", "CareTeam/")
T = TypeVar("T")
decision_log = logging.getLogger("gateway.decision")
# Reads what a ``related`` data target refers to: None when the read fails.
RelatedReader = Callable[[str], Awaitable[frozenset[str] | None]]


@dataclass(frozen=True, slots=True)
class ConsentChange:
    """One changed Consent in a change listing.

    ``key`` names the Consent version (a listing read twice yields the same key);
    ``patient`` is None when the change cannot be tied to one patient: then ``consent``
    (``Consent/<id>``, a deletion) names the consent whose holders are evicted, and without
    it everyone is evicted; ``updated`` is its ``meta.lastUpdated`` by the source's clock.
    """

    key: str
    patient: str | None
    updated: datetime | None
    consent: str | None = None


class ConsentSource(Protocol):
    """Where consents live. ``fetch`` returns each asked patient's active FHIR Consents."""

    async def fetch(self, patients: Sequence[str]) -> dict[str, list[JSON]]:
        """Raise ConsentUnavailable on any failure or malformed answer; never a partial answer."""
        ...

    async def memberships(self, actor: str) -> frozenset[str]:
        """Group and CareTeam references the actor belongs to."""
        ...

    async def store_consent(self, consent: JSON) -> str:
        """Persist a Consent (an emergency grant); returns its ``Consent/<id>``."""
        ...

    async def latest_change(self) -> datetime | None:
        """The newest change instant by the source's own clock (None: none, or no listing)."""
        ...

    async def changes(self, since: datetime) -> list[ConsentChange] | None:
        """Consents changed after ``since``; None when the source has no change listing."""
        ...

    async def probe(self) -> bool:
        """Ask something cheap; False when the source has no such question (raise on failure)."""
        ...


NO_LABELS: Mapping[str, frozenset[Label]] = MappingProxyType({})


_VERSIONS = itertools.count(1)


@dataclass(frozen=True, slots=True)
class PatientConsents:
    patient: str
    consents: tuple[CompiledConsent, ...]
    names_groups: bool  # some provision names a Group or CareTeam actor
    emergency: tuple[EmergencyWindow, ...] = ()
    # labels the consent source knows for this patient's records (ClinikAPI documents'
    # confidentiality), by ``Type/id``: added to what the rules give those records
    labels: Mapping[str, frozenset[Label]] = field(default_factory=lambda: NO_LABELS)
    # The fill that compiled this set (unique per patient and fill): decisions over these
    # consents are shared under it (core.judge).
    version: int = field(default_factory=lambda: next(_VERSIONS))


def _names_groups(consents: Iterable[CompiledConsent]) -> bool:
    return any(_provision_names_groups(c.root) for c in consents)


def _provision_names_groups(provision: object) -> bool:
    # A module function: a nested one calling itself is a reference cycle per call.
    actors = getattr(provision, "actors", None) or ()
    if any(a.startswith(GROUP_TYPES) for a in actors):
        return True
    return any(_provision_names_groups(child) for child in getattr(provision, "children", ()))


def compile_patient(
    patient: str, raw: Sequence[JSON], version: int | None = None, ours: Bases = NO_BASES,
) -> PatientConsents:
    """Compile one patient's consents once, as they enter the cache. ``version``: the fill's
    (one per lookup, shared by the patients it fills: a patient is in a fill once). ``ours``:
    the bases under which an absolute reference names this server's resources
    (``consent.compile_consent``)."""
    windows = tuple(w for w in (emergency_window(c, ours) for c in raw) if w is not None)
    # A person's emergency window acts only through the break-glass override (exact labels,
    # audited), never as an ordinary permit whose labels would also open narrower ones. A
    # care-unit window (HealtheIntent) is decided as its consent: unit AND group AND person.
    opened = {w.consent for w in windows if w.actor and not w.requires}
    compiled = tuple(
        compile_consent(c, ours) for c in raw if f"Consent/{c.get('id')}" not in opened and c.get("id") not in opened
    )
    return PatientConsents(patient, compiled, _names_groups(compiled), windows,
                           version=next(_VERSIONS) if version is None else version)


def consent_version(raw: JSON) -> str:
    """A key that changes whenever the Consent's content does (its version, whatever the server)."""
    return hashlib.sha256(orjson.dumps(raw, option=orjson.OPT_SORT_KEYS)).hexdigest()


class ConsentStore:
    """Cached, compiled consents per patient, looked up through a ConsentSource.

    ``related`` reads what a consent's ``data.meaning = related`` target refers to; each
    target is read once per consent version (kept with the compiled consent). A consent
    version whose root has conditions but no type is counted once in
    ``consent_gateway_ambiguous_consents_total`` and named in the decision log.
    """

    def __init__(
        self,
        source: ConsentSource,
        metrics: Metrics,
        *,
        ttl_s: float,
        max_patients: int,
        chunk_size: int = 50,
        related: RelatedReader | None = None,
        ours: Bases = NO_BASES,
    ) -> None:
        self.source = source
        # The bases under which a consent's absolute references name this server's resources.
        self.ours = ours
        self.metrics = metrics
        self.chunk_size = chunk_size
        self.related = related
        self._related: LRUCache[tuple[str, str], frozenset[str]] = LRUCache(10_000)
        self._seen_ambiguous: LRUCache[str, bool] = LRUCache(100_000)
        self._cache: TTLCache[str, PatientConsents] = TTLCache(max_patients, ttl_s, timer=time.monotonic)
        self._groups: TTLCache[str, frozenset[str]] = TTLCache(10_000, ttl_s, timer=time.monotonic)
        self._inflight: dict[str, asyncio.Future[PatientConsents]] = {}
        self._generation: dict[str, int] = {}
        self._epoch = 0
        # When the source last answered and last failed (monotonic seconds), for readiness.
        self.answered_at: float | None = None
        self.failed_at: float | None = None
        self.probes = True  # False once the source said it has no cheap question to ask
        # listen.workers above 1: passes an invalidation made here (a Consent written through
        # this process) on to the other workers' caches; set by the composition.
        self.announce: Callable[[str | None], None] | None = None

    @property
    def size(self) -> int:
        """How many patients have cached consents."""
        return len(self._cache)

    def invalidate(self, patient: str | None = None, *, announce: bool = True) -> None:
        """Forget one patient's consents, or everyone's; ``announce`` passes it on to the
        other workers (not for what each of them learns by itself: the change feed)."""
        # A lookup already under way was begun before the change: later requests start anew.
        if patient is None:
            self._cache.clear()
            self._groups.clear()
            self._inflight.clear()
            self._epoch += 1
        else:
            self._cache.pop(patient, None)
            self._inflight.pop(patient, None)
            self._generation[patient] = self._generation.get(patient, 0) + 1
        self.metrics.cache_entries.set(len(self._cache))
        if announce and self.announce is not None:
            self.announce(patient)

    async def get(self, patients: Iterable[str]) -> dict[str, PatientConsents]:
        """Each patient's compiled consents; ConsentUnavailable if any lookup fails."""
        found: dict[str, PatientConsents] = {}
        waiting: dict[str, asyncio.Future[PatientConsents]] = {}
        missing: list[str] = []
        cache = self._cache
        for patient in dict.fromkeys(patients):
            try:
                # Indexing a TTLCache answers as get() does (an expired entry is missing) at a
                # quarter of the cost: no timer context, no second lookup.
                cached: PatientConsents | None = cache[patient]
            except KeyError:
                cached = None
            if cached is not None:
                self.metrics.cache_hits.inc()
                found[patient] = cached
            elif patient in self._inflight:
                self.metrics.cache_hits.inc()
                waiting[patient] = self._inflight[patient]
            else:
                self.metrics.cache_misses.inc()
                missing.append(patient)
        if missing:
            loop = asyncio.get_running_loop()
            futures = {p: loop.create_future() for p in missing}
            self._inflight.update(futures)
            await self._fill(futures)
            waiting.update(futures)
        for patient, future in waiting.items():
            found[patient] = await asyncio.shield(future)
        return found

    async def _fill(self, futures: dict[str, asyncio.Future[PatientConsents]]) -> None:
        patients = list(futures)
        generations = {p: self._generation.get(p, 0) for p in patients}
        epoch = self._epoch
        try:
            for start in range(0, len(patients), self.chunk_size):
                chunk = patients[start : start + self.chunk_size]
                entries = await self._load(chunk)
                for patient in chunk:
                    entry = entries[patient]
                    if self._generation.get(patient, 0) == generations[patient] and self._epoch == epoch:
                        self._cache[patient] = entry
                    futures[patient].set_result(entry)
        except BaseException as exc:
            for future in futures.values():
                if not future.done():
                    future.set_exception(exc if isinstance(exc, ConsentUnavailable) else
                                         ConsentUnavailable("Consent information is unavailable."))
                    future.exception()  # mark retrieved: the caller re-raises it below
            raise
        finally:
            for patient in patients:
                if self._inflight.get(patient) is futures[patient]:
                    del self._inflight[patient]
            self.metrics.cache_entries.set(len(self._cache))

    async def _load(self, chunk: list[str]) -> dict[str, PatientConsents]:
        """The chunk's consents from the source, compiled and prepared for the cache."""
        raw = await self._fetch(chunk)
        labels = await self._document_labels(chunk)
        entries: dict[str, PatientConsents] = {}
        version = next(_VERSIONS)  # this fill's: the decisions over what it compiles are shared under it
        for patient in chunk:
            consents = raw.get(patient, [])
            entry = await self._prepared(compile_patient(patient, consents, version, self.ours), consents)
            if labels.get(patient):
                entry = replace(entry, labels=labels[patient], version=next(_VERSIONS))
            entries[patient] = entry
        return entries

    async def _prepared(self, entry: PatientConsents, raw: Sequence[JSON]) -> PatientConsents:
        """Count and name ambiguous consents; attach what their related targets refer to."""
        consents = list(entry.consents)
        for i, (consent, source) in enumerate(zip(entry.consents, raw)):
            if not (consent.ambiguous or consent.related_targets):
                continue
            version = consent_version(source)
            if consent.ambiguous and version not in self._seen_ambiguous:
                self._seen_ambiguous[version] = True
                self.metrics.ambiguous_consents.inc()
                decision_log.warning(
                    "ambiguous-consent",
                    extra={"reasons": [f"{consent.id} provision untyped-root-with-conditions"]},
                )
            targets = consent.related_targets
            if targets and self.related is not None:
                consents[i] = replace(consent, related=await self._references(version, targets))
        return replace(entry, consents=tuple(consents), version=next(_VERSIONS))

    async def _references(self, version: str, targets: Iterable[str]) -> dict[str, frozenset[str]]:
        """What each target refers to; a failed read is left out (the condition is unknown)."""
        assert self.related is not None
        found: dict[str, frozenset[str]] = {}
        for target in sorted(targets):
            refs = self._related.get((version, target))
            if refs is None:
                refs = await self.related(target)
                if refs is None:
                    continue
                self._related[(version, target)] = refs
            found[target] = refs
        return found

    async def _document_labels(self, chunk: list[str]) -> Mapping[str, Mapping[str, frozenset[Label]]]:
        """Record labels the source knows (a ClinikAPI source: its documents'); fails closed."""
        lookup = getattr(self.source, "document_labels", None)
        if lookup is None:
            return {}
        found: Mapping[str, Mapping[str, frozenset[Label]]] = await self._counted(lookup(chunk))
        return found

    async def _fetch(self, chunk: list[str]) -> dict[str, list[JSON]]:
        return await self._counted(self.source.fetch(chunk))

    async def _counted(self, lookup: Awaitable[T], *, lookup_error: bool = True) -> T:
        """Await a source call; any failure is counted (as a lookup error unless told otherwise),
        noted for readiness, and becomes ConsentUnavailable."""
        try:
            found = await lookup
        except Exception as exc:
            if lookup_error:
                self.metrics.lookup_errors.inc()
            # Readiness: one patient's unreadable consents must not take every replica out of
            # service; a source with a probe is judged by the probe and the change poll.
            if not lookup_error or not self.probes:
                self.failed_at = time.monotonic()
            if isinstance(exc, ConsentUnavailable):
                raise
            raise ConsentUnavailable("Consent information is unavailable.") from None
        self.answered_at = time.monotonic()
        return found

    def evict_changed(self, changes: Iterable[ConsentChange]) -> int:
        """Evict the patients of changed Consents (everyone when one names no patient);
        returns how many cached patients were evicted."""
        changes = list(changes)
        deleted = {c.consent for c in changes if c.patient is None and c.consent is not None}
        patients = {c.patient for c in changes if c.patient is not None or c.consent is None}
        if None in patients:
            evicted = len(self._cache)
            self.invalidate(None, announce=False)
            return evicted
        if deleted:
            # A deleted Consent names no patient any more: evict whoever had it cached (a
            # patient who had it not cached is not affected by its deletion).
            patients |= {p for p, entry in list(self._cache.items()) if any(c.id in deleted for c in entry.consents)}
        evicted = 0
        for patient in patients:
            if patient is not None:
                evicted += patient in self._cache
                self.invalidate(patient, announce=False)
        return evicted

    async def refresh_cached(self) -> None:
        """Re-read every cached patient's consents (sources without a change listing).

        A chunk that fails leaves its entries as they are (they still expire by TTL).
        """
        patients = list(self._cache.keys())
        for start in range(0, len(patients), self.chunk_size):
            chunk = patients[start : start + self.chunk_size]
            generations = {p: self._generation.get(p, 0) for p in chunk}
            epoch = self._epoch
            entries = await self._load(chunk)
            for patient in chunk:
                if self._generation.get(patient, 0) == generations[patient] and self._epoch == epoch:
                    self._cache[patient] = entries[patient]

    async def probe(self) -> bool:
        """Ask the source a cheap question (readiness); False when it has none to ask."""
        self.probes = await self._counted(self.source.probe(), lookup_error=False)
        return self.probes

    def forget_memberships(self, _changed: str | None = None) -> None:
        """Forget every cached Group and CareTeam membership (one of them changed: ``_changed``,
        which cannot tell whose membership it was, a member taken off naming no one)."""
        self._groups.clear()

    async def memberships(self, actor: str) -> frozenset[str]:
        """The Groups and CareTeams ``actor`` belongs to (cached like consents)."""
        cached = self._groups.get(actor)
        if cached is not None:
            return cached
        groups = await self._counted(self.source.memberships(actor))
        self._groups[actor] = groups
        return groups
