"""Labels from text: the term lists (rules/terms-*.yaml) read in concepts that carry no standard code.

A sensitive fact written only as text (a Flag's ``code.text``, a hospital's local code with its
display, a medication named in words) earns the label its category's codes earn; a concept that
carries a standard code is judged by that code alone; benign texts that share a word with a
sensitive one earn nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.core.labels import LabelIndex, RuleDataError, label_elements, standard_system
from gateway.core.terms import TermMatcher, words
from gateway.rules import load_rules

RULES = Path(__file__).resolve().parents[2] / "rules"
TERM_FILES = sorted(RULES.glob("terms-*.yaml"))
LOCAL = "urn:oid:1.2.3.4.local"
PART2 = "42CFRPart2"


def _codes(index: LabelIndex, resource: dict[str, Any]) -> set[str]:
    return {label.code for label in index.labels_for(resource)}


def _local(code: str, display: str) -> dict[str, Any]:
    return {"coding": [{"system": LOCAL, "code": code, "display": display}]}


def _condition(code: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Condition", "id": "c1", "subject": {"reference": "Patient/p1"}, "code": code}


def _med(text: str, rtype: str = "MedicationRequest") -> dict[str, Any]:
    return {"resourceType": rtype, "id": "m1", "status": "active", "subject": {"reference": "Patient/p1"},
            "medicationCodeableConcept": {"text": text}}


# One record per category written as hospitals write them: text alone, or a local code with a display.
TEXT_ONLY = {
    "flag-hiv": ({"resourceType": "Flag", "id": "f1", "status": "active", "subject": {"reference": "Patient/p1"},
                  "code": {"text": "HIV-1 positive"}}, {"HIV"}),
    "lab-hiv-viral-load": ({"resourceType": "Observation", "id": "o1", "status": "final",
                            "code": {"coding": [{"system": LOCAL, "code": "VL1"}], "text": "HIV-1 RNA viral load"}},
                           {"HIV"}),
    "med-antiretroviral": (_med("Biktarvy 50 mg/200 mg/25 mg tablet"), {"HIV"}),
    "condition-chlamydia": (_condition(_local("ID44", "Chlamydia trachomatis infection of cervix")), {"STD"}),
    "condition-oud": (_condition(_local("L123", "Opioid use disorder, moderate")), {"OPIOIDUD", PART2}),
    "med-buprenorphine": (_med("Buprenorphine-naloxone 8 mg/2 mg film"), {"OPIOIDUD", PART2}),
    "dispense-methadone": (_med("Methadone 10 mg/mL oral concentrate", "MedicationDispense"), {"OPIOIDUD", PART2}),
    "condition-alcohol": (_condition({"text": "Alcohol use disorder, severe"}), {"ETHUD", PART2}),
    "med-naltrexone": (_med("Naltrexone 50 mg tablet", "MedicationStatement"), {"SUD", PART2}),
    "condition-schizophrenia": (_condition(_local("P20", "Schizophrenia, paranoid type")), {"PSY"}),
    "encounter-psychiatry": ({"resourceType": "Encounter", "id": "e1", "status": "finished",
                              "serviceType": _local("SVC9", "Inpatient Psychiatry")}, {"PSY"}),
    "med-fluoxetine": (_med("FLUoxetine 20 mg capsule"), {"BH"}),
    "condition-alzheimer": (_condition({"text": "Alzheimer's disease, late onset"}), {"COGN"}),
    "note-psychotherapy": ({"resourceType": "DocumentReference", "id": "d1", "status": "current",
                            "type": _local("NOTE7", "Psychotherapy session note")}, {"PSY", "PSYTHPN"}),
    "procedure-abortion": ({"resourceType": "Procedure", "id": "p1", "status": "completed",
                            "code": {"text": "Induced abortion, medical"}}, {"SEX"}),
    "med-mifepristone": (_med("Mifepristone 200 mg tablet"), {"SEX"}),
    "lab-pregnancy": ({"resourceType": "Observation", "id": "o2", "status": "final",
                       "code": _local("UPT", "Urine pregnancy test")}, {"PREGNANT"}),
    "condition-sickle": (_condition({"text": "Sickle cell disease with crisis"}), {"SCA"}),
    "order-brca": ({"resourceType": "ServiceRequest", "id": "s1", "status": "active", "intent": "order",
                    "code": {"text": "BRCA1/BRCA2 full sequence analysis"}}, {"GDIS"}),
    "condition-violence": (_condition(_local("V1", "Victim of domestic violence")), {"SDV"}),
}


@pytest.mark.parametrize(("resource", "expected"), TEXT_ONLY.values(), ids=list(TEXT_ONLY))
def test_text_only_record_earns_its_categorys_label(index: LabelIndex, resource: dict[str, Any],
                                                    expected: set[str]) -> None:
    assert _codes(index, resource) == expected


# A standard code that no rule names is a known non-sensitive fact: the text beside it is not read.
STANDARD = {
    "snomed-hypertension": {"coding": [{"system": "http://snomed.info/sct", "code": "38341003",
                                        "display": "Hypertensive disorder"}], "text": "Hypertension (HIV clinic)"},
    "loinc-as-oid": {"coding": [{"system": "urn:oid:2.16.840.1.113883.6.1", "code": "2345-7"}],
                     "text": "Glucose, drawn at methadone clinic"},
    "icd-9-cm": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-9-cm", "code": "401.9",
                             "display": "Essential hypertension"}], "text": "HTN; schizophrenia ruled out"},
    "cvx": {"coding": [{"system": "http://hl7.org/fhir/sid/cvx", "code": "140"}], "text": "Flu shot at HIV clinic"},
    "standard-beside-local": {"coding": [{"system": LOCAL, "code": "X9", "display": "Opioid use disorder"},
                                         {"system": "http://snomed.info/sct", "code": "38341003"}]},
}


@pytest.mark.parametrize("code", STANDARD.values(), ids=list(STANDARD))
def test_standard_non_sensitive_code_keeps_the_text_unread(index: LabelIndex, code: dict[str, Any]) -> None:
    assert _codes(index, _condition(code)) == set()


def test_standard_sensitive_code_still_labels(index: LabelIndex) -> None:
    code = {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "B20"}], "text": "Hypertension"}
    assert _codes(index, _condition(code)) == {"HIV"}


@pytest.mark.parametrize("coding", [
    {"system": "http://terminology.hl7.org/CodeSystem/v3-NullFlavor", "code": "UNK"},
    {"system": "http://terminology.hl7.org/CodeSystem/data-absent-reason", "code": "unknown"},
    {"system": "http://snomed.info/sct", "display": "Opioid use disorder"},  # no code: no fact
    {"system": "http://snomed.info/sct", "code": ""},
    {"code": "L123", "display": "Opioid use disorder"},  # no system: a local code
], ids=["null-flavor", "data-absent", "standard-without-code", "empty-code", "no-system"])
def test_coding_that_states_no_standard_fact_leaves_the_text_read(index: LabelIndex, coding: dict[str, Any]) -> None:
    code = {"coding": [coding], "text": "Opioid use disorder"}
    assert _codes(index, _condition(code)) == {"OPIOIDUD", PART2}


def test_system_kinds() -> None:
    assert standard_system("http://loinc.org") and standard_system("https://www.snomed.info/sct/")
    assert standard_system("http://hl7.org/fhir/sid/icd-9-cm") and standard_system("2.16.840.1.113883.12.292")
    assert standard_system("http://terminology.hl7.org/CodeSystem/observation-category")
    assert not standard_system(LOCAL)
    assert not standard_system("https://fhir.example-hospital.org/CodeSystem/problems")
    assert not standard_system("http://terminology.hl7.org/CodeSystem/v3-NullFlavor")


BENIGN = [
    "ST segment depression", "Respiratory depression", "Hearing aids", "Walking aids", "Bowel prep for colonoscopy",
    "Non-alcoholic fatty liver disease", "Bipolar electrocautery of bleeding vessel", "Bipolar hip hemiarthroplasty",
    "Nirmatrelvir and ritonavir", "Herpes zoster", "Hemispatial neglect", "Anxiety", "Archive copy",
    "Huntington Hospital referral", "Cocaine 4% topical solution", "Naloxone 4 mg nasal spray",
    "Fentanyl 25 mcg/hr patch", "Essential hypertension", "Serum lithium level", "Behavioral pain scale",
    "Osteochondritis dissecans (OCD) of knee", "Assault by blunt object", "Genetic predisposition",
    "Delirium, postoperative", "Rapeseed oil allergy", "Aid to daily living",
]


# Displays of the routine codes of a Synthea-like record (as bench.label's routine mix codes
# them), written by a hospital under its local codes: none names a sensitive fact.
ROUTINE_DISPLAYS = [
    "Hemoglobin A1c/Hemoglobin.total in Blood", "Body mass index (BMI) [Ratio]", "Systolic blood pressure",
    "Glucose [Mass/volume] in Serum or Plasma", "Cholesterol in LDL [Mass/volume] in Serum or Plasma by Direct assay",
    "Creatinine [Mass/volume] in Serum or Plasma", "Leukocytes [#/volume] in Blood by Automated count",
    "Platelets [#/volume] in Blood", "Pain severity - 0-10 verbal numeric rating", "Tobacco smoking status",
    "Acute bronchitis (disorder)", "Viral sinusitis (disorder)", "Prediabetes", "Hyperlipidemia",
    "Anemia (disorder)", "Sprain of ankle", "Otitis media", "Essential hypertension", "Type 2 diabetes mellitus",
    "Asthma, unspecified", "Low back pain", "Gastro-esophageal reflux disease without esophagitis", "Obesity",
    "Amoxicillin 250 MG Oral Capsule", "Lisinopril 10 MG Oral Tablet", "Acetaminophen 325 MG Oral Tablet",
    "Simvastatin 20 MG Oral Tablet", "Metformin hydrochloride 500 MG Oral Tablet", "Ibuprofen 200 MG Oral Tablet",
    "Influenza, seasonal, injectable, preservative free", "Td (adult) preservative free", "Well child visit",
    "General examination of patient (procedure)", "Medication reconciliation (procedure)",
    "Assessment of health and social care needs", "Colonoscopy", "Mammography", "Papanicolaou smear",
    "Encounter for check up", "Emergency room admission", "Urgent care clinic",
]


@pytest.mark.parametrize("text", BENIGN + ROUTINE_DISPLAYS)
def test_benign_text_earns_nothing(index: LabelIndex, text: str) -> None:
    assert _codes(index, _condition({"text": text})) == set()
    assert _codes(index, _condition(_local("B1", text))) == set()


def test_a_test_for_hiv_is_labelled_whatever_its_result(index: LabelIndex) -> None:
    # No negation is read: an HIV test is what HIV-testing laws protect, as its LOINC codes are labelled.
    assert _codes(index, _condition({"text": "HIV test negative"})) == {"HIV"}
    assert _codes(index, _condition({"text": "Pregnancy test negative"})) == {"PREGNANT"}


def test_matching_ignores_case_punctuation_and_plural(index: LabelIndex) -> None:
    for text in ("OPIOID-USE   DISORDER", "opioid use disorders", "Opioid\u00a0use\ndisorder",
                 "\uff2f\uff50\uff49\uff4f\uff49\uff44 use disorder"):
        assert _codes(index, _condition({"text": text})) == {"OPIOIDUD", PART2}, text
    assert words("Anti-HIV-1/2 Ab [Alzheimer's]") == ["anti", "hiv", "1", "2", "ab", "alzheimer", "s"]


def test_a_term_does_not_span_two_strings(index: LabelIndex) -> None:
    code = {"coding": [{"system": LOCAL, "code": "X", "display": "use disorder"}], "text": "Opioid"}
    assert _codes(index, _condition(code)) == set()


def test_extension_concepts_contained_resources_and_valuecodings_are_read(index: LabelIndex) -> None:
    due_to = {"url": "http://hl7.org/fhir/StructureDefinition/condition-dueTo",
              "valueCodeableConcept": {"text": "HIV infection"}}
    condition = _condition({"text": "Wasting syndrome"}) | {"extension": [due_to]}
    assert _codes(index, condition) == {"HIV"}
    request = {"resourceType": "MedicationRequest", "id": "m2", "status": "active",
               "contained": [{"resourceType": "Medication", "id": "med", "code": {"text": "Suboxone 8 mg/2 mg film"}}],
               "medicationReference": {"reference": "#med"}}
    assert _codes(index, request) == {"OPIOIDUD", PART2}
    answers = {"resourceType": "QuestionnaireResponse", "id": "q1", "status": "completed",
               "item": [{"linkId": "1", "answer": [{"valueCoding": {"system": LOCAL, "code": "Y",
                                                                    "display": "Schizophrenia"}}]}]}
    assert _codes(index, answers) == {"PSY"}


def test_finding_texts_are_read_and_notes_are_not(index: LabelIndex) -> None:
    issue = {"resourceType": "DetectedIssue", "id": "di1", "status": "final",
             "code": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "DRG"}]},
             "detail": "Methadone with ciprofloxacin: QT prolongation"}
    assert _codes(index, issue) == {"OPIOIDUD", PART2}
    impression = {"resourceType": "ClinicalImpression", "id": "ci1", "status": "completed",
                  "subject": {"reference": "Patient/p1"}, "summary": "Presentation consistent with major depression"}
    assert _codes(index, impression) == {"PSY"}
    assert {"detail"} <= label_elements("DetectedIssue")
    assert {"summary", "description"} <= label_elements("ClinicalImpression")
    # Annotation notes are clinicians' prose, read by no term list (README "Labels from text").
    noted = _condition({"coding": [{"system": "http://snomed.info/sct", "code": "38341003"}]}) | {
        "note": [{"text": "No history of opioid use disorder; HIV test offered"}]}
    assert _codes(index, noted) == set()


def test_explain_names_the_term_and_its_file(index: LabelIndex) -> None:
    reasons = index.explain(_condition({"text": "Opioid use disorder"}))
    assert {(label.code, rule) for label, rule in reasons} == {
        ("OPIOIDUD", "rules/terms-substance-use.yaml: text term 'opioid use disorder'"),
        (PART2, "rules/terms-substance-use.yaml: text term 'opioid use disorder'"),
    }


def test_rules_without_term_lists_read_no_text(tmp_path: Path) -> None:
    for path in RULES.glob("*.yaml"):
        if not path.name.startswith("terms-"):
            (tmp_path / path.name).write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    index = load_rules(tmp_path)
    assert index.terms is None
    assert _codes(index, _condition({"text": "Opioid use disorder"})) == set()


# ---------------------------------------------------------------------- the term lists as data


def _document(path: Path) -> dict[str, Any]:
    loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(loaded, dict)
    return loaded


@pytest.mark.parametrize("path", TERM_FILES, ids=[p.name for p in TERM_FILES])
def test_term_list_is_reviewable(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    header = text.split("\nkind:")[0]
    assert "Sources" in header and "Matching" in header and "Left out" in header or path.stem in (
        "terms-psychotherapy-notes", "terms-sickle-cell")
    document = _document(path)
    assert document["kind"] == "terms"
    assert path.stem == f"terms-{document['category']}"
    for term_set in document["sets"]:
        terms = term_set["terms"]
        assert terms == sorted(terms, key=str.casefold), f"{path.name} {term_set['name']}: not sorted"
        normal = [tuple(words(t)) for t in terms]
        assert len(set(normal)) == len(normal), f"{path.name} {term_set['name']}: a term twice"
        assert all(t == t.lower() for t in terms)
        for short in normal:  # a term inside another of its set makes the longer one say nothing
            assert not [b for b in normal if b != short and any(
                b[i:i + len(short)] == short for i in range(len(b) - len(short) + 1))], (path.name, short)


@pytest.mark.parametrize("path", TERM_FILES, ids=[p.name for p in TERM_FILES])
def test_term_list_labels_are_those_its_category_codes_give(path: Path) -> None:
    document = _document(path)
    category = _document(RULES / f"{document['category']}.yaml")
    coded = {label for code_set in category["sets"] for label in code_set["labels"]}
    for term_set in document["sets"]:
        assert set(term_set["labels"]) <= coded


def test_every_category_has_a_term_list() -> None:
    categories = {p.stem for p in RULES.glob("*.yaml") if _document(p).get("kind") == "category"}
    assert {_document(p)["category"] for p in TERM_FILES} == categories


@pytest.mark.parametrize(("term_set", "problem"), [
    ({"labels": ["HIV"], "terms": ["hiv"]}, "missing source"),
    ({"labels": ["NOPE"], "source": "s", "terms": ["hiv"]}, "bad label 'NOPE'"),
    ({"labels": ["HIV"], "source": "s", "terms": []}, "expected a non-empty list of terms"),
    ({"labels": ["HIV"], "source": "s", "terms": ["--"]}, "bad term '--'"),
    ({"labels": ["HIV"], "source": "s", "terms": ["HIV", "hiv"]}, "duplicate term"),
])
def test_bad_term_list_is_refused(term_set: dict[str, Any], problem: str) -> None:
    rules = {p.name: _document(p) for p in RULES.glob("*.yaml") if not p.name.startswith("terms-")}
    rules["terms-bad.yaml"] = {"kind": "terms", "category": "bad", "sets": [term_set]}
    with pytest.raises(RuleDataError, match=problem):
        LabelIndex.from_documents(rules)


def test_matcher_scans_whole_words_in_order() -> None:
    matcher: TermMatcher[str] = TermMatcher()
    for term in ("sickle cell", "hiv", "bipolar ii"):
        matcher.add(term, term)
    found: list[str] = []
    matcher.scan("Sickle-cell trait; HIV1; archive; Bipolar II disorder; cell sickle; bipolar is", found)
    assert found == ["sickle cell", "bipolar ii"]
    found.clear()
    matcher.scan("Sickle cells; HIV", found)
    assert found == ["sickle cell", "hiv"]
