"""Reading an incoming FHIR request: its route below the FHIR base and who is asking."""

from __future__ import annotations

from collections.abc import Iterable
import functools
import re
from urllib.parse import unquote
from dataclasses import dataclass

from aiohttp import web

from gateway.config import Settings
from gateway.core.errors import BadRequest, NotAcceptable, Refused, Unauthenticated, UnsupportedMediaType
from gateway.core.fhir import TYPE_NAME
from gateway.core.model import ACTOR_TYPES, Actor
from gateway.core.purpose import PURPOSE_CODES

# Headers that describe the requester to the gateway; never sent upstream.
GATEWAY_HEADERS = frozenset(
    {"x-actor", "x-actor-organization", "x-actor-role", "x-purpose-of-use", "x-break-glass"}
)
GATEWAY_HEADER_PREFIXES = ("x-actor", "x-purpose-of-use", "x-break-glass")
_FHIR_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_ROLE = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")
_JSON_FORMATS = frozenset({"json", "application/json", "application/fhir+json", "application/json+fhir"})
_XML = re.compile(r"(^|[/+])xml\b")


@dataclass(frozen=True, slots=True)
class Route:
    """A request path split below the FHIR base, with its FHIR interaction."""

    path: str            # below the base, no leading slash: "Patient/1/_history/2"
    parts: tuple[str, ...]
    prefix: str          # the path prefix the client used for the base: "" or "/fhir"
    interaction: str
    resource_type: str | None
    resource_id: str | None
    operation: str | None  # "$everything", "$graphql", ...


def _interaction(method: str, parts: tuple[str, ...]) -> str:
    n = len(parts)
    if n == 0:
        return "batch" if method == "POST" else ("search" if method == "GET" else "other")
    if parts[0] == "metadata" and n == 1:
        return "capabilities" if method in ("GET", "HEAD") else "other"
    if any(p.startswith("$") for p in parts):
        return "operation"
    if "_history" in parts:
        idx = parts.index("_history")
        return "vread" if idx == n - 2 and method in ("GET", "HEAD") else "history"
    if parts[-1] == "_search":
        return "search"
    if method in ("GET", "HEAD"):
        return "read" if n == 2 else "search"
    return {
        "POST": "create" if n == 1 else "other",
        "PUT": "update", "PATCH": "patch", "DELETE": "delete",
    }.get(method, "other")


# Paths up to this long have their Route remembered (a Route is immutable): the path of a
# search (its query aside) and of a much-read record repeat. Longer ones are parsed each time,
# so the memo stays small.
_REMEMBERED_PATH_MAX = 256


def parse_route(method: str, raw_path: str, base_prefix: str) -> Route:
    """Route of ``raw_path``, served both at the root and under the upstream's base path."""
    path = raw_path.split("?", 1)[0]
    if len(path) > _REMEMBERED_PATH_MAX:
        return _route_of(method, path, base_prefix)
    return _remembered_route(method, path, base_prefix)


def _route_of(method: str, path: str, base_prefix: str) -> Route:
    prefix = ""
    if base_prefix and (path == base_prefix or path.startswith(base_prefix + "/")):
        prefix, path = base_prefix, path[len(base_prefix):]
    raw_parts = [p for p in path.split("/") if p]
    # SECURITY: classify what the upstream will see (it decodes %24graphql, %5Fhistory).
    parts = tuple(unquote(p) for p in raw_parts)
    # A ";" starts path parameters that many servers drop (Consent;x/1 is Consent/1 to them). A
    # "%" left after decoding (%2524everything) is in no FHIR type, id or operation name: a server
    # that decodes twice would run what the gateway did not see.
    if any(p in (".", "..") or "/" in p or "\\" in p or ";" in p or "%" in p for p in parts):
        raise BadRequest("The request path is not a FHIR path.")
    rtype = parts[0] if parts and TYPE_NAME.match(parts[0]) and parts[0] != "metadata" else None
    rid = parts[1] if rtype and len(parts) >= 2 and _FHIR_ID.match(parts[1]) else None
    operation = next((p for p in parts if p.startswith("$")), None)
    return Route("/".join(raw_parts), parts, prefix, _interaction(method, parts), rtype, rid, operation)


