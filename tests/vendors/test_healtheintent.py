"""HealtheIntent patient consents and consent configurations."""

from __future__ import annotations

from typing import Any

import pytest

from datetime import datetime, timezone

from gateway.core.breakglass import emergency_window
from gateway.core.consent import compile_consent
from gateway.core.decision import Policy, decide
from gateway.core.model import GATEWAY_CODE_SYSTEM, V3_PURPOSE_OF_USE, Actor, RequestContext
from gateway.sources.vendors import personal_emergency
from gateway.core.vendors import CONVERTERS, ConvertOptions, VendorError
from gateway.core.vendors.healtheintent import (
    break_glass_settings_from_healtheintent,
    consent_from_healtheintent,
)
from tests.vendors._fixtures import fixture

PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
ORG = "7582d101-c0bd-45a8-829c-a63f1587ea05"
GROUP = "f2467686-1bc8-4bcf-a768-2cb3541e437e"
PERSON = "f181b922-f5fd-401f-abaf-90475eb15f15"


LAB = {"resourceType": "Observation", "id": "o1", "status": "final", "subject": {"reference": "Patient/he-1"}}


def item(index: int) -> dict[str, Any]:
    record: dict[str, Any] = fixture("healtheintent-consents.json")["items"][index]
    return record


def recipient(reference: str) -> dict[str, Any]:
    return {"role": {"coding": [{"system": PARTICIPATION, "code": "IRCP"}]}, "reference": {"reference": reference}}


def test_patient_granted_permit_keeps_scope_period_and_policy() -> None:
    consent = consent_from_healtheintent(item(0), patient_ref="Patient/he-1")

    assert consent["id"] == "47308251-5337-4221-a0c1-05b348d963ca"
    assert consent["status"] == "active"
    assert consent["patient"] == {"reference": "Patient/he-1"}
    assert consent["dateTime"] == "2021-01-01T08:15:00Z"
    assert consent["scope"]["coding"][0]["code"] == "patient-privacy"
    assert consent["identifier"] == [
        {"system": "urn:consent-gateway:healtheintent:consent", "value": "47308251-5337-4221-a0c1-05b348d963ca"},
        {"type": {"text": "SWEDEN-NS"}, "value": "28c291c7-a2e1-4bec-956a-5ab09a5268c0"},
    ]
    assert consent["category"] == [
        {"coding": [{"system": "http://loinc.org", "code": "59284-0"}]},
        {"coding": [{"system": "urn:consent-gateway:healtheintent:category", "code": "PATIENT_CONSENT_OBSTYPE"}]},
    ]
    assert consent["policyRule"] == {"coding": [{
        "system": "urn:consent-gateway:healtheintent:policy-rule",
        "code": "CONSENT_TYPE_SWEDEN_PDL_COHERENT_JOURNALING_QUAL",
    }]}
    assert consent["provision"] == {
        "type": "permit",
        "period": {"start": "2021-01-01T00:00:00Z", "end": "2031-01-08T00:00:00Z"},
        # unit AND group AND person (Swedish PDL), not any one of them
        "modifierExtension": [{"url": "urn:consent-gateway:extension:actors-all-of", "valueBoolean": True}],
        "actor": [
            recipient(f"Organization/{ORG}"),
            recipient(f"Group/{GROUP}"),
            recipient(f"Practitioner/{PERSON}"),
        ],
    }


def test_deny_with_open_period_and_no_personnel() -> None:
    consent = consent_from_healtheintent(item(1), patient_ref="he-1")
    assert consent["patient"] == {"reference": "Patient/he-1"}
    assert consent["provision"] == {
        "type": "deny",
        "period": {"start": "2022-06-01T00:00:00Z"},
        "actor": [
            recipient("Organization/0c6a1d55-2f0e-4d7b-8b8e-5d3f2a9e7b10"),
            recipient("Group/3b9e7f20-6c1d-4a8f-9e2b-7d5c4a1f0e33"),
        ],
    }


