"""The facts record decides like the resource (core.decision.Facts, decide_facts, judge.facts_of).

1. Over generated resources of every patient-compartment type and generated consents with every
   kind of content condition (class, code, author actors, dataPeriod, data with each meaning,
   security labels), the decision from the facts record built for what the consents read equals
   the decision from the whole resource. A condition reading a fact the record lacks raises
   ``FactNotRead``, so this property also fails if decision code reads beyond the record.
2. ``summary_reads`` names what each condition reads; the record holds exactly those facts.
3. The judge decides from records: resources whose records agree share one decision, records
   naming an instance are not shared across requests, and consents with defects still decide
   the resource as it is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.core.compartment import UNKNOWN_PATIENT, patients_of
from gateway.core.consent import CompiledConsent, compile_consent
from gateway.core.decision import (
    NOT_READ,
    FactNotRead,
    Facts,
    Policy,
    decide_facts,
    decide_resource,
    summary_reads,
)
from gateway.core.judge import ConsentJudge, DecisionCache, facts_of
from gateway.core.model import Actor, RequestContext
from gateway.core.references import NOTHING_RESOLVED
from tests.decision.support import consent_json
from tests.strategies import (
    ALL_TYPES, DECIDED_AT, PATIENTS, by_patient, consent_specs, decision_policies, fast, request_contexts, resources, rules_index,
    sensitive_codings,
)

LABELS = rules_index()
NOW = datetime(2024, 6, 1, 12, tzinfo=timezone.utc)
PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
ORDINARY = ({"system": "http://loinc.org", "code": "2345-7"}, {"system": "http://snomed.info/sct", "code": "38341003"})


_fast = fast


# Conditions that read the resource anywhere: codes, authors, instances and what they make.
_whole_conditions = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(["permit", "deny"]),
        "code": st.lists(
            st.one_of(st.sampled_from(sensitive_codings()[:12]), st.sampled_from(ORDINARY))
            .map(lambda c: {"coding": [c]}), min_size=1, max_size=2),
        "actor": st.sampled_from(["AUT", "INF", "ENT", "IRCP"]).flatmap(lambda role: st.sampled_from(
            ["Practitioner/pr1", "Patient/p1", "Organization/org1", "RelatedPerson/rp1"]).map(
            lambda who: [{"role": {"coding": [{"system": PARTICIPATION, "code": role}]},
                          "reference": {"reference": who}}])),
        "data": st.lists(st.fixed_dictionaries({
            "meaning": st.sampled_from(["instance", "related", "dependents", "authoredby"]),
            "reference": st.sampled_from([
                "Observation/r1", "Condition/r2", "Patient/p1", "Practitioner/pr1", "Encounter/p1",
                "Organization/org1", "RelatedPerson/rp1",
            ]).map(lambda r: {"reference": r}),
        }), min_size=1, max_size=2),
        "dataPeriod": st.sampled_from([{"start": "2023-01-01", "end": "2023-12-31"}, {"start": "2024-01-01"}]),
    },
)
_whole_specs = st.fixed_dictionaries(
    {
        "provision": st.tuples(_whole_conditions, st.lists(_whole_conditions, max_size=2)).map(
            lambda p: {**p[0], **({"provision": p[1]} if p[1] else {})}),
        "patient": st.sampled_from(PATIENTS).map(lambda p: {"reference": p}),
    },
    optional={"policyRule": st.sampled_from(["OPTIN", "OPTOUT"]).map(lambda c: {"coding": [{"code": c}]})},
)
policies, contexts = decision_policies, request_contexts


def _reads(consents: Mapping[str, Sequence[CompiledConsent]], owners: frozenset[str]) -> frozenset[str] | None:
    found: set[str] = set()
    for patient in owners:
        reads = summary_reads(consents.get(patient, ()))
        if reads is None:
            return None
        found |= reads
    return frozenset(found)


# ---------------------------------------------------------------------- 1. record == resource


@pytest.mark.parametrize("rtype", ALL_TYPES)
@_fast(8)
@given(data=st.data())
def test_the_record_decides_as_the_resource(rtype: str, data: st.DataObject) -> None:
    resource = data.draw(resources(rtype), label="resource")
    specs = data.draw(st.lists(st.one_of(_whole_specs, consent_specs), max_size=3), label="consents")
    related = data.draw(st.sampled_from([None, {"Observation/r1": frozenset({"Condition/r2"})}]), label="related")
    consents = by_patient(specs, related=related)
    ctx, policy = data.draw(contexts, label="context"), data.draw(policies, label="policy")
    owners = patients_of(resource)
    reads = _reads(consents, owners)
    if reads is None:
        return  # a consent with defects: the judge decides the resource itself
    labels, scopes = LABELS.labels_for(resource), LABELS.scopes_for(resource)
    record = facts_of(resource, owners, labels, scopes if "scopes" in reads else frozenset(), reads)
    expected = decide_resource(consents, resource, labels, scopes, ctx, policy, patients=owners)
    assert decide_facts(consents, record, ctx, policy) == expected


_REFERENCED = ["Patient/p1", "Patient/p2", "Practitioner/pr1", "Organization/org1", "RelatedPerson/rp1",
               "Observation/r1", "Condition/r2", "Observation/p1",
               "Observation/r1/_history/1", "Condition/r2/_history/7", "http://h/fhir/Observation/r2/_history/1"]
_data_only = st.fixed_dictionaries({
    "type": st.sampled_from(["permit", "deny"]),
    "data": st.lists(st.fixed_dictionaries({
        "meaning": st.sampled_from(["instance", "related", "dependents", "authoredby"]),
        "reference": st.sampled_from(_REFERENCED).map(lambda r: {"reference": r}),
    }), min_size=1, max_size=3),
})


@pytest.mark.parametrize("rtype", ["Observation", "Condition", "DocumentReference", "Encounter", "CarePlan",
                                   "MedicationRequest", "DiagnosticReport", "Procedure"])
@_fast(40)
@given(data=st.data())
def test_the_record_decides_instance_conditions_as_the_resource(rtype: str, data: st.DataObject) -> None:
    """``data`` conditions, each meaning, against resources that often make the references
    and carry the ids the conditions name."""
    resource = data.draw(resources(rtype), label="resource")
    owners = patients_of(resource)
    if not owners - {UNKNOWN_PATIENT}:
        return
    patient = sorted(owners - {UNKNOWN_PATIENT})[0]
    provision = data.draw(_data_only, label="provision")
    consents = by_patient([{"provision": provision, "patient": {"reference": patient}}],
                          related={"Observation/r1": frozenset({"Condition/r2"})})
    ctx, policy = data.draw(contexts, label="context"), data.draw(policies, label="policy")
    labels, scopes = LABELS.labels_for(resource), LABELS.scopes_for(resource)
    reads = _reads(consents, owners)
    assert reads is not None and "data" in reads
    record = facts_of(resource, owners, labels, frozenset(), reads)
    assert decide_facts(consents, record, ctx, policy) == decide_resource(
        consents, resource, labels, scopes, ctx, policy, patients=owners)


def test_whole_resource_conditions_are_generated() -> None:
    """The property above meets every kind of condition (else it proves little)."""
    seen: set[str] = set()

    @_fast(200)
    @given(spec=_whole_specs)
    def collect(spec: Any) -> None:
        reads = summary_reads([compile_consent(consent_json(spec, 1))])
        seen.update(reads or ())

    collect()
    assert {"codes", "authors", "data", "date"} <= seen


# ---------------------------------------------------------------------- 2. what is read, what is held

OBS = {
    "resourceType": "Observation", "id": "r1", "status": "final",
    "subject": {"reference": "Patient/p1"}, "performer": [{"reference": "Practitioner/pr1"}],
    "code": {"coding": [{"system": "http://loinc.org", "code": "2345-7"}]},
    "effectiveDateTime": "2023-05-17", "hasMember": [{"reference": "Observation/r9"}],
}


@pytest.mark.parametrize(("condition", "reads"), [
    ({}, frozenset()),
    ({"class": [{"system": "http://hl7.org/fhir/resource-types", "code": "Observation"}]}, frozenset()),
    ({"code": [{"coding": [ORDINARY[0]]}]}, frozenset({"codes"})),
    ({"actor": [{"role": {"coding": [{"system": PARTICIPATION, "code": "AUT"}]},
                 "reference": {"reference": "Practitioner/pr1"}}]}, frozenset({"authors"})),
    ({"data": [{"meaning": "instance", "reference": {"reference": "Observation/r1"}}]}, frozenset({"data"})),
    ({"dataPeriod": {"start": "2023-01-01"}}, frozenset({"date"})),
])
def test_the_record_holds_what_the_consents_read(condition: dict[str, Any], reads: frozenset[str]) -> None:
    consent = compile_consent(consent_json({"provision": {"type": "deny", **condition}}, 1))
    assert summary_reads([consent]) == reads
    record = facts_of(OBS, frozenset({"Patient/p1"}), frozenset(), frozenset(), reads)
    held = {name for name in ("date", "ref", "codes", "references", "authors", "version")
            if getattr(record, name) is not NOT_READ}
    wanted = {"codes": {"codes"}, "authors": {"authors"}, "data": {"ref", "references", "authors", "version"},
              "date": {"date"}}
    assert held == set().union(*(wanted[r] for r in reads))
    if "codes" in reads:
        assert ("http://loinc.org", "2345-7") in record.codes
    if "data" in reads:
        assert record.ref == "Observation/r1" and "Observation/r9" in record.references


def test_a_condition_reading_a_fact_the_record_lacks_raises() -> None:
    """What makes property 1 fail when decision code reads beyond the record."""
    consent = compile_consent(consent_json({"provision": {"type": "deny", "code": [{"coding": [ORDINARY[0]]}]}}, 1))
    ctx = RequestContext(actor=Actor(reference="Practitioner/pr1"), purpose="TREAT", now=NOW)
    bare = facts_of(OBS, frozenset({"Patient/p1"}), frozenset(), frozenset(), frozenset())
    with pytest.raises(FactNotRead):
        decide_facts({"Patient/p1": [consent]}, bare, ctx, Policy(default_decision="permit"))
    full = facts_of(OBS, frozenset({"Patient/p1"}), frozenset(), frozenset(), frozenset({"codes"}))
    assert decide_facts({"Patient/p1": [consent]}, full, ctx, Policy(default_decision="permit")).verdict.value == "deny"


def test_records_are_frozen_and_hash_by_value() -> None:
    reads = frozenset({"codes", "data"})
    one = facts_of(OBS, frozenset({"Patient/p1"}), frozenset(), frozenset(), reads)
    two = facts_of(dict(OBS), frozenset({"Patient/p1"}), frozenset(), frozenset(), reads)
    assert type(one) is Facts and one == two and hash(one) == hash(two)
    with pytest.raises(AttributeError):
        one.rtype = "Condition"  # type: ignore[misc]
    other = facts_of({**OBS, "id": "r2"}, frozenset({"Patient/p1"}), frozenset(), frozenset(), reads)
    assert other != one  # the instance is part of a record that reads it


# ---------------------------------------------------------------------- 3. the judge over records


def _judge(consents: Mapping[str, Sequence[CompiledConsent]], cache: DecisionCache) -> ConsentJudge:
    ctx = RequestContext(actor=Actor(reference="Practitioner/pr1"), purpose="TREAT", now=NOW)
    frozen = {p: tuple(c) for p, c in consents.items()}
    versions = {p: ("v1", c) for p, c in frozen.items()}
    return ConsentJudge(frozen, ctx, Policy(default_decision="permit"),
                        LABELS.labels_for, LABELS.scopes_for, NOTHING_RESOLVED, versions=versions, cache=cache)


def test_the_judge_shares_decisions_by_code_and_never_by_instance() -> None:
    by_code = {"Patient/p1": [compile_consent(consent_json(
        {"provision": {"type": "deny", "code": [{"coding": [ORDINARY[0]]}]}}, 1))]}
    cache = DecisionCache()
    judge = _judge(by_code, cache)
    owners = frozenset({"Patient/p1"})
    assert judge(OBS, owners).verdict.value == "deny"
    assert judge({**OBS, "id": "r5"}, owners).verdict.value == "deny"
    other = {**OBS, "id": "r6", "code": {"coding": [ORDINARY[1]]}}
    assert judge(other, owners).verdict.value == "permit"
    assert len(cache) == 2  # one decision per distinct code set, shared across requests

    by_instance = {"Patient/p1": [compile_consent(consent_json(
        {"provision": {"type": "deny", "data": [{"meaning": "instance", "reference": {"reference": "Observation/r1"}}]}}, 1))]}
    cache = DecisionCache()
    judge = _judge(by_instance, cache)
    assert judge(OBS, owners).verdict.value == "deny"
    assert judge({**OBS, "id": "r5"}, owners).verdict.value == "permit"
    assert len(cache) == 0


def test_consents_with_defects_still_decide_the_resource() -> None:
    broken = {"Patient/p1": [compile_consent(consent_json(
        {"provision": {"type": "deny", "code": [{"coding": [ORDINARY[0]]}], "dataPeriod": {"start": "x"}}}, 1))]}
    assert summary_reads(broken["Patient/p1"]) is None
    decision = _judge(broken, DecisionCache())(OBS, frozenset({"Patient/p1"}))
    assert decision.verdict.value == "deny"


# ---------------------------------------------------------------------- 4. versions


@pytest.mark.parametrize("path", ["resource", "record"])
def test_a_permit_naming_one_version_opens_that_version_only(path: str) -> None:
    """``data.reference`` to ``Observation/r1/_history/1`` in a permit (under opt-out) opens
    version 1; version 2, or a copy that names no version, stays closed. A deny naming one
    version closes every version (what is named may be any of them, fail closed)."""
    ctx = RequestContext(actor=Actor(reference="Practitioner/pr1"), purpose="TREAT", now=DECIDED_AT)
    owners = frozenset({"Patient/p1"})

    def verdict(provision: dict[str, Any], policy_rule: str, version: str | None) -> str:
        consent = compile_consent(consent_json({"policyRule": {"coding": [{"code": policy_rule}]},
                                                "provision": provision}, 1))
        resource = dict(OBS, meta={"versionId": version}) if version else dict(OBS)
        consents = {"Patient/p1": [consent]}
        policy = Policy(default_decision="permit")
        if path == "resource":
            return decide_resource(consents, resource, frozenset(), frozenset(), ctx, policy, patients=owners).verdict.value
        record = facts_of(resource, owners, frozenset(), frozenset(), summary_reads([consent]) or frozenset())
        return decide_facts(consents, record, ctx, policy).verdict.value

    named = {"data": [{"meaning": "instance", "reference": {"reference": "Observation/r1/_history/1"}}]}
    permit = {"provision": [{"type": "permit", **named}]}
    assert verdict(permit, "OPTOUT", "1") == "permit"
    assert verdict(permit, "OPTOUT", "2") == "deny"
    assert verdict(permit, "OPTOUT", None) == "deny"
    unversioned = {"provision": [{"type": "permit", "data": [
        {"meaning": "instance", "reference": {"reference": "Observation/r1"}}]}]}
    assert verdict(unversioned, "OPTOUT", "2") == "permit"
    deny = {"provision": [{"type": "deny", **named}]}
    for version in ("1", "2", None):
        assert verdict(deny, "OPTIN", version) == "deny"
