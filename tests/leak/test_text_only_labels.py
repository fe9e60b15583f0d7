"""Sensitive facts carried only as text: a general permit that leaves the sensitive labels closed
must not release them through any door.

Hospitals often code with local code systems that carry only a display, or with no code at all:
a Flag ``{"text": "HIV-1 positive"}``, a Condition ``urn:oid:1.2.3.4.local|L123`` "Opioid use
disorder, moderate", a local lab code "HIV-1 RNA viral load", a medication named in words.
Before the term lists (rules/terms-*.yaml) such records earned no label and a general permit
showed them. Each test searches the raw response bytes and headers for their ids and texts, and
checks that the ordinary record beside them still shows (so no test passes by showing nothing).
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import GatewayUnderTest
from tests.fakes import FakeFhir
from tests.fixtures import clinical as c
from tests.leak.test_side_doors import batch, call, ids_in, leaks, routes, slots

LOCAL = "urn:oid:1.2.3.4.local"
ANA_ID = c.PAT_ANA.split("/", 1)[1]
SUBJECT = {"reference": c.PAT_ANA}

FLAG_HIV = {"resourceType": "Flag", "id": "flag-txt-hiv-31", "status": "active", "subject": SUBJECT,
            "code": {"text": "HIV-1 positive"}}
CONDITION_OUD = {"resourceType": "Condition", "id": "cond-txt-oud-32", "subject": SUBJECT,
                 "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                                                "code": "active"}]},
                 "code": {"coding": [{"system": LOCAL, "code": "L123", "display": "Opioid use disorder, moderate"}]}}
VIRAL_LOAD = {"resourceType": "Observation", "id": "obs-txt-vl-33", "status": "final", "subject": SUBJECT,
              "code": {"coding": [{"system": LOCAL, "code": "LAB-VL1"}], "text": "HIV-1 RNA viral load"},
              "valueQuantity": {"value": 5400, "unit": "copies/mL"}}
BUPRENORPHINE = {"resourceType": "MedicationRequest", "id": "medrx-txt-bup-34", "status": "active",
                 "intent": "order", "subject": SUBJECT,
                 "medicationCodeableConcept": {"text": "Buprenorphine-naloxone 8 mg/2 mg film"}}
TEXT_ONLY = (FLAG_HIV, CONDITION_OUD, VIRAL_LOAD, BUPRENORPHINE)
SECRETS = (
    *(r["id"] for r in TEXT_ONLY), "HIV-1 positive", "Opioid use disorder", "L123", "HIV-1 RNA", "LAB-VL1",
    "Buprenorphine", "5400",
)
ORDINARY = c.ANA_HYPERTENSION["id"]


@pytest.fixture
def world(fake_fhir: FakeFhir) -> FakeFhir:
    """Ana's records and the text-only ones; her general opt-in leaves sensitive labels closed."""
    c.seed_all(fake_fhir)
    fake_fhir.add(*TEXT_ONLY, c.opt_in(c.PAT_ANA), c.opt_in(c.PAT_BEN, "consent-ben-in"))
    return fake_fhir


@pytest.mark.parametrize("rtype", ["Flag", "Condition", "Observation", "MedicationRequest"])
async def test_search_withholds_text_only_records(world: FakeFhir, gateway: GatewayUnderTest, rtype: str) -> None:
    status, headers, body = await call(gateway, "GET", f"/{rtype}?patient={ANA_ID}")
    assert status == 200, body
    assert leaks(body, headers, SECRETS) == []
    if rtype == "Condition":
        assert ORDINARY in ids_in(body)


@pytest.mark.parametrize("resource", TEXT_ONLY, ids=[r["resourceType"] for r in TEXT_ONLY])
async def test_read_withholds_text_only_record(world: FakeFhir, gateway: GatewayUnderTest,
                                               resource: dict[str, Any]) -> None:
    status, headers, body = await call(gateway, "GET", f"/{resource['resourceType']}/{resource['id']}")
    assert status in (403, 404), body
    assert leaks(body, headers, SECRETS) == []


async def test_include_withholds_text_only_records(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    def answer(request: Any) -> Any:
        return c.bundle([c.ANA_HYPERTENSION, CONDITION_OUD], world.base_url,
                        include=(FLAG_HIV, VIRAL_LOAD, BUPRENORPHINE, c.ANA))

    world.override = routes({("GET", "/Condition"): answer})
    status, headers, body = await call(gateway, "GET", f"/Condition?patient={ANA_ID}&_include=*&_revinclude=*")
    assert status == 200, body
    assert leaks(body, headers, SECRETS) == []
    assert ORDINARY in ids_in(body)


async def test_batch_withholds_text_only_records(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    reads = [("GET", f"{r['resourceType']}/{r['id']}") for r in TEXT_ONLY]
    searches = [("GET", f"{r['resourceType']}?patient={ANA_ID}") for r in TEXT_ONLY]
    status, headers, body = await call(
        gateway, "POST", "/", body=batch(*reads, *searches, ("GET", f"Condition/{ORDINARY}")))
    assert status == 200, body
    assert leaks(body, headers, SECRETS) == []
    answered = slots(body)
    assert [s["response"]["status"][:3] for s in answered[:len(reads)]] in (["403"] * len(reads), ["404"] * len(reads))
    assert answered[-1]["resource"]["id"] == ORDINARY


async def test_consent_opening_the_labels_shows_them(fake_fhir: FakeFhir, gateway: GatewayUnderTest) -> None:
    """The same records, with Ana's consent opening HIV and opioid use data: all of them show."""
    c.seed_all(fake_fhir)
    fake_fhir.add(*TEXT_ONLY, c.opt_in(c.PAT_ANA, labels=("HIV", "OPIOIDUD", "42CFRPart2")))
    for resource in TEXT_ONLY:
        status, _, body = await call(gateway, "GET", f"/{resource['resourceType']}/{resource['id']}")
        assert status == 200, body
