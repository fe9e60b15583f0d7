"""Absolute references in displays and in Consents, under this server's bases and another's.

An absolute reference names this FHIR server's resource only under one of its bases (the
configured upstream base, ``public_base_url``, ``upstream.reference_bases``); under any other
base it names another server's resource (``OTHER``, a health information exchange), never
this server's of the same ``Type/id``:

- a ``Reference.display`` naming another server's patient data goes, even when this server's
  record of the same ``Type/id`` is released in the same answer (what the other server's record
  is, the gateway cannot decide); under this server's bases a display goes exactly when the
  relative form's would;
- a Consent's actor, author or ``data`` on another server is unknown: a permit naming it opens
  nothing here, a deny naming it closes what the provision's other conditions cover (CONTRACT
  §5: an unknown condition matches on a deny, never on a permit); its patient on another server
  is no patient here, so a consent source that answers it for this server's patient of the same
  id cannot be trusted (503); an emergency window for another server's practitioner opens to no
  one here; a patient may not write a Consent about another server's patient.

Every test runs on whole answers and on views (tests/leak/conftest.py) and searches the RAW
response bytes and headers.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import orjson
import pytest

from gateway.core.breakglass import emergency_consent
from gateway.core.model import Actor
from tests.fakes import FakeFhir
from tests.fixtures import clinical as c
from tests.leak.test_role_authors_and_ingredients import kept
from tests.leak.test_side_doors import MakeGateway, call, leaks, routes

ANA_ID = c.PAT_ANA.split("/", 1)[1]
BEN_ID = c.PAT_BEN.split("/", 1)[1]
OTHER = "https://hie.elsewhere.example/fhir"
PUBLIC = "https://gateway.hospital.example/fhir"
# The server's external name, listed in upstream.reference_bases (spelled differently there).
EXTERNAL = "https://fhir.hospital.example/r4"
LISTED = {"public_base_url": PUBLIC, "upstream": {"reference_bases": ["https://FHIR.hospital.example:443/r4/"]}}
OUR_BASES = ["relative", "upstream", "public", "reference base"]


@pytest.fixture
def world(fake_fhir: FakeFhir) -> FakeFhir:
    """Ana and Ben and their records; Ana holds a general opt-in (her HIV test stays closed),
    Ben only what a test gives him (no consent: the default, deny)."""
    c.seed_all(fake_fhir)
    fake_fhir.add(c.opt_in(c.PAT_ANA))
    return fake_fhir


def based(ref: str, base: str, world: FakeFhir) -> str:
    """``ref`` (``Type/id``) under one of this server's bases, or as it is (``relative``)."""
    prefix = {"relative": "", "upstream": world.base_url, "public": PUBLIC, "reference base": EXTERNAL,
              "other": OTHER}[base]
    return f"{prefix}/{ref}" if prefix else ref


# ================================================================ 1. displays

HIDDEN_DISPLAY = "HIV-1 RNA 12000 copies/mL (exchange result)"
OPEN_DISPLAY = "CBC panel, normal"
DOCTOR_DISPLAY = "Dr Mbeki at the exchange"


def report(rid: str, result: str, display: str) -> dict[str, Any]:
    """Ana's ordinary CBC report, naming ``result`` with ``display``."""
    return {
        "resourceType": "DiagnosticReport", "id": rid, "status": "final",
        "subject": {"reference": c.PAT_ANA}, "effectiveDateTime": "2023-04-18T08:00:00Z",
        "code": c.concept(c.LOINC, "58410-2", "CBC panel - Blood by Automated count"),
        "performer": [{"reference": f"{OTHER}/Practitioner/dr-mbeki", "display": DOCTOR_DISPLAY}],
        "result": [{"reference": result, "display": display}],
    }


def cbc_ref() -> str:
    return f"Observation/{c.ANA_CBC['id']}"


def hiv_ref() -> str:
    return f"Observation/{c.HIV_TEST['id']}"


