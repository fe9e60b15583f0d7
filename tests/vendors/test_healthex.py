"""HealthEx getPatientConsents -> one FHIR Consent per data scope and sensitivity."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.core.model import CONSENT_ACTION_SYSTEM, RESOURCE_SCOPE_SYSTEM, V3_ACT_CODE, V3_PURPOSE_OF_USE, Label
from gateway.core.vendors import CONVERTERS, ConvertOptions, VendorError
from gateway.core.vendors.healthex import (
    RESOURCE_SCOPES,
    SENSITIVITY_SCOPES,
    STUDY_PURPOSE_SYSTEM,
    consents_from_healthex,
)
from tests.vendors._fixtures import fixture


def act(*codes: str) -> tuple[Label, ...]:
    return tuple(Label(V3_ACT_CODE, code) for code in codes)


# What rules/scopes.yaml gives each scope, written out so these tests do not depend on it.
LABELS: dict[str, tuple[Label, ...]] = {
    "NORMAL": (),
    "HIV_OR_STI": act("HIV", "STD"),
    "SUBSTANCE_USE_OR_DRUG_ABUSE": act("ETH", "SUD"),
    "MENTAL_HEALTH": act("PSY", "MH"),
    "GENETIC_TESTING": act("GDIS"),
    "REPRODUCTIVE_HEALTH_DATA": act("SEX", "PREGNANT"),
    "PSYCHOTHERAPY_NOTES": act("PSYTHPN"),
    "SUD_PART_2": act("42CFRPart2"),
    "SICKLE_CELL": act("SICKLE"),
}


def convert(response: Any, **kwargs: Any) -> list[dict[str, Any]]:
    return consents_from_healthex(response, sensitivity_labels=LABELS, **kwargs)


def by_record(consents: list[dict[str, Any]], record_id: str) -> list[dict[str, Any]]:
    return [c for c in consents if c.get("identifier", [{}])[0].get("value") == record_id]


def scope_pair(consent: dict[str, Any]) -> tuple[str | None, tuple[str, ...]]:
    provision = consent["provision"]
    resource = provision["class"][0]["code"] if "class" in provision else None
    return resource, tuple(label["code"] for label in provision.get("securityLabel", []))


def group(index: int) -> Any:
    return [fixture("healthex-consents.json")[index]]


def test_one_consent_per_data_scope_and_sensitivity() -> None:
    consents = by_record(convert(group(0)), "cr-7001")

    assert [scope_pair(c) for c in consents] == [
        ("LABS", ()),
        ("LABS", ("HIV", "STD")),
        ("MEDICATIONS", ("ETH", "SUD")),
        ("DIAGNOSES", ("PSY", "MH")),
        ("CLINICAL_NOTES", ("PSYTHPN",)),
    ]
    hiv = consents[1]
    assert hiv["status"] == "active"
    assert hiv["scope"]["coding"][0]["code"] == "patient-privacy"
    assert hiv["patient"] == {"reference": "Patient/hx-pat-7"}
    assert hiv["dateTime"] == "2024-04-02T14:20:00Z"
    assert hiv["policyRule"] == {"coding": [{"system": V3_ACT_CODE, "code": "OPTIN"}]}
    assert hiv["sourceAttachment"] == {
        "contentType": "application/pdf", "url": "https://files.healthex.example/consents/cr-7001.pdf"
    }
    assert hiv["category"][1] == {
        "coding": [{"system": "urn:consent-gateway:healthex:consent-type", "code": "DATA_AUTHORIZATION"}]
    }
    assert hiv["provision"] == {
        "type": "permit",
        "period": {"end": "2029-04-02T14:20:00Z"},
        "action": [
            {"coding": [{"system": CONSENT_ACTION_SYSTEM, "code": "access"}]},
            {"coding": [{"system": CONSENT_ACTION_SYSTEM, "code": "use"}]},
        ],
        "purpose": [{"system": V3_PURPOSE_OF_USE, "code": "TREAT"}],
        "class": [{"system": RESOURCE_SCOPE_SYSTEM, "code": "LABS"}],
        "securityLabel": [{"system": V3_ACT_CODE, "code": "HIV"}, {"system": V3_ACT_CODE, "code": "STD"}],
    }


def test_declined_exchange_denies_the_record_scopes_for_patient_requests() -> None:
    consents = by_record(convert(group(0)), "cr-7002")

    assert [scope_pair(c) for c in consents] == [("DEMOGRAPHICS", ()), ("CONTACT_INFO", ())]
    for consent in consents:
        assert consent["status"] == "active"
        assert consent["dateTime"] == "2024-04-03T08:00:00Z"
        assert consent["policyRule"]["coding"][0]["code"] == "OPTOUT"
        assert consent["provision"]["type"] == "deny"
        assert consent["provision"]["purpose"] == [{"system": V3_PURPOSE_OF_USE, "code": "PATRQT"}]
        assert consent["provision"]["action"] == [{"coding": [{"system": CONSENT_ACTION_SYSTEM, "code": "disclose"}]}]


def test_future_data_use_is_research_for_the_sites_study() -> None:
    (consent,) = by_record(convert(group(0), study_id="study-42"), "cr-7003")
    assert consent["scope"]["coding"][0]["code"] == "research"
    assert consent["provision"]["purpose"] == [{"system": V3_PURPOSE_OF_USE, "code": "HRESCH"}]
    assert scope_pair(consent) == ("GENOMIC_DATA", ("GDIS",))


def test_future_data_use_for_another_study_decides_no_research_here() -> None:
    for site_study in ("study-43", None):
        (consent,) = by_record(convert(group(0), study_id=site_study), "cr-7003")
        assert consent["provision"]["purpose"] == [{"system": STUDY_PURPOSE_SYSTEM, "code": "study-42"}]


@pytest.mark.parametrize(
    ("consent_type", "scope", "purpose", "actions"),
    [
        ("DATA_AUTHORIZATION", "patient-privacy", "TREAT", ["access", "use"]),
        ("PATIENT_DIRECTED_DATA_EXCHANGE", "patient-privacy", "PATRQT", ["disclose"]),
        ("FUTURE_DATA_USE", "research", "HRESCH", ["use"]),
    ],
)
def test_each_consent_type_maps_to_a_purpose(consent_type: str, scope: str, purpose: str, actions: list[str]) -> None:
    response = group(1)
    response[0]["consents"][0]["consentType"] = consent_type
    consent = convert(response)[0]
    assert consent["scope"]["coding"][0]["code"] == scope
    assert consent["provision"]["purpose"] == [{"system": V3_PURPOSE_OF_USE, "code": purpose}]
    assert [a["coding"][0]["code"] for a in consent["provision"]["action"]] == actions


def test_revoked_denies_what_the_consent_covered_and_expired_is_inactive() -> None:
    consents = convert(group(0))
    (revoked,) = by_record(consents, "cr-6990")
    (expired,) = by_record(consents, "cr-6500")
    # The patient withdrew: an active deny, not "no consent" (a permit default must not open).
    assert revoked["status"] == "active"
    assert revoked["provision"]["type"] == "deny"
    assert revoked["policyRule"]["coding"][0]["code"] == "OPTOUT"
    assert revoked["provision"]["purpose"] == [{"system": V3_PURPOSE_OF_USE, "code": "TREAT"}]
    assert scope_pair(revoked) == ("IMAGING", ())
    assert expired["status"] == "inactive"
    assert expired["provision"]["period"] == {"end": "2023-01-01T00:00:00Z"}


def test_no_response_and_defaults_give_no_consent() -> None:
    consents = convert(group(0))
    assert len(consents) == 5 + 2 + 1 + 1 + 1  # cr-7001, cr-7002, cr-7003, cr-6990, cr-6500
    # The DEFAULTS record (the patient never answered) gives no deny; only the revocation does.
    denies = [c for c in consents if c["category"][1]["coding"][0]["code"] == "DATA_AUTHORIZATION"
              and c["provision"]["type"] == "deny" and c["status"] == "active"]
    assert [d["identifier"][0]["value"] for d in denies] == ["cr-6990"]


def test_every_documented_scope_value_converts() -> None:
    consents = convert(group(1))
    pairs = [scope_pair(c) for c in consents]
    assert {resource for resource, _ in pairs} == set(RESOURCE_SCOPES)
    assert {labels for _, labels in pairs} == {tuple(lb.code for lb in LABELS[s]) for s in SENSITIVITY_SCOPES}
    assert len(consents) == len(RESOURCE_SCOPES) + len(SENSITIVITY_SCOPES) - 1


def test_ids_are_stable_and_distinct() -> None:
    first = [c["id"] for c in convert(fixture("healthex-consents.json"))]
    second = [c["id"] for c in convert(fixture("healthex-consents.json"))]
    assert first == second
    assert len(set(first)) == len(first)
    assert all(len(i) <= 64 for i in first)
    # hx-pat-8's consent has no consentRecordId: its ids hash its content.
    changed = fixture("healthex-consents.json")
    changed[1]["consents"][0]["expirationTimestamp"] = "2031-01-01T00:00:00Z"
    assert [c["id"] for c in convert(changed)][-1] != first[-1]


def test_single_group_object_and_patient_override() -> None:
    single = fixture("healthex-consents.json")[0]
    consents = convert(single, patient_ref="Patient/fhir-7")
    assert {c["patient"]["reference"] for c in consents} == {"Patient/fhir-7"}
    via_registry = CONVERTERS["healthex"](single, ConvertOptions(sensitivity_labels=LABELS))
    assert [c["id"] for c in via_registry] == [c["id"] for c in consents]


def test_patient_override_refuses_a_response_about_two_patients() -> None:
    with pytest.raises(VendorError) as caught:
        convert(fixture("healthex-consents.json"), patient_ref="Patient/fhir-7")
    assert (caught.value.record, caught.value.field) == ("healthex response[1]", "patientId")


def test_revoked_permit_without_data_scopes_denies_all_data_for_its_purpose() -> None:
    response = group(1)
    consent = response[0]["consents"][0]
    consent.update(reason="REVOKED", consentDataScopes=None)
    (converted,) = convert(response)
    assert converted["status"] == "active"
    assert converted["provision"]["type"] == "deny"
    assert scope_pair(converted) == (None, ())  # a deny naming no data covers all data


def test_record_scope_lists_stand_in_for_null_data_scopes() -> None:
    response = group(0)
    consent = response[0]["consents"][0]
    consent["consentDataScopes"] = None
    converted = by_record(convert(response), "cr-7001")
    # 4 resource scopes x 5 sensitivity scopes from consentRecord.
    assert len(converted) == 20
    assert ("CLINICAL_NOTES", ("ETH", "SUD")) in [scope_pair(c) for c in converted]


def first_consent() -> tuple[list[Any], dict[str, Any]]:
    response = group(0)
    return response, response[0]["consents"][0]


@pytest.mark.parametrize(
    ("change", "field", "problem"),
    [
        (lambda c: c.update(consentType="RESEARCH"), "consentType", "unknown value"),
        (lambda c: c.pop("consentType"), "consentType", "missing"),
        (lambda c: c.update(hasPatientConsented="yes"), "hasPatientConsented", "expected true or false"),
        (lambda c: c.pop("hasPatientConsented"), "hasPatientConsented", "missing"),
        (lambda c: c.update(reason="WITHDRAWN"), "reason", "unknown value"),
        (lambda c: c.update(hasPatientConsented=False), "reason", "contradicts"),
        (lambda c: c.update(reason="DECLINED"), "reason", "contradicts"),
        (lambda c: c["consentRecord"].update(consentStatus="OPTED_OUT"), "consentRecord.consentStatus",
         "contradicts"),
        (lambda c: c["consentRecord"].update(consentStatus="MAYBE"), "consentRecord.consentStatus",
         "unknown value"),
        (lambda c: c["consentRecord"].update(consentType="FUTURE_DATA_USE"), "consentRecord.consentType",
         "contradicts"),
        (lambda c: c["consentRecord"].update(patientId="hx-pat-8"), "consentRecord.patientId", "another patient"),
        (lambda c: c["consentRecord"].update(timestamp="yesterday"), "consentRecord.timestamp",
         "expected a date-time"),
        (lambda c: c["consentRecord"].update(consentDataResourceScopes=["XRAYS"]),
         "consentRecord.consentDataResourceScopes[0]", "unknown value"),
        (lambda c: c["consentDataScopes"][1].update(resourceScope="LAB"), "consentDataScopes[1].resourceScope",
         "unknown value"),
        (lambda c: c["consentDataScopes"][1].update(sensitivityScope="HIV"),
         "consentDataScopes[1].sensitivityScope", "unknown value"),
        (lambda c: c["consentDataScopes"][0].pop("sensitivityScope"), "consentDataScopes[0].sensitivityScope",
         "missing"),
        (lambda c: c.update(consentDataScopes=None, consentRecord=None), "consentDataScopes", "must name its data"),
        (lambda c: c.update(consentDataScopes=[], consentRecord=None), "consentDataScopes", "must name its data"),
        (lambda c: c.update(consentDataScopes={"resourceScope": "LABS"}), "consentDataScopes", "expected a list"),
        (lambda c: c.update(expirationTimestamp="2029-13-01"), "expirationTimestamp", "expected a date-time"),
        (lambda c: c.update(source="IAS"), "source", "never returned"),
    ],
)
def test_consent_it_cannot_understand_raises(change: Any, field: str, problem: str) -> None:
    response, consent = first_consent()
    change(consent)
    with pytest.raises(VendorError) as caught:
        convert(response)
    assert caught.value.record == "healthex consent cr-7001"
    assert caught.value.field == field
    assert problem in caught.value.problem


def test_sensitive_scope_without_labels_is_an_error_not_a_wider_permit() -> None:
    labels = dict(LABELS)
    del labels["MENTAL_HEALTH"]
    with pytest.raises(VendorError) as caught:
        consents_from_healthex(group(0), sensitivity_labels=labels)
    assert caught.value.field == "consentDataScopes[3].sensitivityScope"
    assert "MENTAL_HEALTH" in caught.value.problem


def test_group_errors_name_the_position() -> None:
    response = group(1)
    del response[0]["patientId"]
    with pytest.raises(VendorError, match=r"^healthex response\[0\]: patientId: missing$"):
        convert(response)
    response = group(1)
    response[0]["consents"][0]["consentType"] = "OTHER"
    with pytest.raises(VendorError, match=r"^healthex response\[0\]\.consents\[0\]: consentType: "):
        convert(response)
    with pytest.raises(VendorError, match="expected an object or a list"):
        CONVERTERS["healthex"]("[]", ConvertOptions())


@pytest.mark.parametrize("patient_id", ["x/Patient/hx-pat-7", "https://hie.example/fhir/Patient/hx-pat-7"])
def test_a_patient_id_holding_a_path_names_no_patient(patient_id: str) -> None:
    """Converted without the FHIR patient (``convert``), ``Patient/<patientId>`` would name
    another patient (ours of the path's last id, or another server's): it is an error."""
    response = group(0)
    response[0]["patientId"] = patient_id
    for consent in response[0]["consents"]:
        if isinstance(consent.get("consentRecord"), dict):
            consent["consentRecord"]["patientId"] = patient_id
    with pytest.raises(VendorError) as caught:
        convert(response)
    assert caught.value.field == "patientId" and "expected a Patient id" in caught.value.problem
