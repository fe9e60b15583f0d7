"""The FHIR request handler: read the request, forward it, enforce, answer."""

from __future__ import annotations

import functools
import logging
import re
import time

from aiohttp import web
from multidict import CIMultiDict

from urllib.parse import parse_qsl, unquote

import orjson

from gateway.core.compartment import is_patient_data
from gateway.core.enforce import Enforced, scrubbed_outcome
from gateway.core.errors import BadRequest, ConsentDenied, PayloadTooLarge, Refused, UpstreamUnavailable
from gateway.core.fhir import JSON, reference_of, relative_reference
from gateway.core.links import LinkRewriter
from gateway.core.model import Actor
from gateway.core.projection import PROJECTION_PARAMS, Projection
from gateway.core.refusals import conditional_write, named_patients, unfilterable
from gateway.web.breakglass import audit, read_break_glass, record_emergency_consents
from gateway.web.enforcement import Emergency
from gateway.core.breakglass import is_emergency
from gateway.web.writes import WRITE_INTERACTIONS, consents_written, touched_consent_patients
from gateway.upstream import UpstreamResponse, end_to_end
from gateway.web.middleware import INFO, Handler, RequestInfo
from gateway.web.request import GATEWAY_HEADER_PREFIXES, GATEWAY_HEADERS, Route, parse_route, read_actor, read_purpose, reject_xml
from gateway.web.state import STATE, GatewayState

access_log = logging.getLogger("gateway.access")

_HOST_OK = re.compile(r"^[A-Za-z0-9.\-]+(:[0-9]{1,5})?$|^\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?$")
# Headers recomputed by the gateway or by aiohttp for the other leg.
_NOT_FORWARDED_REQUEST = GATEWAY_HEADERS | {"host", "content-length", "accept-encoding", "accept"}
_NOT_FORWARDED_RESPONSE = frozenset({"content-length", "content-encoding", "server", "date"})
_CONDITIONAL_READ = frozenset({"if-none-match", "if-modified-since", "if-match", "if-unmodified-since"})
# Headers of a stored resource the requester may not see.
_RESOURCE_HEADERS = ("Location", "Content-Location", "ETag", "Last-Modified")


def public_base(request: web.Request, state: GatewayState, route: Route) -> str:
    """The gateway's base as the client sees it (configured, or from Host/X-Forwarded-*)."""
    configured = state.settings.public_base_url
    if configured:
        return configured
    proto = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower()
    scheme = proto if proto in ("http", "https") else request.scheme
    host = request.headers.get("X-Forwarded-Host", "").split(",")[0].strip() or request.host
    if not _HOST_OK.match(host):
        host = "localhost"
    return f"{scheme}://{host}{route.prefix}"


@functools.lru_cache(maxsize=64)
def link_rewriter(upstream_base: str, public: str) -> LinkRewriter:
    """The (immutable) rewriter for a pair of bases, built once: a base rarely changes."""
    return LinkRewriter(upstream_base, public)


def upstream_headers(request: web.Request, request_id: str) -> CIMultiDict[str]:
    """End-to-end request headers minus the gateway's own; JSON asked of the upstream."""
    headers = end_to_end(request.headers)
    reading = request.method in ("GET", "HEAD")
    for name in list(headers.keys()):
        lower = name.lower()
        # SECURITY: the requester's identity headers are the gateway's alone, whatever their suffix;
        # a conditional read (304) would confirm a hidden record without a decision.
        if (lower in _NOT_FORWARDED_REQUEST or lower.startswith(GATEWAY_HEADER_PREFIXES)
                or (reading and lower in _CONDITIONAL_READ)):
            del headers[name]
    headers["Accept"] = "application/fhir+json"
    headers["X-Request-Id"] = request_id
    return headers


