"""Synthea's sensitive modules and the public value sets behind them: their codes earn the labels
of their category, in the element where each resource type keeps them, and what the policy leaves
out on purpose stays unlabeled.

Each labeled row failed on the rules before the Synthea module extracts (tools/sources/synthea/)
and the value sets added with them.
"""

from __future__ import annotations

from typing import Any

import pytest

from gateway.core.labels import CPT, HCPCS, ICD10CM, LOINC, RXNORM, SNOMED, LabelIndex

PART2 = "42CFRPart2"


def cc(system: str, code: str, display: str | None = None) -> dict[str, Any]:
    coding: dict[str, Any] = {"system": system, "code": code}
    if display is not None:
        coding["display"] = display
    return {"coding": [coding], "text": display or code}


def condition(system: str, code: str) -> dict[str, Any]:
    return {"resourceType": "Condition", "id": "c", "code": cc(system, code)}


def observation(code: str) -> dict[str, Any]:
    return {"resourceType": "Observation", "id": "o", "status": "final", "code": cc(LOINC, code)}


def procedure(system: str, code: str) -> dict[str, Any]:
    return {"resourceType": "Procedure", "id": "p", "status": "completed", "code": cc(system, code)}


def medication_request(code: str) -> dict[str, Any]:
    return {"resourceType": "MedicationRequest", "id": "m", "medicationCodeableConcept": cc(RXNORM, code)}


def labels(index: LabelIndex, resource: dict[str, Any]) -> set[str]:
    return {label.code for label in index.labels_for(resource)}


