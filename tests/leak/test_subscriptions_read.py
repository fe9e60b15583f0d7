"""Reading Subscriptions through the gateway must not tell who watches which patient's records.

A Subscription's ``criteria`` (R4: ``Observation?patient=Patient/ana&code=http://loinc.org|75622-1``;
the R4B backport: filters in extensions of ``_criteria``; R5: ``filterBy``) tell that someone
watches Ana's HIV results as surely as the result itself. A Subscription is decided as the data
of the patients its criteria name, labelled by the codes they name: a general permit does not
show one about HIV records, a doctor Ana's consent excludes sees none about her, and one whose
criteria name a patient in a way the gateway cannot read (by identifier, a chain) is shown to no
one but ``consent.writer_roles``. One naming no patient stays non-patient data.

``Subscription/<id>/$events`` and ``$status`` answers (a Bundle of SubscriptionStatus or
Parameters with ``notificationEvent.focus`` references, event numbers and counts) are refused:
a filtered answer's event numbers and counts would still tell of the withheld events.

Each test searches the RAW response bytes at every door: read, search, POST ``_search``, batch,
history, ``_include``/``_revinclude``.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.fakes import FakeFhir
from tests.fixtures import clinical as c
from tests.leak.test_side_doors import MakeGateway, batch, call, ids_in, leaks, routes, sent_upstream, slots

ANA_ID = c.PAT_ANA.split("/", 1)[1]
BACKPORT_FILTER = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-filter-criteria"
TOPIC = "http://example.org/fhir/SubscriptionTopic/observation-new"
CHANNEL = {"type": "rest-hook", "endpoint": "https://listener.example.org/hook", "payload": "application/fhir+json"}


def subscription(sid: str, criteria: str, **more: Any) -> dict[str, Any]:
    return {"resourceType": "Subscription", "id": sid, "status": "active", "reason": "watch",
            "criteria": criteria, "channel": CHANNEL, **more}


# Ana's HIV results, LOINC with its system.
HIV_RESULTS = subscription("sub-ana-hiv-7c1", f"Observation?patient={c.PAT_ANA}&code=http://loinc.org|75622-1")
# Ana's HIV diagnosis, a bare ICD-10-CM code and a bare id.
HIV_DIAGNOSIS = subscription("sub-ana-b20-2f9", f"Condition?subject={ANA_ID}&code=B20")
# R4B backport: the topic's URL in criteria, the filter in an extension of _criteria.
BACKPORT = subscription("sub-ana-backport-8e2", TOPIC, _criteria={"extension": [
    {"url": BACKPORT_FILTER, "valueString": f"Observation?patient={c.PAT_ANA}&code=http://loinc.org|75622-1"},
]})
# R5: topic and filterBy.
R5 = {"resourceType": "Subscription", "id": "sub-ana-r5-6b4", "status": "active", "topic": TOPIC,
      "filterBy": [
          {"resourceType": "Observation", "filterParameter": "patient", "value": c.PAT_ANA},
          {"resourceType": "Observation", "filterParameter": "code", "value": "http://loinc.org|75622-1"},
      ], "channelType": {"code": "rest-hook"}, "endpoint": CHANNEL["endpoint"]}
# A patient named by identifier: whom it watches cannot be read.
BY_IDENTIFIER = subscription("sub-ana-ident-5d3", "Observation?patient:identifier=http://hospital.example.org|MRN-4471")
# Ana's blood counts: ordinary data, which her consent keeps from Dr Kowalski only.
ANA_CBC = subscription("sub-ana-cbc-4a7", f"Observation?patient={c.PAT_ANA}&code=http://loinc.org|58410-2")
# Anyone's blood counts: no patient named.
ALL_CBC = subscription("sub-all-cbc-1a0", "Observation?code=http://loinc.org|58410-2")

HIDDEN = (HIV_RESULTS, HIV_DIAGNOSIS, BACKPORT, R5, BY_IDENTIFIER)
EVERY = (*HIDDEN, ANA_CBC, ALL_CBC)
SECRETS = (*(s["id"] for s in HIDDEN), "75622-1", "B20", "MRN-4471")
HIM = {"X-Actor-Role": "HIM"}


@pytest.fixture
def world(fake_fhir: FakeFhir) -> FakeFhir:
    c.seed_all(fake_fhir)
    ana_consents = [c.opt_in(c.PAT_ANA), c.not_this_doctor(c.PAT_ANA, c.BANNED_DOCTOR)]
    fake_fhir.add(*ana_consents, *EVERY)
    base = fake_fhir.base_url
    every = list(EVERY)
    fake_fhir.override = routes({
        ("GET", "/Subscription"): lambda r: c.bundle(every, base, self_url=f"{base}/Subscription"),
        ("POST", "/Subscription/_search"): lambda r: c.bundle(every, base, self_url=f"{base}/Subscription"),
        ("GET", "/Patient"): lambda r: c.bundle([c.ANA], base, include=tuple(every)),
        ("GET", f"/Subscription/{HIV_RESULTS['id']}/_history"): lambda r: c.history_bundle([HIV_RESULTS], base),
        ("GET", f"/Subscription/{HIV_RESULTS['id']}/_history/1"): lambda r: HIV_RESULTS,
    })
    return fake_fhir


def doors() -> dict[str, tuple[str, str, Any]]:
    return {
        **{f"read-{s['id']}": ("GET", f"/Subscription/{s['id']}", None) for s in HIDDEN},
        "search": ("GET", "/Subscription?status=active", None),
        # Decided on the whole record, projected after: criteria cut away decide nothing.
        "elements": ("GET", "/Subscription?status=active&_elements=id,status", None),
        "form-search": ("POST", "/Subscription/_search", b"status=active"),
        "batch": ("POST", "/", batch(*(("GET", f"Subscription/{s['id']}") for s in HIDDEN))),
        "batch-search": ("POST", "/", batch(("GET", "Subscription?status=active"))),
        "revinclude": ("GET", f"/Patient?_id={ANA_ID}&_revinclude=Subscription:patient", None),
        "history": ("GET", f"/Subscription/{HIV_RESULTS['id']}/_history", None),
        "vread": ("GET", f"/Subscription/{HIV_RESULTS['id']}/_history/1", None),
    }


@pytest.mark.parametrize("door", list(doors()))
async def test_a_general_permit_does_not_show_who_watches_sensitive_records(
    world: FakeFhir, make_gateway: MakeGateway, door: str,
) -> None:
    gateway = await make_gateway(world.base_url, consent={"writer_roles": ["HIM"]})
    method, path, sent = doors()[door]
    form = {"Content-Type": "application/x-www-form-urlencoded"} if door == "form-search" else {}
    status, headers, body = await call(gateway, method, path, body=sent, **form)
    assert leaks(body, headers, SECRETS) == []
    if door.startswith("read") or door in ("history", "vread"):
        assert status in (403, 404), body
    elif door == "batch":
        assert all(s["response"]["status"][:3] in ("403", "404") for s in slots(body)), body
    else:
        assert status == 200, body
        if door != "revinclude":
            # Ordinary ones stay: Ana's blood counts (her permit opens them) and anyone's.
            shown = ids_in(body) if door != "batch-search" else {
                e["resource"].get("id") for s in slots(body) for e in s.get("resource", {}).get("entry", [])}
            assert {ANA_CBC["id"], ALL_CBC["id"]} <= shown, body


async def test_a_doctor_her_consent_excludes_sees_no_subscription_about_her(
    world: FakeFhir, make_gateway: MakeGateway,
) -> None:
    gateway = await make_gateway(world.base_url)
    status, headers, body = await call(gateway, "GET", "/Subscription?status=active", actor=c.BANNED_DOCTOR)
    assert status == 200, body
    assert leaks(body, headers, (*SECRETS, ANA_CBC["id"], ANA_ID)) == []
    assert ALL_CBC["id"] in ids_in(body)
    status, _, body = await call(gateway, "GET", f"/Subscription/{ANA_CBC['id']}", actor=c.BANNED_DOCTOR)
    assert status in (403, 404) and ANA_CBC["id"].encode() not in body, body
    # The doctor her consent does not exclude reads her ordinary one.
    status, _, body = await call(gateway, "GET", f"/Subscription/{ANA_CBC['id']}")
    assert status == 200 and ANA_CBC["id"].encode() in body, body


@pytest.mark.parametrize("who", ["patient", "writer"])
async def test_the_patient_and_a_consent_writer_read_her_subscriptions(
    world: FakeFhir, make_gateway: MakeGateway, who: str,
) -> None:
    gateway = await make_gateway(world.base_url, consent={"writer_roles": ["HIM"]})
    actor, headers = (c.PAT_ANA, {}) if who == "patient" else (c.DOCTOR, HIM)
    status, _, body = await call(gateway, "GET", "/Subscription?status=active", actor=actor, **headers)
    assert status == 200, body
    hers = {s["id"] for s in (HIV_RESULTS, HIV_DIAGNOSIS, BACKPORT, R5, ANA_CBC)}
    assert hers <= ids_in(body), body
    # Whom an identifier names is unknown: only the writers read that one.
    assert (BY_IDENTIFIER["id"] in ids_in(body)) is (who == "writer"), body


def _notification(fake: FakeFhir, btype: str) -> dict[str, Any]:
    """An ``$events``/``$status`` answer: the status first, then the focus records."""
    sub_ref = f"Subscription/{ALL_CBC['id']}"
    status = {
        "resourceType": "SubscriptionStatus", "status": "active", "type": "query-event",
        "eventsSinceSubscriptionStart": "3", "subscription": {"reference": sub_ref}, "topic": TOPIC,
        "notificationEvent": [
            {"eventNumber": "1", "focus": {"reference": f"Observation/{c.HIV_TEST['id']}"}},
            {"eventNumber": "2", "focus": {"reference": f"Condition/{c.HIV_CONDITION['id']}"}},
            {"eventNumber": "3", "focus": {"reference": f"Observation/{c.ANA_CBC['id']}"}},
        ],
    }
    return {"resourceType": "Bundle", "type": btype, "entry": [
        {"fullUrl": f"{fake.base_url}/SubscriptionStatus/s1", "resource": status},
        {"fullUrl": f"{fake.base_url}/Observation/{c.ANA_CBC['id']}", "resource": c.ANA_CBC},
    ]}


def _parameters_status() -> dict[str, Any]:
    """The R4 backport's shape: Parameters."""
    return {"resourceType": "Parameters", "parameter": [
        {"name": "subscription", "valueReference": {"reference": f"Subscription/{ALL_CBC['id']}"}},
        {"name": "events-since-subscription-start", "valueString": "3"},
        {"name": "notification-event", "part": [
            {"name": "event-number", "valueString": "1"},
            {"name": "focus", "valueReference": {"reference": f"Observation/{c.HIV_TEST['id']}"}},
        ]},
    ]}


