"""The FHIR request handler: read the request, forward it, enforce, answer."""

from __future__ import annotations

import functools
from dataclasses import replace
from collections.abc import Callable, Iterator, Mapping
import logging
import re
import time
from urllib.parse import parse_qsl, unquote_plus

import msgspec
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.payload import Payload
from multidict import CIMultiDict

import orjson

from gateway.core.compartment import is_patient_data
from gateway.core.deciding_writes import DECIDING_TYPES
from gateway.core.enforce import SERVER_NOTE, Enforced, found_nothing, scrubbed_outcome
from gateway.core.errors import BadRequest, BreakGlassDisabled, ConsentDenied, PayloadTooLarge, Refused, UpstreamUnavailable
from gateway.core.fhir import JSON
from gateway.core.labels import may_extend
from gateway.core.links import LinkRewriter, without_last_links
from gateway.core.paging import paging_relations
from gateway.core.references import (
    displays_scrubber, has_u_escape, in_answer, may_name_unreleased, may_narrate, scrub_displays, unreleased_named,
)
from gateway.core import strict_json
from gateway.core.differences import scrub_differences
from gateway.core.strict_json import has_duplicate_keys
from gateway.core.view import AnswerView, ViewsInsufficient, checked_spans_of, read_answer, scrub_narratives, spans_of
from gateway.web.batch import (
    BatchPlan, all_versions_hidden, apply_projections, bodiless_read, found_nothing_slots, not_found_outcome, plan_batch, settle_slots,
    subject_hidden,
)
from gateway.web.breakglass import audit, read_break_glass, record_emergency_consents
from gateway.web import officer, pages, refill
from gateway.web.enforcement import Emergency, Observed
from gateway.web.exchange import Exchange, admit, prepare_projection
from gateway.web.resolve import resolve_references
from gateway.web.writes import WRITE_INTERACTIONS, touched_consent_patients
from gateway.core.answer_headers import HOP_BY_HOP
from gateway.upstream import UpstreamResponse, end_to_end
from gateway.web.passed_headers import passed_headers
from gateway.web.middleware import INFO, Handler, RequestInfo, log_line
from gateway.web.identity import identify, purpose_of
from gateway.web.request import (
    GATEWAY_HEADER_PREFIXES, GATEWAY_HEADERS, Route, check_formats, check_identity_headers, parse_route, reject_xml,
)
from gateway.web.state import STATE, GatewayState

access_log = logging.getLogger("gateway.access")

BREAK_GLASS_ACTORS = frozenset({"Practitioner", "PractitionerRole"})
_HOST_OK = re.compile(r"^[A-Za-z0-9.\-]+(:[0-9]{1,5})?$|^\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?$")
# Headers recomputed by the gateway or by aiohttp for the other leg.
_NOT_FORWARDED_REQUEST = GATEWAY_HEADERS | {"host", "content-length", "accept-encoding", "accept"}
_CONDITIONAL_READ = frozenset({"if-none-match", "if-modified-since", "if-match", "if-unmodified-since"})
# The request's headers left out in one pass: hop-by-hop, recomputed, and (a read) conditional.
_DROPPED_REQUEST = HOP_BY_HOP | _NOT_FORWARDED_REQUEST
_DROPPED_READ_REQUEST = _DROPPED_REQUEST | _CONDITIONAL_READ


def public_base(request: web.Request, state: GatewayState, route: Route) -> str:
    """The gateway's base as the client sees it (configured, or from Host/X-Forwarded-*)."""
    configured = state.settings.public_base_url
    if configured:
        return configured
    headers = request.headers
    given = (headers.get("X-Forwarded-Proto", ""), headers.get("X-Forwarded-Host", ""), request.scheme, request.host)
    if len(given[1]) + len(given[3]) > _REMEMBERED_HOSTS_MAX:
        return _public_base.__wrapped__(*given, route.prefix)
    return _public_base(*given, route.prefix)


# Host values up to this long (forwarded and own together) have their base remembered.
_REMEMBERED_HOSTS_MAX = 512


@functools.lru_cache(maxsize=256)
def _public_base(forwarded_proto: str, forwarded_host: str, scheme: str, host: str, prefix: str) -> str:
    """The base for these header values, remembered: a client's values rarely change."""
    proto = forwarded_proto.split(",")[0].strip().lower()
    if proto in ("http", "https"):
        scheme = proto
    host = forwarded_host.split(",")[0].strip() or host
    if not _HOST_OK.match(host):
        host = "localhost"
    return f"{scheme}://{host}{prefix}"


