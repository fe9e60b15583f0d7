"""HealthEx ``getPatientConsents`` responses as FHIR R4 Consents.

One HealthEx consent becomes one Consent per (resourceScope, sensitivityScope) pair, with
that pair as the root provision's conditions: ``class`` = the resource scope (system
``RESOURCE_SCOPE_SYSTEM``, codes defined in ``rules/``) and ``securityLabel`` = the labels
the rules give the sensitivity scope. NORMAL adds no label, so a NORMAL permit opens only
non-sensitive data of that scope (sensitive data needs a permit naming its label), while a
NORMAL deny closes the whole scope.

Meaning of the HealthEx fields:
- ``hasPatientConsented`` true -> permit (policyRule OPTIN), false -> deny (OPTOUT).
- ``consentType`` (the vendor documents the names only; the mapping is the gateway's):
  FUTURE_DATA_USE is research (scope ``research``, purpose HRESCH, action use);
  DATA_AUTHORIZATION authorises access for care (purpose TREAT, actions access/use);
  PATIENT_DIRECTED_DATA_EXCHANGE is disclosure the patient directs (purpose PATRQT,
  action disclose).
- ``studyId``: a FUTURE_DATA_USE consent is about research in ITS study. Unless that study
  is the site's (``study_id``, config ``consent.healthex_study_id``), its purpose is that
  study (system ``STUDY_PURPOSE_SYSTEM``) instead of HRESCH: it decides no other research.
- ``reason``: CONSENTED / DECLINED must agree with ``hasPatientConsented``; REVOKED means
  the patient withdrew: an active deny of what the consent type covered (its purpose,
  actions and data scopes), never a fall-back to a permitting default; EXPIRED gives
  ``status: inactive`` (the consent ran out); NO_RESPONSE, like ``source: DEFAULTS`` (the
  patient never answered), gives no Consent at all, so ``consent.default_decision`` applies.
- ``expirationTimestamp`` -> ``provision.period.end``, so expiry needs no clock here.
- ``consentRecord``: ``consentStatus`` must agree with ``hasPatientConsented``; its
  ``timestamp`` is the Consent's ``dateTime``; its resource and sensitivity scope lists
  stand in when ``consentDataScopes`` is null (a deny with neither closes all data).
Consent ids are a hash of the consent record id (or of the whole consent when it has
none) and the scope pair, so they are stable across lookups.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gateway.core.fhir import JSON
from gateway.core.model import (
    CONSENT_ACTION_SYSTEM,
    RESOURCE_SCOPE_SYSTEM,
    V3_ACT_CODE,
    V3_PURPOSE_OF_USE,
    Label,
)
from gateway.core.vendors._common import (
    patient_consent_category,
    ConvertOptions,
    Fields,
    VendorError,
    drop_empty,
    id_reference,
    label_coding,
    records_of,
    scope_concept,
    stable_id,
)

CONSENT_TYPES = ("DATA_AUTHORIZATION", "PATIENT_DIRECTED_DATA_EXCHANGE", "FUTURE_DATA_USE")
RESOURCE_SCOPES = (
    "CONTACT_INFO", "MEDICATIONS", "ALLERGIES", "DIAGNOSES", "LABS", "DEMOGRAPHICS",
    "CLINICAL_NOTES", "VISITS", "DIAGNOSTIC_REPORTS", "CLINICAL_VITALS", "PROCEDURES",
    "IMMUNIZATIONS", "IMAGING", "TREATMENT_PLAN", "GENOMIC_DATA", "FAMILY_HISTORY",
    "SOCIAL_HISTORY", "ADMINISTRATIVE_AND_BILLING",
)
SENSITIVITY_SCOPES = (
    "NORMAL", "HIV_OR_STI", "SUBSTANCE_USE_OR_DRUG_ABUSE", "MENTAL_HEALTH", "GENETIC_TESTING",
    "REPRODUCTIVE_HEALTH_DATA", "PSYCHOTHERAPY_NOTES", "SUD_PART_2", "SICKLE_CELL",
)
REASONS = ("CONSENTED", "DECLINED", "REVOKED", "EXPIRED", "NO_RESPONSE")
CONSENT_STATUSES = ("OPTED_IN", "OPTED_OUT")
SOURCES = ("STUDY", "DEFAULTS", "IAS")
CONSENT_TYPE_SYSTEM = "urn:consent-gateway:healthex:consent-type"
CONSENT_RECORD_SYSTEM = "urn:consent-gateway:healthex:consent-record"
# Purpose of a research consent for a study other than the site's: no request carries it.
STUDY_PURPOSE_SYSTEM = "urn:consent-gateway:healthex:study"


@dataclass(frozen=True, slots=True)
class _Use:
    """What a HealthEx consent type covers, in FHIR terms."""

    scope: str
    purpose: str
    actions: tuple[str, ...]
    purpose_system: str = V3_PURPOSE_OF_USE


_USES = {
    "DATA_AUTHORIZATION": _Use("patient-privacy", "TREAT", ("access", "use")),
    "PATIENT_DIRECTED_DATA_EXCHANGE": _Use("patient-privacy", "PATRQT", ("disclose",)),
    "FUTURE_DATA_USE": _Use("research", "HRESCH", ("use",)),
}
# (resourceScope or None for all data, sensitivityScope)
_ScopePair = tuple[str | None, str]


def consents_from_healthex(
    response: list[Any] | dict[str, Any],
    *,
    sensitivity_labels: Mapping[str, tuple[Label, ...]],
    patient_ref: str | None = None,
    study_id: str | None = None,
) -> list[JSON]:
    """The Consents of a ``getPatientConsents`` response (a list of patient groups, or one).

    ``sensitivity_labels`` maps each non-NORMAL sensitivity scope to its labels (from
    ``rules/``); ``patient_ref`` replaces ``Patient/<patientId>`` when the source asked
    HealthEx about a FHIR patient under another id. Raises ``VendorError`` on an unknown
    enum value, a missing ``patientId``/``consentType``/``hasPatientConsented``, fields
    that contradict each other, a permit without data scopes, a sensitivity scope the
    rules give no label, or ``source: IAS`` (documented as never returned).
    """
    consents: list[JSON] = []
    first_patient: str | None = None
    for g, group in enumerate(records_of(response, "healthex")):
        fields = Fields.of(group, f"healthex response[{g}]")
        patient_id = fields.required_text("patientId")
        first_patient = first_patient or patient_id
        if patient_ref is not None and patient_id != first_patient:
            # SECURITY: one FHIR patient cannot take on another patient's consents (issue 8).
            fields.fail("patientId", f"a second patient in a response about {patient_ref}")
        reference = patient_ref or id_reference(fields, "patientId", patient_id, "Patient")
        for c, raw in enumerate(fields.items("consents")):
            consent = Fields.of(raw, _consent_name(raw, g, c))
            consents.extend(_convert_consent(consent, patient_id, reference, sensitivity_labels, study_id))
    return consents


def convert(payload: object, options: ConvertOptions) -> list[JSON]:
    """``consents_from_healthex`` with the gateway's converter signature."""
    if not isinstance(payload, (list, dict)):
        raise VendorError("healthex", "(payload)", "expected an object or a list")
    return consents_from_healthex(
        payload, sensitivity_labels=options.sensitivity_labels, patient_ref=options.patient_ref,
        study_id=options.study_id,
    )


