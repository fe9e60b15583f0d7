"""FHIR JSON helpers: OperationOutcomes, codings, references, Bundle walking."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

# A resource type name as FHIR writes it (``Observation``): the one pattern every reading of a
# type in a path, a reference or a search uses (``match`` or ``fullmatch``).
TYPE_NAME = re.compile(r"^[A-Z][A-Za-z]{1,63}$")

JSON = dict[str, Any]

OUTCOME_DETAIL_SYSTEM = "urn:consent-gateway:issue"

# Every resource type of FHIR R4 (4.0.1, hl7.org/fhir/R4/resourcelist.html): an answer's
# resource of any other type, or of none, is not decided as anything (it closes).
R4_RESOURCE_TYPES = frozenset({
    "Account", "ActivityDefinition", "AdverseEvent", "AllergyIntolerance", "Appointment",
    "AppointmentResponse", "AuditEvent", "Basic", "Binary", "BiologicallyDerivedProduct",
    "BodyStructure", "Bundle", "CapabilityStatement", "CarePlan", "CareTeam", "CatalogEntry",
    "ChargeItem", "ChargeItemDefinition", "Claim", "ClaimResponse", "ClinicalImpression",
    "CodeSystem", "Communication", "CommunicationRequest", "CompartmentDefinition", "Composition",
    "ConceptMap", "Condition", "Consent", "Contract", "Coverage", "CoverageEligibilityRequest",
    "CoverageEligibilityResponse", "DetectedIssue", "Device", "DeviceDefinition", "DeviceMetric",
    "DeviceRequest", "DeviceUseStatement", "DiagnosticReport", "DocumentManifest",
    "DocumentReference", "EffectEvidenceSynthesis", "Encounter", "Endpoint", "EnrollmentRequest",
    "EnrollmentResponse", "EpisodeOfCare", "EventDefinition", "Evidence", "EvidenceVariable",
    "ExampleScenario", "ExplanationOfBenefit", "FamilyMemberHistory", "Flag", "Goal",
    "GraphDefinition", "Group", "GuidanceResponse", "HealthcareService", "ImagingStudy",
    "Immunization", "ImmunizationEvaluation", "ImmunizationRecommendation", "ImplementationGuide",
    "InsurancePlan", "Invoice", "Library", "Linkage", "List", "Location", "Measure",
    "MeasureReport", "Media", "Medication", "MedicationAdministration", "MedicationDispense",
    "MedicationKnowledge", "MedicationRequest", "MedicationStatement", "MedicinalProduct",
    "MedicinalProductAuthorization", "MedicinalProductContraindication",
    "MedicinalProductIndication", "MedicinalProductIngredient", "MedicinalProductInteraction",
    "MedicinalProductManufactured", "MedicinalProductPackaged", "MedicinalProductPharmaceutical",
    "MedicinalProductUndesirableEffect", "MessageDefinition", "MessageHeader", "MolecularSequence",
    "NamingSystem", "NutritionOrder", "Observation", "ObservationDefinition", "OperationDefinition",
    "OperationOutcome", "Organization", "OrganizationAffiliation", "Parameters", "Patient",
    "PaymentNotice", "PaymentReconciliation", "Person", "PlanDefinition", "Practitioner",
    "PractitionerRole", "Procedure", "Provenance", "Questionnaire", "QuestionnaireResponse",
    "RelatedPerson", "RequestGroup", "ResearchDefinition", "ResearchElementDefinition",
    "ResearchStudy", "ResearchSubject", "RiskAssessment", "RiskEvidenceSynthesis", "Schedule",
    "SearchParameter", "ServiceRequest", "Slot", "Specimen", "SpecimenDefinition",
    "StructureDefinition", "StructureMap", "Subscription", "Substance", "SubstanceNucleicAcid",
    "SubstancePolymer", "SubstanceProtein", "SubstanceReferenceInformation",
    "SubstanceSourceMaterial", "SubstanceSpecification", "SupplyDelivery", "SupplyRequest", "Task",
    "TerminologyCapabilities", "TestReport", "TestScript", "ValueSet", "VerificationResult",
    "VisionPrescription",
})


def operation_outcome(
    severity: str, issue_code: str, message: str, detail_code: str | None = None
) -> JSON:
    """An OperationOutcome with one issue; ``detail_code`` is a stable searchable code."""
    issue: JSON = {"severity": severity, "code": issue_code, "diagnostics": message}
    if detail_code:
        issue["details"] = {
            "coding": [{"system": OUTCOME_DETAIL_SYSTEM, "code": detail_code}],
            "text": message,
        }
    return {"resourceType": "OperationOutcome", "issue": [issue]}


def provisions(consent: JSON) -> Iterator[JSON]:
    """Every provision of a Consent, the root's and the nested ones at any depth (a list or an
    object where either stands, as written)."""
    stack: list[Any] = [consent.get("provision")]
    while stack:
        node = stack.pop()
        if type(node) is list:
            stack.extend(node)
        elif type(node) is dict:
            yield node
            stack.append(node.get("provision"))


def iter_codings(value: Any) -> Iterator[JSON]:
    """Codings of a CodeableConcept, a list of them, or a bare Coding."""
    if isinstance(value, list):
        for item in value:
            yield from iter_codings(item)
    elif isinstance(value, dict):
        codings = value.get("coding")
        if isinstance(codings, list):
            for coding in codings:
                if isinstance(coding, dict):
                    yield coding
        elif "code" in value and "system" in value:
            yield value


def reference_of(value: Any) -> str | None:
    """The ``reference`` string of a Reference, or None."""
    if isinstance(value, dict):
        ref = value.get("reference")
        if isinstance(ref, str):
            return ref
    return None


def _reference_parts(ref: str) -> tuple[list[str], str | None]:
    """A reference's path segments before ``_history``, and the version after it (or None)."""
    parts = [p for p in ref.split("#", 1)[0].split("/") if p]
    if "_history" not in parts:
        return parts, None
    at = parts.index("_history")
    return parts[:at], parts[at + 1] if at + 1 < len(parts) else None


