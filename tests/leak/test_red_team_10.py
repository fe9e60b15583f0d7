"""Red team 10: the write side and operations. The attacker is an authenticated clinician (or
patient) whom the consents exclude; he writes, and then reads or lets the server send.

Holes found and closed here (each test below fails on the code before this pass):

1. Subscriptions: ``POST Subscription`` with ``criteria: Condition?code=B20`` and a rest-hook
   endpoint of the attacker's passed (201). The server then pushes every new HIV record to that
   endpoint, around the gateway, and goes on after any consent is revoked (a websocket channel
   or ``$get-ws-binding-token`` does the same to a listener). A Subscription create, update or
   patch is now refused (403), alone or in a batch/transaction, except a patient's own whose
   criteria name only herself (self access, which no consent revokes); the binding token is
   refused; a delete passes.
2. What decides other records, rewritten: an order naming its drug by reference is labelled by
   that Medication (read from the server). ``PUT Medication/<bup>`` with lisinopril's code (or
   ``PUT`` of the missing drug an order names, which closes it) made the hidden opioid-use
   orders read 200 at once (the gateway evicts the drug it cached on the write). Likewise
   ``PUT PractitionerRole/<kowalski's role>`` handing it to another doctor releases what the
   excluded doctor wrote through it. An update of a Medication, Substance or PractitionerRole
   must now leave its deciding part as it is (core.deciding); patch, update-as-create and
   ``$meta-delete`` of them are refused. (``test_role_authors_and_ingredients`` handed a role
   over through the gateway to show it is read afresh; it now deletes it there instead.)
3. Team membership: Ana opens her HIV records to her CareTeam; Dr Gomez (general access, may
   read the CareTeam) added himself as a participant with ``PUT CareTeam/<id>`` and read her HIV
   diagnosis. Adding members to a Group or CareTeam (update that adds one, patch) is now for
   ``consent.writer_roles`` and the patient of her own CareTeam. (A Group of practitioners
   already held: it is withheld from him, so his update of it was refused.)
4. ``$populatehtml``, ``$populatelink`` (R4/SDC Questionnaire) and ``$prepopulate``
   (cqf-ruler): ``$populate`` was refused, its siblings were sent to the server, which runs them
   (an HTML answer is then a 502; a ``Parameters`` holding the link would pass). Refused like
   ``$populate``.
5. Writes with an empty search: ``DELETE Condition`` (no query), ``PUT``/``PATCH`` likewise and
   ``PUT``/``PATCH``/``DELETE`` at the base passed unchecked; a server that runs a conditional
   delete matching everything removed Ana's hidden records and its 200 OperationOutcome, whose
   texts were passed for every 2xx answer, named them ("Successfully deleted 7 resource(s):
   Condition/cond-hiv-b20-91a, ..."). They are conditional writes now (refused unless every named
   patient permits outright: none is named), and a write's OperationOutcome keeps only its
   severities and codes.
6. A patient's conditional write (let through: self access) reached a record she shares with
   Ben, who opted out: she may not read it (CONTRACT §5: every patient of a record must permit),
   yet ``DELETE Condition?patient=<Ana>`` deleted it. The gateway now runs the search first and
   refuses when a match is withheld (or does not fit one page, or the search fails).
7. 404 mode: an instance operation (``$validate``, ``$meta-add``, ``$meta-delete``) on a record
   that does not exist was sent, and a server that runs it anyway (``$validate`` of the body, or
   the fake's create) answered otherwise than the 404 of a hidden one. It is now answered as the
   hidden one's, unsent (as red team 9 did for update/patch/delete).

Tried and held (tests in section 7, or earlier passes' as named):
- Conditional create ``If-None-Exist`` naming a hidden record, conditional update/patch/delete
  ``Type?query`` (refused unless every named patient permits outright: no 412 "multiple matches"
  counts hidden ones; test_side_doors), alone and as batch/transaction entries (``ifNoneExist``,
  entry URLs with a query), conditional references in written resources and transaction entries
  (refused: test_side_doors).
- ``If-Match``/``If-None-Match``/``If-Modified-Since`` on writes to hidden ids (the target is
  decided before the write is sent), and stripped from reads and batch read entries (red team 8).
- A write answered with a stored record the writer may not read (``Prefer: return=representation``,
  server defaults): informational outcome, no ``Location``/``ETag``/``Last-Modified``/
  ``Content-Location``. Instance ``$validate``/``$meta``/``$meta-add``/``$meta-delete`` on a hidden
  id: refused before sending (404 mode: same bytes as a missing id's). History after a write:
  instance history decided per version (red team 9).
- ``$export`` at every level and ``$process-message`` (refused); a bulk status URL's manifest (no
  FHIR resource: refused, never passed); message, document and collection Bundles posted to the
  base (400, not sent); ``PUT``/``PATCH``/``DELETE`` of the base (now refused, item 5).

Found and left open:
- Subscriptions already stored (made at the server or before this pass) keep pushing; the
  gateway cannot stop what the server sends elsewhere. (Reading Subscriptions, left open here,
  is decided since: a Subscription is its criteria's patients' data, labelled by their codes,
  and ``$events``/``$status`` are refused; test_subscriptions_read.)
- A patient's conditional create (``If-None-Exist`` naming herself) that matches a record she
  shares with someone who does not permit her is answered 200 (the withheld match, as an
  informational outcome) where no match is a 201; item 6's refusal is the same kind of answer.
  Either says that a record of hers exists that she may not read; nothing of it is shown or
  changed (a create changes nothing when it matches).
- Changes to what decides records, made at the FHIR server directly (a pharmacy system), are
  trusted as before; only changes through the gateway are checked. Group/CareTeam membership by
  characteristic, or a member named by identifier only, is read as the server's ``member`` /
  ``participant`` search answers it.
- Servers that check references on write, or resolve them in ``$validate``, answer a write naming
  a hidden id otherwise than one naming a missing id (red team 9's note stands; a write's 2xx
  outcome texts are now scrubbed, its 4xx ones already were, but the status differs).

Each test searches the RAW response bytes and headers for the hidden ids, codes and texts.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from aiohttp import web

from tests.conftest import GatewayUnderTest
from tests.fakes import FakeFhir
from tests.fixtures import clinical as c
from tests.leak.test_role_authors_and_ingredients import BY_KOWALSKI, NOT_KOWALSKI, ROLE_GOMEZ, ROLE_KOWALSKI
from tests.leak.test_side_doors import (
    BUPNAL_MEDICATION, LISINOPRIL, MakeGateway, batch, call, entry_requests, is_outcome, leaks, med_request, routes,
    slots,
)

ANA_ID = c.PAT_ANA.split("/", 1)[1]
HIV_ID = c.HIV_CONDITION["id"]
HIV_SECRETS = (HIV_ID, "B20", "86406008", "Human immunodeficiency", "HIV disease")
FHIR_JSON = "application/fhir+json"


def writes_sent(fake: FakeFhir, rtype: str) -> list[str]:
    """Requests other than reads that reached the FHIR server for ``rtype`` (alone or as batch entries)."""
    return [f"{r.method} {r.path_qs}" for r in fake.requests
            if r.method not in ("GET", "HEAD") and r.path_qs.startswith(f"/fhir/{rtype}")]


def refused(status: int, headers: dict[str, str], body: bytes, door: str) -> None:
    """A 403 outcome, or (``door`` batch) a 200 whose one slot is a 403."""
    if door == "batch":
        assert status == 200, body
        (slot,) = slots(body)
        assert slot["response"]["status"].startswith("403"), slot
    else:
        is_outcome(status, headers, body, 403)


@pytest.fixture
def world(fake_fhir: FakeFhir) -> FakeFhir:
    """Ana's and Ben's records; both hold a general opt-in (sensitive data stays closed)."""
    c.seed_all(fake_fhir)
    fake_fhir.add(c.opt_in(c.PAT_ANA), c.opt_in(c.PAT_BEN, "consent-ben-in"))
    return fake_fhir


# ================================================================ 1. Subscriptions

HOOK = "https://collector.example.net/hook"


def subscription(criteria: str, sid: str | None = None) -> dict[str, Any]:
    sub: dict[str, Any] = {
        "resourceType": "Subscription", "status": "requested", "reason": "results feed",
        "criteria": criteria,
        "channel": {"type": "rest-hook", "endpoint": HOOK, "payload": "application/fhir+json"},
    }
    if sid is not None:
        sub["id"] = sid
    return sub


@pytest.mark.parametrize("door", ["create", "update", "batch", "transaction"])
async def test_a_subscription_cannot_make_the_server_push_hidden_records(
    world: FakeFhir, gateway: GatewayUnderTest, door: str,
) -> None:
    sub = subscription("Condition?code=B20")
    if door == "create":
        status, headers, body = await call(gateway, "POST", "/Subscription", body=sub)
    elif door == "update":
        status, headers, body = await call(gateway, "PUT", "/Subscription/sub-feed-1", body={**sub, "id": "sub-feed-1"})
    else:
        status, headers, body = await call(gateway, "POST", "/", body=batch(("POST", "Subscription", sub), kind=door))
    refused(status, headers, body, door)
    assert writes_sent(world, "Subscription") == []
    assert not any(r.method == "POST" and r.path_qs == "/fhir/" for r in world.requests)
    assert not any(k.startswith("Subscription/") for k in world.resources)


async def test_only_a_patients_own_subscription_passes(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    """Self access is the one grant no consent revokes: Ana may subscribe to her own records;
    not to Ben's, not to everyone's, not by a topic the gateway cannot read; a clinician never
    (a consent he holds today may be revoked tomorrow, the push would go on)."""
    own = subscription(f"Observation?patient={c.PAT_ANA}")
    status, _, body = await call(gateway, "POST", "/Subscription", actor=c.PAT_ANA, body=own)
    assert status == 201, body
    refused = [
        (c.PAT_ANA, subscription(f"Observation?patient={c.PAT_BEN}")),
        (c.PAT_ANA, subscription("Observation?code=20447-9")),
        (c.PAT_ANA, {**own, "criteria": "http://example.org/SubscriptionTopic/new-results",
                     "_criteria": {"extension": [{"url": "http://hl7.org/fhir/uv/subscriptions-backport/"
                                                         "StructureDefinition/backport-filter-criteria",
                                                  "valueString": f"Observation?patient={c.PAT_ANA}"}]}}),
        (c.DOCTOR, own),
    ]
    for actor, sub in refused:
        status, headers, body = await call(gateway, "POST", "/Subscription", actor=actor, body=sub)
        is_outcome(status, headers, body, 403)
    assert writes_sent(world, "Subscription") == ["POST /fhir/Subscription"]


async def test_a_subscription_is_not_patched_or_listened_to_around_the_gateway(
    world: FakeFhir, gateway: GatewayUnderTest,
) -> None:
    """A patch cannot be judged by its result (it could widen the criteria); a websocket binding
    token receives the notifications of any Subscription. Deleting one stops a push and passes."""
    world.add({**subscription(f"Observation?patient={c.PAT_ANA}"), "id": "sub-ana-own-3f1"})
    patch = [{"op": "replace", "path": "/criteria", "value": "Condition?code=B20"}]
    status, headers, body = await call(gateway, "PATCH", "/Subscription/sub-ana-own-3f1", actor=c.PAT_ANA,
                                       body=patch, **{"Content-Type": "application/json-patch+json"})
    is_outcome(status, headers, body, 403)
    status, headers, body = await call(gateway, "GET", "/Subscription/sub-ana-own-3f1/$get-ws-binding-token")
    is_outcome(status, headers, body, 403)
    assert writes_sent(world, "Subscription") == []
    assert not any("$get-ws-binding-token" in r.path_qs for r in world.requests)
    status, _, body = await call(gateway, "DELETE", "/Subscription/sub-ana-own-3f1", actor=c.PAT_ANA)
    assert status == 200, body


# ================================================================ 2. what decides other records

ORDER = med_request("medrx-bupnal-ref-8d2", f"Medication/{BUPNAL_MEDICATION['id']}")
ORDER_OF_A_MISSING_DRUG = med_request("medrx-gone-drug-5e7", "Medication/med-not-yet-here-9c1")
ORDER_SECRETS = (ORDER["id"], ORDER_OF_A_MISSING_DRUG["id"], "1010600", "buprenorphine", "Sublingual",
                 "One film under the tongue")
RELABELLED = {**BUPNAL_MEDICATION, "code": LISINOPRIL["code"], "form": c.concept(c.SNOMED, "421026006", "Oral tablet")}


@pytest.fixture
def pharmacy(world: FakeFhir) -> FakeFhir:
    world.add(BUPNAL_MEDICATION, ORDER, ORDER_OF_A_MISSING_DRUG)
    return world


async def orders_closed(gateway: GatewayUnderTest) -> None:
    for order in (ORDER, ORDER_OF_A_MISSING_DRUG):
        status, headers, body = await call(gateway, "GET", f"/MedicationRequest/{order['id']}")
        assert status == 403, body
        assert leaks(body, headers, ORDER_SECRETS) == []


@pytest.mark.parametrize("door", ["update", "batch", "transaction", "update-as-create", "patch"])
async def test_a_drug_is_not_rewritten_to_release_the_orders_naming_it(
    pharmacy: FakeFhir, gateway: GatewayUnderTest, door: str,
) -> None:
    """An opioid-use order names its drug by reference; the drug decides it (CONTRACT §6). A
    clinician who may not see the order rewrites the drug as lisinopril (or gives the missing
    drug an order names a harmless code), and the order would read as a blood-pressure pill."""
    await orders_closed(gateway)
    med_url = f"Medication/{BUPNAL_MEDICATION['id']}"
    if door == "update":
        status, headers, body = await call(gateway, "PUT", f"/{med_url}", body=RELABELLED)
    elif door == "update-as-create":
        status, headers, body = await call(gateway, "PUT", "/Medication/med-not-yet-here-9c1",
                                           body={**LISINOPRIL, "id": "med-not-yet-here-9c1"})
    elif door == "patch":
        status, headers, body = await call(gateway, "PATCH", f"/{med_url}", body=[
            {"op": "replace", "path": "/code", "value": LISINOPRIL["code"]}],
            **{"Content-Type": "application/json-patch+json"})
    else:
        status, headers, body = await call(gateway, "POST", "/", body=batch(("PUT", med_url, RELABELLED), kind=door))
    refused(status, headers, body, door)
    assert writes_sent(pharmacy, "Medication") == []
    assert pharmacy.resources[med_url] == BUPNAL_MEDICATION
    await orders_closed(gateway)


async def test_a_drug_may_still_be_created_and_changed_where_nothing_decides(
    pharmacy: FakeFhir, gateway: GatewayUnderTest,
) -> None:
    """What does not decide an order passes: a new drug (the server names it), a change of
    anything but its codes and ingredients, a delete (an order naming a missing drug closes)."""
    status, _, body = await call(gateway, "POST", "/Medication", body={k: v for k, v in LISINOPRIL.items() if k != "id"})
    assert status == 201, body
    med_url = f"Medication/{BUPNAL_MEDICATION['id']}"
    status, _, body = await call(gateway, "PUT", f"/{med_url}", body={**BUPNAL_MEDICATION, "status": "inactive"})
    assert status == 200, body
    await orders_closed(gateway)
    status, _, body = await call(gateway, "DELETE", f"/{med_url}")
    assert status == 200, body
    await orders_closed(gateway)


@pytest.mark.parametrize("operation", ["$meta-delete", "$META-DELETE"])
async def test_a_drugs_security_labels_are_not_deleted_by_an_operation(
    pharmacy: FakeFhir, gateway: GatewayUnderTest, operation: str,
) -> None:
    params = {"resourceType": "Parameters", "parameter": [{"name": "meta", "valueMeta": {"security": [
        {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPIOIDUD"}]}}]}
    status, headers, body = await call(gateway, "POST", f"/Medication/{BUPNAL_MEDICATION['id']}/{operation}", body=params)
    is_outcome(status, headers, body, 403)
    assert not any(operation in r.path_qs for r in pharmacy.requests)


@pytest.fixture
def roles(fake_fhir: FakeFhir) -> FakeFhir:
    """Ana: "everyone but Dr Kowalski"; her migraine was recorded through his neurology role."""
    c.seed_all(fake_fhir)
    fake_fhir.add(NOT_KOWALSKI, c.opt_in(c.PAT_BEN, "consent-ben-in"), ROLE_KOWALSKI, ROLE_GOMEZ, BY_KOWALSKI)
    return fake_fhir


@pytest.mark.parametrize("door", ["update", "transaction", "patch", "update-as-create"])
async def test_a_role_is_not_handed_over_to_release_what_was_written_through_it(
    roles: FakeFhir, gateway: GatewayUnderTest, door: str,
) -> None:
    """Dr Kowalski's role handed to Dr Gomez: what Kowalski wrote through it would read as
    Gomez's, and open to everyone Ana's consent lets in."""
    role_url = f"PractitionerRole/{ROLE_KOWALSKI['id']}"
    handed = {**ROLE_KOWALSKI, "practitioner": {"reference": c.DOCTOR}}
    secrets = (BY_KOWALSKI["id"], "Hemiplegic", "Migraine")
    status, headers, body = await call(gateway, "GET", f"/Condition/{BY_KOWALSKI['id']}")
    assert status == 403, body
    if door == "update":
        status, headers, body = await call(gateway, "PUT", f"/{role_url}", body=handed)
    elif door == "transaction":
        status, headers, body = await call(gateway, "POST", "/", body=batch(("PUT", role_url, handed), kind=door))
    elif door == "patch":
        status, headers, body = await call(gateway, "PATCH", f"/{role_url}", body=[
            {"op": "replace", "path": "/practitioner/reference", "value": c.DOCTOR}],
            **{"Content-Type": "application/json-patch+json"})
    else:
        roles.resources.pop(role_url)  # a role deleted when its doctor left: the author is unknown
        status, headers, body = await call(gateway, "PUT", f"/{role_url}", body=handed)
    is_outcome(status, headers, body, 403)
    assert writes_sent(roles, "PractitionerRole") == [] and not any(r.path_qs == "/fhir/" for r in roles.requests)
    status, headers, body = await call(gateway, "GET", f"/Condition/{BY_KOWALSKI['id']}")
    assert status == 403, body
    assert leaks(body, headers, secrets) == []
    # What does not decide (a phone number) still changes.
    status, _, body = await call(gateway, "PUT", f"/PractitionerRole/{ROLE_GOMEZ['id']}",
                                 body={**ROLE_GOMEZ, "telecom": [{"system": "phone", "value": "+1 555 0100"}]})
    assert status == 200, body


# ================================================================ 3. who belongs to a group a consent names

HIV_TEAM = {
    "resourceType": "Group", "id": "grp-hiv-clinic-team-6b2", "type": "practitioner", "actual": True,
    "name": "Infectious disease clinic", "member": [{"entity": {"reference": c.PSYCHIATRIST}}],
}
CARE_TEAM = {
    "resourceType": "CareTeam", "id": "ct-ana-hiv-care-2d8", "status": "active",
    "subject": {"reference": c.PAT_ANA}, "name": "Ana's care team",
    "participant": [{"member": {"reference": c.PSYCHIATRIST}}],
}


def opening_to(team: str) -> dict[str, Any]:
    """Ana's general opt-in, and her HIV records for the members of ``team`` only."""
    consent = c.opt_in(c.PAT_ANA)
    consent["provision"]["provision"] = [{
        "type": "permit", "actor": [{"role": c.concept("http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                                                       "PRCP", "primary information recipient"),
                                     "reference": {"reference": team}}],
        "securityLabel": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "HIV"}],
    }]
    return consent


