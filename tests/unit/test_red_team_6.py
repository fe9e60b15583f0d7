"""Red team, sixth pass, the pure parts: deciding from the facts record (``decision.Facts``,
``judge.facts_of``, the per-request memo and the cross-request ``DecisionCache``) and the
Enforcer that decides first and applies its verdicts afterwards (``Enforcer.decide``,
``enforce.apply``).

An attacker (or an EHR that writes codes its own way) looks for two resources whose records
are equal, or whose codes / authors / instances the record misses, while the right decisions
differ: a code behind ``medicationReference``, a code spelled with another URI of its system or
with ICD-10-CM's other spellings, a Coding without a system outside a ``coding`` list, authors
in elements the record does not read, ``data`` references written as absolute or versioned URLs.
"""

from __future__ import annotations

import copy
from datetime import datetime, timezone
from typing import Any

import orjson
import pytest

from gateway.core.consent import compile_consent
from gateway.core.decision import NOT_READ, Policy, decide_resource, summary_reads
from gateway.core.enforce import Enforcer, SUPPRESSED_OUTCOME, apply
from gateway.core.judge import ConsentJudge, DecisionCache, facts_of, overriding, Emergency
from gateway.core.model import Actor, Decision, Reason, RequestContext, Verdict
from gateway.core.references import NOTHING_RESOLVED, Resolved
from tests.conftest import LABELS
from tests.decision.support import consent_json

JSON = dict[str, Any]
NOW = datetime(2024, 6, 1, 12, tzinfo=timezone.utc)
P1 = "Patient/p1"
OWNERS = frozenset({P1})
PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
SNOMED = "http://snomed.info/sct"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
ICD10_WHO = "http://hl7.org/fhir/sid/icd-10"
SNOMED_OID = "urn:oid:2.16.840.1.113883.6.96"
ICD10CM_OID = "urn:oid:2.16.840.1.113883.6.90"
RXNORM_OID = "urn:oid:2.16.840.1.113883.6.88"
HTN = "38341003"          # SNOMED CT: hypertensive disorder (no sensitivity label)
LISINOPRIL = "314076"     # RxNorm: lisinopril 10 MG Oral Tablet (no sensitivity label)
DIABETES = "E11.9"        # ICD-10-CM: type 2 diabetes mellitus without complications
PSYCHIATRIST = "Practitioner/dr-psy"
OPEN = Policy(default_decision="permit")


def consents(provision: JSON, rule: str = "OPTIN", cid: int = 1) -> tuple[Any, ...]:
    return (compile_consent(consent_json({"policyRule": {"coding": [{"code": rule}]}, "provision": provision}, cid)),)


def deny(**condition: Any) -> JSON:
    """An opt-in whose one exception denies what ``condition`` names."""
    return {"provision": [{"type": "deny", **condition}]}


def code(system: str | None, value: str) -> list[JSON]:
    coding: JSON = {"code": value}
    if system is not None:
        coding["system"] = system
    return [{"coding": [coding]}]


def author(who: str, role: str = "AUT") -> list[JSON]:
    return [{"role": {"coding": [{"system": PARTICIPATION, "code": role}]}, "reference": {"reference": who}}]


def judge(provision: JSON, resolved: Resolved = NOTHING_RESOLVED, *, cache: DecisionCache | None = None,
          version: str = "v1", actor: str = "Practitioner/dr-gomez", rule: str = "OPTIN") -> ConsentJudge:
    compiled = consents(provision, rule)
    ctx = RequestContext(actor=Actor(reference=actor), purpose="TREAT", now=NOW)
    return ConsentJudge({P1: compiled}, ctx, OPEN, LABELS.labels_for, LABELS.scopes_for, resolved,
                        versions={P1: (version, compiled)} if cache is not None else None, cache=cache)


def verdict(provision: JSON, resource: JSON, resolved: Resolved = NOTHING_RESOLVED) -> str:
    return judge(provision, resolved)(resource, OWNERS).verdict.value


def condition(system: str | None, value: str, rid: str = "c1", **extra: Any) -> JSON:
    coding: JSON = {"code": value}
    if system is not None:
        coding["system"] = system
    return {"resourceType": "Condition", "id": rid, "subject": {"reference": P1},
            "code": {"coding": [coding]}, **extra}


