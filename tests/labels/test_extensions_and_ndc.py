"""Codes in extensions, NDC spellings, RxNorm components and system spellings: each place and
spelling a real system sends labels the resource as the main code would, and ordinary codes in
the same places label nothing.

Codes used: NDC 12496-1208 (Suboxone 8 mg/2 mg film), 0054-0176 (buprenorphine HCl 2 mg, West-Ward),
50383-924 (buprenorphine HCl 2 mg, Hi-Tech) from the Opioid Data Lab MAT list; 65757-0300 (Vivitrol)
and 12496-0100 (Sublocade 100 mg) from the CMS CCW OUD NDCs; 00182-2719 (Gabarone, gabapentin 300 mg)
from the Opioid Data Lab gabapentin list; RxNorm 1010601 (SBDC) and 1996186 (SBDC), 1010599 (SCDF)
and 1431077 (BN Zubsolv) from VSAC 2.16.840.1.113762.1.4.1200.14.
"""

from __future__ import annotations

from typing import Any

import pytest

from gateway.core.labels import (
    ICD10CM,
    LOINC,
    NDC,
    RXNORM,
    SNOMED,
    LabelIndex,
    RuleDataError,
    canonical_system,
    code_spellings,
    ndc_package,
    ndc_products,
)

JSON = dict[str, Any]
OUD = {"OPIOIDUD", "42CFRPart2"}
SUD = {"SUD", "42CFRPart2"}
DUE_TO = "http://hl7.org/fhir/StructureDefinition/condition-dueTo"
OCCURRED_FOLLOWING = "http://hl7.org/fhir/StructureDefinition/condition-occurredFollowing"


def cc(system: str | None, code: str) -> JSON:
    coding: JSON = {"code": code}
    if system is not None:
        coding["system"] = system
    return {"coding": [coding]}


def labels(index: LabelIndex, resource: JSON) -> set[str]:
    return {label.code for label in index.labels_for(resource)}


def dispense(system: str | None, code: str) -> JSON:
    return {"resourceType": "MedicationDispense", "status": "completed", "medicationCodeableConcept": cc(system, code)}


# ------------------------------------------------------------------ NDC spellings

NDC_SPELLINGS = [
    ("11-digit-5-4-2", NDC, "12496120803"),
    ("hyphenated-5-4-2", NDC, "12496-1208-03"),
    ("hyphenated-5-4-1", NDC, "12496-1208-3"),
    ("product-5-4", NDC, "12496-1208"),
    ("product-9-digits", NDC, "124961208"),
    ("another-package-of-the-product", NDC, "12496-1208-05"),
    ("10-digits-unhyphenated", NDC, "1249612083"),
    ("hyphenated-4-4-2", NDC, "0054-0176-13"),
    ("product-4-4", NDC, "0054-0176"),
    ("hyphenated-5-3-2", NDC, "50383-924-93"),
    ("product-5-3", NDC, "50383-924"),
    ("oid-system", "urn:oid:2.16.840.1.113883.6.69", "12496120803"),
    ("system-with-slash-and-https", "https://hl7.org/fhir/sid/ndc/", "12496-1208-03"),
    ("surrounding-blanks", NDC, " 12496-1208-03 "),
    ("no-system-hyphenated-package", None, "12496-1208-3"),
]


@pytest.mark.parametrize(("system", "code"), [s[1:] for s in NDC_SPELLINGS], ids=[s[0] for s in NDC_SPELLINGS])
def test_each_ndc_spelling_of_a_moud_product_is_part2(index: LabelIndex, system: str | None, code: str) -> None:
    assert labels(index, dispense(system, code)) == OUD


def test_naltrexone_ndc_is_sud_and_sublocade_ndc_is_opioid(index: LabelIndex) -> None:
    assert labels(index, dispense(NDC, "65757-0300-01")) == SUD  # Vivitrol: alcohol and opioid use disorder
    assert labels(index, dispense(NDC, "12496-0100-01")) == OUD  # Sublocade 100 mg


NDC_MISSES = [
    ("gabapentin", NDC, "00182271901"),
    ("gabapentin-hyphenated", NDC, "0182-2719-01"),
    ("bad-layout", NDC, "124-96120-803"),
    ("letters", NDC, "12496-12O8-03"),
    ("too-long", NDC, "124961208031"),
    ("no-system-11-digits", None, "12496120803"),  # digits alone could be any system's
    ("no-system-product", None, "12496-1208"),  # LOINC-like shapes are not read as NDC
    ("ndc-under-rxnorm", RXNORM, "12496120803"),
]


