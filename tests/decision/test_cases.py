"""Decision tables: every case in cases/*.yaml, case name as test id."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.core.compartment import patients_of
from gateway.core.consent import CompiledConsent
from gateway.core.decision import decide_resource, preflight
from gateway.core.model import Decision
from tests.decision.support import (
    DEFAULT_RESOURCE,
    bases_of,
    compiled,
    context_of,
    labels_of,
    policy_of,
)

CASES_DIR = Path(__file__).parent / "cases"


def _load() -> list[Any]:
    params = []
    for path in sorted(CASES_DIR.glob("*.yaml")):
        for case in yaml.safe_load(path.read_text()):
            params.append(pytest.param(case, id=case["name"]))
    return params


def _by_patient(
    consents: list[CompiledConsent], resource: dict[str, Any], missing: list[str], ours: frozenset[str],
) -> dict[str, list[CompiledConsent]]:
    grouped: dict[str, list[CompiledConsent]] = {p: [] for p in patients_of(resource, ours)}
    for consent in consents:
        # The consent source files a consent under the patient it was looked up for.
        grouped.setdefault(consent.patient or "Patient/p1", []).append(consent)
    for patient in missing:
        grouped.pop(patient, None)
    return grouped


def _run(case: dict[str, Any]) -> Decision:
    consents = compiled(case)
    policy = policy_of(case.get("policy"))
    ctx = context_of(case.get("request"))
    if case.get("mode") == "preflight":
        return preflight(consents, ctx, policy, patient=case.get("patient", "Patient/p1"))
    resource = case.get("resource", DEFAULT_RESOURCE)
    known = {k: frozenset(v) for k, v in case.get("known_refs", {}).items()}
    return decide_resource(
        _by_patient(consents, resource, case.get("not_looked_up", []), bases_of(case)),
        resource,
        labels_of(case.get("labels", [])),
        frozenset(case.get("scopes", [])),
        ctx,
        policy,
        known_refs=known,
        ours=bases_of(case),
    )


@pytest.mark.parametrize("case", _load())
def test_case(case: dict[str, Any]) -> None:
    decision = _run(case)
    expect = case["expect"]
    explained = [str(r) for r in decision.reasons]
    assert decision.verdict.value == expect["verdict"], explained
    assert [r.rule for r in decision.reasons] == expect["rules"], explained
    if "provisions" in expect:
        assert [r.provision for r in decision.reasons] == expect["provisions"]
    if "consents" in expect:
        assert [r.consent for r in decision.reasons] == expect["consents"]
    if "labels" in expect:
        assert list(decision.labels) == expect["labels"]
    if "combining" in expect:
        assert decision.combining == expect["combining"]
    if "errors" in expect:
        assert bool(decision.errors) == expect["errors"], decision.errors
