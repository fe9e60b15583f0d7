"""Records that live in another resource the gateway has to read, through every door.

1. Ana's consent: "everyone may see my ordinary records, but not what Dr Kowalski wrote" (an
   ``AUT`` actor). Her migraine was recorded by ``PractitionerRole/role-kowalski-neuro-3d1``
   (practitioner Dr Kowalski), as US Core data writes it. The role is read from the FHIR server
   (or taken from the answer) only because her consent reads authors.
2. Ana's general opt-in does not open 42 CFR Part 2 data. An order names a compounded product
   whose ingredient, named by reference, is methadone (RxNorm 864706).

Each test searches the RAW response bytes and headers for the hidden ids, codes and texts.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from tests.conftest import GatewayUnderTest
from tests.fakes import FakeFhir
from tests.fixtures import clinical as c
from tests.leak.test_side_doors import MakeGateway, batch, call, fhir, ids_in, leaks, routes, slots

ANA_ID = c.PAT_ANA.split("/", 1)[1]
KOWALSKI = c.BANNED_DOCTOR
ROLE_KOWALSKI = {
    "resourceType": "PractitionerRole", "id": "role-kowalski-neuro-3d1", "active": True,
    "practitioner": {"reference": KOWALSKI}, "organization": {"reference": "Organization/org-neuro-clinic-41"},
    "code": [c.concept("http://nucc.org/provider-taxonomy", "2084N0400X", "Neurology")],
}
ROLE_GOMEZ = {
    "resourceType": "PractitionerRole", "id": "role-gomez-gp-7a2", "active": True,
    "practitioner": {"reference": c.DOCTOR},
}


def migraine(rid: str, recorder: str, **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Condition", "id": rid, "subject": {"reference": c.PAT_ANA},
        "clinicalStatus": c.concept("http://terminology.hl7.org/CodeSystem/condition-clinical", "active", "Active"),
        "code": c.concept(c.SNOMED, "37796009", "Migraine"), "onsetDateTime": "2023-09-14",
        "recorder": {"reference": recorder}, **extra,
    }


# The same record but for who recorded it: its decision must not be shared with the other's.
# (What the consents read of them, their facts record, differs only in the authors.)
NOTE = [{"text": "Hemiplegic aura; family history reviewed with neurology"}]
BY_KOWALSKI = migraine("cond-migraine-kow-8e4", f"PractitionerRole/{ROLE_KOWALSKI['id']}", note=NOTE)
BY_GOMEZ = migraine("cond-migraine-gom-1c9", f"PractitionerRole/{ROLE_GOMEZ['id']}")
CONTAINED_ROLE = migraine("cond-migraine-cnt-4d7", "#r", contained=[{**ROLE_KOWALSKI, "id": "r"}], note=NOTE)
ROLE_SECRETS = (BY_KOWALSKI["id"], CONTAINED_ROLE["id"], "Hemiplegic", "neurology", ROLE_KOWALSKI["id"], "2084N0400X")

NOT_KOWALSKI = {
    "resourceType": "Consent", "id": "consent-not-kowalski", "status": "active",
    "scope": c.concept("http://terminology.hl7.org/CodeSystem/consentscope", "patient-privacy", "Privacy Consent"),
    "category": [c.concept(c.LOINC, "59284-0", "Patient Consent")],
    "patient": {"reference": c.PAT_ANA}, "dateTime": "2024-01-15T10:00:00Z",
    "policyRule": c.concept("http://terminology.hl7.org/CodeSystem/v3-ActCode", "OPTIN", "opt-in"),
    "provision": {"type": "permit", "provision": [{"type": "deny", "actor": [{
        "role": c.concept("http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "AUT", "author"),
        "reference": {"reference": KOWALSKI}}]}]},
}


@pytest.fixture
def world(fake_fhir: FakeFhir) -> FakeFhir:
    c.seed_all(fake_fhir)
    fake_fhir.add(NOT_KOWALSKI, c.opt_in(c.PAT_BEN, "consent-ben-in"), ROLE_KOWALSKI, ROLE_GOMEZ,
                  BY_KOWALSKI, BY_GOMEZ, CONTAINED_ROLE)
    return fake_fhir


def role_reads(world: FakeFhir) -> list[str]:
    return [r.path_qs for r in world.requests if r.path_qs.startswith("/fhir/PractitionerRole")]


def kept(body: bytes) -> set[str]:
    return {i for i in ids_in(body) if i != "suppressed"}


# ================================================================ 1. authors given as a PractitionerRole


@pytest.mark.parametrize("record", [BY_KOWALSKI, CONTAINED_ROLE], ids=["role-on-the-server", "contained-role"])
async def test_a_read_of_what_the_excluded_doctor_recorded_in_a_role_is_refused(
    world: FakeFhir, gateway: GatewayUnderTest, record: dict[str, Any],
) -> None:
    status, headers, body = await call(gateway, "GET", f"/Condition/{record['id']}")
    assert status == 403, body
    assert leaks(body, headers, ROLE_SECRETS) == []
    status, _, body = await call(gateway, "GET", f"/Condition/{BY_GOMEZ['id']}")
    assert status == 200, body  # the same record by another doctor's role stays open


async def test_every_door_reaches_the_same_decision(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    search = f"/Condition?patient={c.PAT_ANA}"
    status, headers, body = await call(gateway, "GET", search)
    assert status == 200, body
    assert BY_GOMEZ["id"] in kept(body) and leaks(body, headers, ROLE_SECRETS) == []
    # _include brings the roles into the answer: they decide as read ones do.
    world.override = routes({("GET", "/Condition"): lambda r: c.bundle(
        [BY_KOWALSKI, BY_GOMEZ, CONTAINED_ROLE], world.base_url, include=(ROLE_KOWALSKI, ROLE_GOMEZ))})
    before = len(role_reads(world))
    status, headers, body = await call(gateway, "GET", f"{search}&_include=Condition:recorder")
    assert status == 200, body
    assert BY_GOMEZ["id"] in kept(body) and leaks(body, headers, ROLE_SECRETS) == []
    assert len(role_reads(world)) == before  # in the answer: not read again
    world.override = None
    # A batch entry is a request of its own.
    status, headers, body = await call(gateway, "POST", "/", body=batch(
        ("GET", f"Condition/{BY_KOWALSKI['id']}"), ("GET", f"Condition/{BY_GOMEZ['id']}")))
    assert status == 200, body
    got = slots(body)
    assert got[0]["response"]["status"].startswith("403") and "resource" not in got[0]
    assert got[1]["resource"]["id"] == BY_GOMEZ["id"]
    assert leaks(body, headers, ROLE_SECRETS) == []
    # $everything.
    world.override = routes({("GET", f"/Patient/{ANA_ID}/$everything"): lambda r: c.bundle(
        [c.ANA, BY_KOWALSKI, BY_GOMEZ, CONTAINED_ROLE], world.base_url)})
    status, headers, body = await call(gateway, "GET", f"/Patient/{ANA_ID}/$everything")
    assert status == 200, body
    assert BY_GOMEZ["id"] in kept(body) and leaks(body, headers, ROLE_SECRETS) == []


async def test_a_role_that_cannot_be_read_closes_what_it_recorded_only(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    """The author is unknown: it matches the deny (CONTRACT §5), and only that record closes."""
    world.override = routes({("GET", f"/PractitionerRole/{ROLE_KOWALSKI['id']}"): lambda r: fhir(
        {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "exception"}]}, 500)})
    status, headers, body = await call(gateway, "GET", f"/Condition?patient={c.PAT_ANA}")
    assert status == 200, body
    assert BY_GOMEZ["id"] in kept(body) and leaks(body, headers, ROLE_SECRETS) == []
    # A malformed role (another resource under its address) is as unknown.
    world.override = routes({("GET", f"/PractitionerRole/{ROLE_KOWALSKI['id']}"): lambda r: fhir(
        {**ROLE_GOMEZ, "id": "someone-else"})})
    status, headers, body = await call(gateway, "GET", f"/Condition/{BY_KOWALSKI['id']}")
    assert status == 403, body
    # A failure is not remembered: once the server answers, the role decides.
    world.override = None
    status, _, body = await call(gateway, "GET", f"/Condition/{BY_GOMEZ['id']}")
    assert status == 200, body


async def test_roles_are_read_only_for_consents_that_read_authors(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    """Ben's general opt-in reads no authors: his records cost no role read; Ana's cost one
    read per role, kept for the consent cache's TTL."""
    ben_record = {**BY_KOWALSKI, "id": "cond-migraine-ben-2f0", "subject": {"reference": c.PAT_BEN}}
    world.add(ben_record)
    status, _, body = await call(gateway, "GET", f"/Condition/{ben_record['id']}")
    assert status == 200, body
    assert role_reads(world) == []
    for _ in range(2):
        status, _, body = await call(gateway, "GET", f"/Condition?patient={c.PAT_ANA}")
        assert status == 200, body
    assert sorted(role_reads(world)) == sorted(f"/fhir/PractitionerRole/{r['id']}" for r in (ROLE_KOWALSKI, ROLE_GOMEZ))


