"""One FHIR request as the gateway sees it, and the checks every request passes before it is sent.

The same ``Exchange`` stands for a request at the front door and for each entry of a batch
or transaction, and ``admit`` runs the same steps on both, in order: request shape, body
parsing, body parameters, conditional references, SMART scopes, refusals, operation targets,
write targets, Consent-write checks and projection stripping. A check added here applies to
every way in (CONTRACT §6).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, unquote

import orjson

from gateway.core import strict_json
from gateway.core.breakglass import emergency_window, is_emergency
from gateway.core.compartment import is_patient_data
from gateway.core.deciding_writes import DECIDING_TYPES, TEAM_TYPES, deciding_part, members_of
from gateway.core.errors import BadRequest, ConsentDenied, PagingLinkInvalid, Refused, UnsupportedMediaType, UpstreamUnavailable
from gateway.core.fhir import Bases, JSON, local_reference, reference_of, relative_reference
from gateway.core.references import UNREADABLE
from gateway.core.model import Actor
from gateway.core.paging import PageWindow
from gateway.core.projection import ELEMENT_PARAMS, PROJECTION_PARAMS, Projection
from gateway.core.refusals import (
    conditional_search, conditional_write, named_patients, named_records, subscription_criteria, subscription_write, unfilterable,
    narrowed, visible_matches,
)
from gateway.web.identity import check_scopes
from gateway.web.pages import names_page
from gateway.web.request import Route, check_formats
from gateway.web.resolve import read_target, resolve_references
from gateway.web.state import GatewayState

access_log = logging.getLogger("gateway.access")

FORM = "application/x-www-form-urlencoded"


@dataclass
class Exchange:
    """A request (or batch entry): route, requester, purpose, break-glass, and what is sent on."""

    method: str
    route: Route
    raw_query: str
    actor: Actor
    purpose: str
    reason: str | None              # break-glass reason, when the request carries one
    body: bytes | None = None
    content_type: str = ""
    if_none_exist: str | None = None
    resource: object = None         # the parsed JSON body, when it has one
    query: list[tuple[str, str]] = field(default_factory=list)  # URL query + form/Parameters body
    projection: Projection | None = None
    page: PageWindow | None = None  # 404 mode: the part of its page a refilled answer takes (web.refill)
    # 404 mode: the search names a record the requester may not see, so it answers as one naming
    # a missing record: nothing found (check_search_targets).
    finds_nothing: bool = False
    # The relations of the upstream answer's own paging links (core.paging.paging_relations),
    # read from the parsed answer; None when it was not read that way (web.refill.wanted).
    relations: frozenset[str] | None = None

    @property
    def forwarded_query(self) -> str:
        """The query string for the upstream: verbatim, minus every ``_elements``/``_fields``/``_summary``."""
        return strip_projection(self.raw_query)

    @property
    def confined(self) -> frozenset[str] | None:
        return named_patients(self.route.parts, self.query)


def strip_projection(raw: str) -> str:
    """``raw`` without ``_elements``/``_fields``/``_summary`` (any modifier, any encoding): the gateway applies
    the projection after deciding, so the upstream cannot strip the codes that carry labels."""
    if not raw:
        return raw
    # SECURITY: in any case (``_ELEMENTS``), as a server that reads names so would take them.
    low = raw.lower()
    if "%" not in raw and "_elements" not in low and "_summary" not in low and "_fields" not in low:
        return raw
    kept = [
        item for item in raw.split("&")
        if unquote(item.split("=", 1)[0]).split(":", 1)[0].lower() not in PROJECTION_PARAMS
    ]
    return "&".join(kept)


def read_body_parameters(ex: Exchange) -> None:
    """Parameters carried in a POST body are read like the query string (and stripped of
    projection parameters before it is sent): a form body of ``_search`` or any operation, or
    the ``Parameters`` resource of an operation."""
    if ex.method != "POST" or not ex.body:
        return
    ctype = ex.content_type.lower()
    # SECURITY: parameters in a body the gateway does not read (multipart form data; a _search
    # body of another type) would be read by a lenient server and never checked here.
    if ("multipart/" in ctype and ex.route.interaction in ("search", "operation")) or (
            ex.route.interaction == "search" and FORM not in ctype and ex.body.strip()):
        raise UnsupportedMediaType("Parameters in a POST body must be form-encoded (application/x-www-form-urlencoded).")
    if FORM in ctype:
        if ex.route.interaction not in ("search", "operation"):
            raise BadRequest("A form-encoded body is accepted only by _search and operations.")
        try:
            text = ex.body.decode()
        except UnicodeDecodeError:
            raise BadRequest("The form body is not valid form data.") from None
        pairs = parse_qsl(text, keep_blank_values=True)
        if names_page(pairs):
            raise PagingLinkInvalid()  # a sealed link is followed with GET, never posted
        ex.query += pairs
        ex.body = strip_projection(text).encode()
        return
    if ex.route.interaction == "operation" and isinstance(ex.resource, dict) \
            and ex.resource.get("resourceType") == "Parameters":
        params = ex.resource.get("parameter")
        if not isinstance(params, list):
            return
        kept = []
        for param in params:
            name = param.get("name") if isinstance(param, dict) else None
            # SECURITY: any primitive value[x] (valueCanonical, valueUrl, ...): a server may read
            # an id parameter from whichever it is given.
            value = next((v for k, v in param.items() if k.startswith("value") and isinstance(v, (str, bool, int, float))),
                         None) if isinstance(param, dict) else None
            if value is None and isinstance(param, dict) and isinstance(param.get("valueReference"), dict):
                # An operation's target named by reference is decided like one named by id.
                value = param["valueReference"].get("reference")
            if isinstance(name, str) and value is not None:
                ex.query.append((name, str(value).lower() if isinstance(value, bool) else str(value)))
                if name.split(":", 1)[0].lower() in PROJECTION_PARAMS:
                    continue
            kept.append(param)
        if len(kept) != len(params):
            ex.resource = {**ex.resource, "parameter": kept}
            ex.body = orjson.dumps(ex.resource)


def parse_json_body(ex: Exchange) -> None:
    """The JSON body, parsed once: a byte order mark is dropped, duplicate keys are a 400.

    A body the gateway must check (a Consent, a batch) and cannot read is a 400; any other is
    left to the FHIR server to judge.
    """
    if not ex.body or FORM in ex.content_type.lower():
        return
    must_read = ex.route.resource_type == "Consent" or ex.route.interaction == "batch"
    try:
        ex.resource = strict_json.loads(ex.body)
    except ValueError as exc:
        if must_read or isinstance(exc, strict_json.DuplicateKey):
            raise BadRequest("The request body is not a single valid JSON resource.") from None
        return
    if ex.body.startswith(strict_json.BOM):
        ex.body = ex.body[len(strict_json.BOM):]  # the FHIR server reads what was checked


def check_body_matches_route(ex: Exchange) -> None:
    """A create or update whose body is another type than its URL names, or an update whose
    body names another id, is a 400 (FHIR R4 http.html#update): a server that stores what the
    body says would take a Consent posted to ``Observation``, or Ana's Consent put at her id
    naming Ben's, past every check the URL chose (the Consent-write rules, the write target)."""
    route = ex.route
    body = ex.resource
    if route.interaction not in ("create", "update") or route.resource_type is None \
            or not isinstance(body, dict) or "resourceType" not in body:
        return
    if route.resource_type == "Binary" and "json" not in ex.content_type.lower():
        return  # a Binary's raw content (FHIR R4 binary.html#rest), whatever it holds
    if body.get("resourceType") != route.resource_type or (
            route.interaction == "update" and route.resource_id is not None and "id" in body
            and body["id"] != route.resource_id):
        raise BadRequest("The resource in the body is not the one the request URL names.")


def _asks_hidden_consents(state: GatewayState, ex: Exchange, patients: frozenset[str]) -> bool:
    """Whether an unfilterable request reads or selects by Consents (``Consent?...&_summary=count``,
    ``_has:Consent``) that a patient's consents do not decide for this requester: one naming
    records is its patient's and the consent writers' only (core.decision.consent_reader)."""
    if ex.actor.role is not None and ex.actor.role in state.settings.consent.writer_roles:
        return False
    if patients == {ex.actor.reference}:
        return False
    return ex.route.resource_type == "Consent" or any("consent" in f"{k}={v}".lower() for k, v in ex.query)


async def refuse_unfilterable(state: GatewayState, ex: Exchange) -> None:
    """Refuse (403) what cannot be filtered unless every named patient is unconditionally
    permitted; an allowed one is still filtered like any other."""
    route = ex.route
    why = unfilterable(route.parts, route.operation, ex.query, state.operations)
    condition = ex.query
    if why is None:
        why = conditional_write(ex.method, route.parts, ex.if_none_exist)
        if ex.if_none_exist:
            condition = parse_qsl(ex.if_none_exist, keep_blank_values=True)
    if why is None:
        return
    patients = named_patients(route.parts if condition is ex.query else route.parts[:1], condition)
    # An operation whose answer is not a set of resources ($graphql) can reach other patients'
    # records through references: no consent of the named patient can vouch for it.
    if patients and not why.startswith("operation:") and not _asks_hidden_consents(state, ex, patients):
        looked = await state.enforcement.look_up(patients, ex.actor, ex.purpose)
        if state.enforcement.unconditional(looked, patients):
            return
    access_log.info("refused", extra={"reasons": [why]})
    raise Refused("This request cannot be answered through the consent gateway; narrow it to resources that can be filtered.")


async def check_conditional_matches(state: GatewayState, ex: Exchange) -> None:
    """A conditional write let through (every patient it names permits the requester outright:
    a patient's own records) still reaches only what he may read: the gateway runs its search
    first (``If-None-Exist`` of a create, the query of an update, patch or delete), decided for
    him. A failed search, or matches that do not fit one page, refuse it (fail closed).

    In 403 mode a withheld match refuses it (403), as his search would say "withheld". In 404
    mode a hidden match reads as a missing one: the write is narrowed to the matches he may see
    (``_id=``); with none, a create is sent without its condition (it creates, as over no
    match) and an update, patch or delete is answered 404 and not sent (as one of a missing id).
    The server runs the search again; what changed in between is not seen."""
    route = ex.route
    condition = conditional_search(ex.method, route.parts, ex.if_none_exist, ex.forwarded_query)
    if condition is None or route.resource_type is None:
        return
    query = "&".join(filter(None, (strip_projection(condition), "_count=100")))
    url = state.upstream.url_for(route.resource_type, query)
    try:
        answer = await state.upstream.request("GET", url, headers={"Accept": "application/fhir+json"})
        page = strict_json.loads(answer.body) if answer.status == 200 else None
    except ValueError:
        page = None
    if not isinstance(page, dict) or page.get("resourceType") != "Bundle":
        raise UpstreamUnavailable("The FHIR server could not answer for the target of this request.")
    if any(isinstance(link, dict) and link.get("relation") == "next" for link in page.get("link") or ()):
        raise Refused(_MATCHES_REFUSAL)
    resolved = await resolve_references(state, page)
    result, _ = await state.enforcement.enforce(page, ex.actor, ex.purpose, confined=None, resolved=resolved)
    withheld = result.denied or bool(result.removed)
    if not conceals(state):
        if withheld:
            raise Refused(_MATCHES_REFUSAL)
        return
    # SECURITY: 404 mode. A refusal here, or the server's 200/412 over a match he may not see,
    # would tell a hidden record from a missing one.
    visible = [] if result.denied else visible_matches(page, route.resource_type)
    if not visible:
        if ex.method != "POST":
            raise ConsentDenied("Access to this resource is not permitted.")
        ex.if_none_exist = None
    elif withheld and ex.method == "POST":
        ex.if_none_exist = narrowed(ex.if_none_exist or "", visible)
    elif withheld:
        ex.raw_query = narrowed(ex.raw_query, visible)
        ex.query.append(("_id", ",".join(visible)))


_MATCHES_REFUSAL = "This conditional write would change records the requester may not read."


def refuse_subscription(state: GatewayState, ex: Exchange) -> None:
    """A Subscription makes the FHIR server push what its criteria select to the subscriber,
    around the gateway, for as long as it lives (a consent revoked later cannot stop it): it is
    refused (403), except a patient's own whose criteria name only that patient (self access,
    CONTRACT §5, which no consent revokes). Deleting one passes."""
    if subscription_write(ex.method, ex.route.resource_type) is None or ex.route.interaction == "search":
        return  # ``POST Subscription/_search`` reads (decided like any read)
    found = subscription_criteria(ex.resource) if ex.method != "PATCH" else None
    if found is not None and state.settings.consent.patient_self_access:
        patients = named_patients(*found)
        if patients == frozenset({ex.actor.reference}):  # named patients are Patient/<id>: a patient himself
            return
    access_log.info("refused", extra={"reasons": ["subscription"]})
    raise Refused("Subscriptions cannot be made through the consent gateway: the FHIR server would send "
                  "what they select around it.")


async def ensure_readable(state: GatewayState, reference: str, actor: Actor, purpose: str) -> JSON | None:
    """Refuse (ConsentDenied) unless the requester may read ``reference``; return it when found.

    A missing target refuses nothing; one that cannot be read refuses (fail closed).
    """
    parsed = await read_target(state.upstream, reference)
    if parsed is None:
        return None
    if parsed is UNREADABLE:
        raise UpstreamUnavailable("The FHIR server could not answer for the target of this request.")
    resolved = await resolve_references(state, parsed)
    result, _ = await state.enforcement.enforce(parsed, actor, purpose, confined=None, resolved=resolved)
    if result.denied:
        raise ConsentDenied("Access to this resource is not permitted.")
    return parsed


def _guarded(resource_type: str | None) -> bool:
    """Types whose instances are decided by consent (a Binary by its security context, a
    Subscription by the patients and codes its criteria name)."""
    return resource_type is not None and (
        is_patient_data(resource_type) or resource_type == "Binary" or resource_type == "Subscription")


async def check_operation_target(state: GatewayState, ex: Exchange) -> None:
    """An operation runs only when the requester may read the instances it names: the one in
    its path (``Observation/1/$meta``) and any named in its parameters (``$diff?from=...``).

    Its answer need not contain them, so they are decided first.
    """
    route = ex.route
    if route.operation is None:
        return
    targets: set[str] = set()
    # SECURITY: Patient/<id>/$everything is decided on its answer (subject_hidden); any other
    # instance's (Encounter/<id>/$everything) answers the records of an instance the requester
    # may not see, and answers at all where a missing one is a 404.
    if route.resource_id is not None and _guarded(route.resource_type) and _everything_subject(route) is None:
        targets.add(f"{route.resource_type}/{route.resource_id}")
    for _, value in ex.query:
        for item in value.split(","):
            ref = relative_reference(item.strip()) if "/" in item else ""
            if _REFERENCE.match(ref) and _guarded(ref.split("/", 1)[0]) and ref != _everything_subject(route):
                targets.add(ref)
    for target in sorted(targets):
        found = await ensure_readable(state, target, ex.actor, ex.purpose)
        if found is None and conceals(state):
            # SECURITY: 404 mode: an operation on a missing record is answered as one on a hidden
            # record, unsent: a server may run it anyway ($validate of the body sent, 200) or
            # answer it in its own way, either telling which ids hold hidden records.
            raise ConsentDenied("Access to this resource is not permitted.")


def _everything_subject(route: Route) -> str | None:
    """The patient of ``Patient/<id>/$everything``, whose answer decides it."""
    if route.operation == "$everything" and route.resource_type == "Patient" and route.resource_id:
        return f"Patient/{route.resource_id}"
    return None


async def check_write_target(state: GatewayState, ex: Exchange) -> None:
    """Nobody changes what he may not see: an update, patch or delete of patient data (or of a
    Binary) needs the stored instance to be readable by the requester, else a patch could
    relabel a hidden record and release it (Consents have their own rules).

    With ``denied_read_status: 404`` an update, patch or delete of a record that does not exist
    is refused as one of a hidden record, and not sent: the server would create it on update
    (201), or answer a delete of nothing in its own way (200 on some servers), either telling
    which ids hold hidden records."""
    route = ex.route
    if (ex.method not in ("PUT", "PATCH", "DELETE") or route.resource_id is None
            or route.resource_type == "Consent" or not _guarded(route.resource_type)):
        return
    stored = await ensure_readable(state, f"{route.resource_type}/{route.resource_id}", ex.actor, ex.purpose)
    if stored is None and conceals(state):
        raise ConsentDenied("Access to this resource is not permitted.")


async def check_deciding_write(state: GatewayState, ex: Exchange) -> None:
    """Nobody changes what decides records he may not see: an update of a Medication, Substance
    or PractitionerRole (what labels an order, who wrote a record) must leave the part that
    decides the records naming it as it is (``core.deciding``); a patch (not judged by its
    result), an update of an id the server does not hold (records naming a missing drug or role
    are closed; giving it one would decide them) and a ``$meta-delete`` (its security labels)
    are refused. A create (the server names it: nothing names it yet) and a delete (what names
    a missing one closes) pass, and so does any such write by ``consent.writer_roles``."""
    route = ex.route
    if route.resource_type not in DECIDING_TYPES or route.resource_id is None:
        return
    if ex.actor.role is not None and ex.actor.role in state.settings.consent.writer_roles:
        return  # who may rewrite any Consent may open anything already: a drug's correction is theirs
    if ex.method == "PATCH" or (route.operation or "").lower() == "$meta-delete":  # in any case: a server may fold it
        raise Refused(_DECIDING_REFUSAL)
    if ex.method != "PUT" or route.interaction != "update":
        return
    stored = await read_target(state.upstream, f"{route.resource_type}/{route.resource_id}")
    if stored is UNREADABLE:
        raise UpstreamUnavailable("The FHIR server could not answer for the target of this request.")
    new = ex.resource
    if stored is None or not isinstance(new, dict) or new.get("resourceType") != route.resource_type \
            or deciding_part(new) != deciding_part(stored):
        raise Refused(_DECIDING_REFUSAL)


async def check_team_write(state: GatewayState, ex: Exchange) -> None:
    """A consent may open records to a Group or CareTeam: whoever it holds reads them, so adding
    a member is as much a consent write as the consent itself. An update that adds a member
    (of an id the server does not hold: every member is added) or a patch (not judged by its
    result) is made only by ``consent.writer_roles``, or by the patient a CareTeam is about for
    his own. A create (the server names it: no consent names it yet), an update that adds no
    member, and a delete pass."""
    route = ex.route
    if route.resource_type not in TEAM_TYPES or route.resource_id is None or ex.method not in ("PUT", "PATCH"):
        return
    if ex.actor.role is not None and ex.actor.role in state.settings.consent.writer_roles:
        return
    if ex.method == "PATCH" or route.interaction != "update":
        raise Refused(_TEAM_REFUSAL)
    stored = await read_target(state.upstream, f"{route.resource_type}/{route.resource_id}")
    if stored is UNREADABLE:
        raise UpstreamUnavailable("The FHIR server could not answer for the target of this request.")
    new = ex.resource
    if not isinstance(new, dict) or new.get("resourceType") != route.resource_type:
        raise Refused(_TEAM_REFUSAL)
    if members_of(new) <= members_of(stored) or _own_care_team(ex, new, stored):
        return
    raise Refused(_TEAM_REFUSAL)


def _own_care_team(ex: Exchange, new: JSON, stored: JSON | None) -> bool:
    """A patient's own CareTeam, before and after: whom he lets in is his to say."""
    me = ex.actor.reference
    return me.startswith("Patient/") and new.get("resourceType") == "CareTeam" and all(
        isinstance(team, dict) and relative_reference(reference_of(team.get("subject")) or "") == me
        for team in (new, stored)
    )


_TEAM_REFUSAL = ("Members of a group or care team a consent may open records to are added only by those who "
                 "may write consents.")
_DECIDING_REFUSAL = ("This change would decide other records anew (a drug's codes or ingredients, a role's "
                     "practitioner or organization); it cannot be made through the consent gateway.")


def conceals(state: GatewayState) -> bool:
    """404 mode enforced: a hidden record reads exactly like a missing one (CONTRACT §6);
    shadow mode hides nothing, so it has nothing to conceal."""
    enforcement = state.settings.enforcement
    return enforcement.denied_read_status == 404 and enforcement.mode == "enforce"


async def check_version_target(state: GatewayState, ex: Exchange) -> None:
    """In 404 mode an old version (a vread, the instance history) of a record whose current
    version is hidden is hidden with it: a missing record has no versions, and a deleted one
    (read: gone) ends its history with the deletion, so versions of a record that reads as
    missing would say it is there, hidden. Each version is otherwise decided on its own."""
    route = ex.route
    if (route.interaction != "vread" and route.interaction != "history") or route.resource_id is None \
            or not _guarded(route.resource_type) or not conceals(state) or ex.reason is not None:
        return  # break-glass opens what consent hides; its answer is decided (and audited) as sent
    await ensure_readable(state, f"{route.resource_type}/{route.resource_id}", ex.actor, ex.purpose)


async def check_search_targets(state: GatewayState, ex: Exchange) -> None:
    """In 404 mode a search naming a record by reference (``Provenance?target=Observation/1``,
    ``Task?focus=..``; core.refusals.named_records) or by its compartment (``Encounter/1/*``)
    is answered as one naming a missing record
    when the requester may not see that record: it finds nothing (``finds_nothing``).

    SECURITY: the records that refer to a hidden one are often visible (a Provenance, a Task,
    an AuditEvent of the patient), so finding them tells that the hidden id is there, where a
    missing id finds nothing. Costs one read of each named record per such search, in 404 mode
    only; a record that cannot be read fails the search (502), as for an operation's target."""
    route = ex.route
    if route.interaction != "search" or not conceals(state) or ex.reason is not None:
        return  # break-glass opens what consent hides
    named = set(named_records(ex.query, state.enforcement.ours))
    if route.resource_id is not None and route.resource_type != "Patient" and _guarded(route.resource_type):
        # A compartment search (``Encounter/1/Observation``) finds what refers to its record.
        named.add(f"{route.resource_type}/{route.resource_id}")
    for reference in sorted(named):
        try:
            await ensure_readable(state, reference, ex.actor, ex.purpose)
        except ConsentDenied:
            ex.finds_nothing = True
            return


def check_conditional_references(ex: Exchange) -> None:
    """A written resource may not refer by search (``Patient?identifier=...``): the server
    resolves it over records the requester may not see, and 201 or 412 tells which exist."""
    if ex.method not in ("POST", "PUT", "PATCH") or not isinstance(ex.resource, (dict, list)):
        return
    stack: list[object] = [ex.resource]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            ref = node.get("reference")
            if isinstance(ref, str) and "?" in ref and not ref.startswith("#"):
                raise Refused("Conditional references cannot be resolved through the consent gateway.")
            stack.extend(v for v in node.values() if isinstance(v, (dict, list)))
        elif isinstance(node, list):
            stack.extend(v for v in node if isinstance(v, (dict, list)))


def check_request_shape(ex: Exchange) -> None:
    """Requests that are not FHIR interactions the gateway can reason about."""
    if ex.method not in ("GET", "HEAD") and "_history" in ex.route.parts:
        raise BadRequest("History is read-only.")
    if ex.method == "POST" and ex.route.interaction == "other":
        # SECURITY: no FHIR interaction (``POST Type/id``): a server refuses it as such, so
        # checking it against the record it names first would tell a hidden record (refused
        # here) from a missing one (refused there, or created by a lenient server).
        raise BadRequest("POST is not a FHIR interaction at this path (create posts to the type).")
    if any(name.split(":", 1)[0] == "_cascade" for name, _ in ex.query):
        # SECURITY: the server would delete the records that refer to the target, hidden ones
        # too, and name them in its answer (X-Cascade is refused with the headers).
        raise Refused("Cascading deletes cannot be made through the consent gateway.")
    if ex.route.resource_type == "Consent" and ex.method in ("POST", "PUT", "PATCH", "DELETE") \
            and ex.route.interaction not in ("create", "update", "patch", "delete", "search"):
        raise Refused("This requester may not write consents this way.")


_REFERENCE = re.compile(r"^[A-Z][A-Za-z]{1,63}/[A-Za-z0-9\-.]{1,64}$")


def _patient_of(consent: object, ours: Bases) -> str | None:
    """The patient a Consent is about; None when it names none, or another server's patient
    (a base not among ``ours``: not the requester of the same id)."""
    if isinstance(consent, dict):
        ref = reference_of(consent.get("patient"))
        return local_reference(ref, ours) if ref else None
    return None


def _may_write(ex: Exchange, roles: tuple[str, ...], patient: str | None) -> bool:
    """The patient for their own Consents, or a requester whose role is listed."""
    return (ex.actor.role is not None and ex.actor.role in roles) or (
        patient is not None and ex.actor.reference == patient
    )


_PATCH_PATHS_FOR_WRITERS = ("/patient", "/category", "/scope", "/policyRule", "/provision", "/status")


async def check_consent_write(state: GatewayState, ex: Exchange) -> None:
    """Consent writes (CONTRACT §6): only the patient for their own Consents and
    ``consent.writer_roles``; updates and deletes are checked against the stored Consent too;
    an active emergency Consent is made by break-glass only."""
    route = ex.route
    if route.resource_type != "Consent" or ex.method not in ("POST", "PUT", "PATCH", "DELETE"):
        return
    if route.interaction not in ("create", "update", "patch", "delete"):
        return
    roles = state.settings.consent.writer_roles
    ours = state.enforcement.ours
    if ex.method in ("POST", "PUT"):
        consent = ex.resource
        if not isinstance(consent, dict) or consent.get("resourceType") != "Consent":
            raise BadRequest("A Consent write needs a Consent resource as its body.")
        if is_emergency(consent) and consent.get("status") == "active":
            raise Refused("Emergency consents are created by break-glass only.")
        if not _may_write(ex, roles, _patient_of(consent, ours)) and not (
            ex.method == "PUT" and consent.get("status") != "active" and is_emergency(consent)
        ):
            raise Refused("This requester may not write this consent.")
    if ex.method == "PATCH":
        _check_consent_patch(ex, roles)
    if ex.method in ("PUT", "PATCH", "DELETE") and route.resource_id is None \
            and not (ex.actor.role is not None and ex.actor.role in roles):
        # A conditional write selects stored Consents the gateway cannot check one by one.
        raise Refused("This requester may not write consents selected by a search.")
    if ex.method in ("PUT", "PATCH", "DELETE") and route.resource_id is not None:
        stored = await _stored_consent(state, route.resource_id)
        if stored is not None and not _may_write(ex, roles, _patient_of(stored, ours)) \
                and not _closes_own_window(ex, stored, ours):
            raise Refused("This requester may not write this consent.")


def _closes_own_window(ex: Exchange, stored: JSON, ours: Bases) -> bool:
    """A clinician may close the emergency window his own break-glass opened (an update to a
    status other than active, same patient); nothing else of it."""
    window = emergency_window(stored, ours) if is_emergency(stored) else None
    new = ex.resource
    return (
        window is not None and window.actor == ex.actor.reference and ex.method == "PUT"
        and isinstance(new, dict) and new.get("status") != "active"
        and _patient_of(new, ours) == _patient_of(stored, ours) is not None
    )


def _check_consent_patch(ex: Exchange, roles: tuple[str, ...]) -> None:
    """A patch cannot be judged by its result, so it may not touch what decides who writes or
    what opens: JSON Patch only, and only a listed role may change those elements."""
    ops = ex.resource
    if not isinstance(ops, list) or not all(isinstance(op, dict) for op in ops):
        raise Refused("Consents may be patched only with JSON Patch.")
    privileged = ex.actor.role is not None and ex.actor.role in roles
    for op in ops:
        for key in ("path", "from"):
            if key not in op:
                continue
            path = str(op.get(key, ""))
            if path in ("", "/") or path.startswith(("/category", "/patient", "/resourceType", "/id")) or (
                not privileged and path.startswith(_PATCH_PATHS_FOR_WRITERS) and not _is_revocation(op)
            ):
                raise Refused("This requester may not change this part of a consent.")


def _is_revocation(op: JSON) -> bool:
    return op.get("path") == "/status" and op.get("op") == "replace" and op.get("value") in ("inactive", "rejected")


async def _stored_consent(state: GatewayState, consent_id: str) -> JSON | None:
    """The Consent as the FHIR server holds it (None when there is none); unreadable → 503."""
    stored = await read_target(state.upstream, f"Consent/{consent_id}")
    if stored is UNREADABLE:
        raise UpstreamUnavailable("The stored consent could not be read.")
    return stored


def prepare_projection(ex: Exchange) -> None:
    if not ex.query:
        ex.projection = None  # what from_query answers for no parameters, without building them
        return
    ex.projection = Projection.from_query(
        [v for k, v in ex.query if k.split(":", 1)[0].lower() in ELEMENT_PARAMS],
        [v for k, v in ex.query if k.split(":", 1)[0].lower() == "_summary"],
    )


async def admit(state: GatewayState, ex: Exchange) -> None:
    """Every check a request passes before it is sent upstream, in order."""
    check_request_shape(ex)
    parse_json_body(ex)
    check_body_matches_route(ex)
    read_body_parameters(ex)
    # A batch entry's URL and a form body carry ``_format`` as the front door's query does.
    check_formats(value for name, value in ex.query if name == "_format")
    check_conditional_references(ex)
    check_scopes(ex.method, ex.route, ex.resource, ex.actor.grants)
    await refuse_unfilterable(state, ex)
    refuse_subscription(state, ex)
    await check_conditional_matches(state, ex)
    await check_operation_target(state, ex)
    await check_write_target(state, ex)
    await check_deciding_write(state, ex)
    await check_team_write(state, ex)
    await check_version_target(state, ex)
    await check_search_targets(state, ex)
    await check_consent_write(state, ex)
    prepare_projection(ex)
