"""The admin port: liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import re
import time
from datetime import datetime, timezone
from typing import Any

import orjson

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from gateway.core.compartment import references_of
from gateway.core.consent import compile_consent
from gateway.core.decision import decide_with, explain_json
from gateway.core.errors import BadRequest, ConsentUnavailable
from gateway.core.explain import explain_consents
from gateway.core.fhir import JSON, iter_bundle_resources, resource_reference
from gateway.core.model import ACTOR_TYPES, Actor, RequestContext
from gateway.core.purpose import PURPOSE_CODES
from gateway.peers import invalidate_others
from gateway.web import review
from gateway.web.identity import TOKEN_ACTOR_TYPES
from gateway.web.state import STATE

_REF = re.compile(r"^[A-Za-z]+/[A-Za-z0-9\-.]{1,64}$")
_PATIENT = re.compile(r"^Patient/[A-Za-z0-9\-.]{1,64}$")


async def healthz(request: web.Request) -> web.Response:
    """The process is alive."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready (200) when the FHIR server, the consent source and the audit file are all fine;
    else 503 naming which, e.g. ``{"status": "not ready", "failing": ["consent_source"]}``."""
    state = request.app[STATE]
    failing = state.readiness.failing(time.monotonic(), state.store, state.audit)
    if not failing:
        return web.json_response({"status": "ready"})
    return web.json_response({"status": "not ready", "failing": failing}, status=503)


async def metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    registry = state.metrics.registry
    folder = state.worker.metrics_dir
    if folder is not None:
        # Several workers: each keeps its values in files there; add them all up.
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(folder))  # type: ignore[no-untyped-call]
    body = generate_latest(registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _json_object(request: web.Request) -> dict[str, Any]:
    try:
        data = orjson.loads(await request.read() or b"{}")
    except orjson.JSONDecodeError:
        raise BadRequest("The body must be a JSON object.") from None
    if not isinstance(data, dict):
        raise BadRequest("The body must be a JSON object.")
    return data


async def _invalidate_here(request: web.Request) -> str | None:
    """Forget this process's cached consents as the body says; returns the patient (None: all)."""
    state = request.app[STATE]
    data = await _json_object(request)
    unknown = set(data) - {"patient"}
    if unknown:
        raise BadRequest(f"Unknown key {sorted(unknown)[0]!r}; expected only 'patient'.")
    patient = data.get("patient")
    if patient is not None and (not isinstance(patient, str) or not _PATIENT.match(patient)):
        raise BadRequest("'patient' must be a reference such as Patient/123.")
    # Not announced: worker 0 tells the others itself, and waits for them (below).
    state.store.invalidate(patient, announce=False)
    if patient is None:
        # Everything: the Medications and PractitionerRoles read to decide records too.
        state.medications.evict()
    return patient


async def invalidate(request: web.Request) -> web.Response:
    """Forget cached consents: ``{"patient": "Patient/1"}`` for one patient, ``{}`` for all.

    With several workers every one forgets them before the answer; a worker that does not
    confirm makes it a 503 (retry), since its cache would go on deciding from the old consents.
    """
    patient = await _invalidate_here(request)
    role = request.app[STATE].worker
    if role.shared and await invalidate_others(role, patient):
        raise ConsentUnavailable("Not every worker process confirmed the invalidation; retry.")
    return web.json_response({"invalidated": patient or "all"})


async def invalidate_worker(request: web.Request) -> web.Response:
    """The same, on a worker's private socket: this process only (another worker asks)."""
    patient = await _invalidate_here(request)
    return web.json_response({"invalidated": patient or "all"})


def _ref(value: object, key: str, types: frozenset[str]) -> str:
    if not isinstance(value, str) or value.split("/", 1)[0] not in types or not _REF.match(value):
        raise BadRequest(f"'{key}' must be a reference such as {sorted(types)[0]}/123.")
    return value


def _at(value: object) -> datetime:
    if value is None:
        return datetime.now(timezone.utc)
    try:
        when = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        raise BadRequest("'at' must be an ISO 8601 date-time.") from None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def _consent_list(value: object) -> list[JSON]:
    """The Consents of ``consents`` as ``decide --consent`` reads its files: a Bundle stands for
    the Consents it holds, and anything that is not a Consent is refused (never skipped)."""
    if not isinstance(value, list) or not all(isinstance(c, dict) for c in value):
        raise BadRequest("'consents' must be a list of Consent resources.")
    found: list[JSON] = []
    for item in value:
        for consent in iter_bundle_resources(item) if item.get("resourceType") == "Bundle" else [item]:
            if consent.get("resourceType") != "Consent":
                raise BadRequest(f"'consents' holds a {str(consent.get('resourceType'))!r}, not a Consent.")
            found.append(consent)
    return found


async def decision(request: web.Request) -> web.Response:
    """The ``decide`` command as JSON: consents, a resource and a requester in; the explanation out."""
    state = request.app[STATE]
    data = await _json_object(request)
    unknown = set(data) - {"consents", "resource", "actor", "organization", "groups", "purpose", "at", "related"}
    if unknown:
        raise BadRequest(f"Unknown key {sorted(unknown)[0]!r}.")
    consents, resource = _consent_list(data.get("consents", [])), data.get("resource")
    if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
        raise BadRequest("'resource' must be a FHIR resource.")
    groups = data.get("groups", [])
    if not isinstance(groups, list):
        raise BadRequest("'groups' must be a list of Group or CareTeam references.")
    purpose = data.get("purpose", state.settings.auth.default_purpose)
    if purpose not in PURPOSE_CODES:
        raise BadRequest("'purpose' must be a v3 PurposeOfUse code such as TREAT.")
    actor = Actor(
        # Any requester the proxy accepts: X-Actor's kinds and a token's fhirUser (Person too).
        reference=_ref(data.get("actor"), "actor", ACTOR_TYPES | TOKEN_ACTOR_TYPES),
        organization=_ref(data["organization"], "organization", frozenset({"Organization"})) if data.get("organization") else None,
        groups=frozenset(_ref(g, "groups", frozenset({"Group", "CareTeam"})) for g in groups),
    )
    ctx = RequestContext(actor=actor, purpose=str(purpose), now=_at(data.get("at")))
    related = data.get("related", [])
    if not isinstance(related, list) or not all(isinstance(r, dict) for r in related):
        raise BadRequest("'related' must be a list of FHIR resources.")
    # The other resources of the same answer, for data.meaning = related (as decide --related).
    # The proxy's notion of this server's resources: absolute references under its bases.
    ours = state.enforcement.ours
    known = {ref: references_of(r, ours) for r in related if (ref := resource_reference(r))}
    labels, policy = state.labels, state.enforcement.policy
    compiled = [compile_consent(c, state.store.ours) for c in consents]
    resource_labels = labels.labels_for(resource)
    found = decide_with(
        compiled, resource, resource_labels, labels.scopes_for(resource), ctx, policy, known_refs=known, ours=ours,
    )
    return web.json_response({
        **explain_json(found),
        "consents": explain_consents(compiled, resource, resource_labels, actor.references(), policy, known, ours),
        "ambiguous_consents": [c.id for c in compiled if c.ambiguous],
    })


def add_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/cache/invalidate", invalidate)
    app.router.add_post("/decision", decision)
    review.add_routes(app)


def add_worker_routes(app: web.Application) -> None:
    """A worker's private socket (listen.workers above 1)."""
    app.router.add_post("/cache/invalidate", invalidate_worker)