@pytest.mark.parametrize("how", ["delete", "batch", "invalidate-all"])
async def test_a_role_changed_through_the_gateway_is_read_afresh(
    world: FakeFhir, gateway: GatewayUnderTest, how: str,
) -> None:
    """The role a record names is kept for the consent cache's TTL; a delete made through the
    gateway (alone or in a batch), or an invalidation of everything after a change at the
    server, forgets the kept copy, so the record closes at once (a deleted role's author is
    unknown; a role now held by the excluded doctor is his). Handing a role over through the
    gateway is refused (test_red_team_10: it would decide what was written through it anew)."""
    status, _, body = await call(gateway, "GET", f"/Condition/{BY_GOMEZ['id']}")
    assert status == 200, body
    handed_over = {**ROLE_GOMEZ, "practitioner": {"reference": KOWALSKI}}
    if how == "delete":
        status, _, body = await call(gateway, "DELETE", f"/PractitionerRole/{ROLE_GOMEZ['id']}")
        assert status == 200, body
    elif how == "batch":
        status, _, body = await call(gateway, "POST", "/", body={"resourceType": "Bundle", "type": "batch", "entry": [
            {"request": {"method": "DELETE", "url": f"PractitionerRole/{ROLE_GOMEZ['id']}"}}]})
        assert status == 200, body
    else:
        world.add(handed_over)  # changed at the server by another system
        async with gateway.session.post(f"{gateway.admin_url}/cache/invalidate", json={}) as resp:
            assert resp.status == 200
    status, headers, body = await call(gateway, "GET", f"/Condition/{BY_GOMEZ['id']}")
    assert status == 403, body
    assert leaks(body, headers, (BY_GOMEZ["id"], "Migraine")) == []


