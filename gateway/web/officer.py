"""The privacy officer's view at the edge (CONTRACT §10): shadow mode, the decision log,
accounting of disclosures and DS4P labels on released data.

Each request carries one ``Outcome``. The handler fills it as it decides; the observing
middleware writes the decision line and, in shadow mode, the would-be decision header.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone

import orjson
from aiohttp import web

from gateway.core.compartment import is_patient_data
from gateway.core.consent import CompiledConsent
from gateway.core.enforce import Enforced, Enforcer
from gateway.core.errors import BadRequest
from gateway.core.fhir import JSON, resource_reference
from gateway.core.model import Actor, Decision, Label, Verdict
from gateway.core.officer import disclosure_event, loggable_path, loggable_query, release_of, top_resources
from gateway.core.references import iter_resources
from gateway.core.scopes import scoped
from gateway.web.enforcement import Observed
from gateway.web.exchange import Exchange
from gateway.web.middleware import INFO, fresh_uuid, log_line
from gateway.web.request import parse_route
from gateway.web.state import STATE, GatewayState

decision_log = logging.getLogger("gateway.decision")
SHADOW_HEADER = "X-Consent-Decision-Shadow"


@dataclass
class Outcome:
    """What one request released and withheld, for the decision log and shadow mode."""

    exchange: Exchange | None = None
    shadow: str | None = None           # would-be decision already known (shadow mode)
    consents: Mapping[str, tuple[CompiledConsent, ...]] = field(default_factory=dict)
    # Resource type -> count. Plain dicts: a Counter costs three times as much to make, on
    # every request.
    released: dict[str, int] = field(default_factory=dict)
    withheld: dict[str, int] = field(default_factory=dict)

    def withhold(self, rtype: str, count: int = 1) -> None:
        key = rtype if is_patient_data(rtype) else "other"
        self.withheld[key] = self.withheld.get(key, 0) + count

    def release(self, counts: Mapping[str, int]) -> None:
        for rtype, count in counts.items():
            self.released[rtype] = self.released.get(rtype, 0) + count


OUTCOME = web.RequestKey("gateway_outcome", Outcome)


def is_shadow(state: GatewayState) -> bool:
    return state.settings.enforcement.mode == "shadow"


def open_outcome(request: web.Request, ex: Exchange) -> None:
    """Start the request's Outcome once its Exchange is read: the handler's first step, so
    there is none yet (outcome_of would first look for one, and raise and catch a KeyError)."""
    request[OUTCOME] = Outcome(exchange=ex)


def outcome_of(request: web.Request) -> Outcome:
    found = request.get(OUTCOME)
    if found is None:
        found = request[OUTCOME] = Outcome()
    return found


def admitted_in_shadow(state: GatewayState, request: web.Request, ex: Exchange) -> bool:
    """In shadow mode a read refused before it is sent is sent anyway, its refusal recorded."""
    if not is_shadow(state) or ex.method not in ("GET", "HEAD"):
        return False
    outcome_of(request).shadow = "deny"
    return True


_PERMITTED = Decision(Verdict.PERMIT)


def scopes_only(body: JSON, actor: Actor, withheld_status: str) -> Enforced:
    """Shadow mode withholds nothing consent would, but a token's scopes still apply: they are
    the client's authorization, not the patient's consent (CONTRACT §4)."""
    if actor.grants is None:
        return Enforced()
    judge = scoped(lambda resource, owners: _PERMITTED, actor.grants)
    return Enforcer(judge, drop_total=False, withheld_status=withheld_status).body(body)


def shadow_copy(parsed: JSON, refused: Mapping[int, JSON] | None = None) -> tuple[JSON, dict[int, JSON]]:
    """A copy to decide on, and each copied resource's original (by the copy's identity).

    ``refused`` are the batch slots enforce mode would have answered without sending the entry:
    the copy holds them instead of the answers, so it is decided exactly as enforce mode would.
    """
    copy: JSON = orjson.loads(orjson.dumps(parsed))
    originals = {id(c): o for c, o in zip(iter_resources(copy), iter_resources(parsed))}
    entries = copy.get("entry")
    if refused and isinstance(entries, list):
        for index, slot in refused.items():
            if index < len(entries):
                entries[index] = {"response": slot}
    return copy, originals


def count_denied(request: web.Request, body: JSON) -> None:
    """A body withheld whole: every resource in it counts as withheld."""
    outcome = outcome_of(request)
    for resource in top_resources(body):
        outcome.withhold(str(resource["resourceType"]))


async def released(
    state: GatewayState, request: web.Request, ex: Exchange, body: JSON, labels: Mapping[int, frozenset[Label]],
    result: Enforced, touched: set[int] | None = None, owners: Mapping[int, frozenset[str]] | None = None,
) -> bool:
    """Label what ``body`` releases (DS4P), record its disclosures; True when ``body`` changed.
    The ids of the resources labelled in place go into ``touched`` when given; ``owners`` are
    the patients enforcement found for each resource (by object identity), read again if absent.

    AuditUnavailable (503) when a disclosure cannot be made durable: nothing is returned.
    """
    outcome = outcome_of(request)
    for rtype, _ in () if result.denied else result.removed:
        outcome.withhold(rtype)
    found = release_of(body, labels, state.labels.sensitive, state.settings.audit.disclosures, ex.actor.reference,
                       owners, touched)
    outcome.release(found.counts)
    if found.disclosed:
        await record_disclosures(state, ex, found.disclosed)
    return found.changed


async def record_disclosures(state: GatewayState, ex: Exchange, disclosed: dict[str, list[tuple[str, list[Label]]]]) -> None:
    """One AuditEvent per patient, group-committed with every other line being written."""
    now = datetime.now(timezone.utc)
    events = [
        disclosure_event(
            event_id=fresh_uuid(), actor=ex.actor, purpose=ex.purpose, patient=patient, now=now,
            resources=resources, interaction=ex.route.interaction,
        )
        for patient, resources in sorted(disclosed.items())
    ]
    log = state.disclosures
    if log is None:
        return
    if len(events) == 1:
        await log.append(events[0])
    else:
        await asyncio.gather(*(log.append(event) for event in events))
    state.metrics.disclosures.inc(len(events))


def finish(request: web.Request, response: web.StreamResponse) -> None:
    """The shadow header and counter, and the request's decision line."""
    found = request.get(OUTCOME)
    outcome = found if found is not None else Outcome()
    decision = response.headers.get("X-Consent-Decision", "deny")
    state = request.app[STATE]
    shadow = None
    if is_shadow(state):
        shadow = outcome.shadow or decision
        response.headers[SHADOW_HEADER] = shadow
        state.metrics.count_shadow(shadow)
    log_decision(request, outcome, decision, shadow, response.status)


