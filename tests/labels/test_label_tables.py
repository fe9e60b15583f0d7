"""Label tables: a code, in the element where its resource keeps it, and the labels it must earn."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.core.labels import ICD10CM, LOINC, RXNORM, SNOMED, CPT, LabelIndex

# (category, system, code, expected label codes); an empty set is a near miss that must stay unlabeled.
TABLE: list[tuple[str, str, str, set[str]]] = [
    # HIV / STI
    ("hiv", ICD10CM, "B20", {"HIV"}),
    ("hiv", ICD10CM, "Z21", {"HIV"}),
    ("hiv", ICD10CM, "O98.711", {"HIV", "PREGNANT"}),  # HIV complicating pregnancy says both
    ("hiv", SNOMED, "86406008", {"HIV"}),
    ("hiv", LOINC, "56888-1", {"HIV"}),
    ("hiv", LOINC, "20447-9", {"HIV"}),
    ("hiv", RXNORM, "1999667", {"HIV"}),
    ("sti", ICD10CM, "A54.9", {"STD"}),
    ("sti", ICD10CM, "A56.01", {"STD"}),
    ("sti", SNOMED, "76272004", {"STD"}),
    ("sti", LOINC, "21613-5", {"STD"}),
    # substance use: SUD or its narrower ETHUD / OPIOIDUD, + the 42 CFR Part 2 policy
    ("sud", ICD10CM, "F11.20", {"OPIOIDUD", "42CFRPart2"}),
    ("sud", ICD10CM, "F11.9", {"OPIOIDUD", "42CFRPart2"}),
    ("sud", ICD10CM, "F10.239", {"ETHUD", "42CFRPart2"}),
    ("sud", ICD10CM, "F19.10", {"SUD", "42CFRPart2"}),
    ("sud", ICD10CM, "Z71.41", {"ETHUD", "42CFRPart2"}),
    ("sud", SNOMED, "5602001", {"OPIOIDUD", "42CFRPart2"}),
    ("sud", LOINC, "19295-5", {"SUD", "42CFRPart2"}),
    ("sud", RXNORM, "352364", {"OPIOIDUD", "42CFRPart2"}),
    ("sud", CPT, "99408", {"SUD", "42CFRPart2"}),
    # mental health
    ("mh", ICD10CM, "F32.9", {"PSY"}),
    ("mh", ICD10CM, "F32.A", {"PSY"}),
    ("mh", ICD10CM, "F43.10", {"PSY"}),
    ("mh", ICD10CM, "T14.91XA", {"PSY"}),
    ("mh", SNOMED, "370143000", {"PSY"}),
    ("mh", LOINC, "44249-1", {"PSY"}),
    ("mh", RXNORM, "2626", {"PSY"}),
    ("mh", CPT, "90834", {"PSY"}),
    # psychotherapy notes
    ("psythpn", LOINC, "11510-5", {"PSYTHPN"}),
    ("psythpn", SNOMED, "444175001", {"PSYTHPN"}),
    # genetic
    ("genetic", ICD10CM, "Z15.01", {"GDIS"}),
    ("genetic", ICD10CM, "G10", {"GDIS"}),
    ("genetic", SNOMED, "58756001", {"GDIS"}),
    ("genetic", LOINC, "51969-4", {"GDIS"}),
    ("genetic", CPT, "81162", {"GDIS"}),
    # reproductive health
    ("repro", ICD10CM, "Z30.011", {"SEX"}),
    ("repro", ICD10CM, "O04.5", {"SEX"}),
    ("repro", ICD10CM, "Z33.2", {"SEX"}),
    ("repro", SNOMED, "386639001", {"SEX"}),
    ("repro", SNOMED, "77386006", {"PREGNANT"}),
    ("repro", LOINC, "2106-3", {"PREGNANT"}),
    ("repro", RXNORM, "757594", {"SEX"}),
    # sickle cell
    ("sickle", ICD10CM, "D57.1", {"SCA"}),
    ("sickle", ICD10CM, "D57.3", {"SCA"}),
    ("sickle", SNOMED, "127040003", {"SCA"}),
    ("sickle", LOINC, "6864-3", {"SCA"}),
    # near misses
    ("miss", ICD10CM, "F17.210", set()),  # nicotine dependence, cigarettes
    ("miss", ICD10CM, "F17", set()),
    ("miss", ICD10CM, "I10", set()),  # essential hypertension
    ("miss", ICD10CM, "E11.9", set()),
    ("miss", ICD10CM, "F1", set()),  # not a category: must not match F10-F19
    ("miss", ICD10CM, "F06.4", set()),  # anxiety disorder due to a physiological condition, left out
    ("cogn", ICD10CM, "F01.50", {"COGN"}),  # vascular dementia: cognitive disability (SHIFT SLS maps dementia to COGN)
    ("cogn", ICD10CM, "G30.9", {"COGN"}),
    ("miss", ICD10CM, "D56.1", set()),  # beta thalassemia, next to D57
    ("miss", ICD10CM, "Z20.822", set()),  # COVID-19 exposure, next to Z20.6 / Z20.2
    ("miss", LOINC, "58410-2", set()),  # CBC panel
    ("miss", LOINC, "718-7", set()),  # hemoglobin
    ("miss", SNOMED, "38341003", set()),  # hypertensive disorder
    ("miss", SNOMED, "56294008", set()),  # nicotine dependence
    ("miss", RXNORM, "314076", set()),  # lisinopril 10 MG
    ("miss", CPT, "99213", set()),  # office visit
]


def _condition(system: str, code: str) -> dict[str, Any]:
    return {"resourceType": "Condition", "id": "c", "code": {"coding": [{"system": system, "code": code}]}}


@pytest.mark.parametrize(("category", "system", "code", "expected"), TABLE, ids=[f"{c}-{code}" for c, _, code, _ in TABLE])
def test_code_yields_labels(index: LabelIndex, category: str, system: str, code: str, expected: set[str]) -> None:
    labels = index.labels_for(_condition(system, code))
    assert {label.code for label in labels} == expected


def test_icd_codes_match_with_or_without_the_dot(index: LabelIndex) -> None:
    dotted = index.labels_for(_condition(ICD10CM, "F11.20"))
    assert dotted
    assert index.labels_for(_condition(ICD10CM, "F1120")) == dotted
    assert index.labels_for(_condition(ICD10CM, " f11.20 ")) == dotted
    # "F110" is F11.0 without its dot, so it is an opioid disorder too
    assert index.labels_for(_condition(ICD10CM, "F110")) == dotted


def test_icd_oid_and_who_icd10_systems_are_read_as_icd10cm(index: LabelIndex) -> None:
    for system in ("urn:oid:2.16.840.1.113883.6.90", "http://hl7.org/fhir/sid/icd-10"):
        assert {x.code for x in index.labels_for(_condition(system, "B20"))} == {"HIV"}


def test_a_dot_out_of_place_does_not_match(index: LabelIndex) -> None:
    assert index.labels_for(_condition(ICD10CM, "F1.120")) == frozenset()


def test_code_without_system_or_with_unknown_system_earns_nothing(index: LabelIndex) -> None:
    assert index.labels_for({"resourceType": "Condition", "code": {"coding": [{"code": "B20"}]}}) == frozenset()
    assert index.labels_for(_condition("http://example.org/local", "B20")) == frozenset()


def test_labels_use_the_v3_actcode_system(index: LabelIndex) -> None:
    labels = index.labels_for(_condition(SNOMED, "86406008"))
    assert {(x.system, x.code) for x in labels} == {("http://terminology.hl7.org/CodeSystem/v3-ActCode", "HIV")}


def test_explain_names_file_system_code_and_display(index: LabelIndex) -> None:
    reasons = index.explain(_condition(ICD10CM, "F11.20"))
    assert [(label.code, rule) for label, rule in reasons] == [
        ("42CFRPart2", "rules/substance-use.yaml: ICD-10-CM F11 (Opioid related disorders)"),
        ("OPIOIDUD", "rules/substance-use.yaml: ICD-10-CM F11 (Opioid related disorders)"),
    ]
