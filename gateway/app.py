"""Composition: build the proxy and admin applications from Settings and run them."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from gateway.audit import AuditDelivery, AuditLog, disclosures_path
from gateway.config import ConfigError, Settings
from gateway.core.errors import ConsentUnavailable
from gateway.core.fhir import normal_base
from gateway.core.labels import LabelIndex
from gateway.core.model import CONFIDENTIALITY_RANK
from gateway.core.sensitivity_codes import CODES as SENSITIVITY_CODES
from gateway.rules import load_rules
from gateway.sealing import KeyFileError, PageSeal
from gateway.sources.changes import ChangeFeed
from gateway.sources.deciding import DecidingFeed, Forget
from gateway.sources.factory import build_source
from gateway.sources.fhir import FhirConsentSource
from gateway.sources.store import ConsentStore
from gateway.web.enforcement import ConsentEnforcement, own_bases, policy_from
from gateway.metrics import Metrics
from gateway.upstream import Upstream
from gateway.upstream_auth import build_credentials, tls_context
from gateway.issuer import Issuer
from gateway.web import admin, discovery, proxy
from gateway.web.drain import Drain, build_drain_middleware
from gateway.web.middleware import JsonLogFormatter, build_error_middleware, code_locations, request_id_middleware
from gateway.web.protocol import FhirAppRunner
from gateway.web.resolve import TargetCache, role_resolver
from gateway.web.state import STATE, GatewayState, Readiness

log = logging.getLogger("gateway")

AUDIT_POLL_S = 1.0  # listen.workers above 1: how often worker 0 looks for the others' audit lines


def _server(url: str, settings: Settings, own: Upstream | None = None) -> Upstream:
    """A FHIR server session; ``own`` lends its TLS settings and credentials (same FHIR estate)."""
    return Upstream(
        url, timeout_s=settings.upstream.timeout_s, max_connections=settings.upstream.max_connections,
        tls=own.tls if own else None, credentials=own.credentials if own else None,
        max_response_bytes=settings.upstream.max_response_bytes,
    )


def _fhir_upstream(settings: Settings) -> Upstream:
    """The upstream with ``upstream.ca_file``/mTLS and ``upstream.auth`` (ConfigError when unreadable)."""
    return Upstream(
        settings.upstream.url, timeout_s=settings.upstream.timeout_s,
        max_connections=settings.upstream.max_connections, tls=tls_context(settings.upstream),
        credentials=build_credentials(settings.upstream.auth, os.environ, settings.upstream.timeout_s),
        max_response_bytes=settings.upstream.max_response_bytes,
    )


def build_state(settings: Settings, metrics: Metrics | None = None, labels: LabelIndex | None = None) -> GatewayState:
    """Everything the handlers share, built once at start-up (rules loaded, store empty)."""
    metrics = metrics or Metrics()
    labels = labels or load_rules(settings.sensitivity.rules_dir)
    check_explicit_labels(settings, labels)
    upstream = _fhir_upstream(settings)
    consent_server = None
    if settings.consent_source_url.rstrip("/") != upstream.base_url:
        # A FHIR consent server is reached like the upstream; a vendor API with its own key.
        fhir_source = upstream if settings.consent.source_kind == "fhir" else None
        consent_server = _server(settings.consent_source_url, settings, fhir_source)
    # The bases under which an absolute reference names this FHIR server's resources.
    ours = own_bases(upstream.base_url, settings.public_base_url, settings.upstream.reference_bases)
    source = build_source(settings, upstream, consent_server, os.environ, labels, ours)
    store = ConsentStore(
        source, metrics, ttl_s=settings.consent.cache_ttl_s, max_patients=settings.consent.cache_max_patients,
        # Related data targets live on the FHIR server, read with the gateway's own credentials.
        related=FhirConsentSource(upstream, ours=ours).references,
        # A FHIR consent server's own base names what its relative references name.
        ours=ours | {normal_base(settings.consent_source_url)} if settings.consent.source_kind == "fhir" else ours,
    )
    policy = policy_from(settings.consent, settings.sensitivity, labels)
    # Medications, their ingredients and PractitionerRoles read from the server: one cache, so a
    # write through the gateway evicts what it changed (proxy.evict_targets).
    targets = TargetCache(settings.consent.cache_ttl_s)
    return GatewayState(
        settings=settings,
        upstream=upstream,
        metrics=metrics,
        labels=labels,
        store=store,
        # PractitionerRoles named as authors: read only for consents that read authors.
        enforcement=ConsentEnforcement(
            store, labels, policy, roles=role_resolver(upstream, targets),
            ours=ours,
        ),
        audit=open_audit(settings),
        consent_server=consent_server,
        readiness=Readiness(window_s=3 * settings.upstream.health_interval_s),
        medications=targets,
        disclosures=open_disclosures(settings),
        issuer=Issuer(settings.auth.jwt) if settings.auth.mode == "jwt" else None,
        pages=page_seal(settings),
    )


def page_seal(settings: Settings) -> PageSeal:
    """The seal of paging links: under ``enforcement.paging_key_file`` (ConfigError, exit 2, when
    it cannot be read or is too short), else under a key made now."""
    path = settings.enforcement.paging_key_file
    if path is None:
        return PageSeal.random()
    try:
        return PageSeal.from_file(path)
    except KeyFileError as exc:
        raise ConfigError(f"enforcement.paging_key_file: {exc}") from None


def check_explicit_labels(settings: Settings, labels: LabelIndex) -> None:
    """Each label named in ``sensitivity.explicit_consent_required`` must be one a resource can
    carry: a misspelt label would leave the data it meant open to any general permit."""
    required = settings.sensitivity.explicit_consent_required
    if isinstance(required, str):
        return
    known = SENSITIVITY_CODES | CONFIDENTIALITY_RANK.keys() | labels.sensitive
    for code in required:
        if code not in known:
            raise ConfigError(
                f"sensitivity.explicit_consent_required: unknown label {code!r} "
                "(neither a label of the rules nor a v3 sensitivity or confidentiality code)"
            )


def open_audit(settings: Settings) -> AuditLog:
    """The audit log, opened now: ConfigError (exit 2) when it cannot be written."""
    audit = AuditLog(settings.audit.path, stdout=settings.audit.stdout)
    try:
        audit.open()
    except OSError as exc:
        raise ConfigError(f"audit.path: cannot write the audit file: {exc.strerror or exc}") from None
    return audit


def open_disclosures(settings: Settings) -> AuditLog | None:
    """The disclosures file beside the audit file (none with ``audit.disclosures: none``),
    opened now: ConfigError (exit 2) when it cannot be written."""
    if settings.audit.disclosures == "none":
        return None
    log = AuditLog(disclosures_path(settings.audit.path), stdout=settings.audit.stdout)
    try:
        log.open()
    except OSError as exc:
        raise ConfigError(f"audit.disclosures: cannot write {log.path.name}: {exc.strerror or exc}") from None
    return log


async def _once_listening(state: GatewayState, work: Callable[[], Awaitable[None]]) -> None:
    """Run ``work`` once both listeners are bound (a start that fails to bind stays quiet)."""
    await state.listening.wait()
    await work()


def _deciding_feeds(state: GatewayState, poll_s: float) -> list[DecidingFeed]:
    """Polls of what decides besides Consents, on the server each is read from: memberships
    where the consent source reads them (the consent server of a FHIR source, else the FHIR
    server), Medications, Substances and PractitionerRoles on the FHIR server."""
    targets: dict[str, Forget] = {
        rtype: functools.partial(_forget_target, state, rtype) for rtype in sorted(proxy.DECIDING_TARGETS)
    }
    groups: dict[str, Forget] = {rtype: state.store.forget_memberships for rtype in sorted(proxy.MEMBERSHIP_TYPES)}
    members_on = state.consent_server if state.settings.consent.source_kind == "fhir" else None
    if members_on is None:
        return [DecidingFeed(state.upstream, {**groups, **targets}, state.metrics, poll_s)]
    return [DecidingFeed(state.upstream, targets, state.metrics, poll_s),
            DecidingFeed(members_on, groups, state.metrics, poll_s)]


def _forget_target(state: GatewayState, rtype: str, changed: str | None) -> None:
    state.medications.evict(rtype, changed.partition("/")[2] if changed else None)


async def _watch_dependencies(state: GatewayState) -> None:
    """Readiness: ping the FHIR server; ask the consent source when it has not answered lately."""
    interval = state.settings.upstream.health_interval_s
    while True:
        if await state.upstream.ping(timeout_s=min(interval, state.settings.upstream.timeout_s)):
            state.readiness.last_ok = time.monotonic()
        store = state.store
        stale = store.answered_at is None or time.monotonic() - store.answered_at > interval
        failed = store.failed_at is not None and (store.answered_at is None or store.failed_at >= store.answered_at)
        if store.probes and (stale or failed):
            with contextlib.suppress(ConsentUnavailable):
                await store.probe()
        await asyncio.sleep(interval)


def build_proxy_app(state: GatewayState) -> web.Application:
    """The FHIR-facing application; its cleanup_ctx owns the upstream session."""
    app = web.Application(
        middlewares=[
            request_id_middleware, proxy.observe_middleware, build_drain_middleware(state.drain, state.metrics),
            build_error_middleware(state.metrics),
        ],
        client_max_size=state.settings.listen.max_body_bytes,
    )
    app[STATE] = state

    async def upstream_ctx(_: web.Application) -> AsyncIterator[None]:
        await state.upstream.open()
        if state.consent_server is not None:
            await state.consent_server.open()
        if state.issuer is not None:
            await state.issuer.open()
        tasks = [asyncio.create_task(_watch_dependencies(state))]
        poll_s = state.settings.consent.change_poll_s
        if poll_s > 0:
            feed = ChangeFeed(state.store, state.metrics, poll_s)
            tasks.append(asyncio.create_task(_once_listening(state, feed.run)))
            for deciding in _deciding_feeds(state, poll_s):
                tasks.append(asyncio.create_task(_once_listening(state, deciding.run)))
        audit_server = delivery = None
        # With several workers all of them append to the audit files and worker 0 alone
        # delivers them, so each line goes out once; it looks for the others' lines every
        # AUDIT_POLL_S, as their writes do not wake it.
        if state.settings.audit.fhir_url and state.worker.owner:
            audit_server = _server(state.settings.audit.fhir_url, state.settings, state.upstream)
            await audit_server.open()
            audit_poll_s = AUDIT_POLL_S if state.worker.shared else None
            delivery = AuditDelivery(state.audit, audit_server, metrics=state.metrics, poll_s=audit_poll_s)
            tasks.append(asyncio.create_task(delivery.run()))
            if state.disclosures is not None:
                tasks.append(asyncio.create_task(AuditDelivery(state.disclosures, audit_server, poll_s=audit_poll_s).run()))
        yield
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if delivery is not None:
            delivery.close()
        if audit_server is not None:
            await audit_server.close()
        state.audit.close()
        if state.disclosures is not None:
            state.disclosures.close()
        await state.upstream.close()
        if state.consent_server is not None:
            await state.consent_server.close()
        if state.issuer is not None:
            await state.issuer.close()

    app.cleanup_ctx.append(upstream_ctx)
    discovery.add_routes(app, state.upstream.base.path.rstrip("/"))
    app.router.add_route("*", "/{tail:.*}", proxy.handle)
    return app


def build_admin_app(state: GatewayState) -> web.Application:
    app = web.Application(middlewares=[build_error_middleware(state.metrics)])
    app[STATE] = state
    admin.add_routes(app)
    return app


def build_worker_app(state: GatewayState) -> web.Application:
    """A worker's private socket (listen.workers above 1): what the other workers tell it."""
    app = web.Application(middlewares=[build_error_middleware(state.metrics)])
    app[STATE] = state
    admin.add_worker_routes(app)
    return app


