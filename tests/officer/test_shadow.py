"""Shadow mode: every answer passes unfiltered, decided exactly as enforce mode decides it."""

from __future__ import annotations

import logging
from typing import Any

import orjson
import pytest

from gateway.demo.server import DemoFhirServer, demo_server
from tests.fakes import FakeFhir
from tests.unit._util import MakeGateway

# (requester, path, extra headers): permits, filtered searches, denials, 404s, refusals.
REQUESTS: list[tuple[str, str, dict[str, str]]] = [
    ("Practitioner/dr-gp", "/Observation/alice-cbc", {}),
    ("Practitioner/dr-gp", "/Condition?patient=pat-bob", {}),
    ("Practitioner/dr-gp", "/Condition?patient=pat-alice", {}),
    ("Practitioner/dr-psych", "/Condition?patient=pat-alice", {}),
    ("Practitioner/dr-jones", "/Observation/bob-cbc", {}),
    ("Practitioner/dr-gp", "/Observation/carol-cbc", {}),
    ("Practitioner/dr-gp", "/Observation/bob-hiv-test", {}),
    ("Practitioner/dr-gp", "/Patient/pat-bob/$everything", {}),
    ("Practitioner/dr-gp", "/MedicationRequest?patient=pat-bob", {}),
    ("Practitioner/dr-gp", "/DocumentReference?patient=pat-dana", {}),
    ("Practitioner/dr-gp", "/Observation/no-such-record", {}),
    ("Practitioner/dr-gp", "/Observation?patient=pat-carol&_summary=count", {}),
    ("Patient/pat-bob", "/Condition?patient=pat-bob", {}),
    ("Practitioner/dr-gp", "/Observation?status=final", {}),
]


async def _ask(gw: Any, actor: str, path: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    async with gw.session.get(gw.url + "/fhir" + path, headers={"X-Actor": actor, **headers}) as resp:
        return resp.status, dict(resp.headers), await resp.read()


def _strip(body: Any) -> Any:
    """An answer without what the gateway itself adds to released data (DS4P) or rewrites (URLs)."""
    if isinstance(body, dict):
        return {k: _strip(v) for k, v in body.items() if k not in ("meta", "fullUrl", "link")}
    if isinstance(body, list):
        return [_strip(v) for v in body]
    return body


async def test_shadow_decisions_equal_enforced_ones(
    demo_fhir: DemoFhirServer, make_gateway: MakeGateway, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.decision")
    enforcing = await make_gateway(demo_fhir.base_url)
    shadow = await make_gateway(demo_fhir.base_url, enforcement={"mode": "shadow"})
    expected: dict[str, int] = {}
    for actor, path, headers in REQUESTS:
        e_status, e_headers, _ = await _ask(enforcing, actor, path, headers)
        s_status, s_headers, s_body = await _ask(shadow, actor, path, headers)
        enforced = e_headers["X-Consent-Decision"]
        assert s_headers["X-Consent-Decision-Shadow"] == enforced, (actor, path)
        assert "X-Consent-Decision-Shadow" not in e_headers
        expected[enforced] = expected.get(enforced, 0) + 1
        async with shadow.session.get(demo_fhir.base_url + path) as direct:
            direct_status, direct_body = direct.status, await direct.read()
        if e_status == 403 and path.endswith("_summary=count"):
            continue  # the demo server ignores _summary; the shadow answer is its own
        if direct_status == 200:
            # Unfiltered: the shadow answer holds everything the FHIR server sent.
            assert s_status == 200, (actor, path)
            assert _strip(orjson.loads(s_body)) == _strip(orjson.loads(direct_body)), (actor, path)
    assert set(expected) == {"permit", "filtered", "deny"}, "the requests must cover every decision"
    for decision, count in expected.items():
        assert shadow.metric("consent_gateway_shadow_decisions_total", {"decision": decision}) == count
        # Nothing was withheld in shadow mode.
        assert shadow.metric("consent_gateway_decisions_total", {"decision": "deny"}) <= expected.get("deny", 0)
    assert shadow.metric("consent_gateway_decisions_total", {"decision": "filtered"}) == 0
    lines = [r for r in caplog.records if r.name == "gateway.decision" and r.getMessage() == "decision"]
    shadow_lines = [r for r in lines if getattr(r, "mode", None) == "shadow"]
    assert len(shadow_lines) == len(REQUESTS)
    assert [getattr(r, "shadow") for r in shadow_lines] == [
        getattr(r, "decision") for r in lines if getattr(r, "mode", None) == "enforce"
    ]


async def test_shadow_answer_keeps_the_bytes_of_unlabelled_data(demo_fhir: DemoFhirServer, make_gateway: MakeGateway) -> None:
    shadow = await make_gateway(demo_fhir.base_url, enforcement={"mode": "shadow"})
    status, headers, body = await _ask(shadow, "Practitioner/dr-jones", "/Observation/bob-cbc", {})
    assert status == 200
    assert headers["X-Consent-Decision"] == "permit"
    assert headers["X-Consent-Decision-Shadow"] == "deny"
    assert body == orjson.dumps(demo_fhir.resources["Observation/bob-cbc"])


async def test_enforce_mode_is_the_default(demo_fhir: DemoFhirServer, make_gateway: MakeGateway) -> None:
    gw = await make_gateway(demo_fhir.base_url)
    assert gw.state.settings.enforcement.mode == "enforce"
    status, headers, _ = await _ask(gw, "Practitioner/dr-jones", "/Observation/bob-cbc", {})
    assert status == 403
    assert "X-Consent-Decision-Shadow" not in headers


BATCH = {
    "resourceType": "Bundle", "type": "batch",
    "entry": [
        {"request": {"method": "GET", "url": "Observation/alice-cbc"}},
        {"request": {"method": "GET", "url": "Observation?patient=pat-carol&_summary=count"}},  # refused alone
        {"request": {"method": "GET", "url": "Condition?patient=pat-bob"}},
    ],
}


async def _batch(gw: Any, body: dict[str, Any]) -> tuple[str, dict[str, str], dict[str, Any]]:
    async with gw.session.post(gw.url + "/fhir", data=orjson.dumps(body),
                               headers={"X-Actor": "Practitioner/dr-gp", "Content-Type": "application/fhir+json"}) as resp:
        assert resp.status == 200, await resp.text()
        return resp.headers["X-Consent-Decision"], dict(resp.headers), orjson.loads(await resp.read())


@pytest.mark.parametrize("entries", [[0, 1, 2], [1]])
async def test_shadow_batch_sends_refused_reads_and_decides_like_enforce(
    fake_fhir: FakeFhir, make_gateway: MakeGateway, entries: list[int]
) -> None:
    fake_fhir.add(*demo_server().resources.values())
    body = {**BATCH, "entry": [BATCH["entry"][i] for i in entries]}
    enforcing = await make_gateway(fake_fhir.base_url)
    shadow = await make_gateway(fake_fhir.base_url, enforcement={"mode": "shadow"})
    enforced, _, enforced_body = await _batch(enforcing, body)
    actual, headers, shadow_body = await _batch(shadow, body)
    assert headers["X-Consent-Decision-Shadow"] == enforced
    assert actual == "permit"
    refused = entries.index(1)
    # Enforce mode answers the refused read in its slot; shadow mode sent it.
    assert "resource" not in enforced_body["entry"][refused]
    assert shadow_body["entry"][refused]["resource"]["resourceType"] == "Bundle"
    if 2 in entries:
        bob = shadow_body["entry"][entries.index(2)]["resource"]
        assert {e["resource"]["id"] for e in bob["entry"]} >= {"bob-hiv", "bob-oud"}
