"""Batches and transactions: each entry is admitted as the request it stands for.

An entry refused on its own (a ``_has`` search, type history, a hidden operation target, a
Consent write the requester may not make) is not sent: in a batch its slot of the answer
says so, in a transaction the whole request is refused (a transaction is all or nothing).
Projection is stripped from each entry's URL and applied to its slot after deciding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from http import HTTPStatus
from urllib.parse import parse_qsl, urlsplit

import orjson

from gateway.core.enforce import found_nothing, scrubbed_outcome, withheld_slot
from gateway.core.compartment import is_patient_data
from gateway.core.errors import BadRequest, ConsentDenied, GatewayError, Refused
from gateway.core.fhir import JSON
from gateway.core.paging import SKIP_PARAM, read_skip
from gateway.core.projection import Projection
from gateway.web.exchange import Exchange, admit, prepare_projection
from gateway.web.pages import opened, page_token
from gateway.core.references import in_answer
from gateway.web.request import Route, parse_route
from gateway.web.state import GatewayState

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"})
# ``Bundle.entry.request`` fields that make a read conditional (the If-* headers of a request).
CONDITIONAL_READ_FIELDS = ("ifNoneMatch", "ifModifiedSince", "ifMatch")


@dataclass
class BatchPlan:
    """What is sent for a batch, and how its answer is put back together."""

    kind: str                                   # "batch" | "transaction"
    size: int                                   # entries the client sent
    sent: list[int] = field(default_factory=list)               # client index of each sent entry
    refused: dict[int, JSON] = field(default_factory=dict)      # client index -> response slot
    projections: dict[int, Projection] = field(default_factory=dict)
    heads: set[int] = field(default_factory=set)                # HEAD entries, sent as GET
    routes: dict[int, Route] = field(default_factory=dict)      # client index -> route
    body: bytes = b""                           # the Bundle sent upstream
    # Shadow mode: reads refused on their own but sent anyway; the slot enforce mode would give.
    shadow_refused: dict[int, JSON] = field(default_factory=dict)
    # 404 mode: searches naming a record the requester may not see (Exchange.finds_nothing).
    find_nothing: set[int] = field(default_factory=set)
    urls: dict[int, str] = field(default_factory=dict)          # client index -> request.url as written
    # client index -> the patients a search entry names (Exchange.confined): its page keeps
    # Bundle.total as the same search alone does (web.enforcement.totals_kept).
    confined: dict[int, frozenset[str]] = field(default_factory=dict)

    def answer(self, upstream_entries: list[object]) -> list[object]:
        """The slots in the client's order: the upstream's, with the refused ones put back."""
        slots: list[object] = [None] * self.size
        for index, refused in self.refused.items():
            slots[index] = {"response": refused}
        for index, sent in zip(self.sent, upstream_entries):
            slots[index] = sent
        return [s if s is not None else {"response": _failed()} for s in slots]


def _failed() -> JSON:
    return {"status": "500 Internal Server Error",
            "outcome": scrubbed_outcome({"issue": [{"severity": "error", "code": "exception"}]})}


def refused_slot(exc: GatewayError, withheld_status: str) -> JSON:
    """A batch slot for an entry the gateway did not send."""
    if isinstance(exc, ConsentDenied):
        return withheld_slot(withheld_status)
    phrase = HTTPStatus(exc.status).phrase if exc.status in HTTPStatus._value2member_map_ else "Error"
    return {"status": f"{exc.status} {phrase}",
            "outcome": {"resourceType": "OperationOutcome",
                        "issue": [{"severity": "error", "code": exc.issue_code, "diagnostics": exc.message}]}}


def not_found_outcome() -> JSON:
    """The body of a missing record, as the gateway passes on the FHIR server's own (scrubbed)."""
    return scrubbed_outcome({"issue": [{"severity": "error", "code": "not-found"}]})


def _entry_target(url: str, base_prefix: str) -> tuple[str, str]:
    """(path, raw query) of an entry's ``request.url``, relative or absolute."""
    split = urlsplit(url)
    path = split.path if split.scheme or url.startswith("/") else "/" + split.path
    if split.scheme and base_prefix and path.startswith(base_prefix):
        path = path[len(base_prefix):]
    return path, split.query


