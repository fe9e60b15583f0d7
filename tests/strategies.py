"""Hypothesis strategies: FHIR resources that exercise what decides them, consents whose
decisions a summary of the resource settles, and searchset Bundles written as raw text.

Resources are built per type from the tables the gateway decides by (the R4 Patient
compartment, the labeler's code paths, the clinical-date, main-code and author elements), so
every deciding element is tried at its real place, nested paths included; elements that
decide nothing (narrative, notes, quantities, identifiers, codings outside the label paths)
are added beside them and must change nothing.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any

import orjson
import yaml
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from gateway.core import labels as labels_module
from gateway.core.compartment import is_patient_data
from gateway.core.compartment import (
    AUTHOR_ELEMENTS,
    CLINICAL_DATE,
    EXTRA_PATIENT_LINKS,
    MAIN_CODE,
    PATIENT_COMPARTMENT,
)
from gateway.core.consent import CompiledConsent, compile_consent
from gateway.core.decision import Policy
from gateway.core.labels import CODE_SYSTEMS, LabelIndex
from gateway.core.model import Actor, RequestContext, RESOURCE_SCOPE_SYSTEM, RESOURCE_TYPES_SYSTEM, V3_ACT_CODE, V3_CONFIDENTIALITY
from gateway.core.references import MEDICATION_HOLDERS
from gateway.core.view import view_elements
from gateway.rules import BUNDLED_RULES, load_rules

JSON = dict[str, Any]
Draw = Callable[[st.SearchStrategy[Any]], Any]

# Every type of the patient compartment (and the links the gateway adds), plus a few that
# hold no patient data.
NON_PATIENT_TYPES = ("Medication", "Practitioner", "Organization")
ALL_TYPES = tuple(sorted({*PATIENT_COMPARTMENT, *EXTRA_PATIENT_LINKS, *NON_PATIENT_TYPES}))
PATIENTS = ("Patient/p1", "Patient/p2", "Patient/p3")
PROFILES = (
    "http://hl7.org/fhir/us/core/StructureDefinition/us-core-observation-lab",
    "http://hl7.org/fhir/us/core/StructureDefinition/us-core-condition-problems-health-concerns",
    "http://example.org/fhir/StructureDefinition/local|2.0",
)

# Codes that earn no label: LOINC glucose, SNOMED hypertension, ICD-10-CM essential
# hypertension, RxNorm amlodipine 5 mg tablet, CPT office visit, and a local code.
ORDINARY_CODINGS: tuple[JSON, ...] = (
    {"system": "http://loinc.org", "code": "2345-7", "display": "Glucose"},
    {"system": "http://snomed.info/sct", "code": "38341003"},
    {"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "I10"},
    {"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "197361"},
    {"system": "http://www.ama-assn.org/go/cpt", "code": "99213"},
    {"system": "http://example.org/local", "code": "B20"},
    {"code": "F32.9"},
)
# Category codings the resource scopes read (observation-category, v2-0074).
CATEGORY_CODINGS: tuple[JSON, ...] = (
    {"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "laboratory"},
    {"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs"},
    {"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "social-history"},
    {"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "LAB"},
    {"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "GE"},
    {"code": "imaging"},
)
SECURITY_CODINGS: tuple[JSON, ...] = (
    {"system": V3_CONFIDENTIALITY, "code": "R"},
    {"system": V3_CONFIDENTIALITY, "code": "N"},
    {"system": V3_CONFIDENTIALITY, "code": "V"},
    {"system": V3_ACT_CODE, "code": "HIV"},
    {"system": V3_ACT_CODE, "code": "PSY"},
    {"system": V3_ACT_CODE, "code": "ETH"},
)


def _rule_codes(index: LabelIndex) -> list[JSON]:
    """Up to three codes of every rule set of the bundled rules, as codings, each checked to
    earn a label (an ICD-10-CM category also in a child form: ``F11`` as ``F11.20``)."""
    found: list[JSON] = []
    for path in sorted(Path(BUNDLED_RULES).glob("*.yaml")):
        document = yaml.load(path.read_text(), Loader=_LOADER)
        if document.get("kind") != "category":
            continue
        for code_set in document["sets"]:
            system = CODE_SYSTEMS[code_set["system"]][0]
            for item in code_set["codes"][:3]:
                ((code, _display),) = item.items()
                code = str(code).split("-")[0] if code_set["system"] != "loinc" else str(code)
                found.append({"system": system, "code": code})
                if code_set["system"] == "icd-10-cm" and len(code) == 3:
                    found.append({"system": system, "code": f"{code}.20"})
    return [c for c in found if index.labels_for({"resourceType": "Basic", "code": {"coding": [c]}})]


_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@lru_cache(maxsize=1)
def rules_index() -> LabelIndex:
    """The bundled rules, loaded once; its label memo is shared by every example that uses it."""
    return load_rules()


@lru_cache(maxsize=1)
def sensitive_codings() -> tuple[JSON, ...]:
    return tuple(_rule_codes(rules_index()))


# ---------------------------------------------------------------------- building blocks


def _dotted(paths: tuple[str, ...]) -> list[tuple[str, ...]]:
    return [tuple(p.split(".")) for p in paths]


def label_paths(rtype: str) -> list[tuple[str, ...]]:
    """Where the labeler reads codes of this type (nested paths split)."""
    paths = labels_module._CODE_PATHS.get(rtype, labels_module._DEFAULT_PATHS)
    return _dotted(tuple(paths))


def compartment_paths(rtype: str) -> list[tuple[str, ...]]:
    return list({**PATIENT_COMPARTMENT, **EXTRA_PATIENT_LINKS}.get(rtype, {}).values())


def put(node: JSON, path: tuple[str, ...], leaf: Any, listy: bool) -> None:
    """Set ``leaf`` at ``path`` below ``node``, creating objects (in one-item lists when
    ``listy``) and adding to what is already there."""
    head, rest = path[0], path[1:]
    existing = node.get(head)
    if not rest:
        if existing is None:
            node[head] = [leaf] if listy else leaf
        elif isinstance(existing, list):
            existing.append(leaf)
        else:
            node[head] = [existing, leaf]
        return
    if isinstance(existing, list):
        child = next((x for x in existing if isinstance(x, dict)), None)
        if child is None:
            child = {}
            existing.append(child)
    elif isinstance(existing, dict):
        child = existing
    else:
        child = {}
        node[head] = [child] if listy else child
    put(child, rest, leaf, listy)


coding = st.one_of(
    st.deferred(lambda: st.sampled_from(sensitive_codings())),
    st.sampled_from(ORDINARY_CODINGS),
    st.sampled_from(CATEGORY_CODINGS),
)
# A hospital's local code with only a display: the term lists read it (rules/terms-*.yaml).
LOCAL_DISPLAY_CODINGS: tuple[JSON, ...] = (
    {"system": "urn:oid:1.2.3.4.local", "code": "L123", "display": "Opioid use disorder, moderate"},
    {"system": "urn:oid:1.2.3.4.local", "code": "L200", "display": "Essential hypertension"},
)
coding = st.one_of(coding, st.sampled_from(LOCAL_DISPLAY_CODINGS))
concept = st.one_of(
    st.lists(coding, min_size=1, max_size=3).map(lambda cs: {"coding": cs}),
    st.tuples(st.lists(coding, max_size=2), st.sampled_from(["HIV test", "note", "Buprenorphine 8 mg film"])).map(
        lambda p: {"coding": p[0], "text": p[1]}
    ),
    coding,  # a bare Coding where a CodeableConcept belongs: read the same way by both
)
reference_text = st.one_of(
    st.sampled_from(PATIENTS),
    st.sampled_from([
        "http://example.org/fhir/Patient/p2", "Practitioner/pr1", "Organization/org1",
        "RelatedPerson/rp1", "#c1", "Patient?identifier=urn:x|1", "Patient/p1/_history/2",
    ]),
)
reference = st.one_of(
    reference_text.map(lambda r: {"reference": r}),
    st.tuples(reference_text, st.sampled_from(["Ana", "HIV clinic"])).map(
        lambda p: {"reference": p[0], "display": p[1]}
    ),
)
date_text = st.sampled_from([
    "2023", "2023-05", "2023-05-17", "2023-05-17T10:00:00Z", "2024-01-31T23:59:59+02:00",
    "2025-12-01", "not a date", "2023-13-01",
])
period = st.fixed_dictionaries({}, optional={"start": date_text, "end": date_text})
decimal = st.sampled_from(["4.10", "1.000", "0.0", "-2.50", "1e3", "12345678901234567890.10"])


def decimal_marker(text: str) -> str:
    """A string written in place of a JSON number; ``with_decimals`` turns it into the number."""
    return f"@@decimal:{text}@@"


_DECIMAL_MARKER = re.compile(rb'"@@decimal:([^@"]*)@@"')


def with_decimals(raw: bytes) -> bytes:
    """The JSON text with every decimal marker written as the bare number (``4.10`` stays so)."""
    return _DECIMAL_MARKER.sub(lambda m: m.group(1), raw)


def _extension(draw: Draw, depth: int = 0) -> JSON:
    ext: JSON = {"url": draw(st.sampled_from([
        "http://hl7.org/fhir/StructureDefinition/condition-dueTo",
        "http://example.org/fhir/StructureDefinition/reason",
    ]))}
    kind = draw(st.sampled_from(["cc", "coding", "string", "nested"] if depth == 0 else ["cc", "coding", "string"]))
    if kind == "cc":
        ext["valueCodeableConcept"] = draw(concept)
    elif kind == "coding":
        ext["valueCoding"] = draw(coding)
    elif kind == "string":
        ext["valueString"] = "F11.20"
    else:
        ext["extension"] = [_extension(draw, depth + 1) for _ in range(draw(st.integers(1, 2)))]
    return ext


def _meta(draw: Draw) -> JSON:
    meta: JSON = {"versionId": draw(st.sampled_from(["1", "7"]))}
    if draw(st.booleans()):
        meta["lastUpdated"] = "2024-05-01T10:00:00Z"
    if draw(st.booleans()):
        meta["profile"] = draw(st.lists(st.sampled_from(PROFILES), min_size=1, max_size=2))
    if draw(st.booleans()):
        meta["security"] = draw(st.lists(st.sampled_from(SECURITY_CODINGS), min_size=1, max_size=2))
    if draw(st.booleans()):
        meta["tag"] = [{"system": "http://example.org/tags", "code": "security"}]
    return meta


def _contained(draw: Draw) -> list[JSON]:
    inner: list[JSON] = []
    for number in range(draw(st.integers(1, 2))):
        rtype = draw(st.sampled_from(["Medication", "Condition", "Observation", "Practitioner"]))
        resource: JSON = {"resourceType": rtype, "id": f"c{number + 1}"}
        if rtype != "Practitioner":
            resource["code"] = draw(concept)
        if rtype == "Condition" and draw(st.booleans()):
            resource["subject"] = {"reference": draw(st.sampled_from(PATIENTS))}
        inner.append(resource)
    return inner


def _noise(draw: Draw, rtype: str, resource: JSON) -> None:
    """Elements no decision reads, at the top level where the type's plan does not name them."""
    plan = view_elements(rtype)
    candidates: dict[str, Any] = {
        "text": {"status": "generated", "div": '<div xmlns="http://www.w3.org/1999/xhtml">HIV 1 RNA, F11.20</div>'},
        "note": [{"text": "Patient discussed opioid use disorder treatment"}],
        "identifier": [{"system": "urn:oid:1.2.3", "value": draw(st.sampled_from(["MRN-1", "B20"]))}],
        "valueQuantity": {"value": decimal_marker(draw(decimal)), "unit": "mg/dL"},
        "interpretation": [{"coding": [draw(coding)]}],
        "bodySite": {"coding": [draw(coding)]},
        "language": "en",
        "implicitRules": "http://example.org/rules",
    }
    for name in draw(st.lists(st.sampled_from(sorted(candidates)), max_size=4, unique=True)):
        if name not in plan and name not in resource:
            resource[name] = candidates[name]


