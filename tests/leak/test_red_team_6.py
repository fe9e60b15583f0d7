"""Red team, sixth pass: deciding from the facts record (codes, authors and instances join a
resource's record when a consent reads them; the record keys the request's memo and the
decisions shared across requests) and the Enforcer that decides, then applies its verdicts.

Consents with ``code`` conditions, author actors and ``data`` conditions, against answers where
the record could miss what decides: a drug named by ``medicationReference``, a code spelled with
another URI of its system, an informant; the same records decided across consent changes,
requesters, break-glass; on the view path (the conftest runs every test with answers parsed
whole and on views), in batch answers, documents, shadow mode, 404 mode and projections. Every
test searches the raw response bytes and headers (and, where said, logs and /metrics) for what
was hidden.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest

from tests.conftest import GatewayUnderTest
from tests.fakes import FakeFhir
from tests.fixtures import clinical as c
from tests.hidden import hidden_in
from tests.leak.test_red_team_3 import answer, search, searchset, serve
from tests.leak.test_side_doors import call, entries, ids_in, leaks

MakeGateway = Callable[..., Awaitable[GatewayUnderTest]]
RXNORM_OID = "urn:oid:2.16.840.1.113883.6.88"
ICD10CM_OID = "urn:oid:2.16.840.1.113883.6.90"
PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
HTN_CODE = "I10"  # ICD-10-CM, as Ana's record writes it
HTN_ID = c.ANA_HYPERTENSION["id"]
CBC_ID = c.ANA_CBC["id"]
CONDITIONS = f"/Condition?patient={c.PAT_ANA}"
# lisinopril: an ordinary drug (no sensitivity label), so only the code condition can hide it
LISINOPRIL = {"resourceType": "Medication", "id": "med-lis-rt6",
              "code": c.concept(c.RXNORM, "314076", "lisinopril 10 MG Oral Tablet")}
LISINOPRIL_SECRETS = ("314076", "lisinopril", "medrx-lis-rt6", "med-lis-rt6")
HTN_SECRETS = (HTN_CODE, "Essential (primary) hypertension", HTN_ID)


def no_code(subject: str, system: str, code: str, cid: str = "consent-nocode", **more: Any) -> dict[str, Any]:
    """An opt-in with one exception: nothing carrying ``code`` (``more``: further conditions)."""
    return c._consent(cid, subject, "OPTIN", {"type": "permit", "provision": [
        {"type": "deny", "code": [c.concept(system, code, "")], **more}]})


def no_author(subject: str, who: str, role: str = "AUT", cid: str = "consent-noauthor") -> dict[str, Any]:
    return c._consent(cid, subject, "OPTIN", {"type": "permit", "provision": [
        {"type": "deny", "actor": [{"role": c.concept(PARTICIPATION, role, role), "reference": {"reference": who}}]}]})


def no_instance(subject: str, meaning: str, ref: str, cid: str = "consent-noinst") -> dict[str, Any]:
    return c._consent(cid, subject, "OPTIN", {"type": "permit", "provision": [
        {"type": "deny", "data": [{"meaning": meaning, "reference": {"reference": ref}}]}]})


def world_with(fake: FakeFhir, *consents: dict[str, Any]) -> FakeFhir:
    c.seed_all(fake)
    fake.add(*consents)
    return fake


def lisinopril_order(rid: str = "medrx-lis-rt6") -> dict[str, Any]:
    return {"resourceType": "MedicationRequest", "id": rid, "status": "active", "intent": "order",
            "medicationReference": {"reference": f"Medication/{LISINOPRIL['id']}"},
            "subject": {"reference": c.PAT_ANA}, "authoredOn": "2022-06-10", "requester": {"reference": c.DOCTOR}}


async def invalidate(gw: GatewayUnderTest, patient: str) -> None:
    async with gw.session.post(gw.admin_url + "/cache/invalidate", json={"patient": patient}) as resp:
        assert resp.status == 200


def gateway_logs(caplog: pytest.LogCaptureFixture) -> str:
    """The gateway's own log lines with their structured fields (not the fake upstream's)."""
    return "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records if r.name.startswith("gateway"))


async def metrics(gw: GatewayUnderTest) -> str:
    async with gw.session.get(gw.admin_url + "/metrics") as resp:
        return await resp.text()


# ================================================================ 1. what the record must hold


async def test_a_code_consent_hides_orders_naming_the_drug_by_reference(
    fake_fhir: FakeFhir, make_gateway: MakeGateway, caplog: pytest.LogCaptureFixture,
) -> None:
    """Ana: "do not share my lisinopril prescriptions". The order names the drug by
    ``medicationReference``; the Medication comes included beside it (search) or is read from
    the server (read). The order is withheld, its included Medication with it."""
    caplog.set_level(logging.INFO)
    world = world_with(fake_fhir, no_code(c.PAT_ANA, c.RXNORM, "314076"), LISINOPRIL, lisinopril_order())
    raw = orjson.dumps(c.bundle([lisinopril_order(), c.ANA_CBC], world.base_url, include=(LISINOPRIL,)))
    serve(world, {("GET", "/MedicationRequest"): lambda r: answer(raw)})
    gw = await make_gateway(world.base_url)
    path = f"/MedicationRequest?patient={c.PAT_ANA}&_include=MedicationRequest:medication"
    status, headers, body = await search(gw, path)
    assert status == 200, body
    assert ids_in(body) == {CBC_ID}, body[:400]
    assert leaks(body, headers, LISINOPRIL_SECRETS) == []
    status, headers, body = await search(gw, "/MedicationRequest/medrx-lis-rt6")
    assert status == 403, body
    assert leaks(body, headers, LISINOPRIL_SECRETS) == []
    assert hidden_in(await metrics(gw), LISINOPRIL_SECRETS) == []
    # (the order's id is in the path the requester wrote, which the access log keeps)
    assert hidden_in(gateway_logs(caplog), ("314076", "lisinopril", "med-lis-rt6")) == []


async def test_a_code_consent_hides_the_code_spelled_with_its_systems_oid(
    fake_fhir: FakeFhir, make_gateway: MakeGateway,
) -> None:
    """Ana's consent names hypertension in ICD-10-CM by its URI; her EHR writes ICD-10-CM by its
    OID (which the labeler reads as ICD-10-CM too): the record is withheld."""
    world = world_with(fake_fhir, no_code(c.PAT_ANA, c.ICD10CM, HTN_CODE))
    oid_htn = orjson.loads(orjson.dumps(c.ANA_HYPERTENSION).replace(c.ICD10CM.encode(), ICD10CM_OID.encode()))
    raw = orjson.dumps(searchset([oid_htn, c.ANA_CBC], world.base_url))
    serve(world, {("GET", "/Condition"): lambda r: answer(raw)})
    gw = await make_gateway(world.base_url)
    status, headers, body = await search(gw, CONDITIONS)
    assert status == 200, body
    assert ids_in(body) == {CBC_ID}, body[:400]
    assert leaks(body, headers, HTN_SECRETS) == []


async def test_an_informant_consent_hides_what_the_informant_told(
    fake_fhir: FakeFhir, make_gateway: MakeGateway,
) -> None:
    """Ana: nothing her psychiatrist reported (INF) is shared; a MedicationStatement whose
    ``informationSource`` is the psychiatrist is withheld, one reported by her GP is kept."""
    world = world_with(fake_fhir, no_author(c.PAT_ANA, c.PSYCHIATRIST, "INF"))
    told = {"resourceType": "MedicationStatement", "id": "ms-told-rt6", "status": "active",
            "subject": {"reference": c.PAT_ANA}, "informationSource": {"reference": c.PSYCHIATRIST},
            "medicationCodeableConcept": LISINOPRIL["code"]}
    other = {**told, "id": "ms-gp-rt6", "informationSource": {"reference": c.DOCTOR}}
    raw = orjson.dumps(searchset([told, other], world.base_url))
    serve(world, {("GET", "/MedicationStatement"): lambda r: answer(raw)})
    gw = await make_gateway(world.base_url)
    status, headers, body = await search(gw, f"/MedicationStatement?patient={c.PAT_ANA}")
    assert status == 200, body
    assert ids_in(body) == {"ms-gp-rt6"}, body[:400]
    assert leaks(body, headers, ("ms-told-rt6",)) == []


async def test_a_code_consent_hides_codes_in_contained_resources_and_extensions(
    fake_fhir: FakeFhir, make_gateway: MakeGateway,
) -> None:
    """Hypertension carried only by a contained Observation, or only by an extension: both
    withheld (no view holds them: the view path steps aside), total gone, outcome entry added."""
    world = world_with(fake_fhir, no_code(c.PAT_ANA, c.ICD10CM, HTN_CODE))
    inner = {"resourceType": "Observation", "id": "bp", "status": "final", "code": c.ANA_HYPERTENSION["code"]}
    contained = {**c.ANA_CBC, "id": "obs-cont-rt6", "contained": [inner]}
    extended = {**c.ANA_CBC, "id": "obs-ext-rt6",
                "extension": [{"url": "http://example.org/reason", "valueCodeableConcept": c.ANA_HYPERTENSION["code"]}]}
    raw = orjson.dumps(searchset([contained, extended, c.ANA_CBC], world.base_url))
    serve(world, {("GET", "/Observation"): lambda r: answer(raw)})
    gw = await make_gateway(world.base_url)
    status, headers, body = await search(gw)
    assert status == 200, body
    assert ids_in(body) == {CBC_ID}, body[:400]
    parsed = orjson.loads(body)
    assert "total" not in parsed
    assert parsed["entry"][-1]["search"]["mode"] == "outcome"
    assert leaks(body, headers, ("obs-cont-rt6", "obs-ext-rt6", HTN_CODE)) == []


async def test_a_code_consent_hides_a_coding_written_without_its_system(
    fake_fhir: FakeFhir, make_gateway: MakeGateway,
) -> None:
    """The code in a ``valueCoding`` without a system (R4: system 0..1): a deny naming the code
    covers it, as it covers one in a ``coding`` list."""
    world = world_with(fake_fhir, no_code(c.PAT_ANA, c.ICD10CM, HTN_CODE))
    bare = {**c.ANA_CBC, "id": "obs-bare-rt6",
            "extension": [{"url": "http://example.org/reason", "valueCoding": {"code": HTN_CODE}}]}
    raw = orjson.dumps(searchset([bare, c.ANA_CBC], world.base_url))
    serve(world, {("GET", "/Observation"): lambda r: answer(raw)})
    gw = await make_gateway(world.base_url)
    status, headers, body = await search(gw)
    assert status == 200, body
    assert ids_in(body) == {CBC_ID}, body[:400]
    assert leaks(body, headers, ("obs-bare-rt6",)) == []


async def test_one_order_text_is_decided_by_the_drug_each_answer_includes(
    fake_fhir: FakeFhir, make_gateway: MakeGateway,
) -> None:
    """The order's entry is byte-identical in every answer; the Medication it names, included
    beside it, is lisinopril in one answer and another drug in the next: the order is withheld
    with lisinopril, kept with the other, whatever the memos and the shared decisions hold."""
    world = world_with(fake_fhir, no_code(c.PAT_ANA, c.RXNORM, "314076"))
    served = [b""]
    serve(world, {("GET", "/MedicationRequest"): lambda r: answer(served[0])})
    gw = await make_gateway(world.base_url)
    other = {"resourceType": "Medication", "id": LISINOPRIL["id"],
             "code": c.concept(c.RXNORM, "197361", "amlodipine 5 MG Oral Tablet")}
    path = f"/MedicationRequest?patient={c.PAT_ANA}&_include=MedicationRequest:medication"
    for closed in (True, False, True, False, False, True):
        served[0] = orjson.dumps(c.bundle([lisinopril_order(), c.ANA_CBC], world.base_url,
                                          include=(LISINOPRIL if closed else other,)))
        status, headers, body = await search(gw, path)
        assert status == 200, body
        expected = {CBC_ID} if closed else {CBC_ID, "medrx-lis-rt6", LISINOPRIL["id"]}
        assert ids_in(body) == expected, (closed, body[:300])
        if closed:
            assert leaks(body, headers, LISINOPRIL_SECRETS) == []


@pytest.mark.parametrize("how", ["author", "data-authoredby", "data-instance-url", "data-dependents-versioned"])
async def test_author_and_instance_consents_decide_on_both_paths(
    fake_fhir: FakeFhir, make_gateway: MakeGateway, how: str,
) -> None:
    """Author actors and ``data`` conditions (instances named by absolute, versioned URLs) read
    what no view holds: the view path falls back to whole resources and decides alike."""
    consent = {
        "author": no_author(c.PAT_ANA, c.PSYCHIATRIST),
        "data-authoredby": no_instance(c.PAT_ANA, "authoredby", c.PSYCHIATRIST),
        "data-instance-url": no_instance(c.PAT_ANA, "instance", "http://fhir.example/fhir/Observation/obs-a-rt6/_history/4"),
        "data-dependents-versioned": no_instance(c.PAT_ANA, "dependents", "Condition/cond-root-rt6/_history/1"),
    }[how]
    world = world_with(fake_fhir, consent)
    hidden = {**c.ANA_CBC, "id": "obs-a-rt6", "performer": [{"reference": f"http://fhir.example/fhir/{c.PSYCHIATRIST}"}],
              "derivedFrom": [{"reference": "http://fhir.example/fhir/Condition/cond-root-rt6/_history/2"}]}
    raw = orjson.dumps(searchset([hidden, c.ANA_CBC], world.base_url))
    serve(world, {("GET", "/Observation"): lambda r: answer(raw)})
    # http://fhir.example/fhir is this server's external name (another server's would be unknown).
    gw = await make_gateway(world.base_url, upstream={"reference_bases": ["http://fhir.example/fhir"]})
    for _ in range(2):
        status, headers, body = await search(gw)
        assert status == 200, body
        assert ids_in(body) == {CBC_ID}, (how, body[:400])
        assert leaks(body, headers, ("obs-a-rt6",)) == []


# ================================================================ 2. decisions shared across requests


async def test_a_code_decision_follows_the_consent_as_it_changes(
    fake_fhir: FakeFhir, make_gateway: MakeGateway,
) -> None:
    """The same answer, read while Ana's consent closes hypertension, after she reopens it, and
    after she closes it again: each time decided under the consent of the moment."""
    world = world_with(fake_fhir)
    raw = orjson.dumps(searchset([c.ANA_HYPERTENSION, c.ANA_CBC], world.base_url))
    serve(world, {("GET", "/Condition"): lambda r: answer(raw)})
    gw = await make_gateway(world.base_url)
    for closed in (True, True, False, False, True, True):
        world.add(no_code(c.PAT_ANA, c.ICD10CM, HTN_CODE, cid="consent-optin") if closed else c.opt_in(c.PAT_ANA))
        await invalidate(gw, c.PAT_ANA)
        status, headers, body = await search(gw, CONDITIONS)
        assert status == 200, body
        assert ids_in(body) == ({CBC_ID} if closed else {CBC_ID, HTN_ID}), (closed, body[:300])
        if closed:
            assert leaks(body, headers, HTN_SECRETS) == []


async def test_a_code_decision_is_each_requesters_and_purposes_own(
    fake_fhir: FakeFhir, make_gateway: MakeGateway,
) -> None:
    """Hypertension closed to one doctor only, and only for payment: the same record read in
    turn by that doctor for payment, by him for treatment, by another doctor for payment."""
    closed = c._consent("consent-optin", c.PAT_ANA, "OPTIN", {"type": "permit", "provision": [{
        "type": "deny", "code": [c.concept(c.ICD10CM, HTN_CODE, "")],
        "actor": [{"role": c.concept(PARTICIPATION, "PRCP", "PRCP"), "reference": {"reference": c.BANNED_DOCTOR}}],
        "purpose": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "HPAYMT"}]}]})
    world = world_with(fake_fhir, closed)
    raw = orjson.dumps(searchset([c.ANA_HYPERTENSION, c.ANA_CBC], world.base_url))
    serve(world, {("GET", "/Condition"): lambda r: answer(raw)})
    gw = await make_gateway(world.base_url)
    both = {CBC_ID, HTN_ID}
    for actor, purpose, expected in ((c.BANNED_DOCTOR, "HPAYMT", {CBC_ID}), (c.BANNED_DOCTOR, "TREAT", both),
                                     (c.DOCTOR, "HPAYMT", both), (c.BANNED_DOCTOR, "HPAYMT", {CBC_ID})):
        status, headers, body = await search(gw, CONDITIONS, actor=actor, **{"X-Purpose-Of-Use": purpose})
        assert status == 200, body
        assert ids_in(body) == expected, (actor, purpose)


async def test_break_glass_over_a_code_decision_is_audited_and_never_reused(
    fake_fhir: FakeFhir, make_gateway: MakeGateway,
) -> None:
    world = world_with(fake_fhir, no_code(c.PAT_ANA, c.ICD10CM, HTN_CODE))
    raw = orjson.dumps(searchset([c.ANA_HYPERTENSION, c.ANA_CBC], world.base_url))
    serve(world, {("GET", "/Condition"): lambda r: answer(raw)})
    gw = await make_gateway(world.base_url, break_glass={"record_consent": False})
    status, headers, body = await search(gw, CONDITIONS)
    assert ids_in(body) == {CBC_ID}
    status, headers, body = await search(gw, CONDITIONS, **{"X-Break-Glass": "Medical emergency"})
    assert status == 200 and ids_in(body) == {CBC_ID, HTN_ID} and headers.get("X-Break-Glass-Audit-Id"), body[:300]
    status, headers, body = await search(gw, CONDITIONS)
    assert status == 200 and ids_in(body) == {CBC_ID} and "X-Break-Glass-Audit-Id" not in headers
    assert leaks(body, headers, HTN_SECRETS) == []


# ================================================================ 3. every answer shape


@pytest.mark.parametrize("status_mode", [403, 404])
async def test_a_code_consent_in_batch_answers_and_reads(
    fake_fhir: FakeFhir, make_gateway: MakeGateway, status_mode: int,
) -> None:
    """A batch reading the hidden record and searching: its slot reads like a refused (or, in 404
    mode, a missing) read; the read alone too; no outcome entry or total tells in 404 mode."""
    world = world_with(fake_fhir, no_code(c.PAT_ANA, c.ICD10CM, HTN_CODE))
    gw = await make_gateway(world.base_url, enforcement={"denied_read_status": status_mode})
    batch = {"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": f"Condition/{HTN_ID}"}},
        {"request": {"method": "GET", "url": f"Condition/cond-missing-rt6"}},
        {"request": {"method": "GET", "url": CONDITIONS.lstrip("/")}},
    ]}
    status, headers, body = await call(gw, "POST", "/", body=batch)
    assert status == 200, body
    slots = orjson.loads(body)["entry"]
    assert slots[0]["response"]["status"].startswith(str(status_mode)), slots[0]
    if status_mode == 404:
        assert slots[0] == slots[1]
    assert leaks(body, headers, HTN_SECRETS) == [], body[:600]
    status, headers, body = await search(gw, f"/Condition/{HTN_ID}")
    assert status == status_mode, body
    assert leaks(body, headers, HTN_SECRETS) == []
    status, headers, body = await search(gw, CONDITIONS)
    assert status == 200 and HTN_ID not in ids_in(body)
    if status_mode == 404:
        assert b"suppressed" not in body and b'"total"' not in body
    assert leaks(body, headers, HTN_SECRETS) == []


async def test_a_document_listing_a_code_withheld_record_loses_it(
    fake_fhir: FakeFhir, make_gateway: MakeGateway,
) -> None:
    world = world_with(fake_fhir, no_code(c.PAT_ANA, c.ICD10CM, HTN_CODE))
    narrative = "<div xmlns=\"http://www.w3.org/1999/xhtml\">Essential hypertension, on lisinopril</div>"
    comp = {"resourceType": "Composition", "id": "comp-rt6", "status": "final",
            "type": c.concept(c.LOINC, "60591-5", "Patient summary Document"), "subject": {"reference": c.PAT_ANA},
            "date": "2024-07-01T10:00:00Z", "author": [{"reference": c.DOCTOR}], "title": "Summary",
            "text": {"status": "generated", "div": narrative},
            "section": [{"title": "Problems", "text": {"status": "generated", "div": narrative},
                         "entry": [{"reference": f"Condition/{HTN_ID}"}, {"reference": f"Observation/{CBC_ID}"}]}]}
    doc = {"resourceType": "Bundle", "id": "doc-rt6", "type": "document", "entry": [
        {"fullUrl": f"http://fhir.example/fhir/{r['resourceType']}/{r['id']}", "resource": r}
        for r in (comp, c.ANA_HYPERTENSION, c.ANA_CBC)]}
    serve(world, {("GET", "/Bundle/doc-rt6"): lambda r: answer(orjson.dumps(doc))})
    gw = await make_gateway(world.base_url)
    status, headers, body = await search(gw, "/Bundle/doc-rt6")
    assert status == 200, body
    assert ids_in(body) == {"comp-rt6", CBC_ID}, body[:400]
    assert leaks(body, headers, (*HTN_SECRETS, "hypertension")) == []


async def test_shadow_mode_decides_a_code_consent_and_passes_the_answer(
    fake_fhir: FakeFhir, make_gateway: MakeGateway,
) -> None:
    world = world_with(fake_fhir, no_code(c.PAT_ANA, c.ICD10CM, HTN_CODE))
    raw = orjson.dumps(searchset([c.ANA_HYPERTENSION, c.ANA_CBC], world.base_url))
    serve(world, {("GET", "/Condition"): lambda r: answer(raw)})
    gw = await make_gateway(world.base_url, enforcement={"mode": "shadow"})
    status, headers, body = await search(gw, CONDITIONS)
    assert status == 200 and ids_in(body) == {CBC_ID, HTN_ID}
    assert headers.get("X-Consent-Decision-Shadow") == "filtered", headers
    assert hidden_in(await metrics(gw), HTN_SECRETS) == []


@pytest.mark.parametrize("projection", ["_elements=id,subject", "_summary=true"])
async def test_a_projection_never_hides_the_code_a_consent_reads(
    fake_fhir: FakeFhir, make_gateway: MakeGateway, projection: str,
) -> None:
    """``_elements=id,subject`` would drop the code the consent names: the gateway asks the
    upstream for whole resources, decides, then projects."""
    world = world_with(fake_fhir, no_code(c.PAT_ANA, c.ICD10CM, HTN_CODE))
    gw = await make_gateway(world.base_url)
    status, headers, body = await search(gw, f"{CONDITIONS}&{projection}")
    assert status == 200, body
    assert HTN_ID not in ids_in(body)
    assert leaks(body, headers, HTN_SECRETS) == []


async def test_history_of_an_instance_a_data_consent_names_hides_every_version(
    fake_fhir: FakeFhir, make_gateway: MakeGateway,
) -> None:
    world = world_with(fake_fhir, no_instance(c.PAT_ANA, "instance", f"Condition/{HTN_ID}/_history/1"))
    versions = [{**c.ANA_HYPERTENSION, "meta": {"versionId": str(v)}} for v in (3, 2, 1)]
    serve(world, {("GET", f"/Condition/{HTN_ID}/_history"):
                  lambda r: answer(orjson.dumps(c.history_bundle(versions, world.base_url)))})
    gw = await make_gateway(world.base_url)
    status, headers, body = await search(gw, f"/Condition/{HTN_ID}/_history")
    assert status == 403, body
    assert leaks(body, headers, HTN_SECRETS) == []
    status, headers, body = await search(gw, CONDITIONS)
    assert status == 200 and HTN_ID not in ids_in(body), body[:300]
    assert leaks(body, headers, HTN_SECRETS) == []


@pytest.mark.parametrize("status_mode", [403, 404])
async def test_a_permit_of_one_version_releases_that_version_only(
    fake_fhir: FakeFhir, make_gateway: MakeGateway, status_mode: int,
) -> None:
    """An opt-out whose one exception permits ``Condition/<id>/_history/1``: the history and the
    version reads give version 1 only; version 2, whose note names what the patient shared
    later, is never sent. In 404 mode the record's current version is hidden, so the record
    reads as missing, its first version and history too (red team 9: versions of a record that
    reads as missing would say it is there)."""
    secret = "later: HIV positive, started on Biktarvy"
    consent = c._consent("consent-v1", c.PAT_ANA, "OPTOUT", {"type": "deny", "provision": [
        {"type": "permit", "data": [{"meaning": "instance",
                                     "reference": {"reference": f"Condition/{HTN_ID}/_history/1"}}]}]})
    world = world_with(fake_fhir, consent)
    v1 = {**c.ANA_HYPERTENSION, "meta": {"versionId": "1"}}
    v2 = {**c.ANA_HYPERTENSION, "meta": {"versionId": "2"}, "note": [{"text": secret}]}
    serve(world, {
        ("GET", f"/Condition/{HTN_ID}/_history"): lambda r: answer(orjson.dumps(c.history_bundle([v2, v1], world.base_url))),
        ("GET", f"/Condition/{HTN_ID}/_history/1"): lambda r: answer(orjson.dumps(v1)),
        ("GET", f"/Condition/{HTN_ID}/_history/2"): lambda r: answer(orjson.dumps(v2)),
    })
    gw = await make_gateway(world.base_url, enforcement={"denied_read_status": status_mode})
    status, headers, body = await search(gw, f"/Condition/{HTN_ID}/_history/2")
    assert status == status_mode and leaks(body, headers, (secret, "Biktarvy")) == []
    if status_mode == 404:
        for path in (f"/Condition/{HTN_ID}/_history/1", f"/Condition/{HTN_ID}/_history"):
            status, headers, body = await search(gw, path)
            assert status == 404 and leaks(body, headers, (secret, "Biktarvy", HTN_ID)) == [], body
        return
    status, headers, body = await search(gw, f"/Condition/{HTN_ID}/_history/1")
    assert status == 200, body
    status, headers, body = await search(gw, f"/Condition/{HTN_ID}/_history")
    assert status == 200 and leaks(body, headers, (secret, "Biktarvy")) == []
    assert [e["resource"]["meta"]["versionId"] for e in entries(body) if "resource" in e
            and e["resource"].get("resourceType") == "Condition"] == ["1"]


async def test_withheld_counts_and_logs_name_no_record(
    fake_fhir: FakeFhir, make_gateway: MakeGateway, caplog: pytest.LogCaptureFixture,
) -> None:
    """What the code consent withheld is counted by type and reason only, logged by consent and
    provision only."""
    caplog.set_level(logging.INFO)
    world = world_with(fake_fhir, no_code(c.PAT_ANA, c.ICD10CM, HTN_CODE))
    gw = await make_gateway(world.base_url)
    for _ in range(2):
        status, headers, body = await search(gw, CONDITIONS)
        assert status == 200 and HTN_ID not in ids_in(body)
    text = await metrics(gw)
    assert 'consent_gateway_resources_filtered_total{reason="consent",resource_type="Condition"} 2.0' in text
    assert hidden_in(text, HTN_SECRETS) == []
    assert hidden_in(gateway_logs(caplog), HTN_SECRETS) == []
    assert [e for e in entries(body) if e.get("search", {}).get("mode") == "outcome"]


@pytest.mark.parametrize("where", ["judging", "owners_index", "with_roles"])
async def test_an_error_while_deciding_sends_no_data(
    fake_fhir: FakeFhir, make_gateway: MakeGateway, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    where: str,
) -> None:
    """A defect while deciding: the facts of the second record cannot be read (``judging``), or
    indexing the answer's patients or reading the roles that decide fails. The answer is a 503
    that names nothing (fail closed, as when consents cannot be read), never a 500, the first
    record alone, nor the answer as the upstream sent it."""
    caplog.set_level(logging.INFO)
    import gateway.core.judge as judge_module
    import gateway.web.enforcement as enforcement_module

    real = judge_module.authors_of

    def failing_authors(resource: dict[str, Any], roles: Any = judge_module.NO_ROLES) -> frozenset[str]:
        if resource.get("id") == HTN_ID:
            raise RuntimeError(f"facts of Condition/{HTN_ID} could not be read")  # a message quoting the record
        return real(resource, roles)

    def failing(*args: object, **kwargs: object) -> object:
        raise RuntimeError(f"Condition/{HTN_ID} could not be read")  # a message quoting the record

    async def failing_roles(*args: object, **kwargs: object) -> object:
        return failing()

    if where == "judging":
        monkeypatch.setattr(judge_module, "authors_of", failing_authors)
    elif where == "owners_index":
        monkeypatch.setattr(enforcement_module, "owners_index", failing)
    else:
        monkeypatch.setattr(enforcement_module.ConsentEnforcement, "with_roles", failing_roles)
    world = world_with(fake_fhir, no_author(c.PAT_ANA, c.PSYCHIATRIST))
    raw = orjson.dumps(searchset([c.ANA_CBC, c.ANA_HYPERTENSION], world.base_url))
    serve(world, {("GET", "/Condition"): lambda r: answer(raw)})
    gw = await make_gateway(world.base_url)
    status, headers, body = await search(gw, CONDITIONS)
    assert status == 503, (status, body)
    assert orjson.loads(body)["resourceType"] == "OperationOutcome"
    assert leaks(body, headers, (*HTN_SECRETS, CBC_ID, "58410-2")) == []
    assert hidden_in(gateway_logs(caplog), (*HTN_SECRETS, CBC_ID)) == []


async def test_counts_and_everything_under_a_code_consent(
    fake_fhir: FakeFhir, make_gateway: MakeGateway,
) -> None:
    """A count cannot be filtered: refused while a code consent may hide something. ``$everything``
    is decided entry by entry: hypertension withheld, no total."""
    world = world_with(fake_fhir, no_code(c.PAT_ANA, c.ICD10CM, HTN_CODE))
    everything = c.bundle([c.ANA, c.ANA_HYPERTENSION, c.ANA_CBC], world.base_url)
    serve(world, {("GET", f"/Patient/{c.PAT_ANA.split('/')[1]}/$everything"): lambda r: answer(orjson.dumps(everything))})
    gw = await make_gateway(world.base_url)
    status, headers, body = await search(gw, f"{CONDITIONS}&_summary=count")
    assert status == 403, body
    assert b'"total"' not in body
    status, headers, body = await search(gw, f"/{c.PAT_ANA}/$everything")
    assert status == 200, body
    assert ids_in(body) == {c.PAT_ANA.split("/")[1], CBC_ID}, body[:300]
    assert b'"total"' not in body
    assert leaks(body, headers, HTN_SECRETS) == []


@pytest.mark.parametrize("holder", ["Bundle", "Parameters"])
async def test_records_inside_a_contained_bundle_or_parameters_are_decided(
    fake_fhir: FakeFhir, make_gateway: MakeGateway, holder: str,
) -> None:
    """An upstream (compromised, or buggy) smuggles Ana's hidden records inside a contained Bundle
    or Parameters of an ordinary CBC: her HIV record (a label), her hypertension (a data instance
    her consent names). The records inside are decided like any other: the CBC goes with them."""
    closed = c._consent("consent-optin", c.PAT_ANA, "OPTIN", {"type": "permit", "provision": [
        {"type": "deny", "data": [{"meaning": "instance", "reference": {"reference": f"Condition/{HTN_ID}"}}]}]})
    world = world_with(fake_fhir, closed)
    smuggled = []
    for rid, record in (("obs-hiv-rt6", c.HIV_CONDITION), ("obs-htn-rt6", c.ANA_HYPERTENSION)):
        inner: dict[str, Any] = (
            {"resourceType": "Bundle", "id": "held", "type": "collection", "entry": [{"resource": record}]}
            if holder == "Bundle" else
            {"resourceType": "Parameters", "id": "held", "parameter": [{"name": "record", "resource": record}]})
        smuggled.append({**c.ANA_CBC, "id": rid, "contained": [inner]})
    raw = orjson.dumps(searchset([*smuggled, c.ANA_CBC], world.base_url))
    serve(world, {("GET", "/Observation"): lambda r: answer(raw)})
    gw = await make_gateway(world.base_url)
    status, headers, body = await search(gw)
    assert status == 200, body
    assert ids_in(body) == {CBC_ID}, body[:400]
    assert leaks(body, headers, (*HTN_SECRETS, "B20", "Human immunodeficiency virus", "obs-hiv-rt6", "obs-htn-rt6")) == []
