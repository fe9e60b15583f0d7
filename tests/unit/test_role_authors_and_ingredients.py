"""What decides a resource that lives in another resource: an author given as a
``PractitionerRole`` (its practitioner and organization are the authors, CONTRACT §5 ``AUT`` /
``authoredby``) and a Medication's ingredients named by reference (their codes and labels are
the order's, one hop). Pure parts: ``compartment.authors_of``, ``references.Resolved``,
``judge.ConsentJudge`` with its facts record and the cross-request ``DecisionCache``.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import pytest

from gateway.core.compartment import UNKNOWN_AUTHOR, authors_of
from gateway.core.consent import compile_consent
from gateway.core.decision import Policy, summary_reads
from gateway.core.judge import UNRESOLVED, ConsentJudge, DecisionCache, facts_of
from gateway.core.model import Actor, Label, RequestContext, Verdict
from gateway.core.references import (
    NOTHING_RESOLVED, UNREADABLE, Resolved, author_roles, deciding_references, ingredients_to_read, may_refer,
)
from gateway.web.enforcement import ConsentEnforcement
from tests.conftest import LABELS
from tests.decision.support import consent_json

JSON = dict[str, Any]
NOW = datetime(2024, 6, 1, 12, tzinfo=timezone.utc)
P1 = "Patient/p1"
OWNERS = frozenset({P1})
OPEN = Policy(default_decision="permit")
PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
SNOMED = "http://snomed.info/sct"
F204 = "Practitioner/f204"
OTHER_DOCTOR = "Practitioner/f001"
CLINIC = "Organization/org-psy-clinic"
METHADONE_TABLET = "864706"  # RxNorm: methadone hydrochloride 10 MG Oral Tablet (rules/substance-use.yaml)
METHADONE = "6813"           # RxNorm: methadone (the ingredient)
LISINOPRIL = "314076"        # RxNorm: lisinopril 10 MG Oral Tablet
PART2 = Label("http://terminology.hl7.org/CodeSystem/v3-ActCode", "42CFRPart2")


def consents(provision: JSON, rule: str = "OPTIN") -> tuple[Any, ...]:
    return (compile_consent(consent_json({"policyRule": {"coding": [{"code": rule}]}, "provision": provision}, 1)),)


def judge(provision: JSON, resolved: Resolved = NOTHING_RESOLVED, *, rule: str = "OPTIN",
          cache: DecisionCache | None = None) -> ConsentJudge:
    compiled = consents(provision, rule)
    ctx = RequestContext(actor=Actor(reference="Practitioner/dr-gomez"), purpose="TREAT", now=NOW)
    return ConsentJudge({P1: compiled}, ctx, OPEN, LABELS.labels_for, LABELS.scopes_for, resolved,
                        versions={P1: ("v1", compiled)} if cache is not None else None, cache=cache)


def verdict(provision: JSON, resource: JSON, resolved: Resolved = NOTHING_RESOLVED, rule: str = "OPTIN") -> str:
    return judge(provision, resolved, rule=rule)(resource, OWNERS).verdict.value


def strict_verdict(provision: JSON, resource: JSON, resolved: Resolved) -> str:
    """Under a policy where sensitive labels need a permit naming them (the default)."""
    compiled = consents(provision, "OPTOUT")
    ctx = RequestContext(actor=Actor(reference="Practitioner/dr-gomez"), purpose="TREAT", now=NOW)
    policy = Policy(default_decision="deny", sensitive=LABELS.sensitive)
    labels_for = ConsentEnforcement(None, LABELS, policy).labeler(resolved)  # type: ignore[arg-type]
    return ConsentJudge({P1: compiled}, ctx, policy, labels_for, LABELS.scopes_for, resolved)(
        resource, OWNERS).verdict.value


def author_actor(who: str, role: str = "AUT") -> list[JSON]:
    return [{"role": {"coding": [{"system": PARTICIPATION, "code": role}]}, "reference": {"reference": who}}]


def not_authored_by(who: str) -> JSON:
    """"Not the records this doctor wrote": an opt-in whose exception denies them (actor AUT)."""
    return {"provision": [{"type": "deny", "actor": author_actor(who)}]}


def authoredby(who: str, ptype: str) -> JSON:
    return {"provision": [{"type": ptype, "data": [{"meaning": "authoredby", "reference": {"reference": who}}]}]}


def condition(recorder: str = "PractitionerRole/r1", rid: str = "c1", **extra: Any) -> JSON:
    return {"resourceType": "Condition", "id": rid, "subject": {"reference": P1},
            "code": {"coding": [{"system": SNOMED, "code": "38341003"}]},
            "recorder": {"reference": recorder}, **extra}


def role(practitioner: str = F204, organization: str | None = None, rid: str = "r1") -> JSON:
    found: JSON = {"resourceType": "PractitionerRole", "id": rid, "practitioner": {"reference": practitioner}}
    if organization is not None:
        found["organization"] = {"reference": organization}
    return found


def roles(**by_id: JSON | None) -> Resolved:
    return Resolved(roles={f"PractitionerRole/{k}": v for k, v in by_id.items()})


# ================================================================ 1. authors given as a PractitionerRole


def test_a_role_counts_its_practitioner_and_organization_as_authors() -> None:
    resource = condition()
    assert authors_of(resource, {"PractitionerRole/r1": role(F204, CLINIC)}) == {"PractitionerRole/r1", F204, CLINIC}
    # missing on the server (deleted when its doctor left): whoever wrote through it is unknown
    assert authors_of(resource, {"PractitionerRole/r1": None}) == {"PractitionerRole/r1", UNKNOWN_AUTHOR}
    assert authors_of(resource) == {"PractitionerRole/r1", UNKNOWN_AUTHOR}  # not read: unknown
    absolute = condition("https://ehr.example.org/fhir/PractitionerRole/r1/_history/3")
    assert authors_of(absolute, {"PractitionerRole/r1": role()}, frozenset({"https://ehr.example.org/fhir"})) >= {F204}
    # another server's role of the same id is not this server's: unknown, never ours read
    assert authors_of(absolute, {"PractitionerRole/r1": role()}) == {UNKNOWN_AUTHOR}
    conditional = condition("PractitionerRole?identifier=http://hl7.org/fhir/sid/us-npi|1234567893")
    assert UNKNOWN_AUTHOR in authors_of(conditional, {"PractitionerRole/r1": role()})
    wrapped = {"resourceType": "Procedure", "id": "pr1", "subject": {"reference": P1},
               "performer": [{"actor": {"reference": "PractitionerRole/r1"}}]}
    assert F204 in authors_of(wrapped, {"PractitionerRole/r1": role()})


def test_a_contained_role_counts_without_any_read() -> None:
    resource = condition("#r1", contained=[{**role(F204, CLINIC), "id": "r1"}])
    assert authors_of(resource) == {F204, CLINIC}
    assert verdict(not_authored_by(F204), resource) == "deny"


@pytest.mark.parametrize("provision", [not_authored_by(F204), authoredby(F204, "deny")], ids=["actor-AUT", "authoredby"])
def test_not_this_doctor_closes_what_the_doctor_recorded_in_a_role(provision: JSON) -> None:
    """The leak: "deny records authored by Practitioner/f204" left open a Condition whose
    recorder is ``PractitionerRole/r1`` (practitioner f204)."""
    assert verdict(provision, condition(), roles(r1=role(F204))) == "deny"
    assert verdict(provision, condition(), roles(r1=role(OTHER_DOCTOR))) == "permit"
    assert verdict(provision, condition(), roles(r1=None)) == "deny"  # deleted: unknown, matches the deny


def test_an_organization_condition_sees_the_role_organization() -> None:
    provision = {"provision": [{"type": "deny", "data": [{"meaning": "authoredby", "reference": {"reference": CLINIC}}]}]}
    assert verdict(provision, condition(), roles(r1=role(OTHER_DOCTOR, CLINIC))) == "deny"
    assert verdict(provision, condition(), roles(r1=role(OTHER_DOCTOR, "Organization/other"))) == "permit"


@pytest.mark.parametrize("provision", [not_authored_by(F204), authoredby(F204, "deny")], ids=["actor-AUT", "authoredby"])
def test_a_role_that_could_not_be_read_matches_a_deny(provision: JSON) -> None:
    """CONTRACT §5: an unknown condition matches a deny provision."""
    assert verdict(provision, condition(), NOTHING_RESOLVED) == "deny"
    # ... and closes only what it concerns: a record its doctor wrote directly stays open.
    assert verdict(provision, condition(OTHER_DOCTOR), NOTHING_RESOLVED) == "permit"


@pytest.mark.parametrize("provision", [
    {"provision": [{"type": "permit", "actor": author_actor(F204)}]}, authoredby(F204, "permit"),
], ids=["actor-AUT", "authoredby"])
def test_a_role_that_could_not_be_read_does_not_match_a_permit(provision: JSON) -> None:
    """An opt-out opening only what f204 wrote: an unknown role opens nothing."""
    assert verdict(provision, condition(), roles(r1=role(F204)), rule="OPTOUT") == "permit"
    assert verdict(provision, condition(), NOTHING_RESOLVED, rule="OPTOUT") == "deny"
    assert verdict(provision, condition(), roles(r1=role(OTHER_DOCTOR)), rule="OPTOUT") == "deny"


def test_the_facts_record_holds_the_role_authors() -> None:
    reads = summary_reads(consents(not_authored_by(F204)))
    assert reads is not None and "authors" in reads
    record = facts_of(condition(), OWNERS, frozenset(), frozenset(), reads, roles={"PractitionerRole/r1": role(F204)})
    assert F204 in record.authors
    other = facts_of(condition(), OWNERS, frozenset(), frozenset(), reads, roles={"PractitionerRole/r1": role(OTHER_DOCTOR)})
    assert record != other  # the memo key


def test_the_decision_cache_keeps_role_resolutions_apart() -> None:
    """Two requests, the same Condition, the role held first by another doctor then by f204 (and
    the reverse): the decision shared across requests is the one of the authors as resolved."""
    cache = DecisionCache()
    provision = not_authored_by(F204)
    for resolved, expected in ((roles(r1=role(OTHER_DOCTOR)), "permit"), (roles(r1=role(F204)), "deny"),
                               (NOTHING_RESOLVED, "deny"), (roles(r1=role(OTHER_DOCTOR)), "permit"),
                               (roles(r1=role(F204)), "deny")):
        assert judge(provision, resolved, cache=cache)(condition(), OWNERS).verdict.value == expected
    assert cache.hits >= 2


def test_a_malformed_consent_reads_the_role_authors_too() -> None:
    """A consent with defects decides each resource whole (no facts record): the roles count there."""
    bad = consents(not_authored_by(F204))[0]
    defective = compile_consent({**consent_json({"policyRule": {"coding": [{"code": "OPTIN"}]},
                                                 "provision": {"type": "permit", "actor": author_actor(F204),
                                                               "period": {"start": "2030-13-01"}}}, 2)})
    assert defective.defects, "the fixture must be a defective consent"
    ctx = RequestContext(actor=Actor(reference="Practitioner/dr-gomez"), purpose="TREAT", now=NOW)
    j = ConsentJudge({P1: (bad, defective)}, ctx, OPEN, LABELS.labels_for, LABELS.scopes_for, roles(r1=role(F204)))
    assert j.reads(OWNERS) is None
    assert j(condition(), OWNERS).verdict is Verdict.DENY


def test_the_roles_an_answer_names_are_found_once() -> None:
    present_role = role(F204, rid="r2")
    bundle = {"resourceType": "Bundle", "type": "searchset", "entry": [
        {"resource": condition()}, {"resource": condition("PractitionerRole/r2", rid="c2")},
        {"resource": present_role},
        {"resource": condition("#r9", rid="c3", contained=[{**role(), "id": "r9"},
                                                             {**condition("PractitionerRole/r7", rid="x"), "id": "in"}])},
    ]}
    present, named = author_roles(bundle)
    assert present == {"PractitionerRole/r2": present_role}
    assert named == {"PractitionerRole/r1"}  # a contained resource's authors are not its container's


# ================================================================ 2. ingredients named by reference


def medication(code: str, rid: str, **extra: Any) -> JSON:
    return {"resourceType": "Medication", "id": rid, "code": {"coding": [{"system": RXNORM, "code": code}]}, **extra}


def compound(*ingredients: str, rid: str = "compound", **extra: Any) -> JSON:
    """A compounded product: a local code, its drugs as ingredients named by reference."""
    return {"resourceType": "Medication", "id": rid,
            "code": {"coding": [{"system": "urn:oid:2.16.840.1.113883.3.9999.1", "code": "CMP-7"}]},
            "ingredient": [{"itemReference": {"reference": ref}, "isActive": True} for ref in ingredients], **extra}


def order(medication_ref: str = "Medication/compound", rid: str = "o1", **extra: Any) -> JSON:
    return {"resourceType": "MedicationRequest", "id": rid, "status": "active", "intent": "order",
            "subject": {"reference": P1}, "medicationReference": {"reference": medication_ref}, **extra}


METHADONE_MED = medication(METHADONE_TABLET, "methadone")
NOT_METHADONE = {"provision": [{"type": "deny", "code": [{"coding": [{"system": RXNORM, "code": METHADONE_TABLET}]}]}]}


def test_an_order_reaches_the_ingredients_of_its_medication() -> None:
    resolved = Resolved({"Medication/compound": compound("Medication/methadone"), "Medication/methadone": METHADONE_MED})
    assert resolved.medications_of(order()) == (compound("Medication/methadone"), METHADONE_MED)
    assert Resolved({"Medication/compound": compound("Medication/methadone")}).medications_of(order()) is None
    missing = Resolved({"Medication/compound": compound("Medication/methadone"), "Medication/methadone": None})
    assert missing.medications_of(order()) is None  # missing on the server: unknown, it closes
    unreadable = Resolved({"Medication/compound": compound("Medication/methadone"), "Medication/methadone": UNREADABLE})
    assert unreadable.medications_of(order()) is None


def test_one_hop_only() -> None:
    """An ingredient's own ingredients are neither followed nor asked for: what they are is
    unknown, so the order closes (None), as when an ingredient cannot be read."""
    nested = compound("Medication/deeper", rid="methadone")
    resolved = Resolved({"Medication/compound": compound("Medication/methadone"), "Medication/methadone": nested})
    assert resolved.medications_of(order()) is None
    assert ingredients_to_read([compound("Medication/methadone")], {}) == {"Medication/methadone"}
    found = deciding_references({"resourceType": "Bundle", "entry": [{"resource": order()}]})
    assert found is not None and found.medications == {"Medication/compound"} and not found.ingredients


def test_the_ingredients_decide_the_order_code_and_labels() -> None:
    resolved = Resolved({"Medication/compound": compound("Medication/methadone"), "Medication/methadone": METHADONE_MED})
    assert verdict(NOT_METHADONE, order(), resolved) == "deny"
    by_ingredient = {"provision": [{"type": "deny", "code": [{"coding": [{"system": RXNORM, "code": METHADONE}]}]}]}
    with_ingredient_code = Resolved({"Medication/compound": compound("Medication/m6813"),
                                     "Medication/m6813": medication(METHADONE, "m6813")})
    assert verdict(by_ingredient, order(), with_ingredient_code) == "deny"
    other = Resolved({"Medication/compound": compound("Medication/lis"), "Medication/lis": medication(LISINOPRIL, "lis")})
    assert verdict(NOT_METHADONE, order(), other) == "permit"
    # A general permit does not open Part 2 data: the label comes through the ingredient.
    general = {"provision": [{"type": "permit", "actor": [{"reference": {"reference": "Practitioner/dr-gomez"}}]}]}
    assert strict_verdict(general, order(), resolved) == "deny"
    assert strict_verdict(general, order(), other) == "permit"


def test_an_ingredient_that_cannot_be_read_closes_the_order() -> None:
    j = judge({"provision": []})
    unread = Resolved({"Medication/compound": compound("Medication/methadone")})
    assert judge({"provision": []}, unread)(order(), OWNERS) is UNRESOLVED
    odd = Resolved({"Medication/compound": compound("Patient/p1")})
    assert judge({"provision": []}, odd)(order(), OWNERS) is UNRESOLVED
    named_only = Resolved({"Medication/compound": {**compound(), "ingredient": [{"itemReference": {"display": "methadone"}}]}})
    assert j(order(), OWNERS) is UNRESOLVED  # the Medication itself unread
    assert judge({"provision": []}, named_only)(order(), OWNERS).verdict is Verdict.PERMIT


def test_contained_ingredients_count() -> None:
    inside = compound("#m", contained=[{**METHADONE_MED, "id": "m"}])
    assert verdict(NOT_METHADONE, order(), Resolved({"Medication/compound": inside})) == "deny"
    # A contained Medication whose ingredient is contained in the order beside it.
    contained_order = order("#cmp", contained=[{**compound("#m"), "id": "cmp"}, {**METHADONE_MED, "id": "m"}])
    assert verdict(NOT_METHADONE, contained_order, Resolved()) == "deny"
    dangling = order("#cmp", contained=[{**compound("#gone"), "id": "cmp"}])
    assert judge({"provision": []})(dangling, OWNERS) is UNRESOLVED


def test_a_medication_in_the_answer_asks_for_its_ingredients() -> None:
    body = {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": compound("Medication/methadone")}]}
    found = deciding_references(body)
    assert found is not None and found.ingredients == {"Medication/methadone"}
    assert may_refer(b'{"resourceType":"Medication","ingredient":[{"itemReference":{"reference":"Medication/x"}}]}')


def test_a_contained_resource_never_stands_for_a_server_one() -> None:
    """Order A contains its lisinopril as ``#methadone``; order B names the server's
    ``Medication/methadone``: B's drug is read, never taken from inside A."""
    a = order("#methadone", rid="a", contained=[medication(LISINOPRIL, "methadone")])
    b = order("Medication/methadone", rid="b")
    found = deciding_references({"resourceType": "Bundle", "entry": [{"resource": a}, {"resource": b}]})
    assert found is not None and found.medications == {"Medication/methadone"}
    assert "Medication/methadone" not in found.present