@functools.lru_cache(maxsize=64)
def link_rewriter(upstream_base: str, public: str, also: tuple[str, ...] = ()) -> LinkRewriter:
    """The (immutable) rewriter for a pair of bases (and the other bases the FHIR server writes
    for itself, ``upstream.reference_bases``), built once: a base rarely changes."""
    return LinkRewriter(upstream_base, public, also)


def upstream_headers(request: web.Request, request_id: str) -> CIMultiDict[str]:
    """End-to-end request headers minus the gateway's own; JSON asked of the upstream."""
    # SECURITY: the requester's identity headers are the gateway's alone, whatever their suffix;
    # a conditional read (304) would confirm a hidden record without a decision.
    dropped = _DROPPED_READ_REQUEST if request.method in ("GET", "HEAD") else _DROPPED_REQUEST
    headers = end_to_end(request.headers, dropped, GATEWAY_HEADER_PREFIXES)
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


class SplicedPayload(Payload):
    """A spliced answer sent as its pieces, each rewritten on the way (``rewrite``: the link
    rewriter), gathered into writes of about ``CHUNK`` bytes; chunked, never joined whole."""

    CHUNK = 256 * 1024

    def __init__(self, pieces: list[bytes | msgspec.Raw], rewrite: Callable[[bytes], bytes]) -> None:
        super().__init__(pieces, content_type="application/fhir+json")
        self._pieces = pieces
        self._rewrite = rewrite

    def _texts(self) -> Iterator[bytes]:
        rewrite = self._rewrite
        for piece in self._pieces:
            yield rewrite(piece if isinstance(piece, bytes) else bytes(piece))

    def element(self, name: str) -> object:
        """The value of the answer's top-level element ``name`` (None when it has none)."""
        index = self._element_at(name)
        if index is None:
            return None
        text = self._pieces[index]
        return orjson.loads(memoryview(text)[len(orjson.dumps(name)) + 1:])

    def replace_element(self, name: str, text: bytes | None) -> None:
        """The answer's top-level element ``name`` written as ``text`` (JSON), or gone (None)."""
        index = self._element_at(name)
        if index is None:
            return
        pieces = self._pieces
        if text is not None:
            pieces[index] = orjson.dumps(name) + b":" + text
        elif pieces[index - 1] == b",":
            del pieces[index - 1:index + 1]
        else:
            del pieces[index:index + 2 if pieces[index + 1] == b"," else index + 1]

    def _element_at(self, name: str) -> int | None:
        # Top-level elements are pieces of their own, written by the gateway (core.view.pieces):
        # an entry's text starts with "{".
        head = orjson.dumps(name) + b":"
        for index, piece in enumerate(self._pieces):
            if isinstance(piece, bytes) and piece.startswith(head):
                return index
        return None

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return b"".join(self._texts()).decode(encoding, errors)

    async def write(self, writer: AbstractStreamWriter) -> None:
        chunk: list[bytes] = []
        size = 0
        for text in self._texts():
            chunk.append(text)
            size += len(text)
            if size >= self.CHUNK:
                await writer.write(b"".join(chunk))
                chunk, size = [], 0
        if chunk:
            await writer.write(b"".join(chunk))
        self._pieces = []


def client_response(
    upstream: UpstreamResponse, links: LinkRewriter, body: bytes | Payload, decision: str,
    passed: Mapping[str, str],
) -> web.Response:
    """The answer to the client: the upstream headers ``passed`` allows for this kind of answer
    (``PassedHeaders``), URLs rewritten, decision header."""
    # SECURITY: an allow-list: a header the gateway does not know may name a withheld record.
    headers = passed_headers(upstream.headers, passed, links)
    headers["X-Consent-Decision"] = decision
    return web.Response(status=upstream.status, body=body, headers=headers)


def parse_body(upstream: UpstreamResponse, route: Route) -> JSON | None:
    """The upstream's JSON body, parsed once; None when there is nothing to decide.

    SECURITY: anything but JSON is passed on only for the capability statement; an error
    answer in another format is replaced by a bare outcome, a 2xx one is refused (502).
    """
    body = _loaded(upstream, route)
    # SECURITY: decided on one reading of a repeated key, read on another downstream.
    if body is not None and has_duplicate_keys(upstream.body, body):
        raise UpstreamUnavailable(_REPEATED_KEYS)
    return body