def _questionnaire_items(draw: Draw) -> list[JSON]:
    answer: JSON = {"valueCoding": draw(coding)}
    if draw(st.booleans()):
        answer["item"] = [{"linkId": "1.1", "answer": [{"valueCoding": draw(coding)}]}]
    return [{"linkId": "1", "answer": [answer], "item": [{"linkId": "2", "answer": [{"valueString": "x"}]}]}]


@st.composite
def resources(draw: Draw, rtype: str) -> JSON:
    """A resource of ``rtype`` with deciding elements at their places and noise beside them."""
    resource: JSON = {"resourceType": rtype}
    if draw(st.integers(0, 9)) > 0:
        resource["id"] = draw(st.sampled_from(["r1", "r2", "p1"]))
    for path in compartment_paths(rtype):
        for _ in range(draw(st.integers(0, 2))):
            put(resource, path, draw(reference), draw(st.booleans()))
    code_paths = {*label_paths(rtype), *MAIN_CODE.get(rtype, (("code",),)), ("category",)}
    for path in sorted(code_paths):
        if draw(st.booleans()):
            put(resource, path, draw(concept), draw(st.booleans()))
    for path in CLINICAL_DATE.get(rtype, ()):
        if draw(st.integers(0, 2)) == 0:
            leaf = draw(period) if path[-1].endswith("Period") or draw(st.integers(0, 5)) == 0 else draw(date_text)
            put(resource, path, leaf, False)
    for name in draw(st.lists(st.sampled_from(AUTHOR_ELEMENTS), max_size=2)):
        ref = draw(reference)
        wrapped = draw(st.sampled_from([None, "actor", "party", "who"]))
        put(resource, (name,), {wrapped: ref} if wrapped else ref, draw(st.booleans()))
    if draw(st.booleans()):
        resource["extension"] = [_extension(draw) for _ in range(draw(st.integers(1, 2)))]
    if draw(st.integers(0, 4)) == 0:
        resource["modifierExtension"] = [_extension(draw)]
    if draw(st.booleans()):
        resource["meta"] = _meta(draw)
    if draw(st.integers(0, 3)) == 0:
        resource["contained"] = _contained(draw)
    if rtype in MEDICATION_HOLDERS and draw(st.booleans()):
        resource["medicationReference"] = {"reference": draw(st.sampled_from(["#c1", "Medication/m1"]))}
    if rtype == "QuestionnaireResponse" and draw(st.booleans()):
        resource["item"] = _questionnaire_items(draw)
    if rtype == "DocumentReference" and draw(st.booleans()):
        resource["securityLabel"] = [{"coding": [draw(st.sampled_from(SECURITY_CODINGS))]}]
    if rtype == "Composition" and draw(st.booleans()):
        resource["confidentiality"] = draw(st.sampled_from(["N", "R", "V"]))
        resource["section"] = [{"code": draw(concept), "section": [{"code": draw(concept)}]}]
    if rtype == "Consent" and draw(st.booleans()):
        resource["provision"] = {"securityLabel": [draw(st.sampled_from(SECURITY_CODINGS))],
                                 "provision": [{"securityLabel": [draw(st.sampled_from(SECURITY_CODINGS))]}]}
    if rtype in ("DetectedIssue", "ClinicalImpression") and draw(st.booleans()):
        name = "detail" if rtype == "DetectedIssue" else draw(st.sampled_from(["summary", "description"]))
        resource[name] = draw(st.sampled_from(["Methadone with ciprofloxacin: QT prolongation", "No issue"]))
    if rtype == "Binary":
        resource["contentType"] = "text/plain"
        resource["data"] = "SElWIHZpcmFsIGxvYWQ="
        if draw(st.booleans()):
            resource["securityContext"] = draw(reference)
    _noise(draw, rtype, resource)
    return resource


