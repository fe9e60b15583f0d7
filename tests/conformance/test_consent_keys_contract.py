"""CONTRACT §3 ``consent.*`` keys as an outsider checks them: each one changes what a running
gateway answers over HTTP (the decision tables check the same semantics in the core)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from tests.conftest import GatewayUnderTest
from tests.fakes import FakeFhir
from tests.fixtures.clinical import opt_in, opt_out
from tests.identity.conftest import observation

DOCTOR = {"X-Actor": "Practitioner/doc-1"}


async def _status(gw: GatewayUnderTest, path: str, headers: dict[str, str]) -> int:
    async with gw.session.get(gw.url + path, headers=headers) as resp:
        await resp.read()
        return resp.status


async def test_combining_deny_overrides_or_latest_wins(fake_fhir: FakeFhir, make_gateway: Callable[..., Any]) -> None:
    # An opt-out of 2023, then an opt-in of 2024: any deny wins, or the latest dateTime decides.
    older = {**opt_out("Patient/p1", cid="c-2023"), "dateTime": "2023-03-01T09:00:00Z"}
    newer = {**opt_in("Patient/p1", cid="c-2024"), "dateTime": "2024-03-01T09:00:00Z"}
    fake_fhir.add(observation("o1", "p1"), older, newer)
    overriding: GatewayUnderTest = await make_gateway(fake_fhir.base_url)
    latest: GatewayUnderTest = await make_gateway(fake_fhir.base_url, consent={"combining": "latest-wins"})
    assert await _status(overriding, "/Observation/o1", DOCTOR) == 403
    assert await _status(latest, "/Observation/o1", DOCTOR) == 200


async def test_patient_self_access_can_be_turned_off(fake_fhir: FakeFhir, make_gateway: Callable[..., Any]) -> None:
    fake_fhir.add(observation("o1", "p1"), opt_out("Patient/p1"))
    on: GatewayUnderTest = await make_gateway(fake_fhir.base_url)
    off: GatewayUnderTest = await make_gateway(fake_fhir.base_url, consent={"patient_self_access": False})
    assert await _status(on, "/Observation/o1", {"X-Actor": "Patient/p1"}) == 200
    # Without self access the patient's own opt-out decides for them too.
    assert await _status(off, "/Observation/o1", {"X-Actor": "Patient/p1"}) == 403


async def test_default_decision_applies_when_no_consent_does(fake_fhir: FakeFhir, make_gateway: Callable[..., Any]) -> None:
    fake_fhir.add(observation("o1", "p1"))
    deny: GatewayUnderTest = await make_gateway(fake_fhir.base_url)
    permit: GatewayUnderTest = await make_gateway(fake_fhir.base_url, consent={"default_decision": "permit"})
    assert await _status(deny, "/Observation/o1", DOCTOR) == 403
    assert await _status(permit, "/Observation/o1", DOCTOR) == 200


async def test_cache_max_patients_bounds_the_consent_cache(fake_fhir: FakeFhir, make_gateway: Callable[..., Any]) -> None:
    for n in range(1, 5):
        fake_fhir.add(observation(f"o{n}", f"p{n}"), opt_in(f"Patient/p{n}", cid=f"c{n}"))
    gw: GatewayUnderTest = await make_gateway(fake_fhir.base_url, consent={"cache_max_patients": 2, "cache_ttl_s": 3600})
    for n in range(1, 5):
        assert await _status(gw, f"/Observation/o{n}", DOCTOR) == 200
    assert gw.metric("consent_gateway_consent_cache_entries") == 2
    misses = gw.metric("consent_gateway_consent_cache_misses_total")
    assert await _status(gw, "/Observation/o4", DOCTOR) == 200  # still cached
    assert gw.metric("consent_gateway_consent_cache_misses_total") == misses
    assert await _status(gw, "/Observation/o1", DOCTOR) == 200  # pushed out: read again
    assert gw.metric("consent_gateway_consent_cache_misses_total") == misses + 1


async def test_cache_ttl_s_is_how_long_consents_are_kept(fake_fhir: FakeFhir, make_gateway: Callable[..., Any]) -> None:
    fake_fhir.add(observation("o1", "p1"), opt_in("Patient/p1"))
    gw: GatewayUnderTest = await make_gateway(fake_fhir.base_url, consent={"cache_ttl_s": 1})
    assert await _status(gw, "/Observation/o1", DOCTOR) == 200
    fake_fhir.add(opt_out("Patient/p1", cid="consent-optin"))  # replaced at the server, behind the gateway's back
    assert await _status(gw, "/Observation/o1", DOCTOR) == 200  # the cached opt-in still decides
    await asyncio.sleep(1.2)
    assert await _status(gw, "/Observation/o1", DOCTOR) == 403