def _members(fake: FakeFhir, rtype: str) -> Any:
    def answer(request: web.Request) -> Any:
        who = request.query.get("member") or request.query.get("participant")
        found = [r for key, r in fake.resources.items() if key.startswith(f"{rtype}/") and (who is None or who in orjson.dumps(
            r.get("member") or r.get("participant") or []).decode())]
        return fake.bundle(found, f"{fake.base_url}/{rtype}")
    return answer


@pytest.fixture
def teams(fake_fhir: FakeFhir) -> FakeFhir:
    c.seed_all(fake_fhir)
    fake_fhir.add(HIV_TEAM, CARE_TEAM, c.opt_in(c.PAT_BEN, "consent-ben-in"))
    fake_fhir.override = routes({("GET", "/Group"): _members(fake_fhir, "Group"),
                                 ("GET", "/CareTeam"): _members(fake_fhir, "CareTeam")})
    return fake_fhir


def joined(team: dict[str, Any], who: str) -> dict[str, Any]:
    if team["resourceType"] == "Group":
        return {**team, "member": [*team["member"], {"entity": {"reference": who}}]}
    return {**team, "participant": [*team["participant"], {"member": {"reference": who}}]}


async def hiv_closed_to_doctor(gateway: GatewayUnderTest) -> None:
    async with gateway.session.post(f"{gateway.admin_url}/cache/invalidate", json={}) as resp:
        assert resp.status == 200  # memberships are kept like consents: read them afresh
    status, headers, body = await call(gateway, "GET", f"/Condition/{HIV_ID}")
    assert status == 403, body
    assert leaks(body, headers, HIV_SECRETS) == []