def relative_reference(ref: str) -> str:
    """``http://h/fhir/Patient/1/_history/2`` -> ``Patient/1``; ``Patient/1`` unchanged."""
    parts, _ = _reference_parts(ref)
    if len(parts) >= 2:
        return f"{parts[-2]}/{parts[-1]}"
    return ref.split("#", 1)[0]


# Bases under which a reference names this FHIR server's resources (normalized, ``normal_base``):
# the configured upstream base and the gateway's configured public base. A relative reference
# is always this server's.
Bases = frozenset[str]
NO_BASES: Bases = frozenset()
_DEFAULT_PORTS = {"http": ":80", "https": ":443"}


def normal_base(url: str) -> str:
    """A FHIR base URL as bases are compared: scheme and host in lower case, no default port,
    no trailing slash, no query or fragment."""
    head = url.split("#", 1)[0].split("?", 1)[0]
    scheme, sep, rest = head.partition("://")
    if not sep:
        return head.rstrip("/")
    scheme = scheme.lower()
    host, slash, path = rest.partition("/")
    host = host.lower()
    default = _DEFAULT_PORTS.get(scheme)
    if default is not None and host.endswith(default):
        host = host[: -len(default)]
    return f"{scheme}://{host}{slash}{path}".rstrip("/")


def reference_base(ref: str) -> str | None:
    """The base (``normal_base``) of an absolute reference (``http://h/fhir/Patient/1`` ->
    ``http://h/fhir``); None for a relative, local (``#``) or URN reference."""
    if "://" not in ref:
        return None
    head = ref.split("#", 1)[0].split("?", 1)[0]
    scheme, _, rest = head.partition("://")
    segments = rest.split("/")
    if "_history" in segments[1:]:
        segments = segments[: segments.index("_history", 1)]
    while len(segments) > 1 and not segments[-1]:
        segments.pop()
    return normal_base(f"{scheme}://{'/'.join(segments[:-2] if len(segments) > 2 else segments[:1])}")


def local_reference(ref: str, ours: Bases) -> str | None:
    """``relative_reference`` of a reference to this FHIR server's resources; None for an
    absolute one whose base is not among ``ours``.

    SECURITY: another server's ``Medication/m1`` or ``Patient/p1`` is not this server's
    resource of the same ``Type/id``: what it is, is unknown to the gateway."""
    if "://" in ref and reference_base(ref) not in ours:
        return None
    return relative_reference(ref)


def reference_version(ref: str) -> str | None:
    """The version a reference names (``Patient/1/_history/2`` -> ``2``), or None."""
    return _reference_parts(ref)[1]


def resource_reference(resource: JSON) -> str | None:
    """``Type/id`` of a resource, or None when it has no id."""
    rtype, rid = resource.get("resourceType"), resource.get("id")
    if isinstance(rtype, str) and isinstance(rid, str):
        return f"{rtype}/{rid}"
    return None


def contained_resource(resource: JSON, ref: str, types: frozenset[str] | None = None) -> JSON | None:
    """The resource ``resource`` contains under the local reference ``ref`` (``#id``), when it is
    of one of ``types`` (any type when None); None otherwise."""
    contained = resource.get("contained")
    for inner in contained if isinstance(contained, list) else ():
        if isinstance(inner, dict) and inner.get("id") == ref[1:] and (types is None or inner.get("resourceType") in types):
            return inner
    return None


def iter_bundle_resources(bundle: JSON) -> Iterator[JSON]:
    """Each ``entry.resource`` of a Bundle (not recursing)."""
    entries = bundle.get("entry")
    if isinstance(entries, list):
        for entry in entries:
            if isinstance(entry, dict):
                res = entry.get("resource")
                if isinstance(res, dict):
                    yield res
