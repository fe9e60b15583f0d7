"""Break-glass values: the AuditEvent of an emergency access and the emergency Consent.

An emergency Consent (category ``emergency-access``) is a permit for one actor and one
patient, for treatment, over a time window, naming the sensitive labels the emergency
opened. While its window is open it overrides that patient's denials for that actor
(for resources whose sensitive labels it names), and each such access is audited.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from gateway.core.compartment import parse_period
from gateway.core.fhir import NO_BASES, Bases, JSON, iter_codings, local_reference, reference_of
from gateway.core.consent import ACTORS_ALL_OF
from gateway.core.model import GATEWAY_CODE_SYSTEM, V3_ACT_CODE, V3_CONFIDENTIALITY, V3_PURPOSE_OF_USE, Actor, Label

EMERGENCY_CODE = "emergency"
REASON_EXTENSION = "urn:consent-gateway:break-glass-reason"
CONSENT_WOULD_DENY = "urn:consent-gateway:consent-would-deny"
_REST_INTERACTIONS = {
    "read": "read", "vread": "vread", "search": "search-type", "history": "history-instance",
    "create": "create", "update": "update", "patch": "patch", "delete": "delete",
    "batch": "batch", "operation": "operation", "capabilities": "capabilities",
}
# R4 audit-event-action: E (execute) covers query/search.
_ACTIONS = {"create": "C", "update": "U", "patch": "U", "delete": "D", "operation": "E", "batch": "E", "search": "E"}


@dataclass(frozen=True, slots=True)
class EmergencyWindow:
    """An emergency Consent's grant: who, when, and which sensitive labels it opened."""

    consent: str
    actor: str  # the person it opens to; "" for a care-unit window (``requires`` only)
    start: datetime
    end: datetime
    labels: frozenset[str]
    reason: str
    requires: frozenset[str] = frozenset()  # references the requester must all have

    def open_at(self, now: datetime) -> bool:
        return self.start <= now < self.end

    def covers(self, actor: Actor) -> bool:
        """This window opens to ``actor``: that person, and (if set) in every unit it names."""
        if self.actor and actor.reference != self.actor:
            return False
        return self.requires <= actor.references()


def is_emergency(consent: JSON) -> bool:
    """True for a Consent that carries the gateway's emergency-access category."""
    return any(
        c.get("system") == GATEWAY_CODE_SYSTEM and c.get("code") == EMERGENCY_CODE
        for c in iter_codings(consent.get("category"))
    )


def emergency_window(consent: JSON, ours: Bases = NO_BASES) -> EmergencyWindow | None:
    """The window of an active emergency Consent; None for anything else or anything unreadable,
    and for one naming an actor on another FHIR server (a base not among ``ours``): that
    server's Practitioner/dr1 is not this one's, so the window opens to no one here."""
    if consent.get("status") != "active" or not is_emergency(consent):
        return None
    provision = consent.get("provision")
    if not isinstance(provision, dict):
        return None
    period = parse_period(provision.get("period"))
    actors = [reference_of(a.get("reference")) for a in provision.get("actor") or () if isinstance(a, dict)]
    if period is None or period.start is None or period.end is None or not actors or None in actors:
        return None
    local = [local_reference(str(a), ours) for a in actors]
    if None in local:
        return None
    refs = frozenset(str(a) for a in local)
    persons = [r for r in refs if r.startswith("Practitioner/")]
    if len(refs) == 1 and not _all_of(provision):
        person, refs = next(iter(refs)), frozenset()
    elif _all_of(provision) and len(persons) <= 1:
        # A care-unit window (HealtheIntent): that person (if named) in every unit named.
        person = persons[0] if persons else ""
        refs = refs - {person}
    else:
        # Alternative actors: not a window shape the gateway writes or reads.
        return None
    labels = frozenset(
        str(label.get("code"))
        for nested in provision.get("provision") or () if isinstance(nested, dict)
        for label in nested.get("securityLabel") or () if isinstance(label, dict)
    )
    reason = next(
        (str(e.get("valueString")) for e in consent.get("extension") or ()
         if isinstance(e, dict) and e.get("url") == REASON_EXTENSION),
        "",
    )
    cid = consent.get("id")
    return EmergencyWindow(
        f"Consent/{cid}" if isinstance(cid, str) else "Consent",
        person, period.start, period.end, labels, reason, refs,
    )


