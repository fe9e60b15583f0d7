"""The FHIR request handler: read the request, forward it, enforce, answer."""

from __future__ import annotations

import logging
import re
import time

from aiohttp import web
from multidict import CIMultiDict

from gateway.core.errors import PayloadTooLarge
from gateway.core.links import LinkRewriter
from gateway.upstream import UpstreamResponse, end_to_end
from gateway.web.middleware import INFO, Handler, RequestInfo
from gateway.web.request import GATEWAY_HEADERS, Route, parse_route, read_actor, read_purpose, reject_xml
from gateway.web.state import STATE, GatewayState

access_log = logging.getLogger("gateway.access")

_HOST_OK = re.compile(r"^[A-Za-z0-9.\-]+(:[0-9]{1,5})?$|^\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?$")
# Headers recomputed by the gateway or by aiohttp for the other leg.
_NOT_FORWARDED_REQUEST = GATEWAY_HEADERS | {"host", "content-length", "accept-encoding", "accept"}
_NOT_FORWARDED_RESPONSE = frozenset({"content-length", "content-encoding", "server", "date"})


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


def upstream_headers(request: web.Request, request_id: str) -> CIMultiDict[str]:
    """End-to-end request headers minus the gateway's own; JSON asked of the upstream."""
    headers = end_to_end(request.headers)
    for name in list(headers.keys()):
        if name.lower() in _NOT_FORWARDED_REQUEST:
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


async def handle(request: web.Request) -> web.StreamResponse:
    """Proxy one FHIR request (CONTRACT §2-§6)."""
    state = request.app[STATE]
    route = parse_route(request.method, request.raw_path, state.upstream.base.path.rstrip("/"))
    info = request[INFO]
    info.interaction, info.resource_type = route.interaction, route.resource_type
    reject_xml(request)
    actor = read_actor(request)
    purpose = read_purpose(request, state.settings)
    info.actor, info.purpose = actor.reference, purpose
    body = await read_body(request, state.settings.listen.max_body_bytes)
    url = state.upstream.url_for(route.path, request.query_string)
    upstream = await state.upstream.request(
        request.method, url, headers=upstream_headers(request, info.request_id), body=body
    )
    state.metrics.upstream_duration.observe(upstream.seconds)
    links = LinkRewriter(state.upstream.base_url, public_base(request, state, route))
    info.decision = "permit"
    return client_response(upstream, links, links.body(upstream.body), "permit")


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
        },
    )


@web.middleware
async def observe_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Metrics, access log and the decision header for each FHIR answer, errors included."""
    response = await handler(request)
    # An answer the gateway made itself (an error) returns no data: that is a deny.
    response.headers.setdefault("X-Consent-Decision", "deny")
    info = request[INFO]
    seconds = time.perf_counter() - info.started
    state = request.app[STATE]
    state.metrics.observe_request(request.method, info.interaction, response.status, seconds)
    log_access(request.method, info, response.status, seconds)
    return response