def order(rid: str = "o1", medication: str = "Medication/m1", **extra: Any) -> JSON:
    return {"resourceType": "MedicationRequest", "id": rid, "status": "active", "intent": "order",
            "subject": {"reference": P1}, "medicationReference": {"reference": medication}, **extra}


def medication(value: str, rid: str = "m1", system: str = RXNORM) -> JSON:
    return {"resourceType": "Medication", "id": rid, "code": {"coding": [{"system": system, "code": value}]}}


# ================================================================ 1. codes: every spelling, every place


def test_a_code_condition_covers_the_medication_an_order_names_by_reference() -> None:
    """"Do not share my lisinopril orders": the order names its drug by ``medicationReference``
    (the Medication in the answer or read from the server): it is the order's code as much as an
    inline ``medicationCodeableConcept`` is (CONTRACT §5 ``code``: "... medication ...")."""
    provision = deny(code=code(RXNORM, LISINOPRIL))
    resolved = Resolved(targets={"Medication/m1": medication(LISINOPRIL), "Medication/m2": medication("197361")})
    assert verdict(provision, order(), resolved) == "deny"
    assert verdict(provision, order(medication="Medication/m2"), resolved) == "permit"
    inline = {k: v for k, v in order().items() if k != "medicationReference"}
    assert verdict(provision, {**inline, "medicationCodeableConcept": medication(LISINOPRIL)["code"]}) == "deny"


def test_a_code_condition_covers_a_contained_medication() -> None:
    contained = order(medication="#m1", contained=[medication(LISINOPRIL)])
    assert verdict(deny(code=code(RXNORM, LISINOPRIL)), contained, Resolved()) == "deny"


def test_orders_with_one_text_and_different_medications_get_their_own_decisions() -> None:
    """Two orders alike but for the drug they name: one record each, within a request (memo) and
    across requests (the DecisionCache)."""
    cache = DecisionCache()
    provision = deny(code=code(RXNORM, LISINOPRIL))
    with_lisinopril = Resolved(targets={"Medication/m1": medication(LISINOPRIL)})
    with_other = Resolved(targets={"Medication/m1": medication("197361")})
    for resolved, expected in ((with_other, "permit"), (with_lisinopril, "deny"), (with_other, "permit"),
                               (with_lisinopril, "deny")):
        assert judge(provision, resolved, cache=cache)(order(), OWNERS).verdict.value == expected


@pytest.mark.parametrize(("consent_system", "consent_code", "system", "value"), [
    (SNOMED, HTN, SNOMED_OID, HTN),                 # the resource names SNOMED CT by its OID
    (SNOMED_OID, HTN, SNOMED, HTN),                 # the consent does
    (RXNORM, LISINOPRIL, RXNORM_OID, LISINOPRIL),
    (ICD10CM, DIABETES, ICD10CM, "E119"),           # ICD-10-CM without its dot
    (ICD10CM, DIABETES, ICD10CM, "e11.9"),          # in lower case
    (ICD10CM, DIABETES, ICD10CM, " E11.9 "),        # with spaces
    (ICD10CM, DIABETES, ICD10CM_OID, DIABETES),     # by its OID
    (ICD10CM, DIABETES, ICD10_WHO, DIABETES),       # WHO ICD-10's URI, read as ICD-10-CM by the labeler
    (ICD10CM, "E119", ICD10CM, DIABETES),           # the consent without the dot
])
def test_a_code_condition_reads_every_spelling_the_labeler_reads(
    consent_system: str, consent_code: str, system: str, value: str,
) -> None:
    """The labeler reads a code system by any of its URIs and ICD-10-CM codes in any of their
    spellings (core.labels.CODE_SYSTEMS, normalize_icd); a consent's ``code`` names the same code
    whatever spelling either side uses."""
    provision = deny(code=code(consent_system, consent_code))
    assert verdict(provision, condition(system, value)) == "deny"
    assert verdict(provision, condition(system, "I10")) == "permit"


def test_a_code_spelled_otherwise_opens_what_its_permit_names() -> None:
    """The same reading for a permit: the code is the same code (a deny base, one code opened)."""
    provision = {"provision": [{"type": "permit", "code": code(SNOMED, HTN)}]}
    assert judge(provision, rule="OPTOUT")(condition(SNOMED_OID, HTN), OWNERS).verdict.value == "permit"
    assert judge(provision, rule="OPTOUT")(condition(SNOMED_OID, "73211009"), OWNERS).verdict.value == "deny"