def parse_spliced(upstream: UpstreamResponse, route: Route) -> tuple[JSON | None, AnswerView | None]:
    """``parse_body`` for an answer sent as the upstream's bytes of what is kept (``can_splice``),
    with those bytes read beside it (``view.checked_spans_of``: with the C reader, the
    repeated-key check and the entries' spans are one pass over the answer)."""
    body = _loaded(upstream, route)
    if body is None:
        return None, None
    try:
        return body, checked_spans_of(upstream.body, body)
    except strict_json.DuplicateKey:
        raise UpstreamUnavailable(_REPEATED_KEYS) from None


_REPEATED_KEYS = "The FHIR server sent an answer with repeated keys."


def _loaded(upstream: UpstreamResponse, route: Route) -> JSON | None:
    """The upstream's JSON body parsed (not yet checked for repeated keys): ``parse_body``."""
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


def not_found(decision: str = "deny") -> web.Response:
    """The one answer for a record the requester cannot have: missing, or hidden in 404 mode."""
    return web.Response(status=404, body=NOT_FOUND_BODY, content_type="application/fhir+json",
                        headers={"X-Consent-Decision": decision})


NOT_FOUND_BODY = orjson.dumps(not_found_outcome())


def denied_answer(state: GatewayState) -> web.Response:
    """A denied read: 403, or in 404 mode exactly the answer of a missing record."""
    if state.settings.enforcement.denied_read_status == 404:
        return not_found()
    raise ConsentDenied("Access to this resource is not permitted.")


def count_removed(state: GatewayState, result: Enforced) -> None:
    counts: dict[tuple[str, str], int] = {}
    for rtype, decision in result.removed:
        reason = "sensitivity" if decision.labels else ("malformed" if decision.errors else "consent")
        if decision.combining == "scope":
            reason = "scope"
        # Only Patient-compartment types are ever removed; anything else folds into "other".
        key = (rtype if is_patient_data(rtype) else "other", reason)
        counts[key] = counts.get(key, 0) + 1
    for (rtype, reason), count in counts.items():
        state.metrics.count_filtered(rtype, reason, count)


async def exchange_of(request: web.Request, state: GatewayState, body: bytes | None) -> Exchange:
    """The request as an Exchange: route, identity, purpose, break-glass (CONTRACT §4). A
    request that follows a sealed paging link is the request of the link it seals (web.pages)."""
    prefix = state.upstream.base.path.rstrip("/")
    route = parse_route(request.method, request.raw_path, prefix)
    raw_query = request.rel_url.raw_query_string
    token = pages.page_token(raw_query) if raw_query else None
    if token is not None:
        public = public_base(request, state, route)
        path, raw_query = pages.opened(state.pages, token, public, request.method, not route.parts)
        route = parse_route(request.method, route.prefix + path, prefix)
    info = request[INFO]
    info.interaction, info.resource_type = route.interaction, route.resource_type
    reject_xml(request)
    if token is not None:
        check_formats(unquote_plus(item.partition("=")[2]) for item in raw_query.split("&")
                      if unquote_plus(item.partition("=")[0]) == "_format")
    check_identity_headers(request)
    identity = await identify(request, state)
    actor = identity.actor
    reason = read_break_glass(request, state.settings)
    if reason is not None and actor.reference.split("/", 1)[0] not in BREAK_GLASS_ACTORS:
        # An emergency override is a clinician's: a patient, relative or device cannot claim one.
        raise BreakGlassDisabled("Break-glass access is for clinicians.")
    # Break-glass turns the purpose into emergency treatment.
    purpose = "ETREAT" if reason is not None else purpose_of(request, state.settings, identity)
    info.actor, info.purpose = actor.reference, purpose
    return Exchange(
        method=request.method, route=route, raw_query=raw_query,
        actor=actor, purpose=purpose, reason=reason, body=body,
        content_type=request.headers.get("Content-Type", ""),
        if_none_exist=if_none_exist(request),
        query=(list(request.query.items()) if token is None else parse_qsl(raw_query, keep_blank_values=True))
        if raw_query else [],
    )


