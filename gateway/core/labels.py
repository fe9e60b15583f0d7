"""Sensitivity labels computed from the clinical codes in a resource (a security labeling service).

``LabelIndex.from_documents`` compiles the parsed ``rules/`` files (plain dicts, one per file)
into lookup tables once; ``labels_for`` then costs a few dict look-ups per coding.

Semantics:
- A resource's labels are the UNION of the labels its codes earn, the labels of every
  ``contained`` resource (so a contained Medication named by ``medicationReference`` counts),
  its own ``meta.security``, a DocumentReference's ``securityLabel``, an AuditEvent's
  ``entity.securityLabel`` and a Composition's ``confidentiality``. Nothing is ever subtracted, so conflicting rules cannot hide a label.
- Its codes are those at its type's code paths, and the valueCodeableConcept / valueCoding /
  valueCode (read as a coding without a system) of every extension (``extension`` and
  ``modifierExtension``, nested to any depth) of the
  resource, of the backbone elements on those paths and of the code elements and codings
  themselves (``condition-dueTo`` carrying B20 labels as ``code`` would).
- SNOMED CT, LOINC, RxNorm, CPT and HCPCS codes match exactly (no hierarchy: there is no
  terminology server on the request path); RxNorm sets list ingredients together with the drugs
  (SCD, SBD, packs) their sources name that contain them; CPT and HCPCS sets may give a numeric
  range (``90785-90899``). An NDC matches by product (labeler and product code), however
  the package or product is written (``ndc_products``).
  ICD-10-CM (and WHO ICD-10) codes match on code structure: a rule code covers itself and every
  code below it (``F11`` covers ``F11.20`` and ``F1120``, never ``F1`` or ``F12``). A set's
  ``sixth_character`` keeps only the codes below it whose 6th character is one of those given
  (``T36-T50`` with ``2``: intentional self-harm). An ``exclude`` entry cancels the matches of
  its own set's category for the codes below it (``F17`` under ``F12-F19``) and nothing else.
- A known system is recognised however its URI is spelled (``canonical_system``). A coding
  without a system earns labels only when its code is dotted like ICD-10-CM (``F11.20``) or
  hyphenated like an NDC package; other codings without a system, or with a system the rules
  do not know, earn nothing. A reference to a resource that is not contained cannot be
  followed here (no I/O) and earns nothing.
- Invalid rule data raises ``RuleDataError`` naming the file, the entry and the problem.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import orjson

from gateway.core.fhir import JSON, provisions
from gateway.core.memo import TextMemo
from gateway.core.model import V3_ACT_CODE, V3_CONFIDENTIALITY, Label
from gateway.core.sensitivity_codes import CODES
from gateway.core.subscriptions import CRITERIA_ELEMENTS, audit_searches, criteria_codes, searches_codes
from gateway.core.terms import TermMatcher, words

ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
ICD10 = "http://hl7.org/fhir/sid/icd-10"
SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
CPT = "http://www.ama-assn.org/go/cpt"
HCPCS = "http://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets"
NDC = "http://hl7.org/fhir/sid/ndc"

# Rule files name code systems by these short names; each has the display used in explanations
# and the other URIs a sender may put in Coding.system for the same system.
CODE_SYSTEMS: Mapping[str, tuple[str, str, tuple[str, ...]]] = {
    "icd-10-cm": (ICD10CM, "ICD-10-CM", ("urn:oid:2.16.840.1.113883.6.90", ICD10, "urn:oid:2.16.840.1.113883.6.3")),
    "snomed": (SNOMED, "SNOMED CT", ("urn:oid:2.16.840.1.113883.6.96",)),
    "loinc": (LOINC, "LOINC", ("urn:oid:2.16.840.1.113883.6.1",)),
    "rxnorm": (RXNORM, "RxNorm", ("urn:oid:2.16.840.1.113883.6.88",)),
    "cpt": (CPT, "CPT", ("urn:oid:2.16.840.1.113883.6.12",)),
    "hcpcs": (HCPCS, "HCPCS", ("urn:oid:2.16.840.1.113883.6.285", "https://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets")),
    "ndc": (NDC, "NDC", ("urn:oid:2.16.840.1.113883.6.69",)),
}

# v3-ActCode codes a rule may yield: the information sensitivity policies and the privacy laws
# that ride with them, as the published code system lists them (http://terminology.hl7.org/CodeSystem/v3-ActCode).
ACT_CODE_LABELS = CODES
CONFIDENTIALITY_CODES = frozenset({"U", "L", "M", "N", "R", "V"})

_ICD_CODE = re.compile(r"^[A-Z][0-9][0-9A-Z](\.[0-9A-Z]{1,4})?$")
_ICD_RANGE = re.compile(r"^([A-Z])([0-9]{2})-([A-Z])([0-9]{2})$")
_CODE_PATTERNS: Mapping[str, re.Pattern[str]] = {
    "snomed": re.compile(r"^[1-9][0-9]{5,17}$"),
    "loinc": re.compile(r"^(LP|LA)?[0-9]{1,6}-[0-9]$"),
    "rxnorm": re.compile(r"^[1-9][0-9]{0,8}$"),
    "cpt": re.compile(r"^[0-9]{4}[0-9FTU]$"),
    "hcpcs": re.compile(r"^[A-V][0-9]{4}$"),
}
# A CPT or HCPCS range: one optional letter, then numbers of equal length (S2260-S2267).
_NUMERIC_RANGE = re.compile(r"^([A-Z]?)([0-9]{4,5})-([A-Z]?)([0-9]{4,5})$")


class RuleDataError(ValueError):
    """Invalid rule data: ``file``, ``entry`` and ``problem`` say where and what."""

    def __init__(self, file: str, entry: str, problem: str) -> None:
        super().__init__(f"{file}: {entry}: {problem}")
        self.file = file
        self.entry = entry
        self.problem = problem


@dataclass(frozen=True, slots=True)
class _Hit:
    """What one rule code gives: its labels, and each label with the rule that yields it.

    ``sixth``: for ICD-10-CM, the 6th characters a code below the rule code must have (None: any).
    """

    category: str
    labels: frozenset[Label]
    reasons: tuple[tuple[Label, str], ...]
    sixth: frozenset[str] | None = None


@dataclass(frozen=True, slots=True)
class CoverageEntry:
    """One rule set as loaded, for the coverage report: where its codes come from."""

    file: str
    category: str
    name: str
    system: str
    labels: tuple[str, ...]
    entries: int  # codes, categories and ranges as the rule file lists them
    codes: int  # after expanding ranges (ICD-10-CM categories also cover their descendants)
    source: str


_Sink = list[Any]
_Getter = Callable[[JSON, _Sink], None]


def _path(names: tuple[str, ...]) -> _Getter:
    head, rest = names[0], names[1:]

    def get(resource: JSON, out: _Sink) -> None:
        nodes = resource.get(head)
        if nodes is None:
            return
        level = nodes if isinstance(nodes, list) else [nodes]
        for name in rest:
            nxt: list[Any] = []
            for node in level:
                if isinstance(node, dict):
                    if "extension" in node or "modifierExtension" in node:
                        # a backbone element on the way (Observation.component) may carry
                        # the code in an extension as surely as in its code element
                        out.extend(_element_extension_codes(node))
                    value = node.get(name)
                    if isinstance(value, list):
                        nxt.extend(value)
                    elif value is not None:
                        nxt.append(value)
            level = nxt
        out.extend(level)

    return get


def _sections(resource: JSON, out: _Sink) -> None:
    """Composition sections nest to any depth; each may carry a code."""
    stack = list(resource.get("section") or ())
    while stack:
        section = stack.pop()
        if isinstance(section, dict):
            code = section.get("code")
            if code is not None:
                out.append(code)
            stack.extend(section.get("section") or ())


def _answers(resource: JSON, out: _Sink) -> None:
    """QuestionnaireResponse answers (valueCoding) at any depth of nested items."""
    stack = list(resource.get("item") or ())
    while stack:
        item = stack.pop()
        if not isinstance(item, dict):
            continue
        stack.extend(item.get("item") or ())
        for answer in item.get("answer") or ():
            if isinstance(answer, dict):
                coding = answer.get("valueCoding")
                if coding is not None:
                    out.append(coding)
                stack.extend(answer.get("item") or ())


_MEDICATION = ("medicationCodeableConcept", "reasonCode")
_BILLING = (
    "diagnosis.diagnosisCodeableConcept",
    "procedure.procedureCodeableConcept",
    "item.productOrService",
    "item.detail.productOrService",
    "item.detail.subDetail.productOrService",
    "addItem.productOrService",
)

# Where each resource type keeps the codes that reveal what the record is about.
_CODE_PATHS: Mapping[str, tuple[str, ...]] = {
    "Condition": ("code", "evidence.code", "stage.summary"),
    "Observation": ("code", "category", "valueCodeableConcept", "component.code", "component.valueCodeableConcept"),
    "MedicationRequest": _MEDICATION,
    "MedicationStatement": _MEDICATION,
    "MedicationAdministration": _MEDICATION,
    "MedicationDispense": ("medicationCodeableConcept",),
    "Medication": ("code", "ingredient.itemCodeableConcept"),
    "Procedure": ("code", "reasonCode", "complication"),
    "DiagnosticReport": ("code", "conclusionCode"),
    "DocumentReference": ("type", "category", "context.event"),
    "Composition": ("type", "category"),
    "Encounter": ("type", "reasonCode", "serviceType", "diagnosis.use"),
    "EpisodeOfCare": ("type",),
    "Appointment": ("serviceType", "appointmentType", "reasonCode"),
    "AllergyIntolerance": ("code", "reaction.substance"),
    "ServiceRequest": ("code", "reasonCode", "orderDetail"),
    "DeviceRequest": ("codeCodeableConcept", "reasonCode"),
    "CarePlan": (
        "category",
        "activity.detail.code",
        "activity.detail.reasonCode",
        "activity.detail.productCodeableConcept",
    ),
    "CareTeam": ("category", "reasonCode"),
    "Goal": ("category", "description"),
    "Immunization": ("vaccineCode", "reasonCode"),
    "FamilyMemberHistory": ("condition.code", "reasonCode"),
    "ClinicalImpression": ("code", "finding.itemCodeableConcept", "investigation.code"),
    "RiskAssessment": ("code", "prediction.outcome", "reasonCode"),
    "Claim": _BILLING,
    "ExplanationOfBenefit": _BILLING,
    "ImagingStudy": ("procedureCode", "reasonCode"),
    "Media": ("type", "modality", "reasonCode"),
    "Communication": ("category", "topic", "reasonCode"),
    "CommunicationRequest": ("category", "reasonCode"),
    "Flag": ("code",),
    "DetectedIssue": ("code",),
    "AdverseEvent": ("event",),
    "List": ("code",),
    "Task": ("code", "reasonCode"),
    "Basic": ("code",),
    "ChargeItem": ("code",),
    "QuestionnaireResponse": (),
    "Patient": (),
    "Practitioner": (),
    "PractitionerRole": (),
    "Organization": (),
    "Location": (),
    "RelatedPerson": (),
    "Coverage": (),
    "Consent": (),
}
# A type not listed above is read at the places most resources keep their codes.
_DEFAULT_PATHS = ("code", "category", "type", "reasonCode")
_SPECIAL: Mapping[str, tuple[tuple[str, _Getter], ...]] = {
    "Composition": (("section", _sections),),
    "QuestionnaireResponse": (("item", _answers),),
}


# Top-level elements read directly, then getters for nested paths and special shapes, each
# with the top-level element it starts from (most resources lack it, so no call is made).
_Extractors = tuple[tuple[str, ...], tuple[tuple[str, _Getter], ...]]


def _extractors(rtype: str) -> _Extractors:
    paths = _CODE_PATHS.get(rtype, _DEFAULT_PATHS)
    fields = tuple(p for p in paths if "." not in p)
    nested = tuple((p.split(".")[0], _path(tuple(p.split(".")))) for p in paths if "." in p)
    return fields, nested + _SPECIAL.get(rtype, ())


_EXTRACTORS: dict[str, _Extractors] = {t: _extractors(t) for t in _CODE_PATHS}
_DEFAULT_EXTRACTORS = _extractors("")
_NO_EXTRACTORS: _Extractors = ((), ())
# Types with label-bearing elements beyond their codes and meta.security.
_OWN_ELEMENT_TYPES = frozenset({
    "DocumentReference", "Composition", "Consent", "Bundle", "AuditEvent", "Subscription",
    "DetectedIssue", "ClinicalImpression",
})
_NO_PLAN: frozenset[str] = frozenset()


@lru_cache(maxsize=512)
def label_elements(rtype: str) -> frozenset[str]:
    """The top-level elements ``labels_for`` reads of a resource of this type (its field plan)."""
    fields, getters = _EXTRACTORS.get(rtype, _DEFAULT_EXTRACTORS)
    found = {*fields, *(head for head, _ in getters), "extension", "modifierExtension", "meta", "contained"}
    found.update(_OWN_ELEMENTS.get(rtype, ()))
    return frozenset(found)


@lru_cache(maxsize=512)
def _label_names(rtype: str) -> tuple[str, ...]:
    """The elements the labels of a resource without meta.security or contained depend on."""
    return tuple(sorted(label_elements(rtype) - {"meta", "contained"}))


# Free-text elements (strings) that state a finding, scanned for terms whatever their codes.
# Annotation notes, narratives and valueString are not: see README "Labels from text".
_FINDING_TEXTS: Mapping[str, tuple[str, ...]] = {
    "DetectedIssue": ("detail",),
    "ClinicalImpression": ("description", "summary"),
}

# The label-bearing elements of _OWN_ELEMENT_TYPES, as _collect_own_elements reads them.
_OWN_ELEMENTS: Mapping[str, tuple[str, ...]] = {
    "DocumentReference": ("securityLabel",),
    "Composition": ("confidentiality",),
    "Consent": ("provision",),
    "Bundle": ("entry",),
    "AuditEvent": ("entity",),
    "Subscription": CRITERIA_ELEMENTS,
    # Free text that states what the record found, read against the term lists (rules/terms-*):
    # a DetectedIssue's detail and a ClinicalImpression's summary are the finding itself.
    "DetectedIssue": _FINDING_TEXTS["DetectedIssue"],
    "ClinicalImpression": _FINDING_TEXTS["ClinicalImpression"],
}


def plain_code(code: str) -> str:
    """``code`` without surrounding blanks, in ASCII where its compatibility form is
    (full-width digits, letters and stops, as East Asian input methods type them: NFKC)."""
    text = code.strip()
    return text if text.isascii() else unicodedata.normalize("NFKC", text).strip()


def normalize_icd(code: str) -> str:
    """``f11.20`` / ``F1120`` / ``Ｆ１１.２０`` -> ``F1120``: upper case, the dot after the category
    dropped."""
    code = plain_code(code).upper()
    if len(code) > 3 and code[3] == ".":
        code = code[:3] + code[4:]
    return code


# ICD-10-CM as written without a system: the dot after the category makes the shape its own.
_ICD_DOTTED = re.compile(r"^[A-Z][0-9][0-9A-Z]\.[0-9A-Z]{1,4}$")
# NDC layouts (FDA): labeler-product-package as 4-4-2, 5-3-2 or 5-4-1 (the 10-digit code),
# the HIPAA 11-digit 5-4-2; and the product code alone (labeler-product: 4-4, 5-3, 5-4).
_NDC_PACKAGE_LAYOUTS = frozenset({(4, 4, 2), (5, 3, 2), (5, 4, 1), (5, 4, 2)})
_NDC_PRODUCT_LAYOUTS = frozenset({(4, 4), (5, 3), (5, 4)})
_NDC_HYPHENATED_PACKAGE = re.compile(r"^[0-9]{4,5}-[0-9]{3,4}-[0-9]{1,2}$")
# Between NDC segments: a hyphen or dash with blanks around it, or blanks alone.
_NDC_SEPARATOR = re.compile(r"\s*[-\u2010-\u2015\u2212]\s*|\s+")


def _ndc_text(code: str) -> str:
    """An NDC as written, in the digits and hyphens ``ndc_products`` reads: full-width forms in
    ASCII, blanks or dashes between segments as one hyphen, and the FDA Directory's asterisk,
    which stands for the digit a 5-3-2 or 5-4-1 code lacks (``50383-*924-93``), as that zero."""
    return _NDC_SEPARATOR.sub("-", plain_code(code)).replace("*", "0")


def ndc_products(code: str) -> tuple[str, ...]:
    """The products an NDC as written may name, each as 9 digits (labeler 5, product 4).

    A product code (labeler and product) names one drug in one strength, dose form and
    formulation; its packages differ only in size, so rules and look-ups meet on the product.
    Hyphenated codes name one product, zero-padded to 5-4: ``0054-0176-13`` (4-4-2),
    ``50383-924-93`` (5-3-2), ``12496-1208-3`` (5-4-1), ``12496-1208-03`` (5-4-2) and the
    product code ``12496-1208``. Digits alone: 11 (HIPAA 5-4-2) or 9 (a 5-4 product) name one;
    10 digits may be any 10-digit layout and 8 either 8-digit product layout, so each reading is
    given (a label fails closed). Each is read as ``_ndc_text`` writes it (``12496-1208-*3``,
    ``12496 1208 03``, full-width digits). Anything else names none."""
    text = _ndc_text(code)
    if "-" in text:
        parts = text.split("-")
        if not all(part.isascii() and part.isdigit() for part in parts):
            return ()
        shape = tuple(len(part) for part in parts)
        if shape in _NDC_PACKAGE_LAYOUTS or shape in _NDC_PRODUCT_LAYOUTS:
            return (parts[0].zfill(5) + parts[1].zfill(4),)
        return ()
    if not (text.isascii() and text.isdigit()):
        return ()
    if len(text) == 11:
        return (text[:9],)
    if len(text) == 9:
        return (text,)
    if len(text) == 10:
        return tuple(dict.fromkeys(("0" + text[:8], text[:5] + "0" + text[5:8], text[:9])))
    if len(text) == 8:
        return ("0" + text, text[:5] + "0" + text[5:])
    return ()


def ndc_package(code: str) -> str | None:
    """The HIPAA 11-digit (5-4-2) form of a package NDC written in a layout that settles it
    (hyphenated, or 11 digits); None for a product code or an ambiguous 10-digit one."""
    text = _ndc_text(code)
    if "-" in text:
        parts = text.split("-")
        if len(parts) == 3 and tuple(len(p) for p in parts) in _NDC_PACKAGE_LAYOUTS and ndc_products(text):
            return parts[0].zfill(5) + parts[1].zfill(4) + parts[2].zfill(2)
        return None
    return text if len(text) == 11 and text.isascii() and text.isdigit() else None


# Every URI a sender may put in Coding.system for a known code system -> its canonical URI.
_CANONICAL_SYSTEMS: Mapping[str, str] = {
    alias: uri for uri, _, others in CODE_SYSTEMS.values() for alias in (uri, *others)
}


# An OID written without its ``urn:oid:`` prefix (as CDA-derived data carries them).
_BARE_OID = re.compile(r"[0-2](\.[0-9]+)+")


def _system_key(uri: str) -> str:
    """A system URI with what senders vary and no registry tells apart left out: case, the
    scheme (http or https), ``www.``, a trailing slash, a ``|version`` after it (a canonical's
    spelling), the ``urn:oid:`` of an OID written bare."""
    key = uri.strip().lower().partition("|")[0].strip()
    if _BARE_OID.fullmatch(key):
        key = "urn:oid:" + key
    for scheme in ("https://", "http://"):
        if key.startswith(scheme):
            key = key[len(scheme):]
            break
    if key.startswith("www."):
        key = key[4:]
    return key.rstrip("/")


_SYSTEM_KEYS: Mapping[str, str] = {_system_key(alias): uri for alias, uri in _CANONICAL_SYSTEMS.items()}


@lru_cache(maxsize=4096)
def canonical_system(system: str) -> str | None:
    """The canonical URI of the known code system ``system`` names, however it is spelled:
    an alias (its OID, with or without ``urn:oid:``), another case, https for http, a trailing
    slash, ``www.``, a ``|version`` after it, or a SNOMED CT
    edition URI (``http://snomed.info/sct/731000124108``); None for any other system."""
    found = _CANONICAL_SYSTEMS.get(system)
    if found is not None:
        return found
    key = _system_key(system)
    found = _SYSTEM_KEYS.get(key)
    if found is None and key.startswith("snomed.info/sct/") and key[16:].isdigit():
        found = SNOMED
    return found


# Standard clinical code systems beyond the rules' own (CODE_SYSTEMS), each by its FHIR URI and
# OIDs (FHIR R4 terminology pages; HL7 OID registry). A concept carrying a code of one of these,
# or of the rules' systems, states a known fact: the rules judge it by its code, and its text
# is not read for terms (a standard code not in a sensitive set is a known non-sensitive fact).
_OTHER_STANDARD_SYSTEMS = (
    "http://hl7.org/fhir/sid/icd-9-cm", "urn:oid:2.16.840.1.113883.6.103", "urn:oid:2.16.840.1.113883.6.104",
    "urn:oid:2.16.840.1.113883.6.2",  # ICD-9-CM (diagnoses, procedures)
    "http://www.cms.gov/Medicare/Coding/ICD10", "urn:oid:2.16.840.1.113883.6.4",  # ICD-10-PCS
    "http://id.who.int/icd/release/11/mms",  # ICD-11 MMS
    "http://hl7.org/fhir/sid/cvx", "urn:oid:2.16.840.1.113883.12.292",  # CVX
    "http://fdasis.nlm.nih.gov", "urn:oid:2.16.840.1.113883.4.9",  # UNII
    "http://www.whocc.no/atc", "urn:oid:2.16.840.1.113883.6.73",  # WHO ATC
    "http://unitsofmeasure.org", "urn:oid:2.16.840.1.113883.6.8",  # UCUM
)
_STANDARD_KEYS = frozenset(_system_key(uri) for uri in _OTHER_STANDARD_SYSTEMS)
# HL7's own code systems (observation categories, v3 and v2 tables) are standard too, except
# those whose codes say that there is no code: a null flavor or data-absent reason states no fact.
_HL7_PREFIXES = ("terminology.hl7.org/codesystem/", "hl7.org/fhir/")
_NO_FACT_KEYS = frozenset({
    "terminology.hl7.org/codesystem/v3-nullflavor", "terminology.hl7.org/codesystem/data-absent-reason",
    "hl7.org/fhir/data-absent-reason", "hl7.org/fhir/v3/nullflavor", "urn:oid:2.16.840.1.113883.5.1008",
})


@lru_cache(maxsize=4096)
def standard_system(system: str) -> bool:
    """Whether ``system`` names a standard code system (the rules' own however spelled, the
    others above, HL7's code systems that state a fact); False for a local one
    (``urn:oid:1.2.3.4.local``, a hospital's URL) or a system that states no fact."""
    if canonical_system(system) is not None:
        return True
    key = _system_key(system)
    if key in _STANDARD_KEYS:
        return True
    return key.startswith(_HL7_PREFIXES) and key not in _NO_FACT_KEYS


def code_spellings(codes: frozenset[tuple[str, str]]) -> frozenset[tuple[str, str]]:
    """``codes`` (system, code) with each code of a known system also written as this index
    reads it: under the system's canonical URI however the system is spelled
    (``urn:oid:2.16.840.1.113883.6.96`` is SNOMED CT, see ``canonical_system``), an ICD-10-CM
    code as ``normalize_icd`` spells it (``f11.20`` is ``F1120``), an NDC as its 11-digit package
    (when the layout settles it) and as each 9-digit product it may name (packages of one product
    meet there), any other code as ``plain_code`` writes it, and a code without a system that only ICD-10-CM (``F11.20``) or a hyphenated
    NDC package spells so, as that system's. Applied to a resource's codes and to a consent's,
    a ``code`` condition names a code however either side writes it, as the labels do."""
    extra: set[tuple[str, str]] = set()
    for system, code in codes:
        canonical = canonical_system(system) if system else _systemless(code)
        if canonical == ICD10CM:
            extra.add((canonical, normalize_icd(code)))
        elif canonical == NDC:
            package = ndc_package(code)
            if package is not None:
                extra.add((NDC, package))
            extra.update((NDC, product) for product in ndc_products(code))
        elif canonical is not None:
            extra.add((canonical, plain_code(code)))
    return codes if extra <= codes else codes | extra


def _systemless(code: str) -> str | None:
    """The system a code written without one can only be: ICD-10-CM for a dotted ICD-10-CM
    code, NDC for a hyphenated NDC package; None otherwise (a bare number is RxNorm, SNOMED CT
    or a local code alike)."""
    text = plain_code(code)
    if _ICD_DOTTED.match(text.upper()):
        return ICD10CM
    if _NDC_HYPHENATED_PACKAGE.match(_ndc_text(text)) and ndc_products(text):
        return NDC
    return None


class LabelIndex:
    """Compiled sensitivity rules: code look-ups, resource scopes and sensitivity scopes."""

    __slots__ = (
        "_exact",
        "_icd",
        "_icd_excluded",
        "_icd_systems",
        "_ndc",
        "_systems",
        "_scope_types",
        "_scope_categories",
        "_sensitivity_scopes",
        "sensitive",
        "resource_scope_names",
        "sensitivity_scope_names",
        "coverage",
        "terms",
        "_memo",
    )

    def __init__(self) -> None:
        self._exact: dict[str, dict[str, _Hit]] = {}
        self._icd: dict[str, list[_Hit]] = {}
        self._icd_excluded: dict[str, set[str]] = {}
        self._icd_systems: frozenset[str] = frozenset(
            (CODE_SYSTEMS["icd-10-cm"][0], *CODE_SYSTEMS["icd-10-cm"][2])
        )
        self._ndc: dict[str, list[_Hit]] = {}
        # Systems no table holds as written -> the known system they spell (None: unknown),
        # so a local system costs one look-up per coding after its first.
        self._systems: dict[str, str | None] = {}
        self._scope_types: dict[str, frozenset[str]] = {}
        self._scope_categories: dict[str, dict[tuple[str, str], frozenset[str]]] = {}
        self._sensitivity_scopes: dict[str, tuple[Label, ...]] = {}
        self.sensitive: frozenset[str] = frozenset()
        self.resource_scope_names: frozenset[str] = frozenset()
        self.sensitivity_scope_names: frozenset[str] = frozenset()
        self.coverage: tuple[CoverageEntry, ...] = ()
        # The term lists (rules/terms-*.yaml), read in concepts that carry no standard code;
        # None without any.
        self.terms: TermMatcher[_Hit] | None = None
        self._memo: TextMemo[frozenset[Label]] = TextMemo(_MEMO_MAX, _MEMO_MAX_BYTES)

    # ------------------------------------------------------------------ building

    @classmethod
    def from_documents(cls, documents: Mapping[str, Any]) -> LabelIndex:
        """Compile parsed rule files, keyed by the file name used in explanations.

        Each document has ``kind``: ``category`` (code sets and the labels they yield),
        ``confidentiality`` (which confidentiality codes are sensitive) or ``scopes``
        (vendor sensitivity and resource scopes). Exactly one ``scopes`` document is required.
        """
        builder = _Builder()
        for name in sorted(documents):
            builder.add(name, documents[name])
        return builder.finish(cls())

    # ------------------------------------------------------------------ labels

    def labels_for(self, resource: JSON) -> frozenset[Label]:
        """Every label of the resource: computed from its codes, contained resources and its own
        (``planned_labels``), and from the extensions of its other elements (``stray_labels``)."""
        found = self.planned_labels(resource)
        stray = self.stray_labels(resource)
        return found | stray if stray else found

    def planned_labels(self, resource: JSON) -> frozenset[Label]:
        """The labels of the elements of the resource's field plan (``label_elements``): its
        codes, its own and its contained resources' (what a view holds)."""
        hits: list[_Hit] = []
        own: list[tuple[Label, str]] = []
        self._collect(resource, hits, own)
        if not own:
            # Most resources earn nothing or one rule's labels: hand back a shared set, which
            # keeps its hash for the callers that key on it.
            if not hits:
                return _NO_LABELS
            if len(hits) == 1:
                return hits[0].labels
        labels: set[Label] = {label for label, _ in own}
        for hit in hits:
            labels |= hit.labels
        return frozenset(labels)

    def labels_keyed(self, key: Hashable, resource: JSON) -> frozenset[Label]:
        """``planned_labels(resource)``, remembered under ``key``: the exact text of every element
        the labels depend on (core.view.label_key), so equal texts are labelled once."""
        found = self._memo.get(key)
        if found is None:
            found = self.planned_labels(resource)
            self._memo.put(key, found)
        return found

    def forget(self) -> None:
        """Forget every remembered label set (what ``labels_keyed`` keeps)."""
        self._memo.clear()

    def labels_remembered(self, resource: JSON) -> frozenset[Label]:
        """``planned_labels(resource)``, remembered under the compact text of the elements the
        labels depend on: records that code alike are labelled once (a resource labelled by its
        own meta.security or contained resources is labelled afresh)."""
        rtype = resource.get("resourceType")
        meta = resource.get("meta")
        if not isinstance(rtype, str) or "contained" in resource or (isinstance(meta, dict) and "security" in meta):
            return self.planned_labels(resource)
        names = _label_names(rtype)
        return self.labels_keyed((rtype, orjson.dumps([resource.get(n) for n in names])), resource)

    def explain(self, resource: JSON) -> list[tuple[Label, str]]:
        """Each label with the rule (or resource element) that gave it, sorted, no repeats."""
        hits: list[_Hit] = []
        own: list[tuple[Label, str]] = []
        self._collect(resource, hits, own)
        self._collect_strays(resource, hits)
        reasons = set(own)
        for hit in hits:
            reasons.update(hit.reasons)
        return sorted(reasons, key=lambda r: (r[0].code, r[0].system, r[1]))

    def _collect(self, resource: JSON, hits: list[_Hit], own: list[tuple[Label, str]]) -> None:
        rtype = resource.get("resourceType")
        fields, getters = _EXTRACTORS.get(rtype, _DEFAULT_EXTRACTORS) if isinstance(rtype, str) else _NO_EXTRACTORS
        match = self._match
        for name in fields:
            value = resource.get(name)
            if value is not None:
                match(value, hits)
        for head, extract in getters:
            if head in resource:
                values: _Sink = []
                extract(resource, values)
                for value in values:
                    match(value, hits)
        if "extension" in resource or "modifierExtension" in resource:
            match(_element_extension_codes(resource), hits)
        meta = resource.get("meta")
        if isinstance(meta, dict):
            security = meta.get("security")
            if security is not None:
                _own_labels(security, "meta.security", own)
        if rtype in _OWN_ELEMENT_TYPES:
            self._collect_own_elements(resource, rtype, hits, own)
        contained = resource.get("contained")
        if contained:
            # one contained resource written as an object: not FHIR, but a reader may take it
            for inner in [contained] if isinstance(contained, dict) else contained:
                if isinstance(inner, dict):
                    self._collect(inner, hits, own)

    def stray_labels(self, resource: JSON) -> frozenset[Label]:
        """The labels of the coded values (valueCodeableConcept, valueCoding, valueCode) of the
        extensions on elements outside the resource's field plan, at any depth (a ``note``, a
        ``bodySite``, a ``dosage`` carrying ``F11.20`` in an extension), its contained
        resources' too. A walk of those elements: callers on the hot path ask only for resources
        whose text holds an extension (``core.view.may_stray``)."""
        hits: list[_Hit] = []
        self._collect_strays(resource, hits)
        if not hits:
            return _NO_LABELS
        if len(hits) == 1:
            return hits[0].labels
        return frozenset().union(*(hit.labels for hit in hits))

    def _collect_strays(self, resource: JSON, hits: list[_Hit]) -> None:
        rtype = resource.get("resourceType")
        plan = label_elements(rtype) if isinstance(rtype, str) else _NO_PLAN
        stack: list[Any] = [v for k, v in resource.items() if k not in plan and type(v) in (dict, list)]
        contained = resource.get("contained")
        for inner in [contained] if isinstance(contained, dict) else contained if isinstance(contained, list) else ():
            if isinstance(inner, dict):
                self._collect_strays(inner, hits)
        while stack:
            node = stack.pop()
            if type(node) is list:
                stack.extend(v for v in node if type(v) in (dict, list))
                continue
            if "extension" in node or "modifierExtension" in node:
                self._match_extensions(_own_extensions(node), hits)
            stack.extend(v for k, v in node.items()
                         if k != "extension" and k != "modifierExtension" and type(v) in (dict, list))

    def _collect_own_elements(
        self, resource: JSON, rtype: str, hits: list[_Hit], own: list[tuple[Label, str]]
    ) -> None:
        """The labels a few types carry in elements of their own (and a Bundle's entries)."""
        if rtype == "DocumentReference":
            _own_labels(resource.get("securityLabel"), "DocumentReference.securityLabel", own)
        elif rtype == "Composition":
            code = resource.get("confidentiality")
            if isinstance(code, str):
                own.append((Label(V3_CONFIDENTIALITY, code), "Composition.confidentiality"))
        elif rtype == "Consent":
            # A consent naming a sensitive label tells that the patient has such records; one
            # naming a clinical code (provision.code) tells what they are, as the record would.
            for provision in provisions(resource):
                for coding in provision.get("securityLabel") or ():
                    if isinstance(coding, dict) and isinstance(coding.get("code"), str):
                        own.append((Label(str(coding.get("system") or ""), coding["code"]),
                                    "Consent.provision.securityLabel"))
                if "code" in provision:
                    self._match(provision["code"], hits)
        elif rtype == "AuditEvent":
            # A record of access to HIV data carries the labels of what it records (BALP writes
            # them in entity.securityLabel): it tells that there is such data.
            for entity in _as_list(resource.get("entity")):
                if isinstance(entity, dict) and "securityLabel" in entity:
                    _own_labels(entity["securityLabel"], "AuditEvent.entity.securityLabel", own)
            # The codes of a search it records (``entity.query``) say what was searched for.
            self._match_tokens(searches_codes(audit_searches(resource)), hits)
        elif rtype == "Bundle":
            for entry in resource.get("entry") or ():
                if isinstance(entry, dict) and isinstance(entry.get("resource"), dict):
                    self._collect(entry["resource"], hits, own)
        elif rtype in _FINDING_TEXTS:
            terms = self.terms
            if terms is not None:
                for name in _FINDING_TEXTS[rtype]:
                    text = resource.get(name)
                    if type(text) is str:
                        terms.scan(text, hits)
        elif rtype == "Subscription":
            # Its criteria's codes (``code=http://loinc.org|75622-1``) say what it watches, as
            # the records would.
            self._match_tokens(criteria_codes(resource), hits)

    def _match_tokens(self, tokens: list[tuple[str, str]], hits: list[_Hit]) -> None:
        """Search tokens (system, code) matched as codings; system "": any system's code."""
        for system, code in tokens:
            if system:
                self._match_coding({"system": system, "code": code}, hits)
            else:
                self._match_any_system(code, hits)

    def _match(self, value: Any, hits: list[_Hit]) -> None:
        if isinstance(value, list):
            for item in value:
                self._match(item, hits)
            return
        if not isinstance(value, dict):
            return
        codings = value.get("coding")
        standard = False
        if codings is None:
            standard = self._match_coding(value, hits)  # a Coding, or a concept of text alone
        elif isinstance(codings, list):
            for coding in codings:
                if isinstance(coding, dict):
                    if self._match_coding(coding, hits):
                        standard = True
                    if "extension" in coding or "modifierExtension" in coding:
                        self._match_extensions(_own_extensions(coding), hits)
        elif isinstance(codings, dict):
            standard = self._match_coding(codings, hits)  # one coding as an object: not FHIR, still read
        if not standard and self.terms is not None:
            self._match_words(value, codings, hits)
        if "extension" in value or "modifierExtension" in value:
            # a code element's own extensions (a translation, a qualifier) code it too; a
            # modifierExtension there is not FHIR, but a sender may write one: still read
            self._match_extensions(_own_extensions(value), hits)

    def _match_extensions(self, extensions: Any, hits: list[_Hit]) -> None:
        """The coded values of ``extensions`` at any depth, and of the extensions those values
        carry in turn; a loop, so that no nesting of the sender's can exhaust the stack."""
        pending = [extensions]
        while pending:
            for value in _extension_codes(pending.pop()):
                for item in value if isinstance(value, list) else (value,):
                    if not isinstance(item, dict):
                        continue
                    listed = codings = item.get("coding")
                    if codings is None:
                        codings = (item,)
                    elif isinstance(codings, dict):
                        codings = (codings,)
                    standard = False
                    for coding in codings if isinstance(codings, (list, tuple)) else ():
                        if isinstance(coding, dict):
                            if self._match_coding(coding, hits):
                                standard = True
                            if coding is not item and ("extension" in coding or "modifierExtension" in coding):
                                pending.append(_own_extensions(coding))
                    if not standard and self.terms is not None:
                        self._match_words(item, listed, hits)
                    if "extension" in item or "modifierExtension" in item:
                        pending.append(_own_extensions(item))

    def _match_coding(self, coding: JSON, hits: list[_Hit]) -> bool:
        """Add the hits of one coding's code; True when it is a code of a standard system
        (``standard_system``: a known fact, so the concept's text need not be read)."""
        system = coding.get("system")
        code = coding.get("code")
        if type(code) is not str or type(system) is not str or not system or not code:
            return self._match_odd_coding(system, code, hits)
        table = self._exact.get(system)
        if table is not None:
            hit = table.get(code) or table.get(code.strip()) or (None if code.isascii() else table.get(plain_code(code)))
            if hit is not None:
                hits.append(hit)
            return True
        if system in self._icd_systems:
            self._match_icd(normalize_icd(code), hits)
            return True
        # Any other system: NDC, a known system spelled another way, or (most often) one the
        # rules do not know, which costs this one look-up after its first.
        canonical = self._systems.get(system, _UNSEEN)
        if canonical is None:
            return standard_system(system)
        if canonical is _UNSEEN:
            if len(self._systems) >= _SYSTEMS_MAX:
                self._systems.clear()
            canonical = self._systems[system] = canonical_system(system)
        if isinstance(canonical, str):
            self._match_in(canonical, code, hits)
            return True
        return standard_system(system)

    def _match_odd_coding(self, system: Any, code: Any, hits: list[_Hit]) -> bool:
        """Codings not of the usual shape: codes as a list (not FHIR, but each is read as
        written), and a code without a system. True when a code of a standard system was read."""
        if isinstance(code, list) and isinstance(system, str):
            standard = False
            for item in code:
                if isinstance(item, str) and self._match_coding({"system": system, "code": item}, hits):
                    standard = True
            return standard
        if isinstance(code, str) and code.strip() and (system is None or system == ""):
            # SECURITY: a Coding's system is optional (R4 0..1); a code only ICD-10-CM or NDC
            # spells so is read as theirs rather than let through.
            found = _systemless(code)
            if found is not None:
                self._match_in(found, code, hits)
                return True
        return False

    def _match_words(self, concept: JSON, codings: Any, hits: list[_Hit]) -> None:
        """The terms in a concept that carries no standard code: its ``text`` and the
        ``display`` of each of its codings (or its own, when it is a Coding). Each string is
        read apart, so that no term spans two of them."""
        terms = self.terms
        assert terms is not None
        for key in ("text", "display"):
            text = concept.get(key)
            if type(text) is str:
                terms.scan(text, hits)
        if isinstance(codings, dict):
            codings = (codings,)
        if isinstance(codings, (list, tuple)):
            for coding in codings:
                if isinstance(coding, dict):
                    display = coding.get("display")
                    if type(display) is str:
                        terms.scan(display, hits)

    def _match_any_system(self, code: str, hits: list[_Hit]) -> None:
        """A code that names no system (a search token ``code=B20``) matches a code of any: it
        earns the labels of every system's code spelt so."""
        for table in self._exact.values():
            hit = table.get(code) or table.get(code.strip()) or (None if code.isascii() else table.get(plain_code(code)))
            if hit is not None:
                hits.append(hit)
        self._match_icd(normalize_icd(code), hits)
        for product in ndc_products(code):
            hits.extend(self._ndc.get(product, ()))

    def _match_in(self, system: str, code: str, hits: list[_Hit]) -> None:
        """Match ``code`` as a code of ``system``, a canonical URI."""
        table = self._exact.get(system)
        if table is not None:
            hit = table.get(code) or table.get(code.strip()) or (None if code.isascii() else table.get(plain_code(code)))
            if hit is not None:
                hits.append(hit)
        elif system == ICD10CM:
            self._match_icd(normalize_icd(code), hits)
        elif system == NDC:
            for product in ndc_products(code):
                hits.extend(self._ndc.get(product, ()))

    def _match_icd(self, code: str, hits: list[_Hit]) -> None:
        # Longest prefix first, so an exclusion below a rule is seen before the rule itself.
        excluded: set[str] = set()
        for end in range(len(code), 2, -1):
            prefix = code[:end]
            blocked = self._icd_excluded.get(prefix)
            if blocked:
                excluded |= blocked
            for hit in self._icd.get(prefix, ()):
                if hit.category not in excluded and (
                    hit.sixth is None or (len(code) > 5 and code[5] in hit.sixth)
                ):
                    hits.append(hit)

    # ------------------------------------------------------------------ scopes

    def scopes_for(self, resource: JSON) -> frozenset[str]:
        """The resource scopes (LABS, MEDICATIONS, ...) the resource falls in; may be several."""
        rtype = resource.get("resourceType")
        if not isinstance(rtype, str):
            return frozenset()
        scopes = self._scope_types.get(rtype, _NO_SCOPES)
        by_category = self._scope_categories.get(rtype)
        category = resource.get("category") if by_category else None
        if category is None or by_category is None:
            return scopes
        matched: list[frozenset[str]] = []
        for value in category if isinstance(category, list) else (category,):
            for coding in _codings(value):
                code, system = coding.get("code"), coding.get("system")
                if isinstance(code, str):
                    by_code = by_category.get(("", code))
                    if by_code is not None:
                        matched.append(by_code)
                    by_system = by_category.get((system, code)) if isinstance(system, str) else None
                    if by_system is not None:
                        matched.append(by_system)
        # The rule's own set when one category matched, so callers keying on it hash it once.
        if not matched:
            return scopes
        if len(matched) == 1 and not scopes:
            return matched[0]
        return scopes.union(*matched)

    def sensitivity_scope_labels(self, scope: str) -> tuple[Label, ...]:
        """Labels a vendor sensitivity scope (``HIV_OR_STI``, ...) opens; KeyError if unknown."""
        try:
            return self._sensitivity_scopes[scope]
        except KeyError:
            raise KeyError(f"unknown sensitivity scope {scope!r}") from None


_NO_LABELS: frozenset[Label] = frozenset()
_UNSEEN = object()  # a system not yet looked up in LabelIndex._systems
_SYSTEMS_MAX = 4096  # remembered system spellings, cleared when full
_MEMO_MAX = 16_384  # remembered label sets (core.view keys), cleared when full
_MEMO_MAX_BYTES = 16 << 20  # ... or when their keys hold this many bytes of text
_NO_SCOPES: frozenset[str] = frozenset()


# How an extension shows in JSON text: the key ``extension`` or ``modifierExtension``.
_EXTENSION_KEY = b'xtension"'


def may_stray(key: object) -> bool:
    """Whether a resource whose text (an entry's bytes, or a view's label key: the texts of the
    elements it holds) is ``key`` may carry extensions ``stray_labels`` reads; True without a
    text. A ``\\u`` escape can spell the key any way: it may."""
    if type(key) is bytes:
        return may_extend(key)
    if type(key) is tuple:
        return any(type(part) is bytes and may_extend(part) for part in key)
    return True


def may_extend(raw: bytes) -> bool:
    """False when the JSON text ``raw`` certainly holds no extension (no resource of it has
    ``stray_labels``): one scan of the answer spares every resource the walk."""
    if _EXTENSION_KEY in raw:
        return True
    first = raw.find(b"\\")  # a backslash alone is found by memchr; most texts have none
    return first >= 0 and raw.find(b"\\u", first) >= 0


def _extension_codes(extensions: Any) -> list[Any]:
    """Coded values (valueCodeableConcept, valueCoding, valueCode) of extensions, nested ones
    included at any depth (``condition-dueTo`` carrying B20 names the diagnosis as surely as
    ``code`` does). A ``valueCode`` has no system (the extension's definition gives it), so it is
    read as a Coding without one: it earns labels only when dotted like ICD-10-CM (``F11.20``)
    or hyphenated like an NDC package (``_systemless``), never as ``final``, ``male`` or ``en-US``."""
    found: list[Any] = []
    stack = list(extensions) if isinstance(extensions, list) else [extensions]
    while stack:
        ext = stack.pop()
        if not isinstance(ext, dict):
            continue
        for key in ("valueCodeableConcept", "valueCoding"):
            if key in ext:
                found.append(ext[key])
        code = ext.get("valueCode")
        if type(code) is str:
            found.append({"code": code})
        if "extension" in ext or "modifierExtension" in ext:
            stack.extend(_own_extensions(ext))
    return found


def _own_extensions(element: JSON) -> list[Any]:
    """An element's extensions and modifier extensions, as one list."""
    found: list[Any] = []
    for key in ("extension", "modifierExtension"):
        value = element.get(key)
        if isinstance(value, list):
            found.extend(value)
        elif isinstance(value, dict):
            found.append(value)  # one extension as an object: not FHIR, still read
    return found


def _element_extension_codes(element: JSON) -> list[Any]:
    """Coded values of an element's own extensions and modifier extensions."""
    return _extension_codes(_own_extensions(element))


def _as_list(value: Any) -> list[Any]:
    if isinstance(value, list):
        return value
    return [] if value is None else [value]


def _codings(value: Any) -> list[JSON]:
    if not isinstance(value, dict):
        return []
    codings = value.get("coding")
    if isinstance(codings, list):
        return [c for c in codings if isinstance(c, dict)]
    return [value] if "code" in value else []


def _own_labels(value: Any, where: str, own: list[tuple[Label, str]]) -> None:
    for item in _as_list(value):
        if isinstance(item, str):
            own.append((Label("", item), where))  # a bare code: read as a code without a system
            continue
        for coding in _codings(item):
            code, system = coding.get("code"), coding.get("system")
            if isinstance(code, str):
                own.append((Label(system if isinstance(system, str) else "", code), where))


# ---------------------------------------------------------------------- rule compilation


class _Builder:
    """Validates rule documents and fills a LabelIndex; every problem is a RuleDataError."""

    def __init__(self) -> None:
        self.exact: dict[str, dict[str, _Hit]] = {}
        self.icd: dict[str, list[_Hit]] = {}
        self.icd_excluded: dict[str, set[str]] = {}
        self.ndc: dict[str, list[_Hit]] = {}
        self.seen: dict[tuple[str, str], str] = {}
        self.rule_labels: set[str] = set()
        self.sensitive: set[str] = set()
        self.scopes: tuple[str, JSON] | None = None
        self.coverage: list[CoverageEntry] = []
        self.terms: TermMatcher[_Hit] = TermMatcher()
        self.term_seen: dict[tuple[tuple[str, ...], frozenset[Label]], str] = {}

    def add(self, file: str, document: Any) -> None:
        if not isinstance(document, dict):
            raise RuleDataError(file, "document", "expected a mapping at the top level")
        kind = document.get("kind")
        if kind == "category":
            self._category(file, document)
        elif kind == "confidentiality":
            codes = _strings(file, "sensitive", document.get("sensitive"))
            for code in codes:
                if code not in CONFIDENTIALITY_CODES:
                    raise RuleDataError(file, f"sensitive {code}", "bad label: not a v3-Confidentiality code")
            self.sensitive.update(codes)
        elif kind == "terms":
            self._terms(file, document)
        elif kind == "scopes":
            if self.scopes is not None:
                raise RuleDataError(file, "kind", f"a second scopes file (first: {self.scopes[0]})")
            self.scopes = (file, document)
        else:
            raise RuleDataError(file, "kind", f"unknown kind {kind!r} (category, terms, confidentiality, scopes)")

    def _category(self, file: str, document: JSON) -> None:
        category, sets = _named_sets(file, document, "code sets")
        for number, code_set in enumerate(sets, 1):
            self._code_set(file, category, f"sets[{number}]", code_set)

    def _terms(self, file: str, document: JSON) -> None:
        """A term list: sets of phrases, each set with its labels and source."""
        category, sets = _named_sets(file, document, "term sets")
        for number, term_set in enumerate(sets, 1):
            name = term_set.get("name")
            where = f"sets[{number}] ({name})" if isinstance(name, str) else f"sets[{number}]"
            if not isinstance(term_set.get("source"), str) or not term_set["source"].strip():
                raise RuleDataError(file, where, "missing source (the value sets or lists the terms come from)")
            labels = self._labels(file, where, term_set.get("labels"))
            terms = term_set.get("terms")
            if not isinstance(terms, list) or not terms:
                raise RuleDataError(file, f"{where} terms", "expected a non-empty list of terms")
            for term in terms:
                self._term(file, category, where, term, labels)
            self.coverage.append(
                CoverageEntry(
                    file, category, str(name or where), "text", tuple(label.code for label in labels),
                    len(terms), len(terms), " ".join(str(term_set["source"]).split()),
                )
            )

    def _term(self, file: str, category: str, where: str, term: Any, labels: tuple[Label, ...]) -> None:
        if not isinstance(term, str) or not words(term):
            raise RuleDataError(file, f"{where} terms", f"bad term {term!r}: expected a phrase of words")
        key = (tuple(words(term)), frozenset(labels))
        earlier = self.term_seen.get(key)
        if earlier is not None:
            raise RuleDataError(file, f"{where} {term}", f"duplicate term (already in {earlier})")
        self.term_seen[key] = file
        self.rule_labels.update(label.code for label in labels)
        rule = f"{file}: text term {' '.join(key[0])!r}"
        self.terms.add(term, _Hit(category, frozenset(labels), tuple((label, rule) for label in labels)))

    @staticmethod
    def _labels(file: str, where: str, value: Any) -> tuple[Label, ...]:
        labels = tuple(Label(V3_ACT_CODE, code) for code in _strings(file, f"{where} labels", value))
        for label in labels:
            if label.code not in ACT_CODE_LABELS:
                raise RuleDataError(file, f"{where} labels", f"bad label {label.code!r}: not a v3-ActCode sensitivity or policy code")
        if not labels:
            raise RuleDataError(file, f"{where} labels", "no labels")
        return labels

    def _code_set(self, file: str, category: str, where: str, code_set: JSON) -> None:
        name = code_set.get("name")
        where = f"{where} ({name})" if isinstance(name, str) else where
        if not isinstance(code_set.get("source"), str) or not code_set["source"].strip():
            raise RuleDataError(file, where, "missing source (value set name/OID or regulation)")
        alias = code_set.get("system")
        if not isinstance(alias, str) or alias not in CODE_SYSTEMS:
            raise RuleDataError(file, where, f"unknown code system {alias!r} (one of {', '.join(CODE_SYSTEMS)})")
        labels = self._labels(file, where, code_set.get("labels"))
        self.rule_labels.update(label.code for label in labels)
        includes = [
            (one, display if one == code else f"in {code}: {display}")
            for code, display in _entries(file, where, code_set.get("codes"), "codes")
            for one in self._expand(file, where, alias, code)
        ]
        excludes = [
            one
            for code, _display in _entries(file, where, code_set.get("exclude", []), "exclude")
            for one in self._expand(file, where, alias, code)
        ]
        if excludes and alias != "icd-10-cm":
            raise RuleDataError(file, f"{where} exclude", "exclude is only for ICD-10-CM code ranges")
        sixth = self._sixth(file, where, alias, code_set.get("sixth_character"))
        for one in excludes:
            key = normalize_icd(one)
            if not any(key.startswith(normalize_icd(code)) for code, _ in includes):
                raise RuleDataError(file, f"{where} exclude {one}", "excludes no code of this set")
            self.icd_excluded.setdefault(key, set()).add(category)
        listed = 0
        for code, display in includes:
            if code not in excludes:
                listed += 1
                self._add_code(file, category, where, alias, code, display, labels, sixth)
        self.coverage.append(
            CoverageEntry(
                file, category, str(name or where), CODE_SYSTEMS[alias][1], tuple(label.code for label in labels),
                len(code_set.get("codes") or ()), listed, " ".join(str(code_set["source"]).split()),
            )
        )

    @staticmethod
    def _sixth(file: str, where: str, alias: str, value: Any) -> frozenset[str] | None:
        if value is None:
            return None
        if alias != "icd-10-cm" or not isinstance(value, str) or not value.isalnum():
            raise RuleDataError(file, f"{where} sixth_character", "expected ICD-10-CM 6th characters, such as '2' or '1234'")
        return frozenset(value.upper())

    def _expand(self, file: str, where: str, alias: str, code: str) -> list[str]:
        if alias == "icd-10-cm":
            found = _ICD_RANGE.match(code)
            if found:
                first, low, last, high = found.groups()
                if first != last or int(low) > int(high):
                    raise RuleDataError(file, f"{where} {code}", "bad range: one letter, low to high (F10-F19)")
                return [f"{first}{n:02d}" for n in range(int(low), int(high) + 1)]
            if not _ICD_CODE.match(code):
                raise RuleDataError(file, f"{where} {code}", "bad ICD-10-CM code (category of 3, then a dot: F11, F11.2)")
            return [code]
        if alias == "ndc":
            if "-" not in code and len(code) not in (9, 11) or len(ndc_products(code)) != 1:
                raise RuleDataError(
                    file, f"{where} {code}",
                    "bad NDC code (11 digits, 5-4-2; or hyphenated 4-4-2, 5-3-2, 5-4-1, 5-4-2, or a product 5-4)",
                )
            return [code]
        found = _NUMERIC_RANGE.match(code) if alias in ("cpt", "hcpcs") else None
        if found:
            letter, low, other, high = found.groups()
            if letter != other or len(low) != len(high) or int(low) > int(high):
                raise RuleDataError(file, f"{where} {code}", "bad range: same letter and width, low to high (90785-90899)")
            codes = [f"{letter}{n:0{len(low)}d}" for n in range(int(low), int(high) + 1)]
        else:
            codes = [code]
        for one in codes:
            if not _CODE_PATTERNS[alias].match(one):
                raise RuleDataError(file, f"{where} {code}", f"bad {CODE_SYSTEMS[alias][1]} code")
        return codes

    def _claim(self, file: str, entry: str, key: tuple[str, str]) -> None:
        earlier = self.seen.get(key)
        if earlier is not None:
            raise RuleDataError(file, entry, f"duplicate code (already in {earlier})")
        self.seen[key] = file

    def _add_code(
        self,
        file: str,
        category: str,
        where: str,
        alias: str,
        code: str,
        display: str,
        labels: tuple[Label, ...],
        sixth: frozenset[str] | None,
    ) -> None:
        # An NDC is one code however it is written: its package (or product) in 11 (or 9) digits.
        key = ndc_package(code) or ndc_products(code)[0] if alias == "ndc" else code
        self._claim(file, f"{where} {code}", (alias, key))
        uri, title, others = CODE_SYSTEMS[alias]
        rule = f"{file}: {title} {code} ({display})"
        if sixth is not None:
            rule += f", 6th character {'/'.join(sorted(sixth))}"
        if alias == "ndc":
            product = ndc_products(code)[0]
            rule += f", product {product[:5]}-{product[5:]} in any package"
        hit = _Hit(category, frozenset(labels), tuple((label, rule) for label in labels), sixth)
        if alias == "icd-10-cm":
            self.icd.setdefault(normalize_icd(code), []).append(hit)
            return
        if alias == "ndc":
            # Rules list packages; every package of a product is the same drug, so the product
            # carries the labels (one hit per set and product: the first package names it).
            same = self.ndc.setdefault(ndc_products(code)[0], [])
            if not any(earlier.category == category and earlier.labels == hit.labels for earlier in same):
                same.append(hit)
            return
        for system in (uri, *others):
            self.exact.setdefault(system, {})[code] = hit

    def finish(self, index: LabelIndex) -> LabelIndex:
        if self.scopes is None:
            raise RuleDataError("rules", "scopes", "no scopes file (kind: scopes)")
        file, document = self.scopes
        sensitivity = document.get("sensitivity")
        if not isinstance(sensitivity, dict) or not sensitivity:
            raise RuleDataError(file, "sensitivity", "expected a mapping of scope -> labels")
        known = self.rule_labels | ACT_CODE_LABELS
        scopes: dict[str, tuple[Label, ...]] = {}
        for scope, codes in sensitivity.items():
            labels = []
            for code in _strings(file, f"sensitivity {scope}", codes):
                if code not in known:
                    raise RuleDataError(file, f"sensitivity {scope}", f"bad label {code!r}")
                labels.append(Label(V3_ACT_CODE, code))
            scopes[str(scope)] = tuple(labels)
        index._sensitivity_scopes = scopes
        index.sensitivity_scope_names = frozenset(scopes)
        index._scope_types, index._scope_categories = self._resource_scopes(file, document.get("resource"))
        index.resource_scope_names = frozenset(str(scope) for scope in document["resource"])
        scoped = {label.code for labels in scopes.values() for label in labels}
        index.sensitive = frozenset(self.rule_labels | scoped | self.sensitive)
        index._exact = self.exact
        index._icd = self.icd
        index._icd_excluded = self.icd_excluded
        index._ndc = self.ndc
        index.coverage = tuple(self.coverage)
        index.terms = self.terms if self.terms else None
        return index

    @staticmethod
    def _resource_scopes(
        file: str, resource: Any
    ) -> tuple[dict[str, frozenset[str]], dict[str, dict[tuple[str, str], frozenset[str]]]]:
        if not isinstance(resource, dict) or not resource:
            raise RuleDataError(file, "resource", "expected a mapping of scope -> resource types")
        types: dict[str, set[str]] = {}
        categories: dict[str, dict[tuple[str, str], set[str]]] = {}
        for scope, members in resource.items():
            if not isinstance(members, list) or not members:
                raise RuleDataError(file, f"resource {scope}", "expected a non-empty list")
            for member in members:
                if isinstance(member, str) and member[:1].isupper():
                    types.setdefault(member, set()).add(str(scope))
                elif isinstance(member, dict) and isinstance(member.get("type"), str) and isinstance(member.get("category"), str):
                    key = (str(member.get("system") or ""), member["category"])
                    categories.setdefault(member["type"], {}).setdefault(key, set()).add(str(scope))
                else:
                    raise RuleDataError(file, f"resource {scope} {member!r}", "expected a resource type or {type, category[, system]}")
        return (
            {t: frozenset(s) for t, s in types.items()},
            {t: {k: frozenset(s) for k, s in c.items()} for t, c in categories.items()},
        )


def _strings(file: str, entry: str, value: Any) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RuleDataError(file, entry, "expected a list of codes")
    return list(value)


def _entries(file: str, where: str, value: Any, key: str) -> Iterable[tuple[str, str]]:
    """``- CODE: display`` items; YAML reads numeric codes (RxNorm, CPT) as ints."""
    if not isinstance(value, list):
        raise RuleDataError(file, f"{where} {key}", "expected a list of 'CODE: display' items")
    for item in value:
        if not isinstance(item, dict) or len(item) != 1:
            raise RuleDataError(file, f"{where} {key}", f"expected 'CODE: display', got {item!r}")
        ((code, display),) = item.items()
        if isinstance(code, bool) or not isinstance(code, (str, int)):
            raise RuleDataError(file, f"{where} {key}", f"bad code {code!r}")
        if not isinstance(display, str) or not display:
            raise RuleDataError(file, f"{where} {key} {code}", "missing display")
        yield str(code).strip(), display


def _named_sets(file: str, document: JSON, what: str) -> tuple[str, list[JSON]]:
    """A rules file's category name and its non-empty list of sets, each a mapping."""
    category = document.get("category")
    if not isinstance(category, str) or not category:
        raise RuleDataError(file, "category", "missing category name")
    sets = document.get("sets")
    if not isinstance(sets, list) or not sets:
        raise RuleDataError(file, "sets", f"expected a non-empty list of {what}")
    for number, one in enumerate(sets, 1):
        if not isinstance(one, dict):
            raise RuleDataError(file, f"sets[{number}]", "expected a mapping")
    return category, sets