def _consent_name(raw: object, group: int, index: int) -> str:
    record_id = raw.get("consentRecordId") if isinstance(raw, dict) else None
    if isinstance(record_id, str) and record_id:
        return f"healthex consent {record_id}"
    return f"healthex response[{group}].consents[{index}]"


def _convert_consent(
    fields: Fields,
    patient_id: str,
    patient_ref: str,
    sensitivity_labels: Mapping[str, tuple[Label, ...]],
    study_id: str | None = None,
) -> list[JSON]:
    consent_type = fields.required_enum("consentType", CONSENT_TYPES)
    consented = bool(fields.flag("hasPatientConsented", required=True))
    reason = fields.enum("reason", REASONS)
    source = fields.enum("source", SOURCES)
    record = fields.obj("consentRecord")
    _check_agreement(fields, record, consent_type, consented, reason, patient_id)
    if source == "IAS":
        fields.fail("source", "IAS consents are documented as never returned")
    if reason == "NO_RESPONSE" or source == "DEFAULTS":
        return []
    # SECURITY: a withdrawal denies what the consent covered; it is not "no consent".
    revoked = reason == "REVOKED"
    consented = consented and not revoked
    inactive = reason == "EXPIRED"
    pairs = _scope_pairs(fields, record, consented and not inactive, sensitivity_labels)
    record_id = fields.text("consentRecordId") or (record.text("id") if record else None)
    # Without a record id the whole consent is the identity: same content, same ids.
    base = record_id or stable_id("healthex", patient_id, dict(fields.data))
    use = _study_use(_USES[consent_type], consent_type, fields, record, study_id)
    common: JSON = drop_empty({
        "identifier": [{"system": CONSENT_RECORD_SYSTEM, "value": record_id}] if record_id else None,
        "status": "inactive" if inactive else "active",
        "scope": scope_concept(use.scope),
        "category": [
            patient_consent_category(),
            {"coding": [{"system": CONSENT_TYPE_SYSTEM, "code": consent_type}]},
        ],
        "patient": {"reference": patient_ref},
        "dateTime": record.date_time("timestamp") if record else None,
        "sourceAttachment": {"contentType": "application/pdf", "url": url}
        if (url := fields.text("pdfUrl")) else None,
        "policyRule": {"coding": [{"system": V3_ACT_CODE, "code": "OPTIN" if consented else "OPTOUT"}]},
    })
    expires = fields.date_time("expirationTimestamp") or (
        record.date_time("expirationTimestamp") if record else None
    )
    return [
        {
            "resourceType": "Consent",
            "id": stable_id("healthex", base, resource, sensitivity),
            **copy.deepcopy(common),
            "provision": _provision(
                use, consented, expires, resource, sensitivity_labels.get(sensitivity, ())
            ),
        }
        for resource, sensitivity in pairs
    ]