@pytest.mark.parametrize(("system", "code"), [s[1:] for s in NDC_MISSES], ids=[s[0] for s in NDC_MISSES])
def test_other_ndcs_and_other_shapes_label_nothing(index: LabelIndex, system: str | None, code: str) -> None:
    assert labels(index, dispense(system, code)) == set()


def test_ndc_normalisation() -> None:
    assert ndc_products("0054-0176-13") == ("000540176",)
    assert ndc_products("50383-924-93") == ("503830924",)
    assert ndc_products("12496-1208-3") == ndc_products("12496-1208-03") == ndc_products("12496120803") == ("124961208",)
    assert set(ndc_products("1249612083")) == {"012496120", "124960120", "124961208"}
    assert ndc_products("１２４９６-１２０８-０３") == ("124961208",)  # full-width digits, as typed
    assert ndc_package("12496-1208-3") == "12496120803"
    assert ndc_package("0054-0176-13") == "00054017613"
    assert ndc_package("12496-1208") is None and ndc_package("1249612083") is None


def test_a_consent_code_names_an_ndc_however_either_side_writes_it() -> None:
    consent = code_spellings(frozenset({(NDC, "12496-1208-3")}))
    for written in ("12496120803", "12496-1208-03", "12496-1208"):
        assert consent & code_spellings(frozenset({("urn:oid:2.16.840.1.113883.6.69", written)})), written
    assert not consent & code_spellings(frozenset({(NDC, "00182271901")}))


# ------------------------------------------------------------------ pharmacy resources

def test_carin_pharmacy_claim_and_medication_code_by_ndc(index: LabelIndex) -> None:
    claim = {"resourceType": "ExplanationOfBenefit", "use": "claim", "item": [
        {"sequence": 1, "productOrService": cc(NDC, "12496120803")}]}
    assert labels(index, claim) == OUD
    detail = {"resourceType": "ExplanationOfBenefit", "use": "claim", "item": [
        {"sequence": 1, "productOrService": cc(None, "compound"), "detail": [{"sequence": 1, "productOrService": cc(NDC, "0054-0176-13")}]}]}
    assert labels(index, detail) == OUD
    assert labels(index, {"resourceType": "Medication", "code": cc(NDC, "12496-1208")}) == OUD
    order = {"resourceType": "MedicationRequest", "contained": [{"resourceType": "Medication", "id": "m", "code": cc(NDC, "12496-1208-3")}],
             "medicationReference": {"reference": "#m"}}
    assert labels(index, order) == OUD


# ------------------------------------------------------------------ RxNorm components and forms

RXNORM_CONCEPTS = [
    ("sbdc-suboxone-1010601", "1010601"),
    ("sbdc-sublocade-1996186", "1996186"),
    ("scdf-buprenorphine-naloxone-strip-1010599", "1010599"),
    ("bn-zubsolv-1431077", "1431077"),
    ("scdc-buprenorphine-8mg-353391", "353391"),
    ("sbdf-methadose-368846", "368846"),
]


@pytest.mark.parametrize("code", [r[1] for r in RXNORM_CONCEPTS], ids=[r[0] for r in RXNORM_CONCEPTS])
def test_moud_named_by_component_form_or_brand_is_part2(index: LabelIndex, code: str) -> None:
    statement = {"resourceType": "MedicationStatement", "status": "active", "medicationCodeableConcept": cc(RXNORM, code)}
    assert labels(index, statement) == OUD


@pytest.mark.parametrize("code", ["1819", "1716054", "1716059", "904872"],
                         ids=["in-buprenorphine", "scdc-belbuca-strength", "sbdc-belbuca", "sbdc-butrans"])
def test_buprenorphine_pain_components_stay_unlabeled(index: LabelIndex, code: str) -> None:
    statement = {"resourceType": "MedicationStatement", "status": "active", "medicationCodeableConcept": cc(RXNORM, code)}
    assert labels(index, statement) == set()


# ------------------------------------------------------------------ extensions

def ext(url: str, value: JSON, key: str = "valueCodeableConcept") -> JSON:
    return {"url": url, key: value}


HIV = cc(ICD10CM, "B20")
HIV_CODING = {"system": ICD10CM, "code": "B20"}
PNEUMOCYSTOSIS = cc(ICD10CM, "B59")