async def test_the_decision_shared_across_requests_follows_the_role(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    """Two records alike but for the role that recorded them, asked in turn: the decision kept
    across requests for one is never served for the other."""
    for _ in range(2):
        for record, expected in ((BY_GOMEZ, 200), (BY_KOWALSKI, 403)):
            status, headers, body = await call(gateway, "GET", f"/Condition/{record['id']}")
            assert status == expected, (record["id"], body)
    assert gateway.state.enforcement.decisions.hits > 0


# ================================================================ 2. ingredients named by reference

METHADONE = {
    "resourceType": "Medication", "id": "med-methadone-10-9f1",
    "code": c.concept(c.RXNORM, "864706", "methadone hydrochloride 10 MG Oral Tablet"),
}
COMPOUND = {
    "resourceType": "Medication", "id": "med-compound-mth-5c2",
    "code": {"coding": [{"system": "urn:oid:2.16.840.1.113883.3.9999.1", "code": "CMP-0073"}], "text": "Compounded oral solution"},
    "ingredient": [{"itemReference": {"reference": f"Medication/{METHADONE['id']}"}, "isActive": True}],
}
LISINOPRIL = {
    "resourceType": "Medication", "id": "med-lisinopril-10-2a4",
    "code": c.concept(c.RXNORM, "314076", "lisinopril 10 MG Oral Tablet"),
}


def order(rid: str, medication: str, **extra: Any) -> dict[str, Any]:
    return {"resourceType": "MedicationRequest", "id": rid, "status": "active", "intent": "order",
            "medicationReference": {"reference": medication}, "subject": {"reference": c.PAT_ANA},
            "authoredOn": "2024-03-02", "requester": {"reference": c.DOCTOR}, **extra}


COMPOUND_ORDER = order("medrx-compound-mth-2b7", f"Medication/{COMPOUND['id']}")
ORDINARY_ORDER = order("medrx-lisinopril-8f0", f"Medication/{LISINOPRIL['id']}")
MED_SECRETS = (COMPOUND_ORDER["id"], COMPOUND["id"], METHADONE["id"], "864706", "methadone", "CMP-0073", "Compounded")


@pytest.fixture
def pharmacy(fake_fhir: FakeFhir) -> FakeFhir:
    c.seed_all(fake_fhir)
    fake_fhir.add(c.opt_in(c.PAT_ANA), METHADONE, COMPOUND, LISINOPRIL, COMPOUND_ORDER, ORDINARY_ORDER)
    fake_fhir.resources = {k: v for k, v in fake_fhir.resources.items()
                           if not k.startswith("MedicationRequest/") or v["id"] in (COMPOUND_ORDER["id"], ORDINARY_ORDER["id"])}
    return fake_fhir


async def test_an_order_whose_drug_is_an_ingredient_is_withheld_at_every_door(
    pharmacy: FakeFhir, make_gateway: MakeGateway,
) -> None:
    gateway = await make_gateway(pharmacy.base_url)
    status, headers, body = await call(gateway, "GET", f"/MedicationRequest/{COMPOUND_ORDER['id']}")
    assert status == 403, body
    assert leaks(body, headers, MED_SECRETS) == []
    status, headers, body = await call(gateway, "GET", f"/MedicationRequest?patient={c.PAT_ANA}")
    assert status == 200, body
    assert kept(body) == {ORDINARY_ORDER["id"]} and leaks(body, headers, MED_SECRETS) == []
    # The compound and its ingredient included in the answer (nothing read).
    pharmacy.override = routes({("GET", "/MedicationRequest"): lambda r: c.bundle(
        [COMPOUND_ORDER, ORDINARY_ORDER], pharmacy.base_url, include=(COMPOUND, METHADONE, LISINOPRIL))})
    status, headers, body = await call(
        gateway, "GET",
        f"/MedicationRequest?patient={c.PAT_ANA}&_include=MedicationRequest:medication&_include:iterate=Medication:ingredient")
    assert status == 200, body
    assert ORDINARY_ORDER["id"] in kept(body) and leaks(body, headers, MED_SECRETS) == []
    pharmacy.override = None
    status, headers, body = await call(gateway, "POST", "/", body=batch(
        ("GET", f"MedicationRequest/{COMPOUND_ORDER['id']}"), ("GET", f"MedicationRequest/{ORDINARY_ORDER['id']}")))
    assert status == 200, body
    got = slots(body)
    assert got[0]["response"]["status"].startswith("403") and got[1]["resource"]["id"] == ORDINARY_ORDER["id"]
    assert leaks(body, headers, MED_SECRETS) == []
    pharmacy.override = routes({("GET", f"/Patient/{ANA_ID}/$everything"): lambda r: c.bundle(
        [c.ANA, COMPOUND_ORDER, ORDINARY_ORDER], pharmacy.base_url)})
    status, headers, body = await call(gateway, "GET", f"/Patient/{ANA_ID}/$everything")
    assert status == 200, body
    assert ORDINARY_ORDER["id"] in kept(body) and leaks(body, headers, MED_SECRETS) == []


@pytest.mark.parametrize("where", ["contained-in-the-medication", "contained-in-the-order"])
async def test_contained_ingredients_label_the_order(pharmacy: FakeFhir, make_gateway: MakeGateway, where: str) -> None:
    inner = {**METHADONE, "id": "mth"}
    if where == "contained-in-the-medication":
        medication = {**COMPOUND, "id": "med-compound-cnt-6e3", "contained": [inner],
                      "ingredient": [{"itemReference": {"reference": "#mth"}}]}
        pharmacy.add(medication)
        record = order("medrx-compound-cnt-3a8", f"Medication/{medication['id']}")
    else:
        record = order("medrx-compound-cnt-3a8", "#cmp", contained=[
            {**COMPOUND, "id": "cmp", "ingredient": [{"itemReference": {"reference": "#mth"}}]}, inner])
    pharmacy.add(record)
    gateway = await make_gateway(pharmacy.base_url)
    status, headers, body = await call(gateway, "GET", f"/MedicationRequest/{record['id']}")
    assert status == 403, body
    assert leaks(body, headers, (*MED_SECRETS, record["id"])) == []


async def test_an_ingredient_that_cannot_be_read_closes_the_order(pharmacy: FakeFhir, make_gateway: MakeGateway) -> None:
    pharmacy.override = routes({("GET", f"/Medication/{METHADONE['id']}"): lambda r: fhir(
        {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "exception"}]}, 503)})
    gateway = await make_gateway(pharmacy.base_url)
    status, headers, body = await call(gateway, "GET", f"/MedicationRequest?patient={c.PAT_ANA}")
    assert status == 200, body
    assert kept(body) == {ORDINARY_ORDER["id"]} and leaks(body, headers, MED_SECRETS) == []
    # Not remembered: once it can be read, the ingredient decides (and labels) the order.
    pharmacy.override = None
    status, _, body = await call(gateway, "GET", f"/MedicationRequest/{COMPOUND_ORDER['id']}")
    assert status == 403, body
    reads = [r.path_qs for r in pharmacy.requests if r.path_qs.startswith("/fhir/Medication/")]
    assert reads.count(f"/fhir/Medication/{METHADONE['id']}") == 2  # failed once, read once, then cached
    status, _, body = await call(gateway, "GET", f"/MedicationRequest/{COMPOUND_ORDER['id']}")
    reads = [r.path_qs for r in pharmacy.requests if r.path_qs.startswith("/fhir/Medication/")]
    assert reads.count(f"/fhir/Medication/{METHADONE['id']}") == 2


