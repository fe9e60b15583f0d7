"""Property: under deny-overrides, the order of a patient's consents never changes the answer."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.consent import compile_consent
from gateway.core.decision import decide, preflight
from tests.decision.support import DEFAULT_RESOURCE, consent_json, context_of, labels_of, policy_of

ACTORS = ["Practitioner/pr1", "Practitioner/pr2", "Organization/org1"]
conditions = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(["permit", "deny"]),
        "actor": st.sampled_from(ACTORS).map(lambda a: [{"reference": {"reference": a}}]),
        "purpose": st.sampled_from(["TREAT", "ETREAT", "HPAYMT"]).map(lambda p: [{"code": p}]),
        "securityLabel": st.sampled_from(["PSY", "HIV", "N"]).map(lambda c: [{"code": c}]),
        "class": st.sampled_from(["Observation", "Condition"]).map(
            lambda t: [{"system": "http://hl7.org/fhir/resource-types", "code": t}]
        ),
    },
)
provisions = st.recursive(
    conditions,
    lambda kids: st.tuples(conditions, st.lists(kids, max_size=3)).map(
        lambda pair: {**pair[0], "provision": pair[1]}
    ),
    max_leaves=6,
)
consents = st.fixed_dictionaries(
    {"provision": provisions},
    optional={
        "status": st.sampled_from(["active", "inactive", None]),
        "policyRule": st.sampled_from(["OPTIN", "OPTOUT", "NOPP"]).map(
            lambda c: {"coding": [{"code": c}]}
        ),
        "dateTime": st.sampled_from(["2023-01-01", "2024-02-02T10:00:00Z"]),
    },
)


@settings(max_examples=150, deadline=None)
@given(
    specs=st.lists(consents, min_size=1, max_size=5),
    order=st.randoms(use_true_random=False),
    default=st.sampled_from(["permit", "deny"]),
    labels=st.sets(st.sampled_from(["PSY", "HIV", "N"])),
)
def test_consent_order_never_changes_deny_overrides(
    specs: list[dict[str, Any]], order: Any, default: str, labels: set[str]
) -> None:
    compiled = [compile_consent(consent_json(s, i)) for i, s in enumerate(specs, 1)]
    shuffled = list(compiled)
    order.shuffle(shuffled)
    policy = policy_of({"default_decision": default})
    ctx = context_of({"organization": "Organization/org1"})
    resource_labels = labels_of(sorted(labels))

    def verdicts(items: list[Any]) -> tuple[str, str]:
        one = decide(items, DEFAULT_RESOURCE, resource_labels, frozenset(), ctx, policy)
        pre = preflight(items, ctx, policy)
        return one.verdict.value, pre.verdict.value

    assert verdicts(compiled) == verdicts(shuffled)
