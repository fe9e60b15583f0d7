"""core.subscriptions: the patients and codes a Subscription's criteria name (pure)."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.core.compartment import UNKNOWN_PATIENT, patients_of
from gateway.core.labels import LabelIndex
from gateway.core.subscriptions import BACKPORT_FILTER, criteria_codes, criteria_searches
from gateway.core.view import view_elements
from gateway.rules import load_rules

ANA = "Patient/pat-ana-5581"
TOPIC = "http://example.org/fhir/SubscriptionTopic/observation-new"


def sub(criteria: Any = None, **more: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"resourceType": "Subscription", "id": "s1", "status": "active", **more}
    if criteria is not None:
        out["criteria"] = criteria
    return out


@pytest.fixture(scope="module")
def index() -> LabelIndex:
    return load_rules()


@pytest.mark.parametrize(("criteria", "patients"), [
    (f"Observation?patient={ANA}&code=http://loinc.org|75622-1", {ANA}),
    ("Condition?subject=pat-ana-5581&code=B20", {ANA}),
    (f"Observation?subject:Patient={ANA}", {ANA}),
    (f"Patient?_id={ANA}", {ANA}),
    (f"DiagnosticReport?performer={ANA}", {ANA}),  # any reference to a patient names her
    ("Observation?code=http://loinc.org|58410-2", set()),  # anyone's: no patient
    (TOPIC, set()),  # a topic watched whole
    ("Observation?patient:identifier=http://h.example.org|MRN-1", {UNKNOWN_PATIENT}),
    ("Observation?patient.name=Reyes", {UNKNOWN_PATIENT}),
    ("Observation?patient=http://other.example.org/fhir/Patient/1", {UNKNOWN_PATIENT}),
    (f"Observation?patient={ANA}&code:text=HIV", {ANA, UNKNOWN_PATIENT}),
    (f"Observation?patient={ANA}&_filter=code eq 75622-1", {UNKNOWN_PATIENT}),
    ("observation?patient=1", {UNKNOWN_PATIENT}),
    (42, {UNKNOWN_PATIENT}),
])
def test_the_patients_criteria_name(criteria: Any, patients: set[str]) -> None:
    assert patients_of(sub(criteria)) == patients


@pytest.mark.parametrize(("more", "patients"), [
    ({"_criteria": {"extension": [{"url": BACKPORT_FILTER, "valueString": f"Observation?patient={ANA}"}]}}, {ANA}),
    ({"_criteria": {"extension": [{"url": BACKPORT_FILTER, "valueString": f"patient={ANA}"}]}}, {UNKNOWN_PATIENT}),
    ({"_criteria": {"extension": [{"url": "http://example.org/other", "valueString": "x"}]}}, {UNKNOWN_PATIENT}),
    ({"_criteria": "Observation?patient=1"}, {UNKNOWN_PATIENT}),
    ({"filterBy": [{"resourceType": "Observation", "filterParameter": "patient", "value": ANA}]}, {ANA}),
    ({"filterBy": [{"filterParameter": "patient", "value": ANA}]}, {UNKNOWN_PATIENT}),
    ({"filterBy": [{"resourceType": "Observation", "filterParameter": "code", "value": "B20"}]}, set()),
    ({"filterBy": {"resourceType": "Observation"}}, {UNKNOWN_PATIENT}),
])
def test_backport_and_r5_filters(more: dict[str, Any], patients: set[str]) -> None:
    assert patients_of(sub(TOPIC, **more)) == patients


def test_tokens() -> None:
    resource = sub("Condition?patient=1&code=http://hl7.org/fhir/sid/icd-10-cm|B20,|F11.20,86406008&_sort=date")
    assert criteria_searches(resource) == [("Condition", [
        ("patient", "1"), ("code", "http://hl7.org/fhir/sid/icd-10-cm|B20,|F11.20,86406008"), ("_sort", "date")])]
    assert criteria_codes(resource) == [("http://hl7.org/fhir/sid/icd-10-cm", "B20"), ("", "F11.20"), ("", "86406008")]
    # What names a patient is no code: an id spelt like B20 labels nothing.
    assert criteria_codes(sub("Condition?subject=b20x&performer=Patient/b20y")) == []


@pytest.mark.parametrize(("criteria", "wanted"), [
    (f"Observation?patient={ANA}&code=http://loinc.org|75622-1", "HIV"),
    (f"Condition?patient={ANA}&code=B20", "HIV"),
    (f"Condition?patient={ANA}&code=86406008", "HIV"),  # SNOMED CT, written without its system
    (f"Condition?patient={ANA}&code=F11.20", "OPIOIDUD"),
])
def test_criteria_codes_label_the_subscription(index: LabelIndex, criteria: str, wanted: str) -> None:
    resource = sub(criteria)
    assert wanted in {label.code for label in index.labels_for(resource)}
    assert wanted in {label.code for label in index.labels_remembered(resource)}


def test_ordinary_criteria_label_nothing(index: LabelIndex) -> None:
    assert index.labels_for(sub(f"Observation?patient={ANA}&code=http://loinc.org|58410-2")) == frozenset()
    assert index.labels_for(sub("Condition?subject=b20x&code=I10")) == frozenset()


def test_a_view_holds_the_criteria() -> None:
    assert {"criteria", "_criteria", "filterBy"} <= view_elements("Subscription")