def configure_logging(level: int = logging.INFO) -> None:
    """JSON lines on stderr for every gateway logger."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLogFormatter())
    root = logging.getLogger("gateway")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    # The JSON lines carry none of these; skipping them saves a stack walk and a few system
    # calls per line ("Optimization" in the logging HOWTO).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


@dataclass
class RunningGateway:
    """Both listeners, started; ``proxy_port``/``admin_port`` are the bound ports."""

    proxy_runner: web.AppRunner
    admin_runner: web.AppRunner
    proxy_port: int
    admin_port: int

    drain: Drain
    grace_s: float
    worker_runner: web.AppRunner | None = None  # the private socket (listen.workers above 1)

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish (bounded), release the upstream.

        Requests still running when the grace period ends are answered 503 (CONTRACT §2).
        """
        cutter = asyncio.get_running_loop().call_later(self.grace_s, self.drain.cut_all)
        try:
            await self.proxy_runner.cleanup()
        finally:
            cutter.cancel()
        await self.admin_runner.cleanup()
        if self.worker_runner is not None:
            await self.worker_runner.cleanup()


def _bound_port(runner: web.AppRunner) -> int:
    for site in runner.sites:
        server = getattr(site, "_server", None)
        if server is not None and server.sockets:
            return int(server.sockets[0].getsockname()[1])
    raise RuntimeError("listener is not bound")


