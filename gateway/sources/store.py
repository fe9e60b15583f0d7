"""The consent cache: compiled consents per patient, TTL-bound, single-flight, fail-closed.

Concurrent misses for one patient share one source query; the misses of one request are
fetched together, chunked. An invalidation during a fetch wins: the fetched answer is
used for the requests already waiting on it but not cached.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Protocol, TypeVar

import orjson
from cachetools import LRUCache, TTLCache

from gateway.core.breakglass import EmergencyWindow, emergency_window
from gateway.core.consent import CompiledConsent, compile_consent
from gateway.core.errors import ConsentUnavailable
from gateway.core.fhir import JSON
from gateway.core.model import Label
from gateway.metrics import Metrics

GROUP_TYPES = ("Group/", "CareTeam/")
T = TypeVar("T")
decision_log = logging.getLogger("gateway.decision")
# Reads what a ``related`` data target refers to: None when the read fails.
RelatedReader = Callable[[str], Awaitable[frozenset[str] | None]]


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


NO_LABELS: Mapping[str, frozenset[Label]] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class PatientConsents:
    patient: str
    consents: tuple[CompiledConsent, ...]
    names_groups: bool  # some provision names a Group or CareTeam actor
    emergency: tuple[EmergencyWindow, ...] = ()
    # labels the consent source knows for this patient's records (ClinikAPI documents'
    # confidentiality), by ``Type/id``: added to what the rules give those records
    labels: Mapping[str, frozenset[Label]] = field(default_factory=lambda: NO_LABELS)


def _names_groups(consents: Iterable[CompiledConsent]) -> bool:
    def walk(provision: object) -> bool:
        actors = getattr(provision, "actors", None) or ()
        if any(a.startswith(GROUP_TYPES) for a in actors):
            return True
        return any(walk(child) for child in getattr(provision, "children", ()))

    return any(walk(c.root) for c in consents)


def compile_patient(patient: str, raw: Sequence[JSON]) -> PatientConsents:
    """Compile one patient's consents once, as they enter the cache."""
    compiled = tuple(compile_consent(c) for c in raw)
    windows = tuple(w for w in (emergency_window(c) for c in raw) if w is not None)
    return PatientConsents(patient, compiled, _names_groups(compiled), windows)


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
    ) -> None:
        self.source = source
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

    def invalidate(self, patient: str | None = None) -> None:
        """Forget one patient's consents, or everyone's."""
        if patient is None:
            self._cache.clear()
            self._groups.clear()
            self._epoch += 1
        else:
            self._cache.pop(patient, None)
            self._generation[patient] = self._generation.get(patient, 0) + 1
        self.metrics.cache_entries.set(len(self._cache))

    async def get(self, patients: Iterable[str]) -> dict[str, PatientConsents]:
        """Each patient's compiled consents; ConsentUnavailable if any lookup fails."""
        found: dict[str, PatientConsents] = {}
        waiting: dict[str, asyncio.Future[PatientConsents]] = {}
        missing: list[str] = []
        for patient in dict.fromkeys(patients):
            cached = self._cache.get(patient)
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
                raw = await self._fetch(chunk)
                labels = await self._document_labels(chunk)
                for patient in chunk:
                    entry = await self._prepared(compile_patient(patient, raw.get(patient, [])), raw.get(patient, []))
                    if labels.get(patient):
                        entry = replace(entry, labels=labels[patient])
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
                self._inflight.pop(patient, None)
            self.metrics.cache_entries.set(len(self._cache))

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
        return replace(entry, consents=tuple(consents))

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

    async def _counted(self, lookup: Awaitable[T]) -> T:
        """Await a source lookup; any failure is counted and becomes ConsentUnavailable."""
        try:
            return await lookup
        except ConsentUnavailable:
            self.metrics.lookup_errors.inc()
            raise
        except Exception:
            self.metrics.lookup_errors.inc()
            raise ConsentUnavailable("Consent information is unavailable.") from None

    async def memberships(self, actor: str) -> frozenset[str]:
        """The Groups and CareTeams ``actor`` belongs to (cached like consents)."""
        cached = self._groups.get(actor)
        if cached is not None:
            return cached
        groups = await self._counted(self.source.memberships(actor))
        self._groups[actor] = groups
        return groups
