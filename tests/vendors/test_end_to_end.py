"""Converted vendor consents decided by the real engine with the bundled rules."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime
from typing import Any

import pytest

from gateway.core.compartment import references_of
from gateway.core.consent import compile_consent
from gateway.core.decision import Policy, decide
from gateway.core.labels import LabelIndex
from gateway.core.model import Actor, Decision, Reason, RequestContext, Verdict
from gateway.core.vendors import CONVERTERS, ConvertOptions
from gateway.core.vendors.clinikapi import composition_from_clinikapi_document
from gateway.rules import load_rules
from tests.vendors._fixtures import fixture

LOINC = "http://loinc.org"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
OBS_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"


@pytest.fixture(scope="module")
def rules() -> LabelIndex:
    return load_rules(None)


def observation(rid: str, patient: str, code: str, category: str = "laboratory") -> dict[str, Any]:
    return {
        "resourceType": "Observation", "id": rid, "status": "final",
        "category": [{"coding": [{"system": OBS_CATEGORY, "code": category}]}],
        "code": {"coding": [{"system": LOINC, "code": code}]},
        "subject": {"reference": patient},
        "effectiveDateTime": "2024-03-10T08:00:00Z",
    }


def condition(rid: str, patient: str, icd: str) -> dict[str, Any]:
    return {
        "resourceType": "Condition", "id": rid,
        "code": {"coding": [{"system": ICD10CM, "code": icd}]},
        "subject": {"reference": patient},
        "onsetDateTime": "2023-11-02",
    }


# What the FHIR server holds of the records consents name as related targets.
SERVER: dict[str, dict[str, Any]] = {
    "Observation/obs-phq9": observation("obs-phq9", "Patient/pat-100", "44249-1", "survey"),
    "Condition/cond-f32": condition("cond-f32", "Patient/pat-100", "F32.9"),
}


def verdict(
    rules: LabelIndex,
    consents: list[dict[str, Any]],
    resource: dict[str, Any],
    actor: Actor,
    *,
    purpose: str = "TREAT",
    now: str = "2025-01-15T12:00:00+00:00",
    default: str = "deny",
) -> Verdict:
    """The verdict of ``decide`` for one resource."""
    return decision(rules, consents, resource, actor, purpose=purpose, now=now, default=default).verdict


def decision(
    rules: LabelIndex,
    consents: list[dict[str, Any]],
    resource: dict[str, Any],
    actor: Actor,
    *,
    purpose: str = "TREAT",
    now: str = "2025-01-15T12:00:00+00:00",
    default: str = "deny",
) -> Decision:
    compiled = [compile_consent(c) for c in consents]
    assert all(not c.defects for c in compiled), [c.defects for c in compiled]
    # As the consent cache does: each related target read from the FHIR server.
    compiled = [
        replace(c, related={t: references_of(SERVER[t]) for t in c.related_targets if t in SERVER})
        for c in compiled
    ]
    ctx = RequestContext(actor=actor, purpose=purpose, now=datetime.fromisoformat(now))
    policy = Policy(default_decision=default, sensitive=rules.sensitive)
    return decide(compiled, resource, rules.labels_for(resource), rules.scopes_for(resource), ctx, policy)


# ---------------------------------------------------------------- ClinikAPI

ADA = Actor("Practitioner/dr-ada")


@pytest.fixture
def clinikapi_consents() -> list[dict[str, Any]]:
    return CONVERTERS["clinikapi"](fixture("clinikapi-consents.json")[:1], ConvertOptions())


CK1 = "Consent/ck-consent-1"


@pytest.mark.parametrize(
    ("resource", "reason", "expected"),
    [
        # Root permit: a plain lab result for dr-ada, for treatment.
        (observation("obs-glu", "Patient/pat-100", "2345-7"), Reason(CK1, "provision", "permit"), Verdict.PERMIT),
        # Nested permit names PSY: a depression diagnosis opens.
        (condition("cond-f32", "Patient/pat-100", "F32.9"), Reason(CK1, "provision.provision[0]", "permit"),
         Verdict.PERMIT),
        # Nested deny for HIV-labelled data.
        (observation("obs-hiv", "Patient/pat-100", "7917-8"), Reason(CK1, "provision.provision[1]", "deny"),
         Verdict.DENY),
        # PHQ-9 is PSY-labelled (nested permit) and denied as an instance (nested deny): deny.
        (observation("obs-phq9", "Patient/pat-100", "44249-1", "survey"),
         Reason(CK1, "provision.provision[2]", "sibling-conflict"), Verdict.DENY),
    ],
)
def test_clinikapi_provision_tree_decides(
    rules: LabelIndex,
    clinikapi_consents: list[dict[str, Any]],
    resource: dict[str, Any],
    reason: Reason,
    expected: Verdict,
) -> None:
    found = decision(rules, clinikapi_consents, resource, ADA)
    assert (found.verdict, found.reasons) == (expected, (reason,))


@pytest.mark.parametrize(
    ("resource", "actor", "purpose", "expected"),
    [
        # Another practitioner (organization not the consent's): no consent applies.
        (observation("obs-glu", "Patient/pat-100", "2345-7"), Actor("Practitioner/dr-bo"), "TREAT", Verdict.DENY),
        # Acting for the consent's organization matches its actor.
        (observation("obs-glu", "Patient/pat-100", "2345-7"),
         Actor("Practitioner/dr-bo", organization="Organization/org-stmary"), "TREAT", Verdict.PERMIT),
        # Payment is not a purpose the consent permits.
        (observation("obs-glu", "Patient/pat-100", "2345-7"), ADA, "HPAYMT", Verdict.DENY),
    ],
)
def test_clinikapi_consent_decides(
    rules: LabelIndex,
    clinikapi_consents: list[dict[str, Any]],
    resource: dict[str, Any],
    actor: Actor,
    purpose: str,
    expected: Verdict,
) -> None:
    assert verdict(rules, clinikapi_consents, resource, actor, purpose=purpose) is expected


def test_clinikapi_consent_period_is_enforced(rules: LabelIndex, clinikapi_consents: list[dict[str, Any]]) -> None:
    glucose = observation("obs-glu", "Patient/pat-100", "2345-7")
    assert verdict(rules, clinikapi_consents, glucose, ADA, now="2031-06-01T00:00:00+00:00") is Verdict.DENY


def test_clinikapi_opt_out_policy_rule_denies(rules: LabelIndex) -> None:
    consents = CONVERTERS["clinikapi"](fixture("clinikapi-consents.json")[1:], ConvertOptions())
    payer = Actor("Organization/org-payer")
    cond = condition("cond-f32", "Patient/pat-100", "E11.9")
    assert verdict(rules, consents, cond, payer, default="permit") is Verdict.DENY
    other = condition("cond-other", "Patient/pat-100", "E11.9")
    assert verdict(rules, consents, other, Actor("Practitioner/dr-ada"), default="permit") is Verdict.PERMIT


@pytest.mark.parametrize(("index", "expected"), [(0, Verdict.DENY), (1, Verdict.DENY), (2, Verdict.PERMIT)])
def test_restricted_documents_need_a_consent_naming_their_label(
    rules: LabelIndex, index: int, expected: Verdict
) -> None:
    composition = composition_from_clinikapi_document(fixture("clinikapi-documents.json")[index])
    general_permit = CONVERTERS["clinikapi"]({
        "id": "ck-general", "patientId": "pat-100", "scope": "patient-privacy", "category": "59284-0",
        "status": "active", "policyRule": "OPTIN",
        "provision": {"type": "permit", "actor": [{"role": "PRCP", "reference": "Practitioner/dr-ada"}]},
    }, ConvertOptions())
    assert verdict(rules, general_permit, composition, ADA) is expected


def test_a_consent_naming_r_opens_a_restricted_document(rules: LabelIndex) -> None:
    composition = composition_from_clinikapi_document(fixture("clinikapi-documents.json")[0])
    consents = CONVERTERS["clinikapi"]({
        "id": "ck-r", "patientId": "pat-100", "scope": "patient-privacy", "category": "59284-0",
        "status": "active",
        "provision": {
            "type": "permit",
            "actor": [{"role": "PRCP", "reference": "Practitioner/dr-ada"}],
            "securityLabel": [
                {"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "code": "R"},
                {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "PSY"},
            ],
        },
    }, ConvertOptions())
    assert verdict(rules, consents, composition, ADA) is Verdict.PERMIT


# ---------------------------------------------------------------- HealthEx


@pytest.fixture
def healthex_consents(rules: LabelIndex) -> list[dict[str, Any]]:
    labels = {s: rules.sensitivity_scope_labels(s) for s in rules.sensitivity_scope_names}
    return CONVERTERS["healthex"](fixture("healthex-consents.json")[:1], ConvertOptions(sensitivity_labels=labels))


DOC = Actor("Practitioner/any-doc")
PATIENT_7 = {"resourceType": "Patient", "id": "hx-pat-7", "name": [{"family": "Lee"}]}


@pytest.mark.parametrize(
    ("resource", "purpose", "default", "expected"),
    [
        # LABS / NORMAL permit opens a plain lab result for treatment.
        (observation("o1", "Patient/hx-pat-7", "2345-7"), "TREAT", "deny", Verdict.PERMIT),
        # LABS / HIV_OR_STI names HIV: the HIV antibody test opens too.
        (observation("o2", "Patient/hx-pat-7", "7917-8"), "TREAT", "deny", Verdict.PERMIT),
        # The data authorization is for treatment, not research.
        (observation("o1", "Patient/hx-pat-7", "2345-7"), "HRESCH", "deny", Verdict.DENY),
        # DIAGNOSES / MENTAL_HEALTH names PSY: a depression diagnosis opens.
        (condition("c1", "Patient/hx-pat-7", "F32.9"), "TREAT", "deny", Verdict.PERMIT),
        # No DIAGNOSES / NORMAL scope was consented: a plain diagnosis is not opened.
        (condition("c2", "Patient/hx-pat-7", "E11.9"), "TREAT", "deny", Verdict.DENY),
        # The revocation covers IMAGING only: a diagnosis falls to the default.
        (condition("c2", "Patient/hx-pat-7", "E11.9"), "TREAT", "permit", Verdict.PERMIT),
        # The patient revoked the IMAGING authorization: a permit default must not reopen it.
        ({"resourceType": "ImagingStudy", "id": "img1", "status": "available",
          "subject": {"reference": "Patient/hx-pat-7"}}, "TREAT", "permit", Verdict.DENY),
        # Declined patient-directed exchange of demographics.
        (PATIENT_7, "PATRQT", "permit", Verdict.DENY),
        (PATIENT_7, "TREAT", "permit", Verdict.PERMIT),
    ],
)
def test_healthex_consents_decide(
    rules: LabelIndex,
    healthex_consents: list[dict[str, Any]],
    resource: dict[str, Any],
    purpose: str,
    default: str,
    expected: Verdict,
) -> None:
    assert verdict(rules, healthex_consents, resource, DOC, purpose=purpose, default=default) is expected


def test_healthex_research_consent_decides_only_its_own_study(rules: LabelIndex) -> None:
    labels = {s: rules.sensitivity_scope_labels(s) for s in rules.sensitivity_scope_names}
    brca = {
        "resourceType": "Observation", "id": "g1", "status": "final",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "GE"}]}],
        "code": {"coding": [{"system": LOINC, "code": "21636-6"}]},
        "subject": {"reference": "Patient/hx-pat-7"}, "effectiveDateTime": "2024-03-10T08:00:00Z",
    }
    for study, expected in (("study-42", Verdict.PERMIT), ("study-43", Verdict.DENY), (None, Verdict.DENY)):
        consents = CONVERTERS["healthex"](
            fixture("healthex-consents.json")[:1], ConvertOptions(sensitivity_labels=labels, study_id=study)
        )
        assert verdict(rules, consents, brca, DOC, purpose="HRESCH") is expected, study


def test_healthex_consent_expires(rules: LabelIndex, healthex_consents: list[dict[str, Any]]) -> None:
    lab = observation("o1", "Patient/hx-pat-7", "2345-7")
    assert verdict(rules, healthex_consents, lab, DOC, now="2029-04-02T14:19:00+00:00") is Verdict.PERMIT
    assert verdict(rules, healthex_consents, lab, DOC, now="2029-04-02T14:21:00+00:00") is Verdict.DENY


# ---------------------------------------------------------------- HealtheIntent

UNIT = "Organization/7582d101-c0bd-45a8-829c-a63f1587ea05"
UNIT_GROUP = frozenset({"Group/f2467686-1bc8-4bcf-a768-2cb3541e437e"})
# PDL: the permit is for this person, acting for this care unit, in its group.
PERSON = Actor("Practitioner/f181b922-f5fd-401f-abaf-90475eb15f15", organization=UNIT, groups=UNIT_GROUP)
PERSON_ALONE = Actor("Practitioner/f181b922-f5fd-401f-abaf-90475eb15f15")
PERSON_ELSEWHERE = Actor("Practitioner/f181b922-f5fd-401f-abaf-90475eb15f15", organization="Organization/x",
                         groups=UNIT_GROUP)
GROUP_COLLEAGUE = Actor("Practitioner/p-2", organization=UNIT, groups=UNIT_GROUP)
ORG_MEMBER = Actor("Practitioner/p-2", organization=UNIT)
DENIED_ORG_MEMBER = Actor("Practitioner/p-3", organization="Organization/0c6a1d55-2f0e-4d7b-8b8e-5d3f2a9e7b10")
EMERGENCY_ACTOR = Actor("Practitioner/a0d3c5e7-1b2f-4c6d-8e9a-0f1b2c3d4e5f", organization=UNIT, groups=UNIT_GROUP)


@pytest.fixture
def healtheintent_consents() -> list[dict[str, Any]]:
    return CONVERTERS["healtheintent"](
        fixture("healtheintent-consents.json"), ConvertOptions(patient_ref="Patient/he-1")
    )


@pytest.mark.parametrize(
    ("actor", "now", "default", "expected"),
    [
        (PERSON, "2025-01-15T12:00:00+00:00", "deny", Verdict.PERMIT),
        # provisionScope is unit AND group AND person: no part alone opens the permit.
        (PERSON_ALONE, "2025-01-15T12:00:00+00:00", "deny", Verdict.DENY),
        (PERSON_ELSEWHERE, "2025-01-15T12:00:00+00:00", "deny", Verdict.DENY),
        (GROUP_COLLEAGUE, "2025-01-15T12:00:00+00:00", "deny", Verdict.DENY),
        (ORG_MEMBER, "2025-01-15T12:00:00+00:00", "deny", Verdict.DENY),
        (DENIED_ORG_MEMBER, "2025-01-15T12:00:00+00:00", "permit", Verdict.DENY),
        (Actor("Practitioner/elsewhere"), "2025-01-15T12:00:00+00:00", "deny", Verdict.DENY),
        # The permit ended 2031-01-08.
        (PERSON, "2031-02-01T00:00:00+00:00", "deny", Verdict.DENY),
        # The emergency consent's four-hour window.
        (EMERGENCY_ACTOR, "2024-05-01T03:00:00+00:00", "deny", Verdict.PERMIT),
        (EMERGENCY_ACTOR, "2024-05-01T07:00:00+00:00", "deny", Verdict.DENY),
    ],
)
def test_healtheintent_consents_decide(
    rules: LabelIndex,
    healtheintent_consents: list[dict[str, Any]],
    actor: Actor,
    now: str,
    default: str,
    expected: Verdict,
) -> None:
    lab = observation("o1", "Patient/he-1", "2345-7")
    assert verdict(rules, healtheintent_consents, lab, actor, now=now, default=default) is expected


def test_healtheintent_emergency_consent_does_not_open_sensitive_data(
    rules: LabelIndex, healtheintent_consents: list[dict[str, Any]]
) -> None:
    hiv = observation("o2", "Patient/he-1", "7917-8")
    assert verdict(rules, healtheintent_consents, hiv, EMERGENCY_ACTOR, now="2024-05-01T03:00:00+00:00") is Verdict.DENY


def _scope_consent(rules: LabelIndex, *scopes: str) -> dict[str, Any]:
    """A permit naming the labels the HealthEx sensitivity scopes open (as the converter writes)."""
    labels = [label for scope in scopes for label in rules.sensitivity_scope_labels(scope)]
    return {
        "resourceType": "Consent", "id": "hx-sud", "status": "active",
        "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]},
        "patient": {"reference": "Patient/hx-pat-7"}, "dateTime": "2024-01-01",
        "provision": {"type": "permit", "securityLabel": [{"system": x.system, "code": x.code} for x in labels]},
    }


@pytest.mark.parametrize("icd", ["F11.20", "F10.20", "F12.90", "T40.1X1A"])
def test_healthex_substance_use_scopes_open_the_narrower_sud_labels(rules: LabelIndex, icd: str) -> None:
    # Rules label these OPIOIDUD, ETHUD or SUD with 42CFRPart2; the scopes name ETH/SUD and 42CFRPart2.
    record = condition("c-sud", "Patient/hx-pat-7", icd)
    both = _scope_consent(rules, "SUBSTANCE_USE_OR_DRUG_ABUSE", "SUD_PART_2")
    assert verdict(rules, [both], record, DOC) is Verdict.PERMIT
    without_part2 = _scope_consent(rules, "SUBSTANCE_USE_OR_DRUG_ABUSE")
    assert verdict(rules, [without_part2], record, DOC) is Verdict.DENY


def test_healthex_mental_health_scope_opens_dementia_but_not_substance_use(rules: LabelIndex) -> None:
    consent = _scope_consent(rules, "MENTAL_HEALTH")
    assert verdict(rules, [consent], condition("c-dem", "Patient/hx-pat-7", "G30.9"), DOC) is Verdict.PERMIT
    assert verdict(rules, [consent], condition("c-oud", "Patient/hx-pat-7", "F11.20"), DOC) is Verdict.DENY


def test_healthex_sickle_cell_scope_opens_sca(rules: LabelIndex) -> None:
    consent = _scope_consent(rules, "SICKLE_CELL")
    assert verdict(rules, [consent], condition("c-scd", "Patient/hx-pat-7", "D57.1"), DOC) is Verdict.PERMIT