def _all_of(provision: JSON) -> bool:
    return any(
        isinstance(e, dict) and e.get("url") == ACTORS_ALL_OF and e.get("valueBoolean") is True
        for e in provision.get("modifierExtension") or ()
    )


def _instant(when: datetime) -> str:
    return when.isoformat(timespec="seconds").replace("+00:00", "Z")


def emergency_consent(
    actor: Actor, patient: str, labels: Iterable[Label], reason: str, now: datetime, duration_h: float
) -> JSON:
    """The Consent that persists a break-glass: permit for this actor and patient, for TREAT."""
    provision: JSON = {
        "type": "permit",
        "period": {"start": _instant(now), "end": _instant(now + timedelta(hours=duration_h))},
        "actor": [
            {
                "role": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "code": "IRCP"}]},
                "reference": {"reference": actor.reference},
            }
        ],
        "purpose": [{"system": V3_PURPOSE_OF_USE, "code": "TREAT"}],
    }
    opened = sorted({(label.system, label.code) for label in labels})
    if opened:
        # Sensitive data opens only for a provision that names its labels.
        provision["provision"] = [
            {"type": "permit", "securityLabel": [{"system": s, "code": c} for s, c in opened]}
        ]
    return {
        "resourceType": "Consent",
        "status": "active",
        "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]},
        "category": [
            {"coding": [{"system": GATEWAY_CODE_SYSTEM, "code": EMERGENCY_CODE, "display": "Emergency access (break-glass)"}]},
            {"coding": [{"system": "http://loinc.org", "code": "59284-0", "display": "Patient Consent"}]},
        ],
        "patient": {"reference": patient},
        "dateTime": _instant(now),
        "performer": [{"reference": actor.reference}],
        "policyRule": {"coding": [{"system": V3_ACT_CODE, "code": "EMRGONLY", "display": "emergency only"}]},
        "extension": [{"url": REASON_EXTENSION, "valueString": reason}],
        "provision": provision,
    }


