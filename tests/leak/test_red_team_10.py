"""Red team 10: write-side and operation doors (placeholder docstring, rewritten below)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from aiohttp import web

from tests.conftest import GatewayUnderTest
from tests.fakes import FakeFhir
from tests.fixtures import clinical as c
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
        if door == "batch":
            assert status == 200, body
            (slot,) = slots(body)
            assert slot["response"]["status"].startswith("403"), slot
            status = 403
    if door != "batch":
        is_outcome(status, headers, body, 403)
    assert writes_sent(world, "Subscription") == [] and not any(r.method == "POST" and r.path_qs == "/fhir/" for r in world.requests if door == "transaction")
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