any_resource = st.sampled_from(ALL_TYPES).flatmap(resources)


# ---------------------------------------------------------------------- consents

ACTORS = ("Practitioner/pr1", "Practitioner/pr2", "Organization/org1")
_conditions = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(["permit", "deny"]),
        "actor": st.sampled_from(ACTORS).map(lambda a: [{"reference": {"reference": a}}]),
        "purpose": st.sampled_from(["TREAT", "ETREAT", "HPAYMT"]).map(lambda p: [{"code": p}]),
        "securityLabel": st.lists(st.sampled_from(SECURITY_CODINGS + (
            {"system": V3_ACT_CODE, "code": "SUD"}, {"system": V3_ACT_CODE, "code": "STD"},
            {"system": V3_ACT_CODE, "code": "42CFRPart2"}, {"code": "SEX"},
        )), min_size=1, max_size=2),
        "class": st.lists(st.one_of(
            st.sampled_from(["Observation", "Condition", "MedicationRequest", "Encounter", "Patient"]).map(
                lambda t: {"system": RESOURCE_TYPES_SYSTEM, "code": t}),
            st.sampled_from(["LABS", "MEDICATIONS", "DIAGNOSES", "CLINICAL_VITALS", "IMAGING"]).map(
                lambda s: {"system": RESOURCE_SCOPE_SYSTEM, "code": s}),
            st.sampled_from(PROFILES).map(lambda p: {"system": "http://hl7.org/fhir/StructureDefinition", "code": p}),
            st.sampled_from(["Observation", "LABS", PROFILES[0]]).map(lambda c: {"code": c}),
        ), min_size=1, max_size=2),
        "dataPeriod": st.sampled_from([
            {"start": "2023-01-01", "end": "2023-12-31"}, {"start": "2024-01-01"}, {"end": "2023-06-30"},
        ]),
    },
)
_provisions = st.recursive(
    _conditions,
    lambda kids: st.tuples(_conditions, st.lists(kids, min_size=1, max_size=2)).map(
        lambda pair: {**pair[0], "provision": pair[1]}
    ),
    max_leaves=4,
)
consent_specs = st.fixed_dictionaries(
    {"provision": _provisions, "patient": st.sampled_from(PATIENTS).map(lambda p: {"reference": p})},
    optional={
        "policyRule": st.sampled_from(["OPTIN", "OPTOUT"]).map(lambda c: {"coding": [{"code": c}]}),
        "dateTime": st.sampled_from(["2023-01-01", "2024-02-02T10:00:00Z"]),
    },
)


