"""Absolute references to ANOTHER FHIR server, through every door.

Another server's ``Medication/m1`` or ``Patient/p1`` is not this server's resource of the same
``Type/id``. Each record here names something on ``OTHER`` (a health information exchange's
server) whose id this server also uses for something harmless: our ``Medication`` of that id
is lisinopril, our ``PractitionerRole`` of that id is Dr Gomez's, our ``Patient`` of that id is
Ana (who opted in), our ``Observation`` of that id is her ordinary CBC. Deciding by ours would
release the record; what the other server's one is, the gateway does not know, so the record
closes (CONTRACT §5: missing data never opens data). The same references under this server's
own bases (the configured upstream and public base) decide as relative ones do.

Each test searches the RAW response bytes and headers for the hidden ids and texts.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

import pytest

from tests.conftest import GatewayUnderTest
from tests.fakes import FakeFhir
from tests.fixtures import clinical as c
from tests.leak.test_role_authors_and_ingredients import (
    LISINOPRIL, NOT_KOWALSKI, ROLE_GOMEZ, ROLE_KOWALSKI, kept, migraine, order,
)
from tests.leak.test_side_doors import MakeGateway, batch, call, leaks, routes, slots

ANA_ID = c.PAT_ANA.split("/", 1)[1]
OTHER = "https://hie.elsewhere.example/fhir"
PUBLIC = "https://gateway.hospital.example/fhir"

# An order whose drug lives on the other server (there: methadone), under our lisinopril's id.
FOREIGN_DRUG = order("medrx-foreign-drug-4c1", f"{OTHER}/Medication/{LISINOPRIL['id']}",
                     note=[{"text": "Maintenance dose per opioid treatment program"}])
# A compound on this server whose ingredient lives on the other server, under our lisinopril's id.
FOREIGN_INGREDIENT_MED = {
    "resourceType": "Medication", "id": "med-compound-frn-8d2",
    "code": {"coding": [{"system": "urn:oid:2.16.840.1.113883.3.9999.1", "code": "CMP-0091"}], "text": "Compounded solution"},
    "ingredient": [{"itemReference": {"reference": f"{OTHER}/Medication/{LISINOPRIL['id']}"}}],
}
FOREIGN_INGREDIENT = order("medrx-foreign-ingr-6e0", f"Medication/{FOREIGN_INGREDIENT_MED['id']}",
                           note=[{"text": "Maintenance dose per opioid treatment program"}])
# A record written through the other server's role of our Dr Gomez's role id (there: Dr Kowalski).
FOREIGN_ROLE = migraine("cond-migraine-frn-2a9", f"{OTHER}/PractitionerRole/{ROLE_GOMEZ['id']}",
                        note=[{"text": "Hemiplegic aura reviewed at the exchange"}])
# A record of the other server's patient of Ana's id (another person).
FOREIGN_PATIENT = {
    "resourceType": "Condition", "id": "cond-foreign-pt-7b3", "subject": {"reference": f"{OTHER}/Patient/{ANA_ID}"},
    "code": c.concept(c.SNOMED, "59621000", "Essential hypertension"), "onsetDateTime": "2020-02-11",
    "note": [{"text": "Transferred from the exchange; another person's chart"}],
}
# A Binary standing for the other server's Observation of our Ana's ordinary CBC's id.
FOREIGN_CONTEXT = {
    "resourceType": "Binary", "id": "bin-foreign-ctx-5f8", "contentType": "text/plain",
    "securityContext": {"reference": f"{OTHER}/Observation/{c.ANA_CBC['id']}"},
    "data": base64.b64encode(b"Toxicology screen: positive for opioids").decode(),
}

SECRETS = {
    "medication": (FOREIGN_DRUG["id"], "opioid treatment"),
    "ingredient": (FOREIGN_INGREDIENT["id"], "opioid treatment"),
    "role": (FOREIGN_ROLE["id"], "Hemiplegic"),
    "patient": (FOREIGN_PATIENT["id"], "another person"),
    "context": (FOREIGN_CONTEXT["id"], FOREIGN_CONTEXT["data"]),
}
RECORDS = {"medication": FOREIGN_DRUG, "ingredient": FOREIGN_INGREDIENT, "role": FOREIGN_ROLE,
           "patient": FOREIGN_PATIENT, "context": FOREIGN_CONTEXT}
# What an answer holds beside the record, that stays open (and, for _include, what brings our
# resource of the same id into the answer).
CONTROL = {"medication": c.ANA_CBC, "ingredient": c.ANA_CBC, "role": c.ANA_CBC, "patient": c.ANA_CBC,
           "context": c.ANA_CBC}
INCLUDED = {"medication": (LISINOPRIL,), "ingredient": (FOREIGN_INGREDIENT_MED, LISINOPRIL), "role": (ROLE_GOMEZ,),
            "patient": (c.ANA,), "context": (c.ANA_CBC,)}


@pytest.fixture
def world(fake_fhir: FakeFhir) -> FakeFhir:
    c.seed_all(fake_fhir)
    fake_fhir.add(NOT_KOWALSKI, ROLE_KOWALSKI, ROLE_GOMEZ, LISINOPRIL, FOREIGN_INGREDIENT_MED,
                  *RECORDS.values())
    return fake_fhir


def path_of(record: dict[str, Any]) -> str:
    return f"{record['resourceType']}/{record['id']}"


def searchset(world: FakeFhir, resources: list[dict[str, Any]], include: tuple[dict[str, Any], ...] = ()) -> Callable[..., Any]:
    return lambda r: c.bundle(resources, world.base_url, include=include)


@pytest.mark.parametrize("kind", list(RECORDS))
async def test_another_servers_target_closes_the_record_at_every_door(
    world: FakeFhir, make_gateway: MakeGateway, kind: str,
) -> None:
    record, secrets, control = RECORDS[kind], SECRETS[kind], CONTROL[kind]
    gateway = await make_gateway(world.base_url)
    # read
    status, headers, body = await call(gateway, "GET", f"/{path_of(record)}")
    assert status == 403, body
    assert leaks(body, headers, secrets) == []
    # search (and the record beside an open one)
    rtype = record["resourceType"]
    world.override = routes({("GET", f"/{rtype}"): searchset(world, [record, control])})
    path = f"/{rtype}?_id={record['id']},{control['id']}"
    # What the client wrote itself (the ids it searched by) comes back in the search's self link.
    unasked = tuple(s for s in secrets if s not in path)
    status, headers, body = await call(gateway, "GET", path)
    assert status == 200, body
    assert kept(body) == {control["id"]} and leaks(body, headers, unasked) == []
    # _include: our resource of the same id in the answer decides nothing for the other server's
    world.override = routes({("GET", f"/{rtype}"): searchset(world, [record, control], INCLUDED[kind])})
    status, headers, body = await call(gateway, "GET", f"{path}&_include=*")
    assert status == 200, body
    assert control["id"] in kept(body) and leaks(body, headers, unasked) == []
    world.override = None
    # a batch entry is a request of its own
    status, headers, body = await call(gateway, "POST", "/", body=batch(
        ("GET", path_of(record)), ("GET", path_of(control))))
    assert status == 200, body
    got = slots(body)
    assert got[0]["response"]["status"].startswith("403") and "resource" not in got[0]
    assert got[1]["resource"]["id"] == control["id"]
    assert leaks(body, headers, secrets) == []
    # $everything
    world.override = routes({("GET", f"/Patient/{ANA_ID}/$everything"): searchset(world, [c.ANA, record, control])})
    status, headers, body = await call(gateway, "GET", f"/Patient/{ANA_ID}/$everything")
    assert status == 200, body
    assert control["id"] in kept(body) and leaks(body, headers, secrets) == []


async def test_another_servers_patient_is_not_the_patient_of_the_same_id(
    world: FakeFhir, make_gateway: MakeGateway,
) -> None:
    """Ana sees her own record always (self access), never the other server's patient's of
    her id; and a record naming her and the other server's patient needs both, so it closes."""
    gateway = await make_gateway(world.base_url)
    status, headers, body = await call(gateway, "GET", f"/{path_of(FOREIGN_PATIENT)}", actor=c.PAT_ANA)
    assert status == 403, body
    assert leaks(body, headers, SECRETS["patient"]) == []
    status, _, body = await call(gateway, "GET", f"/{path_of(c.ANA_CBC)}", actor=c.PAT_ANA)
    assert status == 200, body
    both = {**c.ANA_CBC, "id": "obs-cbc-both-3e3", "note": [{"text": "another person's sample"}],
            "performer": [{"reference": f"{OTHER}/Patient/{ANA_ID}"}]}
    world.add(both)
    status, headers, body = await call(gateway, "GET", f"/{path_of(both)}")
    assert status == 403, body
    assert leaks(body, headers, (both["id"], "another person")) == []
    # no consent of the other server's patient is ever asked for, by any spelling of it
    assert not [r for r in world.requests if r.path_qs.startswith("/fhir/Consent") and "elsewhere" in r.path_qs]


