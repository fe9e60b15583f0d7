"""Red team 7: NDC, ICD-10-CM and RxNorm codes as pharmacy and entry systems write them.

The FDA's NDC Directory writes the missing digit of a 5-3-2 or 5-4-1 code as an asterisk
(``50383-*924-93``, ``12496-1208-*3``); pharmacy systems copy it, or separate the segments with
blanks. Codes typed through an East Asian input method arrive in full-width digits
(``１２４９６-１２０８-０３``, ``Ｆ１１.２０``). Each names the same product or diagnosis, so
each labels the resource as the plain spelling does, and a consent's ``code`` condition meets
it however either side writes it. Codes: NDC 12496-1208 (Suboxone film) and 50383-924
(buprenorphine HCl 2 mg, Hi-Tech), Opioid Data Lab MAT list; RxNorm 1010601 (Suboxone SBDC);
ICD-10-CM F11.20 (opioid dependence, uncomplicated).
"""

from __future__ import annotations

from typing import Any

import pytest

from gateway.core.compartment import all_codes
from gateway.core.labels import ICD10CM, NDC, RXNORM, LabelIndex, code_spellings, ndc_package, ndc_products
from gateway.rules import load_rules

OUD = {"OPIOIDUD", "42CFRPart2"}


@pytest.fixture(scope="module")
def index() -> LabelIndex:
    return load_rules()


def labels(index: LabelIndex, system: str | None, code: str) -> set[str]:
    coding: dict[str, Any] = {"code": code} | ({"system": system} if system is not None else {})
    resource = {"resourceType": "MedicationDispense", "status": "completed", "medicationCodeableConcept": {"coding": [coding]}}
    return {label.code for label in index.labels_for(resource)}


SPELLINGS = [
    ("asterisk-5-3-2", NDC, "50383-*924-93"),
    ("asterisk-5-4-1", NDC, "12496-1208-*3"),
    ("asterisk-11-digits", NDC, "50383*92493"),
    ("blanks-between-segments", NDC, "12496 1208 03"),
    ("blanks-around-hyphens", NDC, "12496 - 1208 - 03"),
    ("full-width-digits", NDC, "１２４９６-１２０８-０３"),
    ("full-width-hyphens", NDC, "12496－1208－03"),
    ("tab-and-newline-around", NDC, "\t12496-1208-03\n"),
    ("no-system-asterisk", None, "50383-*924-93"),
    ("rxnorm-full-width", RXNORM, "１０１０６０１"),
    ("icd-full-width", ICD10CM, "Ｆ１１.２０"),
    ("icd-no-system-full-width-lower", None, "ｆ１１．２０"),
    ("icd-no-system-lower", None, "f11.20"),
]


@pytest.mark.parametrize(("system", "code"), [s[1:] for s in SPELLINGS], ids=[s[0] for s in SPELLINGS])
def test_each_spelling_labels_as_the_plain_one(index: LabelIndex, system: str | None, code: str) -> None:
    assert labels(index, system, code) >= OUD


MISSES = [
    ("gabapentin-with-asterisk", NDC, "00182-2719-*1"),
    ("gabapentin-full-width", NDC, "００１８２-２７１９-０１"),
    ("letters-between-blanks", NDC, "12496 12O8 03"),
]


@pytest.mark.parametrize(("system", "code"), [s[1:] for s in MISSES], ids=[s[0] for s in MISSES])
def test_other_shapes_still_label_nothing(index: LabelIndex, system: str | None, code: str) -> None:
    assert labels(index, system, code) == set()


def test_the_normalised_forms() -> None:
    assert ndc_products("50383-*924-93") == ndc_products("50383-924-93") == ("503830924",)
    assert ndc_products("12496-1208-*3") == ndc_products("１２４９６-１２０８-０３") == ("124961208",)
    assert ndc_package("12496-1208-*3") == "12496120803"