def log_decision(request: web.Request, outcome: Outcome, decision: str, shadow: str | None, status: int) -> None:
    """One JSON line per request: who, why, what was asked, and what went out (never ids of
    withheld records, never codes)."""
    ex = outcome.exchange
    info = request[INFO]
    extra: dict[str, object] = {
        "request_id": info.request_id, "method": request.method, "status": status,
        "decision": decision, "mode": "shadow" if shadow is not None else "enforce",
        "actor": info.actor, "purpose": info.purpose,
    }
    if shadow is not None:
        extra["shadow"] = shadow
    if ex is not None:
        denied = (shadow or decision) == "deny"
        path, whole_path = loggable_path(ex.route.parts, denied)
        query, whole_query = loggable_query(ex.raw_query)
        actor = ex.actor
        extra["organization"] = actor.organization
        extra["role"] = actor.role
        extra["path"] = path
        extra["query"] = query
        extra["replayable"] = whole_path and whole_query and ex.reason is None
        extra["interaction"] = ex.route.interaction
        extra["break_glass"] = ex.reason is not None or None
        extra["consents"] = {
            patient: [consent_version(c) for c in consents] for patient, consents in sorted(outcome.consents.items())
        }
        extra["released"] = _sorted_counts(outcome.released)
        extra["withheld"] = _sorted_counts(outcome.withheld)
    else:
        extra.update(_refused_request(request))
    log_line(decision_log, "decision", extra)


def _refused_request(request: web.Request) -> dict[str, object]:
    """What a request refused before it was read asked for (identity, purpose, format): its
    path below the FHIR base with the id masked, as for a denied read, and its loggable query."""
    try:
        route = parse_route(request.method, request.raw_path, request.app[STATE].upstream.base.path.rstrip("/"))
    except BadRequest:
        return {"path": None, "query": None, "replayable": False}
    path, _ = loggable_path(route.parts, True)
    query, _ = loggable_query(request.rel_url.raw_query_string)
    return {"path": path, "query": query, "replayable": False, "interaction": route.interaction}


def consent_version(consent: CompiledConsent) -> str:
    """``Consent/<id>/_history/<version>``, or the bare id of a consent without a version."""
    return f"{consent.id}/_history/{consent.version}" if consent.version else consent.id


def _sorted_counts(counts: dict[str, int]) -> dict[str, int]:
    return dict(sorted(counts.items())) if len(counts) > 1 else dict(counts)