def test_emergency_consent_is_marked_and_keeps_its_reason() -> None:
    consent = consent_from_healtheintent(item(2), patient_ref="Patient/he-1")
    assert consent["category"][-1] == {
        "coding": [{"system": GATEWAY_CODE_SYSTEM, "code": "emergency"}],
        "text": "Patient Unresponsive.",
    }
    assert consent["provision"]["type"] == "permit"
    assert consent["provision"]["purpose"] == [{"system": V3_PURPOSE_OF_USE, "code": "TREAT"}]
    assert consent["provision"]["period"] == {"start": "2024-05-01T02:00:00Z", "end": "2024-05-01T06:00:00Z"}


def test_patient_granted_consent_is_not_marked_emergency_even_with_a_reason() -> None:
    record = item(0)
    record["emergencyConsentReason"] = "Patient Unresponsive."  # as in the documented POST example
    consent = consent_from_healtheintent(record, patient_ref="Patient/he-1")
    assert all(c["coding"][0]["system"] != GATEWAY_CODE_SYSTEM for c in consent["category"])
    assert "purpose" not in consent["provision"]


def test_request_body_shape_is_read_too() -> None:
    record = {
        "createdBy": "12345",
        "category": "PATIENT_CONSENT_OBSTYPE",
        "effectivePeriod": {"start": "2021-01-01T00:00:00Z", "end": "2021-01-08T00:00:00Z"},
        "provisionScope": {"organization": ORG, "organizationGroup": GROUP, "personnel": PERSON},
        "consentReasonType": "PATIENT_GRANTED",
        "provisionType": "DENY",
    }
    consent = consent_from_healtheintent(record, patient_ref="Patient/he-1")
    assert consent["id"].startswith("healtheintent-")
    assert consent["category"][1]["coding"][0]["code"] == "PATIENT_CONSENT_OBSTYPE"
    assert [a["reference"]["reference"] for a in consent["provision"]["actor"]] == [
        f"Organization/{ORG}", f"Group/{GROUP}", f"Practitioner/{PERSON}"
    ]
    assert consent["provision"]["type"] == "deny"


def test_absent_provision_type_leaves_the_decision_to_the_default() -> None:
    record = item(0)
    del record["provisionType"]
    consent = consent_from_healtheintent(record, patient_ref="Patient/he-1")
    assert "type" not in consent["provision"]
    # The scope is nested under a root without conditions: R4 would read an untyped root
    # naming actors as an exception (the opposite of the default) for those actors.
    assert "actor" not in consent["provision"]
    assert not compile_consent(consent).ambiguous
    for actor in (Actor(f"Practitioner/{PERSON}", organization=f"Organization/{ORG}",
                        groups=frozenset({f"Group/{GROUP}"})), Actor("Practitioner/x")):
        for default in ("deny", "permit"):
            ctx = RequestContext(actor=actor, purpose="TREAT", now=datetime(2025, 1, 1, tzinfo=timezone.utc))
            found = decide([compile_consent(consent)], LAB, frozenset(), frozenset(), ctx,
                           Policy(default_decision=default))
            assert found.verdict.value == default
    # The policy rule is HealtheIntent's, not an OPTIN/OPTOUT the engine would act on.
    assert consent["policyRule"]["coding"][0]["system"] != "http://terminology.hl7.org/CodeSystem/v3-ActCode"


def test_page_list_and_single_record_payloads() -> None:
    options = ConvertOptions(patient_ref="Patient/he-1")
    page = CONVERTERS["healtheintent"](fixture("healtheintent-consents.json"), options)
    assert [c["provision"].get("type") for c in page] == ["permit", "deny", "permit"]
    as_list = CONVERTERS["healtheintent"](fixture("healtheintent-consents.json")["items"], options)
    assert as_list == page
    assert CONVERTERS["healtheintent"](item(1), options) == [page[1]]