def test_the_decision_cache_keeps_ingredient_resolutions_apart() -> None:
    cache = DecisionCache()
    with_methadone = Resolved({"Medication/compound": compound("Medication/x"), "Medication/x": METHADONE_MED})
    with_other = Resolved({"Medication/compound": compound("Medication/x"), "Medication/x": medication(LISINOPRIL, "x")})
    for resolved, expected in ((with_other, "permit"), (with_methadone, "deny"), (with_other, "permit"),
                               (with_methadone, "deny")):
        assert judge(NOT_METHADONE, resolved, cache=cache)(order(), OWNERS).verdict.value == expected


def test_the_labels_follow_the_ingredients() -> None:
    """Both the order's labels and a Medication's own (when the Medication is in the answer)."""
    enforcement = ConsentEnforcement(None, LABELS, OPEN)  # type: ignore[arg-type]
    resolved = Resolved({"Medication/compound": compound("Medication/methadone"), "Medication/methadone": METHADONE_MED})
    labels_for = enforcement.labeler(resolved)
    assert PART2 in labels_for(order())
    assert PART2 in labels_for(compound("Medication/methadone"))
    assert PART2 not in labels_for(compound("Medication/lis"))
    assert PART2 not in enforcement.labeler(NOTHING_RESOLVED)(compound("Medication/methadone"))
