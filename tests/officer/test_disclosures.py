"""Accounting of disclosures and DS4P labels on released sensitive data."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from gateway.app import open_disclosures
from gateway.config import ConfigError
from gateway.core.ds4p import NOTICE_EXTENSION, NORDSLCD
from gateway.demo.server import DemoFhirServer
from tests.conftest import gateway_settings
from tests.unit._util import MakeGateway


async def _get(gw: Any, actor: str, path: str, **headers: str) -> tuple[int, bytes]:
    async with gw.session.get(gw.url + "/fhir" + path, headers={"X-Actor": actor, **headers}) as resp:
        return resp.status, await resp.read()


async def _admin(gw: Any, path: str) -> tuple[int, Any]:
    async with gw.session.get(gw.admin_url + path) as resp:
        return resp.status, await resp.json(content_type=None)


def _security(resource: dict[str, Any]) -> set[str]:
    return {c["code"] for c in resource.get("meta", {}).get("security", [])}


def _by_id(bundle: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["resource"]["id"]: e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] != "OperationOutcome"}


async def test_released_sensitive_data_carries_its_labels_and_the_part2_notice(
    demo_fhir: DemoFhirServer, make_gateway: MakeGateway
) -> None:
    gw = await make_gateway(demo_fhir.base_url)
    # Bob sees his own record: HIV and opioid use disorder (42 CFR Part 2) included.
    status, raw = await _get(gw, "Patient/pat-bob", "/Condition?patient=pat-bob")
    assert status == 200
    bundle = orjson.loads(raw)
    found = _by_id(bundle)
    assert "HIV" in _security(found["bob-hiv"]) and NORDSLCD not in _security(found["bob-hiv"])
    assert {"42CFRPart2", NORDSLCD} <= _security(found["bob-oud"])
    assert _security(found["bob-oud"]) & {"ETH", "SUD", "OPIOIDUD"}
    [notice] = [e for e in bundle["meta"]["extension"] if e["url"] == NOTICE_EXTENSION]
    assert "42 CFR part 2" in notice["valueString"]


async def test_unlabelled_resources_keep_their_bytes(demo_fhir: DemoFhirServer, make_gateway: MakeGateway) -> None:
    gw = await make_gateway(demo_fhir.base_url)
    status, raw = await _get(gw, "Patient/pat-bob", "/Observation?patient=pat-bob")
    assert status == 200
    assert orjson.dumps(demo_fhir.resources["Observation/bob-cbc"]) in raw
    assert "HIV" in _security(_by_id(orjson.loads(raw))["bob-hiv-test"])
    status, raw = await _get(gw, "Practitioner/dr-gp", "/Observation/alice-cbc")
    assert raw == orjson.dumps(demo_fhir.resources["Observation/alice-cbc"])
    # Nothing sensitive was released: no bundle notice.
    status, raw = await _get(gw, "Practitioner/dr-gp", "/Condition?patient=pat-bob")
    assert NOTICE_EXTENSION not in raw.decode()


async def test_each_release_of_labelled_data_is_an_audit_event(demo_fhir: DemoFhirServer, make_gateway: MakeGateway) -> None:
    gw = await make_gateway(demo_fhir.base_url)
    await _get(gw, "Patient/pat-bob", "/Condition?patient=pat-bob")  # his own record: no disclosure
    await _get(gw, "Practitioner/dr-er", "/Condition?patient=pat-bob", **{"X-Break-Glass": "Medical emergency"})
    await _get(gw, "Practitioner/dr-gp", "/Observation/alice-cbc")  # unlabelled: not recorded
    await _get(gw, "Practitioner/dr-psych", "/Condition/alice-depression")
    status, bundle = await _admin(gw, "/admin/disclosures?patient=Patient/pat-bob")
    assert status == 200 and bundle["resourceType"] == "Bundle"
    [event] = [e["resource"] for e in bundle["entry"]]
    assert event["resourceType"] == "AuditEvent"
    assert event["agent"][0]["who"]["reference"] == "Practitioner/dr-er"
    assert event["purposeOfEvent"][0]["coding"][0]["code"] == "ETREAT"
    released = {e["what"]["reference"]: {l["code"] for l in e.get("securityLabel", [])} for e in event["entity"][1:]}
    assert set(released) == {"Condition/bob-hiv", "Condition/bob-oud"}
    assert "42CFRPart2" in released["Condition/bob-oud"]
    # Another patient's accounting names only that patient's records.
    status, alice = await _admin(gw, "/admin/disclosures?patient=Patient/pat-alice")
    [alice_event] = [e["resource"] for e in alice["entry"]]
    assert [e["what"]["reference"] for e in alice_event["entity"]] == ["Patient/pat-alice", "Condition/alice-depression"]
    assert alice_event["agent"][0]["who"]["reference"] == "Practitioner/dr-psych"
    status, later = await _admin(gw, "/admin/disclosures?patient=Patient/pat-bob&since=2999-01-01")
    assert later["entry"] == []
    assert gw.metric("consent_gateway_disclosures_total") == 2


@pytest.mark.parametrize(("mode", "expected"), [("all", 2), ("none", 0)])
async def test_disclosures_mode(demo_fhir: DemoFhirServer, make_gateway: MakeGateway, mode: str, expected: int) -> None:
    gw = await make_gateway(demo_fhir.base_url, audit={"disclosures": mode})
    await _get(gw, "Practitioner/dr-gp", "/Observation/alice-cbc")
    await _get(gw, "Practitioner/dr-er", "/Condition/bob-hiv", **{"X-Break-Glass": "Medical emergency"})
    _, bundle = await _admin(gw, "/admin/disclosures")
    assert len(bundle["entry"]) == expected


async def test_disclosures_refuses_a_bad_patient(demo_fhir: DemoFhirServer, make_gateway: MakeGateway) -> None:
    gw = await make_gateway(demo_fhir.base_url)
    status, outcome = await _admin(gw, "/admin/disclosures?patient=bob")
    assert status == 400 and outcome["resourceType"] == "OperationOutcome"


async def test_a_disclosure_that_cannot_be_made_durable_returns_nothing(
    demo_fhir: DemoFhirServer, make_gateway: MakeGateway, tmp_path: Any
) -> None:
    gw = await make_gateway(demo_fhir.base_url)
    assert gw.state.disclosures is not None
    gw.state.disclosures.path = tmp_path / "missing-dir" / "d.jsonl"
    status, raw = await _get(gw, "Practitioner/dr-psych", "/Condition/alice-depression")
    assert status == 503 and b"F32" not in raw
    status, raw = await _get(gw, "Practitioner/dr-gp", "/Observation/alice-cbc")
    assert status == 200  # nothing labelled: nothing to record


async def test_an_unwritable_disclosures_file_stops_start_up(tmp_path: Any) -> None:
    blocked = tmp_path / "audit.disclosures.jsonl"
    blocked.mkdir()  # a directory where the file should be
    settings = gateway_settings("http://fhir:8080/fhir", audit={"path": str(tmp_path / "audit.jsonl")})
    with pytest.raises(ConfigError, match=r"^audit\.disclosures: cannot write audit\.disclosures\.jsonl"):
        open_disclosures(settings)
    off = gateway_settings("http://fhir:8080/fhir", audit={"path": str(tmp_path / "audit.jsonl"), "disclosures": "none"})
    assert open_disclosures(off) is None