async def test_one_hop_and_no_further(pharmacy: FakeFhir, make_gateway: MakeGateway) -> None:
    """The ingredient's own ingredients are never asked for: the hop is bounded."""
    deeper = {**METHADONE, "ingredient": [{"itemReference": {"reference": "Medication/med-deeper-000"}}]}
    pharmacy.add(deeper)
    gateway = await make_gateway(pharmacy.base_url)
    status, _, body = await call(gateway, "GET", f"/MedicationRequest/{COMPOUND_ORDER['id']}")
    assert status == 403, body
    assert not [r for r in pharmacy.requests if "med-deeper-000" in r.path_qs]


async def test_a_medication_in_the_answer_carries_its_ingredient_labels(
    pharmacy: FakeFhir, make_gateway: MakeGateway,
) -> None:
    """A Medication is not patient data and passes, but its labels (DS4P, CONTRACT §10) are its
    ingredients' too: the compound carries the Part 2 label and its refrain like methadone."""
    gateway = await make_gateway(pharmacy.base_url)
    labelled = {}
    for medication in (METHADONE, COMPOUND, LISINOPRIL):
        status, _, body = await call(gateway, "GET", f"/Medication/{medication['id']}")
        assert status == 200, body
        labelled[medication["id"]] = {s.get("code") for s in orjson.loads(body).get("meta", {}).get("security", [])}
    assert "42CFRPart2" in labelled[METHADONE["id"]]
    assert labelled[COMPOUND["id"]] == labelled[METHADONE["id"]]
    assert "42CFRPart2" not in labelled[LISINOPRIL["id"]]


