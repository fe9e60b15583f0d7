"""The labeler reads codes where each resource type keeps them, plus contained and own labels."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.core.labels import CPT, ICD10CM, LOINC, RXNORM, SNOMED, LabelIndex
from gateway.core.model import V3_ACT_CODE, V3_CONFIDENTIALITY, Label

JSON = dict[str, Any]


def cc(system: str, code: str) -> JSON:
    return {"coding": [{"system": system, "code": code}]}


HIV_DX = cc(ICD10CM, "B20")
HIV_POSITIVE = cc(SNOMED, "165816005")
OPIOID_DX = cc(ICD10CM, "F11.20")
HYPERTENSION = cc(ICD10CM, "I10")

# (case id, resource, expected label codes)
CASES: list[tuple[str, JSON, set[str]]] = [
    ("condition-code", {"resourceType": "Condition", "code": HIV_DX}, {"HIV"}),
    ("condition-evidence", {"resourceType": "Condition", "code": HYPERTENSION, "evidence": [{"code": [HIV_POSITIVE]}]}, {"HIV"}),
    ("observation-code", {"resourceType": "Observation", "code": cc(LOINC, "7917-8")}, {"HIV"}),
    ("observation-value", {"resourceType": "Observation", "code": cc(LOINC, "8480-6"), "valueCodeableConcept": HIV_POSITIVE}, {"HIV"}),
    ("observation-component-code", {"resourceType": "Observation", "code": cc(LOINC, "58410-2"), "component": [{"code": cc(LOINC, "718-7")}, {"code": cc(LOINC, "6864-3")}]}, {"SCA"}),
    ("observation-component-value", {"resourceType": "Observation", "code": cc(LOINC, "58410-2"), "component": [{"code": cc(LOINC, "718-7"), "valueCodeableConcept": cc(SNOMED, "16402000")}]}, {"SCA"}),
    ("medicationrequest-concept", {"resourceType": "MedicationRequest", "medicationCodeableConcept": cc(RXNORM, "1999667")}, {"HIV"}),
    ("medicationrequest-reason", {"resourceType": "MedicationRequest", "medicationCodeableConcept": cc(RXNORM, "314076"), "reasonCode": [OPIOID_DX]}, {"OPIOIDUD", "42CFRPart2"}),
    ("medicationrequest-contained", {"resourceType": "MedicationRequest", "contained": [{"resourceType": "Medication", "id": "m1", "code": cc(RXNORM, "352364")}], "medicationReference": {"reference": "#m1"}}, {"OPIOIDUD", "42CFRPart2"}),
    ("medicationstatement", {"resourceType": "MedicationStatement", "medicationCodeableConcept": cc(RXNORM, "2626")}, {"PSY"}),
    ("medicationadministration", {"resourceType": "MedicationAdministration", "medicationCodeableConcept": cc(RXNORM, "744842")}, {"HIV"}),
    ("medicationdispense", {"resourceType": "MedicationDispense", "medicationCodeableConcept": cc(RXNORM, "757594")}, {"SEX"}),
    ("medication-ingredient", {"resourceType": "Medication", "ingredient": [{"itemCodeableConcept": cc(RXNORM, "42351")}]}, {"PSY"}),
    ("procedure-code", {"resourceType": "Procedure", "code": cc(CPT, "90837")}, {"PSY"}),
    ("procedure-reason", {"resourceType": "Procedure", "code": cc(SNOMED, "430193006"), "reasonCode": [cc(ICD10CM, "Z30.2")]}, {"SEX"}),
    ("diagnosticreport-code", {"resourceType": "DiagnosticReport", "code": cc(LOINC, "51969-4")}, {"GDIS"}),
    ("diagnosticreport-conclusion", {"resourceType": "DiagnosticReport", "code": cc(LOINC, "58410-2"), "conclusionCode": [cc(SNOMED, "127040003")]}, {"SCA"}),
    ("documentreference-type", {"resourceType": "DocumentReference", "type": cc(LOINC, "11510-5")}, {"PSYTHPN"}),
    ("documentreference-category", {"resourceType": "DocumentReference", "type": cc(LOINC, "11506-3"), "category": [cc(LOINC, "28627-8")]}, {"PSY"}),
    ("documentreference-event", {"resourceType": "DocumentReference", "type": cc(LOINC, "11506-3"), "context": {"event": [cc(ICD10CM, "F20.9")]}}, {"PSY"}),
    ("composition-type", {"resourceType": "Composition", "type": cc(LOINC, "11510-5")}, {"PSYTHPN"}),
    ("composition-nested-section", {"resourceType": "Composition", "type": cc(LOINC, "11506-3"), "section": [{"code": cc(LOINC, "10164-2"), "section": [{"code": cc(LOINC, "44249-1")}]}]}, {"PSY"}),
    ("encounter-reason", {"resourceType": "Encounter", "type": [cc(SNOMED, "185349003")], "reasonCode": [cc(ICD10CM, "A54.9")]}, {"STD"}),
    ("encounter-type", {"resourceType": "Encounter", "type": [cc(CPT, "90791")]}, {"PSY"}),
    ("allergyintolerance", {"resourceType": "AllergyIntolerance", "code": cc(RXNORM, "349477")}, {"HIV"}),
    ("servicerequest-code", {"resourceType": "ServiceRequest", "code": cc(CPT, "81162")}, {"GDIS"}),
    ("servicerequest-reason", {"resourceType": "ServiceRequest", "code": cc(LOINC, "58410-2"), "reasonCode": [cc(ICD10CM, "D57.00")]}, {"SCA"}),
    ("careplan-activity", {"resourceType": "CarePlan", "activity": [{"detail": {"code": cc(SNOMED, "60112009")}}]}, {"OPIOIDUD", "42CFRPart2"}),
    ("immunization-reason", {"resourceType": "Immunization", "vaccineCode": cc("http://hl7.org/fhir/sid/cvx", "140"), "reasonCode": [HIV_DX]}, {"HIV"}),
    ("familymemberhistory", {"resourceType": "FamilyMemberHistory", "condition": [{"code": cc(SNOMED, "58756001")}]}, {"GDIS"}),
    ("clinicalimpression", {"resourceType": "ClinicalImpression", "finding": [{"itemCodeableConcept": cc(ICD10CM, "F31.9")}]}, {"PSY"}),
    ("claim-diagnosis", {"resourceType": "Claim", "diagnosis": [{"diagnosisCodeableConcept": HIV_DX}]}, {"HIV"}),
    ("claim-item", {"resourceType": "Claim", "item": [{"productOrService": cc(CPT, "99408")}]}, {"SUD", "42CFRPart2"}),
    ("eob-diagnosis", {"resourceType": "ExplanationOfBenefit", "diagnosis": [{"diagnosisCodeableConcept": cc(ICD10CM, "Z33.2")}]}, {"SEX"}),
    ("questionnaireresponse", {"resourceType": "QuestionnaireResponse", "item": [{"item": [{"answer": [{"valueCoding": {"system": SNOMED, "code": "6471006"}}]}]}]}, {"PSY"}),
    ("unlisted-type-code", {"resourceType": "Basic", "code": HIV_DX}, {"HIV"}),
    ("type-without-codes", {"resourceType": "Patient", "id": "p"}, set()),
    ("bundle-unions-entries", {"resourceType": "Bundle", "entry": [{"resource": {"resourceType": "Condition", "code": HIV_DX}}, {"resource": {"resourceType": "Condition", "code": OPIOID_DX}}]}, {"HIV", "OPIOIDUD", "42CFRPart2"}),
    ("two-codings-union", {"resourceType": "Condition", "code": {"coding": [*HIV_DX["coding"], *OPIOID_DX["coding"]]}}, {"HIV", "OPIOIDUD", "42CFRPart2"}),
    ("bare-coding-accepted", {"resourceType": "QuestionnaireResponse", "item": [{"answer": [{"valueCoding": {"system": ICD10CM, "code": "Z21"}}]}]}, {"HIV"}),
    ("consent-provision-code", {"resourceType": "Consent", "provision": {"type": "permit", "provision": [{"type": "deny", "code": [HIV_DX]}, {"type": "deny", "provision": [{"code": [OPIOID_DX]}]}]}}, {"HIV", "OPIOIDUD", "42CFRPart2"}),
    ("consent-provision-ordinary-code", {"resourceType": "Consent", "provision": {"type": "deny", "code": [HYPERTENSION]}}, set()),
    ("garbage-tolerated", {"resourceType": "Condition", "code": {"coding": ["B20", {"system": ICD10CM, "code": 20}, None]}, "contained": "x"}, set()),
]


@pytest.mark.parametrize(("resource", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_labels_where_codes_live(index: LabelIndex, resource: JSON, expected: set[str]) -> None:
    assert {label.code for label in index.labels_for(resource)} == expected


def test_meta_security_is_kept_and_unioned(index: LabelIndex) -> None:
    resource = {
        "resourceType": "Condition",
        "meta": {"security": [{"system": V3_ACT_CODE, "code": "PSY"}, {"system": V3_CONFIDENTIALITY, "code": "N"}]},
        "code": HIV_DX,
    }
    assert index.labels_for(resource) == {
        Label(V3_ACT_CODE, "PSY"),
        Label(V3_CONFIDENTIALITY, "N"),
        Label(V3_ACT_CODE, "HIV"),
    }


def test_contained_resource_meta_security_counts(index: LabelIndex) -> None:
    resource = {
        "resourceType": "DiagnosticReport",
        "contained": [{"resourceType": "Observation", "meta": {"security": [{"system": V3_ACT_CODE, "code": "SUD"}]}}],
    }
    assert index.labels_for(resource) == {Label(V3_ACT_CODE, "SUD")}


@pytest.mark.parametrize("code", ["R", "V"])
def test_restricted_documents_are_sensitive(index: LabelIndex, code: str) -> None:
    doc = {"resourceType": "DocumentReference", "securityLabel": [cc(V3_CONFIDENTIALITY, code)]}
    comp = {"resourceType": "Composition", "confidentiality": code}
    assert index.labels_for(doc) == {Label(V3_CONFIDENTIALITY, code)}
    assert index.labels_for(comp) == {Label(V3_CONFIDENTIALITY, code)}
    assert code in index.sensitive


def test_normal_confidentiality_is_not_sensitive(index: LabelIndex) -> None:
    comp = {"resourceType": "Composition", "confidentiality": "N"}
    assert {label.code for label in index.labels_for(comp)} == {"N"}
    assert "N" not in index.sensitive


def test_labels_do_not_depend_on_coding_order(index: LabelIndex) -> None:
    codings = [*HIV_DX["coding"], *OPIOID_DX["coding"], *cc(SNOMED, "58756001")["coding"]]
    forward = {"resourceType": "Condition", "code": {"coding": codings}}
    backward = {"resourceType": "Condition", "code": {"coding": codings[::-1]}}
    assert index.labels_for(forward) == index.labels_for(backward)
    assert index.explain(forward) == index.explain(backward)


def test_explain_reports_own_labels_by_element(index: LabelIndex) -> None:
    doc = {"resourceType": "DocumentReference", "securityLabel": [cc(V3_CONFIDENTIALITY, "R")], "meta": {"security": [{"system": V3_ACT_CODE, "code": "HIV"}]}}
    assert index.explain(doc) == [
        (Label(V3_ACT_CODE, "HIV"), "meta.security"),
        (Label(V3_CONFIDENTIALITY, "R"), "DocumentReference.securityLabel"),
    ]


def test_labels_for_does_not_change_the_resource(index: LabelIndex) -> None:
    resource = {"resourceType": "Condition", "code": HIV_DX}
    before = repr(resource)
    index.labels_for(resource)
    index.explain(resource)
    assert repr(resource) == before