EXTENSION_PLACES: list[tuple[str, JSON]] = [
    ("condition-dueTo", {"resourceType": "Condition", "code": PNEUMOCYSTOSIS, "extension": [ext(DUE_TO, HIV)]}),
    ("condition-occurredFollowing-coding", {"resourceType": "Condition", "code": PNEUMOCYSTOSIS,
                                            "extension": [ext(OCCURRED_FOLLOWING, HIV_CODING, "valueCoding")]}),
    ("modifierExtension", {"resourceType": "Condition", "code": PNEUMOCYSTOSIS,
                           "modifierExtension": [ext("http://example.org/fhir/StructureDefinition/m", HIV)]}),
    ("nested-three-deep", {"resourceType": "Procedure", "code": cc(SNOMED, "71388002"), "extension": [
        {"url": "http://example.org/a", "extension": [{"url": "b", "extension": [ext("c", HIV)]}]}]}),
    ("nested-modifier-in-extension", {"resourceType": "Procedure", "code": cc(SNOMED, "71388002"), "extension": [
        {"url": "http://example.org/a", "modifierExtension": [ext("b", HIV)]}]}),
    ("unknown-type-extension", {"resourceType": "NutritionOrder", "extension": [ext(DUE_TO, HIV)]}),
    ("in-the-code-element", {"resourceType": "Condition", "code": {**cc(SNOMED, "233604007"),
                                                                   "extension": [ext("http://example.org/original", HIV_CODING, "valueCoding")]}}),
    ("in-a-coding", {"resourceType": "Condition", "code": {"coding": [
        {"system": SNOMED, "code": "233604007", "extension": [ext("http://example.org/translation", HIV)]}]}}),
    ("in-a-reason-code", {"resourceType": "Encounter", "reasonCode": [{"text": "follow-up", "extension": [ext("http://example.org/r", HIV)]}]}),
    ("in-a-medication-concept", {"resourceType": "MedicationDispense", "medicationCodeableConcept": {
        "text": "film", "extension": [ext("http://example.org/ndc", {"system": NDC, "code": "12496-1208-3"}, "valueCoding")]}}),
    ("in-a-component-backbone", {"resourceType": "Observation", "code": cc(LOINC, "11502-2"), "component": [
        {"code": cc(LOINC, "718-7"), "extension": [ext("http://example.org/c", HIV)]}]}),
    ("in-a-component-modifier", {"resourceType": "Observation", "code": cc(LOINC, "11502-2"), "component": [
        {"code": cc(LOINC, "718-7"), "modifierExtension": [{"url": "http://example.org/c", "extension": [ext("x", HIV)]}]}]}),
    ("in-an-eob-item", {"resourceType": "ExplanationOfBenefit", "item": [
        {"sequence": 1, "productOrService": cc(None, "x"), "extension": [ext("http://example.org/rx", HIV)]}]}),
    ("in-the-value-concept", {"resourceType": "Observation", "code": cc(LOINC, "11450-4"),
                              "valueCodeableConcept": {"text": "problem", "extension": [ext("http://example.org/v", HIV)]}}),
    ("in-a-contained-resource", {"resourceType": "MedicationRequest", "contained": [
        {"resourceType": "Condition", "id": "c", "extension": [ext(DUE_TO, HIV)]}]}),
    ("system-less-icd-in-extension", {"resourceType": "Condition", "code": PNEUMOCYSTOSIS,
                                      "extension": [ext(DUE_TO, {"code": "B20.1"}, "valueCoding")]}),
]


@pytest.mark.parametrize("resource", [p[1] for p in EXTENSION_PLACES], ids=[p[0] for p in EXTENSION_PLACES])
def test_a_code_in_an_extension_labels_the_resource(index: LabelIndex, resource: JSON) -> None:
    expected = OUD if resource["resourceType"] == "MedicationDispense" else {"HIV"}
    assert labels(index, resource) == expected


def test_an_extension_with_an_ordinary_code_labels_nothing(index: LabelIndex) -> None:
    hypertension = cc(ICD10CM, "I10")
    for resource in (
        {"resourceType": "Condition", "code": cc(ICD10CM, "I12.9"), "extension": [ext(DUE_TO, hypertension)]},
        {"resourceType": "Condition", "code": {**cc(ICD10CM, "I12.9"), "extension": [ext("http://example.org/o", hypertension)]}},
        {"resourceType": "Observation", "code": cc(LOINC, "718-7"), "component": [
            {"code": cc(LOINC, "718-7"), "extension": [ext("http://example.org/c", cc(SNOMED, "38341003"))]}]},
        # text is no code; a valueCode is read as a coding without a system, and a bare B20 is
        # no ICD-10-CM spelling (tests/unit/test_red_team_7_labels.py: a dotted F11.20 labels)
        {"resourceType": "Condition", "code": cc(ICD10CM, "I10"), "extension": [
            {"url": "http://example.org/a", "valueString": "F11.20"}, {"url": "http://example.org/b", "valueCode": "B20"}]},
    ):
        assert labels(index, resource) == set(), resource