# A path that is not a FHIR path raises each time: exceptions are not remembered.
_remembered_route = functools.lru_cache(maxsize=1024)(_route_of)


METHOD_OVERRIDES = frozenset({"x-http-method-override", "x-http-method", "x-method-override"})


def check_identity_headers(request: web.Request) -> None:
    """Each who-is-asking header at most once and with one value (CONTRACT §4): of two, a
    parser that keeps the first and one that keeps the last would see different requesters."""
    headers = request.headers
    for name in headers:
        lower = name.lower()
        if lower in GATEWAY_HEADERS:
            values = headers.getall(name)
            if len(values) > 1 or "," in values[0]:
                raise BadRequest(f"The {name} header must be given once, with a single value.")
        elif lower in METHOD_OVERRIDES:
            # The server would run another method than the one the gateway checked.
            raise BadRequest("Method override headers are not accepted.")
        elif lower == "x-cascade":
            # A cascading delete removes the records referring to its target, hidden ones too.
            raise Refused("Cascading deletes cannot be made through the consent gateway.")


def check_formats(values: Iterable[str]) -> None:
    """Only FHIR JSON is served: a ``_format`` value that is no JSON gets 406."""
    for fmt in values:
        # A ``+`` sent unescaped (curl) arrives as a space; a mime type may carry parameters.
        if fmt.split(";", 1)[0].strip().lower().replace(" ", "+") not in _JSON_FORMATS:
            raise NotAcceptable("Only JSON is supported (_format must be json).")


def reject_xml(request: web.Request) -> None:
    """Only FHIR JSON is served: XML asked for by Accept or ``_format`` gets 406."""
    check_formats(request.query.getall("_format", []))
    accept = request.headers.get("Accept", "").lower()
    if accept and _XML.search(accept) and "json" not in accept and "*/*" not in accept:
        raise NotAcceptable("Only JSON is supported (Accept: application/fhir+json).")
    ctype = request.headers.get("Content-Type", "").lower()
    if request.can_read_body and ctype and "xml" in ctype:
        raise UnsupportedMediaType("Only JSON request bodies are supported.")


def _reference(value: str, allowed: frozenset[str], what: str) -> str:
    rtype, _, rid = value.strip().partition("/")
    if rtype not in allowed or not _FHIR_ID.match(rid):
        raise Unauthenticated(f"{what} must be a FHIR reference such as Practitioner/123.")
    return f"{rtype}/{rid}"


def actor_headers(request: web.Request) -> tuple[str | None, str | None, str | None]:
    """The raw X-Actor, X-Actor-Organization and X-Actor-Role values (None when absent)."""
    headers = request.headers
    return headers.get("X-Actor"), headers.get("X-Actor-Organization"), headers.get("X-Actor-Role")


def actor_of(raw: str | None, org_raw: str | None, role: str | None) -> Actor:
    """The requester the X-Actor header values name; missing or malformed X-Actor is a 401."""
    if not raw:
        raise Unauthenticated("X-Actor header is required.")
    reference = _reference(raw, ACTOR_TYPES, "X-Actor")
    organization = _reference(org_raw, frozenset({"Organization"}), "X-Actor-Organization") if org_raw else None
    if role is not None and not _ROLE.match(role):
        raise BadRequest("X-Actor-Role must be a v3 RoleCode such as PRCP.")
    return Actor(reference=reference, organization=organization, role=role)


def read_purpose(request: web.Request, settings: Settings) -> str:
    """The purpose of use; an unknown code is a 400 naming the allowed ones."""
    purpose = request.headers.get("X-Purpose-Of-Use", "").strip() or settings.auth.default_purpose
    if purpose not in PURPOSE_CODES:
        allowed = ", ".join(sorted(PURPOSE_CODES))
        raise BadRequest(f"Unknown X-Purpose-Of-Use code. Allowed codes: {allowed}.")
    return purpose