def if_none_exist(request: web.Request) -> str | None:
    """A conditional create's condition; given twice → 400: the gateway checks one search, and a
    server may run the other (or both joined)."""
    given = request.headers.getall("If-None-Exist", [])
    if len(given) > 1:
        raise BadRequest("If-None-Exist may be given once.")
    return given[0] if given else None


def withheld_status(state: GatewayState) -> str:
    return "404 Not Found" if state.settings.enforcement.denied_read_status == 404 else "403 Forbidden"


async def handle(request: web.Request) -> web.StreamResponse:
    """Proxy one FHIR request (CONTRACT §2-§7): admit, send, decide, answer."""
    state = request.app[STATE]
    info = request[INFO]
    ex = await exchange_of(request, state, None)
    refill.take_skip(state, ex)
    officer.open_outcome(request, ex)
    ex.body = await read_body(request, state.settings.listen.max_body_bytes)
    plan = None
    try:
        await admit(state, ex)
        if ex.route.interaction == "batch" and request.method == "POST":
            plan = await plan_batch(state, ex, withheld_status(state), public_base(request, state, ex.route))
            ex.body = plan.body
    except (ConsentDenied, Refused) as exc:
        if not officer.admitted_in_shadow(state, request, ex):
            if isinstance(exc, Refused):
                raise
            return denied_answer(state)
        prepare_projection(ex)
    if plan is not None and not plan.sent:
        # Every entry refused: nothing to send (an empty batch is an error to some servers).
        info.decision = "deny"
        state.metrics.count_decision("deny")
        body = orjson.dumps({"resourceType": "Bundle", "type": f"{plan.kind}-response", "entry": plan.answer([])})
        return web.Response(body=body, content_type="application/fhir+json", headers={"X-Consent-Decision": "deny"})
    upstream = await send(state, request, ex, info.request_id)
    if ex.finds_nothing or (plan is not None and plan.find_nothing):
        upstream = finding_nothing(upstream, plan)
    links = link_rewriter(state.upstream.base_url, public_base(request, state, ex.route),
                          state.settings.upstream.reference_bases)
    if ex.route.interaction in WRITE_INTERACTIONS or ex.route.interaction == "batch":
        evict_consents(state, request.method, ex.route, ex.body, upstream)
    response = await answer_page(state, request, ex, upstream, links, plan)
    if refill.wanted(state, ex, info.decision, upstream.body):
        # 404 mode: a page that lost matches is completed from the upstream's further pages.
        response = await refill.completed(state, request, ex, upstream, links, response, answer_page, upstream_headers)
    if state.settings.enforcement.mode == "enforce":
        # SECURITY: the server's paging parameters count or name what was withheld (web.pages).
        sent = response.body if isinstance(response, web.Response) else None
        spliced = sent if isinstance(sent, SplicedPayload) else None
        pages.seal_response(response, pages.Sealer(state.pages, links.public), asked_url(request, links.public, ex.route),
                            plan.urls if plan is not None else None, spliced, links.header)
    return response


def asked_url(request: web.Request, public: str, route: Route) -> str:
    """The URL the client asked, under the public base (an answer's ``self`` link)."""
    path = request.raw_path.split("?", 1)[0][len(route.prefix):]
    query = request.rel_url.raw_query_string
    if path in ("", "/") and query.startswith(pages.PAGE_PARAM + "="):
        return pages.sealed_link(public, query[len(pages.PAGE_PARAM) + 1:])  # as handed out
    return f"{public}{path}?{query}" if query else f"{public}{path}"


def finding_nothing(upstream: UpstreamResponse, plan: BatchPlan | None) -> UpstreamResponse:
    """The upstream's answer to a search that names a record the requester may not see (404
    mode, ``Exchange.finds_nothing``; a batch's such entries), made to find nothing: what the
    server answers for a missing record. An answer that is no search set, or cannot be read
    whole, goes on as it is (the pipeline decides it, or refuses it)."""
    if upstream.status != 200:
        return upstream
    try:
        parsed = orjson.loads(upstream.body)
    except orjson.JSONDecodeError:
        return upstream
    if not isinstance(parsed, dict) or has_duplicate_keys(upstream.body, parsed):
        return upstream
    changed = found_nothing(parsed) if plan is None else found_nothing_slots(plan, parsed)
    return replace(upstream, body=orjson.dumps(parsed)) if changed else upstream


