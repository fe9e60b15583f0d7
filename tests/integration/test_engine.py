"""The engine's HTTP front: what the gateway relies on from the real FHIR server beneath it."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from email.utils import parsedate_to_datetime
from typing import Any
from uuid import uuid4

import aiohttp
import pytest

from tests.integration.engine import SEED, Engine

FHIR_JSON = {"Content-Type": "application/fhir+json"}
SEED_ENTRIES = json.loads(SEED.read_text())["entry"]
SEEDED_OBSERVATIONS = {e["resource"]["id"] for e in SEED_ENTRIES if e["resource"]["resourceType"] == "Observation"}


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def get_json(http: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with http.get(url) as response:
        assert response.status == 200, await response.text()
        assert response.content_type == "application/fhir+json"
        body: dict[str, Any] = await response.json(content_type=None)
        return body


def link(bundle: dict[str, Any], relation: str) -> str | None:
    return next((lk["url"] for lk in bundle.get("link", []) if lk["relation"] == relation), None)


def ids(bundle: dict[str, Any], mode: str | None = None) -> list[str]:
    return [
        f"{e['resource']['resourceType']}/{e['resource']['id']}"
        for e in bundle.get("entry", [])
        if mode is None or e["search"]["mode"] == mode
    ]


def glucose(patient: str) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "2339-0", "display": "Glucose [Mass/volume] in Blood"}]},
        "subject": {"reference": patient},
        "valueQuantity": {"value": 95, "unit": "mg/dL", "system": "http://unitsofmeasure.org", "code": "mg/dL"},
    }


async def test_metadata_is_an_r4_capability_statement(fhir_engine: Engine, http: aiohttp.ClientSession) -> None:
    statement = await get_json(http, f"{fhir_engine.base_url}/metadata")
    assert statement["resourceType"] == "CapabilityStatement"
    assert statement["fhirVersion"] == "4.0.1"
    assert statement["format"] == ["json"]


def test_seed_transaction_created_every_entry_at_an_absolute_location(fhir_engine: Engine) -> None:
    response = fhir_engine.seed_responses[0]
    assert response["type"] == "transaction-response"
    assert len(response["entry"]) == len(SEED_ENTRIES)
    for sent, got in zip(SEED_ENTRIES, response["entry"], strict=True):
        resource = sent["resource"]
        version = got["resource"]["meta"]["versionId"]
        assert got["response"]["status"] == "201"
        assert got["response"]["location"] == (
            f"{fhir_engine.base_url}/{resource['resourceType']}/{resource['id']}/_history/{version}"
        )
        assert got["response"]["etag"] == f'W/"{version}"'
        assert got["fullUrl"] == f"{fhir_engine.base_url}/{resource['resourceType']}/{resource['id']}"


async def test_paging_honours_count_and_walks_to_the_end(fhir_engine: Engine, http: aiohttp.ClientSession) -> None:
    url: str | None = f"{fhir_engine.base_url}/Observation?_count=4&_sort=_id"
    seen: list[str] = []
    pages = 0
    previous_links = []
    while url:
        assert url.startswith(f"{fhir_engine.base_url}/Observation?")
        page = await get_json(http, url)
        assert len(ids(page)) <= 4
        assert "_count=4" in (link(page, "self") or "")
        seen += ids(page)
        previous_links.append(link(page, "previous"))
        url = link(page, "next")
        pages += 1
    total = page["total"]
    assert len(seen) == len(set(seen)) == total
    assert pages == -(-total // 4)
    assert previous_links[0] is None and all(previous_links[1:])
    assert {f"Observation/{i}" for i in SEEDED_OBSERVATIONS} <= set(seen)


async def test_previous_link_leads_back_to_the_first_page(fhir_engine: Engine, http: aiohttp.ClientSession) -> None:
    first = await get_json(http, f"{fhir_engine.base_url}/Observation?_count=3")
    second = await get_json(http, link(first, "next") or "")
    back = await get_json(http, link(second, "previous") or "")
    assert ids(back) == ids(first)
    assert set(ids(second)).isdisjoint(ids(first))


async def test_every_search_entry_has_an_absolute_full_url(fhir_engine: Engine, http: aiohttp.ClientSession) -> None:
    bundle = await get_json(
        http, f"{fhir_engine.base_url}/Condition?patient=Patient/pat-mh&_include=Condition:subject"
    )
    assert bundle["entry"]
    for entry in bundle["entry"]:
        resource = entry["resource"]
        assert entry["fullUrl"] == f"{fhir_engine.base_url}/{resource['resourceType']}/{resource['id']}"


async def test_create_answers_location_etag_and_last_modified(fhir_engine: Engine, http: aiohttp.ClientSession) -> None:
    async with http.post(
        f"{fhir_engine.base_url}/Observation", json=glucose("Patient/pat-normal"), headers=FHIR_JSON
    ) as response:
        assert response.status == 201
        created = await response.json(content_type=None)
        location = response.headers["Location"]
        etag = response.headers["ETag"]
        last_modified = parsedate_to_datetime(response.headers["Last-Modified"])
    version = created["meta"]["versionId"]
    assert location == f"{fhir_engine.base_url}/Observation/{created['id']}/_history/{version}"
    assert etag == f'W/"{version}"'
    assert last_modified.year >= 2026
    assert (await get_json(http, location))["id"] == created["id"]


async def test_include_and_revinclude_add_the_referenced_resources(
    fhir_engine: Engine, http: aiohttp.ClientSession
) -> None:
    included = await get_json(
        http,
        f"{fhir_engine.base_url}/Observation?code=http://loinc.org|75622-1&patient=Patient/pat-hiv&_include=Observation:subject",
    )
    assert ids(included, "match") == ["Observation/obs-hiv-screen"]
    assert ids(included, "include") == ["Patient/pat-hiv"]
    assert included["total"] == 1

    revincluded = await get_json(
        http, f"{fhir_engine.base_url}/Patient?_id=pat-mh&_revinclude=Consent:patient&_revinclude=CareTeam:subject"
    )
    assert ids(revincluded, "match") == ["Patient/pat-mh"]
    assert set(ids(revincluded, "include")) == {"Consent/consent-mh-psych-only", "CareTeam/careteam-mh"}


async def test_patient_search_finds_only_that_patients_records(fhir_engine: Engine, http: aiohttp.ClientSession) -> None:
    bundle = await get_json(http, f"{fhir_engine.base_url}/Observation?patient=Patient/pat-hiv&_count=100")
    assert set(ids(bundle)) == {"Observation/obs-hiv-screen", "Observation/obs-hiv-viralload", "Observation/obs-hiv-weight"}
    consents = await get_json(
        http, f"{fhir_engine.base_url}/Consent?patient=Patient/pat-oud,Patient/pat-mh&status=active"
    )
    assert set(ids(consents)) == {
        "Consent/consent-oud-optout",
        "Consent/consent-oud-emergency",
        "Consent/consent-mh-psych-only",
    }


async def test_post_search_equals_get_search(fhir_engine: Engine, http: aiohttp.ClientSession) -> None:
    query = "subject=Patient/pat-mh&category=vital-signs"
    by_get = await get_json(http, f"{fhir_engine.base_url}/Observation?{query}")
    async with http.post(
        f"{fhir_engine.base_url}/Observation/_search",
        data=query,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    ) as response:
        assert response.status == 200
        by_post = await response.json(content_type=None)
    assert ids(by_post) == ids(by_get) == ["Observation/obs-mh-bp"]
    assert link(by_post, "self") == link(by_get, "self")


async def test_conditional_create_returns_the_existing_match(fhir_engine: Engine, http: aiohttp.ClientSession) -> None:
    identifier = f"urn:uuid:{uuid4()}"
    patient = {
        "resourceType": "Patient",
        "identifier": [{"system": "urn:ietf:rfc:3986", "value": identifier}],
        "name": [{"family": "Okonkwo", "given": ["Ada"]}],
    }
    headers = {**FHIR_JSON, "If-None-Exist": f"identifier=urn:ietf:rfc:3986|{identifier}"}
    statuses, created_ids = [], []
    for _ in range(2):
        async with http.post(f"{fhir_engine.base_url}/Patient", json=patient, headers=headers) as response:
            statuses.append(response.status)
            created_ids.append((await response.json(content_type=None))["id"])
    assert statuses == [201, 200]
    assert created_ids[0] == created_ids[1]


async def test_history_lists_versions_newest_first_and_deletion(
    fhir_engine: Engine, http: aiohttp.ClientSession
) -> None:
    rid = f"hist-{uuid4().hex[:8]}"
    url = f"{fhir_engine.base_url}/Observation/{rid}"
    versions: list[str] = []
    for value in (120, 135):
        resource = {**glucose("Patient/pat-normal"), "id": rid}
        resource["valueQuantity"] = {**resource["valueQuantity"], "value": value}
        async with http.put(url, json=resource, headers=FHIR_JSON) as response:
            assert response.status == (201 if not versions else 200)
            versions.append((await response.json(content_type=None))["meta"]["versionId"])
    async with http.delete(url) as response:
        assert response.status == 200
    async with http.get(url) as response:
        assert response.status == 410

    history = await get_json(http, f"{url}/_history")
    assert history["type"] == "history"
    assert [e["request"]["method"] for e in history["entry"]] == ["DELETE", "PUT", "PUT"]
    assert [e["resource"]["meta"]["versionId"] for e in history["entry"][1:]] == versions[::-1]
    assert [e["response"]["status"] for e in history["entry"][1:]] == ["200", "201"]

    type_history = await get_json(http, f"{fhir_engine.base_url}/Observation/_history?_count=2")
    assert [e["fullUrl"] for e in type_history["entry"]] == [url, url]
    assert link(type_history, "next")


async def test_batch_answers_each_entry_on_its_own(fhir_engine: Engine, http: aiohttp.ClientSession) -> None:
    batch = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"request": {"method": "GET", "url": "Patient/pat-oud"}},
            {"request": {"method": "GET", "url": "Patient/no-such-patient"}},
            {"request": {"method": "GET", "url": "MedicationRequest?subject=Patient/pat-oud"}},
        ],
    }
    async with http.post(fhir_engine.base_url, json=batch, headers=FHIR_JSON) as response:
        assert response.status == 200
        result = await response.json(content_type=None)
    assert result["type"] == "batch-response"
    assert [e["response"]["status"] for e in result["entry"]] == ["200", "404", "200"]
    assert result["entry"][0]["fullUrl"] == f"{fhir_engine.base_url}/Patient/pat-oud"
    searchset = result["entry"][2]["resource"]
    assert searchset["entry"][0]["fullUrl"] == f"{fhir_engine.base_url}/MedicationRequest/medreq-oud-bup"


async def test_invalid_resource_is_refused_with_an_operation_outcome(
    fhir_engine: Engine, http: aiohttp.ClientSession
) -> None:
    consent = {
        "resourceType": "Consent",
        "status": "active",
        "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": "Patient/pat-normal"},
    }
    async with http.post(f"{fhir_engine.base_url}/Consent", json=consent, headers=FHIR_JSON) as response:
        assert response.status == 400
        outcome = await response.json(content_type=None)
    assert outcome["resourceType"] == "OperationOutcome"
    assert re.search(r"ppc-1", json.dumps(outcome))


async def test_everything_is_not_supported(fhir_engine: Engine, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{fhir_engine.base_url}/Patient/pat-normal/$everything") as response:
        assert response.status == 501
        outcome = await response.json(content_type=None)
    assert outcome["issue"][0]["code"] == "not-supported"


async def test_failed_transaction_changes_nothing(fhir_engine: Engine, http: aiohttp.ClientSession) -> None:
    new_id = f"tx-{uuid4().hex[:8]}"
    before = await get_json(http, f"{fhir_engine.base_url}/Patient/pat-normal")
    renamed = {**before, "name": [{"family": "Renamed"}]}
    invalid = {"resourceType": "Patient", "id": f"{new_id}-bad", "gender": "unknown-gender-code", "bogus": True}
    transaction = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"resource": {"resourceType": "Patient", "id": new_id}, "request": {"method": "PUT", "url": f"Patient/{new_id}"}},
            {"resource": renamed, "request": {"method": "PUT", "url": "Patient/pat-normal"}},
            {"resource": invalid, "request": {"method": "PUT", "url": f"Patient/{new_id}-bad"}},
        ],
    }
    async with http.post(fhir_engine.base_url, json=transaction, headers=FHIR_JSON) as response:
        assert response.status == 400
    async with http.get(f"{fhir_engine.base_url}/Patient/{new_id}") as response:
        assert response.status == 404
    assert await get_json(http, f"{fhir_engine.base_url}/Patient/pat-normal") == before


async def test_summary_count_returns_the_total_only(fhir_engine: Engine, http: aiohttp.ClientSession) -> None:
    bundle = await get_json(
        http, f"{fhir_engine.base_url}/Observation?patient=Patient/pat-mh&_summary=count&_count=50"
    )
    assert bundle["total"] == 5
    assert "entry" not in bundle
