"""Patient compartment, clinical dates, references and authors of R4 resources."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from gateway.core.compartment import (
    UNKNOWN_PATIENT,
    PATIENT_COMPARTMENT,
    DateRange,
    authors_of,
    clinical_date,
    is_patient_data,
    main_codes,
    parse_date_range,
    patients_of,
    references_of,
)


def utc(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=timezone.utc)


@pytest.mark.parametrize(
    ("resource", "patients"),
    [
        ({"resourceType": "Observation", "subject": {"reference": "Patient/1"},
          "performer": [{"reference": "Patient/2"}, {"reference": "Practitioner/9"}]},
         {"Patient/1", "Patient/2"}),
        ({"resourceType": "Encounter", "subject": {"reference": "http://h/fhir/Patient/3/_history/2"}},
         {"Patient/3"}),  # under this server's base (OURS)
        ({"resourceType": "Encounter", "subject": {"reference": "HTTP://H:80/fhir/Patient/3"}}, {"Patient/3"}),
        # another server's Patient/3 is not this server's: a patient whose consents cannot be read
        ({"resourceType": "Encounter", "subject": {"reference": "https://other.example/fhir/Patient/3"}},
         {UNKNOWN_PATIENT}),
        ({"resourceType": "Observation", "subject": {"reference": "Patient/1"},
          "performer": [{"reference": "http://elsewhere/Patient/9"}]}, {"Patient/1", UNKNOWN_PATIENT}),
        ({"resourceType": "Provenance", "target": [{"reference": "Patient/4"},
                                                   {"reference": "Observation/5"}]}, {"Patient/4"}),
        ({"resourceType": "Group", "member": [{"entity": {"reference": "Patient/6"}}]}, {"Patient/6"}),
        ({"resourceType": "Patient", "id": "7", "link": [{"other": {"reference": "Patient/8"}}]},
         {"Patient/7", "Patient/8"}),
        ({"resourceType": "Procedure", "subject": {"reference": "Patient/1"},
          "performer": [{"actor": {"reference": "Patient/9"}}]}, {"Patient/1", "Patient/9"}),
        ({"resourceType": "AuditEvent", "entity": [{"what": {"reference": "Patient/2"}}]}, {"Patient/2"}),
        ({"resourceType": "Observation", "subject": {"reference": "#contained-patient"}}, set()),
        ({"resourceType": "Observation", "subject": "Patient/1"}, set()),
        ({"resourceType": "Practitioner", "id": "1"}, set()),
    ],
)
def test_patients_of(resource: dict[str, object], patients: set[str]) -> None:
    assert patients_of(resource, OURS) == patients


OURS = frozenset({"http://h/fhir"})


def test_compartment_covers_the_r4_definition() -> None:
    assert len(PATIENT_COMPARTMENT) == 66
    for rtype in ("ResearchSubject", "MolecularSequence", "ImmunizationEvaluation", "Invoice"):
        assert is_patient_data(rtype)
    for rtype in ("Practitioner", "Organization", "Location", "Medication", "ValueSet"):
        assert not is_patient_data(rtype)
    # Beyond the definition: Task.for names the patient the task is about.
    assert patients_of({"resourceType": "Task", "for": {"reference": "Patient/p"}}) == {"Patient/p"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2015", DateRange(utc(2015, 1, 1), utc(2016, 1, 1))),
        ("2015-02", DateRange(utc(2015, 2, 1), utc(2015, 3, 1))),
        ("2015-12-31", DateRange(utc(2015, 12, 31), utc(2016, 1, 1))),
        ("2016-06-23T17:02:33+10:00", DateRange(utc(2016, 6, 23, 7, 2, 33), utc(2016, 6, 23, 7, 2, 33, 1))),
        ("2016-06-23T07:02:33Z", DateRange(utc(2016, 6, 23, 7, 2, 33), utc(2016, 6, 23, 7, 2, 33, 1))),
        ("June 2015", None),
        ("2015-13-01", None),
        (20150101, None),
    ],
)
def test_parse_date_range(text: object, expected: DateRange | None) -> None:
    assert parse_date_range(text) == expected


@pytest.mark.parametrize(
    ("resource", "start"),
    [
        ({"resourceType": "Observation", "effectivePeriod": {"start": "2020-01-02"}, "issued": "2021-01-01T00:00:00Z"},
         utc(2020, 1, 2)),
        ({"resourceType": "Observation", "issued": "2021-01-01T00:00:00Z"}, utc(2021, 1, 1)),
        ({"resourceType": "Condition", "onsetDateTime": "2019-05", "recordedDate": "2020"}, utc(2019, 5, 1)),
        ({"resourceType": "Condition", "onsetString": "childhood", "recordedDate": "2020"}, utc(2020, 1, 1)),
        ({"resourceType": "Encounter", "period": {"start": "2018-03-04T10:00:00Z"}}, utc(2018, 3, 4, 10)),
        ({"resourceType": "DocumentReference", "date": "2017-01-01T00:00:00Z",
          "context": {"period": {"start": "2016-02-02"}}}, utc(2016, 2, 2)),
        ({"resourceType": "Immunization", "occurrenceDateTime": "2021-04-01"}, utc(2021, 4, 1)),
        ({"resourceType": "MedicationRequest", "authoredOn": "2022-07-08"}, utc(2022, 7, 8)),
        ({"resourceType": "Procedure", "performedPeriod": {"start": "2014-01-01", "end": "2014-01-02"}}, utc(2014, 1, 1)),
    ],
)
def test_clinical_date(resource: dict[str, object], start: datetime) -> None:
    found = clinical_date(resource)
    assert found is not None and found.start == start


def test_clinical_date_missing() -> None:
    assert clinical_date({"resourceType": "Observation", "effectiveDateTime": "soon"}) is None
    assert clinical_date({"resourceType": "Patient", "birthDate": "1970-01-01"}) is None


def test_references_of_collects_every_reference_relative() -> None:
    resource = {
        "resourceType": "DiagnosticReport",
        "subject": {"reference": "Patient/1"},
        "basedOn": [{"reference": "https://h/fhir/ServiceRequest/2"}],
        "result": [{"reference": "Observation/3"}, {"reference": "#c1"}],
        "contained": [{"resourceType": "Observation", "id": "c1", "subject": {"reference": "Patient/1"}}],
    }
    assert references_of(resource) == {"Patient/1", "ServiceRequest/2", "Observation/3"}


def test_authors_of() -> None:
    resource = {
        "resourceType": "Procedure",
        "recorder": {"reference": "Practitioner/1"},
        "asserter": {"reference": "Patient/2"},
        "performer": [{"actor": {"reference": "Organization/3"}}],
        "subject": {"reference": "Patient/2"},
    }
    assert authors_of(resource) == {"Practitioner/1", "Patient/2", "Organization/3"}


def test_main_codes() -> None:
    med = {"resourceType": "MedicationRequest", "medicationCodeableConcept": {
        "coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "197361"}]}}
    assert main_codes(med) == {("http://www.nlm.nih.gov/research/umls/rxnorm", "197361")}
    assert main_codes({"resourceType": "Observation", "code": {"coding": [{"code": "2345-7"}]}}) == {("", "2345-7")}
