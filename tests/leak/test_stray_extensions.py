"""Codes in extensions on elements off the code paths (a note, a body site, a dosage), through
every door, on both paths (whole answers and views: ``tests/leak/conftest.py``).

Ana's general opt-in does not open 42 CFR Part 2 data. Her pneumonia's note carries, in an
extension, the admission diagnosis F11.20 (opioid dependence); her procedure's body site
carries B20 (HIV disease) in an extension. Each test searches the RAW response bytes and
headers for the hidden ids, codes and display texts.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.fakes import FakeFhir
from tests.fixtures import clinical as c
from tests.leak.test_red_team_2 import ODD_PLACES
from tests.leak.test_side_doors import MakeGateway, batch, call, ids_in, leaks, routes, slots

ANA_ID = c.PAT_ANA.split("/", 1)[1]
NOTE, SITE = ODD_PLACES["note-extension"], ODD_PLACES["body-site-extension"]
RECORDS = [NOTE[0], SITE[0]]
SECRETS = (*NOTE[1], *SITE[1], NOTE[0]["id"], SITE[0]["id"])
# Ordinary records of Ana's, many, as a large answer holds them: the one extension among them
# is found on the views path too.
LABS = [{**c.ANA_CBC, "id": f"obs-cbc-ana-{n:03d}"} for n in range(60)]


@pytest.fixture
def world(fake_fhir: FakeFhir) -> FakeFhir:
    c.seed_all(fake_fhir)
    fake_fhir.add(c.opt_in(c.PAT_ANA), *RECORDS, *LABS)
    return fake_fhir


def kept(body: bytes) -> set[str]:
    return {i for i in ids_in(body) if i != "suppressed"}


@pytest.mark.parametrize("record", RECORDS, ids=["note", "body-site"])
async def test_an_extension_off_the_code_paths_closes_the_record_at_every_door(
    world: FakeFhir, make_gateway: MakeGateway, record: dict[str, Any],
) -> None:
    gateway = await make_gateway(world.base_url)
    rtype, rid = record["resourceType"], record["id"]
    status, headers, body = await call(gateway, "GET", f"/{rtype}/{rid}")
    assert status == 403, body
    assert leaks(body, headers, SECRETS) == []
    world.override = routes({("GET", f"/{rtype}"): lambda r: c.bundle([*LABS[:30], record, *LABS[30:]], world.base_url)})
    status, headers, body = await call(gateway, "GET", f"/{rtype}?patient={c.PAT_ANA}")
    assert status == 200, body
    assert kept(body) == {lab["id"] for lab in LABS} and leaks(body, headers, SECRETS) == []
    world.override = routes({("GET", f"/{rtype}"): lambda r: c.bundle([record, c.ANA_CBC], world.base_url, include=(c.ANA,))})
    status, headers, body = await call(gateway, "GET", f"/{rtype}?patient={c.PAT_ANA}&_include={rtype}:subject")
    assert status == 200, body
    assert c.ANA_CBC["id"] in kept(body) and leaks(body, headers, SECRETS) == []
    world.override = None
    status, headers, body = await call(gateway, "POST", "/", body=batch(("GET", f"{rtype}/{rid}"), ("GET", f"Observation/{c.ANA_CBC['id']}")))
    assert status == 200, body
    got = slots(body)
    assert got[0]["response"]["status"].startswith("403") and got[1]["resource"]["id"] == c.ANA_CBC["id"]
    assert leaks(body, headers, SECRETS) == []
    world.override = routes({("GET", f"/Patient/{ANA_ID}/$everything"): lambda r: c.bundle([c.ANA, *LABS, record], world.base_url)})
    status, headers, body = await call(gateway, "GET", f"/Patient/{ANA_ID}/$everything")
    assert status == 200, body
    assert c.ANA_CBC["id"] not in kept(body) and LABS[0]["id"] in kept(body)
    assert leaks(body, headers, SECRETS) == []


async def test_an_answer_without_extensions_is_not_walked(world: FakeFhir, make_gateway: MakeGateway, monkeypatch: pytest.MonkeyPatch) -> None:
    """The walk off the field plans runs only for answers whose text holds an extension, and
    within them only for resources whose text does."""
    from gateway.core.labels import LabelIndex
    walked: list[str] = []
    original = LabelIndex.stray_labels

    def counting(self: LabelIndex, resource: dict[str, Any]) -> Any:
        walked.append(str(resource.get("id")))
        return original(self, resource)

    monkeypatch.setattr(LabelIndex, "stray_labels", counting)
    gateway = await make_gateway(world.base_url)
    world.override = routes({("GET", "/Observation"): lambda r: c.bundle(LABS, world.base_url)})
    status, _, body = await call(gateway, "GET", f"/Observation?patient={c.PAT_ANA}")
    assert status == 200, body
    assert walked == []
    world.override = routes({("GET", "/Observation"): lambda r: c.bundle([*LABS, NOTE[0]], world.base_url)})
    status, _, body = await call(gateway, "GET", f"/Observation?patient={c.PAT_ANA}")
    assert status == 200, body
    assert walked == [NOTE[0]["id"]]