@pytest.mark.parametrize("team", [HIV_TEAM, CARE_TEAM], ids=["group", "care-team"])
@pytest.mark.parametrize("door", ["update", "batch", "patch", "update-as-create"])
async def test_a_clinician_does_not_join_the_team_a_consent_opens_to(
    teams: FakeFhir, gateway: GatewayUnderTest, team: dict[str, Any], door: str,
) -> None:
    """Ana opens her HIV records to one team. Dr Gomez (general access only) adds himself to it
    and would read them: membership is part of the consent, and only who may write consents
    changes it (removing members closes, and passes)."""
    url = f"{team['resourceType']}/{team['id']}"
    teams.add(opening_to(url))
    status, _, body = await call(gateway, "GET", f"/Condition/{HIV_ID}", actor=c.PSYCHIATRIST)
    assert status == 200, body  # the team's member reads them
    await hiv_closed_to_doctor(gateway)
    bigger = joined(team, c.DOCTOR)
    if door == "update":
        status, headers, body = await call(gateway, "PUT", f"/{url}", body=bigger)
    elif door == "batch":
        status, headers, body = await call(gateway, "POST", "/", body=batch(("PUT", url, bigger)))
        assert status == 200, body
        (slot,) = slots(body)
        assert slot["response"]["status"].startswith("403"), slot
        status = 403
    elif door == "patch":
        key, value = ("member", {"entity": {"reference": c.DOCTOR}}) if team["resourceType"] == "Group" else (
            "participant", {"member": {"reference": c.DOCTOR}})
        status, headers, body = await call(gateway, "PATCH", f"/{url}", body=[{"op": "add", "path": f"/{key}/-", "value": value}],
                                           **{"Content-Type": "application/json-patch+json"})
    else:
        teams.resources.pop(url)  # a team the consent names that the server does not hold (yet)
        status, headers, body = await call(gateway, "PUT", f"/{url}", body=bigger)
    if door != "batch":
        is_outcome(status, headers, body, 403)
    assert writes_sent(teams, team["resourceType"]) == []
    await hiv_closed_to_doctor(gateway)


