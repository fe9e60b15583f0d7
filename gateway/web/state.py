"""What the request handlers share: settings, the upstream, metrics and readiness."""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web

from gateway.audit import AuditLog
from gateway.config import Settings
from gateway.core.labels import LabelIndex
from gateway.metrics import Metrics
from gateway.sources.store import ConsentStore
from gateway.upstream import Upstream
from gateway.web.enforcement import ConsentEnforcement


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


STATE = web.AppKey("gateway_state", GatewayState)