def audit_event(
    *,
    event_id: str,
    actor: Actor,
    interaction: str,
    status: int,
    reason: str,
    now: datetime,
    patients: Sequence[str],
    resources: Sequence[tuple[str, bool]],
    consents: Sequence[str] = (),
    source_id: str = "consent-gateway",
    consents_unknown: bool = False,
) -> JSON:
    """A FHIR R4 AuditEvent of one emergency access.

    ``resources`` are (reference, consent would have denied it) for every resource returned;
    ``consents`` are the emergency Consents that granted the access (none for the first,
    header-carrying request). ``consents_unknown``: the consents could not be read, so every
    resource is marked as one consent would have denied, and the event says so.
    """
    agents: list[JSON] = [
        {
            "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/extra-security-role-type", "code": "humanuser"}]},
            "who": {"reference": actor.reference},
            "requestor": True,
            "purposeOfUse": [{"coding": [{"system": V3_PURPOSE_OF_USE, "code": "ETREAT"}], "text": reason}],
        }
    ]
    if actor.organization:
        agents.append({"who": {"reference": actor.organization}, "requestor": False})
    entities: list[JSON] = [
        {
            "what": {"reference": p},
            "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "1", "display": "Person"},
            "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "1", "display": "Patient"},
        }
        for p in patients
    ]
    entities.extend(
        {
            "what": {"reference": ref},
            "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "2", "display": "System Object"},
            "detail": [{"type": CONSENT_WOULD_DENY, "valueString": "true" if denied else "false"}],
        }
        for ref, denied in resources
    )
    entities.extend(
        {
            "what": {"reference": c},
            "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "2", "display": "System Object"},
            "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "13", "display": "Security Resource"},
        }
        for c in consents
    )
    would_deny = sum(1 for _, denied in resources if denied)
    summary = (
        f"Break-glass: {would_deny} of {len(resources)} resources would have been denied by consent"
        if would_deny else "Break-glass: this access would have been permitted by consent"
    )
    if consents_unknown:
        summary = (f"Break-glass: the patients' consents could not be read; all {len(resources)} "
                   "resources returned are counted as consent would have denied them")
    return {
        "resourceType": "AuditEvent",
        "id": event_id,
        # SECURITY: it names records consent hides; only a consent naming R opens it.
        "meta": {"security": [{"system": V3_CONFIDENTIALITY, "code": "R"}]},
        "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-event-type", "code": "rest", "display": "RESTful Operation"},
        "subtype": [{"system": "http://hl7.org/fhir/restful-interaction", "code": _REST_INTERACTIONS.get(interaction, "operation")}],
        "action": _ACTIONS.get(interaction, "R"),
        "recorded": now.isoformat().replace("+00:00", "Z"),
        "outcome": "0" if status < 400 else ("4" if status < 500 else "8"),
        "outcomeDesc": summary,
        "purposeOfEvent": [
            {"coding": [{"system": V3_PURPOSE_OF_USE, "code": "ETREAT"}], "text": reason},
            {"coding": [{"system": V3_ACT_CODE, "code": "BTG", "display": "break the glass"}]},
        ],
        "agent": agents,
        "source": {
            "site": source_id,
            "observer": {"display": "FHIR Consent Gateway"},
            "type": [{"system": "http://terminology.hl7.org/CodeSystem/security-source-type", "code": "4", "display": "Application Server"}],
        },
        "entity": entities,
    }


def window_not_recorded_event(
    *, event_id: str, access_event_id: str, actor: Actor, reason: str, now: datetime, patients: Sequence[str],
    source_id: str = "consent-gateway",
) -> JSON:
    """The AuditEvent saying that a break-glass access was served but no emergency window was
    recorded for it (the Consent could not be stored): later requests need the header again.

    It follows the access's own AuditEvent (``access_event_id``), which was written first.
    """
    return {
        "resourceType": "AuditEvent",
        "id": event_id,
        "meta": {"security": [{"system": V3_CONFIDENTIALITY, "code": "R"}]},
        "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-event-type", "code": "rest", "display": "RESTful Operation"},
        "subtype": [{"system": "http://hl7.org/fhir/restful-interaction", "code": "create"}],
        "action": "C",
        "recorded": now.isoformat().replace("+00:00", "Z"),
        "outcome": "4",
        "outcomeDesc": ("Break-glass: no emergency access window was recorded (the emergency Consent "
                        "could not be stored); the access itself was served and audited"),
        "purposeOfEvent": [
            {"coding": [{"system": V3_PURPOSE_OF_USE, "code": "ETREAT"}], "text": reason},
            {"coding": [{"system": V3_ACT_CODE, "code": "BTG", "display": "break the glass"}]},
        ],
        "agent": [{
            "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/extra-security-role-type", "code": "humanuser"}]},
            "who": {"reference": actor.reference},
            "requestor": True,
        }],
        "source": {
            "site": source_id,
            "observer": {"display": "FHIR Consent Gateway"},
            "type": [{"system": "http://terminology.hl7.org/CodeSystem/security-source-type", "code": "4", "display": "Application Server"}],
        },
        "entity": [
            *({
                "what": {"reference": p},
                "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "1", "display": "Person"},
                "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "1", "display": "Patient"},
            } for p in patients),
            {
                "what": {"reference": f"AuditEvent/{access_event_id}"},
                "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "2", "display": "System Object"},
                "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "13", "display": "Security Resource"},
            },
        ],
    }