async def read_body(request: web.Request, limit: int) -> bytes | None:
    """The request body, refused with 413 beyond ``limit`` bytes."""
    if not request.can_read_body:
        return None
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"The request body exceeds the limit of {limit} bytes.")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"The request body exceeds the limit of {limit} bytes.")
        chunks.append(chunk)
    return b"".join(chunks)


def client_response(upstream: UpstreamResponse, links: LinkRewriter, body: bytes, decision: str) -> web.Response:
    """The answer to the client: end-to-end upstream headers, URLs rewritten, decision header."""
    headers = end_to_end(upstream.headers)
    for name in list(headers.keys()):
        lower = name.lower()
        if lower in _NOT_FORWARDED_RESPONSE:
            del headers[name]
        elif lower in ("location", "content-location"):
            headers[name] = links.header(headers[name])
    headers["X-Consent-Decision"] = decision
    return web.Response(status=upstream.status, body=body, headers=headers)


def _search_form(request: web.Request, route: Route, body: bytes | None) -> list[tuple[str, str]]:
    """Parameters of a form-encoded POST ``_search`` body (empty for anything else)."""
    if request.method != "POST" or route.interaction != "search" or not body:
        return []
    if "application/x-www-form-urlencoded" not in request.headers.get("Content-Type", "").lower():
        raise BadRequest("A POST _search body must be application/x-www-form-urlencoded.")
    try:
        return parse_qsl(body.decode(), keep_blank_values=True, strict_parsing=False)
    except UnicodeDecodeError:
        raise BadRequest("The _search body is not valid form data.") from None


def _forwarded_query(raw: str) -> str:
    """The query string for the upstream: verbatim, minus every ``_elements``/``_summary``.

    The gateway applies the projection after deciding; with any modifier (``:exclude``) the
    upstream could strip the codes that carry labels.
    """
    if not raw or ("%" not in raw and "_elements" not in raw and "_summary" not in raw):
        return raw
    kept = [
        item for item in raw.split("&")
        if unquote(item.split("=", 1)[0]).split(":", 1)[0] not in PROJECTION_PARAMS
    ]
    return "&".join(kept)


async def refuse_unfilterable(
    state: GatewayState, route: Route, query: list[tuple[str, str]], actor: Actor, purpose: str,
    method: str = "GET", request_if_none_exist: str | None = None,
) -> bool:
    """Refuse (403) what cannot be filtered unless every named patient is unconditionally permitted.

    Returns True when the request is such a one but allowed: it is still filtered like any
    other, except that a non-FHIR answer (``$graphql``) may pass.
    """
    why = unfilterable(route.parts, route.operation, query)
    condition = query
    if why is None:
        if_none_exist = request_if_none_exist
        why = conditional_write(method, route.parts, bool(query), if_none_exist)
        if if_none_exist:
            condition = parse_qsl(if_none_exist, keep_blank_values=True)
    if why is None:
        return False
    patients = named_patients(route.parts if condition is query else route.parts[:1], condition)
    if patients:
        looked = await state.enforcement.look_up(patients, actor, purpose)
        if state.enforcement.unconditional(looked, patients):
            return True
    access_log.info("refused", extra={"reasons": [why]})
    raise Refused("This request cannot be answered through the consent gateway; narrow it to resources that can be filtered.")


def parse_body(upstream: UpstreamResponse, route: Route) -> JSON | None:
    """The upstream's JSON body, parsed once; None when there is nothing to decide.

    SECURITY: anything but JSON is passed on only for the capability statement; an error
    answer in another format is replaced by a bare outcome, a 2xx one is refused (502).
    """
    if not upstream.body:
        return None
    ctype = upstream.headers.get("Content-Type", "").lower()
    if "json" not in ctype:
        if route.interaction == "capabilities":
            return None
        if upstream.status >= 400:
            return {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "processing"}]}
        raise UpstreamUnavailable("The FHIR server answered in a format the gateway cannot check.")
    try:
        body = orjson.loads(upstream.body)
    except orjson.JSONDecodeError:
        raise UpstreamUnavailable("The FHIR server sent a malformed answer.") from None
    if not isinstance(body, dict):
        raise UpstreamUnavailable("The FHIR server sent a malformed answer.")
    return body


