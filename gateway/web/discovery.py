"""What a FHIR client reads before it has an identity: ``/metadata`` and SMART discovery.

Both answer without any identity (CONTRACT §4). ``/metadata`` is the upstream's
CapabilityStatement, read with the gateway's own credentials, its URLs pointing at the
gateway; in ``jwt`` mode its ``rest.security`` names SMART on FHIR and the issuer's
endpoints. ``/.well-known/smart-configuration`` exists only in ``jwt`` mode and is built
from the issuer's discovery document.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from gateway.core.enforce import scrubbed_outcome
from gateway.core.errors import UpstreamUnavailable
from gateway.web.middleware import INFO
from gateway.web.proxy import client_response, link_rewriter, public_base
from gateway.web.request import parse_route, reject_xml
from gateway.web.state import STATE, GatewayState

SECURITY_SERVICE = "http://terminology.hl7.org/CodeSystem/restful-security-service"
OAUTH_URIS = "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"
# Keys of a SMART configuration taken from the issuer's document (SMART App Launch 2.x §2.1).
_SMART_KEYS = (
    "issuer", "jwks_uri", "authorization_endpoint", "token_endpoint", "grant_types_supported",
    "token_endpoint_auth_methods_supported", "token_endpoint_auth_signing_alg_values_supported",
    "registration_endpoint", "scopes_supported", "response_types_supported", "management_endpoint",
    "introspection_endpoint", "revocation_endpoint", "capabilities", "code_challenge_methods_supported",
    "user_access_brand_bundle", "user_access_brand_identifier",
)
_DEFAULT_CAPABILITIES = ["client-confidential-asymmetric", "permission-v1", "permission-v2", "context-standalone-patient"]


async def smart_configuration_of(state: GatewayState) -> dict[str, Any]:
    """The SMART configuration of this gateway: the issuer's endpoints, its keys, its capabilities."""
    assert state.issuer is not None
    document = await state.issuer.discovery()
    config: dict[str, Any] = {k: document[k] for k in _SMART_KEYS if k in document}
    config["issuer"] = state.issuer.issuer
    config.setdefault("jwks_uri", state.issuer.jwks_url)
    config.setdefault("grant_types_supported", ["authorization_code", "client_credentials"])
    config.setdefault("code_challenge_methods_supported", ["S256"])
    config.setdefault("capabilities", _DEFAULT_CAPABILITIES)
    return config


def _security(config: dict[str, Any]) -> dict[str, Any]:
    extension = [
        {"url": name, "valueUri": config[key]}
        for name, key in (("token", "token_endpoint"), ("authorize", "authorization_endpoint"),
                          ("manage", "management_endpoint"), ("introspect", "introspection_endpoint"),
                          ("revoke", "revocation_endpoint"), ("register", "registration_endpoint"))
        if isinstance(config.get(key), str)
    ]
    security: dict[str, Any] = {
        "cors": True,
        "service": [{
            "coding": [{"system": SECURITY_SERVICE, "code": "SMART-on-FHIR", "display": "SMART-on-FHIR"}],
            "text": "OAuth2 using SMART-on-FHIR profile (see http://docs.smarthealthit.org)",
        }],
        "description": "Access tokens from the issuer named in .well-known/smart-configuration; "
                       "every answer is also decided by patient consent.",
    }
    if extension:
        security["extension"] = [{"url": OAUTH_URIS, "extension": extension}]
    return security


async def metadata(request: web.Request) -> web.StreamResponse:
    """The upstream's CapabilityStatement, without identity; SMART named in jwt mode."""
    state = request.app[STATE]
    info = request[INFO]
    route = parse_route(request.method, request.raw_path, state.upstream.base.path.rstrip("/"))
    info.interaction = route.interaction
    reject_xml(request)
    upstream = await state.upstream.request(
        "GET", state.upstream.url_for("metadata", request.rel_url.raw_query_string),
        headers={"Accept": "application/fhir+json", "X-Request-Id": info.request_id},
    )
    state.metrics.upstream_duration.observe(upstream.seconds)
    links = link_rewriter(state.upstream.base_url, public_base(request, state, route),
                          state.settings.upstream.reference_bases)
    try:
        parsed = orjson.loads(upstream.body) if upstream.body else None
    except orjson.JSONDecodeError:
        parsed = None
    if upstream.status >= 400:
        body = orjson.dumps(scrubbed_outcome(parsed if isinstance(parsed, dict) else {}))
        response = client_response(upstream, links, body, "permit", state.passed_headers.answer)
        response.content_type = "application/fhir+json"
        return response
    # SECURITY: nobody has been identified here, so nothing but the server's description leaves.
    if not isinstance(parsed, dict) or parsed.get("resourceType") not in ("CapabilityStatement", "OperationOutcome"):
        raise UpstreamUnavailable("The FHIR server did not answer with a CapabilityStatement.")
    if parsed["resourceType"] == "OperationOutcome":
        return client_response(upstream, links, orjson.dumps(scrubbed_outcome(parsed)), "permit", state.passed_headers.answer)
    if state.issuer is not None:
        security = _security(await smart_configuration_of(state))
        rests = parsed.get("rest")
        for rest in rests if isinstance(rests, list) and rests else [None]:
            if rest is None:
                parsed["rest"] = [{"mode": "server", "security": security}]
            elif isinstance(rest, dict):
                rest["security"] = security
    return client_response(upstream, links, links.body(orjson.dumps(parsed)), "permit", state.passed_headers.answer)


async def smart_configuration(request: web.Request) -> web.Response:
    """``/.well-known/smart-configuration``: jwt mode only (a 404 otherwise)."""
    state = request.app[STATE]
    request[INFO].interaction = "capabilities"
    if state.issuer is None:
        raise web.HTTPNotFound()
    response = web.json_response(await smart_configuration_of(state), dumps=lambda v: orjson.dumps(v).decode())
    response.headers["X-Consent-Decision"] = "permit"
    return response


def add_routes(app: web.Application, base_prefix: str) -> None:
    """Served at the root and under the upstream's base path, like every FHIR route."""
    for prefix in {"", base_prefix}:
        app.router.add_get(f"{prefix}/metadata", metadata)
        app.router.add_get(f"{prefix}/.well-known/smart-configuration", smart_configuration)
