"""The consent change feed (CONTRACT §9) against an in-memory source: what a poll evicts,
where the next poll starts, and what a failed poll leaves behind."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from gateway.core.errors import ConsentUnavailable
from gateway.core.fhir import JSON
from gateway.metrics import Metrics
from gateway.sources.changes import OVERLAP, ChangeFeed
from gateway.sources.fhir import FhirConsentSource
from gateway.sources.store import ConsentChange, ConsentStore
from gateway.upstream import Upstream
from tests.fakes import FakeFhir

T0 = datetime(2026, 11, 27, 12, 0, tzinfo=timezone.utc)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


class ListingSource:
    """Consents per patient plus a change listing; ``down`` makes every call fail."""

    def __init__(self, listing: bool = True) -> None:
        self.consents: dict[str, list[JSON]] = {}
        self.listed: list[ConsentChange] = []
        self.asked_since: list[datetime] = []
        self.fetches: list[list[str]] = []
        self.listing = listing
        self.down = False

    async def fetch(self, patients: Sequence[str]) -> dict[str, list[JSON]]:
        if self.down:
            raise ConsentUnavailable("down")
        self.fetches.append(list(patients))
        return {p: list(self.consents.get(p, [])) for p in patients}

    async def memberships(self, actor: str) -> frozenset[str]:
        return frozenset()

    async def store_consent(self, consent: JSON) -> str:
        return "Consent/x"

    async def latest_change(self) -> datetime | None:
        if self.down:
            raise ConsentUnavailable("down")
        return max((c.updated for c in self.listed if c.updated), default=None)

    async def changes(self, since: datetime) -> list[ConsentChange] | None:
        if self.down:
            raise ConsentUnavailable("down")
        if not self.listing:
            return None
        self.asked_since.append(since)
        return [c for c in self.listed if c.updated is not None and c.updated > since]

    async def probe(self) -> bool:
        return self.listing


def opt(patient: str, rule: str) -> JSON:
    return {
        "resourceType": "Consent", "id": f"{patient.split('/')[1]}-{rule}", "status": "active",
        "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]},
        "patient": {"reference": patient},
        "policyRule": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": rule}]},
    }


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


def watched(source: ListingSource, metrics: Metrics, interval_s: float) -> tuple[ConsentStore, ChangeFeed]:
    """A consent cache (long TTL, so only the feed evicts) and the feed that watches it."""
    store = ConsentStore(source, metrics, ttl_s=600, max_patients=10)
    return store, ChangeFeed(store, metrics, interval_s)


async def cached(store: ConsentStore, source: ListingSource, *patients: str) -> None:
    await store.get(patients)
    source.fetches.clear()


async def test_first_poll_starts_at_the_sources_newest_change_by_its_clock(metrics: Metrics) -> None:
    source = ListingSource()
    source.listed = [ConsentChange("Consent/old|1", "Patient/a", at(-3600))]
    _, feed = watched(source, metrics, 1)
    assert await feed.poll_once() == 0
    assert feed.since == at(-3600)  # the server's instant, whatever this machine's clock says
    await feed.poll_once()
    assert source.asked_since == [at(-3600) - OVERLAP]


async def test_changed_patients_are_evicted_once_and_others_stay_cached(metrics: Metrics) -> None:
    source = ListingSource()
    source.consents = {"Patient/a": [opt("Patient/a", "OPTIN")], "Patient/b": [opt("Patient/b", "OPTIN")]}
    store, feed = watched(source, metrics, 1)
    await feed.poll_once()
    await cached(store, source, "Patient/a", "Patient/b")
    source.consents["Patient/a"] = [opt("Patient/a", "OPTOUT")]
    source.listed.append(ConsentChange("Consent/a|2", "Patient/a", at(5)))
    assert await feed.poll_once() == 1
    found = await store.get(["Patient/a", "Patient/b"])
    assert source.fetches == [["Patient/a"]]  # only the changed patient was read again
    assert found["Patient/a"].consents[0].policy_rule == "OPTOUT"
    # The overlap reads the same change again: it is not evicted twice.
    source.fetches.clear()
    assert await feed.poll_once() == 0
    await store.get(["Patient/a"])
    assert source.fetches == []


async def test_a_change_that_commits_late_inside_the_overlap_is_still_seen(metrics: Metrics) -> None:
    source = ListingSource()
    store, feed = watched(source, metrics, 1)
    source.listed = [ConsentChange("Consent/x|1", "Patient/x", at(10))]
    await feed.poll_once()
    await cached(store, source, "Patient/b")
    # Stamped before the newest change seen, but visible only now (a late commit).
    source.listed.append(ConsentChange("Consent/b|2", "Patient/b", at(10) - OVERLAP / 2))
    await feed.poll_once()
    assert store.size == 0


async def test_a_change_naming_no_patient_evicts_everyone(metrics: Metrics) -> None:
    source = ListingSource()
    store, feed = watched(source, metrics, 1)
    await feed.poll_once()
    await cached(store, source, "Patient/a", "Patient/b")
    source.listed.append(ConsentChange("*", None, at(1)))
    await feed.poll_once()
    assert store.size == 0


async def test_failed_polls_are_counted_change_nothing_and_resume_from_the_same_instant(metrics: Metrics) -> None:
    source = ListingSource()
    store, feed = watched(source, metrics, 0.01)
    source.listed = [ConsentChange("Consent/x|1", "Patient/x", at(0))]
    await feed.poll_once()
    await cached(store, source, "Patient/a")
    source.down = True
    source.listed.append(ConsentChange("Consent/a|2", "Patient/a", at(3)))
    with pytest.raises(ConsentUnavailable):
        await feed.poll_once()
    assert store.size == 1 and feed.since == at(0)
    source.down = False
    assert await feed.poll_once() == 1
    assert store.size == 0


async def test_run_counts_errors_and_reports_the_age_of_the_last_good_poll(metrics: Metrics) -> None:
    import asyncio

    source = ListingSource()
    store, feed = watched(source, metrics, 0.02)
    task = asyncio.create_task(feed.run())
    await asyncio.sleep(0.1)
    age = metrics.registry.get_sample_value("consent_gateway_change_poll_age_seconds")
    assert age is not None and age < 0.1
    source.down = True
    await asyncio.sleep(0.15)
    task.cancel()
    errors = metrics.registry.get_sample_value("consent_gateway_change_poll_errors_total")
    assert errors is not None and errors >= 3
    stale = metrics.registry.get_sample_value("consent_gateway_change_poll_age_seconds")
    assert stale is not None and stale >= 0.1


async def test_a_source_without_a_change_listing_has_its_cached_patients_reread(metrics: Metrics) -> None:
    source = ListingSource(listing=False)
    source.consents = {"Patient/a": [opt("Patient/a", "OPTIN")]}
    store, feed = watched(source, metrics, 1)
    await feed.poll_once()
    await cached(store, source, "Patient/a")
    source.consents["Patient/a"] = [opt("Patient/a", "OPTOUT")]
    await feed.poll_once()
    assert source.fetches == [["Patient/a"]]  # re-read by the poll, not by a request
    source.fetches.clear()
    found = await store.get(["Patient/a"])
    assert source.fetches == [] and found["Patient/a"].consents[0].policy_rule == "OPTOUT"


async def test_a_deleted_consent_evicts_only_the_patients_who_had_it(metrics: Metrics) -> None:
    source = ListingSource()
    source.consents = {"Patient/a": [opt("Patient/a", "OPTIN")], "Patient/b": [opt("Patient/b", "OPTIN")]}
    store, feed = watched(source, metrics, 1)
    await feed.poll_once()
    await cached(store, source, "Patient/a", "Patient/b")
    del source.consents["Patient/a"]
    source.listed.append(ConsentChange("Consent/a-OPTIN|deleted", None, at(2), consent="Consent/a-OPTIN"))
    assert await feed.poll_once() == 1
    await store.get(["Patient/a", "Patient/b"])
    assert source.fetches == [["Patient/a"]]


# ---------------------------------------------------------------- the FHIR source's listing


def _bundle(entries: list[JSON], next_url: str | None = None, kind: str = "searchset") -> JSON:
    links = [{"relation": "next", "url": next_url}] if next_url else []
    return {"resourceType": "Bundle", "type": kind, "link": links, "entry": entries}


@pytest.fixture
async def fhir_server(fake_fhir: FakeFhir) -> AsyncIterator[tuple[FakeFhir, Upstream]]:
    server = Upstream(fake_fhir.base_url, timeout_s=5, max_connections=4)
    await server.open()
    yield fake_fhir, server
    await server.close()


async def test_fhir_listing_is_paged_read_by_lastupdated_and_names_deletions(
    fhir_server: tuple[FakeFhir, Upstream],
) -> None:
    from aiohttp import web

    fake, server = fhir_server
    changed = [dict(opt(f"Patient/p{i}", "OPTOUT"), meta={"versionId": "2", "lastUpdated": f"2026-11-27T12:00:0{i}.000Z"})
               for i in range(3)]

    async def answer(request: web.Request) -> web.StreamResponse | None:
        if request.path == "/fhir/Consent" and "_lastUpdated" in request.query:
            assert request.query["_lastUpdated"] == "gt2026-11-27T11:59:50.000Z"
            page = int(request.query.get("page", "0"))
            following = f"{fake.base_url}/Consent?_lastUpdated=gt2026-11-27T11:59:50.000Z&page=1" if page == 0 else None
            rows = changed[:2] if page == 0 else changed[2:]
            return web.json_response(_bundle([{"resource": r, "search": {"mode": "match"}} for r in rows], following))
        if request.path == "/fhir/Consent/_history":
            gone = {"request": {"method": "DELETE", "url": "Consent/old-1"},
                    "response": {"status": "200", "lastModified": "2026-11-27T12:00:05.000Z"}}
            return web.json_response(_bundle([gone], kind="history"))
        return None

    fake.override = answer
    source = FhirConsentSource(server)
    found = await source.changes(datetime(2026, 11, 27, 11, 59, 50, tzinfo=timezone.utc))
    assert [(c.patient, c.consent) for c in found] == [
        ("Patient/p0", None), ("Patient/p1", None), ("Patient/p2", None), (None, "Consent/old-1"),
    ]
    assert found[2].updated == datetime(2026, 11, 27, 12, 0, 2, tzinfo=timezone.utc)
    assert len({c.key for c in found}) == 4


async def test_a_server_without_type_history_is_not_asked_again(fhir_server: tuple[FakeFhir, Upstream]) -> None:
    from aiohttp import web

    fake, server = fhir_server

    async def answer(request: web.Request) -> web.StreamResponse | None:
        if request.path == "/fhir/Consent/_history":
            return web.json_response({"resourceType": "OperationOutcome", "issue": []}, status=404)
        if request.path == "/fhir/Consent":
            return web.json_response(_bundle([]))
        return None

    fake.override = answer
    source = FhirConsentSource(server)
    assert await source.changes(T0) == []
    assert await source.changes(T0) == []
    assert [r.path_qs.split("?")[0] for r in fake.requests].count("/fhir/Consent/_history") == 1


async def test_change_polls_carry_the_gateways_own_credentials(
    fake_fhir: FakeFhir, make_gateway: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    from aiohttp import web

    seen: list[tuple[str, str | None]] = []

    async def record(request: web.Request) -> web.StreamResponse | None:
        if request.path.startswith("/fhir/Consent"):
            seen.append((request.path_qs, request.headers.get("Authorization")))
        return None

    fake_fhir.override = record
    monkeypatch.setenv("FHIR_TOKEN", "gw-secret")
    await make_gateway(
        fake_fhir.base_url, upstream={"auth": {"kind": "bearer", "token_env": "FHIR_TOKEN"}},
        consent={"change_poll_s": 0.05},
    )
    for _ in range(100):
        if any("_lastUpdated=gt" in path for path, _ in seen) and any("_history" in path for path, _ in seen):
            break
        await asyncio.sleep(0.05)
    polls = [auth for path, auth in seen if "_lastUpdated" in path or "_history" in path]
    assert polls and set(polls) == {"Bearer gw-secret"}
