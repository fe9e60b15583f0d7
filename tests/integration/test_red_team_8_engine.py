"""Red team 8 against the real FHIR engine.

1. Bob's summary (a Composition) and problem list (a List), stored on the engine, list his HIV
   and opioid-use records, which Dr GP may not see, and say them in their narratives. Read
   through fhirpy, alone or found by a search, they come without those narratives.
2. In 404 mode a search that lost Bob's hidden record answers exactly like one that found
   nothing, the decision header and the framing included.
3. A search for HIV conditions that includes their subjects: the engine answers Bob's Patient
   record (open to Dr GP on its own) beside his withheld HIV condition; it must not reach him.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests.sealed import opaque
from tests.conftest import GatewayUnderTest
from tests.hidden import hidden_in
from tests.integration.engine import Engine
from tests.integration.test_gateway_engine import GP
from tests.integration.test_side_doors_engine import fhir_client, seeded_gateway

pytestmark = pytest.mark.integration
BOB = "Patient/pat-bob"
NARRATIVE = ('<div xmlns="http://www.w3.org/1999/xhtml"><ul><li>CBC within range</li>'
             "<li>Human immunodeficiency virus [HIV] disease</li><li>Opioid dependence, uncomplicated</li></ul></div>")
SAID = ("Human immunodeficiency", "HIV", "Opioid")
LISTED = [{"reference": "Observation/bob-cbc"}, {"reference": "Condition/bob-hiv"}, {"reference": "Condition/bob-oud"}]
SUMMARY = {
    "resourceType": "Composition", "id": "bob-summary-rt8", "status": "final",
    "type": {"coding": [{"system": "http://loinc.org", "code": "60591-5", "display": "Patient summary Document"}]},
    "subject": {"reference": BOB}, "date": "2024-07-01T10:00:00Z", "author": [{"reference": "Practitioner/dr-gp"}],
    "title": "Patient Summary", "text": {"status": "generated", "div": NARRATIVE},
    "section": [{"title": "Active Problems", "text": {"status": "generated", "div": NARRATIVE}, "entry": LISTED}],
}
PROBLEMS = {
    "resourceType": "List", "id": "bob-problems-rt8", "status": "current", "mode": "working",
    "title": "Problem list", "subject": {"reference": BOB}, "text": {"status": "generated", "div": NARRATIVE},
    "entry": [{"item": ref} for ref in LISTED],
}


@pytest.fixture
async def gw(fhir_engine: Engine, make_gateway: Callable[..., Any]) -> GatewayUnderTest:
    return await seeded_gateway(fhir_engine, make_gateway, [SUMMARY, PROBLEMS])


async def test_a_summary_and_a_list_read_through_fhirpy_do_not_say_the_hidden_records(gw: GatewayUnderTest) -> None:
    fhir = fhir_client(gw, GP)
    for rtype, rid, title in (("Composition", SUMMARY["id"], "Patient Summary"), ("List", PROBLEMS["id"], "Problem list")):
        read = await fhir.reference(rtype, rid).to_resource()
        found = await fhir.resources(rtype).search(subject=BOB).fetch_all()
        for resource in (read, *found):
            text = repr(resource.serialize())
            assert resource["title"] == title
            assert hidden_in(text, SAID) == [], text[:400]
        assert rid in {r["id"] for r in found}


async def test_404_mode_a_search_that_lost_a_hidden_record_answers_like_one_that_found_nothing(
    fhir_engine: Engine, make_gateway: Callable[..., Any],
) -> None:
    gw: GatewayUnderTest = await make_gateway(fhir_engine.base_url, enforcement={"denied_read_status": 404})
    answers = []
    for rid in ("bob-hiv", "bob-nothing-rt8"):
        async with gw.session.get(f"{gw.url}/Condition?_id={rid}", headers=GP) as resp:
            answers.append((resp.status, dict(resp.headers), await resp.read()))
    (s1, h1, b1), (s2, h2, b2) = answers
    assert s1 == s2 == 200
    # A client compares sealed links by their length (tests.sealed.opaque).
    assert opaque(b1).replace(b"bob-hiv", b"bob-nothing-rt8") == opaque(b2), (b1[:300], b2[:300])
    varying = {"date", "x-request-id", "content-length"}
    assert {k.lower(): v for k, v in h1.items() if k.lower() not in varying} == \
        {k.lower(): v for k, v in h2.items() if k.lower() not in varying}
    assert h1["X-Consent-Decision"] == "permit"


async def test_the_patients_of_withheld_hiv_conditions_are_not_included(gw: GatewayUnderTest) -> None:
    fhir = fhir_client(gw, GP)
    bundle = await fhir.resources("Condition").search(code="http://hl7.org/fhir/sid/icd-10-cm|B20").include(
        "Condition", "subject").fetch_raw()
    found = [e["resource"] for e in bundle.get("entry") or () if e.get("search", {}).get("mode") != "outcome"]
    assert found == [], [f"{r['resourceType']}/{r['id']}" for r in found]
    # Bob's results with their subject: his open CBC brings him, his withheld HIV test goes.
    bundle = await fhir.resources("Observation").search(subject=BOB).include("Observation", "subject").fetch_raw()
    kept = {f"{e['resource']['resourceType']}/{e['resource'].get('id')}" for e in bundle.get("entry") or ()}
    assert {"Observation/bob-cbc", "Patient/pat-bob"} <= kept and "Observation/bob-hiv-test" not in kept, kept