@pytest.mark.parametrize("where", ["extension", "component", "note-extension"])
def test_a_coding_without_a_system_anywhere_meets_a_deny(where: str) -> None:
    """A Coding with no system (R4: ``system`` 0..1) written as ``valueCoding`` outside any
    ``coding`` list: it may be the code a deny names, so the deny covers it, as it covers one
    inside a ``coding`` list."""
    coding = {"code": HTN}
    extension = [{"url": "http://example.org/fhir/StructureDefinition/reason", "valueCoding": coding}]
    resource = condition(SNOMED, "I10")
    if where == "extension":
        resource["extension"] = extension
    elif where == "component":
        resource["evidence"] = [{"code": [{"coding": [{"code": "x", "system": SNOMED}]}], "extension": extension}]
    else:
        resource["note"] = [{"text": "seen", "extension": extension}]
    assert verdict(deny(code=code(SNOMED, HTN)), resource) == "deny"


@pytest.mark.parametrize("resource", [
    condition(None, HTN),                                             # a coding without system in a list
    {**condition(SNOMED, "I10"), "code": {"coding": [{"system": SNOMED, "version": "http://snomed.info/sct/731000124108",
                                                      "code": HTN}]}},  # with a version
    {**condition(SNOMED, "I10"), "extension": [{"url": "u", "valueCodeableConcept": {"coding": [{"system": SNOMED, "code": HTN}]}}]},
    {**condition(SNOMED, "I10"), "contained": [{"resourceType": "Observation", "id": "x", "status": "final",
                                                "code": {"coding": [{"system": SNOMED, "code": HTN}]}}]},
    {**condition(SNOMED, "I10"), "evidence": [{"code": [{"coding": [{"system": SNOMED, "code": HTN}]}]}]},
])
def test_a_code_condition_covers_codes_anywhere_in_the_instance(resource: JSON) -> None:
    assert verdict(deny(code=code(SNOMED, HTN)), resource) == "deny"