def test_a_consent_code_meets_the_code_however_either_side_writes_it() -> None:
    consent = code_spellings(frozenset({(NDC, "12496-1208-3")}))
    for written in ("12496-1208-*3", "12496 1208 03", "１２４９６-１２０８-０３"):
        assert consent & code_spellings(frozenset({(NDC, written)})), written
    assert code_spellings(frozenset({(RXNORM, "1010601")})) & code_spellings(frozenset({(RXNORM, "１０１０６０１")}))
    assert code_spellings(frozenset({(ICD10CM, "F11.20")})) & code_spellings(frozenset({(ICD10CM, "Ｆ１１.２０")}))


# ------------------------------------------------------------------ codes in extensions

F11 = {"system": ICD10CM, "code": "F11.20"}
EXTENSION = [{"url": "http://example.org/fhir/StructureDefinition/finding", "valueCodeableConcept": {"coding": [F11]}}]
CONDITION = {"resourceType": "Condition", "subject": {"reference": "Patient/p"}}
PLAIN = {"system": "http://snomed.info/sct", "code": "38341003"}  # hypertensive disorder

EXTENSION_PLACES = [
    ("modifier-extension-on-a-coding", {**CONDITION, "code": {"coding": [{**PLAIN, "modifierExtension": EXTENSION}]}}),
    ("modifier-extension-on-a-code-element", {**CONDITION, "code": {"coding": [PLAIN], "modifierExtension": EXTENSION}}),
    ("modifier-extension-on-an-extension-value",
     {**CONDITION, "extension": [{"url": "u", "valueCodeableConcept": {"text": "x", "modifierExtension": EXTENSION}}]}),
]


@pytest.mark.parametrize("resource", [p[1] for p in EXTENSION_PLACES], ids=[p[0] for p in EXTENSION_PLACES])
def test_codes_in_every_extension_a_code_element_carries_label(index: LabelIndex, resource: dict[str, Any]) -> None:
    assert {label.code for label in index.labels_for(resource)} >= OUD


VALUE_CODE_PLACES = [
    ("on-the-resource", {**CONDITION, "extension": [{"url": "u", "valueCode": "F11.20"}]}),
    ("nested", {**CONDITION, "extension": [{"url": "u", "extension": [{"url": "v", "valueCode": "f11.20"}]}]}),
    ("modifier-extension", {**CONDITION, "modifierExtension": [{"url": "u", "valueCode": "F11.20"}]}),
    ("on-a-code-element", {**CONDITION, "code": {"coding": [PLAIN], "extension": [{"url": "u", "valueCode": "F11.20"}]}}),
    ("on-a-coding", {**CONDITION, "code": {"coding": [{**PLAIN, "extension": [{"url": "u", "valueCode": "F11.20"}]}]}}),
    ("on-a-backbone-element", {"resourceType": "Observation", "subject": {"reference": "Patient/p"}, "code": {"text": "x"},
                               "component": [{"code": {"text": "y"}, "extension": [{"url": "u", "valueCode": "F11.20"}]}]}),
    ("an-ndc-package", {**CONDITION, "extension": [{"url": "u", "valueCode": "12496-1208-03"}]}),
]


@pytest.mark.parametrize("resource", [p[1] for p in VALUE_CODE_PLACES], ids=[p[0] for p in VALUE_CODE_PLACES])
def test_a_value_code_spelled_as_icd_10_cm_labels(index: LabelIndex, resource: dict[str, Any]) -> None:
    """An extension's valueCode has no system (its definition gives it): read as a Coding
    without one, a dotted ICD-10-CM (or hyphenated NDC) spelling labels as it does there."""
    assert {label.code for label in index.labels_for(resource)} >= OUD


def test_a_consent_code_condition_meets_an_extensions_value_code() -> None:
    """``provision.code``: "found in an instance" reads the valueCode as the labels do."""
    consent = code_spellings(frozenset({(ICD10CM, "F11.20")}))
    for _, resource in VALUE_CODE_PLACES[:5]:
        assert consent & all_codes(resource), resource


