"""What an answer releases (core.officer.release_of): DS4P labels put on in place, the counts
for the decision log, and the disclosures each ``audit.disclosures`` mode accounts for.

Table tests on the pure function: answer in, release out.
"""

from __future__ import annotations

import copy

import pytest

from gateway.core.ds4p import NOTICE_EXTENSION, NORDSLCD
from gateway.core.fhir import JSON
from gateway.core.model import V3_ACT_CODE, Label
from gateway.core.officer import release_of

SENSITIVE = frozenset({"HIV", "SUD", "PSY"})
HIV = Label(V3_ACT_CODE, "HIV")
SUD = Label(V3_ACT_CODE, "SUD")
NORMAL = Label("http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "N")


def _condition(rid: str, patient: str = "Patient/p1") -> JSON:
    return {"resourceType": "Condition", "id": rid, "subject": {"reference": patient}}


def _bundle(*resources: JSON) -> JSON:
    return {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": r} for r in resources]}


def _security(resource: JSON) -> list[tuple[str, str]]:
    return [(c.get("system", ""), c["code"]) for c in resource.get("meta", {}).get("security", [])]


def test_a_sensitive_resource_is_labelled_in_place_and_disclosed() -> None:
    hiv, plain = _condition("c-hiv"), _condition("c-htn")
    body = _bundle(hiv, plain)
    touched: set[int] = set()
    found = release_of(body, {id(hiv): frozenset({HIV, NORMAL}), id(plain): frozenset({NORMAL})},
                       SENSITIVE, "sensitive", "Practitioner/gp", touched=touched)
    assert _security(hiv) == [(V3_ACT_CODE, "HIV")]
    assert "meta" not in plain
    assert touched == {id(hiv)}
    assert found.counts == {"Condition": 2}
    assert found.disclosed == {"Patient/p1": [("Condition/c-hiv", [HIV])]}
    assert found.changed is True


@pytest.mark.parametrize(("mode", "disclosed"), [
    ("sensitive", {"Patient/p1": [("Condition/c-hiv", [HIV])]}),
    ("all", {"Patient/p1": [("Condition/c-hiv", [HIV]), ("Condition/c-htn", [])]}),
    ("none", {}),
])
def test_each_disclosures_mode_accounts_for_its_records(mode: str, disclosed: object) -> None:
    hiv, plain = _condition("c-hiv"), _condition("c-htn")
    body = _bundle(hiv, plain)
    found = release_of(body, {id(hiv): frozenset({HIV})}, SENSITIVE, mode, "Practitioner/gp")
    assert found.disclosed == disclosed
    assert _security(hiv) == [(V3_ACT_CODE, "HIV")]  # labels go on whatever the mode


def test_a_patient_reading_their_own_record_is_not_a_disclosure() -> None:
    hiv = _condition("c-hiv")
    found = release_of(_bundle(hiv), {id(hiv): frozenset({HIV})}, SENSITIVE, "all", "Patient/p1")
    assert found.disclosed == {}


def test_a_record_of_two_patients_is_disclosed_for_each_by_the_owners_enforcement_found() -> None:
    hiv = _condition("c-hiv")
    found = release_of(_bundle(hiv), {id(hiv): frozenset({HIV})}, SENSITIVE, "sensitive", "Practitioner/gp",
                       owners={id(hiv): frozenset({"Patient/p1", "Patient/p2"})})
    assert found.disclosed == {"Patient/p1": [("Condition/c-hiv", [HIV])],
                               "Patient/p2": [("Condition/c-hiv", [HIV])]}


def test_part2_data_gets_the_refrain_and_its_bundle_the_notice_once() -> None:
    sud = _condition("c-sud")
    body = _bundle(sud)
    release_of(body, {id(sud): frozenset({SUD})}, SENSITIVE, "sensitive", "Practitioner/gp")
    assert _security(sud) == [(V3_ACT_CODE, "SUD"), (V3_ACT_CODE, NORDSLCD)]
    assert [e["url"] for e in body["meta"]["extension"]] == [NOTICE_EXTENSION]
    again = copy.deepcopy(body)
    resource = again["entry"][0]["resource"]
    found = release_of(again, {id(resource): frozenset({SUD})}, SENSITIVE, "sensitive", "Practitioner/gp")
    assert found.changed is False and again == body  # already labelled: nothing added twice


def test_non_patient_data_and_outcomes_are_counted_as_they_are_never_disclosed() -> None:
    practitioner = {"resourceType": "Practitioner", "id": "gp"}
    outcome = {"resourceType": "OperationOutcome", "issue": []}
    body = _bundle(practitioner, outcome)
    found = release_of(body, {id(practitioner): frozenset({HIV})}, SENSITIVE, "all", "Practitioner/x")
    assert found.counts == {"Practitioner": 1}
    assert found.disclosed == {}


def test_resources_inside_a_nested_bundle_and_parameters_are_released_as_such() -> None:
    inner = _condition("c-hiv")
    param = _condition("c-param")
    body = _bundle({"resourceType": "Bundle", "type": "collection", "entry": [{"resource": inner}]},
                   {"resourceType": "Parameters", "parameter": [{"name": "r", "resource": param}]})
    found = release_of(body, {id(inner): frozenset({HIV}), id(param): frozenset({HIV})}, SENSITIVE, "sensitive",
                       "Practitioner/gp")
    assert found.counts == {"Condition": 2}
    assert sorted(ref for ref, _ in found.disclosed["Patient/p1"]) == ["Condition/c-hiv", "Condition/c-param"]