async def test_teams_are_still_made_and_members_removed(teams: FakeFhir, make_gateway: MakeGateway) -> None:
    """A new team (the server names it: no consent names it yet), a team left as big as it was,
    a member removed: nothing opens. A consent writer adds members; the patient to his own team."""
    gateway = await make_gateway(teams.base_url, consent={"writer_roles": ["CONSENTER"], "change_poll_s": 0})
    teams.add(opening_to(f"CareTeam/{CARE_TEAM['id']}"))
    url = f"/CareTeam/{CARE_TEAM['id']}"
    status, _, body = await call(gateway, "POST", "/CareTeam", body={k: v for k, v in joined(CARE_TEAM, c.DOCTOR).items() if k != "id"})
    assert status == 201, body
    status, _, body = await call(gateway, "PUT", url, body={**CARE_TEAM, "name": "Ana's team"})
    assert status == 200, body
    status, _, body = await call(gateway, "PUT", url, body={**CARE_TEAM, "participant": []})
    assert status == 200, body
    status, _, body = await call(gateway, "PUT", url, actor=c.PAT_ANA, body=CARE_TEAM)
    assert status == 200, body  # Ana lets her psychiatrist back in
    status, _, body = await call(gateway, "PUT", url, actor=c.PAT_BEN, body=joined(CARE_TEAM, c.PAT_BEN))
    assert status == 403, body  # not Ben's team
    status, _, body = await call(gateway, "PUT", url, actor=c.PSYCHIATRIST, body=joined(CARE_TEAM, c.DOCTOR),
                                 **{"X-Actor-Role": "CONSENTER"})
    assert status == 200, body


