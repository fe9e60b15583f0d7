"""Vendor scopes: HealthEx sensitivity scopes -> labels, resource scopes -> resource types."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.core.labels import LabelIndex
from gateway.core.model import V3_ACT_CODE, Label

HEALTHEX_RESOURCE_SCOPES = {
    "CONTACT_INFO", "MEDICATIONS", "ALLERGIES", "DIAGNOSES", "LABS", "DEMOGRAPHICS", "CLINICAL_NOTES",
    "VISITS", "DIAGNOSTIC_REPORTS", "CLINICAL_VITALS", "PROCEDURES", "IMMUNIZATIONS", "IMAGING",
    "TREATMENT_PLAN", "GENOMIC_DATA", "FAMILY_HISTORY", "SOCIAL_HISTORY", "ADMINISTRATIVE_AND_BILLING",
}
HEALTHEX_SENSITIVITY_SCOPES = {
    "NORMAL", "HIV_OR_STI", "SUBSTANCE_USE_OR_DRUG_ABUSE", "MENTAL_HEALTH", "GENETIC_TESTING",
    "REPRODUCTIVE_HEALTH_DATA", "PSYCHOTHERAPY_NOTES", "SUD_PART_2", "SICKLE_CELL",
}
OBS = "http://terminology.hl7.org/CodeSystem/observation-category"
V2_0074 = "http://terminology.hl7.org/CodeSystem/v2-0074"


def _typed(rtype: str, system: str = "", category: str = "") -> dict[str, Any]:
    resource: dict[str, Any] = {"resourceType": rtype}
    if category:
        resource["category"] = [{"coding": [{"system": system, "code": category}]}]
    return resource


def test_every_healthex_resource_scope_is_mapped(index: LabelIndex) -> None:
    assert index.resource_scope_names == HEALTHEX_RESOURCE_SCOPES


def test_every_healthex_sensitivity_scope_is_mapped(index: LabelIndex) -> None:
    assert index.sensitivity_scope_names == HEALTHEX_SENSITIVITY_SCOPES


SCOPE_CASES = [
    (_typed("Observation", OBS, "laboratory"), {"LABS"}),
    (_typed("Observation", OBS, "vital-signs"), {"CLINICAL_VITALS"}),
    (_typed("Observation", OBS, "social-history"), {"SOCIAL_HISTORY"}),
    (_typed("Observation", OBS, "imaging"), {"IMAGING"}),
    (_typed("Observation", OBS, "survey"), set()),
    (_typed("Observation"), set()),
    (_typed("DiagnosticReport", V2_0074, "LAB"), {"LABS", "DIAGNOSTIC_REPORTS"}),
    (_typed("DiagnosticReport", V2_0074, "RAD"), {"IMAGING", "DIAGNOSTIC_REPORTS"}),
    (_typed("DiagnosticReport", V2_0074, "GE"), {"GENOMIC_DATA", "DIAGNOSTIC_REPORTS"}),
    (_typed("Patient"), {"CONTACT_INFO", "DEMOGRAPHICS"}),
    (_typed("MedicationRequest"), {"MEDICATIONS"}),
    (_typed("MedicationDispense"), {"MEDICATIONS"}),
    (_typed("AllergyIntolerance"), {"ALLERGIES"}),
    (_typed("Condition"), {"DIAGNOSES"}),
    (_typed("DocumentReference"), {"CLINICAL_NOTES"}),
    (_typed("Encounter"), {"VISITS"}),
    (_typed("Procedure"), {"PROCEDURES"}),
    (_typed("Immunization"), {"IMMUNIZATIONS"}),
    (_typed("ImagingStudy"), {"IMAGING"}),
    (_typed("CarePlan"), {"TREATMENT_PLAN"}),
    (_typed("MolecularSequence"), {"GENOMIC_DATA"}),
    (_typed("FamilyMemberHistory"), {"FAMILY_HISTORY"}),
    (_typed("ExplanationOfBenefit"), {"ADMINISTRATIVE_AND_BILLING"}),
    (_typed("Practitioner"), set()),
    ({"no": "type"}, set()),
]


@pytest.mark.parametrize(("resource", "expected"), SCOPE_CASES, ids=[f"{r.get('resourceType')}-{i}" for i, (r, _) in enumerate(SCOPE_CASES)])
def test_scopes_for(index: LabelIndex, resource: dict[str, Any], expected: set[str]) -> None:
    assert index.scopes_for(resource) == expected


def test_scope_categories_read_every_coding(index: LabelIndex) -> None:
    obs = {"resourceType": "Observation", "category": [{"coding": [{"system": OBS, "code": "exam"}, {"system": OBS, "code": "vital-signs"}]}]}
    assert index.scopes_for(obs) == {"CLINICAL_VITALS"}


@pytest.mark.parametrize(
    ("scope", "first"),
    [
        ("HIV_OR_STI", "HIV"),
        ("SUBSTANCE_USE_OR_DRUG_ABUSE", "ETH"),
        ("MENTAL_HEALTH", "PSY"),
        ("GENETIC_TESTING", "GDIS"),
        ("REPRODUCTIVE_HEALTH_DATA", "SEX"),
        ("PSYCHOTHERAPY_NOTES", "PSYTHPN"),
        ("SUD_PART_2", "42CFRPart2"),
        ("SICKLE_CELL", "SICKLE"),
    ],
)
def test_sensitivity_scope_opens_the_label_rules_compute(index: LabelIndex, scope: str, first: str) -> None:
    labels = index.sensitivity_scope_labels(scope)
    assert labels[0] == Label(V3_ACT_CODE, first)
    assert all(label.code in index.sensitive for label in labels)


def test_normal_opens_no_sensitive_label(index: LabelIndex) -> None:
    assert index.sensitivity_scope_labels("NORMAL") == ()


def test_unknown_sensitivity_scope_is_an_error(index: LabelIndex) -> None:
    with pytest.raises(KeyError, match="EVERYTHING"):
        index.sensitivity_scope_labels("EVERYTHING")


def test_every_computed_act_code_label_is_opened_by_some_scope(index: LabelIndex, ) -> None:
    opened = {label.code for scope in index.sensitivity_scope_names for label in index.sensitivity_scope_labels(scope)}
    computed = {"HIV", "STD", "ETH", "42CFRPart2", "PSY", "PSYTHPN", "GDIS", "SEX", "PREGNANT", "SICKLE"}
    assert computed <= opened
    assert computed <= index.sensitive


def test_substance_use_records_need_both_sud_scopes(index: LabelIndex) -> None:
    condition = {"resourceType": "Condition", "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "F10.20"}]}}
    needed = {label for label in index.labels_for(condition) if label.code in index.sensitive}
    general = set(index.sensitivity_scope_labels("SUBSTANCE_USE_OR_DRUG_ABUSE"))
    part2 = set(index.sensitivity_scope_labels("SUD_PART_2"))
    assert not needed <= general
    assert not needed <= part2
    assert needed <= general | part2
