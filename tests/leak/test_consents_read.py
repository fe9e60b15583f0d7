"""A patient's Consents, read through the gateway, must not tell what they hide.

"Withhold ``Condition/cond-hiv-b20-91a`` from everyone" (``provision.data``, R4's ``notThis``
shape) names the record it hides and says why it is hidden; a provision naming ICD-10-CM B20
says what the patient has as surely as the condition does. A Consent naming records is read
only by its patient and by ``consent.writer_roles``; one naming clinical codes is labelled by
them, like the record (so a general permit does not open it). Each test searches the RAW
response bytes at every door: read, search, ``$everything``, batch.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.fakes import FakeFhir
from tests.fixtures import clinical as c
from tests.leak.test_side_doors import MakeGateway, alike, batch, call, ids_in, leaks, routes, slots

HIV_CONDITION = "Condition/cond-hiv-b20-91a"
NOT_THIS = {
    "resourceType": "Consent", "id": "consent-ana-not-this-4d2", "status": "active",
    "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]},
    "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
    "patient": {"reference": c.PAT_ANA}, "dateTime": "2024-02-01",
    "provision": {"type": "permit", "provision": [
        {"type": "deny", "data": [{"meaning": "instance", "reference": {"reference": HIV_CONDITION}}]},
    ]},
}
NOT_THESE_CODES = {
    **NOT_THIS, "id": "consent-ana-not-codes-9e7",
    "provision": {"type": "permit", "provision": [
        {"type": "deny", "code": [{"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "B20"}]}]},
    ]},
}
SECRETS = ("cond-hiv-b20-91a", "B20", NOT_THIS["id"], NOT_THESE_CODES["id"])
HIM = {"X-Actor-Role": "HIM"}


@pytest.fixture
def world(fake_fhir: FakeFhir) -> FakeFhir:
    c.seed_all(fake_fhir)
    fake_fhir.add(c.opt_in(c.PAT_ANA), NOT_THIS, NOT_THESE_CODES)
    ana = c.PAT_ANA.split("/")[1]
    consents = [c.opt_in(c.PAT_ANA), NOT_THIS, NOT_THESE_CODES]
    fake_fhir.override = routes({
        ("GET", "/Consent"): lambda r: c.bundle(consents, fake_fhir.base_url),
        ("GET", f"/Patient/{ana}/$everything"): lambda r: c.bundle(consents, fake_fhir.base_url),
        ("GET", "/Patient"): lambda r: c.bundle([c.ANA], fake_fhir.base_url, include=tuple(consents)),
        ("POST", "/Consent/_search"): lambda r: c.bundle(consents, fake_fhir.base_url),
        ("GET", f"/Consent/{NOT_THIS['id']}/_history"): lambda r: c.history_bundle([NOT_THIS], fake_fhir.base_url),
    })
    return fake_fhir


def doors() -> dict[str, tuple[str, str, Any]]:
    ana = c.PAT_ANA.split("/")[1]
    return {
        "read-data": ("GET", f"/Consent/{NOT_THIS['id']}", None),
        "read-codes": ("GET", f"/Consent/{NOT_THESE_CODES['id']}", None),
        "search": ("GET", f"/Consent?patient={c.PAT_ANA}", None),
        "everything": ("GET", f"/Patient/{ana}/$everything", None),
        "batch": ("POST", "/", batch(("GET", f"Consent/{NOT_THIS['id']}"), ("GET", f"Consent/{NOT_THESE_CODES['id']}"))),
        "revinclude": ("GET", f"/Patient?_id={ana}&_revinclude=Consent:patient", None),
        "form-search": ("POST", "/Consent/_search", f"patient={c.PAT_ANA}".encode()),
        "history": ("GET", f"/Consent/{NOT_THIS['id']}/_history", None),
    }


@pytest.mark.parametrize("door", list(doors()))
async def test_a_clinician_does_not_read_what_a_consent_hides(world: FakeFhir, make_gateway: MakeGateway, door: str) -> None:
    gateway = await make_gateway(world.base_url, consent={"writer_roles": ["HIM"]})
    method, path, sent = doors()[door]
    form = {"Content-Type": "application/x-www-form-urlencoded"} if door == "form-search" else {}
    status, headers, body = await call(gateway, method, path, body=sent, **form)
    assert leaks(body, headers, SECRETS) == []
    if door.startswith("read") or door == "history":
        assert status == 403, body
    elif door == "batch":
        assert all(s["response"]["status"].startswith("403") for s in slots(body)), body
    else:
        assert status == 200, body
        assert ("pat-ana-5581" if door == "revinclude" else "consent-optin") in ids_in(body)


@pytest.mark.parametrize("who", ["patient", "writer"])
async def test_the_patient_and_a_consent_writer_read_every_consent(
    world: FakeFhir, make_gateway: MakeGateway, who: str,
) -> None:
    gateway = await make_gateway(world.base_url, consent={"writer_roles": ["HIM"]})
    actor, headers = (c.PAT_ANA, {}) if who == "patient" else (c.DOCTOR, HIM)
    status, _, body = await call(gateway, "GET", f"/Consent?patient={c.PAT_ANA}", actor=actor, **headers)
    assert status == 200, body
    assert {NOT_THIS["id"], NOT_THESE_CODES["id"], "consent-optin"} <= ids_in(body)


@pytest.mark.parametrize("path", [
    f"/Consent?patient={c.PAT_ANA}&_summary=count",
    f"/Consent?patient={c.PAT_ANA}&data={HIV_CONDITION}&_summary=count",
    f"/Patient?_id={c.PAT_ANA.split('/')[1]}&_has:Consent:patient:data={HIV_CONDITION}",
])
async def test_an_unconditional_permit_does_not_open_counts_of_consents(
    world: FakeFhir, make_gateway: MakeGateway, path: str,
) -> None:
    """Counts and reverse chains are let through where every named patient permits whatever the
    content; a Consent naming records is not decided by those consents, so no such exemption."""
    # Ana's only active consent permits everything; the two that name what they hide are inactive.
    world.add({**NOT_THIS, "status": "inactive"}, {**NOT_THESE_CODES, "status": "inactive"})
    world.override = routes({
        # The gateway's own consent lookups fall through to the store (None).
        ("GET", "/Consent"): lambda r: (
            {"resourceType": "Bundle", "type": "searchset", "total": 1} if "_summary" in r.query else None),
        ("GET", "/Patient"): lambda r: c.bundle([c.ANA], world.base_url),
    })
    open_everything = {"sensitivity": {"explicit_consent_required": "none"}, "consent": {"writer_roles": ["HIM"]}}
    gateway = await make_gateway(world.base_url, **open_everything)
    control = await call(gateway, "GET", f"/Observation?patient={c.PAT_ANA}&_summary=count")
    assert control[0] == 200, control[2]  # the exemption holds for clinical data
    status, headers, body = await call(gateway, "GET", path)
    assert status == 403, body
    assert leaks(body, headers, SECRETS) == []
    status, _, body = await call(gateway, "GET", path, actor=c.PAT_ANA)
    assert status == 200, body  # the patient's own
    status, _, body = await call(gateway, "GET", path, **HIM)
    assert status == 200, body  # a consent writer


async def test_404_mode_a_consent_that_names_records_reads_like_a_missing_one(
    world: FakeFhir, make_gateway: MakeGateway,
) -> None:
    gateway = await make_gateway(world.base_url, enforcement={"denied_read_status": 404})
    hidden = await call(gateway, "GET", f"/Consent/{NOT_THIS['id']}")
    missing = await call(gateway, "GET", "/Consent/consent-nothing-here-000")
    assert hidden[0] == 404, hidden[2]
    alike(hidden, missing)
    assert leaks(hidden[2], hidden[1], SECRETS) == []