# ================================================================ 4. operations computed over records


@pytest.mark.parametrize("operation", ["$populatehtml", "$populatelink", "$prepopulate"])
@pytest.mark.parametrize("how", ["GET", "POST-form", "batch"])
async def test_a_form_prefilled_from_hidden_records_is_refused(
    world: FakeFhir, gateway: GatewayUnderTest, operation: str, how: str,
) -> None:
    """A form prefilled from what the server knows of Ana (an HIV questionnaire answered from her
    records), as HTML or as a link to a page outside the gateway: made of no resource the
    gateway could withhold, so refused like $populate."""
    world.override = routes({("GET", f"/Questionnaire/q-hiv-intake-1/{operation}"): lambda r: web.Response(
        text="<html>HIV disease since 2021 (B20)</html>", content_type="text/html")})
    path = f"/Questionnaire/q-hiv-intake-1/{operation}"
    if how == "GET":
        status, headers, body = await call(gateway, "GET", f"{path}?subject={c.PAT_ANA}")
    elif how == "POST-form":
        status, headers, body = await call(gateway, "POST", path, body=f"subject={c.PAT_ANA}".encode(),
                                           **{"Content-Type": "application/x-www-form-urlencoded"})
    else:
        status, headers, body = await call(gateway, "POST", "/", body=batch(("GET", f"{path.lstrip('/')}?subject={c.PAT_ANA}")))
        assert status == 200, body
        (slot,) = slots(body)
        assert slot["response"]["status"].startswith("403"), slot
        status = 403
    if how != "batch":
        is_outcome(status, headers, body, 403)
    assert leaks(body, headers, HIV_SECRETS) == []
    assert not any(operation in r.path_qs for r in world.requests)