async def answer_page(
    state: GatewayState, request: web.Request, ex: Exchange, upstream: UpstreamResponse, links: LinkRewriter,
    plan: BatchPlan | None = None,
) -> web.StreamResponse:
    """The answer to ``ex`` from the upstream's ``upstream``: checked, decided and spliced."""
    info = request[INFO]
    if upstream.status in (404, 410) and ex.route.interaction != "batch":
        # A missing record: the same answer as a hidden one in 404 mode, nothing of the upstream's.
        info.decision = "deny"
        state.metrics.count_decision("deny")
        return await audited(state, ex, upstream.status, not_found())
    if (ex.route.operation or "").lower() == "$diff" and upstream.status < 300:
        upstream = _released_differences(upstream)
    spliceable = can_splice(state, ex, upstream, plan)
    view = read_answer(upstream.body) if spliceable and len(upstream.body) >= state.settings.upstream.views_above_bytes else None
    if view is not None:
        parsed: JSON | None = view.body
    elif spliceable:
        parsed, view = parse_spliced(upstream, ex.route)
    else:
        parsed = parse_body(upstream, ex.route)
    if parsed is not None:
        ex.relations = paging_relations(parsed)
    if parsed is not None and parsed.get("resourceType") == "OperationOutcome":
        # SECURITY: an upstream error text can name a hidden record; keep only its codes. So can
        # the text a write is answered with ("Successfully deleted 3 resource(s): ...") and the
        # note a read is answered with ("Resource Observation/123 was filtered").
        scrubbed = orjson.dumps(scrubbed_outcome(parsed)) if upstream.status >= 400 else (
            orjson.dumps(scrubbed_outcome(parsed, WRITE_DONE)) if ex.route.interaction in WRITE_INTERACTIONS
            else orjson.dumps(scrubbed_outcome(parsed, SERVER_NOTE))
        )
        return await _unchecked(state, info, upstream, links, ex, scrubbed)
    if parsed is None:
        if bodiless_read(ex.route, upstream.status):
            # SECURITY: a record read without its body (``Prefer: return=minimal``) cannot be
            # decided, yet the 200, its ETag and date tell that it is there (fail closed).
            info.decision = "deny"
            state.metrics.count_decision("deny")
            return denied_answer(state)
        return await _unchecked(state, info, upstream, links, ex)  # nothing to decide
    if plan is not None and plan.refused and isinstance(parsed.get("entry"), list):
        parsed["entry"] = plan.answer(parsed["entry"])
    if view is not None and view.partial:
        try:
            return await decide_answer(state, request, ex, upstream, parsed, links, plan, view)
        except ViewsInsufficient:
            parsed = parse_body(upstream, ex.route)
            if parsed is None:  # pragma: no cover - a viewed answer parses whole too
                raise UpstreamUnavailable("The FHIR server sent a malformed answer.") from None
            view = spans_of(upstream.body, parsed)
    return await decide_answer(state, request, ex, upstream, parsed, links, plan, view)


# Interactions whose answers are spliced from the upstream's bytes (reads and searches).
_SPLICED = frozenset({"read", "vread", "search", "operation"})


def can_splice(state: GatewayState, ex: Exchange, upstream: UpstreamResponse, plan: BatchPlan | None) -> bool:
    """Whether the answer may go out as the upstream's bytes of what is kept (core.view): not
    for break-glass, shadow mode, a batch or a projection, which rewrite whole resources."""
    return not (
        plan is not None or ex.reason is not None or ex.projection is not None or upstream.status >= 300
        or ex.route.interaction not in _SPLICED or officer.is_shadow(state) or not upstream.body
        or "json" not in upstream.headers.get("Content-Type", "").lower()
    )


async def send(state: GatewayState, request: web.Request, ex: Exchange, request_id: str) -> UpstreamResponse:
    """Forward the admitted request; HEAD is asked as GET so its answer can be decided."""
    url = state.upstream.url_for(ex.route.path, ex.forwarded_query)
    method = "GET" if request.method == "HEAD" else request.method
    headers = upstream_headers(request, request_id)
    if "If-None-Exist" in headers:
        # A conditional create goes with the condition as admitted (narrowed, or none: 404 mode).
        del headers["If-None-Exist"]
        if ex.if_none_exist:
            headers["If-None-Exist"] = ex.if_none_exist
    upstream = await state.upstream.request(method, url, headers=headers, body=ex.body)
    state.metrics.upstream_duration.observe(upstream.seconds)
    return upstream