def test_explain_names_the_rule_behind_an_extension_code(index: LabelIndex) -> None:
    resource = {"resourceType": "Condition", "code": PNEUMOCYSTOSIS, "extension": [ext(DUE_TO, HIV)]}
    assert any("B20" in why for label, why in index.explain(resource) if label.code == "HIV")


# ------------------------------------------------------------------ system spellings

SYSTEM_SPELLINGS = [
    ("icd-trailing-slash", "Condition", "code", "http://hl7.org/fhir/sid/icd-10-cm/", "F11.20", OUD),
    ("icd-https", "Condition", "code", "https://hl7.org/fhir/sid/icd-10-cm", "F11.20", OUD),
    ("rxnorm-case-and-slash", "MedicationStatement", "medicationCodeableConcept",
     "http://www.nlm.nih.gov/research/umls/RxNorm/", "1010603", OUD),
    ("rxnorm-without-www", "MedicationStatement", "medicationCodeableConcept", "http://nlm.nih.gov/research/umls/rxnorm", "1010603", OUD),
    ("snomed-edition-uri", "Condition", "code", "http://snomed.info/sct/731000124108", "86406008", {"HIV"}),
    ("loinc-https", "Observation", "code", "https://loinc.org", "20447-9", {"HIV"}),
    ("icd-no-system-dotted", "Condition", "code", None, "F11.20", OUD),
    ("icd-empty-system-dotted", "Condition", "code", "", "f11.20", OUD),
]


@pytest.mark.parametrize(("rtype", "element", "system", "code", "expected"), [s[1:] for s in SYSTEM_SPELLINGS],
                         ids=[s[0] for s in SYSTEM_SPELLINGS])
def test_a_known_system_however_spelled(
    index: LabelIndex, rtype: str, element: str, system: str | None, code: str, expected: set[str]
) -> None:
    assert labels(index, {"resourceType": rtype, element: cc(system, code)}) == expected


@pytest.mark.parametrize("system", ["http://example.org/icd-10-cm", "http://snomed.info/sct/abc", "urn:oid:2.16.840.1.113883.6.9"])
def test_other_systems_are_not_read_as_known_ones(index: LabelIndex, system: str) -> None:
    assert canonical_system(system) is None
    assert labels(index, {"resourceType": "Condition", "code": cc(system, "F11.20")}) == set()


def test_system_less_codes_only_when_the_shape_is_icd_or_ndc(index: LabelIndex) -> None:
    for code in ("B20", "86406008", "1010603", "20447-9"):
        assert labels(index, {"resourceType": "Condition", "code": cc(None, code)}) == set(), code


# ------------------------------------------------------------------ NDC rule codes

SCOPES = {"kind": "scopes", "sensitivity": {"NORMAL": []}, "resource": {"DRUGS": ["MedicationDispense"]}}


def ndc_rules(*codes: str) -> dict[str, Any]:
    return {"sud.yaml": {"kind": "category", "category": "substance-use", "sets": [
        {"name": "MOUD by NDC", "source": "test", "system": "ndc", "labels": ["OPIOIDUD", "42CFRPart2"],
         "codes": [{code: "buprenorphine"} for code in codes]}]}, "scopes.yaml": SCOPES}


def test_rule_files_may_write_an_ndc_in_any_layout_that_settles_it() -> None:
    index = LabelIndex.from_documents(ndc_rules("12496120803", "0054-0176-13", "50383-924", "124960100"))
    for code in ("12496-1208-3", "00054017613", "50383-0924-93", "12496-0100-05"):
        assert labels(index, dispense(NDC, code)) == OUD, code


@pytest.mark.parametrize("code", ["1249612083", "12496-12080-3", "ndc", "1249612"])
def test_a_rule_ndc_that_names_no_single_product_is_refused(code: str) -> None:
    with pytest.raises(RuleDataError, match=rf"sud.yaml: sets\[1\] \(MOUD by NDC\) {code}: bad NDC code"):
        LabelIndex.from_documents(ndc_rules(code))


def test_one_package_written_twice_is_a_duplicate() -> None:
    with pytest.raises(RuleDataError, match="duplicate code"):
        LabelIndex.from_documents(ndc_rules("12496120803", "12496-1208-3"))


def test_extensions_nested_deeper_than_the_stack_still_label(index: LabelIndex) -> None:
    value: JSON = HIV
    for _ in range(3000):
        value = {"text": "x", "extension": [ext("http://example.org/wrap", value)]}
    assert labels(index, {"resourceType": "Condition", "code": value}) == {"HIV"}
    chain: JSON = ext(DUE_TO, HIV)
    for _ in range(3000):
        chain = {"url": "http://example.org/wrap", "extension": [chain]}
    assert labels(index, {"resourceType": "Condition", "extension": [chain]}) == {"HIV"}
