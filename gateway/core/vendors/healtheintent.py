"""Cerner HealtheIntent Patient Consent v1 records and configurations as gateway terms.

A consent record (``PatientConsentPublicApi_Entities_V1_Consents_Consent``, also accepted
in the ``POST .../patient-consents`` body shape) becomes one FHIR R4 Consent:
- ``provisionType`` PERMIT/DENY -> ``provision.type``; absent, the root provision has no
  type and the engine falls back to ``policyRule`` (a HealtheIntent consent type, never
  OPTIN/OPTOUT), i.e. to ``consent.default_decision``.
- ``effectivePeriod`` -> ``provision.period``. A record without an end (absent or blank)
  ends ``consentDuration`` hours after its start (``emergencyConsentDuration`` for emergency
  records) when the ConsentConfiguration sets it; otherwise it is open-ended.
- ``provisionScope`` names a care unit (organization), its group and optionally a person,
  as Swedish PDL does: the record is about that person IN that group IN that unit. A PERMIT
  therefore needs every part to match (actors Organization/<id>, Group/<id>,
  Practitioner/<id> with the ``actors-all-of`` modifier): it opens neither to the rest of
  the group nor to the person acting for another unit. A DENY matches any part (the wider,
  safe reading of a restriction).
- ``provisionType`` absent: the record says neither permit nor deny, so it changes nothing
  (the scope becomes a nested provision under a root without conditions; the default
  decision decides) instead of an untyped root, which R4 would read as an exception.
- ``consentReasonType``: PATIENT_GRANTED (or absent) is an ordinary consent. The document
  names no other value, only that the field says "whether emergency access is granted", so
  a value starting with EMERGENCY marks an emergency consent: it must carry
  ``emergencyConsentReason``, gets the gateway's emergency category (system
  ``GATEWAY_CODE_SYSTEM``, code ``emergency``, the reason as its text) and, like the
  consents break-glass records, purpose TREAT. Any other value is an error.
- ``recordedDateTime`` -> ``dateTime``; ``consentId`` -> ``id``; ``aliases`` -> identifiers.
The API has no status field (a deleted record is simply gone), so every record is active.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, TypedDict

from gateway.core.compartment import parse_date_range
from gateway.core.consent import ACTORS_ALL_OF
from gateway.core.fhir import JSON
from gateway.core.model import GATEWAY_CODE_SYSTEM, V3_PURPOSE_OF_USE
from gateway.core.vendors._common import (
    PARTICIPATION_TYPE_SYSTEM,
    ConvertOptions,
    Fields,
    drop_empty,
    fhir_id,
    id_reference,
    patient_consent_category,
    period,
    records_of,
    scope_concept,
    typed_reference,
)

PROVISION_TYPES = {"PERMIT": "permit", "DENY": "deny"}
PATIENT_GRANTED = "PATIENT_GRANTED"
EMERGENCY_PREFIX = "EMERGENCY"
EMERGENCY_CODE = "emergency"
CATEGORY_SYSTEM = "urn:consent-gateway:healtheintent:category"
POLICY_RULE_SYSTEM = "urn:consent-gateway:healtheintent:policy-rule"
CONSENT_ID_SYSTEM = "urn:consent-gateway:healtheintent:consent"
# provisionScope key -> the FHIR resource type its id names.
_SCOPE_ACTORS = (
    ("organization", "Organization", True),
    ("organizationGroup", "Group", True),
    ("personnel", "Practitioner", False),
)
# An actor in provisionScope is someone the patient's data may be released to.
RECIPIENT_ROLE = "IRCP"


class BreakGlassSettings(TypedDict, total=False):
    """The ``break_glass`` config keys a consent configuration sets."""

    reasons: list[str]
    duration_h: int


def consent_from_healtheintent(
    record: dict[str, Any],
    *,
    patient_ref: str,
    index: int | None = None,
    consent_duration_h: float | None = None,
    emergency_duration_h: float | None = None,
) -> JSON:
    """A FHIR R4 Consent for ``patient_ref`` (``Patient/<id>`` or a bare id) from one record.

    ``index`` names the record in errors when it has no ``consentId``. Raises
    ``VendorError`` on a missing ``effectivePeriod.start`` or ``provisionScope`` (or its
    organization / organizationGroup id), an unknown ``provisionType`` or
    ``consentReasonType``, or an emergency consent without ``emergencyConsentReason``.
    """
    fields = Fields.of(record, _record_name(record, index))
    consent_id = fields.text("consentId")
    reason_type = fields.text("consentReasonType")
    emergency = _is_emergency(fields, reason_type)
    reason = fields.text("emergencyConsentReason", required=emergency)
    effective = fields.obj("effectivePeriod", required=True)
    assert effective is not None
    effective.date_time("start", required=True)
    provision_type = fields.enum("provisionType", tuple(PROVISION_TYPES))
    policy_rule = fields.text("policyRule")
    ptype = PROVISION_TYPES[provision_type] if provision_type else None
    actors = _actors(fields)
    scope: JSON = {"actor": actors}
    if ptype == "permit" and len(actors) > 1:
        # SECURITY: unit AND group AND person; any one alone must not open the record.
        scope["modifierExtension"] = [{"url": ACTORS_ALL_OF, "valueBoolean": True}]
    duration = options_duration(emergency, consent_duration_h, emergency_duration_h)
    consent: JSON = {
        "resourceType": "Consent",
        "id": fhir_id(consent_id, "healtheintent", record),
        "identifier": _identifiers(fields, consent_id),
        "status": "active",
        "scope": scope_concept("patient-privacy"),
        "category": _categories(fields, reason if emergency else None),
        "patient": {"reference": typed_reference(patient_ref, "Patient")},
        "dateTime": fields.date_time("recordedDateTime"),
        "policyRule": {"coding": [{"system": POLICY_RULE_SYSTEM, "code": policy_rule}]}
        if policy_rule else None,
        "provision": _provision(ptype, _period(effective, duration), scope, emergency),
    }
    return drop_empty(consent)


def convert(payload: object, options: ConvertOptions) -> list[JSON]:
    """The Consents of one record, a list, or a ``Consents`` page (``{"items": [...]}``).

    The patient is ``options.patient_ref``; the documented record does not carry it (it is
    in the request path), so a ``patientId`` on the record is used only when no
    ``patient_ref`` is given, and it is an error when neither is there.
    """
    consents: list[JSON] = []
    for i, record in enumerate(records_of(payload, "healtheintent", "items")):
        fields = Fields.of(record, _record_name(record, i))
        patient_ref = options.patient_ref or fields.text("patientId")
        if patient_ref is None:
            fields.fail("patientId", "missing: the patient is not in the record, pass it in")
        consents.append(consent_from_healtheintent(
            dict(fields.data), patient_ref=patient_ref, index=i,
            consent_duration_h=options.consent_duration_h,
            emergency_duration_h=options.emergency_duration_h,
        ))
    return consents


def break_glass_settings_from_healtheintent(config: dict[str, Any]) -> BreakGlassSettings:
    """Break-glass settings from a ConsentConfiguration (or a one-item ConsentConfigurations).

    ``emergencyConsentReasons`` (documented as a string, shown as a list) -> ``reasons``;
    ``emergencyConsentDuration`` (hours) -> ``duration_h``. A key the configuration does
    not set is left out, so the gateway's own setting stays. Raises ``VendorError`` on a
    wrong type, a non-positive duration, or a page without exactly one configuration.
    """
    fields = Fields.of(config, "healtheintent consent configuration")
    if "items" in config:
        items = fields.objs("items")
        if len(items) != 1:
            fields.fail("items", "expected exactly one consent configuration")
        fields = items[0]
    settings = BreakGlassSettings()
    raw_reasons = fields.data.get("emergencyConsentReasons")
    if raw_reasons is not None:
        reasons = fields.texts("emergencyConsentReasons") if isinstance(raw_reasons, list) else [
            fields.required_text("emergencyConsentReasons")
        ]
        if not reasons:
            fields.fail("emergencyConsentReasons", "empty: no emergency access would be possible")
        settings["reasons"] = reasons
    duration = fields.positive_int("emergencyConsentDuration")
    if duration is not None:
        settings["duration_h"] = duration
    return settings


def options_duration(
    emergency: bool, consent_duration_h: float | None, emergency_duration_h: float | None
) -> float | None:
    """How long a record without an end lasts, in hours (None: open-ended)."""
    return emergency_duration_h if emergency else consent_duration_h


def _period(effective: Fields, duration_h: float | None) -> JSON | None:
    """The validity period; without an end, ``duration_h`` after the start when given."""
    found = period(effective)
    if found is None or "end" in found or duration_h is None:
        return found
    start = parse_date_range(found["start"])
    if start is None or start.start is None:
        effective.fail("start", "expected a date-time such as 2024-03-01T09:30:00Z")
    end = start.start + timedelta(hours=duration_h)
    return {**found, "end": end.isoformat(timespec="seconds").replace("+00:00", "Z")}


def _provision(ptype: str | None, validity: JSON | None, scope: JSON, emergency: bool) -> JSON:
    purpose = [{"system": V3_PURPOSE_OF_USE, "code": "TREAT"}] if emergency else None
    if ptype is None:
        # No type: the record decides nothing; its scope must not become R4's root exception.
        return drop_empty({"period": validity, "provision": [drop_empty({**scope, "purpose": purpose})]})
    return drop_empty({"type": ptype, "period": validity, **scope, "purpose": purpose})


def _record_name(record: object, index: int | None) -> str:
    consent_id = record.get("consentId") if isinstance(record, dict) else None
    if isinstance(consent_id, str) and consent_id:
        return f"healtheintent consent {consent_id}"
    return f"healtheintent consent [{index}]" if index is not None else "healtheintent consent"


def _is_emergency(fields: Fields, reason_type: str | None) -> bool:
    if reason_type is None or reason_type == PATIENT_GRANTED:
        return False
    if reason_type.startswith(EMERGENCY_PREFIX):
        return True
    fields.fail("consentReasonType", f"unknown value; expected {PATIENT_GRANTED} or EMERGENCY...")


def _identifiers(fields: Fields, consent_id: str | None) -> list[JSON]:
    identifiers: list[JSON] = []
    if consent_id is not None:
        identifiers.append({"system": CONSENT_ID_SYSTEM, "value": consent_id})
    for alias in fields.objs("aliases"):
        identifiers.append(drop_empty({
            "type": {"text": alias.required_text("system")},
            "value": alias.text("value"),
        }))
    return identifiers


def _categories(fields: Fields, emergency_reason: str | None) -> list[JSON]:
    """LOINC patient consent, the HealtheIntent category concept, and the emergency mark."""
    categories = [patient_consent_category()]
    raw = fields.data.get("category")
    if isinstance(raw, dict):
        concept = fields.obj("category")
        assert concept is not None
        categories.append(_coded(CATEGORY_SYSTEM, concept.required_text("concept")))
    elif raw is not None:
        categories.append(_coded(CATEGORY_SYSTEM, fields.required_text("category")))
    if emergency_reason is not None:
        categories.append({
            "coding": [{"system": GATEWAY_CODE_SYSTEM, "code": EMERGENCY_CODE}],
            "text": emergency_reason,
        })
    return categories


def _coded(system: str, code: str) -> JSON:
    return {"coding": [{"system": system, "code": code}]}


def _actors(fields: Fields) -> list[JSON]:
    """Actors from provisionScope; each part is ``{"id": ...}`` (record) or an id (request)."""
    scope = fields.obj("provisionScope", required=True)
    assert scope is not None
    actors: list[JSON] = []
    for key, rtype, required in _SCOPE_ACTORS:
        raw = scope.data.get(key)
        if isinstance(raw, dict):
            part = scope.obj(key)
            assert part is not None
            # Personnel.id is optional in the documented schema: no id, no actor.
            holder, field_key = part, "id"
        else:
            holder, field_key = scope, key
        actor_id = holder.text(field_key, required=required)
        if actor_id is not None:
            actors.append({
                "role": {"coding": [{"system": PARTICIPATION_TYPE_SYSTEM, "code": RECIPIENT_ROLE}]},
                "reference": {"reference": id_reference(holder, field_key, actor_id, rtype)},
            })
    return actors