async def decide_answer(
    state: GatewayState, request: web.Request, ex: Exchange, upstream: UpstreamResponse,
    parsed: JSON, links: LinkRewriter, plan: BatchPlan | None, view: AnswerView | None = None,
) -> web.StreamResponse:
    """Decide every resource of the answer, remove what is denied, audit break-glass, project.

    With a ``view``, ``parsed`` holds views of the deciding elements and the answer is spliced
    from the upstream's bytes; ViewsInsufficient (before anything is decided) asks the caller
    for whole resources."""
    info = request[INFO]
    resolved = await resolve_references(
        state, parsed, upstream.body if plan is None else None, views=view is not None and view.partial,
    )
    confined = ex.confined
    shadow = officer.is_shadow(state)
    # Shadow mode decides a copy exactly as enforce mode would, and answers with the original.
    refused = plan.shadow_refused if plan is not None else None
    decided, originals = officer.shadow_copy(parsed, refused) if shadow else (parsed, {})
    observed = Observed()
    result, emergency = await state.enforcement.enforce(
        decided, ex.actor, ex.purpose, confined=confined, break_glass=ex.reason,
        withheld_status=withheld_status(state), resolved=resolved, observed=observed, views=view is not None and view.partial,
        label_keys=view.label_keys if view is not None else None,
        content_keys=view.content_keys if view is not None else None,
        strays=view.extended if view is not None else may_extend(upstream.body),
        slot_confined=plan.confined if plan is not None and not shadow else None,
    )
    status = withheld_status(state)
    denied = result.denied or all_versions_hidden(ex.route, decided) or (
        status.startswith("404") and subject_hidden(ex.route, decided)
    )
    outcome = officer.outcome_of(request)
    outcome.consents = observed.consents
    decided_result = result
    if denied:
        officer.count_denied(request, decided)
    if shadow:
        if plan is not None and plan.shadow_refused and len(plan.shadow_refused) == len(plan.sent):
            denied = True  # enforce mode would have sent nothing: every entry refused
        outcome.shadow = outcome.shadow or ("deny" if denied else result.header)
        result = officer.scopes_only(parsed, ex.actor, withheld_status(state))
    info.decision = result.header
    if ex.page is None or not ex.page.further:
        state.metrics.count_decision(result.header)  # once per request, not per page read to refill it
    count_removed(state, result)
    if result.denied or (denied and not shadow):
        if ex.route.interaction in WRITE_INTERACTIONS:
            return _write_withheld(upstream, links, state.passed_headers.answer)
        return denied_answer(state)
    headers = {}
    if emergency.audited:
        # SECURITY: the audit line is on disk before any data leaves (CONTRACT §7).
        headers["X-Break-Glass-Audit-Id"] = await audit(
            state, emergency, ex.actor, ex.route.interaction, upstream.status, confined or frozenset()
        )
        await record_emergency_consents(state, emergency, ex.actor, headers["X-Break-Glass-Audit-Id"])
    if ex.page is not None and ex.page.trim(parsed):
        result.changed = True  # the part of this page a refilled answer takes (web.refill)
    labels = {id(originals[k]): v for k, v in observed.labels.items() if k in originals} if shadow else observed.labels
    # In shadow mode the copy was decided: its patients are not the answer's resources'.
    owners = None if shadow else observed.owners
    touched = view.touched if view is not None else None
    changed = await officer.released(state, request, ex, parsed, labels, decided_result, touched, owners) or result.changed
    # A display or a listing's narrative may name what is not released (keys as written or \u-escaped).
    raw = upstream.body
    # A narrative describes what its resource refers to (references.scrub_narrative).
    narrated = may_narrate(raw) and not shadow
    listings = decided_result.listings
    may_display = (b'"display"' in raw or has_u_escape(raw) or listings or narrated) and not shadow
    released = frozenset(in_answer(parsed)) if may_display else frozenset()
    ours = state.enforcement.ours  # another server's record is never released here
    if narrated and not listings:
        # Each narrated entry decided from its own text (view.scrub_narratives); when that cannot
        # be, every kept text is read again, as for a listing.
        narratives = scrub_narratives(view, released, ours, owners) if view is not None else None
        if narratives is None:
            listings = True
        else:
            changed |= narratives
    passed = state.passed_headers.decided(ex.route.interaction, upstream.status, parsed)
    if view is not None:
        named = None if listings else unreleased_named(upstream.body, released, ours) if may_display else frozenset()
        if named != frozenset() and view.is_bundle:
            # The Bundle's own elements (a signature's who.display) are put back from the parse.
            changed |= scrub_displays({k: v for k, v in parsed.items() if k != "entry"}, released, ours)
        scrub = displays_scrubber(released, named, ours) if named != frozenset() else None
        if view.partial and view.is_bundle and (changed or scrub is not None):
            # A large answer is sent piece by piece: never joined, rewritten as it goes.
            response = client_response(upstream, links, SplicedPayload(view.pieces(scrub), links.body), result.header, passed)
        else:
            payload = view.splice(scrub) if changed or scrub is not None else upstream.body
            response = client_response(upstream, links, links.body(payload), result.header, passed)
        response.headers.update(headers)
        settle_bundle_headers(response, parsed, result)
        return response
    if may_display and (listings or may_name_unreleased(upstream.body, released, ours)):
        changed |= scrub_displays(parsed, released, ours)
    if plan is not None and isinstance(parsed.get("entry"), list):
        changed |= settle_slots(plan, parsed["entry"], status)
        if plan.projections:
            apply_projections(plan, parsed["entry"])
            changed = True
    if ex.projection is not None:
        if parsed.get("resourceType") == "Bundle":
            ex.projection.bundle(parsed)
        else:
            ex.projection.apply(parsed)
        changed = True
    # Unchanged bodies go out as the upstream wrote them (decimals and all).
    payload = orjson.dumps(parsed) if changed else upstream.body
    response = client_response(upstream, links, links.body(payload), result.header, passed)
    response.headers.update(headers)
    settle_bundle_headers(response, parsed, result)
    return response


