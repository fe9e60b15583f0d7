"""Consent lookup through the real request path: query shape, paging, cache, single flight,
fail-closed lookups and eviction after Consent writes (CONTRACT §5, §6; issue 6)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson
import pytest
from aiohttp import web

from tests.conftest import GatewayUnderTest
from tests.fakes import FakeFhir
from tests.fixtures import clinical as c
from tests.unit.test_enforcement import (
    MakeGateway,
    assert_no_secrets,
    call,
    fhir,
    routes,
)

CBC = "/Observation/obs-cbc-58410-ana"
HITS = "consent_gateway_consent_cache_hits_total"
MISSES = "consent_gateway_consent_cache_misses_total"
ERRORS = "consent_gateway_consent_lookup_errors_total"


def consent_queries(fake: FakeFhir) -> list[dict[str, list[str]]]:
    """Parsed query of every consent lookup the upstream received."""
    return [
        parse_qs(urlsplit(r.path_qs).query) for r in fake.requests
        if r.method == "GET" and urlsplit(r.path_qs).path == "/fhir/Consent"
    ]


@pytest.fixture
def world(fake_fhir: FakeFhir) -> FakeFhir:
    c.seed_all(fake_fhir)
    fake_fhir.add(c.opt_in(c.PAT_ANA))
    return fake_fhir


async def test_lookup_asks_for_the_patients_active_consents(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    status, _, _ = await call(gateway, "GET", CBC)
    assert status == 200
    [query] = consent_queries(world)
    assert query["patient"] == [c.PAT_ANA]
    assert query["status"] == ["active"]


async def test_lookup_follows_next_pages(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    first = c.bundle([c.opt_in(c.PAT_ANA)], world.base_url)
    first["link"].append({"relation": "next", "url": f"{world.base_url}/Consent?page=2"})
    second = c.bundle([c.opt_out(c.PAT_ANA)], world.base_url)

    async def pages(request: web.Request) -> web.StreamResponse | None:
        if request.path == "/fhir/Consent":
            return fhir(second if request.query.get("page") == "2" else first)
        return None

    world.override = pages
    status, _, _ = await call(gateway, "GET", CBC)
    # The opt-out is only on the second page.
    assert status == 403
    assert [q.get("page") for q in consent_queries(world)] == [None, ["2"]]


async def test_second_request_is_answered_from_the_cache(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    await call(gateway, "GET", CBC)
    await call(gateway, "GET", "/Condition/cond-htn-i10-ana")
    assert len(consent_queries(world)) == 1
    assert gateway.metric(MISSES) == 1
    assert gateway.metric(HITS) == 1
    assert gateway.metric("consent_gateway_consent_cache_entries") == 1


async def test_zero_ttl_queries_every_time(world: FakeFhir, make_gateway: MakeGateway) -> None:
    gw = await make_gateway(world.base_url, consent={"cache_ttl_s": 0})
    for _ in range(3):
        assert (await call(gw, "GET", CBC))[0] == 200
    assert len(consent_queries(world)) == 3
    assert gw.metric(HITS) == 0


async def test_concurrent_misses_share_one_query(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    async def slow_consents(request: web.Request) -> web.StreamResponse | None:
        if request.path == "/fhir/Consent":
            await asyncio.sleep(0.3)
        return None

    world.override = slow_consents
    paths = [CBC, "/Condition/cond-htn-i10-ana", "/Patient/pat-ana-5581", CBC, "/Condition/cond-htn-i10-ana"]
    answers = await asyncio.gather(*(call(gateway, "GET", p) for p in paths))
    assert [a[0] for a in answers] == [200] * len(paths)
    assert len(consent_queries(world)) == 1
    assert gateway.metric(MISSES) == 1


async def test_page_naming_several_patients_is_one_query(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    world.add(c.opt_in(c.PAT_BEN, "consent-ben"))
    status, _, raw = await call(gateway, "GET", "/Observation?status=final")
    assert status == 200
    [query] = consent_queries(world)
    assert sorted(query["patient"][0].split(",")) == sorted([c.PAT_ANA, c.PAT_BEN])
    kept = [e["resource"]["id"] for e in orjson.loads(raw)["entry"] if e["resource"]["resourceType"] == "Observation"]
    assert sorted(kept) == ["obs-cbc-58410-ana", "obs-cbc-58410-ben"]


async def test_group_memberships_are_looked_up_and_cached(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    team = {"resourceType": "CareTeam", "id": "ct-hiv-clinic", "status": "active",
            "participant": [{"member": {"reference": c.DOCTOR}}]}
    consent = c.opt_in(c.PAT_ANA, "consent-team", labels=("HIV",))
    consent["provision"]["actor"] = [{"role": {"text": "care team"}, "reference": {"reference": "CareTeam/ct-hiv-clinic"}}]
    world.resources.clear()
    c.seed_all(world)
    world.add(consent)

    async def memberships(request: web.Request) -> web.StreamResponse | None:
        if request.path in ("/fhir/CareTeam", "/fhir/Group"):
            member = request.query.get("participant") or request.query.get("member")
            found = [team] if request.path == "/fhir/CareTeam" and member == c.DOCTOR else []
            return fhir(c.bundle(found, world.base_url))
        return None

    world.override = memberships
    assert (await call(gateway, "GET", "/Condition/cond-hiv-b20-91a"))[0] == 200
    assert (await call(gateway, "GET", "/Condition/cond-hiv-b20-91a", actor=c.BANNED_DOCTOR))[0] == 403
    assert (await call(gateway, "GET", "/Observation/obs-hiv-75622-44c"))[0] == 200
    team_queries = [r for r in world.requests if r.path_qs.startswith("/fhir/CareTeam?")]
    assert len(team_queries) == 2  # one per actor, the second request of dr-gomez is cached


# ---------------------------------------------------------------- failing lookups


async def _status_500(request: web.Request) -> web.StreamResponse:
    return fhir({"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "exception"}]}, 500)


async def _garbage(request: web.Request) -> web.StreamResponse:
    return web.Response(body=b'{"resourceType": "Bundle", "entry": [', content_type="application/fhir+json")


async def _not_a_bundle(request: web.Request) -> web.StreamResponse:
    return fhir(c.opt_in(c.PAT_ANA))


async def _another_patients_consent(request: web.Request) -> web.StreamResponse:
    return fhir(c.bundle([c.opt_in(c.PAT_ANA), c.opt_in(c.PAT_BEN, "consent-ben")], "http://fhir.example/fhir"))


async def _error_outcome_in_page(request: web.Request) -> web.StreamResponse:
    page = c.bundle([c.opt_in(c.PAT_ANA)], "http://fhir.example/fhir")
    page["entry"].append({"resource": {"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": "too-costly", "diagnostics": "result set truncated"}]},
        "search": {"mode": "outcome"}})
    return fhir(page)


async def _slow(request: web.Request) -> web.StreamResponse:
    await asyncio.sleep(1.0)
    return fhir(c.bundle([c.opt_in(c.PAT_ANA)], "http://fhir.example/fhir"))


@pytest.mark.parametrize(
    "answer",
    [_status_500, _garbage, _not_a_bundle, _another_patients_consent, _error_outcome_in_page, _slow],
    ids=lambda f: f.__name__.strip("_"),
)
@pytest.mark.parametrize(
    "path", [CBC, f"/Observation?patient={c.PAT_ANA}", "/Patient/pat-ana-5581/$everything"], ids=["read", "search", "everything"]
)
async def test_failed_lookup_is_503_and_reveals_nothing(
    world: FakeFhir, make_gateway: MakeGateway,
    answer: Callable[[web.Request], Awaitable[web.StreamResponse]], path: str,
) -> None:
    gw = await make_gateway(world.base_url, upstream={"timeout_s": 0.4})
    everything = c.bundle([c.ANA, *c.ANA_SENSITIVE, *c.ANA_ORDINARY], world.base_url)

    async def override(request: web.Request) -> web.StreamResponse | None:
        if request.path == "/fhir/Consent":
            return await answer(request)
        if request.path.endswith("/$everything"):
            return fhir(everything)
        return None

    world.override = override
    status, headers, raw = await call(gw, "GET", path)
    assert status == 503, raw
    assert headers["Content-Type"].startswith("application/fhir+json")
    assert headers["X-Consent-Decision"] == "deny"
    outcome = orjson.loads(raw)
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["code"] == "transient"
    assert_no_secrets(raw, (*c.SECRETS, "obs-cbc-58410-ana", "58410-2", "Reyes", "consent-ben", "truncated"))
    assert gw.metric(ERRORS) == 1
    # A failure is not cached: once the source answers again, so does the gateway.
    world.override = None
    assert (await call(gw, "GET", CBC))[0] == 200


async def test_consent_source_down_is_503(world: FakeFhir, make_gateway: MakeGateway, dead_url: str) -> None:
    gw = await make_gateway(world.base_url, consent={"source_url": dead_url})
    status, headers, raw = await call(gw, "GET", f"/Condition?patient={c.PAT_ANA}")
    assert status == 503
    assert headers["X-Consent-Decision"] == "deny"
    assert_no_secrets(raw, (*c.SECRETS, "cond-htn-i10-ana", "I10"))
    assert gw.metric(ERRORS) == 1


# ---------------------------------------------------------------- eviction after writes


TRANSACTION_RESPONSE = {"resourceType": "Bundle", "type": "transaction-response", "entry": [
    {"response": {"status": "200 OK", "location": "Consent/consent-optin/_history/2"}},
]}


@pytest.mark.parametrize("how", ["post", "put", "transaction"])
async def test_consent_write_through_the_gateway_evicts_the_patient(
    world: FakeFhir, gateway: GatewayUnderTest, how: str
) -> None:
    assert (await call(gateway, "GET", CBC))[0] == 200
    assert (await call(gateway, "GET", CBC))[0] == 200
    assert len(consent_queries(world)) == 1
    revoked = c.opt_out(c.PAT_ANA, "consent-optin")
    if how == "post":
        status, _, _ = await call(gateway, "POST", "/Consent", actor=c.PAT_ANA, body={**revoked, "id": "consent-optout"})
    elif how == "put":
        status, _, _ = await call(gateway, "PUT", "/Consent/consent-optin", actor=c.PAT_ANA, body=revoked)
    else:
        def store_and_answer(request: web.Request) -> dict[str, Any]:
            world.add(revoked)
            return TRANSACTION_RESPONSE

        world.override = routes({("POST", "/"): store_and_answer})
        status, _, _ = await call(gateway, "POST", "/", actor=c.PAT_ANA, body={
            "resourceType": "Bundle", "type": "transaction",
            "entry": [{"resource": revoked, "request": {"method": "PUT", "url": "Consent/consent-optin"}}],
        })
    assert status in (200, 201)
    assert (await call(gateway, "GET", CBC))[0] == 403
    assert len(consent_queries(world)) == 2


async def test_failed_consent_write_keeps_the_cache(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    await call(gateway, "GET", CBC)

    async def reject(request: web.Request) -> web.StreamResponse | None:
        if request.method == "PUT":
            return fhir({"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "conflict"}]}, 409)
        return None

    world.override = reject
    status, _, _ = await call(gateway, "PUT", "/Consent/consent-optin", actor=c.PAT_ANA, body=c.opt_out(c.PAT_ANA, "consent-optin"))
    assert status == 409
    await call(gateway, "GET", CBC)
    assert len(consent_queries(world)) == 1


async def test_a_cached_patient_is_asked_again_once_the_ttl_passes_or_it_is_evicted() -> None:
    from prometheus_client import CollectorRegistry

    from gateway.metrics import Metrics
    from gateway.sources.store import ConsentStore
    from tests.sources.test_change_feed import ListingSource, opt

    source = ListingSource()
    source.consents["Patient/a"] = [opt("Patient/a", "OPTIN")]
    metrics = Metrics(CollectorRegistry())
    store = ConsentStore(source, metrics, ttl_s=0.3, max_patients=10)
    first = await store.get(["Patient/a"])
    assert (await store.get(["Patient/a", "Patient/a"]))["Patient/a"] is first["Patient/a"]
    assert source.fetches == [["Patient/a"]]
    await asyncio.sleep(0.35)
    await store.get(["Patient/a"])
    store.invalidate("Patient/a")
    await store.get(["Patient/a"])
    assert source.fetches == [["Patient/a"]] * 3
    hits = metrics.registry.get_sample_value(HITS)
    assert (hits, metrics.registry.get_sample_value(MISSES)) == (1.0, 3.0)