def tune_gc() -> None:
    """Freeze start-up objects (rules, settings) out of the collector and collect less often.

    Every response allocates many short-lived dicts; the default thresholds make the cyclic
    collector rescan the long-lived start-up state over and over (measured: -20 % CPU on a
    1,000-resource answer). Answers are freed by reference counting (nothing of them sits in a
    reference cycle: tests/unit/test_cycles.py), so a young generation larger than several
    large answers in flight costs no memory and spares the collector walking them while they
    are decided (measured, 4 and 16 concurrent 1,000-resource answers: with 50,000, ~10 % of
    the CPU in the collector; with 500,000, none).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(500_000, 50, 100)


async def _bind(site: web.TCPSite, section: str, host: str, port: int) -> None:
    """Start ``site``; an OSError names the settings that chose the address (CONTRACT §3)."""
    try:
        await site.start()
    except OSError as exc:
        raise OSError(exc.errno, f"{section}.host {host}, {section}.port {port}: {exc.strerror or exc}") from None


async def start(state: GatewayState) -> RunningGateway:
    """Bind the proxy and admin listeners. Raises OSError when a port is taken."""
    settings = state.settings
    # aiohttp waits this long for handlers, then cancels and waits as long again: halve it.
    timeout = settings.listen.shutdown_timeout_s / 2
    # A connection must deliver a whole request head within this time of opening (or of its
    # previous answer): aiohttp's keep-alive timer, which also runs while a head trickles in.
    keepalive = settings.listen.header_timeout_s
    proxy_runner = FhirAppRunner(
        build_proxy_app(state), access_log=None, shutdown_timeout=timeout, keepalive_timeout=keepalive
    )
    admin_runner = web.AppRunner(
        build_admin_app(state), access_log=None, shutdown_timeout=timeout, keepalive_timeout=keepalive
    )
    role = state.worker
    worker_runner = web.AppRunner(build_worker_app(state), access_log=None) if role.shared else None
    await proxy_runner.setup()
    await admin_runner.setup()
    if worker_runner is not None:
        await worker_runner.setup()
    try:
        # SO_REUSEPORT with several workers: each binds the port and the kernel spreads connections.
        proxy_site = web.TCPSite(proxy_runner, settings.listen.host, settings.listen.port, reuse_port=role.shared or None)
        await _bind(proxy_site, "listen", settings.listen.host, settings.listen.port)
        if role.owner:
            admin_site = web.TCPSite(admin_runner, settings.admin.host, settings.admin.port)
            await _bind(admin_site, "admin", settings.admin.host, settings.admin.port)
        if worker_runner is not None:
            await web.UnixSite(worker_runner, str(role.socket_path(role.index))).start()
    except OSError:
        await proxy_runner.cleanup()
        await admin_runner.cleanup()
        if worker_runner is not None:
            await worker_runner.cleanup()
        raise
    state.listening.set()
    return RunningGateway(
        proxy_runner, admin_runner, _bound_port(proxy_runner), _bound_port(admin_runner) if role.owner else 0,
        # aiohttp gives handlers two ``timeout`` periods, then cancels them and closes their
        # connections: cut just before that, so the 503s still go out.
        drain=state.drain, grace_s=max(0.0, 2 * timeout - min(0.5, timeout / 2)), worker_runner=worker_runner,
    )


async def serve_until_signalled(state: GatewayState) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    running = await start(state)
    tune_gc()
    log.info(
        "listening: proxy %s:%d, admin %s:%d",
        state.settings.listen.host, running.proxy_port, state.settings.admin.host, running.admin_port,
    )
    await until_signalled()
    await running.stop()


def loop_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """An error the event loop caught outside any request (a callback's, a task nobody
    awaited): one log line naming its type and the code it passed through. SECURITY: never its
    message nor the context's values, which may quote the record being handled (asyncio's own
    handler prints both, with a traceback, on stderr)."""
    exc = context.get("exception")
    if isinstance(exc, BaseException):
        log.error(f"event loop error: {type(exc).__name__}", extra={"where": code_locations(exc)})
    else:
        log.error("event loop error")


async def until_signalled() -> None:
    """Wait for SIGTERM or SIGINT; later signals fall back to their defaults during shutdown.
    Errors the loop catches meanwhile are logged by ``loop_error``."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(loop_error)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(sig)