def _released_differences(upstream: UpstreamResponse) -> UpstreamResponse:
    """A ``$diff`` answer without the differences a release of its records would not show
    (core.differences): its values are the records as stored, displays and narratives included."""
    try:
        parsed = strict_json.loads(upstream.body)
    except ValueError:
        return upstream  # read (and refused) as any answer that is not JSON
    if not isinstance(parsed, dict) or not scrub_differences(parsed):
        return upstream
    return replace(upstream, body=orjson.dumps(parsed))


def settle_bundle_headers(response: web.StreamResponse, parsed: JSON, result: Enforced) -> None:
    """A Bundle answer (a search, a history, an operation's) goes without the upstream's
    ``ETag`` and ``Last-Modified``, and without a ``rel="last"`` link in a ``Link`` header or a
    header that may count its matches when its total went.

    SECURITY: they describe the server's answer, hidden entries included (the newest hidden
    record's time, a tag that changes when a hidden record does), and the last page's offset
    counts the matches. Dropped from every Bundle, filtered or not, so their absence does not
    tell a filtered answer (404 mode)."""
    if parsed.get("resourceType") != "Bundle":
        return
    headers = response.headers
    headers.popall("ETag", None)
    headers.popall("Last-Modified", None)
    if result.drop_total:
        # A count in a header of the server's own (``X-Total-Count``, ``X-Result-Count``) goes
        # with Bundle.total: it counts the matches the answer withholds too.
        for name in {name for name in headers if _COUNTING_HEADER.search(name)}:
            headers.popall(name, None)
    if result.drop_total and "Link" in headers:
        values = [without_last_links(value) for value in headers.popall("Link")]
        for value in values:
            if value:
                headers.add("Link", value)


# Response headers that may count an answer's matches, by their names.
_COUNTING_HEADER = re.compile(r"count|total", re.IGNORECASE)


def _write_withheld(upstream: UpstreamResponse, links: LinkRewriter, passed: Mapping[str, str]) -> web.Response:
    """A write that succeeded but whose stored resource the requester may not see: ``passed``
    holds none of its headers (Location, Content-Location, ETag, Last-Modified)."""
    response = client_response(upstream, links, orjson.dumps(WRITE_WITHHELD), "filtered", passed)
    response.content_type = "application/fhir+json"
    return response