# ---------------------------------------------------------------------- search sets


@st.composite
def searchset_texts(draw: Draw) -> bytes:
    """A searchset Bundle as the upstream's compact text, decimals written as numbers
    (``4.10``); some entries hold types read whole (Binary, Composition, a nested Bundle)."""
    entries: list[JSON] = []
    for number in range(draw(st.integers(0, 5))):
        rtype = draw(st.sampled_from((*ALL_TYPES, "Binary", "Bundle")))
        if rtype == "Bundle":
            resource: JSON = {"resourceType": "Bundle", "type": "collection",
                              "entry": [{"resource": draw(resources("Observation"))}]}
        else:
            resource = draw(resources(rtype))
        entry: JSON = {"fullUrl": f"http://example.org/fhir/{rtype}/{number}", "resource": resource}
        # Without a mode, an entry of no patient's data may be an included one, which views hand
        # to the whole path (core.enforce.may_be_included): those always say they match.
        if not is_patient_data(rtype) or draw(st.booleans()):
            entry["search"] = {"mode": "match", "score": decimal_marker(draw(decimal))}
        entries.append(entry)
    bundle: JSON = {"resourceType": "Bundle", "id": "b1", "meta": {"lastUpdated": "2024-05-01T10:00:00Z"},
                    "type": "searchset", "total": len(entries)}
    link = [{"relation": "self", "url": "http://example.org/fhir/Observation?patient=p1"}]
    if draw(st.booleans()):
        bundle["link"] = link
    if entries or draw(st.booleans()):
        bundle["entry"] = entries
    if draw(st.booleans()):
        bundle["signature"] = {"data": "c2ln"}  # an element after the entries
    return with_decimals(orjson.dumps(bundle))


