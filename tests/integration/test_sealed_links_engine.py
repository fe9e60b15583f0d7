"""Sealed paging links against the real FHIR engine: fhirpy follows the gateway's ``next`` links
as it follows any server's, across pages with hidden records between the visible ones.

The engine pages with ``_offset``; its ``next`` link after a page that lost matches counts them.
Through the gateway every paging link is ``<base>/?gateway-page=<token>``: fhirpy's
``fetch_all`` gets every condition Dr GP may see exactly once, and no page's links hold an
offset, in either ``denied_read_status``.
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
from tests.sealed import inner, is_sealed

pytestmark = pytest.mark.integration
VISIBLE = [("I10", "Essential (primary) hypertension"), ("E11.9", "Type 2 diabetes mellitus without complications"),
           ("J45.909", "Unspecified asthma, uncomplicated"), ("E78.5", "Hyperlipidemia, unspecified"),
           ("K21.9", "Gastro-esophageal reflux disease without esophagitis"), ("M54.50", "Low back pain, unspecified"),
           ("N39.0", "Urinary tract infection, site not specified")]
HIDDEN = [("B20", "Human immunodeficiency virus [HIV] disease"), ("F11.20", "Opioid dependence, uncomplicated"),
          ("Z21", "Asymptomatic human immunodeficiency virus [HIV] infection status")]
# Written in this order: v visible to Dr GP, h hidden from him (runs of hidden ones between pages).
ORDER = "vhhvvhvvvhhhvvhh"
SECRETS = ("B20", "F11.20", "Z21", "Human immunodeficiency", "Opioid")


@pytest.fixture
async def seeded(fhir_engine: Engine) -> tuple[str, list[str]]:
    """A new patient with her opt-in (which does not open HIV or opioid-use data) and her
    conditions on the engine; the ids Dr GP may see, in the order written."""
    patient = await opted_in_patient(fhir_engine, "pat-sealed", "Lindqvist", "Maja")
    shown, withheld = iter(VISIBLE * 3), iter(HIDDEN * 3)
    rows = [(kind, *(next(shown) if kind == "v" else next(withheld))) for kind in ORDER]
    visible = await engine_conditions(fhir_engine, patient, rows)
    return patient, visible


@pytest.mark.parametrize("count", [2, 3])
@pytest.mark.parametrize("status", [403, 404])
async def test_fhirpy_pages_through_sealed_links_getting_every_visible_condition_once(
    fhir_engine: Engine, make_gateway: Callable[..., Any], seeded: tuple[str, list[str]], status: int, count: int,
) -> None:
    patient, visible = seeded
    gw: GatewayUnderTest = await make_gateway(fhir_engine.base_url, enforcement={"denied_read_status": status})
    found = await fhir_client(gw, GP).resources("Condition").search(patient=patient).limit(count).fetch_all()
    ids = [r["id"] for r in found if r["resourceType"] == "Condition"]
    assert sorted(ids) == sorted(visible) and len(ids) == len(set(ids)), ids
    assert hidden_in(repr([r.serialize() for r in found]), SECRETS) == []
    # The same walk by hand: each page's links are sealed, and what they seal is the engine's
    # own paging (its offset, which the client never reads).
    url: str | None = f"{gw.url}/Condition?patient={patient}&_count={count}"
    pages = 0
    offsets = []
    while url:
        assert pages < 20
        async with gw.session.get(url, headers=GP) as resp:
            assert resp.status == 200
            raw = await resp.read()
        pages += 1
        bundle = orjson.loads(raw)
        links = {lk["relation"]: lk["url"] for lk in bundle.get("link") or ()}
        assert links["self"] == url
        assert all(is_sealed(u) for rel, u in links.items() if rel != "self"), links
        assert b"_offset" not in raw and hidden_in(raw.decode(), SECRETS) == []
        url = links.get("next")
        if url is not None:
            offsets.append(inner(gw, url))
    assert pages >= 3
    assert all("_offset=" in o for o in offsets), offsets