async def test_break_glass_opens_another_servers_patients_record_without_naming_a_patient(
    world: FakeFhir, make_gateway: MakeGateway,
) -> None:
    """Break-glass overrides the closed record like any denial; its AuditEvent and emergency
    Consent name no patient for it (the gateway cannot name the other server's one)."""
    gateway = await make_gateway(world.base_url)
    status, headers, body = await call(gateway, "GET", f"/{path_of(FOREIGN_PATIENT)}",
                                       **{"X-Break-Glass": "Medical emergency"})
    assert status == 200, body
    assert "X-Break-Glass-Audit-Id" in headers
    audit = open(gateway.state.settings.audit.path, "rb").read()
    assert b"unknown-patient" not in audit and b"\\u0000" not in audit
    stored = [r for r in world.resources.values() if r["resourceType"] == "Consent" and "emergency" in str(r)]
    assert all("unknown" not in str(r) for r in stored)


# The server's own external name, which it writes in its references while the gateway reaches it
# by another (upstream.reference_bases).
EXTERNAL = "https://FHIR.Hospital.example:443/r4/"


@pytest.mark.parametrize("kind", ["medication", "ingredient", "role", "patient", "context"])
@pytest.mark.parametrize("base", ["upstream", "public", "reference base"])
async def test_this_servers_own_bases_decide_as_relative_references(
    world: FakeFhir, make_gateway: MakeGateway, kind: str, base: str,
) -> None:
    """Control: the same references under the configured upstream base, the gateway's
    configured public base or one of ``upstream.reference_bases`` are this server's, and
    release the ordinary record."""
    own = {"upstream": world.base_url, "public": PUBLIC, "reference base": EXTERNAL.rstrip("/")}[base]
    record = _rebased(RECORDS[kind], OTHER, own)
    # A role recorded by Dr Gomez's own role, a Binary of Ana's own CBC, an order of lisinopril.
    world.add(record)
    if kind == "ingredient":
        world.add(_rebased(FOREIGN_INGREDIENT_MED, OTHER, own))
    gateway = await make_gateway(world.base_url, public_base_url=PUBLIC,
                                 upstream={"reference_bases": ["https://fhir.hospital.example/r4"]})
    status, _, body = await call(gateway, "GET", f"/{path_of(record)}")
    assert status == 200, (kind, base, body)


@pytest.mark.parametrize("kind", ["medication", "patient"])
async def test_the_servers_external_name_is_another_servers_until_it_is_listed(
    world: FakeFhir, make_gateway: MakeGateway, kind: str,
) -> None:
    """Without ``upstream.reference_bases`` the server's external name is an unknown base: its
    records close (fail closed), and open once the name is listed."""
    record = _rebased(RECORDS[kind], OTHER, EXTERNAL.rstrip("/"))
    world.add(record)
    hidden, secret = SECRETS[kind]
    closed = await make_gateway(world.base_url)
    status, headers, body = await call(closed, "GET", f"/{path_of(record)}")
    assert status == 403 and not leaks(body, headers, (hidden, secret))
    opened = await make_gateway(world.base_url, upstream={"reference_bases": [EXTERNAL]})
    status, _, body = await call(opened, "GET", f"/{path_of(record)}")
    assert status == 200 and hidden.encode() in body


def _rebased(resource: dict[str, Any], old: str, new: str) -> dict[str, Any]:
    import orjson
    return dict(orjson.loads(orjson.dumps(resource).replace(old.encode(), new.encode())))
