"""ClinikAPI consents ("Sign consent", ``POST /v1/consents``) and documents as FHIR R4.

A ClinikAPI consent is already shaped like a FHIR Consent with flat ids; the conversion
turns ids into references and strings into codings, and keeps every element the decision
engine reads: status, scope, dateTime, policyRule and the provision tree (type, period,
actor, action, securityLabel, purpose, class, code, dataPeriod, data, nested provisions).
A provision key the converter does not know is an error, not ignored: it could be a
restriction. A ClinikAPI document becomes a Composition whose confidentiality R or V is
also a ``meta.security`` label, so the labeler treats it like any other restricted record.
"""

from __future__ import annotations

import html
import re

from gateway.core.consent import POLICY_RULE_TYPES, POLICY_URIS, opposite
from gateway.core.fhir import JSON
from gateway.core.model import (
    CONSENT_ACTION_SYSTEM,
    V3_ACT_CODE,
    V3_CONFIDENTIALITY,
    V3_PURPOSE_OF_USE,
    Label,
)
from gateway.core.vendors._common import (
    CONSENT_ACTOR_TYPES,
    LOINC,
    PARTICIPATION_TYPE_SYSTEM,
    ConvertOptions,
    Fields,
    VendorError,
    coding,
    drop_empty,
    fhir_id,
    label_coding,
    period,
    records_of,
    scope_concept,
    typed_reference,
)

STATUSES = ("draft", "proposed", "active", "rejected", "inactive")
SCOPES = ("patient-privacy", "research", "treatment", "adr")
PROVISION_TYPES = ("permit", "deny")
CONSENT_ACTIONS = ("collect", "access", "use", "disclose", "correct")
DATA_MEANINGS = ("instance", "related", "dependents", "authoredby")
DOCUMENT_STATUSES = ("preliminary", "final", "amended")
CONFIDENTIALITY = ("N", "R", "V")
# v3 ActConsentDirective codes: the policy rules that decide when a provision has no type.
_CONSENT_DIRECTIVES = frozenset(
    {"OPTIN", "OPTINR", "OPTOUT", "OPTOUTE", "EMRGONLY", "GRANTORCHOICE", "IMPLIED", "IMPLIEDD",
     "NOCONSENT", "NOPP"}
)
_PROVISION_KEYS = (
    "type", "period", "actor", "action", "securityLabel", "purpose", "class", "code",
    "dataPeriod", "data", "provision",
)
_LOINC_CODE = re.compile(r"\d{1,7}-\d")
# ClinikAPI document types with a LOINC document code (the rest keep their text).
_DOCUMENT_TYPES = {
    "discharge-summary": "18842-5",
    "referral-letter": "57133-1",
    "care-plan": "18776-5",
    "progress-note": "11506-3",
    "consult-note": "11488-4",
    "history-and-physical": "34117-2",
}


def consent_from_clinikapi(record: dict[str, object], *, index: int | None = None) -> JSON:
    """A FHIR R4 Consent from one ClinikAPI consent record.

    ``index`` (its position in a list) names the record in errors when it has no id.
    Raises ``VendorError`` on a missing ``patientId``/``scope``/``category``/``status``,
    an unknown enum value, a provision type other than permit/deny, an actor or data
    reference that is not ``Type/id``, or an unknown provision field.
    """
    fields = Fields.of(record, _record_name("consent", record, index))
    vendor_id = fields.text("id")
    consent: JSON = {
        "resourceType": "Consent",
        "id": fhir_id(vendor_id, "clinikapi", record),
        "status": fields.enum("status", STATUSES, required=True),
        "scope": scope_concept(fields.required_enum("scope", SCOPES)),
        "category": _categories(fields),
        "patient": {"reference": _reference(fields, "patientId", "Patient", required=True)},
        "dateTime": fields.date_time("dateTime"),
        "performer": _loose_references(fields, "performerId"),
        "organization": [{"reference": org}]
        if (org := _reference(fields, "organizationId", "Organization")) else None,
        "sourceAttachment": _attachment(fields.obj("sourceAttachment")),
        "policy": _policies(fields),
        "policyRule": _policy_rule(fields.text("policyRule")),
        "verification": [_verification(v) for v in fields.objs("verification")],
        "provision": _root(p, fields.text("policyRule")) if (p := fields.obj("provision")) else None,
    }
    if vendor_id is not None:
        consent["identifier"] = [{"system": "urn:consent-gateway:clinikapi:consent", "value": vendor_id}]
    return drop_empty(consent)