# (id, resource, labels it must earn)
LABELED: list[tuple[str, dict[str, Any], set[str]]] = [
    # substance use
    ("sud-audit-c-panel", observation("72109-2"), {"ETHUD", PART2}),
    ("sud-audit-c-score", observation("75626-2"), {"ETHUD", PART2}),
    ("sud-unhealthy-drinking", condition(SNOMED, "10939881000119105"), {"ETHUD", PART2}),
    ("sud-unhealthy-drinking-as-synthea-module-writes-it", condition(SNOMED, "10939881000119104"), {"ETHUD", PART2}),
    ("sud-dast-10", observation("82666-9"), {"SUD", PART2}),
    ("sud-urine-drugs-of-abuse-panel", observation("65750-2"), {"SUD", PART2}),
    ("sud-dsm5-oud-criteria", observation("99999-0"), {"OPIOIDUD", PART2}),
    ("sud-thc-urine-3426-4", observation("3426-4"), {"SUD", PART2}),
    ("sud-benzoylecgonine-urine", observation("3394-4"), {"SUD", PART2}),
    ("sud-hcpcs-H0001-assessment", procedure(HCPCS, "H0001"), {"SUD", PART2}),
    ("sud-hcpcs-H0015-intensive-outpatient", procedure(HCPCS, "H0015"), {"SUD", PART2}),
    ("sud-alcohol-education", procedure(SNOMED, "281078001"), {"ETHUD", PART2}),
    ("bh-hcpcs-H0004-counseling", procedure(HCPCS, "H0004"), {"BH"}),
    ("bh-hcpcs-H0031-assessment", procedure(HCPCS, "H0031"), {"BH"}),
    # HIV / STI
    ("hiv-1-rna-25836-8", observation("25836-8"), {"HIV"}),
    ("hiv-biktarvy-branded", medication_request("1999673"), {"HIV"}),
    ("hiv-cabotegravir-vocabria", medication_request("2475205"), {"HIV"}),
    ("hiv-2-proviral-dna", observation("25842-6"), {"HIV"}),
    ("hiv-cpt-87389", procedure(CPT, "87389"), {"HIV"}),
    ("hiv-cpt-86701", procedure(CPT, "86701"), {"HIV"}),
    ("hiv-screening-procedure", procedure(SNOMED, "171121004"), {"HIV"}),
    ("hiv-not-detected-result", condition(SNOMED, "165815009"), {"HIV"}),
    ("hiv-counseling", procedure(SNOMED, "313077009"), {"HIV"}),
    ("hiv-viral-load-procedure", procedure(SNOMED, "315124004"), {"HIV"}),
    ("std-venereal-disease-screening", procedure(SNOMED, "171128005"), {"STD"}),
    # mental health
    ("psy-sertraline-ingredient", medication_request("36437"), {"BH"}),
    ("psy-fluoxetine-ingredient", medication_request("4493"), {"BH"}),
    ("psy-sertraline-50mg-tablet", medication_request("312938"), {"BH"}),
    ("psy-quetiapine-25mg-tablet", medication_request("312744"), {"PSY"}),
    ("psy-haloperidol-ingredient", medication_request("5093"), {"PSY"}),
    ("psy-phq9-teen-panel", observation("89206-7"), {"PSY"}),
    ("psy-phq9-positive-screen", condition(SNOMED, "112001000119100"), {"PSY"}),
    ("psy-severe-anxiety", condition(SNOMED, "80583007"), {"PSY"}),
    ("psy-suicide-risk-assessment", procedure(SNOMED, "225337009"), {"PSY"}),
    ("psy-trauma-therapy", procedure(SNOMED, "406185000"), {"PSY"}),
    ("psy-suicide-prevention-note", observation("87626-8"), {"PSY"}),
    ("psy-anxiety-finding", condition(SNOMED, "48694002"), {"PSY"}),
    # reproductive health: contraception (SEX)
    ("sex-camila-pack", medication_request("748962"), {"SEX"}),
    ("sex-mirena", medication_request("807283"), {"SEX"}),
    ("sex-nexplanon", medication_request("389221"), {"SEX"}),
    ("sex-depo-provera", medication_request("1000126"), {"SEX"}),
    ("sex-nuvaring", medication_request("1367439"), {"SEX"}),
    ("sex-emergency-levonorgestrel-1.5mg", medication_request("483325"), {"SEX"}),
    ("sex-cpt-58300-iud-insertion", procedure(CPT, "58300"), {"SEX"}),
    ("sex-cpt-58301-iud-removal", procedure(CPT, "58301"), {"SEX"}),
    ("sex-cpt-58600-tubal-ligation", procedure(CPT, "58600"), {"SEX"}),
    ("sex-iud-insertion", procedure(SNOMED, "65200003"), {"SEX"}),
    ("sex-vasectomy", procedure(SNOMED, "22523008"), {"SEX"}),
    ("sex-history-of-tubal-ligation", condition(SNOMED, "267020005"), {"SEX"}),
    ("sex-embryo-transfer", procedure(CPT, "58974"), {"SEX"}),
    ("sex-mifepristone-200mg", medication_request("311704"), {"SEX"}),
    # reproductive health: pregnancy (PREGNANT)
    ("pregnant-weeks-of-gestation", condition(ICD10CM, "Z3A.20"), {"PREGNANT"}),
    ("pregnant-normal-delivery", condition(ICD10CM, "O80"), {"PREGNANT"}),
    ("pregnant-supervision-normal-pregnancy", condition(ICD10CM, "Z34.00"), {"PREGNANT"}),
    ("pregnant-preeclampsia", condition(ICD10CM, "O14.93"), {"PREGNANT"}),
    ("pregnant-state-incidental", condition(ICD10CM, "Z33.1"), {"PREGNANT"}),
    ("pregnant-single-live-birth", condition(ICD10CM, "Z37.0"), {"PREGNANT"}),
    ("pregnant-obstetric-care-cpt", procedure(CPT, "59400"), {"PREGNANT"}),
    ("pregnant-cesarean", procedure(SNOMED, "11466000"), {"PREGNANT"}),
    ("pregnant-fetal-heart-auscultation", procedure(SNOMED, "225158009"), {"PREGNANT"}),
    ("pregnant-fetal-viability-ultrasound", procedure(SNOMED, "169230002"), {"PREGNANT"}),
    ("pregnant-gestational-age", observation("49051-6"), {"PREGNANT"}),
    ("pregnant-fetal-biparietal-diameter", observation("11820-8"), {"PREGNANT"}),
    ("pregnant-maternal-tobacco-use", condition(SNOMED, "100801000119107"), {"PREGNANT"}),
    # violence
    ("sdv-hark", observation("76499-3"), {"SDV"}),
    ("sdv-hark-score", observation("76504-0"), {"SDV"}),
    ("sdv-history-of-sexual-abuse", condition(SNOMED, "313216003"), {"SDV"}),
]

