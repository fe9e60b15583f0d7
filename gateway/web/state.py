"""What the request handlers share: settings, the upstream, metrics and readiness."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from aiohttp import web

from gateway.audit import AuditLog
from gateway.config import Settings
from gateway.core.labels import LabelIndex
from gateway.issuer import Issuer
from gateway.metrics import Metrics
from gateway.sources.store import ConsentStore
from gateway.upstream import Upstream
from gateway.web.enforcement import ConsentEnforcement
from gateway.web.resolve import MedicationCache


@dataclass
class Readiness:
    """When the upstream last answered ``/metadata`` (monotonic seconds), if ever."""

    last_ok: float | None = None
    window_s: float = 30.0

    def ready(self, now: float) -> bool:
        return self.last_ok is not None and now - self.last_ok <= self.window_s


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
    medications: MedicationCache = field(default_factory=lambda: MedicationCache(60.0))
    disclosures: AuditLog | None = None  # accounting of disclosures (CONTRACT §10)
    issuer: Issuer | None = None  # auth.mode jwt: the token issuer's keys and discovery


    window_locks: dict[tuple[str, str], asyncio.Lock] = field(default_factory=dict)

    def window_lock(self, actor: str, patient: str) -> asyncio.Lock:
        """The lock serialising emergency-window creation for one actor and patient."""
        key = (actor, patient)
        lock = self.window_locks.get(key)
        if lock is None:
            lock = self.window_locks[key] = asyncio.Lock()
        return lock


STATE = web.AppKey("gateway_state", GatewayState)