WRITE_DONE = "The request was processed."
WRITE_WITHHELD: JSON = {
    "resourceType": "OperationOutcome",
    "issue": [{"severity": "information", "code": "informational",
               "diagnostics": "The request was processed; the stored resource is not shown."}],
}


async def _unchecked(
    state: GatewayState, info: RequestInfo, upstream: UpstreamResponse, links: LinkRewriter,
    ex: Exchange, body: bytes | None = None,
) -> web.Response:
    """An answer with nothing to decide (a write, an outcome, non-patient bytes), audited on break-glass.

    An answer that carries no data (an error) is a ``deny``, so a denied read and a missing
    record look the same.
    """
    decision = "permit" if upstream.status < 400 else "deny"
    info.decision = decision
    state.metrics.count_decision(decision)
    passed = state.passed_headers.unchecked(ex.route.interaction, upstream.status)
    response = client_response(upstream, links, links.body(upstream.body if body is None else body), decision, passed)
    if body is not None:
        response.content_type = "application/fhir+json"
    return await audited(state, ex, upstream.status, response)


async def audited(state: GatewayState, ex: Exchange, status: int, response: web.Response) -> web.Response:
    """A break-glass answer with nothing decided in it is still audited before it leaves."""
    if ex.reason is None:
        return response
    route = ex.route
    target = frozenset({f"Patient/{route.resource_id}"}) if route.resource_type == "Patient" and route.resource_id else frozenset()
    emergency = Emergency(ex.reason)
    if route.resource_type and route.resource_id:
        emergency.returned.append((f"{route.resource_type}/{route.resource_id}", False))
    response.headers["X-Break-Glass-Audit-Id"] = await audit(state, emergency, ex.actor, route.interaction, status, target)
    return response


def evict_consents(state: GatewayState, method: str, route: Route, body: bytes | None, upstream: UpstreamResponse) -> None:
    """A successful write that touched Consents evicts those patients (all, when unknown); one
    that may have changed what decides other records (a Medication, Substance or
    PractitionerRole read from the server) evicts it (``evict_targets``)."""
    if not 200 <= upstream.status < 300:
        return
    evict_targets(state, route)
    touched = touched_consent_patients(method, route.resource_type, body, upstream.body)
    if touched is None:
        return
    if None in touched:
        state.store.invalidate(None)
        return
    for patient in touched:
        state.store.invalidate(patient)


# What the gateway reads from the FHIR server to decide other records (core.references).
DECIDING_TARGETS = DECIDING_TYPES
# What consents' Group and CareTeam actors are read from (a requester's memberships).
MEMBERSHIP_TYPES = frozenset({"Group", "CareTeam"})


def evict_targets(state: GatewayState, route: Route) -> None:
    """Forget the cached copy of what a write changed: that instance, every one of its type
    (a create or conditional write), or all of them (a batch or transaction); a write of a
    Group or CareTeam (or a batch) forgets every cached membership."""
    if route.interaction == "batch":
        state.medications.evict()
        state.store.forget_memberships()
    elif route.resource_type in DECIDING_TARGETS:
        state.medications.evict(route.resource_type, route.resource_id)
    elif route.resource_type in MEMBERSHIP_TYPES:
        state.store.forget_memberships()


def log_access(method: str, info: RequestInfo, status: int, seconds: float) -> None:
    """One structured access line per FHIR request; no ids, codes or bodies."""
    log_line(
        access_log,
        "request",
        {
            "request_id": info.request_id,
            "method": method,
            "interaction": info.interaction,
            "resource_type": info.resource_type,
            "status": status,
            # Whole microseconds in milliseconds: round(ms, 3) without its decimal conversion.
            "duration_ms": round(seconds * 1_000_000) / 1000,
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
    officer.finish(request, response)
    if 200 <= response.status < 300 and state.settings.enforcement.denied_read_status == 404:
        conceal_withholding(response)  # SECURITY: after the decision line, which keeps the truth
    return response


def conceal_withholding(response: web.StreamResponse) -> None:
    """In 404 mode nothing tells a withheld record from a missing one (no "suppressed" entry
    either): an answer that went out says only that it is permitted, and is always sent chunked
    (a spliced answer is, one left as the upstream wrote it is not)."""
    response.headers["X-Consent-Decision"] = "permit"
    if response.status != 204 and not response.prepared and "Content-Length" not in response.headers:
        response.enable_chunked_encoding()
