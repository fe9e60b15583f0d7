"""Every metric of CONTRACT §8 on an injectable registry. Label values come from closed sets."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})
INTERACTIONS = (
    "read", "vread", "search", "history", "create", "update", "patch", "delete",
    "batch", "operation", "capabilities", "other",
)
DECISIONS = ("permit", "filtered", "deny")
# SECURITY: filtered-resource reasons are generic on purpose; the specific rule (which label,
# which consent) would reveal what was hidden, so it only goes to the log.
FILTER_REASONS = ("consent", "sensitivity", "malformed", "compartment", "scope")

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """The gateway's metrics, registered on ``registry`` (a fresh one per app in tests).

    With several worker processes (listen.workers) prometheus_client runs in multiprocess
    mode: counters and histograms are summed over the workers; each gauge says how in
    ``multiprocess_mode`` (cache entries summed, ages and backlogs the largest).
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "consent_gateway_requests", "FHIR requests answered",
            ("method", "interaction", "code"), registry=r,
        )
        self.request_duration = Histogram(
            "consent_gateway_request_duration_seconds", "Time to answer a FHIR request",
            ("interaction",), buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.upstream_duration = Histogram(
            "consent_gateway_upstream_duration_seconds", "Time the upstream took to answer",
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.decisions = Counter(
            "consent_gateway_decisions", "Consent decisions per request", ("decision",), registry=r,
        )
        self.resources_filtered = Counter(
            "consent_gateway_resources_filtered", "Resources removed from responses",
            ("resource_type", "reason"), registry=r,
        )
        self.cache_hits = Counter(
            "consent_gateway_consent_cache_hits", "Consent lookups answered from the cache", registry=r,
        )
        self.cache_misses = Counter(
            "consent_gateway_consent_cache_misses", "Consent lookups that went to the source", registry=r,
        )
        self.cache_entries = Gauge(
            "consent_gateway_consent_cache_entries", "Patients with cached consents", registry=r,
            multiprocess_mode="livesum",
        )
        self.lookup_errors = Counter(
            "consent_gateway_consent_lookup_errors", "Failed consent lookups", registry=r,
        )
        self.break_glass = Counter(
            "consent_gateway_break_glass", "Break-glass accesses", ("reason",), registry=r,
        )
        # CONTRACT §10: what enforce mode would have decided, counted in shadow mode.
        self.shadow_decisions = Counter(
            "consent_gateway_shadow_decisions", "Would-be consent decisions in shadow mode", ("decision",), registry=r,
        )
        self.disclosures = Counter(
            "consent_gateway_disclosures", "Disclosure AuditEvents recorded", registry=r,
        )
        self.ambiguous_consents = Counter(
            "consent_gateway_ambiguous_consents",
            "Consent versions loaded whose root provision has conditions but no type",
            registry=r,
        )
        self.change_poll_errors = Counter(
            "consent_gateway_change_poll_errors", "Consent change polls that failed", registry=r,
        )
        self.change_poll_age = Gauge(
            "consent_gateway_change_poll_age_seconds",
            "Seconds since the last successful consent change poll", registry=r,
            multiprocess_mode="livemax",
        )
        self.audit_backlog = Gauge(
            "consent_gateway_audit_delivery_backlog_bytes",
            "Audit bytes written locally but not yet delivered to audit.fhir_url", registry=r,
            multiprocess_mode="livemax",
        )
        self.errors = Counter(
            "consent_gateway_errors", "Error answers made by the gateway", ("code",), registry=r,
        )
        # Label children bound once: ``labels()`` validates and locks on every call.
        self._decided = {decision: self.decisions.labels(decision) for decision in DECISIONS}
        self._timed = {interaction: self.request_duration.labels(interaction) for interaction in INTERACTIONS}
        # Filled as answers come; the keys come from closed sets (methods, interactions, statuses).
        self._answered: dict[tuple[str, str, int], Counter] = {}
        self._filtered: dict[tuple[str, str], Counter] = {}
        self._errored: dict[str, Counter] = {}  # error codes: the gateway's own and http-<status>
        self._shadowed: dict[str, Counter] = {d: self.shadow_decisions.labels(d) for d in DECISIONS}
        self._glass: dict[str, Counter] = {}  # break-glass reasons: the configured ones only

    def observe_request(self, method: str, interaction: str, status: int, seconds: float) -> None:
        """Count one answered request (unknown methods are folded into ``other``)."""
        method_label = method if method in METHODS else "other"
        key = (method_label, interaction, status)
        counter = self._answered.get(key)
        if counter is None:
            counter = self._answered[key] = self.requests.labels(method_label, interaction, str(status))
        counter.inc()
        timer = self._timed.get(interaction)
        if timer is None:
            timer = self._timed[interaction] = self.request_duration.labels(interaction)
        timer.observe(seconds)

    def count_decision(self, decision: str) -> None:
        """Count one request's consent decision (``permit``, ``filtered`` or ``deny``)."""
        self._decided[decision].inc()

    def count_error(self, code: str) -> None:
        """Count one error answer by its code (``GatewayError.code``, ``http-404``, ...)."""
        counter = self._errored.get(code)
        if counter is None:
            counter = self._errored[code] = self.errors.labels(code)
        counter.inc()

    def count_shadow(self, decision: str) -> None:
        """Count one would-be decision of shadow mode (``permit``, ``filtered`` or ``deny``)."""
        counter = self._shadowed.get(decision)
        if counter is None:
            counter = self._shadowed[decision] = self.shadow_decisions.labels(decision)
        counter.inc()

    def count_break_glass(self, reason: str) -> None:
        """Count one break-glass access by its reason (one of ``break_glass.reasons``)."""
        counter = self._glass.get(reason)
        if counter is None:
            counter = self._glass[reason] = self.break_glass.labels(reason)
        counter.inc()

    def count_filtered(self, resource_type: str, reason: str, count: int = 1) -> None:
        """Count removed resources; the caller passes only known FHIR type names."""
        key = (resource_type, reason if reason in FILTER_REASONS else "consent")
        counter = self._filtered.get(key)
        if counter is None:
            counter = self._filtered[key] = self.resources_filtered.labels(*key)
        counter.inc(count)
