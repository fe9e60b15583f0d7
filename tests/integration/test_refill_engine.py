"""404 mode against the real FHIR engine: search pages that lost matches are refilled.

A patient of this module holds a general opt-in, which does not open her HIV and opioid-use
conditions to Dr GP; her ordinary conditions sit between them on the engine's pages. Walked
through fhirpy with ``_count``, every page but the last is full, the pages together hold
every condition Dr GP may see exactly once, and a search whose every match is hidden answers
like one that found nothing (no ``next`` link).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
import pytest

from tests.conftest import GatewayUnderTest
from tests.hidden import hidden_in
from tests.integration.engine import Engine
from tests.integration.test_gateway_engine import GP
from tests.integration.test_side_doors_engine import engine_conditions, fhir_client, opted_in_patient

pytestmark = pytest.mark.integration
ICD10 = "http://hl7.org/fhir/sid/icd-10-cm"
# In the order written to the engine: v visible to Dr GP, h hidden from him.
CONDITIONS = [
    ("v", "I10", "Essential (primary) hypertension"),
    ("h", "B20", "Human immunodeficiency virus [HIV] disease"),
    ("h", "F11.20", "Opioid dependence, uncomplicated"),
    ("v", "E11.9", "Type 2 diabetes mellitus without complications"),
    ("v", "J45.909", "Unspecified asthma, uncomplicated"),
    ("h", "Z21", "Asymptomatic human immunodeficiency virus [HIV] infection status"),
    ("v", "E78.5", "Hyperlipidemia, unspecified"),
    ("v", "K21.9", "Gastro-esophageal reflux disease without esophagitis"),
    ("v", "M54.50", "Low back pain, unspecified"),
]
HIDDEN = ("B20", "F11.20", "Z21", "Human immunodeficiency", "Opioid")


@pytest.fixture
async def seeded(fhir_engine: Engine, make_gateway: Callable[..., Any]) -> tuple[GatewayUnderTest, str, list[str]]:
    """A new patient with her opt-in and conditions on the engine, and a gateway in 404 mode."""
    patient = await opted_in_patient(fhir_engine, "pat-refill", "Moreau", "Ines")
    visible = await engine_conditions(fhir_engine, patient, CONDITIONS)
    gw: GatewayUnderTest = await make_gateway(fhir_engine.base_url, enforcement={"denied_read_status": 404})
    return gw, patient, visible


@pytest.mark.parametrize("count", [1, 2, 4])
async def test_pages_walked_through_fhirpy_hold_every_visible_condition_once(
    seeded: tuple[GatewayUnderTest, str, list[str]], count: int,
) -> None:
    gw, patient, visible = seeded
    found = await fhir_client(gw, GP).resources("Condition").search(patient=patient).limit(count).fetch_all()
    ids = [r["id"] for r in found]
    assert sorted(ids) == sorted(visible), ids
    assert hidden_in(repr([r.serialize() for r in found]), HIDDEN) == []
    # The same walk by hand: every page but the last is full; none has a previous link.
    url: str | None = f"{gw.url}/Condition?patient={patient}&_count={count}"
    sizes = []
    while url:
        assert url.startswith(gw.url) and len(sizes) < 20
        async with gw.session.get(url, headers=GP) as resp:
            assert resp.status == 200
            assert resp.headers["X-Consent-Decision"] == "permit"
            bundle = orjson.loads(await resp.read())
        sizes.append(len(bundle.get("entry") or ()))
        assert not [lk for lk in bundle.get("link") or () if lk["relation"] in ("previous", "prev", "last")]
        url = next((lk["url"] for lk in bundle.get("link") or () if lk["relation"] == "next"), None)
    assert all(size == count for size in sizes[:-1]) and 1 <= sizes[-1] <= count, sizes
    assert sum(sizes) == len(visible)


async def test_a_search_whose_every_match_is_hidden_answers_like_one_that_found_nothing(
    seeded: tuple[GatewayUnderTest, str, list[str]],
) -> None:
    gw, patient, _ = seeded
    fhir = fhir_client(gw, GP)
    hidden = await fhir.resources("Condition").search(patient=patient, code=f"{ICD10}|B20,{ICD10}|Z21").limit(1).fetch_raw()
    nothing = await fhir.resources("Condition").search(patient=patient, code=f"{ICD10}|A00,{ICD10}|A01").limit(1).fetch_raw()
    for bundle in (hidden, nothing):
        assert not bundle.get("entry")
        assert [lk["relation"] for lk in bundle["link"]] == ["self", "first"], bundle["link"]
        assert "total" not in bundle