# ================================================================ 5. writes with an empty search


def _delete_every(fake: FakeFhir, rtype: str) -> Any:
    """A server that reads a type-level delete as a conditional delete matching everything, and
    says how many it removed (HAPI FHIR's text)."""
    def answer(request: web.Request) -> Any:
        gone = [k for k in fake.resources if k.startswith(f"{rtype}/")]
        for key in gone:
            fake.resources.pop(key)
        return {"resourceType": "OperationOutcome", "issue": [{"severity": "information", "code": "informational",
                "diagnostics": f"Successfully deleted {len(gone)} resource(s): {', '.join(gone)}"}]}
    return answer


@pytest.mark.parametrize("method,path", [("DELETE", "/Condition"), ("PUT", "/Condition"), ("PATCH", "/Condition"),
                                         ("DELETE", "/"), ("PUT", "/"), ("PATCH", "/")])
async def test_a_write_by_an_empty_search_is_refused(
    world: FakeFhir, gateway: GatewayUnderTest, method: str, path: str,
) -> None:
    """``DELETE Condition`` (no query) is a conditional delete whose search matches every
    record: a server that runs it removes Ana's hidden HIV record and counts (or names) what it
    removed; a write to the base is no FHIR interaction at all."""
    world.override = routes({(method, path): _delete_every(world, "Condition")})
    body = [{"op": "replace", "path": "/status", "value": "x"}] if method == "PATCH" else (
        {**c.HIV_CONDITION, "code": c.ANA_HYPERTENSION["code"]} if method == "PUT" else None)
    headers = {"Content-Type": "application/json-patch+json"} if method == "PATCH" else {}
    status, got, answer = await call(gateway, method, path, body=body, **headers)
    is_outcome(status, got, answer, 403)
    assert leaks(answer, got, HIV_SECRETS) == []
    assert f"Condition/{HIV_ID}" in world.resources and not any(r.method == method for r in world.requests)