async def test_an_ordinary_compound_is_released(pharmacy: FakeFhir, make_gateway: MakeGateway) -> None:
    """Control: following ingredients must not close ordinary orders."""
    ordinary = {**COMPOUND, "id": "med-compound-lis-0b0",
                "ingredient": [{"itemReference": {"reference": f"Medication/{LISINOPRIL['id']}"}}]}
    record = order("medrx-compound-lis-7d7", f"Medication/{ordinary['id']}")
    pharmacy.add(ordinary, record)
    gateway = await make_gateway(pharmacy.base_url)
    status, _, body = await call(gateway, "GET", f"/MedicationRequest/{record['id']}")
    assert status == 200, body


async def test_a_contained_medication_never_stands_for_the_server_one(pharmacy: FakeFhir, make_gateway: MakeGateway) -> None:
    """One order contains its lisinopril under the id the server gives methadone; another names
    the server's methadone. Contained resources are not addressable from outside their
    container: the second order's drug is read, never taken from inside the first."""
    shadowing = order("medrx-contained-lis-5e5", f"#{METHADONE['id']}", contained=[{**LISINOPRIL, "id": METHADONE["id"]}])
    direct = order("medrx-methadone-direct-6f6", f"Medication/{METHADONE['id']}")
    pharmacy.add(shadowing, direct)
    pharmacy.override = routes({("GET", "/MedicationRequest"): lambda r: c.bundle([shadowing, direct], pharmacy.base_url)})
    gateway = await make_gateway(pharmacy.base_url)
    status, headers, body = await call(gateway, "GET", f"/MedicationRequest?patient={c.PAT_ANA}")
    assert status == 200, body
    assert kept(body) == {shadowing["id"]}
    assert leaks(body, headers, (direct["id"], "864706")) == []
