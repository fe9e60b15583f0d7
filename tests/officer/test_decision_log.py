"""The decision log: one line per request, what went out and what was withheld, never ids or codes."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from gateway.demo.server import DemoFhirServer
from gateway.web.middleware import JsonLogFormatter
from tests.unit._util import MakeGateway


def _lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "gateway.decision" and r.getMessage() == "decision"]


async def _get(gw: Any, actor: str, path: str) -> int:
    async with gw.session.get(gw.url + "/fhir" + path, headers={"X-Actor": actor}) as resp:
        await resp.read()
        return resp.status


async def test_one_line_per_request_with_counts_and_consent_versions(
    demo_fhir: DemoFhirServer, make_gateway: MakeGateway, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.decision")
    gw = await make_gateway(demo_fhir.base_url)
    assert await _get(gw, "Practitioner/dr-gp", "/Condition?patient=pat-bob&_count=10") == 200
    assert await _get(gw, "Practitioner/dr-jones", "/Observation/bob-hiv-test") == 403
    assert await _get(gw, "Practitioner/dr-gp", "/Observation?patient=pat-bob&code=http://loinc.org|75622-1") == 200
    search, read, coded = _lines(caplog)
    assert search.__dict__["path"] == "/Condition" and search.__dict__["query"] == "patient=pat-bob&_count=10"
    assert search.__dict__["actor"] == "Practitioner/dr-gp" and search.__dict__["purpose"] == "TREAT"
    assert search.__dict__["decision"] == "filtered" and search.__dict__["replayable"] is True
    # Bob's HIV and opioid use disorder conditions are withheld from a general permit.
    assert search.__dict__["withheld"] == {"Condition": 2}
    assert search.__dict__["consents"] == {"Patient/pat-bob": ["Consent/consent-bob-optin-not-jones/_history/1"]}
    # A denied read keeps its type, never the id it named.
    assert read.__dict__["path"] == "/Observation/*" and read.__dict__["replayable"] is False
    assert read.__dict__["withheld"] == {"Observation": 1} and read.__dict__["released"] == {}
    # A code in the query is never logged.
    assert coded.__dict__["query"] == "patient=pat-bob&code=*" and coded.__dict__["replayable"] is False
    text = "\n".join(JsonLogFormatter().format(r) for r in _lines(caplog))
    for secret in ("bob-hiv", "bob-oud", "B20", "F11", "75622-1"):
        assert secret not in text