def convert(payload: object, options: ConvertOptions) -> list[JSON]:
    """Every Consent of a payload holding one ClinikAPI consent record or a list of them.

    With ``options.patient_ref`` the consents are about that FHIR patient (the source
    asked ClinikAPI about it under the vendor's id), else about ``Patient/<patientId>``.
    """
    consents = [
        consent_from_clinikapi(_as_record(item, "consent", i), index=i)
        for i, item in enumerate(records_of(payload, "clinikapi"))
    ]
    if options.patient_ref is not None:
        for consent in consents:
            consent["patient"] = {"reference": options.patient_ref}
    return consents


def document_labels(document: dict[str, object]) -> tuple[Label, ...]:
    """The confidentiality label a ClinikAPI document carries: R or V, none for N or absent."""
    fields = Fields.of(document, _record_name("document", document, None))
    code = fields.enum("confidentiality", CONFIDENTIALITY)
    if code is None or code == "N":
        return ()
    return (Label(V3_CONFIDENTIALITY, code),)


def labels_by_document(payload: object) -> dict[str, tuple[Label, ...]]:
    """The confidentiality labels of ClinikAPI documents, by the Composition each becomes.

    Keys are ``Composition/<id>`` as ``composition_from_clinikapi_document`` names it; only
    documents with a label (R or V) are listed: N, like no confidentiality, is the default.
    Raises ``VendorError`` on a document that is not an object or an unknown confidentiality.
    """
    found: dict[str, tuple[Label, ...]] = {}
    for i, item in enumerate(records_of(payload, "clinikapi")):
        doc = _as_record(item, "document", i)
        labels = document_labels(doc)
        if labels:
            fields = Fields.of(doc, _record_name("document", doc, i))
            found[f"Composition/{fhir_id(fields.text('id'), 'clinikapi-doc', doc)}"] = labels
    return found


def composition_from_clinikapi_document(
    doc: dict[str, object], *, index: int | None = None
) -> JSON:
    """A FHIR R4 Composition from a ClinikAPI document ("Create document" shape).

    ``confidentiality`` is kept, and R or V is also put in ``meta.security`` (system
    v3-Confidentiality), which is where the labeler reads resource labels. Section codes
    written ``system|code`` or as LOINC codes become codings so the rules can label them.
    Raises ``VendorError`` on a missing status/type/patientId/practitionerId/title, an
    unknown status or confidentiality, or a section list outside 1-50 sections.
    """
    fields = Fields.of(doc, _record_name("document", doc, index))
    labels = document_labels(doc)
    sections = fields.objs("sections")
    if not 1 <= len(sections) <= 50:
        fields.fail("sections", "expected 1 to 50 sections")
    doc_type = fields.required_text("type")
    composition: JSON = {
        "resourceType": "Composition",
        "id": fhir_id(fields.text("id"), "clinikapi-doc", doc),
        "meta": {"security": [label_coding(lb) for lb in labels]} if labels else None,
        "status": fields.enum("status", DOCUMENT_STATUSES, required=True),
        "type": _document_type(doc_type),
        "category": [{"text": c} for c in fields.texts("category")],
        "subject": {"reference": _reference(fields, "patientId", "Patient", required=True)},
        "encounter": {"reference": enc} if (enc := _reference(fields, "encounterId", "Encounter")) else None,
        "date": fields.date_time("date"),
        "author": [{"reference": _reference(fields, "practitionerId", "Practitioner", required=True)}],
        "title": fields.required_text("title"),
        "confidentiality": fields.text("confidentiality"),
        "custodian": {"reference": org} if (org := _reference(fields, "custodianId", "Organization")) else None,
        "event": [_event(e) for e in fields.objs("event")],
        "section": [_section(s) for s in sections],
    }
    return drop_empty(composition)


def _record_name(kind: str, record: object, index: int | None) -> str:
    rid = record.get("id") if isinstance(record, dict) else None
    if isinstance(rid, str) and rid:
        return f"clinikapi {kind} {rid}"
    return f"clinikapi {kind} [{index}]" if index is not None else f"clinikapi {kind}"