# Ordinary valueCodes (US Core, FHIR core extensions): statuses, genders, languages, units,
# dotted version numbers and bare numbers that are no ICD-10-CM code.
ORDINARY_VALUE_CODES = ["final", "male", "F", "M", "UNK", "en-US", "es", "2106-3", "active", "mg", "1.0", "4.0.1",
                        "B20", "F1120", "864706", "12.3", "v2.11", "A1.1.1"]


@pytest.mark.parametrize("code", ORDINARY_VALUE_CODES)
def test_an_ordinary_value_code_labels_nothing(index: LabelIndex, code: str) -> None:
    resource = {**CONDITION, "code": {"coding": [PLAIN]}, "extension": [{"url": "u", "valueCode": code}]}
    assert {label.code for label in index.labels_for(resource)} == set()


STRAY_PLACES = [
    ("note", {**CONDITION, "code": {"coding": [PLAIN]}, "note": [{"text": "see extension", "extension": EXTENSION}]}),
    ("body-site", {**CONDITION, "code": {"coding": [PLAIN]}, "bodySite": [{"text": "arm", "extension": EXTENSION}]}),
    ("deep-in-a-dosage", {"resourceType": "MedicationRequest", "subject": {"reference": "Patient/p"},
                          "medicationCodeableConcept": {"text": "x"},
                          "dosageInstruction": [{"timing": {"repeat": {"frequency": 1, "extension": EXTENSION}}}]}),
    ("value-code-on-a-note", {**CONDITION, "note": [{"text": "x", "extension": [{"url": "u", "valueCode": "F11.20"}]}]}),
    ("modifier-extension-on-a-reference", {**CONDITION, "asserter": {"reference": "Practitioner/x", "modifierExtension": EXTENSION}}),
    ("in-a-contained-resource", {**CONDITION, "contained": [{"resourceType": "Observation", "id": "o",
                                                           "note": [{"text": "x", "extension": EXTENSION}]}]}),
]


@pytest.mark.parametrize("resource", [p[1] for p in STRAY_PLACES], ids=[p[0] for p in STRAY_PLACES])
def test_an_extension_off_the_code_paths_labels(index: LabelIndex, resource: dict[str, Any]) -> None:
    """An extension on any element codes the record: read on the elements off the code paths
    too (``stray_labels``), where the answer's text holds an extension at all."""
    assert {label.code for label in index.labels_for(resource)} >= OUD
    assert {label.code for label in index.stray_labels(resource)} >= OUD


def test_an_ordinary_extension_off_the_code_paths_labels_nothing(index: LabelIndex) -> None:
    resource = {**CONDITION, "code": {"coding": [PLAIN]}, "note": [{"text": "x", "extension": [
        {"url": "u", "valueCode": "final"}, {"url": "v", "valueCodeableConcept": {"coding": [PLAIN]}},
        {"url": "w", "valueString": "F11.20"}]}]}
    assert index.labels_for(resource) == frozenset()


# ------------------------------------------------------------------ system spellings

SYSTEMS = [
    ("canonical-with-version", "http://hl7.org/fhir/sid/icd-10-cm|2024"),
    ("bare-oid", "2.16.840.1.113883.6.90"),
    ("bare-oid-with-version", "2.16.840.1.113883.6.90|2024"),
]


@pytest.mark.parametrize("system", [s[1] for s in SYSTEMS], ids=[s[0] for s in SYSTEMS])
def test_a_known_system_written_with_a_version_or_as_a_bare_oid_is_known(index: LabelIndex, system: str) -> None:
    """``uri|version`` is how a canonical names a version (senders copy it into Coding.system),
    and CDA-derived data writes OIDs without ``urn:oid:``."""
    assert labels(index, None, "x") == set()
    resource = {"resourceType": "Condition", "code": {"coding": [{"system": system, "code": "F11.20"}]}}
    assert {label.code for label in index.labels_for(resource)} >= OUD
    assert code_spellings(frozenset({(system, "F11.20")})) & code_spellings(frozenset({(ICD10CM, "F1120")}))