# Codes the earlier rules already labeled keep their labels: new sets only add.
KEPT: list[tuple[str, dict[str, Any], set[str]]] = [
    ("phq9-shift-behavioral-health-stays-bh", observation("89204-2"), {"BH"}),
    ("ectopic-pregnancy-surgery-stays-pregnant", procedure(SNOMED, "445912000"), {"PREGNANT"}),
    ("hiv-in-pregnancy-gains-pregnant", condition(ICD10CM, "O98.711"), {"HIV", "PREGNANT"}),
]

# Left out on purpose (see "Left out on purpose" in the rules files and tools/sources/policy.yaml).
UNLABELED: list[tuple[str, dict[str, Any]]] = [
    ("buprenorphine-ingredient-names-pain-products-too", medication_request("1819")),
    ("nicotine-dependence-F17", condition(ICD10CM, "F17.210")),
    ("autism-F84-left-out", condition(ICD10CM, "F84.0")),
    ("adhd-F90-left-out", condition(ICD10CM, "F90.0")),
    ("routine-depression-screening", procedure(SNOMED, "171207006")),
    ("routine-phq2", observation("55757-9")),
    ("routine-anxiety-screening", procedure(SNOMED, "710841007")),
    ("routine-substance-use-screening-act", procedure(SNOMED, "428211000124100")),
    ("routine-audit-c-screening-act", procedure(SNOMED, "763302001")),
    ("routine-domestic-abuse-screening-act", procedure(SNOMED, "866148006")),
    ("pregnancy-test-procedure", procedure(SNOMED, "252160004")),
    ("unchecked-rxcui-fluoxetine-25mg", medication_request("406022")),
    ("unchecked-rxcui-sertraline-100mg", medication_request("328670")),
    ("unchecked-rxcui-mestranol-norethynodrel", medication_request("235389")),
    ("dsm5-item-99999-5-may-be-a-loinc-code", observation("99999-5")),
    ("drug-overdose-not-specific", condition(SNOMED, "55680006")),
    ("risk-activity-involvement", condition(SNOMED, "160968000")),
    ("hiv-baseline-blood-count", procedure(SNOMED, "9564003")),
    ("hiv-prophylaxis-cotrimoxazole", medication_request("198335")),
    ("hcpcs-prenatal-H1000-outside-the-range", procedure(HCPCS, "H1000")),
    ("mifepristone-300mg-cushing", medication_request("1245262")),
]


@pytest.mark.parametrize(("resource", "expected"), [e[1:] for e in LABELED], ids=[e[0] for e in LABELED])
def test_synthea_and_public_codes_earn_their_labels(index: LabelIndex, resource: dict[str, Any], expected: set[str]) -> None:
    assert labels(index, resource) == expected


@pytest.mark.parametrize(("resource", "expected"), [k[1:] for k in KEPT], ids=[k[0] for k in KEPT])
def test_earlier_labels_are_kept(index: LabelIndex, resource: dict[str, Any], expected: set[str]) -> None:
    assert labels(index, resource) == expected


@pytest.mark.parametrize("resource", [u[1] for u in UNLABELED], ids=[u[0] for u in UNLABELED])
def test_left_out_on_purpose_stays_unlabeled(index: LabelIndex, resource: dict[str, Any]) -> None:
    assert labels(index, resource) == set()


# Resources shaped as Synthea's FHIR R4 exporter writes them (its systems, displays and elements).
SYNTHEA_RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"


def test_synthea_contraceptive_prescription_is_reproductive_health(index: LabelIndex) -> None:
    request = {
        "resourceType": "MedicationRequest",
        "id": "mr-1",
        "status": "active",
        "intent": "order",
        "medicationCodeableConcept": cc(SYNTHEA_RXNORM, "1534809", "168 HR Ethinyl Estradiol 0.00146 MG/HR / norelgestromin 0.00625 MG/HR Transdermal System"),
        "subject": {"reference": "urn:uuid:patient-1"},
    }
    assert labels(index, request) == {"SEX"}


def test_synthea_contraceptive_careplan_and_encounter_reason(index: LabelIndex) -> None:
    procedure_resource = {
        "resourceType": "Procedure",
        "id": "pr-1",
        "status": "completed",
        "code": cc("http://snomed.info/sct", "169553002", "Insertion of subcutaneous contraceptive"),
        "subject": {"reference": "urn:uuid:patient-1"},
    }
    encounter = {
        "resourceType": "Encounter",
        "id": "en-1",
        "status": "finished",
        "type": [cc("http://snomed.info/sct", "698314001", "Consultation for treatment")],
        "reasonCode": [cc("http://snomed.info/sct", "408969000", "Contraception care management (procedure)")],
    }
    assert labels(index, procedure_resource) == {"SEX"}
    assert labels(index, encounter) == {"SEX"}


