"""Time ``decide_resource`` for one resource against a patient's 5 consents: ``python -m bench.decide``.

The consents are a realistic mix: a general opt-in for treatment, an opt-out for one
organisation with a nested permit, a permit for mental-health data naming PSY, an expired
research consent and a deny for records from a timeframe. Consents are compiled once, as
the cache does; the timed loop is the per-resource decision (including the compartment
lookup) the enforcer runs for every entry of a response.
"""

from __future__ import annotations

import argparse
import time
from datetime import datetime, timezone
from typing import Any

from gateway.core.consent import compile_consent
from gateway.core.decision import Policy, decide_resource
from gateway.core.model import Actor, Label, RequestContext

ACT = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
SCOPE = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope",
                     "code": "patient-privacy"}]}


def _consent(cid: str, **fields: Any) -> dict[str, Any]:
    return {"resourceType": "Consent", "id": cid, "status": "active", "scope": SCOPE,
            "patient": {"reference": "Patient/p1"}, "dateTime": "2024-01-01", **fields}


CONSENTS = [
    _consent("treat", policyRule={"coding": [{"system": ACT, "code": "OPTIN"}]},
             provision={"type": "permit", "purpose": [{"code": "TREAT"}]}),
    _consent("not-ghh", policyRule={"coding": [{"system": ACT, "code": "OPTOUT"}]},
             provision={"type": "deny", "actor": [{"reference": {"reference": "Organization/ghh"}}],
                        "provision": [{"type": "permit",
                                       "actor": [{"reference": {"reference": "Practitioner/gp"}}]}]}),
    _consent("psy", provision={"type": "permit",
                               "actor": [{"reference": {"reference": "Organization/clinic"}}],
                               "securityLabel": [{"system": ACT, "code": "PSY"}]}),
    _consent("research", scope={"coding": [{"code": "research"}]},
             provision={"type": "permit", "period": {"start": "2020-01-01", "end": "2021-01-01"}}),
    _consent("window", provision={"type": "permit", "provision": [
        {"type": "deny", "dataPeriod": {"start": "2015-01-01", "end": "2015-02-01"}},
        {"type": "permit", "class": [{"system": "http://hl7.org/fhir/resource-types",
                                      "code": "Observation"}]}]}),
]
RESOURCE = {
    "resourceType": "Observation", "id": "o1", "status": "final",
    "code": {"coding": [{"system": "http://loinc.org", "code": "2345-7"}]},
    "subject": {"reference": "Patient/p1"}, "effectiveDateTime": "2024-05-01T09:30:00Z",
    "performer": [{"reference": "Practitioner/gp"}],
}


def measure(iterations: int) -> float:
    """Microseconds per decision, best of three runs."""
    compiled = {"Patient/p1": [compile_consent(c) for c in CONSENTS]}
    ctx = RequestContext(
        actor=Actor("Practitioner/gp", organization="Organization/clinic"),
        purpose="TREAT",
        now=datetime(2024, 6, 1, tzinfo=timezone.utc),
    )
    policy = Policy(sensitive=frozenset({"PSY", "HIV", "SUD"}))
    labels = frozenset({Label("http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "N")})
    scopes = frozenset({"LABS"})
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(iterations):
            decide_resource(compiled, RESOURCE, labels, scopes, ctx, policy)
        best = min(best, (time.perf_counter() - start) / iterations * 1e6)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=20000)
    parser.add_argument("--smoke", action="store_true", help="a quick run (CI)")
    args = parser.parse_args()
    us = measure(500 if args.smoke else args.iterations)
    print(f"decide: {us:.2f} us per (resource, 5 consents) decision (target < 20 us)")


if __name__ == "__main__":
    main()
