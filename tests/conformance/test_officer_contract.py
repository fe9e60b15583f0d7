"""CONTRACT §10 as an outsider checks it: DS4P labels on each released sensitive resource
(reads too, with their code systems), the accounting of disclosures as a FHIR Bundle with
``since`` as a date or an instant, and its entries' absolute ``fullUrl``."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone
from typing import Any

import orjson
import pytest

from gateway.demo.server import DemoFhirServer
from tests.unit._util import MakeGateway

ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"


async def _get(gw: Any, actor: str, path: str, **headers: str) -> tuple[int, Any]:
    async with gw.session.get(gw.url + path, headers={"X-Actor": actor, **headers}) as resp:
        return resp.status, orjson.loads(await resp.read())


async def _disclosures(gw: Any, **params: str) -> tuple[int, str, Any]:
    async with gw.session.get(gw.admin_url + "/admin/disclosures", params=params) as resp:
        return resp.status, resp.content_type, orjson.loads(await resp.read())


def _security(resource: dict[str, Any]) -> set[tuple[str, str]]:
    return {(c.get("system", ""), c["code"]) for c in resource.get("meta", {}).get("security", [])}


async def test_a_released_read_carries_its_labels_and_the_refrain(demo_fhir: DemoFhirServer, make_gateway: MakeGateway) -> None:
    gw = await make_gateway(demo_fhir.base_url)
    status, hiv = await _get(gw, "Patient/pat-bob", "/Condition/bob-hiv")
    assert status == 200
    assert (ACT_CODE, "HIV") in _security(hiv)
    assert (ACT_CODE, "NORDSLCD") not in _security(hiv)
    status, oud = await _get(gw, "Practitioner/dr-er", "/Condition/bob-oud", **{"X-Break-Glass": "Medical emergency"})
    assert status == 200
    assert {(ACT_CODE, "42CFRPart2"), (ACT_CODE, "NORDSLCD")} <= _security(oud)


async def test_disclosures_are_a_searchset_bundle_of_audit_events_with_absolute_full_urls(
    demo_fhir: DemoFhirServer, make_gateway: MakeGateway,
) -> None:
    gw = await make_gateway(demo_fhir.base_url)
    await _get(gw, "Practitioner/dr-psych", "/Condition/alice-depression")
    status, ctype, bundle = await _disclosures(gw, patient="Patient/pat-alice")
    assert status == 200 and ctype == "application/fhir+json"
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "searchset"
    [entry] = bundle["entry"]
    assert entry["resource"]["resourceType"] == "AuditEvent"
    assert entry["search"]["mode"] == "match"
    # R4 Bundle.entry.fullUrl: "The Absolute URL for the resource".
    full_url = entry["fullUrl"]
    assert full_url.startswith(("urn:uuid:", "http://", "https://")), full_url
    assert full_url.endswith(entry["resource"]["id"])


async def test_since_takes_a_date_or_an_instant_and_keeps_only_later_disclosures(
    demo_fhir: DemoFhirServer, make_gateway: MakeGateway,
) -> None:
    gw = await make_gateway(demo_fhir.base_url)
    await _get(gw, "Practitioner/dr-psych", "/Condition/alice-depression")
    await asyncio.sleep(0.05)
    between = datetime.now(timezone.utc)
    await asyncio.sleep(0.05)
    await _get(gw, "Practitioner/dr-psych", "/Condition/alice-depression")
    today = between.date().isoformat()
    for since, expected in (
        (today, 2),
        ((between.date() + timedelta(days=1)).isoformat(), 0),
        ("2000-01-01", 2),
        (between.isoformat(), 1),
        (between.isoformat().replace("+00:00", "Z"), 1),
        (between.astimezone(timezone(timedelta(hours=2))).isoformat(), 1),
        (between.isoformat(timespec="seconds").replace("+00:00", "Z"), None),
    ):
        status, _, bundle = await _disclosures(gw, patient="Patient/pat-alice", since=since)
        assert status == 200, since
        if expected is not None:
            assert len(bundle["entry"]) == expected, since


@pytest.mark.parametrize("since", ["yesterday", "2026-13-01", "01/02/2026"])
async def test_a_bad_since_is_a_400_outcome(since: str, demo_fhir: DemoFhirServer, make_gateway: MakeGateway) -> None:
    gw = await make_gateway(demo_fhir.base_url)
    status, ctype, outcome = await _disclosures(gw, patient="Patient/pat-alice", since=since)
    assert status == 400 and ctype == "application/fhir+json"
    assert outcome["resourceType"] == "OperationOutcome"


REFUSED_EARLY = [
    ({}, "/fhir/Observation/bob-cbc?_count=5", 401),
    ({"X-Actor": "Practitioner/dr-gp", "X-Purpose-Of-Use": "NOPE"}, "/Observation/bob-cbc", 400),
    ({"X-Actor": "Practitioner/dr-gp", "Accept": "application/fhir+xml"}, "/Observation?patient=pat-bob", 406),
    ({"X-Actor": ["Practitioner/dr-gp", "Practitioner/dr-er"]}, "/Condition/bob-hiv", 400),
]


@pytest.mark.parametrize(("headers", "path", "status"), REFUSED_EARLY, ids=["401", "400-purpose", "406", "400-twice"])
async def test_a_request_refused_before_deciding_still_has_its_method_path_and_query_logged(
    headers: dict[str, Any], path: str, status: int, demo_fhir: DemoFhirServer, make_gateway: MakeGateway,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import logging

    caplog.set_level(logging.INFO, logger="gateway.decision")
    gw = await make_gateway(demo_fhir.base_url)
    pairs = [(k, v) for k, vs in headers.items() for v in (vs if isinstance(vs, list) else [vs])]
    async with gw.session.get(gw.url + path, headers=pairs) as resp:
        assert resp.status == status
    [line] = [r.__dict__ for r in caplog.records if r.name == "gateway.decision" and r.getMessage() == "decision"]
    below_base, _, query = path.removeprefix("/fhir").partition("?")
    rtype = below_base.split("/")[1]
    # Nothing was decided: the id stays out of the log as for a denied read.
    assert (line["method"], line["path"], line["query"], line["status"]) == ("GET", f"/{rtype}/*" if below_base.count("/") == 2 else below_base, query, status)
    assert line["decision"] == "deny" and line["replayable"] is False
    assert "bob-cbc" not in str(line) and "bob-hiv" not in str(line)


async def test_since_with_an_unencoded_plus_offset_is_read_as_the_offset(demo_fhir: DemoFhirServer, make_gateway: MakeGateway) -> None:
    gw = await make_gateway(demo_fhir.base_url)
    await _get(gw, "Practitioner/dr-psych", "/Condition/alice-depression")
    # Written into the URL as-is, "+" reaches the server as a space (form encoding).
    for since, expected in (("2000-01-01T00:00:00+01:00", 1), ("2999-01-01T00:00:00+01:00", 0)):
        async with gw.session.get(gw.admin_url + f"/admin/disclosures?patient=Patient/pat-alice&since={since}") as resp:
            assert resp.status == 200, await resp.text()
            assert len(orjson.loads(await resp.read())["entry"]) == expected
