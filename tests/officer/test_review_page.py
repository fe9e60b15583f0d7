"""The break-glass review page: emergency accesses with filters, and an audited review mark."""

from __future__ import annotations

from typing import Any

import orjson

from gateway.demo.server import DemoFhirServer
from tests.unit._util import MakeGateway

ER = "Practitioner/dr-er"


async def break_glass(gw: Any) -> str:
    """The demo's break-glass: an emergency read of Carol's record (she opted out)."""
    headers = {"X-Actor": ER, "X-Break-Glass": "Medical emergency"}
    async with gw.session.get(gw.url + "/fhir/Condition/carol-pregnancy", headers=headers) as resp:
        assert resp.status == 200
        return resp.headers["X-Break-Glass-Audit-Id"]


async def _page(gw: Any, query: str = "") -> str:
    async with gw.session.get(gw.admin_url + "/admin/break-glass" + query) as resp:
        assert resp.status == 200
        assert resp.content_type == "text/html"
        return await resp.text()


async def _review(gw: Any, data: dict[str, str], **headers: str) -> tuple[int, str]:
    async with gw.session.post(gw.admin_url + "/admin/break-glass/review", data=data, headers=headers,
                               allow_redirects=False) as resp:
        return resp.status, resp.headers.get("Location", "")


async def test_page_lists_emergency_accesses_with_what_was_opened(demo_fhir: DemoFhirServer, make_gateway: MakeGateway) -> None:
    gw = await make_gateway(demo_fhir.base_url)
    event_id = await break_glass(gw)
    page = await _page(gw)
    assert f'id="event-{event_id}"' in page
    for text in (ER, "Patient/pat-carol", "Medical emergency", "Condition/carol-pregnancy", "Mark reviewed"):
        assert text in page
    assert "1 shown, 1 not yet reviewed" in page
    for query in ("?actor=Practitioner/dr-gp", "?patient=Patient/pat-alice", "?reason=threat", "?since=2999-01-01"):
        assert event_id not in await _page(gw, query), query
    for query in ("?actor=Practitioner/dr-er", "?patient=Patient/pat-carol", "?reason=emergency", "?since=2000-01-01"):
        assert event_id in await _page(gw, query), query


async def test_page_escapes_what_it_shows(demo_fhir: DemoFhirServer, make_gateway: MakeGateway) -> None:
    gw = await make_gateway(demo_fhir.base_url)
    page = await _page(gw, "?actor=%3Cscript%3Ealert(1)%3C/script%3E")
    assert "<script>" not in page and "&lt;script&gt;" in page


async def test_review_mark_is_itself_audited(demo_fhir: DemoFhirServer, make_gateway: MakeGateway) -> None:
    gw = await make_gateway(demo_fhir.base_url)
    event_id = await break_glass(gw)
    status, location = await _review(gw, {"event": event_id, "reviewer": "Privacy Officer Kim", "note": "chart review done"})
    assert status == 303 and location.startswith("/admin/break-glass")
    events = [orjson.loads(line) for line in gw.state.audit.path.read_bytes().splitlines()]
    review = events[-1]
    assert review["resourceType"] == "AuditEvent"
    assert review["entity"][0]["what"]["reference"] == f"AuditEvent/{event_id}"
    assert review["agent"][0]["who"]["display"] == "Privacy Officer Kim"
    page = await _page(gw)
    assert "reviewed by Privacy Officer Kim" in page and "0 not yet reviewed" in page
    assert event_id not in await _page(gw, "?open=1")


async def test_review_refuses_what_it_cannot_check(demo_fhir: DemoFhirServer, make_gateway: MakeGateway) -> None:
    gw = await make_gateway(demo_fhir.base_url)
    event_id = await break_glass(gw)
    lines = gw.state.audit.path.read_bytes().count(b"\n")
    assert (await _review(gw, {"event": "no-such-event", "reviewer": "Kim"}))[0] == 400
    assert (await _review(gw, {"event": event_id, "reviewer": ""}))[0] == 400
    assert (await _review(gw, {"event": event_id, "reviewer": "Kim"}, Origin="http://evil.example"))[0] == 400
    assert gw.state.audit.path.read_bytes().count(b"\n") == lines
