"""ClinikAPI consents and documents -> FHIR R4 Consent / Composition."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.core.model import CONSENT_ACTION_SYSTEM, V3_ACT_CODE, V3_CONFIDENTIALITY, V3_PURPOSE_OF_USE, Label
from gateway.core.vendors import CONVERTERS, ConvertOptions, VendorError
from gateway.core.vendors.clinikapi import (
    SCOPES,
    STATUSES,
    composition_from_clinikapi_document,
    consent_from_clinikapi,
    document_labels,
    labels_by_document,
)
from tests.vendors._fixtures import fixture

ACT = V3_ACT_CODE
TYPES = "http://hl7.org/fhir/resource-types"
PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"


def full_record() -> dict[str, Any]:
    record: dict[str, Any] = fixture("clinikapi-consents.json")[0]
    return record


def test_full_record_keeps_every_decision_field() -> None:
    consent = consent_from_clinikapi(full_record())

    assert consent["resourceType"] == "Consent"
    assert consent["id"] == "ck-consent-1"
    assert consent["status"] == "active"
    assert consent["scope"] == {
        "coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]
    }
    assert consent["category"] == [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}]
    assert consent["patient"] == {"reference": "Patient/pat-100"}
    assert consent["dateTime"] == "2024-02-01T09:30:00Z"
    assert consent["performer"] == [{"reference": "Patient/pat-100"}]
    assert consent["organization"] == [{"reference": "Organization/org-stmary"}]
    assert consent["policyRule"] == {"coding": [{"system": ACT, "code": "OPTIN"}]}
    assert consent["policy"] == [
        {"uri": "https://example.org/policies/privacy-2024"},
        {"authority": "https://www.hhs.gov/hipaa", "uri": "https://www.hhs.gov/hipaa/for-professionals/privacy"},
    ]
    assert consent["sourceAttachment"]["url"].endswith("ck-consent-1.pdf")
    assert consent["verification"] == [
        {"verified": True, "verifiedWith": {"reference": "Patient/pat-100"},
         "verificationDate": "2024-02-01T09:35:00Z"}
    ]
    assert consent["provision"] == {
        "type": "permit",
        "period": {"start": "2024-02-01T00:00:00Z", "end": "2030-12-31T23:59:59Z"},
        "actor": [
            {"role": {"coding": [{"system": PARTICIPATION, "code": "PRCP"}]},
             "reference": {"reference": "Practitioner/dr-ada"}},
            {"role": {"coding": [{"system": PARTICIPATION, "code": "PRCP"}]},
             "reference": {"reference": "Organization/org-stmary"}},
        ],
        "action": [{"coding": [{"system": CONSENT_ACTION_SYSTEM, "code": "access", "display": "Access"}]}],
        "purpose": [{"system": V3_PURPOSE_OF_USE, "code": "TREAT", "display": "treatment"}],
        "class": [
            {"system": TYPES, "code": "Condition", "display": "Condition"},
            {"system": TYPES, "code": "Observation", "display": "Observation"},
        ],
        "dataPeriod": {"start": "2015-01-01", "end": "2030-12-31"},
        "provision": [
            {"type": "permit", "securityLabel": [
                {"system": ACT, "code": "PSY", "display": "psychiatry disorder information sensitivity"}]},
            {
                "type": "deny",
                "securityLabel": [{"system": ACT, "code": "HIV", "display": "HIV/AIDS information sensitivity"}],
                "provision": [{
                    "type": "permit",
                    "actor": [{"role": {"coding": [{"system": PARTICIPATION, "code": "PRCP"}]},
                               "reference": {"reference": "Practitioner/dr-ada"}}],
                    # A purpose without a system is a v3 PurposeOfUse code.
                    "purpose": [{"system": V3_PURPOSE_OF_USE, "code": "ETREAT", "display": "Emergency Treatment"}],
                }],
            },
            # no meaning given, on a deny: the safe reading is related
            {"type": "deny", "data": [{"meaning": "related", "reference": {"reference": "Observation/obs-phq9"}}]},
        ],
    }


def test_untyped_provision_keeps_policy_rule_and_conditions() -> None:
    record = fixture("clinikapi-consents.json")[1]
    del record["provision"]["type"]
    consent = consent_from_clinikapi(record)

    assert consent["policyRule"] == {"coding": [{"system": ACT, "code": "OPTOUT"}]}
    assert "type" not in consent["provision"]
    assert consent["patient"] == {"reference": "Patient/pat-100"}
    assert consent["category"] == [
        {"coding": [{"system": ACT, "code": "INFA"}]},
        {"coding": [{"system": "http://loinc.org", "code": "59284-0"}]},
    ]
    assert consent["provision"]["action"] == [{"coding": [{"system": CONSENT_ACTION_SYSTEM, "code": "disclose"}]}]
    assert consent["provision"]["dataPeriod"] == {"start": "2020-01-01"}
    assert consent["provision"]["data"] == [{"meaning": "related", "reference": {"reference": "Condition/cond-f32"}}]


@pytest.mark.parametrize("status", STATUSES)
def test_each_status_is_kept(status: str) -> None:
    record = full_record()
    record["status"] = status
    assert consent_from_clinikapi(record)["status"] == status


@pytest.mark.parametrize("scope", SCOPES)
def test_each_scope_becomes_a_consentscope_code(scope: str) -> None:
    record = full_record()
    record["scope"] = scope
    assert consent_from_clinikapi(record)["scope"]["coding"][0]["code"] == scope


def test_unrecognised_policy_rule_is_text_so_the_default_decides() -> None:
    record = full_record()
    record["policyRule"] = "hipaa-auth"
    assert consent_from_clinikapi(record)["policyRule"] == {"text": "hipaa-auth"}


def test_same_record_without_id_gets_the_same_id_every_time() -> None:
    record = full_record()
    del record["id"]
    first = consent_from_clinikapi(record)["id"]
    assert first.startswith("clinikapi-")
    again = full_record()
    del again["id"]
    assert consent_from_clinikapi(again)["id"] == first
    record["dateTime"] = "2024-02-02T09:30:00Z"
    assert consent_from_clinikapi(record)["id"] != first


def test_converter_takes_a_list_and_repoints_the_patient() -> None:
    consents = CONVERTERS["clinikapi"](
        fixture("clinikapi-consents.json"), ConvertOptions(patient_ref="Patient/fhir-9")
    )
    assert [c["id"] for c in consents] == ["ck-consent-1", "ck-consent-2"]
    assert {c["patient"]["reference"] for c in consents} == {"Patient/fhir-9"}


def _set(record: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    node: Any = record
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    index: Any = int(last) if isinstance(node, list) else last
    if value is _DELETE:
        del node[index]
    else:
        node[index] = value


_DELETE = object()


@pytest.mark.parametrize(
    ("path", "value", "field", "problem"),
    [
        ("patientId", _DELETE, "patientId", "missing"),
        ("patientId", "Practitioner/dr-ada", "patientId", "expected a Patient id"),
        ("scope", "marketing", "scope", "unknown value"),
        ("category", _DELETE, "category", "missing"),
        ("status", _DELETE, "status", "missing"),
        ("status", "entered-in-error", "status", "unknown value"),
        ("dateTime", "01/02/2024", "dateTime", "expected a date-time"),
        ("provision.type", "allow", "provision.type", "unknown value"),
        ("provision.exceptions", [], "provision.exceptions", "unknown field"),
        ("provision.actor.0.reference", "dr-ada", "provision.actor[0].reference", "expected Type/id"),
        ("provision.actor.0.reference", "Encounter/e1", "provision.actor[0].reference", "expected Type/id"),
        ("provision.action.0.code", "read", "provision.action[0].code", "unknown value"),
        ("provision.purpose.0", {"system": V3_PURPOSE_OF_USE}, "provision.purpose[0].code", "missing"),
        ("provision.period.end", "tomorrow", "provision.period.end", "expected a date-time"),
        ("provision.class", {"code": "Condition"}, "provision.class", "expected a list"),
        ("provision.provision.1.type", "maybe", "provision.provision[1].type", "unknown value"),
        ("provision.provision.2.data.0.reference", "obs-phq9", "provision.provision[2].data[0].reference",
         "expected Type/id"),
        ("provision.provision.2.data.0.meaning", "everything", "provision.provision[2].data[0].meaning",
         "unknown value"),
        ("verification.0.verified", "yes", "verification[0].verified", "expected true or false"),
    ],
)
def test_record_it_cannot_understand_raises_naming_record_and_field(
    path: str, value: Any, field: str, problem: str
) -> None:
    record = full_record()
    _set(record, path, value)
    with pytest.raises(VendorError) as caught:
        consent_from_clinikapi(record)
    assert caught.value.record == "clinikapi consent ck-consent-1"
    assert caught.value.field == field
    assert problem in caught.value.problem
    assert "\n" not in str(caught.value)


def test_error_names_a_record_without_id_by_position() -> None:
    records = fixture("clinikapi-consents.json")
    del records[1]["id"]
    records[1]["scope"] = "marketing"
    with pytest.raises(VendorError, match=r"^clinikapi consent \[1\]: scope: unknown value"):
        CONVERTERS["clinikapi"](records, ConvertOptions())


def test_error_message_never_repeats_the_value() -> None:
    record = full_record()
    record["status"] = "Jordan Lee HIV positive"
    with pytest.raises(VendorError) as caught:
        consent_from_clinikapi(record)
    assert "Jordan" not in str(caught.value)


# ---------------------------------------------------------------- documents


@pytest.mark.parametrize(
    ("index", "labels"),
    [
        (0, (Label(V3_CONFIDENTIALITY, "R"),)),
        (1, (Label(V3_CONFIDENTIALITY, "V"),)),
        (2, ()),  # N: normal
        (3, ()),  # absent
    ],
)
def test_document_labels_follow_confidentiality(index: int, labels: tuple[Label, ...]) -> None:
    doc = fixture("clinikapi-documents.json")[index]
    assert document_labels(doc) == labels
    composition = composition_from_clinikapi_document(doc)
    assert composition.get("meta", {}).get("security", []) == [
        {"system": V3_CONFIDENTIALITY, "code": lb.code} for lb in labels
    ]


def test_document_becomes_a_composition() -> None:
    composition = composition_from_clinikapi_document(fixture("clinikapi-documents.json")[0])

    assert composition["resourceType"] == "Composition"
    assert composition["id"] == "ck-doc-1"
    assert composition["status"] == "final"
    assert composition["confidentiality"] == "R"
    assert composition["type"] == {
        "coding": [{"system": "http://loinc.org", "code": "18842-5"}], "text": "discharge-summary"
    }
    assert composition["subject"] == {"reference": "Patient/pat-100"}
    assert composition["author"] == [{"reference": "Practitioner/dr-ada"}]
    assert composition["encounter"] == {"reference": "Encounter/enc-9"}
    assert composition["custodian"] == {"reference": "Organization/org-stmary"}
    assert composition["date"] == "2024-02-03T16:00:00Z"
    assert composition["category"] == [{"text": "clinical-note"}]
    section = composition["section"][0]
    assert section["code"] == {"coding": [{"system": "http://loinc.org", "code": "8648-8"}]}
    assert section["author"] == [{"reference": "Practitioner/dr-ada"}]
    assert section["entry"] == [{"reference": "Condition/cond-f32"}, {"identifier": {"value": "enc-9"}}]
    assert "&lt;recurrent&gt;" in section["text"]["div"]
    assert section["section"][0]["code"] == {"coding": [{"system": "http://snomed.info/sct", "code": "35489007"}]}
    assert composition["event"] == [{
        "code": [{"coding": [{"system": "http://snomed.info/sct", "code": "32485007",
                              "display": "Hospital admission"}]}],
        "period": {"start": "2024-01-28T10:00:00Z", "end": "2024-02-03T15:00:00Z"},
        "detail": [{"reference": "Encounter/enc-9"}],
    }]


def test_unknown_document_type_and_free_text_section_code_stay_text() -> None:
    composition = composition_from_clinikapi_document(fixture("clinikapi-documents.json")[3])
    assert composition["type"] == {"text": "patient-letter"}
    assert composition["section"][0]["code"] == {"text": "free-text-section"}


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("status", None, "missing"),
        ("status", "draft", "unknown value"),
        ("confidentiality", "X", "unknown value"),
        ("confidentiality", "r", "unknown value"),
        ("title", None, "missing"),
        ("practitionerId", None, "missing"),
        ("sections", [], "expected 1 to 50 sections"),
        ("sections", [{"title": "s"}] * 51, "expected 1 to 50 sections"),
    ],
)
def test_document_it_cannot_understand_raises(key: str, value: Any, problem: str) -> None:
    doc = fixture("clinikapi-documents.json")[0]
    doc[key] = value
    with pytest.raises(VendorError) as caught:
        composition_from_clinikapi_document(doc)
    assert caught.value.record == "clinikapi document ck-doc-1"
    assert caught.value.field == key
    assert problem in caught.value.problem


def test_policy_rule_given_as_a_policy_uri_counts_as_the_directive() -> None:
    record = fixture("clinikapi-consents.json")[1]
    for uri, code in (("http://hl7.org/fhir/ConsentPolicy/opt-out", "OPTOUT"),
                      ("http://hl7.org/fhir/ConsentPolicy/opt-in", "OPTIN")):
        record["policyRule"] = uri
        assert consent_from_clinikapi(record)["policyRule"] == {"coding": [{"system": ACT, "code": code}]}


def _data_meaning(provision: dict[str, Any], policy_rule: str | None = None) -> str:
    record = fixture("clinikapi-consents.json")[1]
    record["provision"] = provision
    record["policyRule"] = policy_rule
    converted = consent_from_clinikapi(record)["provision"]
    while "data" not in converted:
        converted = converted["provision"][0]
    meaning: str = converted["data"][0]["meaning"]
    return meaning


def test_data_without_meaning_reads_the_safe_way_for_its_provision() -> None:
    data = [{"reference": "Condition/cond-f32"}]
    assert _data_meaning({"type": "deny", "data": data}) == "related"
    assert _data_meaning({"type": "permit", "data": data}) == "instance"
    # Untyped nested provisions inherit their parent's type.
    assert _data_meaning({"type": "deny", "provision": [{"data": data}]}) == "related"
    # An untyped root is R4's exception to the base: the opposite of OPTIN is a deny.
    assert _data_meaning({"data": data}, "OPTIN") == "related"
    assert _data_meaning({"data": data}, "OPTOUT") == "instance"
    # A meaning given is kept.
    assert _data_meaning({"type": "deny", "data": [{**data[0], "meaning": "instance"}]}) == "instance"


def test_labels_by_document_name_the_composition_each_becomes() -> None:
    documents = fixture("clinikapi-documents.json")
    found = labels_by_document(documents)
    first = composition_from_clinikapi_document(documents[0])
    second = composition_from_clinikapi_document(documents[1])
    assert found == {
        f"Composition/{first['id']}": (Label(V3_CONFIDENTIALITY, "R"),),
        f"Composition/{second['id']}": (Label(V3_CONFIDENTIALITY, "V"),),
    }  # N and no confidentiality are the default: nothing to add
