"""The judge in core: decisions from facts, remembered per request and shared across requests
only under the same consents, requester, purpose and period."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

from gateway.core.consent import compile_consent
from gateway.core.decision import Policy, next_boundary
from gateway.core.judge import ConsentJudge, DecisionCache
from gateway.core.model import Actor, RequestContext, Verdict
from gateway.core.references import NOTHING_RESOLVED

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=timezone.utc)
PATIENT = "Patient/p1"
OBS = {"resourceType": "Observation", "id": "o1", "subject": {"reference": PATIENT},
       "code": {"coding": [{"system": "http://loinc.org", "code": "718-7"}]}}
OWNERS = frozenset({PATIENT})


def consent(rid: str, decision: str, end: datetime | None = None, actor: str | None = None) -> Any:
    provision: dict[str, Any] = {"type": decision}
    if end is not None:
        provision["period"] = {"end": end.isoformat()}
    if actor is not None:
        provision["actor"] = [{"role": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                                                     "code": "PRCP"}]}, "reference": {"reference": actor}}]
    return compile_consent({
        "resourceType": "Consent", "id": rid, "status": "active",
        "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": PATIENT}, "dateTime": "2026-01-01",
        "policyRule": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTIN"}]},
        "provision": provision,
    })


def judge(consents: tuple[Any, ...], cache: DecisionCache, *, now: datetime = NOW, actor: str = "Practitioner/d1",
          purpose: str = "TREAT", version: object = 1, same: tuple[Any, ...] | None = None) -> ConsentJudge:
    ctx = RequestContext(actor=Actor(actor), purpose=purpose, now=now)
    versions = {PATIENT: (version, same if same is not None else consents)}
    return ConsentJudge({PATIENT: consents}, ctx, Policy(), lambda r: frozenset(), lambda r: frozenset(),
                        NOTHING_RESOLVED, versions=versions, cache=cache)


def test_a_second_request_under_the_same_consents_uses_the_shared_decision() -> None:
    cache = DecisionCache()
    consents = (consent("c1", "permit"),)
    assert judge(consents, cache)(OBS, OWNERS).verdict is Verdict.PERMIT
    assert (cache.hits, cache.misses) == (0, 1)
    assert judge(consents, cache)(OBS, OWNERS).verdict is Verdict.PERMIT
    assert cache.hits == 1


def test_other_consents_under_the_same_version_are_never_served_the_shared_decision() -> None:
    cache = DecisionCache()
    permit, deny = (consent("c1", "permit"),), (consent("c1", "deny"),)
    assert judge(permit, cache)(OBS, OWNERS).verdict is Verdict.PERMIT
    # A draft replayed with the looked-up version (what-if): not the consents the version names.
    assert judge(deny, cache, same=permit)(OBS, OWNERS).verdict is Verdict.DENY
    # A new cache fill is a new version.
    assert judge(deny, cache, version=2)(OBS, OWNERS).verdict is Verdict.DENY


def test_requester_and_purpose_are_part_of_the_key() -> None:
    cache = DecisionCache()
    consents = (consent("c1", "permit", actor="Practitioner/d1"),)
    assert judge(consents, cache)(OBS, OWNERS).verdict is Verdict.PERMIT
    assert judge(consents, cache, actor="Practitioner/d2")(OBS, OWNERS).verdict is Verdict.DENY
    misses = cache.misses
    judge(consents, cache, purpose="HPAYMT")(OBS, OWNERS)
    assert cache.misses == misses + 1  # another purpose is decided anew


def test_a_shared_decision_ends_at_the_next_period_boundary() -> None:
    cache = DecisionCache()
    end = NOW + timedelta(minutes=5)
    consents = (consent("c1", "permit", end=end),)
    boundary = next_boundary(consents, NOW)
    assert boundary is not None and end <= boundary <= end + timedelta(seconds=1)
    assert judge(consents, cache)(OBS, OWNERS).verdict is Verdict.PERMIT
    later = judge(consents, cache, now=end + timedelta(seconds=1))
    assert later(OBS, OWNERS).verdict is Verdict.DENY  # the permit's period is over
    assert cache.hits == 0