def denied_answer(state: GatewayState) -> web.Response:
    """A denied read: 403, or a 404 byte-for-byte like the upstream's own (scrubbed) not-found."""
    if state.settings.enforcement.denied_read_status == 404:
        body = orjson.dumps(scrubbed_outcome({"issue": [{"severity": "error", "code": "not-found"}]}))
        return web.Response(status=404, body=body, content_type="application/fhir+json",
                            headers={"X-Consent-Decision": "deny"})
    raise ConsentDenied("Access to this resource is not permitted.")


def count_removed(state: GatewayState, result: Enforced) -> None:
    for rtype, decision in result.removed:
        reason = "sensitivity" if decision.labels else ("malformed" if decision.errors else "consent")
        # Only Patient-compartment types are ever removed; anything else folds into "other".
        state.metrics.count_filtered(rtype if is_patient_data(rtype) else "other", reason)


async def handle(request: web.Request) -> web.StreamResponse:
    """Proxy one FHIR request (CONTRACT §2-§7)."""
    state = request.app[STATE]
    info = request[INFO]
    route = parse_route(request.method, request.raw_path, state.upstream.base.path.rstrip("/"))
    info.interaction, info.resource_type = route.interaction, route.resource_type
    reject_xml(request)
    actor = read_actor(request)
    reason = read_break_glass(request, state.settings)
    # Break-glass turns the purpose into emergency treatment.
    purpose = "ETREAT" if reason is not None else read_purpose(request, state.settings)
    info.actor, info.purpose = actor.reference, purpose
    body = await read_body(request, state.settings.listen.max_body_bytes)
    # A POST _search carries its parameters in the body: they are checked like the URL's.
    form = _search_form(request, route, body)
    query = list(request.query.items()) + form
    exempted = await refuse_unfilterable(
        state, route, query, actor, purpose, request.method, request.headers.get("If-None-Exist")
    )
    await check_operation_target(state, request, route, actor, purpose)
    check_consent_write(state, request.method, route, body, actor)
    projection = Projection.from_query(
        [v for k, v in query if k == "_elements"], [v for k, v in query if k == "_summary"]
    )
    if form:
        body = _forwarded_query(body.decode() if body else "").encode()
    url = state.upstream.url_for(route.path, _forwarded_query(request.rel_url.raw_query_string))
    # HEAD is asked as GET so the answer can be decided; aiohttp sends no body for HEAD.
    method = "GET" if request.method == "HEAD" else request.method
    upstream = await state.upstream.request(
        method, url, headers=upstream_headers(request, info.request_id), body=body
    )
    state.metrics.upstream_duration.observe(upstream.seconds)
    links = link_rewriter(state.upstream.base_url, public_base(request, state, route))
    if route.interaction in WRITE_INTERACTIONS or route.interaction == "batch":
        evict_consents(state, request.method, route, body, upstream)
    parsed = parse_body(upstream, route)
    if parsed is not None and parsed.get("resourceType") == "OperationOutcome":
        # SECURITY: an upstream error text can name a hidden record; keep only its codes.
        scrubbed = orjson.dumps(scrubbed_outcome(parsed)) if upstream.status >= 400 else None
        return await _unchecked(state, info, upstream, links, actor, reason, route, scrubbed)
    if parsed is None or (exempted and "resourceType" not in parsed):
        # Nothing to decide, or a non-FHIR answer ($graphql) for patients who permit everything.
        return await _unchecked(state, info, upstream, links, actor, reason, route)
    if reason is None:
        await check_security_context(state, parsed, actor, purpose)
    confined = named_patients(route.parts, query)
    withheld = "404 Not Found" if state.settings.enforcement.denied_read_status == 404 else "403 Forbidden"
    result, emergency = await state.enforcement.enforce(
        parsed, actor, purpose, confined=confined, break_glass=reason, withheld_status=withheld
    )
    info.decision = result.header
    state.metrics.count_decision(result.header)
    count_removed(state, result)
    if result.denied or _all_versions_hidden(route, parsed, result):
        if route.interaction in WRITE_INTERACTIONS:
            return _write_withheld(upstream, links)
        return denied_answer(state)
    headers = {}
    if emergency.audited:
        # SECURITY: the audit line is on disk before any data leaves (CONTRACT §7).
        headers["X-Break-Glass-Audit-Id"] = await audit(
            state, emergency, actor, route.interaction, upstream.status, confined or frozenset()
        )
        await record_emergency_consents(state, emergency, actor, headers["X-Break-Glass-Audit-Id"])
    if projection is not None:
        if parsed.get("resourceType") == "Bundle":
            projection.bundle(parsed)
        else:
            projection.apply(parsed)
    # Unchanged bodies go out as the upstream wrote them (decimals and all).
    payload = orjson.dumps(parsed) if result.changed or projection is not None else upstream.body
    del parsed  # the decided tree is several times the answer's size: free it before rewriting
    response = client_response(upstream, links, links.body(payload), result.header)
    response.headers.update(headers)
    return response