@pytest.mark.parametrize("shape", ["history", "subscription-notification", "parameters"])
@pytest.mark.parametrize("operation", ["$events", "$status"])
async def test_subscription_events_do_not_name_withheld_records(
    world: FakeFhir, make_gateway: MakeGateway, shape: str, operation: str,
) -> None:
    answer = _parameters_status() if shape == "parameters" else _notification(world, shape)
    world.override = routes({
        ("GET", f"/Subscription/{ALL_CBC['id']}/{operation}"): lambda r: answer,
        ("POST", f"/Subscription/{ALL_CBC['id']}/{operation}"): lambda r: answer,
    })
    gateway = await make_gateway(world.base_url)
    for method in ("GET", "POST"):
        status, headers, body = await call(gateway, method, f"/Subscription/{ALL_CBC['id']}/{operation}")
        assert leaks(body, headers, (c.HIV_TEST["id"], c.HIV_CONDITION["id"])) == [], body
        assert status == 403, body
    status, _, body = await call(gateway, "POST", "/", body=batch(("GET", f"Subscription/{ALL_CBC['id']}/{operation}")))
    assert leaks(body, None, (c.HIV_TEST["id"], c.HIV_CONDITION["id"])) == [], body
    assert all(s["response"]["status"].startswith("403") for s in slots(body)), body


@pytest.mark.parametrize("mode", [403, 404])
async def test_a_hidden_subscription_is_not_deleted_nor_its_versions_read(
    world: FakeFhir, make_gateway: MakeGateway, mode: int,
) -> None:
    """Nobody changes what he may not see: a delete (200 where a missing one is a 404) would
    tell that it exists; in 404 mode its versions read as a missing record's."""
    gateway = await make_gateway(world.base_url, enforcement={"denied_read_status": mode})
    sid = HIV_RESULTS["id"]
    status, headers, body = await call(gateway, "DELETE", f"/Subscription/{sid}")
    assert status == mode and leaks(body, headers, SECRETS) == [], body
    assert not any(line.startswith("DELETE") for line in sent_upstream(world))
    assert f"Subscription/{sid}" in world.resources
    for path in (f"/Subscription/{sid}/_history", f"/Subscription/{sid}/_history/1"):
        status, headers, body = await call(gateway, "GET", path)
        assert status == mode and leaks(body, headers, SECRETS) == [], body
    # Her ordinary one: the doctor may read it, so he may delete it.
    status, _, body = await call(gateway, "DELETE", f"/Subscription/{ANA_CBC['id']}")
    assert status in (200, 204), body