# ---------------------------------------------------------------------- deciding


def fast(examples: int) -> settings:
    """Reproducible runs (CI sees the same examples every time) without deadlines."""
    return settings(derandomize=True, database=None, deadline=None, max_examples=examples,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


DECIDED_AT = datetime(2024, 6, 1, 12, tzinfo=timezone.utc)
decision_policies = st.builds(
    Policy,
    default_decision=st.sampled_from(["permit", "deny"]),
    combining=st.sampled_from(["deny-overrides", "latest-wins"]),
    explicit_consent_required=st.sampled_from([None, frozenset(), frozenset({"HIV", "R"})]),
    sensitive=st.deferred(lambda: st.just(rules_index().sensitive)),
    untyped_root=st.sampled_from(["exception", "scope"]),
)
request_contexts = st.builds(
    RequestContext,
    actor=st.builds(
        Actor,
        reference=st.sampled_from(["Practitioner/pr1", "Practitioner/pr2", "Patient/p1"]),
        organization=st.sampled_from([None, "Organization/org1"]),
    ),
    purpose=st.sampled_from(["TREAT", "ETREAT", "HPAYMT"]),
    now=st.just(DECIDED_AT),
)


def by_patient(
    specs: Sequence[Any], missing: str | None = None, related: Mapping[str, frozenset[str]] | None = None,
) -> dict[str, list[CompiledConsent]]:
    """Each patient's compiled consents from consent specs (tests.decision.support); a patient
    ``missing`` was not looked up; ``related``: what the consent cache read for related targets."""
    from tests.decision.support import consent_json

    compiled = [compile_consent(consent_json(spec, number)) for number, spec in enumerate(specs, 1)]
    if related is not None:
        compiled = [replace(c, related=related) for c in compiled]
    return {p: [c for c in compiled if c.patient == p] for p in PATIENTS if p != missing}