# ================================================================ 6. a patient's conditional writes

# Ana's record that Ben asserted (a relative's report): in both compartments, so both decide it.
JOINT = {**c.condition("cond-joint-htn-asserted-7f3", c.PAT_ANA, c.ANA_HYPERTENSION["code"], "2020-02-02"),
         "asserter": {"reference": c.PAT_BEN}, "note": [{"text": "Reported by Ben Okafor at the family visit"}]}
JOINT_SECRETS = (JOINT["id"], "Reported by Ben", "family visit")


def _conditional(fake: FakeFhir) -> Any:
    """A server that runs a conditional delete/update by ``patient`` and names what it changed."""
    def answer(request: web.Request) -> Any:
        patient = request.query.get("patient", "")
        hit = [k for k, r in fake.resources.items() if k.startswith("Condition/") and orjson.dumps(r).find(patient.encode()) >= 0]
        if request.method == "DELETE":
            for key in hit:
                fake.resources.pop(key)
        return {"resourceType": "OperationOutcome", "issue": [{"severity": "information", "code": "informational",
                "diagnostics": f"Successfully changed {len(hit)} resource(s): {', '.join(hit)}"}]}
    return answer


@pytest.fixture
def joint(fake_fhir: FakeFhir) -> FakeFhir:
    c.seed_all(fake_fhir)
    fake_fhir.add(c.opt_in(c.PAT_ANA), c.opt_out(c.PAT_BEN, "consent-ben-out"), JOINT)
    fake_fhir.override = routes({("DELETE", "/Condition"): _conditional(fake_fhir),
                                 ("PATCH", "/Condition"): _conditional(fake_fhir)})
    return fake_fhir


@pytest.mark.parametrize("method", ["DELETE", "PATCH"])
async def test_a_patients_conditional_write_does_not_reach_a_record_she_may_not_read(
    joint: FakeFhir, gateway: GatewayUnderTest, method: str,
) -> None:
    """Ana may write her own records by a search (self access), but the record Ben asserted is
    his too, and Ben opted out: she does not read it, so her search does not change it."""
    status, _, body = await call(gateway, "GET", f"/Condition/{JOINT['id']}", actor=c.PAT_ANA)
    assert status == 403, body
    path = f"/Condition?patient={c.PAT_ANA}"
    patch = [{"op": "add", "path": "/note/-", "value": {"text": "reviewed"}}]
    status, headers, body = await call(gateway, method, path, actor=c.PAT_ANA, body=patch if method == "PATCH" else None,
                                       **({"Content-Type": "application/json-patch+json"} if method == "PATCH" else {}))
    is_outcome(status, headers, body, 403)
    assert leaks(body, headers, JOINT_SECRETS) == []
    assert f"Condition/{JOINT['id']}" in joint.resources and not any(r.method == method for r in joint.requests)


async def test_a_patients_conditional_delete_of_her_own_records_passes_and_names_nothing(
    joint: FakeFhir, gateway: GatewayUnderTest,
) -> None:
    """Without a shared record in the way the write goes through; the server's text (it names
    what it changed) is not passed, only its codes."""
    joint.resources.pop(f"Condition/{JOINT['id']}")
    status, _, body = await call(gateway, "DELETE", f"/Condition?patient={c.PAT_ANA}", actor=c.PAT_ANA)
    assert status == 200, body
    outcome = orjson.loads(body)
    assert outcome["issue"] == [{"severity": "information", "code": "informational",
                                 "diagnostics": "The request was processed."}]
    assert not any(k.startswith("Condition/") and c.PAT_ANA in orjson.dumps(r).decode() for k, r in joint.resources.items())