def test_a_code_condition_with_a_label_condition_needs_both() -> None:
    """``code`` and ``securityLabel`` in one provision: both must match; the record holds both."""
    provision = deny(code=code(SNOMED, HTN), securityLabel=[{"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "code": "R"}])
    restricted = {**condition(SNOMED, HTN), "meta": {"security": [
        {"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "code": "V"}]}}
    plain = condition(SNOMED, HTN)
    # R covers U..R: a resource without a confidentiality label counts as N (covered); V is not.
    assert verdict(provision, plain) == "deny"
    assert verdict(provision, restricted) == "permit"


def test_a_code_condition_with_a_data_period_reads_both() -> None:
    provision = deny(code=code(SNOMED, HTN), dataPeriod={"start": "2023-01-01", "end": "2023-12-31"})
    inside = condition(SNOMED, HTN, onsetDateTime="2023-05-01")
    outside = condition(SNOMED, HTN, onsetDateTime="2021-05-01")
    undated = condition(SNOMED, HTN)
    j = judge(provision)
    assert [j(r, OWNERS).verdict.value for r in (inside, outside, undated, inside)] == ["deny", "permit", "deny", "deny"]
    reads = summary_reads(consents(provision))
    assert reads == frozenset({"codes", "date"})
    assert facts_of(inside, OWNERS, frozenset(), frozenset(), reads) != facts_of(outside, OWNERS, frozenset(), frozenset(), reads)


# ================================================================ 2. authors: every author element


AUTHORED_HELD = [
    ("AUT", {"resourceType": "Observation", "id": "ob1", "status": "final", "subject": {"reference": P1},
             "code": {"text": "x"}, "performer": [{"reference": f"http://fhir.example/fhir/{PSYCHIATRIST}/_history/3"}]}),
    ("ENT", {"resourceType": "Condition", "id": "cd1", "subject": {"reference": P1}, "code": {"text": "x"},
             "recorder": {"reference": PSYCHIATRIST}}),
    ("AUT", {"resourceType": "Procedure", "id": "pr1", "status": "completed", "subject": {"reference": P1},
             "performer": [{"actor": {"reference": PSYCHIATRIST}}]}),
    ("AUT", {"resourceType": "Composition", "id": "cp1", "status": "final", "subject": {"reference": P1},
             "type": {"text": "x"}, "date": "2023-01-01", "title": "t", "author": [{"reference": PSYCHIATRIST}]}),
]
AUTHORED_MISSED = [
    ("INF", {"resourceType": "MedicationStatement", "id": "ms1", "status": "active", "subject": {"reference": P1},
             "medicationCodeableConcept": {"text": "x"}, "informationSource": {"reference": PSYCHIATRIST}}),
    ("AUT", {"resourceType": "DiagnosticReport", "id": "dr1", "status": "final", "subject": {"reference": P1},
             "code": {"text": "x"}, "resultsInterpreter": [{"reference": PSYCHIATRIST}]}),
    ("AUT", {"resourceType": "ClinicalImpression", "id": "ci1", "status": "completed", "subject": {"reference": P1},
             "assessor": {"reference": PSYCHIATRIST}}),
    ("AUT", {"resourceType": "NutritionOrder", "id": "no1", "status": "active", "intent": "order",
             "patient": {"reference": P1}, "dateTime": "2023-01-01", "orderer": {"reference": PSYCHIATRIST}}),
    ("AUT", {"resourceType": "VisionPrescription", "id": "vp1", "status": "active", "created": "2023-01-01",
             "patient": {"reference": P1}, "dateWritten": "2023-01-01", "prescriber": {"reference": PSYCHIATRIST}}),
    ("AUT", {"resourceType": "Media", "id": "me1", "status": "completed", "subject": {"reference": P1},
             "content": {"contentType": "image/png"}, "operator": {"reference": PSYCHIATRIST}}),
    ("AUT", {"resourceType": "Goal", "id": "g1", "lifecycleStatus": "active", "subject": {"reference": P1},
             "description": {"text": "x"}, "expressedBy": {"reference": PSYCHIATRIST}}),
]


@pytest.mark.parametrize(("role", "resource"), AUTHORED_HELD)
def test_an_author_actor_covers_the_author_elements_it_reads(role: str, resource: JSON) -> None:
    _authored_by_the_psychiatrist_is_denied(role, resource)


@pytest.mark.parametrize(("role", "resource"), AUTHORED_MISSED)
def test_an_author_actor_covers_every_element_naming_who_wrote_informed_or_entered(role: str, resource: JSON) -> None:
    """A deny for what one clinician authored (AUT), told (INF) or entered (ENT): the informant
    of a MedicationStatement, the interpreter of a report, the assessor of an impression, the
    orderer or prescriber of an order, the operator of a Media, who expressed a Goal."""
    _authored_by_the_psychiatrist_is_denied(role, resource)


# An absolute reference names this server's resource under its own base (fhir.local_reference).
THIS_SERVER = Resolved(ours=frozenset({"http://fhir.example/fhir"}))


def _authored_by_the_psychiatrist_is_denied(role: str, resource: JSON) -> None:
    provision = deny(actor=author(PSYCHIATRIST, role))
    assert verdict(provision, resource, THIS_SERVER) == "deny"
    other = orjson.loads(orjson.dumps(resource).replace(PSYCHIATRIST.encode(), b"Practitioner/dr-other"))
    assert verdict(provision, other, THIS_SERVER) == "permit"
    by_data = deny(data=[{"meaning": "authoredby", "reference": {"reference": PSYCHIATRIST}}])
    assert verdict(by_data, resource, THIS_SERVER) == "deny"


def test_an_author_actor_written_as_an_absolute_url_matches() -> None:
    resource = {"resourceType": "Observation", "id": "ob1", "status": "final", "subject": {"reference": P1},
                "code": {"text": "x"}, "performer": [{"reference": PSYCHIATRIST}]}
    assert verdict(deny(actor=author(f"https://fhir.example/fhir/{PSYCHIATRIST}")), resource) == "deny"


# ================================================================ 3. data: instances however written


OBS = {"resourceType": "Observation", "id": "r1", "status": "final", "subject": {"reference": P1},
       "code": {"text": "x"}, "derivedFrom": [{"reference": "http://fhir.example/fhir/Condition/c9/_history/1"}]}


@pytest.mark.parametrize(("meaning", "reference", "expected"), [
    ("instance", "Observation/r1/_history/2", "deny"),
    ("instance", "http://fhir.example/fhir/Observation/r1", "deny"),
    ("instance", "https://other.example/fhir/Observation/r1/_history/7", "deny"),
    ("instance", "Observation/r2", "permit"),
    ("dependents", "Condition/c9", "deny"),
    ("dependents", "http://fhir.example/fhir/Condition/c9", "deny"),
    ("related", "Task/t-unread", "deny"),  # the target could not be read: a deny covers it
])
def test_data_references_however_written_name_the_instance(meaning: str, reference: str, expected: str) -> None:
    provision = deny(data=[{"meaning": meaning, "reference": {"reference": reference}}])
    assert verdict(provision, OBS) == expected


@pytest.mark.parametrize("reference", ["#obs-copy", "urn:uuid:1c2b6f0e-0c39-4d3b-9d2e-0a4f2f6f9b10", "Observation"])
def test_a_data_reference_that_names_no_instance_fails_closed(reference: str) -> None:
    """A deny naming data by a reference the gateway cannot tie to any record (a fragment into
    the Consent itself, a bundle-local urn, a bare type) would match nothing and release what it
    was written to hide: it is a defect, and a defective consent that may deny denies."""
    provision = deny(data=[{"meaning": "instance", "reference": {"reference": reference}}])
    assert consents(provision)[0].defects
    assert verdict(provision, OBS) == "deny"


# ================================================================ 4. the judge's memo and the DecisionCache


def test_decisions_shared_by_code_are_per_consent_version_and_requester() -> None:
    cache = DecisionCache()
    htn = condition(SNOMED, HTN)
    closed = deny(code=code(SNOMED, HTN))
    assert judge(closed, cache=cache)(htn, OWNERS).verdict is Verdict.DENY
    assert len(cache) == 1
    # The consent changed: a new fill, a new version: never the old decision.
    assert judge({"provision": []}, cache=cache, version="v2")(htn, OWNERS).verdict is Verdict.PERMIT
    # Another requester under the same version: decided for them.
    only_banned = {"provision": [{"type": "deny", "code": code(SNOMED, HTN),
                                  "actor": author("Practitioner/banned", "IRCP")}]}
    assert judge(only_banned, cache=cache, version="v3", actor="Practitioner/banned")(htn, OWNERS).verdict is Verdict.DENY
    assert judge(only_banned, cache=cache, version="v3")(htn, OWNERS).verdict is Verdict.PERMIT
    assert judge(only_banned, cache=cache, version="v3", actor="Practitioner/banned")(htn, OWNERS).verdict is Verdict.DENY


def test_records_naming_an_instance_are_never_shared_and_authors_are_part_of_the_record() -> None:
    cache = DecisionCache()
    provision = deny(actor=author(PSYCHIATRIST))
    mine = {**OBS, "performer": [{"reference": PSYCHIATRIST}]}
    theirs = {**OBS, "performer": [{"reference": "Practitioner/dr-other"}]}
    j = judge(provision, cache=cache)
    assert [j(r, OWNERS).verdict.value for r in (mine, theirs, mine, theirs)] == ["deny", "permit", "deny", "permit"]
    by_instance = deny(data=[{"meaning": "instance", "reference": {"reference": "Observation/r1"}}])
    cache = DecisionCache()
    assert judge(by_instance, cache=cache)(OBS, OWNERS).verdict is Verdict.DENY
    assert len(cache) == 0


def test_break_glass_over_a_shared_code_decision_is_never_remembered() -> None:
    cache = DecisionCache()
    htn = condition(SNOMED, HTN)
    provision = deny(code=code(SNOMED, HTN))
    emergency = Emergency("Medical emergency")
    opened = overriding(judge(provision, cache=cache), emergency, LABELS.labels_for, LABELS.sensitive)
    assert opened(htn, OWNERS).verdict is Verdict.PERMIT
    assert emergency.returned == [("Condition/c1", True)]
    assert judge(provision, cache=cache)(htn, OWNERS).verdict is Verdict.DENY


def test_the_record_holds_nothing_the_consents_do_not_read() -> None:
    """A record for a consent without content conditions holds no codes, authors or instance:
    two resources differing only there share the record (and rightly the decision)."""
    reads = summary_reads(consents({"provision": []}))
    assert reads == frozenset()
    one = facts_of(condition(SNOMED, HTN), OWNERS, frozenset(), frozenset(), reads)
    assert one.codes is NOT_READ and one.authors is NOT_READ and one.ref is NOT_READ
    assert one == facts_of(condition(SNOMED, "I10", rid="c2"), OWNERS, frozenset(), frozenset(), reads)


def test_the_judge_decides_the_medication_codes_like_the_whole_resource_path() -> None:
    """The whole-resource path (consents with defects) and the record path agree on an order
    whose drug a code condition names."""
    resolved = Resolved(targets={"Medication/m1": medication(LISINOPRIL)})
    provision = deny(code=code(RXNORM, LISINOPRIL))
    record = judge(provision, resolved)(order(), OWNERS)
    whole = decide_resource({P1: consents(provision)}, {**order(), "contained": [medication(LISINOPRIL, "m1")],
                                                        "medicationReference": {"reference": "#m1"}},
                            frozenset(), frozenset(), RequestContext(Actor("Practitioner/x"), "TREAT", NOW), OPEN)
    assert record.verdict is whole.verdict is Verdict.DENY


def test_a_consent_with_defects_sees_the_medication_an_order_names_too() -> None:
    """A typed deny root naming the drug, with a defect below it: the consent is read as it is
    (no record), and still sees the drug the order names by reference; it is not skipped as a
    code mismatch while an opt-in beside it permits."""
    provision = {"type": "deny", "code": code(RXNORM, LISINOPRIL), "provision": [
        {"type": "permit", "data": [{"meaning": "bogus", "reference": {"reference": "Observation/x"}}]}]}
    broken = compile_consent(consent_json({"provision": provision}, 1))
    assert broken.defects and broken.root_sound
    opt_in = compile_consent(consent_json({"policyRule": {"coding": [{"code": "OPTIN"}]}, "provision": {}}, 2))
    ctx = RequestContext(actor=Actor(reference="Practitioner/x"), purpose="TREAT", now=NOW)
    resolved = Resolved(targets={"Medication/m1": medication(LISINOPRIL), "Medication/m2": medication("197361")})
    j = ConsentJudge({P1: (broken, opt_in)}, ctx, OPEN, LABELS.labels_for, LABELS.scopes_for, resolved)
    assert j(order(), OWNERS).verdict is Verdict.DENY
    assert j(order(medication="Medication/m2"), OWNERS).verdict is Verdict.PERMIT


# ================================================================ 5. decide, then apply


HIDDEN = "I10"


def _judge(resource: JSON, owners: frozenset[str]) -> Decision:
    text = str(resource)
    if HIDDEN in text:
        return Decision(Verdict.DENY, (Reason("Consent/c1", "provision", "deny"),))
    return Decision(Verdict.PERMIT)


def _bundle(btype: str, *resources: JSON, total: int | None = None) -> JSON:
    body: JSON = {"resourceType": "Bundle", "type": btype,
                  "entry": [{"resource": r, **({"search": {"mode": "match"}} if btype == "searchset" else {})} for r in resources]}
    if btype.endswith("-response"):
        for entry in body["entry"]:
            entry["response"] = {"status": "200 OK"}
    if total is not None:
        body["total"] = total
    return body


def test_decide_removes_nothing_and_apply_removes_once() -> None:
    body = _bundle("searchset", condition(SNOMED, HTN), condition(SNOMED, HIDDEN, rid="c2"), total=2)
    before = copy.deepcopy(body)
    result = Enforcer(_judge, drop_total=False).decide(body)
    assert body == before  # nothing removed before the verdicts are applied
    assert result.kept == [0] and result.outcome_entry and result.drop_total and not result.applied
    apply(body, result)
    assert [e["resource"]["id"] for e in body["entry"] if e["resource"]["resourceType"] == "Condition"] == ["c1"]
    assert body["entry"][-1]["resource"] == SUPPRESSED_OUTCOME and "total" not in body
    once = copy.deepcopy(body)
    apply(body, result)  # a second apply changes nothing (never index the filtered list again)
    assert body == once


def test_a_denied_body_is_never_applied_and_never_sent() -> None:
    """A Bundle body with something the walker cannot read (here a nested Bundle's malformed
    entries) is denied as a whole: apply leaves it, the caller refuses it."""
    nested = {"resourceType": "Bundle", "type": "collection", "entry": ["not an entry"]}
    body = _bundle("searchset", condition(SNOMED, HIDDEN), nested)
    result = Enforcer(_judge, drop_total=False).decide(body)
    assert result.denied and result.header == "deny"
    apply(body, result)
    assert not result.applied


@pytest.mark.parametrize("status", ["403 Forbidden", "404 Not Found"])
def test_batch_answers_keep_their_slots_and_no_outcome_entry(status: str) -> None:
    body = _bundle("batch-response", condition(SNOMED, HTN), condition(SNOMED, HIDDEN, rid="c2"), condition(SNOMED, HTN, rid="c3"))
    result = Enforcer(_judge, drop_total=False, withheld_status=status).decide(body)
    apply(body, result)
    assert len(body["entry"]) == 3
    assert body["entry"][1] == {"response": body["entry"][1]["response"]}
    assert body["entry"][1]["response"]["status"] == status
    assert HIDDEN not in str(body)
    assert [e.get("resource", {}).get("id") for e in body["entry"]] == ["c1", None, "c3"]


def test_nested_bundles_are_filtered_as_they_are_decided_and_the_top_after() -> None:
    inner = _bundle("searchset", condition(SNOMED, HIDDEN, rid="c9"), condition(SNOMED, HTN, rid="c8"), total=2)
    params = {"resourceType": "Parameters", "parameter": [{"name": "r", "resource": condition(SNOMED, HIDDEN, rid="c7")}]}
    body = _bundle("collection", inner, params, condition(SNOMED, HTN))
    result = Enforcer(_judge, drop_total=False, withheld_status="404 Not Found").decide(body)
    apply(body, result)
    text = str(body)
    assert HIDDEN not in text and "c9" not in text and "c7" not in text and "'total'" not in text
    assert "suppressed" not in text  # 404 mode: nothing tells that something was withheld


def test_a_judge_that_fails_leaves_the_answer_unapplied() -> None:
    """An error while deciding propagates (the caller answers 503): nothing half-filtered."""
    def failing(resource: JSON, owners: frozenset[str]) -> Decision:
        if resource.get("id") == "c2":
            raise RuntimeError("consent engine failed")
        return Decision(Verdict.PERMIT)

    body = _bundle("searchset", condition(SNOMED, HTN), condition(SNOMED, HIDDEN, rid="c2"))
    enforcer = Enforcer(failing, drop_total=False)
    with pytest.raises(RuntimeError):
        enforcer.decide(body)
    assert enforcer.result.kept is None and not enforcer.result.applied


@pytest.mark.parametrize("holder", ["Bundle", "Parameters", "Bundle in Parameters", "contained in a held record"])
def test_records_held_inside_a_contained_resource_are_judged(holder: str) -> None:
    hidden = condition(SNOMED, HIDDEN, rid="c9")
    if holder == "Bundle":
        inner: JSON = {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": hidden}]}
    elif holder == "Parameters":
        inner = {"resourceType": "Parameters", "parameter": [{"name": "a", "part": [{"name": "b", "resource": hidden}]}]}
    elif holder == "Bundle in Parameters":
        inner = {"resourceType": "Parameters", "parameter": [{"name": "a", "resource": {
            "resourceType": "Bundle", "type": "collection", "entry": [{"resource": hidden}]}}]}
    else:
        inner = {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": {
            **condition(SNOMED, HTN, rid="c8"), "contained": [hidden]}}]}
    body = _bundle("searchset", {**condition(SNOMED, HTN), "contained": [inner]}, condition(SNOMED, HTN, rid="c2"))
    result = Enforcer(_judge_ids, drop_total=False).decide(body)
    apply(body, result)
    assert [e["resource"].get("id") for e in body["entry"]] == ["c2", None]


def _judge_ids(resource: JSON, owners: frozenset[str]) -> Decision:
    """Withholds the record c9 only (by its own id, not by what it contains)."""
    if resource.get("id") == "c9":
        return Decision(Verdict.DENY, (Reason("Consent/c1", "provision", "deny"),))
    return Decision(Verdict.PERMIT)