def _study_use(
    use: _Use, consent_type: str, fields: Fields, record: Fields | None, study_id: str | None
) -> _Use:
    """Research consented for another study than the site's decides no research here."""
    if consent_type != "FUTURE_DATA_USE":
        return use
    study = fields.data.get("studyId") or (record.data.get("studyId") if record else None)
    if study is None or study == study_id:
        return use
    if not isinstance(study, str) or not study:
        fields.fail("studyId", "expected a study id")
    return _Use(use.scope, study, use.actions, STUDY_PURPOSE_SYSTEM)


def _check_agreement(
    fields: Fields,
    record: Fields | None,
    consent_type: str,
    consented: bool,
    reason: str | None,
    patient_id: str,
) -> None:
    """Refuse a consent whose fields contradict each other: which one is true is unknown."""
    if (reason == "CONSENTED" and not consented) or (reason == "DECLINED" and consented):
        fields.fail("reason", "contradicts hasPatientConsented")
    if record is None:
        return
    status = record.enum("consentStatus", CONSENT_STATUSES)
    if status is not None and (status == "OPTED_IN") != consented:
        record.fail("consentStatus", "contradicts hasPatientConsented")
    record_type = record.enum("consentType", CONSENT_TYPES)
    if record_type is not None and record_type != consent_type:
        record.fail("consentType", "contradicts the consent's consentType")
    record_patient = record.text("patientId")
    if record_patient is not None and record_patient != patient_id:
        record.fail("patientId", "names another patient than its group")


def _scope_pairs(
    fields: Fields,
    record: Fields | None,
    active_permit: bool,
    sensitivity_labels: Mapping[str, tuple[Label, ...]],
) -> list[_ScopePair]:
    """The (resource, sensitivity) pairs the consent covers.

    ``consentDataScopes`` when given; else the consent record's scope lists (a missing
    sensitivity list means NORMAL, a missing resource list means all data). An active
    permit must name its data; otherwise naming none means all data. Every sensitivity
    scope but NORMAL must have labels in ``sensitivity_labels``.
    """
    pairs: list[_ScopePair] = []
    for scope in fields.objs("consentDataScopes"):
        sensitivity = scope.required_enum("sensitivityScope", SENSITIVITY_SCOPES)
        _check_labels(scope, "sensitivityScope", sensitivity, sensitivity_labels)
        pairs.append((scope.enum("resourceScope", RESOURCE_SCOPES, required=True), sensitivity))
    if record is not None:
        resources = record.texts("consentDataResourceScopes", RESOURCE_SCOPES)
        sensitivities = record.texts("consentDataSensitivityScopes", SENSITIVITY_SCOPES)
        for sensitivity in sensitivities:
            _check_labels(record, "consentDataSensitivityScopes", sensitivity, sensitivity_labels)
        if not pairs and (resources or sensitivities):
            all_data: list[str | None] = [None]
            pairs = [
                (resource, sensitivity)
                for resource in (resources or all_data)
                for sensitivity in (sensitivities or ["NORMAL"])
            ]
    if not pairs:
        if active_permit:
            fields.fail("consentDataScopes", "missing: a consent that permits must name its data")
        pairs = [(None, "NORMAL")]
    return list(dict.fromkeys(pairs))


def _check_labels(
    fields: Fields, key: str, sensitivity: str, sensitivity_labels: Mapping[str, tuple[Label, ...]]
) -> None:
    # SECURITY: without its labels a sensitive-scope permit would widen to the whole
    # resource scope (issue 8).
    if sensitivity != "NORMAL" and not sensitivity_labels.get(sensitivity):
        fields.fail(key, f"the rules give {sensitivity} no labels")


def _provision(
    use: _Use, consented: bool, expires: str | None, resource: str | None, labels: tuple[Label, ...]
) -> JSON:
    """The root provision: the consent type's purpose and actions, the scope pair's data."""
    return drop_empty({
        "type": "permit" if consented else "deny",
        "period": {"end": expires} if expires else None,
        "action": [{"coding": [{"system": CONSENT_ACTION_SYSTEM, "code": a}]} for a in use.actions],
        "purpose": [{"system": use.purpose_system, "code": use.purpose}],
        "class": [{"system": RESOURCE_SCOPE_SYSTEM, "code": resource}] if resource else None,
        "securityLabel": [label_coding(label) for label in labels],
    })