def _at_base(url: str, public: str) -> bool:
    """Whether an entry's URL names the gateway's base itself (where a sealed link points)."""
    path = url.partition("?")[0].partition("#")[0]
    return path.rstrip("/") == public.rstrip("/") if "://" in path else path in ("", "/")


async def plan_batch(state: GatewayState, front: Exchange, withheld_status: str, public: str) -> BatchPlan:
    """Admit every entry of a batch/transaction as a request of its own (``public``: the
    gateway's public base, under which a sealed paging link opens)."""
    bundle = front.resource
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle" \
            or bundle.get("type") not in ("batch", "transaction"):
        raise BadRequest("The request body must be a batch or transaction Bundle.")
    entries = bundle.get("entry") or []
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise BadRequest("Bundle.entry must be a list of entries.")
    plan = BatchPlan(kind=str(bundle["type"]), size=len(entries))
    base_prefix = state.upstream.base.path.rstrip("/")
    sent: list[JSON] = []
    for index, entry in enumerate(entries):
        request = entry.get("request")
        if not isinstance(request, dict) or request.get("method") not in _METHODS \
                or not isinstance(request.get("url"), str):
            raise BadRequest("Each entry needs request.method and request.url.")
        method, url = str(request["method"]), str(request["url"])
        plan.urls[index] = url
        path, query = _entry_target(url, base_prefix)
        token = page_token(query) if query else None
        if token is not None:
            # A sealed paging link is the entry of the link it seals, as at the front door.
            try:
                path, query = opened(state.pages, token, public, method, _at_base(url, public))
            except GatewayError as exc:
                if plan.kind == "transaction":
                    raise
                plan.refused[index] = refused_slot(exc, withheld_status)
                continue
        route = parse_route(method, path, "")
        if route.interaction == "batch" or not route.parts:
            raise BadRequest("A batch entry cannot be a batch.")
        resource = entry.get("resource")
        condition = request.get("ifNoneExist")
        if condition is not None and not isinstance(condition, str):
            raise BadRequest("Bundle.entry.request.ifNoneExist must be a string.")
        sub = Exchange(
            method=method, route=route, raw_query=query, actor=front.actor, purpose=front.purpose,
            reason=front.reason, content_type="application/fhir+json",
            if_none_exist=condition,
            body=orjson.dumps(resource) if resource is not None else None,
        )
        sub.query = parse_qsl(query, keep_blank_values=True)
        try:
            continuation(sub)
            await admit(state, sub)
        except GatewayError as exc:
            if _shadow_read(state, sub, exc):
                plan.shadow_refused[index] = refused_slot(exc, withheld_status)
                prepare_projection(sub)
            else:
                if plan.kind == "transaction" or exc.status >= 500:
                    raise
                plan.refused[index] = refused_slot(exc, withheld_status)
                continue
        if sub.projection is not None:
            plan.projections[index] = sub.projection
        if sub.finds_nothing:
            plan.find_nothing.add(index)
        if method == "GET" and route.interaction == "search" and sub.confined:
            plan.confined[index] = sub.confined
        forwarded = dict(entry)
        forwarded_request = dict(request)
        forwarded_request["url"] = route.path + (f"?{sub.forwarded_query}" if sub.forwarded_query else "")
        if "ifNoneExist" in forwarded_request:
            # The condition as admitted: narrowed to what the requester may see, or none (404 mode).
            forwarded_request.pop("ifNoneExist")
            if sub.if_none_exist:
                forwarded_request["ifNoneExist"] = sub.if_none_exist
        if method in ("GET", "HEAD"):
            # SECURITY: a 304 slot carries no resource to decide, so it would confirm a hidden
            # record and its version; the front door drops these headers of a read likewise.
            for name in CONDITIONAL_READ_FIELDS:
                forwarded_request.pop(name, None)
        if method == "HEAD":
            # Asked as GET so its answer can be decided; the body is dropped afterwards.
            forwarded_request["method"] = "GET"
            plan.heads.add(index)
        plan.routes[index] = route
        forwarded["request"] = forwarded_request
        if sub.resource is not None and resource is not None:
            forwarded["resource"] = sub.resource
        sent.append(forwarded)
        plan.sent.append(index)
    plan.body = orjson.dumps({**bundle, "entry": sent})
    return plan