def test_patient_comes_from_the_record_when_not_given() -> None:
    record = item(0) | {"patientId": "he-2"}
    (consent,) = CONVERTERS["healtheintent"](record, ConvertOptions())
    assert consent["patient"] == {"reference": "Patient/he-2"}
    with pytest.raises(VendorError) as caught:
        CONVERTERS["healtheintent"](item(0), ConvertOptions())
    assert caught.value.field == "patientId"


def mutate(path: str, value: Any) -> dict[str, Any]:
    record = item(0)
    *parents, last = path.split(".")
    node: Any = record
    for key in parents:
        node = node[key]
    if value is None:
        del node[last]
    else:
        node[last] = value
    return record


@pytest.mark.parametrize(
    ("path", "value", "field", "problem"),
    [
        ("provisionType", "ALLOW", "provisionType", "unknown value"),
        ("provisionType", "permit", "provisionType", "unknown value"),
        ("consentReasonType", "DOCTOR_OVERRIDE", "consentReasonType", "unknown value"),
        ("consentReasonType", "EMERGENCY_ACCESS", "emergencyConsentReason", "missing"),
        ("effectivePeriod", None, "effectivePeriod", "missing"),
        ("effectivePeriod.start", None, "effectivePeriod.start", "missing"),
        ("effectivePeriod.start", "2021-01-01 00:00", "effectivePeriod.start", "expected a date-time"),
        ("effectivePeriod.end", "soon", "effectivePeriod.end", "expected a date-time"),
        ("provisionScope", None, "provisionScope", "missing"),
        ("provisionScope.organization", None, "provisionScope.organization", "missing"),
        ("provisionScope.organizationGroup", {"name": "Ward 4"}, "provisionScope.organizationGroup.id", "missing"),
        ("provisionScope.personnel", 42, "provisionScope.personnel", "expected a non-empty string"),
        ("recordedDateTime", "2021-01-01T08:15:00", "recordedDateTime", "expected a date-time"),
        ("aliases", [{"value": "x"}], "aliases[0].system", "missing"),
        ("category", {"id": "x"}, "category.concept", "missing"),
        # An id holding a path would name another resource (here our Dr 1, or another server's).
        ("provisionScope.personnel", {"id": "x/Practitioner/1"}, "provisionScope.personnel.id", "expected a Practitioner id"),
        ("provisionScope.organization", {"id": "https://hie.example/fhir/Organization/1"},
         "provisionScope.organization.id", "expected a Organization id"),
    ],
)
def test_record_it_cannot_understand_raises(path: str, value: Any, field: str, problem: str) -> None:
    with pytest.raises(VendorError) as caught:
        consent_from_healtheintent(mutate(path, value), patient_ref="Patient/he-1")
    assert caught.value.record == "healtheintent consent 47308251-5337-4221-a0c1-05b348d963ca"
    assert caught.value.field == field
    assert problem in caught.value.problem


def test_page_whose_items_are_not_a_list_is_refused() -> None:
    with pytest.raises(VendorError, match="items: expected a list"):
        CONVERTERS["healtheintent"]({"items": {"consentId": "x"}}, ConvertOptions(patient_ref="Patient/he-1"))


# ---------------------------------------------------------------- configurations


def test_configuration_page_gives_break_glass_settings() -> None:
    settings = break_glass_settings_from_healtheintent(fixture("healtheintent-configurations.json"))
    assert settings == {"reasons": ["Patient Unresponsive.", "Imminent threat to life"], "duration_h": 8}


def test_single_configuration_with_a_string_reason() -> None:
    config = {"tenantId": "t-1", "emergencyConsentReasons": "Patient Unresponsive."}
    assert break_glass_settings_from_healtheintent(config) == {"reasons": ["Patient Unresponsive."]}
    assert break_glass_settings_from_healtheintent({"tenantId": "t-1"}) == {}


