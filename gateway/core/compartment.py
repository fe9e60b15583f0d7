"""Which patients a resource belongs to, and the other facts the consent engine reads.

The patient compartment follows the FHIR R4 (4.0.1) CompartmentDefinition for Patient:
every resource type it lists, with each linking search parameter mapped to the element
path its R4 SearchParameter expression reads. The tables are compiled once, at import,
into per-type accessors. Everything here is pure and never raises on odd JSON: a value of
the wrong shape is simply not a reference, a date or a code.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from datetime import datetime, timedelta, timezone
from typing import Any

from gateway.core.fhir import (
    NO_BASES, Bases, JSON, contained_resource, iter_codings, local_reference, reference_base, relative_reference,
)
from gateway.core.labels import code_spellings
from gateway.core.subscriptions import CRITERIA_ELEMENTS, audit_searches, searches_patients, subscription_patients

Path = tuple[str, ...]

# R4 Patient CompartmentDefinition: resource type -> {search parameter: element path}.
# Types the definition lists without a parameter are never in the compartment.
PATIENT_COMPARTMENT: dict[str, dict[str, Path]] = {
    "Account": {"subject": ("subject",)},
    "AdverseEvent": {"subject": ("subject",)},
    "AllergyIntolerance": {
        "patient": ("patient",),
        "recorder": ("recorder",),
        "asserter": ("asserter",),
    },
    "Appointment": {"actor": ("participant", "actor")},
    "AppointmentResponse": {"actor": ("actor",)},
    "AuditEvent": {"patient": ("agent", "who"), "patient.entity": ("entity", "what")},
    "Basic": {"patient": ("subject",), "author": ("author",)},
    "BodyStructure": {"patient": ("patient",)},
    "CarePlan": {"patient": ("subject",), "performer": ("activity", "detail", "performer")},
    "CareTeam": {"patient": ("subject",), "participant": ("participant", "member")},
    "ChargeItem": {"subject": ("subject",)},
    "Claim": {"patient": ("patient",), "payee": ("payee", "party")},
    "ClaimResponse": {"patient": ("patient",)},
    "ClinicalImpression": {"subject": ("subject",)},
    "Communication": {
        "subject": ("subject",),
        "sender": ("sender",),
        "recipient": ("recipient",),
    },
    "CommunicationRequest": {
        "subject": ("subject",),
        "sender": ("sender",),
        "recipient": ("recipient",),
        "requester": ("requester",),
    },
    "Composition": {
        "subject": ("subject",),
        "author": ("author",),
        "attester": ("attester", "party"),
    },
    "Condition": {"patient": ("subject",), "asserter": ("asserter",)},
    "Consent": {"patient": ("patient",)},
    "Coverage": {
        "policy-holder": ("policyHolder",),
        "subscriber": ("subscriber",),
        "beneficiary": ("beneficiary",),
        "payor": ("payor",),
    },
    "CoverageEligibilityRequest": {"patient": ("patient",)},
    "CoverageEligibilityResponse": {"patient": ("patient",)},
    "DetectedIssue": {"patient": ("patient",)},
    "DeviceRequest": {"subject": ("subject",), "performer": ("performer",)},
    "DeviceUseStatement": {"subject": ("subject",)},
    "DiagnosticReport": {"subject": ("subject",)},
    "DocumentManifest": {
        "subject": ("subject",),
        "author": ("author",),
        "recipient": ("recipient",),
    },
    "DocumentReference": {"subject": ("subject",), "author": ("author",)},
    "Encounter": {"patient": ("subject",)},
    "EnrollmentRequest": {"subject": ("candidate",)},
    "EpisodeOfCare": {"patient": ("patient",)},
    "ExplanationOfBenefit": {"patient": ("patient",), "payee": ("payee", "party")},
    "FamilyMemberHistory": {"patient": ("patient",)},
    "Flag": {"patient": ("subject",)},
    "Goal": {"patient": ("subject",)},
    "Group": {"member": ("member", "entity")},
    "ImagingStudy": {"patient": ("subject",)},
    "Immunization": {"patient": ("patient",)},
    "ImmunizationEvaluation": {"patient": ("patient",)},
    "ImmunizationRecommendation": {"patient": ("patient",)},
    "Invoice": {"subject": ("subject",), "recipient": ("recipient",)},
    "List": {"subject": ("subject",), "source": ("source",)},
    "MeasureReport": {"patient": ("subject",)},
    "Media": {"subject": ("subject",)},
    "MedicationAdministration": {
        "patient": ("subject",),
        "performer": ("performer", "actor"),
    },
    "MedicationDispense": {"subject": ("subject",), "receiver": ("receiver",)},
    "MedicationRequest": {"subject": ("subject",)},
    "MedicationStatement": {"subject": ("subject",)},
    "MolecularSequence": {"patient": ("patient",)},
    "NutritionOrder": {"patient": ("patient",)},
    "Observation": {"subject": ("subject",), "performer": ("performer",)},
    "Patient": {"link": ("link", "other")},
    "Person": {"patient": ("link", "target")},
    "Procedure": {"patient": ("subject",), "performer": ("performer", "actor")},
    "Provenance": {"patient": ("target",)},
    "QuestionnaireResponse": {"subject": ("subject",), "author": ("author",)},
    "RelatedPerson": {"patient": ("patient",)},
    "RequestGroup": {"subject": ("subject",), "participant": ("action", "participant")},
    "ResearchSubject": {"individual": ("individual",)},
    "RiskAssessment": {"subject": ("subject",)},
    "Schedule": {"actor": ("actor",)},
    "ServiceRequest": {"subject": ("subject",), "performer": ("performer",)},
    "Specimen": {"subject": ("subject",)},
    "SupplyDelivery": {"patient": ("patient",)},
    "SupplyRequest": {"requester": ("requester",)},
    "VisionPrescription": {"patient": ("patient",)},
}

# Elements holding the clinically relevant date, most specific first; the first present wins.
CLINICAL_DATE: dict[str, tuple[Path, ...]] = {
    "AdverseEvent": (("date",),),
    "AllergyIntolerance": (("onsetDateTime",), ("onsetPeriod",), ("recordedDate",)),
    "Account": (("servicePeriod",),),
    "AuditEvent": (("recorded",),),
    "Basic": (("created",),),
    "CarePlan": (("period",), ("created",)),
    "CareTeam": (("period",),),
    "ChargeItem": (("occurrenceDateTime",), ("occurrencePeriod",), ("enteredDate",)),
    "Claim": (("billablePeriod",), ("created",)),
    "ClinicalImpression": (("effectiveDateTime",), ("effectivePeriod",), ("date",)),
    "Communication": (("sent",), ("received",)),
    "CommunicationRequest": (("occurrenceDateTime",), ("occurrencePeriod",), ("authoredOn",)),
    "Composition": (("date",),),
    "Condition": (("onsetDateTime",), ("onsetPeriod",), ("recordedDate",)),
    "Consent": (("dateTime",),),
    "Coverage": (("period",),),
    "DetectedIssue": (("identifiedDateTime",), ("identifiedPeriod",)),
    "DeviceRequest": (("occurrenceDateTime",), ("occurrencePeriod",), ("authoredOn",)),
    "DeviceUseStatement": (("timingDateTime",), ("timingPeriod",), ("recordedOn",)),
    "DiagnosticReport": (("effectiveDateTime",), ("effectivePeriod",), ("issued",)),
    "DocumentManifest": (("created",),),
    "DocumentReference": (("context", "period"), ("date",)),
    "Encounter": (("period",),),
    "EpisodeOfCare": (("period",),),
    "ExplanationOfBenefit": (("billablePeriod",), ("created",)),
    "FamilyMemberHistory": (("date",),),
    "Flag": (("period",),),
    "Goal": (("startDate",), ("statusDate",)),
    "ImagingStudy": (("started",),),
    "Immunization": (("occurrenceDateTime",), ("recorded",)),
    "ImmunizationEvaluation": (("date",),),
    "ImmunizationRecommendation": (("date",),),
    "Invoice": (("date",),),
    "List": (("date",),),
    "MeasureReport": (("period",),),
    "Media": (("createdDateTime",), ("createdPeriod",), ("issued",)),
    "MedicationAdministration": (("effectiveDateTime",), ("effectivePeriod",)),
    "MedicationDispense": (("whenHandedOver",), ("whenPrepared",)),
    "MedicationRequest": (("authoredOn",),),
    "MedicationStatement": (("effectiveDateTime",), ("effectivePeriod",), ("dateAsserted",)),
    "NutritionOrder": (("dateTime",),),
    "Observation": (
        ("effectiveDateTime",),
        ("effectivePeriod",),
        ("effectiveInstant",),
        ("issued",),
    ),
    "Procedure": (("performedDateTime",), ("performedPeriod",)),
    "Provenance": (("occurredDateTime",), ("occurredPeriod",), ("recorded",)),
    "QuestionnaireResponse": (("authored",),),
    "RequestGroup": (("authoredOn",),),
    "ResearchSubject": (("period",),),
    "RiskAssessment": (("occurrenceDateTime",), ("occurrencePeriod",)),
    "ServiceRequest": (("occurrenceDateTime",), ("occurrencePeriod",), ("authoredOn",)),
    "Specimen": (
        ("collection", "collectedDateTime"),
        ("collection", "collectedPeriod"),
        ("receivedTime",),
    ),
    "SupplyDelivery": (("occurrenceDateTime",), ("occurrencePeriod",)),
    "SupplyRequest": (("occurrenceDateTime",), ("occurrencePeriod",), ("authoredOn",)),
    "VisionPrescription": (("dateWritten",),),
}

# The resource's main code(s), matched by Consent.provision.code; "code" when not listed.
MAIN_CODE: dict[str, tuple[Path, ...]] = {
    "AdverseEvent": (("event",),),
    "Account": (("type",),),
    "CarePlan": (("category",),),
    "CareTeam": (("category",),),
    "Claim": (("type",),),
    "Communication": (("category",),),
    "CommunicationRequest": (("category",),),
    "Composition": (("type",),),
    "Consent": (("category",),),
    "Coverage": (("type",),),
    "DeviceRequest": (("codeCodeableConcept",),),
    "DocumentReference": (("type",),),
    "Encounter": (("type",),),
    "EpisodeOfCare": (("type",),),
    "FamilyMemberHistory": (("condition", "code"),),
    "Goal": (("description",),),
    "ImagingStudy": (("procedureCode",),),
    "Immunization": (("vaccineCode",),),
    "Media": (("type",),),
    "MedicationAdministration": (("medicationCodeableConcept",),),
    "MedicationDispense": (("medicationCodeableConcept",),),
    "MedicationRequest": (("medicationCodeableConcept",),),
    "MedicationStatement": (("medicationCodeableConcept",),),
    "Specimen": (("type",),),
}
_DEFAULT_CODE: tuple[Path, ...] = (("code",),)

# Elements naming who wrote, recorded, performed, asserted or asked for a resource.
AUTHOR_ELEMENTS: tuple[str, ...] = (
    "author",
    "recorder",
    "performer",
    "asserter",
    "requester",
    "sender",
    "enterer",
    "attester",
    "agent",
    "source",
    # who told (INF) or wrote what a resource holds under its own name in R4: the informant of a
    # MedicationStatement, a report's interpreter, an impression's assessor, the orderer or
    # prescriber of an order, the operator of a Media, who expressed a Goal
    "informationSource",
    "resultsInterpreter",
    "assessor",
    "orderer",
    "prescriber",
    "operator",
    "expressedBy",
)
# Backbone elements wrap the reference one level down (performer.actor, attester.party, ...).
_WRAPPED_REFERENCE = ("actor", "party", "who")


@dataclass(frozen=True, slots=True)
class DateRange:
    """A half-open instant range ``[start, end)``; None means open on that side."""

    start: datetime | None
    end: datetime | None

    def contains(self, other: DateRange) -> bool:
        """``other`` lies entirely within this range (an open side of ``other`` must be open here)."""
        if self.start is not None and (other.start is None or other.start < self.start):
            return False
        return self.end is None or (other.end is not None and other.end <= self.end)

    def overlaps(self, other: DateRange) -> bool:
        """The two ranges share at least one instant."""
        if self.end is not None and other.start is not None and other.start >= self.end:
            return False
        return not (self.start is not None and other.end is not None and other.end <= self.start)

    def contains_instant(self, when: datetime) -> bool:
        """``when`` (naive means UTC) falls within the range."""
        when = as_utc(when)
        if self.start is not None and when < self.start:
            return False
        return self.end is None or when < self.end


_PARTIAL_DATE = re.compile(r"^(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?$")


def as_utc(when: datetime) -> datetime:
    """An aware datetime; naive values are taken as UTC."""
    return when.replace(tzinfo=timezone.utc) if when.tzinfo is None else when


def parse_date_range(text: Any) -> DateRange | None:
    """The instants a FHIR date, dateTime or instant covers, at its own precision.

    ``"2015"`` covers the whole year, ``"2015-02-01"`` the whole day and a full dateTime a
    single instant (naive times are taken as UTC). Anything unparseable gives None.
    """
    return _parse_date_text(text) if isinstance(text, str) else None


@lru_cache(maxsize=4096)
def _parse_date_text(text: str) -> DateRange | None:
    # Cached: records in one response share dates, and parsing dominates a date condition.
    match = _PARTIAL_DATE.match(text)
    try:
        if match:
            year, month, day = match.group(1), match.group(2), match.group(3)
            start = datetime(int(year), int(month or 1), int(day or 1), tzinfo=timezone.utc)
            if day:
                end = start + timedelta(days=1)
            elif month:
                end = (start + timedelta(days=32)).replace(day=1)
            else:
                end = start.replace(year=start.year + 1)
            return DateRange(start, end)
        if "T" not in text:
            return None
        instant = as_utc(datetime.fromisoformat(text.replace("Z", "+00:00")))
    except (ValueError, OverflowError):
        return None
    return DateRange(instant, instant + timedelta(microseconds=1))


def parse_period(value: Any) -> DateRange | None:
    """A FHIR Period as a range (end inclusive at its precision); None when unparseable."""
    if not isinstance(value, dict):
        return None
    start = end = None
    if "start" in value:
        low = parse_date_range(value["start"])
        if low is None:
            return None
        start = low.start
    if "end" in value:
        high = parse_date_range(value["end"])
        if high is None:
            return None
        end = high.end
    if start is not None and end is not None and end < start:
        return None
    return DateRange(start, end)


def iter_path(node: Any, path: Path) -> Iterator[Any]:
    """Values at ``path`` below ``node``, flattening lists at every step."""
    if isinstance(node, list):
        for item in node:
            yield from iter_path(item, path)
        return
    if not path:
        yield node
        return
    if isinstance(node, dict):
        child = node.get(path[0])
        if child is not None:
            yield from iter_path(child, path[1:])


# A patient the gateway cannot look up: named by an absolute reference to another FHIR server
# (its ``Patient/p1`` is not this server's). No consent of it can be read, so a resource it owns
# closes (``decision``: "unknown-patient"); it is never looked up, audited or accounted.
# No reference is spelled this way.
UNKNOWN_PATIENT = "\0unknown-patient"


def _patient(ref: str, ours: Bases) -> str | None:
    """The ``Patient/<id>`` a reference names, ``UNKNOWN_PATIENT`` for another server's patient,
    None when it names no patient."""
    # Fast path for the common ``Type/id`` form; anything else goes the long way.
    if ref.count("/") == 1 and ":" not in ref and "#" not in ref:
        return ref if ref.startswith("Patient/") else None
    if not relative_reference(ref).startswith("Patient/"):
        return None
    local = local_reference(ref, ours)
    return UNKNOWN_PATIENT if local is None else local


def _collect_patients(node: Any, path: Path, found: set[str], ours: Bases = NO_BASES) -> None:
    """Add every ``Patient/<id>`` a Reference at ``path`` below ``node`` names (relative form)."""
    if isinstance(node, list):
        for item in node:
            _collect_patients(item, path, found, ours)
        return
    if not isinstance(node, dict):
        return
    if path:
        child = node.get(path[0])
        if child is not None:
            _collect_patients(child, path[1:], found, ours)
        return
    ref = node.get("reference")
    if isinstance(ref, str) and ref and not ref.startswith("#"):
        patient = _patient(ref, ours)
        if patient is not None:
            found.add(patient)


# Patient links the R4 CompartmentDefinition leaves out but that plainly name a patient.
EXTRA_PATIENT_LINKS: dict[str, dict[str, Path]] = {
    "Task": {"for": ("for",)},
    "Device": {"patient": ("patient",)},
    "GuidanceResponse": {"subject": ("subject",)},
}


def _compartment_plan(paths: tuple[Path, ...]) -> tuple[tuple[str, ...], tuple[Path, ...]]:
    """Top-level elements (read without a walk when they hold one Reference), then deeper paths."""
    return tuple(p[0] for p in paths if len(p) == 1), tuple(p for p in paths if len(p) > 1)


_COMPARTMENT_PLANS: dict[str, tuple[tuple[str, ...], tuple[Path, ...]]] = {
    rtype: _compartment_plan(tuple(params.values()))
    for rtype, params in {**PATIENT_COMPARTMENT, **EXTRA_PATIENT_LINKS}.items()
}


def is_patient_data(resource_type: str) -> bool:
    """True when resources of this type can belong to a patient compartment."""
    return resource_type in _COMPARTMENT_PLANS


def patients_of(resource: JSON, ours: Bases = NO_BASES) -> frozenset[str]:
    """``Patient/<id>`` references of every patient compartment the resource is in.

    A Patient belongs to itself and to the patients it links to. Contained (``#``) and
    conditional references name no patient, so they add nothing. An absolute reference names
    this server's patient only under one of ``ours`` (``fhir.local_reference``); another
    server's patient is ``UNKNOWN_PATIENT`` (it closes).
    """
    rtype = resource.get("resourceType")
    plan = _COMPARTMENT_PLANS.get(rtype) if isinstance(rtype, str) else None
    if plan is None:
        # A Subscription is its criteria's patients' data (core.subscriptions).
        return subscription_patients(resource) if rtype == "Subscription" else frozenset()
    names, deeper = plan
    found: set[str] = set()
    for name in names:
        child = resource.get(name)
        if child is None:
            continue
        if isinstance(child, dict):
            # The common case (subject, patient): one Reference, no walk needed.
            ref = child.get("reference")
            if isinstance(ref, str) and (ref.startswith("Patient/") or "://" in ref):
                patient = _patient(ref, ours)
                if patient is not None:
                    found.add(patient)
        else:
            _collect_patients(child, (), found, ours)
    for path in deeper:
        child = resource.get(path[0])
        if child is not None:
            _collect_patients(child, path[1:], found, ours)
    if rtype == "Patient":
        rid = resource.get("id")
        if isinstance(rid, str) and rid:
            found.add(f"Patient/{rid}")
    elif rtype == "AuditEvent":
        # The searches it records are its patients' data too (core.subscriptions.audit_searches).
        found |= searches_patients(audit_searches(resource))
    return frozenset(found)


def _date_value(value: Any) -> DateRange | None:
    if isinstance(value, dict):
        return parse_period(value)
    return parse_date_range(value)


def clinical_date(resource: JSON) -> DateRange | None:
    """The clinically relevant date of a resource, or None when it has none we can read."""
    rtype = resource.get("resourceType")
    paths = CLINICAL_DATE.get(rtype) if isinstance(rtype, str) else None
    for path in paths or ():
        values = (resource.get(path[0]),) if len(path) == 1 else iter_path(resource, path)
        for value in values:
            if value is not None:
                found = _date_value(value)
                if found is not None:
                    return found
    return None


def main_codes(resource: JSON) -> frozenset[tuple[str, str]]:
    """(system, code) of every coding of the resource's main code element(s)."""
    rtype = resource.get("resourceType")
    paths = MAIN_CODE.get(rtype, _DEFAULT_CODE) if isinstance(rtype, str) else _DEFAULT_CODE
    codes = set()
    for path in paths:
        for concept in iter_path(resource, path):
            for coding in iter_codings(concept):
                code = coding.get("code")
                if isinstance(code, str):
                    system = coding.get("system")
                    codes.add((system if isinstance(system, str) else "", code))
    return frozenset(codes)


def all_codes(resource: JSON) -> frozenset[tuple[str, str]]:
    """(system, code) of every coding anywhere in the resource, contained resources included.

    R4 ``provision.code``: "if this code is found in an instance, then the rule applies", so
    a reasonCode, a category, a medication or a value counts like the main code. A Coding
    is any object with a string ``code`` (its ``system`` may be absent), in a ``coding`` list
    or not (a ``valueCoding``). A code
    of a known system is also given as the labels read it (``labels.code_spellings``).
    """
    found: set[tuple[str, str]] = set()
    stack: list[Any] = [resource]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            codings = node.get("coding")
            if isinstance(codings, list):
                for coding in codings:
                    if isinstance(coding, dict) and isinstance(coding.get("code"), str):
                        system = coding.get("system")
                        found.add((system if isinstance(system, str) else "", coding["code"]))
            code = node.get("code")
            if isinstance(code, str):
                # SECURITY: a Coding's system is optional (R4 0..1): one written without it
                # (a valueCoding) may be the code a deny names, as in a ``coding`` list.
                system = node.get("system")
                if isinstance(system, str) or system is None:
                    found.add((system or "", code))
            value_code = node.get("valueCode")
            if isinstance(value_code, str):
                # an extension's code, without a system as a Coding may be (labels read it so)
                found.add(("", value_code))
            stack.extend(v for v in node.values() if isinstance(v, (dict, list)))
        elif isinstance(node, list):
            stack.extend(v for v in node if isinstance(v, (dict, list)))
    return code_spellings(frozenset(found))


# What ``references_of`` (given bases) writes before the ``Type/id`` of another server's record:
# none of this server's, but one a deny may take for this server's of that ``Type/id`` (this
# server under a name not configured). No reference is spelled this way.
FOREIGN_MARK = "\0"


def references_of(resource: JSON, ours: Bases | None = None) -> frozenset[str]:
    """Every ``Reference.reference`` anywhere in the resource, in relative ``Type/id`` form.

    With ``ours``, a reference under a base not among them is another server's record:
    ``FOREIGN_MARK`` + its ``Type/id`` (None: every base read as this server's)."""
    found: set[str] = set()
    stack: list[Any] = [resource]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            ref = node.get("reference")
            if isinstance(ref, str) and not ref.startswith("#"):
                if ours is not None and "://" in ref and reference_base(ref) not in ours:
                    found.add(FOREIGN_MARK + relative_reference(ref))
                else:
                    found.add(relative_reference(ref))
            stack.extend(v for v in node.values() if isinstance(v, (dict, list)))
        elif isinstance(node, list):
            stack.extend(v for v in node if isinstance(v, (dict, list)))
    return frozenset(found)


# An author that stands for someone the gateway could not learn (a PractitionerRole that could not
# be read): an authors condition is unknown for the resource (CONTRACT §5: it matches a deny
# provision, never a permit one). No reference is spelled this way.
UNKNOWN_AUTHOR = "\0unknown-author"
ROLE = "PractitionerRole"
_ROLES = frozenset({ROLE})
# A PractitionerRole's members who act through it: an authors condition naming either sees it.
ROLE_MEMBERS = ("practitioner", "organization")
_ROLE_ID = re.compile(r"PractitionerRole/[A-Za-z0-9\-.]{1,64}")
NO_ROLES: dict[str, JSON | None] = {}


def author_references(resource: JSON) -> list[str]:
    """Every reference in the author elements as written (``#id`` for a contained author)."""
    found: list[str] = []
    for key in AUTHOR_ELEMENTS:
        if key not in resource:
            continue
        for value in iter_path(resource, (key,)):
            if not isinstance(value, dict):
                continue
            targets = [value, *(value.get(k) for k in _WRAPPED_REFERENCE)]
            for target in targets:
                if isinstance(target, dict):
                    ref = target.get("reference")
                    if isinstance(ref, str):
                        found.append(ref)
    return found


def role_reference(ref: str, ours: Bases = NO_BASES) -> str | None:
    """``PractitionerRole/id`` when an author reference (as written) names a PractitionerRole on
    the server, ``UNKNOWN_AUTHOR`` when it names one in a form that cannot be read (a conditional
    or malformed reference, or another server's role: ``fhir.local_reference``), None when it
    names no PractitionerRole."""
    if ROLE not in ref or ref.startswith("#"):
        return None
    head, conditional, _ = ref.partition("?")
    if conditional:
        return UNKNOWN_AUTHOR if head.rstrip("/").rpartition("/")[2] == ROLE else None
    target = relative_reference(ref)
    if target.partition("/")[0] != ROLE:
        return None
    # SECURITY: another server's PractitionerRole/r1 is not this server's: never read as it.
    if local_reference(ref, ours) is None:
        return UNKNOWN_AUTHOR
    return target if _ROLE_ID.fullmatch(target) else UNKNOWN_AUTHOR


def role_members(role: JSON, ours: Bases = NO_BASES) -> set[str]:
    """The practitioner and organization of a PractitionerRole (``Type/id``); ``UNKNOWN_AUTHOR``
    for one it names in a form that cannot be followed (an identifier alone, a conditional
    reference, another server's: it may be anyone). One contained in the role's container
    (``#id``) is no one a consent can name."""
    found: set[str] = set()
    for key in ROLE_MEMBERS:
        value = role.get(key)
        if value is None:
            continue
        ref = value.get("reference") if isinstance(value, dict) else None
        if not isinstance(ref, str) or "?" in ref:
            found.add(UNKNOWN_AUTHOR)
        elif not ref.startswith("#"):
            found.add(local_reference(ref, ours) or UNKNOWN_AUTHOR)
    return found


def authors_of(resource: JSON, roles: Mapping[str, JSON | None] = NO_ROLES, ours: Bases = NO_BASES) -> frozenset[str]:
    """References of whoever authored, recorded, performed, asserted or requested it.

    An author given as a PractitionerRole (contained, or ``PractitionerRole/id`` looked up in
    ``roles``) also counts its practitioner and organization: a consent naming the doctor sees
    the records the doctor wrote in any role. A role ``roles`` does not hold (it was not read,
    or could not be) adds ``UNKNOWN_AUTHOR``, and so does one mapped to None (missing on the
    server: a role deleted when its doctor left still stands for whoever wrote through it, so
    who that was is unknown, CONTRACT §5). An author named by an absolute reference to another
    server (a base not among ``ours``) is unknown too: that server's ``Practitioner/f204`` is
    not this one's.
    """
    found: set[str] = set()
    for ref in author_references(resource):
        if ref.startswith("#"):
            role = contained_resource(resource, ref, _ROLES)
            if role is not None:
                found |= role_members(role, ours)
            continue
        local = local_reference(ref, ours)
        if local is None:
            found.add(UNKNOWN_AUTHOR)
            continue
        found.add(local)
        key = role_reference(ref, ours)
        if key is None:
            continue
        if key == UNKNOWN_AUTHOR or key not in roles:
            found.add(UNKNOWN_AUTHOR)
            continue
        target = roles[key]
        # SECURITY: a missing role is an unknown author, never no one (it matches a deny).
        found |= role_members(target, ours) if target is not None else {UNKNOWN_AUTHOR}
    return frozenset(found)


def profiles_of(resource: JSON) -> frozenset[str]:
    """The canonical URLs in ``meta.profile`` (version suffixes kept as given)."""
    meta = resource.get("meta")
    profiles = meta.get("profile") if isinstance(meta, dict) else None
    if not isinstance(profiles, list):
        return frozenset()
    return frozenset(p for p in profiles if isinstance(p, str))


def deciding_elements(rtype: str) -> frozenset[str]:
    """The top-level elements the consent engine reads of a resource of this type beyond its
    labels: its patients, clinical date, main code, authors and profiles (``meta``). Codes
    anywhere and references anywhere (``provision.code``, ``provision.data``) are not here:
    consents that read those decide on the whole resource."""
    found = {"resourceType", "id", "meta"}
    names, deeper = _COMPARTMENT_PLANS.get(rtype, ((), ()))
    found.update(names)
    found.update(path[0] for path in deeper)
    found.update(path[0] for path in CLINICAL_DATE.get(rtype, ()))
    found.update(path[0] for path in MAIN_CODE.get(rtype, _DEFAULT_CODE))
    found.update(AUTHOR_ELEMENTS)
    if rtype == "Subscription":
        found.update(CRITERIA_ELEMENTS)
    return frozenset(found)