def continuation(sub: Exchange) -> None:
    """The gateway's own paging parameter (``SKIP_PARAM``) never reaches the server: in an
    entry it is checked as at the front door and taken out; a search is continued only when
    sent alone (the ``next`` link it was answered with), so a count above 0 is a 400 here."""
    if "skip" not in sub.raw_query:
        return
    sub.raw_query, skip = read_skip(sub.raw_query)
    if skip is None:
        return
    sub.query = [(k, v) for k, v in sub.query if k != SKIP_PARAM]
    if skip:
        raise BadRequest(f"The {SKIP_PARAM} parameter continues a search sent alone, not one in a batch.")


def found_nothing_slots(plan: BatchPlan, answer: JSON) -> bool:
    """The upstream's slots of the searches that find nothing (``find_nothing``) made so, in
    place (core.enforce.found_nothing); True if any was."""
    entries = answer.get("entry")
    if not isinstance(entries, list):
        return False
    changed = False
    for position, index in enumerate(plan.sent):
        slot = entries[position] if index in plan.find_nothing and position < len(entries) else None
        resource = slot.get("resource") if isinstance(slot, dict) else None
        if isinstance(resource, dict):
            changed |= found_nothing(resource)
    return changed


def _shadow_read(state: GatewayState, sub: Exchange, exc: GatewayError) -> bool:
    """In shadow mode a read refused on its own is sent anyway (CONTRACT §10)."""
    return (state.settings.enforcement.mode == "shadow" and sub.method in ("GET", "HEAD")
            and isinstance(exc, (ConsentDenied, Refused)))


def settle_slots(plan: BatchPlan, slots: list[object], withheld_status: str) -> bool:
    """After deciding: a slot that lost everything its request was about reads like the
    request alone (an instance history of withheld versions, ``$everything`` of a patient
    whose own record is withheld in 404 mode); HEAD slots lose their bodies. True if changed."""
    changed = False
    for index, route in plan.routes.items():
        slot = slots[index] if index < len(slots) else None
        if not isinstance(slot, dict):
            continue
        resource = slot.get("resource")
        response = slot.get("response")
        status = response.get("status") if isinstance(response, dict) else None
        if (isinstance(resource, dict) and (
            all_versions_hidden(route, resource)
            or (withheld_status.startswith("404") and subject_hidden(route, resource))
        )) or (resource is None and bodiless_read(route, _status_code(status))):
            slots[index] = {"response": withheld_slot(withheld_status)}
            changed = True
        elif index in plan.heads and "resource" in slot:
            del slot["resource"]
            changed = True
    return changed


def bodiless_read(route: Route, status: int) -> bool:
    """A read (or vread) of a record consent decides, answered with success but without the
    record: nothing to decide, so it is withheld (its status, version and date would tell that
    the record is there)."""
    rtype = route.resource_type
    return (route.interaction in ("read", "vread") and 200 <= status < 300 and rtype is not None
            and (is_patient_data(rtype) or rtype == "Binary" or rtype == "Subscription"))


def _status_code(status: object) -> int:
    text = str(status).strip()[:3]
    return int(text) if text.isdigit() else 0


def all_versions_hidden(route: Route, body: JSON) -> bool:
    """Instance history whose every version was withheld: no version is left (a record that
    exists has at least one, a missing one is a 404)."""
    if route.interaction != "history" or route.resource_id is None or body.get("resourceType") != "Bundle":
        return False
    return not any(
        isinstance(e, dict) and isinstance(e.get("resource"), dict)
        and e["resource"].get("resourceType") != "OperationOutcome"
        for e in body.get("entry") or ()
    )


def subject_hidden(route: Route, body: JSON) -> bool:
    """``Patient/<id>/$everything`` whose answer no longer holds that patient's own record."""
    if route.operation != "$everything" or route.resource_type != "Patient" or route.resource_id is None:
        return False
    return f"Patient/{route.resource_id}" not in in_answer(body)


def apply_projections(plan: BatchPlan, slots: list[object]) -> None:
    """Each entry's ``_elements``/``_summary``, applied to its slot after deciding."""
    for index, projection in plan.projections.items():
        slot = slots[index] if index < len(slots) else None
        resource = slot.get("resource") if isinstance(slot, dict) else None
        if isinstance(resource, dict):
            if resource.get("resourceType") == "Bundle":
                projection.bundle(resource)
            elif resource.get("resourceType") != "OperationOutcome":
                projection.apply(resource)