def _all_versions_hidden(route: Route, parsed: JSON, result: Enforced) -> bool:
    """Instance history whose every version was withheld answers like a denied read."""
    if route.interaction != "history" or route.resource_id is None or not result.removed:
        return False
    return all(
        isinstance(e, dict) and isinstance(e.get("resource"), dict)
        and e["resource"].get("resourceType") == "OperationOutcome"
        for e in parsed.get("entry") or ()
    )


def _write_withheld(upstream: UpstreamResponse, links: LinkRewriter) -> web.Response:
    """A write that succeeded but whose stored resource the requester may not see."""
    response = client_response(upstream, links, orjson.dumps(WRITE_WITHHELD), "filtered")
    for name in _RESOURCE_HEADERS:
        response.headers.popall(name, None)
    response.content_type = "application/fhir+json"
    return response


def check_consent_write(state: GatewayState, method: str, route: Route, body: bytes | None, actor: Actor) -> None:
    """Consent writes: never an emergency grant (only break-glass makes those); optionally only
    the patient concerned or a listed role (``consent.writer_roles``)."""
    written = consents_written(method, route.resource_type, body)
    if written is None:
        return
    roles = state.settings.consent.writer_roles
    for consent in written:
        # Revoking a window (any status but active) is a write like any other.
        if isinstance(consent, dict) and is_emergency(consent) and consent.get("status") == "active":
            raise Refused("Emergency consents are created by break-glass only.")
        if roles is not None and actor.role not in roles:
            patient = consent.get("patient") if isinstance(consent, dict) else None
            if not (isinstance(patient, dict) and patient.get("reference") == actor.reference):
                raise Refused("This requester may not write consents.")


async def ensure_readable(state: GatewayState, reference: str, actor: Actor, purpose: str) -> None:
    """Refuse unless the requester may read ``reference`` (a missing target refuses nothing)."""
    target = await state.upstream.request(
        "GET", state.upstream.url_for(reference), headers={"Accept": "application/fhir+json"}
    )
    if target.status == 404:
        return
    try:
        parsed = orjson.loads(target.body) if target.status < 400 else None
    except orjson.JSONDecodeError:
        parsed = None
    if not isinstance(parsed, dict):
        raise ConsentDenied("Access to this resource is not permitted.")
    result, _ = await state.enforcement.enforce(parsed, actor, purpose, confined=None)
    if result.denied:
        raise ConsentDenied("Access to this resource is not permitted.")


