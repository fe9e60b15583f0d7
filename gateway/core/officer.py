"""The privacy officer's records: disclosure and review AuditEvents, decision-log requests.

Semantics: a disclosure AuditEvent names one requester, one patient and the resources of that
patient released in one answer, each with its sensitivity labels, and the purpose; it is made
per patient so that a patient's accounting never shows another patient's records. A review
AuditEvent names the break-glass AuditEvent it marks as reviewed and who reviewed it.

The decision log keeps a request as sent, except what could name a hidden record or carry a
code: query values of parameters outside ``LOGGED_PARAMS`` become ``*`` and the id of a
denied read is replaced (such lines are not replayable).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import parse_qsl, quote

from gateway.core.compartment import UNKNOWN_PATIENT, is_patient_data, patients_of
from gateway.core.ds4p import add_notice, is_part2, mark, sensitive_of
from gateway.core.fhir import JSON, resource_reference
from gateway.core.model import GATEWAY_CODE_SYSTEM, V3_PURPOSE_OF_USE, Actor, Label

DISCLOSURE_TAG = "disclosure"
REVIEW_TAG = "break-glass-review"
MASK = "*"
# Search parameters whose values never carry a clinical code or a record's content.
LOGGED_PARAMS = frozenset({
    "patient", "subject", "_count", "_sort", "_include", "_revinclude", "_elements", "_summary",
    "_lastUpdated", "date", "status", "_format", "_total", "_offset", "_page", "_getpages",
    "_getpagesoffset", "_pretty", "encounter", "_since", "_at", "_type",
})
_ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
_OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"


def _instant(when: datetime) -> str:
    return when.isoformat().replace("+00:00", "Z")


def _tag(code: str) -> JSON:
    return {"system": GATEWAY_CODE_SYSTEM, "code": code}


def _source() -> JSON:
    return {
        "site": "consent-gateway",
        "observer": {"display": "FHIR Consent Gateway"},
        "type": [{"system": "http://terminology.hl7.org/CodeSystem/security-source-type", "code": "4",
                  "display": "Application Server"}],
    }


def disclosure_event(
    *, event_id: str, actor: Actor, purpose: str, patient: str, now: datetime,
    resources: Sequence[tuple[str, Sequence[Label]]], interaction: str,
) -> JSON:
    """An R4 AuditEvent recording that ``resources`` of ``patient`` were released to ``actor``."""
    agent: JSON = {
        "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/extra-security-role-type",
                             "code": "humanuser"}]},
        "who": {"reference": actor.reference},
        "requestor": True,
        "purposeOfUse": [{"coding": [{"system": V3_PURPOSE_OF_USE, "code": purpose}]}],
    }
    agents = [agent]
    if actor.organization:
        agents.append({"who": {"reference": actor.organization}, "requestor": False})
    entities: list[JSON] = [{
        "what": {"reference": patient},
        "type": {"system": _ENTITY_TYPE, "code": "1", "display": "Person"},
        "role": {"system": _OBJECT_ROLE, "code": "1", "display": "Patient"},
    }]
    for ref, labels in resources:
        entity: JSON = {
            "what": {"reference": ref},
            "type": {"system": _ENTITY_TYPE, "code": "2", "display": "System Object"},
            "role": {"system": _OBJECT_ROLE, "code": "4", "display": "Domain Resource"},
        }
        if labels:
            entity["securityLabel"] = [
                {"system": l.system, "code": l.code} if l.system else {"code": l.code} for l in labels
            ]
        entities.append(entity)
    return {
        "resourceType": "AuditEvent",
        "id": event_id,
        "meta": {"tag": [_tag(DISCLOSURE_TAG)],
                 "security": [{"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "code": "R"}]},
        "type": {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "110106", "display": "Export"},
        "subtype": [{"system": "http://hl7.org/fhir/restful-interaction",
                     "code": "search-type" if interaction == "search" else "read"}],
        "action": "R",
        "recorded": _instant(now),
        "outcome": "0",
        "outcomeDesc": f"Disclosure of {len(resources)} resource(s)",
        "purposeOfEvent": [{"coding": [{"system": V3_PURPOSE_OF_USE, "code": purpose}]}],
        "agent": agents,
        "source": _source(),
        "entity": entities,
    }


def review_event(*, event_id: str, reviewed: str, reviewer: str, now: datetime, note: str) -> JSON:
    """An R4 AuditEvent recording that the break-glass AuditEvent ``reviewed`` was reviewed."""
    event: JSON = {
        "resourceType": "AuditEvent",
        "id": event_id,
        "meta": {"tag": [_tag(REVIEW_TAG)]},
        "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-event-type", "code": "rest",
                 "display": "RESTful Operation"},
        "subtype": [{"system": GATEWAY_CODE_SYSTEM, "code": REVIEW_TAG, "display": "Break-glass reviewed"}],
        "action": "U",
        "recorded": _instant(now),
        "outcome": "0",
        "outcomeDesc": "Break-glass access reviewed",
        "agent": [{"who": {"display": reviewer}, "requestor": True}],
        "source": _source(),
        "entity": [{
            "what": {"reference": f"AuditEvent/{reviewed}"},
            "type": {"system": _ENTITY_TYPE, "code": "2", "display": "System Object"},
            "role": {"system": _OBJECT_ROLE, "code": "13", "display": "Security Resource"},
        }],
    }
    if note:
        event["entity"][0]["description"] = note
    return event


def tags_of(event: JSON) -> frozenset[str]:
    meta = event.get("meta")
    tags = meta.get("tag") if isinstance(meta, dict) else None
    return frozenset(
        str(t.get("code")) for t in tags or () if isinstance(t, dict) and t.get("system") == GATEWAY_CODE_SYSTEM
    )


def is_break_glass(event: JSON) -> bool:
    """A break-glass AuditEvent: its purposes include v3 BTG."""
    return any(
        isinstance(coding, dict) and coding.get("code") == "BTG"
        for purpose in event.get("purposeOfEvent") or () if isinstance(purpose, dict)
        for coding in purpose.get("coding") or ()
    )


def entity_references(event: JSON) -> list[str]:
    return [
        str(e["what"]["reference"]) for e in event.get("entity") or ()
        if isinstance(e, dict) and isinstance(e.get("what"), dict) and isinstance(e["what"].get("reference"), str)
    ]


def loggable_query(raw: str) -> tuple[str, bool]:
    """The query for the decision log, and whether it is kept whole (replayable).

    SECURITY: a value of any other parameter (``code``, ``_has``, chains, ``_id``) may be a code
    or the id of a hidden record, so it is replaced by ``*``.
    """
    if not raw:
        return "", True
    whole = True
    parts: list[str] = []
    for name, value in parse_qsl(raw, keep_blank_values=True):
        base = name.split(":", 1)[0]
        if base not in LOGGED_PARAMS or "." in name:
            value, whole = MASK, False
        parts.append(f"{quote(name, safe=':_')}={quote(value, safe='/:,*|_-.')}")
    return "&".join(parts), whole


def loggable_path(parts: Iterable[str], denied: bool) -> tuple[str, bool]:
    """The request path for the decision log; a denied instance keeps its type, not its id."""
    segments = list(parts)
    if denied and len(segments) >= 2 and segments[1] and not segments[1].startswith(("$", "_")):
        segments[1] = MASK
        return "/" + "/".join(segments), False
    return "/" + "/".join(segments), True


def top_resources(body: JSON) -> Iterator[JSON]:
    """The resources of an answer that are released as such (contained ones go with theirs)."""
    rtype = body.get("resourceType")
    if rtype == "Bundle":
        for entry in body.get("entry") or ():
            resource = entry.get("resource") if isinstance(entry, dict) else None
            if isinstance(resource, dict):
                if resource.get("resourceType") in ("Bundle", "Parameters"):
                    yield from top_resources(resource)
                elif isinstance(resource.get("resourceType"), str):
                    yield resource
    elif rtype == "Parameters":
        stack = list(body.get("parameter") or ())
        while stack:
            param = stack.pop()
            if isinstance(param, dict):
                if isinstance(param.get("resource"), dict):
                    yield from top_resources(param["resource"])
                stack.extend(param.get("part") or ())
    elif isinstance(rtype, str):
        yield body


@dataclass(frozen=True, slots=True)
class Release:
    """What one answer releases: how many resources of each type, and per patient the
    ``Type/id`` and sensitive labels of what is disclosed (the accounting of disclosures)."""

    counts: dict[str, int]
    disclosed: dict[str, list[tuple[str, list[Label]]]]
    changed: bool  # the answer was changed: DS4P labels or the redisclosure notice added


def release_of(
    body: JSON, labels: Mapping[int, frozenset[Label]], sensitive: frozenset[str], mode: str, requester: str,
    owners: Mapping[int, frozenset[str]] | None = None, touched: set[int] | None = None,
) -> Release:
    """Label what ``body`` releases in place (DS4P: each sensitive resource's labels in
    ``meta.security``, Part 2 data's refrain, and on a Bundle holding it the notice) and name
    the disclosures ``mode`` (``audit.disclosures``: sensitive | all | none) accounts for.

    ``labels`` and ``owners`` (patients) are by object identity as enforcement found them; a
    resource without owners is read again. The ids of resources labelled in place go into
    ``touched`` when given. A patient reading their own record is not a disclosure to account
    for (45 CFR 164.528(a)(1)(i))."""
    changed = False
    part2: set[int] = set()
    disclosed: dict[str, list[tuple[str, list[Label]]]] = {}
    counts: dict[str, int] = {}
    for resource in top_resources(body):
        rtype = resource["resourceType"]
        if rtype == "OperationOutcome":
            continue
        counts[rtype] = counts.get(rtype, 0) + 1
        found = labels.get(id(resource))
        if not found:
            if mode != "all":
                continue
            marked = []
        else:
            marked = sensitive_of(found, sensitive)
        if marked:
            if mark(resource, marked):
                changed = True
                if touched is not None:
                    touched.add(id(resource))
            if is_part2(marked):
                part2.add(id(resource))
        if mode == "none" or (mode == "sensitive" and not marked) or not is_patient_data(rtype):
            continue
        ref = resource_reference(resource)
        if ref is None:
            continue
        found_owners = owners.get(id(resource)) if owners else None
        for patient in patients_of(resource) if found_owners is None else found_owners:
            if patient != requester and patient != UNKNOWN_PATIENT:
                disclosed.setdefault(patient, []).append((ref, marked))
    if part2:
        changed |= add_notices(body, part2, touched)
    return Release(counts, disclosed, changed)


def add_notices(body: JSON, part2: set[int], touched: set[int] | None = None) -> bool:
    """Put the redisclosure notice on every Bundle of ``body`` (itself, a search page in a batch
    slot, a Bundle in a Parameters) that holds a resource of ``part2`` (ids), however deep; a
    nested Bundle so changed goes into ``touched``. True when any Bundle changed.

    A batch entry's page is answered as the same search sent alone (CONTRACT §6): both carry
    the notice, and so does the batch-response that holds it."""
    return _notices(body, part2, touched)[1]


def _notices(node: JSON, part2: set[int], touched: set[int] | None) -> tuple[bool, bool]:
    """Whether ``node`` holds a Part 2 resource, and whether a Bundle in it was changed."""
    holds = changed = False
    for child in _held(node):
        if id(child) in part2:
            holds = True
        elif child.get("resourceType") in ("Bundle", "Parameters"):
            child_holds, child_changed = _notices(child, part2, touched)
            holds, changed = holds or child_holds, changed or child_changed
            if child_holds and child_changed and touched is not None and child.get("resourceType") == "Bundle":
                touched.add(id(child))
    if holds and node.get("resourceType") == "Bundle" and add_notice(node):
        changed = True
    return holds, changed


def _held(node: JSON) -> Iterator[JSON]:
    """The resources a Bundle's entries or a Parameters' parameters (and parts) hold."""
    if node.get("resourceType") == "Bundle":
        for entry in node.get("entry") or ():
            resource = entry.get("resource") if isinstance(entry, dict) else None
            if isinstance(resource, dict):
                yield resource
        return
    stack = list(node.get("parameter") or ())
    while stack:
        param = stack.pop()
        if isinstance(param, dict):
            if isinstance(param.get("resource"), dict):
                yield param["resource"]
            stack.extend(param.get("part") or ())