def test_synthea_audit_c_report_and_its_score(index: LabelIndex) -> None:
    report = {
        "resourceType": "DiagnosticReport",
        "id": "dr-1",
        "status": "final",
        "code": cc("http://loinc.org", "72109-2", "Alcohol Use Disorder Identification Test - Consumption [AUDIT-C]"),
        "result": [{"reference": "urn:uuid:obs-1"}],
    }
    score = {
        "resourceType": "Observation",
        "id": "obs-1",
        "status": "final",
        "category": [cc("http://terminology.hl7.org/CodeSystem/observation-category", "survey")],
        "code": cc("http://loinc.org", "75626-2", "Total score [AUDIT-C]"),
        "valueQuantity": {"value": 5, "unit": "{score}", "system": "http://unitsofmeasure.org", "code": "{score}"},
    }
    assert labels(index, report) == {"ETHUD", PART2}
    assert labels(index, score) == {"ETHUD", PART2}


def test_synthea_phq9_teen_score_is_psychiatric(index: LabelIndex) -> None:
    score = {
        "resourceType": "Observation",
        "id": "obs-2",
        "status": "final",
        "category": [cc("http://terminology.hl7.org/CodeSystem/observation-category", "survey")],
        "code": cc("http://loinc.org", "89206-7", "Patient Health Questionnaire-9: Modified for Teens [Reported.PHQ.Teen]"),
        "valueQuantity": {"value": 14, "unit": "{score}"},
    }
    assert labels(index, score) == {"PSY"}


def test_synthea_dsm5_oud_multi_observation(index: LabelIndex) -> None:
    criteria = {
        "resourceType": "Observation",
        "id": "obs-3",
        "status": "final",
        "code": cc("http://loinc.org", "99999-0", "DSM-5 Clinical Diagnostic Criteria for Opioid Use Disorder"),
        "component": [
            {"code": cc("http://loinc.org", "99999-4", "Craving or a strong desire to use opioids"), "valueQuantity": {"value": 1}},
        ],
    }
    assert labels(index, criteria) == {"OPIOIDUD", PART2}


def test_synthea_hiv_screening_result_negative_is_still_hiv(index: LabelIndex) -> None:
    result = {
        "resourceType": "Observation",
        "id": "obs-4",
        "status": "final",
        "category": [cc("http://terminology.hl7.org/CodeSystem/observation-category", "laboratory")],
        "code": cc("http://loinc.org", "7917-8", "HIV 1 Ab [Presence] in Serum"),
        "valueCodeableConcept": cc("http://snomed.info/sct", "165815009", "Human immunodeficiency virus not detected (finding)"),
    }
    assert labels(index, result) == {"HIV"}
    counseling = procedure(SNOMED, "313077009")
    assert labels(index, counseling) == {"HIV"}


def test_synthea_obstetric_admission_and_antenatal_careplan_are_pregnancy(index: LabelIndex) -> None:
    admission = {
        "resourceType": "Encounter",
        "id": "en-2",
        "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "EMER"},
        "type": [cc("http://snomed.info/sct", "183460006", "Obstetric emergency hospital admission (procedure)")],
    }
    careplan = {
        "resourceType": "CarePlan",
        "id": "cp-1",
        "status": "active",
        "intent": "order",
        "category": [cc("http://snomed.info/sct", "734163000", "Care plan (record artifact)")],
        "activity": [{"detail": {"code": cc("http://snomed.info/sct", "135892000", "Antenatal education (procedure)"), "status": "in-progress"}}],
    }
    assert labels(index, admission) == {"PREGNANT"}
    assert labels(index, careplan) == {"PREGNANT"}


def test_synthea_ptsd_careplan_is_psychiatric(index: LabelIndex) -> None:
    careplan = {
        "resourceType": "CarePlan",
        "id": "cp-2",
        "status": "active",
        "intent": "order",
        "category": [cc("http://snomed.info/sct", "736254008", "Psychiatry care plan")],
        "activity": [{"detail": {"code": cc("http://snomed.info/sct", "406185000", "Trauma Therapy"), "status": "in-progress"}}],
    }
    assert labels(index, careplan) == {"PSY"}