async def check_security_context(state: GatewayState, parsed: JSON, actor: Actor, purpose: str) -> None:
    """A Binary is as readable as the patient data its securityContext names."""
    if parsed.get("resourceType") != "Binary":
        return
    context = reference_of(parsed.get("securityContext"))
    if context is None:
        return
    ref = relative_reference(context)
    if is_patient_data(ref.split("/", 1)[0]):
        await ensure_readable(state, ref, actor, purpose)


async def check_operation_target(
    state: GatewayState, request: web.Request, route: Route, actor: Actor, purpose: str
) -> None:
    """An instance operation on patient data runs only when the requester may read the instance.

    Its answer ($meta, $validate, ...) need not contain the instance, so it is decided first.
    """
    if (route.operation is None or route.resource_id is None or route.resource_type is None
            or route.operation == "$everything" or not is_patient_data(route.resource_type)):
        return
    await ensure_readable(state, f"{route.resource_type}/{route.resource_id}", actor, purpose)


WRITE_WITHHELD: JSON = {
    "resourceType": "OperationOutcome",
    "issue": [{"severity": "information", "code": "informational",
               "diagnostics": "The request was processed; the stored resource is not shown."}],
}


async def _unchecked(
    state: GatewayState, info: RequestInfo, upstream: UpstreamResponse, links: LinkRewriter,
    actor: Actor, reason: str | None, route: Route, body: bytes | None = None,
) -> web.Response:
    """An answer with nothing to decide (a write, an outcome, non-patient bytes), audited on break-glass.

    An answer that carries no data (an error) is a ``deny``, so a denied read and a missing
    record look the same.
    """
    decision = "permit" if upstream.status < 400 else "deny"
    info.decision = decision
    state.metrics.count_decision(decision)
    response = client_response(upstream, links, links.body(upstream.body if body is None else body), decision)
    if body is not None:
        response.content_type = "application/fhir+json"
    if reason is not None:
        target = frozenset({f"{route.resource_type}/{route.resource_id}"}) if route.resource_type == "Patient" and route.resource_id else frozenset()
        emergency = Emergency(reason)
        if route.resource_type and route.resource_id:
            emergency.returned.append((f"{route.resource_type}/{route.resource_id}", False))
        response.headers["X-Break-Glass-Audit-Id"] = await audit(state, emergency, actor, route.interaction, upstream.status, target)
    return response


def evict_consents(state: GatewayState, method: str, route: Route, body: bytes | None, upstream: UpstreamResponse) -> None:
    """A successful write that touched Consents evicts those patients (all, when unknown)."""
    if not 200 <= upstream.status < 300:
        return
    touched = touched_consent_patients(method, route.resource_type, body, upstream.body)
    if touched is None:
        return
    if None in touched:
        state.store.invalidate(None)
        return
    for patient in touched:
        state.store.invalidate(patient)


def log_access(method: str, info: RequestInfo, status: int, seconds: float) -> None:
    """One structured access line per FHIR request; no ids, codes or bodies."""
    access_log.info(
        "request",
        extra={
            "request_id": info.request_id,
            "method": method,
            "interaction": info.interaction,
            "resource_type": info.resource_type,
            "status": status,
            "duration_ms": round(seconds * 1000, 3),
            "decision": info.decision,
            "actor": info.actor,
            "purpose": info.purpose,
            "audit_id": info.audit_id,
        },
    )


@web.middleware
async def observe_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Metrics, access log and the decision header for each FHIR answer, errors included."""
    response = await handler(request)
    # An answer the gateway made itself (an error) returns no data: that is a deny.
    response.headers.setdefault("X-Consent-Decision", "deny")
    info = request[INFO]
    info.audit_id = response.headers.get("X-Break-Glass-Audit-Id")
    seconds = time.perf_counter() - info.started
    state = request.app[STATE]
    state.metrics.observe_request(request.method, info.interaction, response.status, seconds)
    log_access(request.method, info, response.status, seconds)
    return response
