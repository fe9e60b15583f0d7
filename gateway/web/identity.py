"""Who is asking (CONTRACT §4): ``X-Actor*`` headers, or a verified SMART on FHIR token.

In ``jwt`` mode the requester is the ``auth.jwt.actor_claim`` (``fhirUser``: a reference or
the absolute URL of one), the organization, purpose and role come from the configured
claims, and the token's scopes travel with the actor as ``Grants``. The ``X-Actor*`` and
``X-Purpose-Of-Use`` headers are refused in that mode: the token alone says who asks.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from yarl import URL

from gateway.config import Settings
from gateway.core.compartment import patients_of
from gateway.core.errors import BadRequest, InsufficientScope, Unauthenticated
from gateway.core.model import Actor
from gateway.core.purpose import PURPOSE_CODES
from gateway.core.scopes import Grants, parse_scopes, write_interaction
from gateway.issuer import CHALLENGE, Issuer, invalid_token, no_token
from gateway.web.request import Route, actor_headers, actor_of, read_purpose
from gateway.web.state import GatewayState

# fhirUser may name any of these (SMART App Launch: Practitioner, Patient, RelatedPerson, Person).
TOKEN_ACTOR_TYPES = frozenset({"Practitioner", "PractitionerRole", "Patient", "RelatedPerson", "Person"})
_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_ROLE = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")
_HEADERS_REFUSED = ("x-actor", "x-purpose-of-use")


@dataclass(frozen=True, slots=True)
class Identity:
    """The requester and, from a token, the purpose it states (None: header or default)."""

    actor: Actor
    purpose: str | None = None


def claim_reference(value: object, types: frozenset[str]) -> str | None:
    """``Type/id`` out of a reference or an absolute URL of one; None when it is neither."""
    if not isinstance(value, str) or not value or "%" in value or "\\" in value:
        return None  # an encoded or dot-segment path resolves to someone else
    if any(seg in (".", "..") for seg in value.split("?", 1)[0].split("/")):
        return None
    path = URL(value).path if "://" in value else value
    parts = [p for p in path.split("/") if p]
    if len(parts) < 2 or parts[-2] not in types or not _ID.match(parts[-1]):
        return None
    if "://" not in value and len(parts) != 2:
        return None
    return f"{parts[-2]}/{parts[-1]}"


def bearer_token(request: web.Request) -> str:
    values = request.headers.getall("Authorization", [])
    if not values:
        raise no_token()
    if len(values) > 1:
        raise BadRequest("The Authorization header must be given once.")
    scheme, _, token = values[0].strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise no_token()
    return token.strip()


def identity_from_claims(claims: dict[str, Any], settings: Settings) -> Identity:
    """The Identity a verified token's claims describe (401 when it names no requester)."""
    jwt = settings.auth.jwt
    actor_ref = claim_reference(claims.get(jwt.actor_claim), TOKEN_ACTOR_TYPES)
    if actor_ref is None:
        raise invalid_token(f"the {jwt.actor_claim} claim does not name a requester")
    organization = None
    if jwt.organization_claim and claims.get(jwt.organization_claim) is not None:
        organization = claim_reference(claims.get(jwt.organization_claim), frozenset({"Organization"}))
        if organization is None:
            raise invalid_token(f"the {jwt.organization_claim} claim does not name an Organization")
    purpose = None
    if jwt.purpose_claim and claims.get(jwt.purpose_claim) is not None:
        purpose = claims[jwt.purpose_claim]
        if not isinstance(purpose, str) or purpose not in PURPOSE_CODES:
            raise invalid_token(f"the {jwt.purpose_claim} claim is not a PurposeOfUse code")
    role = None
    if jwt.role_claim and claims.get(jwt.role_claim) is not None:
        role = claims[jwt.role_claim]
        if not isinstance(role, str) or not _ROLE.match(role):
            raise invalid_token(f"the {jwt.role_claim} claim is not a role code")
    patient = claims.get("patient")
    scopes = claims.get("scope", claims.get("scp", ""))
    grants = parse_scopes(
        scopes if isinstance(scopes, (str, list)) else "",
        patient if isinstance(patient, str) and _ID.match(patient.removeprefix("Patient/")) else None,
    )
    return Identity(Actor(actor_ref, organization=organization, role=role, grants=grants), purpose)


# Header values up to this long (all three together) have their Identity remembered.
_REMEMBERED_HEADERS_MAX = 512


async def identify(request: web.Request, state: GatewayState) -> Identity:
    """The requester of ``request``: 401 without a valid identity, 400 for refused headers."""
    if state.issuer is None:
        given = actor_headers(request)
        if sum(len(value) for value in given if value) > _REMEMBERED_HEADERS_MAX:
            return Identity(actor_of(*given))
        return _header_identity(*given)
    for name in request.headers:
        if name.lower().startswith(_HEADERS_REFUSED):
            raise BadRequest(f"The {name} header is not accepted: the access token says who is asking.")
    return identity_from_claims(await state.issuer.verify(bearer_token(request)), state.settings)


@functools.lru_cache(maxsize=1024)
def _header_identity(raw: str | None, org_raw: str | None, role: str | None) -> Identity:
    """The Identity of X-Actor header values, remembered (both are immutable, and a requester
    asks many times); values that are refused raise each time: exceptions are not remembered."""
    return Identity(actor_of(raw, org_raw, role))


def purpose_of(request: web.Request, settings: Settings, identity: Identity) -> str:
    """The token's purpose, else (headers mode) X-Purpose-Of-Use, else ``auth.default_purpose``."""
    if identity.purpose is not None:
        return identity.purpose
    return read_purpose(request, settings)


def _insufficient() -> InsufficientScope:
    return InsufficientScope(
        "The access token's scopes do not allow this request.",
        headers={"WWW-Authenticate": f'{CHALLENGE}, error="insufficient_scope"'},
    )


def _check_write(grants: Grants, interaction: str, rtype: str | None, resource: object) -> None:
    if not grants.permits_request(interaction, rtype):
        raise _insufficient()
    if interaction == "create" and rtype is not None:
        owners = patients_of(resource) if isinstance(resource, dict) else frozenset()
        if not grants.permits_write(rtype, owners):
            raise _insufficient()


def check_scopes(method: str, route: Route, resource: object, grants: Grants | None) -> None:
    """Refuse (403, ``insufficient_scope``) a write the token's scopes do not grant; reads are
    decided on what they return. ``admit`` runs it for a request and for each batch entry."""
    if grants is not None:
        _check_write(grants, write_interaction(method, route.interaction, route.operation), route.resource_type, resource)


__all__ = ["Identity", "Issuer", "Unauthenticated", "check_scopes", "identify", "purpose_of"]