@pytest.mark.parametrize(
    ("config", "field", "problem"),
    [
        ({"emergencyConsentDuration": 0}, "emergencyConsentDuration", "positive integer"),
        ({"emergencyConsentDuration": "8"}, "emergencyConsentDuration", "positive integer"),
        ({"emergencyConsentDuration": True}, "emergencyConsentDuration", "positive integer"),
        ({"emergencyConsentReasons": []}, "emergencyConsentReasons", "empty"),
        ({"emergencyConsentReasons": ["ok", 3]}, "emergencyConsentReasons[1]", "non-empty string"),
        ({"items": []}, "items", "exactly one"),
        ({"items": [{"tenantId": "a"}, {"tenantId": "b"}]}, "items", "exactly one"),
    ],
)
def test_configuration_it_cannot_understand_raises(config: dict[str, Any], field: str, problem: str) -> None:
    with pytest.raises(VendorError) as caught:
        break_glass_settings_from_healtheintent(config)
    assert caught.value.field == field
    assert problem in caught.value.problem


def test_deny_matches_any_part_of_the_scope() -> None:
    consent = consent_from_healtheintent(item(1), patient_ref="Patient/he-1")
    # A restriction reads wide: no all-of modifier on a DENY.
    assert "modifierExtension" not in consent["provision"]


def test_record_without_end_lasts_the_configured_consent_duration() -> None:
    (consent,) = CONVERTERS["healtheintent"](
        item(1), ConvertOptions(patient_ref="Patient/he-1", consent_duration_h=48)
    )
    assert consent["provision"]["period"] == {"start": "2022-06-01T00:00:00Z", "end": "2022-06-03T00:00:00Z"}
    # Without a configured duration it stays open-ended, as the documentation says of a blank end.
    (open_ended,) = CONVERTERS["healtheintent"](item(1), ConvertOptions(patient_ref="Patient/he-1"))
    assert open_ended["provision"]["period"] == {"start": "2022-06-01T00:00:00Z"}


def test_emergency_record_without_end_lasts_the_emergency_duration() -> None:
    record = item(2)
    del record["effectivePeriod"]["end"]
    (consent,) = CONVERTERS["healtheintent"](
        record, ConvertOptions(patient_ref="Patient/he-1", consent_duration_h=480, emergency_duration_h=4)
    )
    assert consent["provision"]["period"]["end"] == "2024-05-01T06:00:00Z"


def test_emergency_record_without_personnel_is_an_audited_window_for_the_unit() -> None:
    record = item(2)
    record["provisionScope"]["personnel"] = {}
    window = emergency_window(personal_emergency(consent_from_healtheintent(record, patient_ref="Patient/he-1")))
    assert window is not None
    assert window.reason == "Patient Unresponsive."
    member = Actor("Practitioner/nurse", organization=f"Organization/{ORG}", groups=frozenset({f"Group/{GROUP}"}))
    assert window.covers(member)
    assert not window.covers(Actor("Practitioner/nurse", organization=f"Organization/{ORG}"))
    assert not window.covers(Actor("Practitioner/nurse", groups=frozenset({f"Group/{GROUP}"})))


def test_emergency_record_with_personnel_is_that_person_in_the_unit() -> None:
    window = emergency_window(personal_emergency(consent_from_healtheintent(item(2), patient_ref="Patient/he-1")))
    assert window is not None
    person = "Practitioner/a0d3c5e7-1b2f-4c6d-8e9a-0f1b2c3d4e5f"
    assert window.covers(Actor(person, organization=f"Organization/{ORG}", groups=frozenset({f"Group/{GROUP}"})))
    assert not window.covers(Actor(person, organization="Organization/elsewhere", groups=frozenset({f"Group/{GROUP}"})))


def test_window_the_gateway_stored_opens_to_its_person_only() -> None:
    record = item(2)
    own = frozenset({f"Organization/{ORG}", f"Group/{GROUP}"})
    window = emergency_window(personal_emergency(consent_from_healtheintent(record, patient_ref="Patient/he-1"), own))
    assert window is not None and window.requires == frozenset()
    assert window.covers(Actor("Practitioner/a0d3c5e7-1b2f-4c6d-8e9a-0f1b2c3d4e5f"))