def _as_record(item: object, kind: str, index: int) -> dict[str, object]:
    if not isinstance(item, dict):
        raise VendorError(f"clinikapi {kind} [{index}]", "(record)", "expected an object")
    return item


def _reference(fields: Fields, key: str, rtype: str, *, required: bool = False) -> str | None:
    """``rtype/id`` from a vendor id field (bare id or already ``rtype/id``)."""
    value = fields.text(key, required=required)
    if value is None:
        return None
    ref = typed_reference(value, rtype)
    if not ref.startswith(f"{rtype}/") or ref.count("/") != 1:
        fields.fail(key, f"expected a {rtype} id")
    return ref


def _loose_references(fields: Fields, key: str) -> list[JSON]:
    """The Reference of an optional id field whose resource type the vendor does not say."""
    value = fields.text(key)
    return [] if value is None else [_loose_reference(value)]


def _loose_reference(value: str) -> JSON:
    """``Type/id`` as a reference; a bare id (type unknown) as an identifier."""
    return {"reference": value} if "/" in value else {"identifier": {"value": value}}


def _categories(fields: Fields) -> list[JSON]:
    """Consent.category from a category string (or list): LOINC or v3 codes as codings."""
    raw = fields.data.get("category")
    values = fields.texts("category") if isinstance(raw, list) else [fields.required_text("category")]
    if not values:
        fields.fail("category", "missing")
    return [_category_concept(v) for v in values]


def _category_concept(value: str) -> JSON:
    if _LOINC_CODE.fullmatch(value):
        return {"coding": [{"system": LOINC, "code": value}]}
    if value.isupper() and value.isalpha():
        return {"coding": [{"system": V3_ACT_CODE, "code": value}]}
    return {"text": value}


def _policy_rule(value: str | None) -> JSON | None:
    """Consent.policyRule; the v3 consent directives (OPTIN, OPTOUT, ...) in any case, and
    the FHIR policy URIs ``http://hl7.org/fhir/ConsentPolicy/opt-in`` / ``opt-out``."""
    if value is None:
        return None
    code = POLICY_URIS.get(value.rstrip("/"), value.upper())
    if code in _CONSENT_DIRECTIVES:
        return {"coding": [{"system": V3_ACT_CODE, "code": code}]}
    return {"text": value}


def _base_type(policy_rule: str | None) -> str:
    """The base policy's type, as the engine reads it: permit (OPTIN), deny (OPTOUT) or ""."""
    rule = _policy_rule(policy_rule)
    code = rule["coding"][0]["code"] if rule and "coding" in rule else ""
    return POLICY_RULE_TYPES.get(code, "")


def _policies(fields: Fields) -> list[JSON]:
    policies: list[JSON] = []
    uri = fields.text("policyUri")
    if uri is not None:
        policies.append({"uri": uri})
    for policy in fields.objs("policies"):
        entry = drop_empty({"authority": policy.text("authority"), "uri": policy.text("uri")})
        if not entry:
            policy.fail("uri", "a policy needs an authority or a uri")
        policies.append(entry)
    return policies


def _attachment(fields: Fields | None) -> JSON | None:
    if fields is None:
        return None
    return drop_empty({key: fields.text(key) for key in ("contentType", "data", "url", "title")})


def _verification(fields: Fields) -> JSON:
    verified = fields.flag("verified", required=True)
    with_ref = _loose_references(fields, "verifiedWith")
    return drop_empty({
        "verified": verified,
        "verifiedWith": with_ref[0] if with_ref else None,
        "verificationDate": fields.date_time("verificationDate"),
    })


def _root(fields: Fields, policy_rule: str | None) -> JSON:
    """The root provision; an untyped one with conditions reads as R4's exception to the base."""
    base = _base_type(policy_rule)
    return _provision(fields, opposite(base) if base else "")