async def search_reports(gateway: Any, world: FakeFhir, record: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
    """A search whose answer holds the report and Ana's released CBC (as a match and as what
    ``_include`` brings)."""
    world.add(record)
    world.override = routes({("GET", "/DiagnosticReport"): lambda r: c.bundle([record], world.base_url, include=(c.ANA_CBC,))})
    try:
        return await call(gateway, "GET", f"/DiagnosticReport?subject={c.PAT_ANA}&_include=DiagnosticReport:result")
    finally:
        world.override = None


async def test_a_display_naming_another_servers_record_goes_though_ours_of_that_id_is_released(
    world: FakeFhir, make_gateway: MakeGateway,
) -> None:
    """Our CBC is released in the same answer; the other server's Observation of its id is not
    ours: its display may say anything (there, an HIV viral load) and goes. The display of
    another server's practitioner (no patient data) stays, as a relative one's would."""
    gateway = await make_gateway(world.base_url, **LISTED)
    record = report("dr-cbc-frn-1a7", f"{OTHER}/{cbc_ref()}", HIDDEN_DISPLAY)
    status, headers, body = await search_reports(gateway, world, record)
    assert status == 200, body
    assert {record["id"], c.ANA_CBC["id"]} <= kept(body)
    assert leaks(body, headers, (HIDDEN_DISPLAY,)) == []
    assert DOCTOR_DISPLAY.encode() in body
    # A read of the report alone, and the report in a batch slot: the same.
    status, headers, body = await call(gateway, "GET", f"/DiagnosticReport/{record['id']}")
    assert status == 200 and leaks(body, headers, (HIDDEN_DISPLAY,)) == []


@pytest.mark.parametrize("base", OUR_BASES)
async def test_a_display_under_our_base_goes_exactly_as_the_relative_ones(
    world: FakeFhir, make_gateway: MakeGateway, base: str,
) -> None:
    """Under each of this server's bases: a display naming the withheld HIV test goes, one naming
    the released CBC stays."""
    gateway = await make_gateway(world.base_url, **LISTED)
    hidden = report("dr-cbc-hiv-2b8", based(hiv_ref(), base, world), HIDDEN_DISPLAY)
    status, headers, body = await search_reports(gateway, world, hidden)
    assert status == 200, body
    assert hidden["id"] in kept(body) and c.HIV_TEST["id"] not in kept(body)
    assert leaks(body, headers, (HIDDEN_DISPLAY,)) == []
    shown = report("dr-cbc-own-3c9", based(cbc_ref(), base, world), OPEN_DISPLAY)
    status, _, body = await search_reports(gateway, world, shown)
    assert status == 200 and OPEN_DISPLAY.encode() in body, (base, body)


async def test_an_unlisted_name_of_this_server_is_another_servers_for_displays_too(
    world: FakeFhir, make_gateway: MakeGateway,
) -> None:
    """Without ``upstream.reference_bases`` the server's external name is an unknown base: the
    display goes (fail closed), and stays once the name is listed."""
    record = report("dr-cbc-ext-4d0", based(cbc_ref(), "reference base", world), OPEN_DISPLAY)
    closed = await make_gateway(world.base_url)
    status, _, body = await search_reports(closed, world, record)
    assert status == 200 and OPEN_DISPLAY.encode() not in body
    opened = await make_gateway(world.base_url, **LISTED)
    status, _, body = await search_reports(opened, world, record)
    assert status == 200 and OPEN_DISPLAY.encode() in body


# ================================================================ 2. consents' references

# Ben's ordinary CBC: what a consent below opens or closes.
BEN_CBC = f"/Observation/{c.BEN_CBC['id']}"
BEN_SECRETS = (c.BEN_CBC["id"], "58410-2")


def bens(provision: dict[str, Any], cid: str = "consent-ben-frn", rule: str = "OPTIN") -> dict[str, Any]:
    consent = c.opt_in(c.PAT_BEN, cid)
    if rule != "OPTIN":
        consent["policyRule"] = c.concept(c.V3_ACT_CODE, rule, "opt-out")
    consent["provision"] = provision
    return consent


def actor(ref: str, role: str = "PRCP") -> dict[str, Any]:
    return {"role": c.concept("http://terminology.hl7.org/CodeSystem/v3-ParticipationType", role, role),
            "reference": {"reference": ref}}


async def _cbc_opens_only_under_our_bases(gateway: Any, base: str) -> None:
    """Ben's CBC read: refused, naming nothing, when the permit named another server's record;
    released under each of ours."""
    status, headers, body = await call(gateway, "GET", BEN_CBC)
    if base == "other":
        assert status == 403, body
        assert leaks(body, headers, BEN_SECRETS) == []
    else:
        assert status == 200, (base, body)


@pytest.mark.parametrize("base", ["other", *OUR_BASES])
async def test_a_permit_for_an_actor_opens_only_under_our_bases(
    world: FakeFhir, make_gateway: MakeGateway, base: str,
) -> None:
    """Ben permits Dr Gomez, named under a base: another server's Dr Gomez is not ours."""
    world.add(bens({"type": "permit", "actor": [actor(based(c.DOCTOR, base, world))]}))
    gateway = await make_gateway(world.base_url, **LISTED)
    await _cbc_opens_only_under_our_bases(gateway, base)


@pytest.mark.parametrize("base", ["other", *OUR_BASES])
async def test_a_permit_for_data_opens_only_under_our_bases(
    world: FakeFhir, make_gateway: MakeGateway, base: str,
) -> None:
    """Ben permits his CBC, named under a base: another server's Observation of its id is not it."""
    world.add(bens({"type": "permit", "data": [
        {"meaning": "instance", "reference": {"reference": based(BEN_CBC.lstrip("/"), base, world)}}]}))
    gateway = await make_gateway(world.base_url, **LISTED)
    await _cbc_opens_only_under_our_bases(gateway, base)
    # A search: only what the permit opens is there.
    status, headers, body = await call(gateway, "GET", f"/Observation?subject={c.PAT_BEN}")
    assert status == 200, body
    assert (c.BEN_CBC["id"] in kept(body)) is (base != "other")


@pytest.mark.parametrize("base", ["other", *OUR_BASES])
async def test_a_deny_of_data_on_another_server_closes_what_else_it_names(
    world: FakeFhir, make_gateway: MakeGateway, base: str,
) -> None:
    """Ben opts in but denies a record (not his CBC), named under a base. Under this server's
    bases it closes that record only; on another server what it is cannot be known (it may be
    any of Ben's records, copied there), so the deny closes what its other conditions cover:
    here, everything (fail closed)."""
    world.add(bens({"type": "permit", "provision": [{"type": "deny", "data": [
        {"meaning": "instance", "reference": {"reference": based("Observation/obs-ben-other-9z9", base, world)}}]}]}))
    gateway = await make_gateway(world.base_url, **LISTED)
    await _cbc_opens_only_under_our_bases(gateway, base)


async def test_a_deny_of_an_actor_on_another_server_closes_to_every_requester(
    world: FakeFhir, make_gateway: MakeGateway,
) -> None:
    """Ben opts in but excludes a practitioner of another server: who that is here cannot be
    known (this server under a name not listed, a shared identity), so the deny closes to every
    requester; naming one of ours, it closes to that one only."""
    world.add(bens({"type": "permit", "provision": [{"type": "deny", "actor": [actor(f"{OTHER}/{c.BANNED_DOCTOR}")]}]}))
    gateway = await make_gateway(world.base_url)
    for requester in (c.DOCTOR, c.BANNED_DOCTOR):
        status, headers, body = await call(gateway, "GET", BEN_CBC, actor=requester)
        assert status == 403, (requester, body)
        assert leaks(body, headers, BEN_SECRETS) == []
    world.add(bens({"type": "permit", "provision": [{"type": "deny", "actor": [actor(f"{world.base_url}/{c.BANNED_DOCTOR}")]}]}))
    gateway.state.store.invalidate()
    assert (await call(gateway, "GET", BEN_CBC, actor=c.DOCTOR))[0] == 200
    assert (await call(gateway, "GET", BEN_CBC, actor=c.BANNED_DOCTOR))[0] == 403


async def test_a_consent_about_another_servers_patient_is_no_consent_of_ours(
    world: FakeFhir, make_gateway: MakeGateway,
) -> None:
    """A consent server that answers ``Consent?patient=Patient/ben`` with a permit about another
    server's patient of Ben's id (it matched the id alone) cannot be trusted: 503, never a permit;
    Ana's answers are unaffected."""
    theirs = {**c.opt_in(c.PAT_BEN, "consent-hie-ben"), "patient": {"reference": f"{OTHER}/Patient/{BEN_ID}"}}

    def consents(request: Any) -> Any:
        if BEN_ID in request.query.get("patient", ""):
            return c.bundle([theirs], world.base_url)
        return None

    world.override = routes({("GET", "/Consent"): consents})
    gateway = await make_gateway(world.base_url)
    status, headers, body = await call(gateway, "GET", BEN_CBC)
    assert status == 503, body
    assert leaks(body, headers, BEN_SECRETS) == []
    status, _, body = await call(gateway, "GET", f"/Observation/{c.ANA_CBC['id']}")
    assert status == 200, body


async def test_a_consent_about_our_patient_under_our_base_is_theirs(
    world: FakeFhir, make_gateway: MakeGateway,
) -> None:
    """Control: the same consent naming Ben under the configured upstream base is Ben's."""
    ours = {**c.opt_in(c.PAT_BEN, "consent-own-ben"), "patient": {"reference": f"{world.base_url}/{c.PAT_BEN}"}}
    world.override = routes({("GET", "/Consent"): lambda r: c.bundle([ours], world.base_url)
                             if BEN_ID in r.query.get("patient", "") else None})
    gateway = await make_gateway(world.base_url)
    status, _, body = await call(gateway, "GET", BEN_CBC)
    assert status == 200, body


async def test_an_emergency_window_for_another_servers_practitioner_opens_to_no_one_here(
    world: FakeFhir, make_gateway: MakeGateway,
) -> None:
    """An emergency Consent (written at the server) naming another server's Dr Gomez: our Dr
    Gomez gets nothing without break-glass; naming ours, the window opens to him."""
    now = datetime.now(timezone.utc) - timedelta(minutes=5)
    window = emergency_consent(Actor(c.DOCTOR), c.PAT_BEN, (), "Medical emergency", now, 4)
    theirs = orjson.loads(orjson.dumps({**window, "id": "consent-em-frn"}).replace(
        f'"{c.DOCTOR}"'.encode(), f'"{OTHER}/{c.DOCTOR}"'.encode()))
    world.add(theirs)
    gateway = await make_gateway(world.base_url)
    status, headers, body = await call(gateway, "GET", BEN_CBC)
    assert status == 403, body
    assert leaks(body, headers, BEN_SECRETS) == [] and "X-Break-Glass-Audit-Id" not in headers
    world.add({**window, "id": "consent-em-frn"})
    gateway.state.store.invalidate()
    status, headers, body = await call(gateway, "GET", BEN_CBC)
    assert status == 200 and "X-Break-Glass-Audit-Id" in headers, body


async def test_a_patient_may_not_write_a_consent_about_another_servers_patient(
    world: FakeFhir, make_gateway: MakeGateway,
) -> None:
    """Ana writes her own Consents; one about another server's patient of her id is not hers."""
    gateway = await make_gateway(world.base_url)
    theirs = {**c.opt_out(c.PAT_ANA, "consent-ana-hie"), "patient": {"reference": f"{OTHER}/Patient/{ANA_ID}"}}
    status, _, body = await call(gateway, "POST", "/Consent", actor=c.PAT_ANA, body=theirs)
    assert status == 403, body
    assert not [r for r in world.requests if r.method == "POST" and r.path_qs.split("?")[0].endswith("/Consent")]
    own = {**theirs, "patient": {"reference": f"{world.base_url}/{c.PAT_ANA}"}}
    status, _, body = await call(gateway, "POST", "/Consent", actor=c.PAT_ANA, body=own)
    assert status in (200, 201), body


# ================================================================ includes brought by a withheld match

BUPE = {"resourceType": "Medication", "id": "med-bupe-fb1",
        "code": {"coding": [{"system": c.RXNORM, "code": "1010600", "display": c.BUPRENORPHINE_DISPLAY}]}}
HIDDEN_ORDER = {"resourceType": "MedicationRequest", "id": "mr-bupe-ana-fb1", "status": "active", "intent": "order",
                "subject": {"reference": c.PAT_ANA}, "medicationReference": {"reference": f"Medication/{BUPE['id']}"}}


@pytest.mark.parametrize("base", ["other", "upstream"])
async def test_an_include_brought_by_a_withheld_order_is_not_kept_by_another_servers_reference(
    world: FakeFhir, make_gateway: MakeGateway, base: str,
) -> None:
    """The kept order names another server's ``Medication/med-bupe-fb1``; this server's, included
    only for the withheld buprenorphine order, would say what that order was. Control: under
    this server's base the kept order names ours, which then stays."""
    open_order = {"resourceType": "MedicationRequest", "id": "mr-lisinopril-ana-fb1", "status": "active",
                  "intent": "order", "subject": {"reference": c.PAT_ANA},
                  "medicationCodeableConcept": {"coding": [{"system": c.RXNORM, "code": "314076"}]},
                  "supportingInformation": [{"reference": based(f"Medication/{BUPE['id']}", base, world)}]}
    world.add(BUPE, HIDDEN_ORDER, open_order)
    world.override = routes({("GET", "/MedicationRequest"): lambda r: c.bundle(
        [HIDDEN_ORDER, open_order], world.base_url, include=(BUPE,))})
    gateway = await make_gateway(world.base_url)
    status, headers, body = await call(gateway, "GET", f"/MedicationRequest?patient={c.PAT_ANA}&_include=*")
    assert status == 200, body
    assert open_order["id"] in kept(body) and HIDDEN_ORDER["id"] not in kept(body)
    if base == "other":
        assert BUPE["id"] not in kept(body)
        assert leaks(body, headers, ("1010600", c.BUPRENORPHINE_DISPLAY)) == []
    else:
        assert BUPE["id"] in kept(body)
