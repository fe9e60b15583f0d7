"""What the request handlers share: settings, the upstream, metrics and readiness."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from aiohttp import web

from gateway.audit import AuditLog
from gateway.config import Settings
from gateway.core.labels import LabelIndex
from gateway.core.operations import Configured, configured
from gateway.issuer import Issuer
from gateway.metrics import Metrics
from gateway.peers import WorkerRole
from gateway.sealing import PageSeal
from gateway.sources.store import ConsentStore
from gateway.upstream import Upstream
from gateway.web.drain import Drain
from gateway.web.enforcement import ConsentEnforcement
from gateway.web.passed_headers import PassedHeaders
from gateway.web.resolve import TargetCache


@dataclass
class Readiness:
    """CONTRACT §8: the FHIR server, the consent source and the audit file, each recently fine.

    ``last_ok`` is when the FHIR server last answered ``/metadata`` (monotonic seconds).
    """

    last_ok: float | None = None
    window_s: float = 30.0

    def ready(self, now: float) -> bool:
        return self.last_ok is not None and now - self.last_ok <= self.window_s

    def consent_ready(self, now: float, store: ConsentStore) -> bool:
        """No failure since the source's latest answer, and (when it can be probed) that answer
        is recent.

        A FHIR source is probed (and polled): a failed probe or poll makes it not ready until
        it answers again. A vendor API has no cheap question to ask: it is ready unless its
        latest call failed.
        """
        answered, failed = store.answered_at, store.failed_at
        if failed is not None and (answered is None or failed >= answered):
            return False
        if not store.probes:
            return True
        return answered is not None and now - answered <= self.window_s

    def failing(self, now: float, store: ConsentStore, audit: AuditLog) -> list[str]:
        """Names of what is not ready (no hosts, no paths, no secrets)."""
        names = []
        if not self.ready(now):
            names.append("fhir_server")
        if not self.consent_ready(now, store):
            names.append("consent_source")
        if not audit.writable():
            names.append("audit")
        return names


@dataclass
class GatewayState:
    settings: Settings
    upstream: Upstream
    metrics: Metrics
    labels: LabelIndex
    store: ConsentStore
    enforcement: ConsentEnforcement
    audit: AuditLog
    consent_server: Upstream | None = None  # a consent source other than the upstream
    readiness: Readiness = field(default_factory=Readiness)
    # Medications, their ingredients and PractitionerRoles read from the FHIR server
    medications: TargetCache = field(default_factory=lambda: TargetCache(60.0))
    disclosures: AuditLog | None = None  # accounting of disclosures (CONTRACT §10)
    issuer: Issuer | None = None  # auth.mode jwt: the token issuer's keys and discovery
    listening: asyncio.Event = field(default_factory=asyncio.Event)  # both listeners are bound
    drain: Drain = field(default_factory=Drain)  # running proxy handlers, cut at shutdown
    worker: WorkerRole = field(default_factory=WorkerRole)  # listen.workers: which process this is
    # Seals the gateway's paging links (enforcement.paging_key_file; web.pages).
    pages: PageSeal = field(default_factory=PageSeal.random)

    window_locks: dict[tuple[str, str], asyncio.Lock] = field(default_factory=dict)
    # The operator's enforcement.allowed_operations, read once (core.operations).
    operations: Configured = field(init=False)
    # The FHIR server's response headers each kind of answer passes, built once.
    passed_headers: PassedHeaders = field(init=False)

    def __post_init__(self) -> None:
        self.operations = configured(self.settings.enforcement.allowed_operations)
        upstream = self.settings.upstream
        self.passed_headers = PassedHeaders.of(upstream.passed_response_headers, upstream.auth.kind == "none")

    def window_lock(self, actor: str, patient: str) -> asyncio.Lock:
        """The lock serialising emergency-window creation for one actor and patient."""
        key = (actor, patient)
        lock = self.window_locks.get(key)
        if lock is None:
            lock = self.window_locks[key] = asyncio.Lock()
        return lock


STATE = web.AppKey("gateway_state", GatewayState)