def _provision(fields: Fields, inherited: str) -> JSON:
    """One provision and, recursively, its nested provisions (``provision``: list or object).

    ``inherited`` is the type an untyped provision takes (its parent's; "" when unknown),
    which decides what ``data`` without a meaning covers.
    """
    fields.only(_PROVISION_KEYS)
    nested = fields.data.get("provision")
    children = [fields.obj("provision")] if isinstance(nested, dict) else fields.objs("provision")
    ptype = fields.text("type")
    if ptype is not None and ptype.lower() not in PROVISION_TYPES:
        fields.fail("type", "unknown value; expected one of permit, deny")
    effective = ptype.lower() if ptype else inherited
    return drop_empty({
        "type": ptype.lower() if ptype else None,
        "period": period(fields.obj("period")),
        "actor": [_actor(a) for a in fields.objs("actor")],
        "action": [{"coding": [_action(a)]} for a in fields.objs("action")],
        "securityLabel": [coding(s) for s in fields.objs("securityLabel")],
        "purpose": [coding(p, V3_PURPOSE_OF_USE) for p in fields.objs("purpose")],
        "class": [coding(c) for c in fields.objs("class")],
        "code": [{"coding": [coding(c)]} for c in fields.objs("code")],
        "dataPeriod": period(fields.obj("dataPeriod")),
        "data": [_data(d, effective) for d in fields.objs("data")],
        "provision": [_provision(child, effective) for child in children if child is not None],
    })


def _action(fields: Fields) -> JSON:
    """An action coding; only the consentaction codes have a meaning the engine knows."""
    action = coding(fields, CONSENT_ACTION_SYSTEM)
    if action["code"] not in CONSENT_ACTIONS:
        fields.fail("code", f"unknown value; expected one of {', '.join(CONSENT_ACTIONS)}")
    return action


def _actor(fields: Fields) -> JSON:
    """An actor; the reference must be ``Type/id`` because the engine matches it verbatim."""
    fields.only(("role", "reference"))
    reference = fields.required_text("reference")
    parts = reference.split("/")
    if len(parts) != 2 or parts[0] not in CONSENT_ACTOR_TYPES or not parts[1]:
        fields.fail("reference", "expected Type/id, e.g. Practitioner/123")
    role = fields.text("role")
    return drop_empty({
        "role": {"coding": [{"system": PARTICIPATION_TYPE_SYSTEM, "code": role}]} if role else None,
        "reference": {"reference": reference},
    })


def _data(fields: Fields, ptype: str) -> JSON:
    """A data element. ClinikAPI documents no ``meaning``; without one it is read the safe way
    for its provision: ``related`` on a deny (the record and what it refers to are closed),
    ``instance`` on a permit or an unknown type (only the record itself is opened)."""
    fields.only(("reference", "meaning"))
    reference = fields.required_text("reference")
    if reference.count("/") != 1:
        fields.fail("reference", "expected Type/id")
    meaning = fields.enum("meaning", DATA_MEANINGS) or ("related" if ptype == "deny" else "instance")
    return {"meaning": meaning, "reference": {"reference": reference}}


def _document_type(value: str) -> JSON:
    code = _DOCUMENT_TYPES.get(value)
    if code is None:
        return {"text": value}
    return {"coding": [{"system": LOINC, "code": code}], "text": value}


def _code_concept(value: str) -> JSON:
    """A CodeableConcept from ``system|code``, a LOINC code, or free text."""
    system, sep, code = value.partition("|")
    if sep and system and code:
        return {"coding": [{"system": system, "code": code}]}
    if _LOINC_CODE.fullmatch(value):
        return {"coding": [{"system": LOINC, "code": value}]}
    return {"text": value}


def _section(fields: Fields) -> JSON:
    text = fields.text("text")
    code = fields.text("code")
    author = _reference(fields, "authorId", "Practitioner")
    return drop_empty({
        "title": fields.text("title"),
        "code": _code_concept(code) if code else None,
        "author": [{"reference": author}] if author else None,
        "text": {
            "status": "generated",
            "div": f'<div xmlns="http://www.w3.org/1999/xhtml">{html.escape(text)}</div>',
        } if text else None,
        "entry": [_loose_reference(rid) for rid in fields.texts("resourceIds")],
        "section": [_section(child) for child in fields.objs("sections")],
    })


def _event(fields: Fields) -> JSON:
    return drop_empty({
        "code": [{"coding": [coding(c)]} for c in fields.objs("code")],
        "period": period(fields.obj("period")),
        "detail": [_loose_reference(rid) for rid in fields.texts("detailIds")],
    })