# ================================================================ 7. doors that held (kept as tests)

MISSING_ID = "cond-nothing-here-rt10"


@pytest.mark.parametrize("operation", ["$validate", "$meta-add", "$meta-delete", "$meta"])
async def test_404_mode_an_operation_on_a_hidden_id_answers_like_one_on_a_missing_id(
    world: FakeFhir, make_gateway: MakeGateway, operation: str,
) -> None:
    gateway = await make_gateway(world.base_url, enforcement={"denied_read_status": 404})
    params = {"resourceType": "Parameters", "parameter": [{"name": "meta", "valueMeta": {"tag": [{"code": "x"}]}}]}
    hidden = await call(gateway, "POST", f"/Condition/{HIV_ID}/{operation}", body=params)
    missing = await call(gateway, "POST", f"/Condition/{MISSING_ID}/{operation}", body=params)
    assert hidden[0] == missing[0] == 404, hidden
    assert hidden[2] == missing[2]
    assert leaks(hidden[2], hidden[1], HIV_SECRETS) == []
    assert not any(HIV_ID in r.path_qs and operation in r.path_qs for r in world.requests)


async def test_a_write_answered_with_a_record_its_writer_may_not_read_names_nothing(
    world: FakeFhir, gateway: GatewayUnderTest,
) -> None:
    """Dr Gomez records an HIV diagnosis for Ana (he knows what he wrote): the stored record,
    with whatever the server added, is not shown, nor its address, version or time."""
    new = {k: v for k, v in c.HIV_CONDITION.items() if k != "id"}
    status, headers, body = await call(gateway, "POST", "/Condition", body=new, Prefer="return=representation")
    assert status == 201, body
    assert orjson.loads(body)["resourceType"] == "OperationOutcome"
    assert not {"Location", "ETag", "Last-Modified", "Content-Location"} & set(headers)
    assert leaks(body, headers, ("new", "B20", "Human immunodeficiency")) == []


async def test_a_bulk_status_answer_is_not_passed(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    """$export is refused; an export another client started is polled at a URL the server
    chose. Its manifest is no FHIR resource the gateway can decide: refused, never passed."""
    manifest = {"transactionTime": "2024-01-01T00:00:00Z", "request": f"{world.base_url}/$export",
                "output": [{"type": "Condition", "url": f"{world.base_url}/Binary/export-condition-{HIV_ID}"}]}
    world.override = routes({("GET", "/$export-poll-status"): lambda r: web.json_response(manifest)})
    status, headers, body = await call(gateway, "GET", "/$export-poll-status?_jobId=0f3c")
    assert status in (403, 502), body
    assert leaks(body, headers, HIV_SECRETS) == []
    for path in ("/$export", "/Patient/$export", f"/Group/grp-1/$export?_type=Condition"):
        status, headers, body = await call(gateway, "GET", path)
        is_outcome(status, headers, body, 403)


async def test_a_message_or_document_bundle_at_the_base_is_not_processed(world: FakeFhir, gateway: GatewayUnderTest) -> None:
    for kind in ("message", "document", "collection"):
        bundle = {"resourceType": "Bundle", "type": kind, "entry": [{"resource": {**c.HIV_CONDITION, "id": "x1"}}]}
        status, headers, body = await call(gateway, "POST", "/", body=bundle)
        is_outcome(status, headers, body, 400)
    status, headers, body = await call(gateway, "POST", "/$process-message", body={"resourceType": "Bundle", "type": "message"})
    is_outcome(status, headers, body, 403)
    assert not any(r.method == "POST" for r in world.requests)


async def test_a_consent_writer_role_corrects_a_drug(pharmacy: FakeFhir, make_gateway: MakeGateway) -> None:
    """Who may rewrite any Consent (``consent.writer_roles``) may open anything already: a drug's
    correction by that role passes; the same write by another role does not."""
    gateway = await make_gateway(pharmacy.base_url, consent={"writer_roles": ["CONSENTER"], "change_poll_s": 0})
    med_url = f"/Medication/{BUPNAL_MEDICATION['id']}"
    status, headers, body = await call(gateway, "PUT", med_url, body=RELABELLED, **{"X-Actor-Role": "PRCP"})
    is_outcome(status, headers, body, 403)
    status, _, body = await call(gateway, "PUT", med_url, body=RELABELLED, **{"X-Actor-Role": "CONSENTER"})
    assert status == 200, body
    assert writes_sent(pharmacy, "Medication") == [f"PUT /fhir{med_url}"]
