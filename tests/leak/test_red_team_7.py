"""Red team 7: the doors around PractitionerRole authors and ingredients named by reference.

1. A batch may ask for an old version of a PractitionerRole or a Medication (a vread, or an
   instance history) beside the record that names it. The old version is in the answer, but it
   is not what the record's reference names now: a role that once was another doctor's, a
   compound that once held no methadone, must not decide the record.
2. A compound whose ingredient is itself a compound naming methadone by reference (two hops):
   the second hop is not followed, so what it names is unknown and the order closes.

Each test searches the RAW response bytes and headers for the hidden ids, codes and texts.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from aiohttp import web

from tests.fakes import FakeFhir
from tests.fixtures import clinical as c
from tests.leak.test_role_authors_and_ingredients import (
    BY_GOMEZ, BY_KOWALSKI, COMPOUND, COMPOUND_ORDER, MED_SECRETS, METHADONE, ORDINARY_ORDER, ROLE_KOWALSKI, order, pharmacy,
    world,
)
from tests.leak.test_side_doors import MakeGateway, batch, call, fhir, ids_in, leaks, routes, slots

__all__ = ["pharmacy", "world"]  # fixtures

ROLE_PATH = f"PractitionerRole/{ROLE_KOWALSKI['id']}"
# The same role a year ago, when Dr Gomez (whom Ana's consent does not exclude) held it.
OLD_ROLE = {**ROLE_KOWALSKI, "practitioner": {"reference": c.DOCTOR}, "meta": {"versionId": "1"}}
NEW_ROLE = {**ROLE_KOWALSKI, "meta": {"versionId": "2"}}
MED_PATH = f"Medication/{COMPOUND['id']}"
# The compound before its methadone ingredient was entered.
OLD_COMPOUND = {k: v for k, v in COMPOUND.items() if k != "ingredient"} | {"meta": {"versionId": "1"}}


def history(*versions: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "history", "total": len(versions), "entry": [
        {"fullUrl": f"http://upstream/fhir/{v['resourceType']}/{v['id']}", "resource": v,
         "request": {"method": "PUT", "url": f"{v['resourceType']}/{v['id']}"}} for v in versions]}


@pytest.mark.parametrize("asked", ["vread", "history"])
async def test_an_old_version_of_a_role_in_a_batch_does_not_decide_the_record(
    world: FakeFhir, make_gateway: MakeGateway, asked: str,
) -> None:
    world.override = routes({
        ("GET", f"/{ROLE_PATH}/_history/1"): lambda r: OLD_ROLE,
        ("GET", f"/{ROLE_PATH}/_history"): lambda r: history(NEW_ROLE, OLD_ROLE),
    })
    gateway = await make_gateway(world.base_url)
    url = f"{ROLE_PATH}/_history/1" if asked == "vread" else f"{ROLE_PATH}/_history"
    status, headers, body = await call(gateway, "POST", "/", body=batch(
        ("GET", url), ("GET", f"Condition/{BY_KOWALSKI['id']}")))
    assert status == 200, body
    got = slots(body)
    assert got[1]["response"]["status"].startswith("403") and "resource" not in got[1], got[1]
    # The role itself is no secret (it was asked for); what the excluded doctor wrote is.
    assert leaks(body, headers, (BY_KOWALSKI["id"], "Hemiplegic")) == []


@pytest.mark.parametrize("asked", ["vread", "history"])
async def test_an_old_version_of_a_medication_in_a_batch_does_not_label_the_order(
    pharmacy: FakeFhir, make_gateway: MakeGateway, asked: str,
) -> None:
    current = {**COMPOUND, "meta": {"versionId": "2"}}
    pharmacy.override = routes({
        ("GET", f"/{MED_PATH}/_history/1"): lambda r: OLD_COMPOUND,
        ("GET", f"/{MED_PATH}/_history"): lambda r: history(current, OLD_COMPOUND),
    })
    gateway = await make_gateway(pharmacy.base_url)
    url = f"{MED_PATH}/_history/1" if asked == "vread" else f"{MED_PATH}/_history"
    status, headers, body = await call(gateway, "POST", "/", body=batch(
        ("GET", url), ("GET", f"MedicationRequest/{COMPOUND_ORDER['id']}")))
    assert status == 200, body
    got = slots(body)
    assert got[1]["response"]["status"].startswith("403") and "resource" not in got[1], got[1]
    assert leaks(body, headers, (COMPOUND_ORDER["id"],)) == []  # the compound itself was asked for


async def test_an_ingredient_two_hops_away_closes_the_order(pharmacy: FakeFhir, make_gateway: MakeGateway) -> None:
    """A kit whose component is a compound whose ingredient is methadone: the hop is bounded,
    so what lies beyond it is unknown, and the order closes (never released as ordinary)."""
    component = {
        "resourceType": "Medication", "id": "med-kit-part-4e1",
        "code": {"coding": [{"system": "urn:oid:2.16.840.1.113883.3.9999.1", "code": "KIT-PART-2"}]},
        "ingredient": [{"itemReference": {"reference": f"Medication/{METHADONE['id']}"}}],
    }
    kit = {**COMPOUND, "id": "med-kit-3b9", "ingredient": [{"itemReference": {"reference": f"Medication/{component['id']}"}}]}
    record = order("medrx-kit-mth-6c1", f"Medication/{kit['id']}")
    pharmacy.add(component, kit, record)
    gateway = await make_gateway(pharmacy.base_url)
    status, headers, body = await call(gateway, "GET", f"/MedicationRequest/{record['id']}")
    assert status == 403, body
    assert leaks(body, headers, (*MED_SECRETS, record["id"])) == []
    status, headers, body = await call(gateway, "GET", f"/MedicationRequest?patient={c.PAT_ANA}")
    assert status == 200, body
    assert leaks(body, headers, (*MED_SECRETS, record["id"])) == []


@pytest.mark.parametrize("gone", [404, 410])
async def test_a_deleted_role_does_not_reopen_what_the_excluded_doctor_wrote(
    world: FakeFhir, make_gateway: MakeGateway, gone: int,
) -> None:
    """Dr Kowalski left the clinic and his role was deleted: whoever wrote through it is unknown
    (it matches the deny, CONTRACT §5), not no one."""
    world.override = routes({("GET", f"/{ROLE_PATH}"): lambda r: fhir(
        {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "deleted"}]}, gone)})
    gateway = await make_gateway(world.base_url)
    status, headers, body = await call(gateway, "GET", f"/Condition/{BY_KOWALSKI['id']}")
    assert status == 403, body
    status, headers, body = await call(gateway, "GET", f"/Condition?patient={c.PAT_ANA}")
    assert status == 200, body
    assert BY_GOMEZ["id"] in ids_in(body)  # the other doctor's record stays open
    assert leaks(body, headers, (BY_KOWALSKI["id"], "Hemiplegic")) == []


@pytest.mark.parametrize("practitioner", [
    {"identifier": {"system": "http://hl7.org/fhir/sid/us-npi", "value": "1234567893"}},
    {"reference": "Practitioner?identifier=http://hl7.org/fhir/sid/us-npi|1234567893"},
], ids=["identifier-only", "conditional"])
async def test_a_role_whose_practitioner_cannot_be_followed_is_an_unknown_author(
    world: FakeFhir, make_gateway: MakeGateway, practitioner: dict[str, Any],
) -> None:
    world.override = routes({("GET", f"/{ROLE_PATH}"): lambda r: {**ROLE_KOWALSKI, "practitioner": practitioner}})
    gateway = await make_gateway(world.base_url)
    status, headers, body = await call(gateway, "GET", f"/Condition/{BY_KOWALSKI['id']}")
    assert status == 403, body
    assert leaks(body, headers, (BY_KOWALSKI["id"], "Hemiplegic")) == []


@pytest.mark.parametrize("gone", ["the-medication", "its-ingredient", "another-server"])
async def test_a_drug_the_server_does_not_hold_closes_the_order(
    pharmacy: FakeFhir, make_gateway: MakeGateway, gone: str,
) -> None:
    """Missing data never opens data (CONTRACT §5): an order whose drug (or the drug's
    ingredient) the server does not hold, deleted or named by another server's URL, names a drug
    that may be methadone. It closes; the ordinary order beside it stays open."""
    if gone == "the-medication":
        pharmacy.resources.pop(f"Medication/{COMPOUND['id']}")
        record = COMPOUND_ORDER
    elif gone == "its-ingredient":
        pharmacy.resources.pop(f"Medication/{METHADONE['id']}")
        record = COMPOUND_ORDER
    else:
        record = order("medrx-other-ehr-5e2", f"https://ehr.other.example/fhir/Medication/{COMPOUND['id']}-x")
        pharmacy.add(record)
    gateway = await make_gateway(pharmacy.base_url)
    status, headers, body = await call(gateway, "GET", f"/MedicationRequest/{record['id']}")
    assert status == 403, body
    status, headers, body = await call(gateway, "GET", f"/MedicationRequest?patient={c.PAT_ANA}")
    assert status == 200, body
    assert ORDINARY_ORDER["id"] in ids_in(body) and record["id"] not in body.decode()


def _twice(first: dict[str, Any], key: str, second: Any) -> web.Response:
    """``first`` as JSON text with ``key`` given again after it (``second``)."""
    text = orjson.dumps(first)[:-1] + b',"' + key.encode() + b'":' + orjson.dumps(second) + b"}"
    return web.Response(body=text, content_type="application/fhir+json")


async def test_a_role_read_with_a_key_given_twice_is_an_unknown_author(world: FakeFhir, make_gateway: MakeGateway) -> None:
    """Read one way it is Dr Kowalski's role, the other way Dr Gomez's: who wrote through it is
    unknown (a body with no single reading is never guessed at), so it matches the deny."""
    world.override = routes({("GET", f"/{ROLE_PATH}"): lambda r: _twice(
        ROLE_KOWALSKI, "practitioner", {"reference": c.DOCTOR})})
    gateway = await make_gateway(world.base_url)
    status, headers, body = await call(gateway, "GET", f"/Condition/{BY_KOWALSKI['id']}")
    assert status == 403, body
    assert leaks(body, headers, (BY_KOWALSKI["id"], "Hemiplegic")) == []


async def test_an_ingredient_read_with_a_key_given_twice_closes_the_order(
    pharmacy: FakeFhir, make_gateway: MakeGateway,
) -> None:
    pharmacy.override = routes({("GET", f"/{MED_PATH}"): lambda r: _twice(
        COMPOUND, "ingredient", [{"itemCodeableConcept": c.concept(c.RXNORM, "314076", "lisinopril 10 MG Oral Tablet")}])})
    gateway = await make_gateway(pharmacy.base_url)
    status, headers, body = await call(gateway, "GET", f"/MedicationRequest/{COMPOUND_ORDER['id']}")
    assert status == 403, body
    assert leaks(body, headers, MED_SECRETS) == []


@pytest.mark.parametrize("how", ["read", "batch"])
async def test_a_role_copied_into_a_stored_search_bundle_does_not_decide_the_record(
    world: FakeFhir, make_gateway: MakeGateway, how: str,
) -> None:
    """A search's answer saved on the server as a Bundle resource (type searchset, but a stored,
    versioned resource) holds copies as they were when it was saved: the role in it was Dr
    Gomez's then; the record it holds is decided by the role as it is now."""
    stored = {"resourceType": "Bundle", "id": "saved-search-1f3", "meta": {"versionId": "1"}, "type": "searchset",
              "entry": [{"resource": OLD_ROLE, "search": {"mode": "include"}},
                        {"resource": BY_KOWALSKI, "search": {"mode": "match"}}]}
    world.add(stored)
    gateway = await make_gateway(world.base_url)
    if how == "read":
        status, headers, body = await call(gateway, "GET", f"/Bundle/{stored['id']}")
    else:
        status, headers, body = await call(gateway, "POST", "/", body=batch(("GET", f"Bundle/{stored['id']}")))
    assert status in (200, 403), body
    assert leaks(body, headers, (BY_KOWALSKI["id"], "Hemiplegic")) == []
