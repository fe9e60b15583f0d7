"""Break-glass through the real request path (CONTRACT §7, issue 7).

The header, the AuditEvent written before the answer, the metric, the emergency Consent
stored at the consent source and the access window it opens for that actor only. The
audit file's own guarantees (group commit, delivery) are in ``test_audit.py``; killing the
process right after an answer is in ``test_breakglass_crash.py``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.config import ConfigError
from gateway.core.breakglass import emergency_consent
from gateway.core.model import Actor, Label
from tests.conftest import GatewayUnderTest
from tests.fakes import FakeFhir
from tests.fixtures import clinical as c
from tests.unit._util import assert_outcome, diagnostics

MakeGateway = Callable[..., Awaitable[GatewayUnderTest]]
JSON = dict[str, Any]

REASON = "Medical emergency"
REASONS = ("Patient Unresponsive.", "Medical emergency", "Imminent threat to life")
OTHER_DOCTOR = "Practitioner/dr-lee"
ORGANIZATION = "Organization/st-mary-general"
V3_ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
ANA_OBSERVATIONS = f"/Observation?patient={c.PAT_ANA}"
ANA_CONDITIONS = f"/Condition?patient={c.PAT_ANA}"
HIV_TEST_REF = f"Observation/{c.HIV_TEST['id']}"
ANA_CBC_REF = f"Observation/{c.ANA_CBC['id']}"
HIV_LABEL = Label(c.V3_ACT_CODE, "HIV")

# FHIR R4 AuditEvent: the elements each part may carry (http://hl7.org/fhir/R4/auditevent.html).
_RESOURCE_KEYS = {
    "resourceType", "id", "meta", "implicitRules", "language", "text", "contained", "extension",
    "modifierExtension", "type", "subtype", "action", "period", "recorded", "outcome", "outcomeDesc",
    "purposeOfEvent", "agent", "source", "entity",
}
_AGENT_KEYS = {
    "id", "extension", "modifierExtension", "type", "role", "who", "altId", "name", "requestor",
    "location", "policy", "media", "network", "purposeOfUse",
}
_SOURCE_KEYS = {"id", "extension", "modifierExtension", "site", "observer", "type"}
_ENTITY_KEYS = {
    "id", "extension", "modifierExtension", "what", "type", "role", "lifecycle", "securityLabel",
    "name", "description", "query", "detail",
}
_DETAIL_KEYS = {"id", "extension", "modifierExtension", "type", "valueString", "valueBase64Binary"}
_CODING_KEYS = {"system", "version", "code", "display", "userSelected"}
_REFERENCE_KEYS = {"reference", "type", "identifier", "display"}
_INSTANT = re.compile(
    r"^([0-9]([0-9]([0-9][1-9]|[1-9]0)|[1-9]00)|[1-9]000)-(0[1-9]|1[0-2])-(0[1-9]|[1-2][0-9]|3[0-1])"
    r"T([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]+)?(Z|(\+|-)((0[0-9]|1[0-3]):[0-5][0-9]|14:00))$"
)
_FHIR_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")


# ---------------------------------------------------------------- helpers


def _coding(value: Any) -> None:
    assert isinstance(value, dict) and value, value
    assert set(value) <= _CODING_KEYS, value
    assert isinstance(value.get("code"), str) and isinstance(value.get("system"), str), value


def _concept(value: Any) -> None:
    assert isinstance(value, dict) and set(value) <= {"coding", "text"}, value
    for coding in value.get("coding", []):
        _coding(coding)


def _reference(value: Any) -> str:
    assert isinstance(value, dict) and set(value) <= _REFERENCE_KEYS and value, value
    return str(value.get("reference"))


def assert_r4_audit_event(event: JSON) -> None:
    """Fail unless ``event`` has the structure and cardinalities of an R4 AuditEvent."""
    assert event["resourceType"] == "AuditEvent"
    assert set(event) <= _RESOURCE_KEYS, set(event) - _RESOURCE_KEYS
    assert _FHIR_ID.match(event["id"])
    _coding(event["type"])  # 1..1 Coding
    assert event["type"]["system"] == "http://terminology.hl7.org/CodeSystem/audit-event-type"
    for sub in event.get("subtype", []):
        _coding(sub)
    assert event.get("action") in (None, "C", "R", "U", "D", "E")
    assert _INSTANT.match(event["recorded"]), event["recorded"]  # 1..1 instant
    assert event.get("outcome") in (None, "0", "4", "8", "12")
    assert isinstance(event.get("outcomeDesc", ""), str)
    for purpose in event.get("purposeOfEvent", []):
        _concept(purpose)
    assert event["agent"], "agent is 1..*"
    for agent in event["agent"]:
        assert set(agent) <= _AGENT_KEYS, agent
        assert isinstance(agent["requestor"], bool)  # 1..1
        if "type" in agent:
            _concept(agent["type"])
        if "who" in agent:
            _reference(agent["who"])
        for purpose in agent.get("purposeOfUse", []):
            _concept(purpose)
    source = event["source"]  # 1..1, observer 1..1
    assert set(source) <= _SOURCE_KEYS, source
    _reference(source["observer"])
    for stype in source.get("type", []):
        _coding(stype)
    for entity in event.get("entity", []):
        assert set(entity) <= _ENTITY_KEYS, entity
        _reference(entity["what"])
        for key in ("type", "role"):
            if key in entity:
                _coding(entity[key])  # Coding in R4, not CodeableConcept
        for detail in entity.get("detail", []):
            assert set(detail) <= _DETAIL_KEYS, detail
            assert isinstance(detail["type"], str)
            assert len({"valueString", "valueBase64Binary"} & set(detail)) == 1, detail


def audit_lines(gw: GatewayUnderTest) -> list[JSON]:
    """Every AuditEvent in the gateway's audit file (none when it does not exist)."""
    path: Path = gw.state.settings.audit.path
    if not path.exists():
        return []
    raw = path.read_bytes()
    assert raw == b"" or raw.endswith(b"\n"), "the last audit line is incomplete"
    return [orjson.loads(line) for line in raw.splitlines()]


def entities(event: JSON) -> dict[str, JSON]:
    return {e["what"]["reference"]: e for e in event.get("entity", [])}


def would_deny(entity: JSON) -> str:
    details = [d for d in entity.get("detail", []) if "valueString" in d]
    assert len(details) == 1, entity
    return str(details[0]["valueString"])


async def call(
    gw: GatewayUnderTest, method: str, path: str, actor: str = c.DOCTOR, body: Any = None, **headers: str,
) -> tuple[int, dict[str, str], bytes]:
    hdrs = {"X-Actor": actor, **headers}
    data = None if body is None else orjson.dumps(body)
    if data is not None:
        hdrs["Content-Type"] = "application/fhir+json"
    async with gw.session.request(method, gw.url + path, headers=hdrs, data=data) as resp:
        return resp.status, dict(resp.headers), await resp.read()


async def glass(
    gw: GatewayUnderTest, path: str, actor: str = c.DOCTOR, reason: str = REASON, **headers: str,
) -> tuple[int, dict[str, str], bytes]:
    """A GET carrying ``X-Break-Glass: reason``."""
    return await call(gw, "GET", path, actor, **{"X-Break-Glass": reason, **headers})


def returned_ids(body: bytes) -> set[str]:
    data = orjson.loads(body)
    if data.get("resourceType") != "Bundle":
        return {f"{data['resourceType']}/{data['id']}"}
    return {
        f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in data.get("entry", [])
        if e["resource"]["resourceType"] != "OperationOutcome"
    }


def forwarded(fake: FakeFhir) -> list[str]:
    """What the gateway asked of a fake, minus its periodic health check."""
    return [r.path_qs for r in fake.requests if r.path_qs != "/fhir/metadata"]


def consent_posts(fake: FakeFhir) -> list[JSON]:
    return [
        orjson.loads(r.body) for r in fake.requests
        if r.method == "POST" and r.path_qs.split("?")[0] == "/fhir/Consent"
    ]


def stored_emergency(fake: FakeFhir) -> list[JSON]:
    return [
        r for key, r in fake.resources.items()
        if key.startswith("Consent/") and any(
            coding.get("code") == "emergency" for cat in r.get("category", []) for coding in cat.get("coding", [])
        )
    ]


def seed(fake: FakeFhir) -> None:
    """Ana permits her ordinary records (sensitive ones stay closed); Ben opts out."""
    c.seed_all(fake)
    fake.add(c.opt_in(c.PAT_ANA), c.opt_out(c.PAT_BEN))


@pytest.fixture
async def gw(fake_fhir: FakeFhir, make_gateway: MakeGateway) -> GatewayUnderTest:
    seed(fake_fhir)
    return await make_gateway(fake_fhir.base_url)


# ---------------------------------------------------------------- the header


async def test_configured_reason_returns_everything_with_audit_headers(gw: GatewayUnderTest) -> None:
    status, headers, body = await call(gw, "GET", ANA_OBSERVATIONS)
    assert status == 200 and returned_ids(body) == {ANA_CBC_REF}  # without: the HIV test is hidden
    assert "X-Break-Glass-Audit-Id" not in headers
    assert audit_lines(gw) == []

    status, headers, body = await glass(gw, ANA_OBSERVATIONS)
    assert status == 200, body
    assert returned_ids(body) == {ANA_CBC_REF, HIV_TEST_REF}
    assert headers["X-Consent-Decision"] == "permit"
    assert b"75622-1" in body  # the sensitive code itself reaches the emergency requester
    [event] = audit_lines(gw)
    assert headers["X-Break-Glass-Audit-Id"] == event["id"]


async def test_single_denied_read_is_opened(gw: GatewayUnderTest) -> None:
    path = f"/Condition/{c.HIV_CONDITION['id']}"
    assert (await call(gw, "GET", path))[0] == 403
    status, headers, body = await glass(gw, path, reason="Patient Unresponsive.")
    assert status == 200, body
    assert orjson.loads(body)["id"] == c.HIV_CONDITION["id"]
    assert headers["X-Consent-Decision"] == "permit"
    [event] = audit_lines(gw)
    assert headers["X-Break-Glass-Audit-Id"] == event["id"]
    assert would_deny(entities(event)[f"Condition/{c.HIV_CONDITION['id']}"]) == "true"
    assert event["action"] == "R" and [st["code"] for st in event["subtype"]] == ["read"]


class _Collect(logging.Handler):
    """Keeps records itself: the CLI may have stopped ``gateway`` loggers propagating to caplog."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def test_purpose_becomes_etreat(fake_fhir: FakeFhir, make_gateway: MakeGateway) -> None:
    # A permit for treatment only: it applies to ETREAT (under TREAT), never to research.
    treat_only = c.opt_in(c.PAT_ANA, cid="consent-treat-only")
    treat_only["provision"]["purpose"] = [{"system": V3_ACT_REASON, "code": "TREAT"}]
    fake_fhir.add(c.ANA, c.ANA_CBC, treat_only)
    gw = await make_gateway(fake_fhir.base_url)
    assert (await call(gw, "GET", ANA_OBSERVATIONS, **{"X-Purpose-Of-Use": "HRESCH"}))[2].count(b"58410-2") == 0
    access, collect = logging.getLogger("gateway.access"), _Collect()
    level = access.level
    access.setLevel(logging.INFO)
    access.addHandler(collect)
    try:
        status, _, body = await glass(gw, ANA_OBSERVATIONS, **{"X-Purpose-Of-Use": "HRESCH"})
    finally:
        access.removeHandler(collect)
        access.setLevel(level)
    assert status == 200 and returned_ids(body) == {ANA_CBC_REF}
    [event] = audit_lines(gw)
    # Judged as ETREAT, the treatment consent would have permitted the CBC.
    assert would_deny(entities(event)[ANA_CBC_REF]) == "false"
    assert [getattr(r, "purpose", None) for r in collect.records] == ["ETREAT"]


async def test_unknown_reason_is_400_listing_the_allowed_reasons(gw: GatewayUnderTest, fake_fhir: FakeFhir) -> None:
    status, headers, body = await glass(gw, ANA_OBSERVATIONS, reason="Curiosity")
    outcome = assert_outcome(status, headers["Content-Type"], body, 400, issue_code="invalid")
    for allowed in REASONS:
        assert allowed in diagnostics(outcome)
    assert "X-Break-Glass-Audit-Id" not in headers
    assert forwarded(fake_fhir) == []  # refused before anything was asked of the upstream
    assert audit_lines(gw) == []
    assert gw.metric("consent_gateway_break_glass_total", {"reason": "Curiosity"}) == 0


async def test_disabled_break_glass_is_403(fake_fhir: FakeFhir, make_gateway: MakeGateway) -> None:
    seed(fake_fhir)
    gw = await make_gateway(fake_fhir.base_url, break_glass={"enabled": False})
    status, headers, body = await glass(gw, ANA_OBSERVATIONS)
    assert_outcome(status, headers["Content-Type"], body, 403, issue_code="forbidden")
    assert forwarded(fake_fhir) == []
    assert audit_lines(gw) == [] and stored_emergency(fake_fhir) == []
    assert (await call(gw, "GET", ANA_OBSERVATIONS))[0] == 200  # ordinary access still works


async def test_vendor_emergency_settings_drive_break_glass(fake_fhir: FakeFhir, make_gateway: MakeGateway) -> None:
    # HealtheIntent consent-configuration names: emergencyConsentReasons, emergencyConsentDuration (hours).
    seed(fake_fhir)
    gw = await make_gateway(
        fake_fhir.base_url,
        break_glass={"emergencyConsentReasons": ["Patient Unresponsive."], "emergencyConsentDuration": 8},
    )
    assert (await glass(gw, ANA_OBSERVATIONS, reason="Medical emergency"))[0] == 400  # not configured here
    assert (await glass(gw, ANA_OBSERVATIONS, reason="Patient Unresponsive."))[0] == 200
    [consent] = consent_posts(fake_fhir)
    period = consent["provision"]["period"]
    span = datetime.fromisoformat(period["end"].replace("Z", "+00:00")) - datetime.fromisoformat(
        period["start"].replace("Z", "+00:00")
    )
    assert span == timedelta(hours=8)


async def test_access_consent_would_permit_is_still_audited(gw: GatewayUnderTest) -> None:
    status, headers, body = await glass(gw, f"/Observation/{c.ANA_CBC['id']}")
    assert status == 200 and headers["X-Consent-Decision"] == "permit"
    [event] = audit_lines(gw)
    assert headers["X-Break-Glass-Audit-Id"] == event["id"]
    assert_r4_audit_event(event)
    assert set(entities(event)) == {c.PAT_ANA, ANA_CBC_REF}
    assert would_deny(entities(event)[ANA_CBC_REF]) == "false"
    assert "denied" not in event["outcomeDesc"]
    assert gw.metric("consent_gateway_break_glass_total", {"reason": REASON}) == 1


async def test_permitted_access_says_would_have_been_permitted(gw: GatewayUnderTest) -> None:
    await glass(gw, f"/Observation/{c.ANA_CBC['id']}")
    [event] = audit_lines(gw)
    assert "would have been permitted" in event["outcomeDesc"]


# ---------------------------------------------------------------- the AuditEvent


async def test_audit_event_is_a_complete_r4_audit_event(gw: GatewayUnderTest) -> None:
    before = datetime.now(timezone.utc)
    status, headers, _ = await glass(gw, ANA_OBSERVATIONS, **{"X-Actor-Organization": ORGANIZATION})
    assert status == 200
    [event] = audit_lines(gw)
    assert_r4_audit_event(event)
    assert event["id"] == headers["X-Break-Glass-Audit-Id"]
    assert event["type"]["code"] == "rest"
    assert [s["code"] for s in event["subtype"]] == ["search-type"]
    assert event["outcome"] == "0"
    recorded = datetime.fromisoformat(event["recorded"].replace("Z", "+00:00"))
    assert before - timedelta(seconds=1) <= recorded <= datetime.now(timezone.utc) + timedelta(seconds=1)
    requestors = [a for a in event["agent"] if a["requestor"]]
    assert [a["who"]["reference"] for a in requestors] == [c.DOCTOR]
    assert ORGANIZATION in {a.get("who", {}).get("reference") for a in event["agent"]}
    purposes = [(cd["system"], cd["code"]) for p in event["purposeOfEvent"] for cd in p.get("coding", [])]
    assert (V3_ACT_REASON, "ETREAT") in purposes
    assert REASON in [p.get("text") for p in event["purposeOfEvent"]]
    assert event["source"]["site"] or event["source"]["observer"].get("display")
    found = entities(event)
    assert set(found) == {c.PAT_ANA, HIV_TEST_REF, ANA_CBC_REF}
    assert found[c.PAT_ANA]["role"]["code"] == "1"  # object-role Patient
    assert would_deny(found[HIV_TEST_REF]) == "true"
    assert would_deny(found[ANA_CBC_REF]) == "false"
    assert "would have been denied" in event["outcomeDesc"]


async def test_search_is_audited_with_action_execute(gw: GatewayUnderTest) -> None:
    await glass(gw, ANA_OBSERVATIONS)
    [event] = audit_lines(gw)
    assert event["action"] == "E"


async def test_one_audit_line_per_request(gw: GatewayUnderTest) -> None:
    ids = []
    for path in (ANA_OBSERVATIONS, ANA_CONDITIONS, f"/Observation/{c.ANA_CBC['id']}"):
        status, headers, _ = await glass(gw, path)
        assert status == 200
        ids.append(headers["X-Break-Glass-Audit-Id"])
    await call(gw, "GET", f"/Patient/{c.PAT_BEN.split('/')[1]}", actor=OTHER_DOCTOR)  # not break-glass
    assert [e["id"] for e in audit_lines(gw)] == ids
    assert len(set(ids)) == 3


async def test_search_finding_nothing_still_names_the_patient(gw: GatewayUnderTest) -> None:
    status, headers, body = await glass(gw, f"/Immunization?patient={c.PAT_ANA}")
    assert status == 200 and returned_ids(body) == set()
    [event] = audit_lines(gw)
    assert c.PAT_ANA in entities(event)


async def test_audit_line_is_fsynced_before_the_answer(gw: GatewayUnderTest, monkeypatch: pytest.MonkeyPatch) -> None:
    real_fsync = os.fsync
    synced: list[str] = []

    def slow_fsync(fd: int) -> None:
        # Slow enough that an audit written after (or beside) the answer would be missed below.
        time.sleep(0.2)
        real_fsync(fd)
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))

    monkeypatch.setattr(os, "fsync", slow_fsync)
    async with gw.session.get(
        gw.url + ANA_OBSERVATIONS, headers={"X-Actor": c.DOCTOR, "X-Break-Glass": REASON}
    ) as resp:
        on_disk = audit_lines(gw)  # read the moment the status line arrives, before the body
        assert resp.status == 200
        assert [e["id"] for e in on_disk] == [resp.headers["X-Break-Glass-Audit-Id"]]
    assert str(gw.state.settings.audit.path) in synced


@pytest.mark.parametrize("where", ["directory-removed", "path-became-a-directory", "disk-full"])
async def test_audit_not_writable_is_503_without_data(
    where: str, fake_fhir: FakeFhir, make_gateway: MakeGateway, tmp_path: Path
) -> None:
    seed(fake_fhir)
    folder = tmp_path / "audit"
    folder.mkdir()
    path = Path("/dev/full") if where == "disk-full" else folder / "audit.jsonl"  # /dev/full: ENOSPC
    gw = await make_gateway(fake_fhir.base_url, audit={"path": str(path)})
    if where == "directory-removed":
        shutil.rmtree(folder)
    elif where == "path-became-a-directory":
        path.unlink()
        path.mkdir()
    status, headers, body = await glass(gw, ANA_OBSERVATIONS)
    outcome = assert_outcome(status, headers["Content-Type"], body, 503, issue_code="transient")
    assert outcome["resourceType"] == "OperationOutcome"
    for secret in (*c.SECRETS, c.ANA_CBC["id"], c.PAT_ANA, "58410-2"):
        assert secret not in body.decode(), secret
    assert "X-Break-Glass-Audit-Id" not in headers
    assert headers.get("X-Consent-Decision") == "deny"
    assert consent_posts(fake_fhir) == []  # no window is opened for an access that was not audited
    assert gw.metric("consent_gateway_break_glass_total", {"reason": REASON}) == 0
    async with gw.session.get(gw.admin_url + "/readyz") as resp:
        assert resp.status == 503
        assert "audit" in (await resp.json())["failing"]


@pytest.mark.parametrize("where", ["missing-directory", "path-is-a-directory", "read-only-location"])
async def test_audit_not_writable_at_start_up_is_a_config_error(
    where: str, fake_fhir: FakeFhir, make_gateway: MakeGateway, tmp_path: Path
) -> None:
    path = {
        "missing-directory": tmp_path / "no-such-dir" / "audit.jsonl",
        "path-is-a-directory": tmp_path,
        "read-only-location": Path("/sys/consent-gateway-audit.jsonl"),  # sysfs: no one may create files
    }[where]
    with pytest.raises(ConfigError, match=r"^audit\.path: cannot write the audit file: "):
        await make_gateway(fake_fhir.base_url, audit={"path": str(path)})


async def test_audit_recovers_when_the_directory_appears_again(
    fake_fhir: FakeFhir, make_gateway: MakeGateway, tmp_path: Path
) -> None:
    seed(fake_fhir)
    path = tmp_path / "later" / "audit.jsonl"
    path.parent.mkdir()
    gw = await make_gateway(fake_fhir.base_url, audit={"path": str(path)})
    shutil.rmtree(path.parent)
    assert (await glass(gw, ANA_OBSERVATIONS))[0] == 503
    path.parent.mkdir()
    status, headers, _ = await glass(gw, ANA_OBSERVATIONS)
    assert status == 200
    assert [e["id"] for e in audit_lines(gw)] == [headers["X-Break-Glass-Audit-Id"]]


@pytest.mark.parametrize("how", ["rotated", "deleted"])
async def test_audit_file_is_reopened_after_rotation_or_deletion(
    how: str, fake_fhir: FakeFhir, make_gateway: MakeGateway, tmp_path: Path
) -> None:
    seed(fake_fhir)
    gw = await make_gateway(fake_fhir.base_url)
    path = gw.state.settings.audit.path
    first = (await glass(gw, ANA_OBSERVATIONS))[1]["X-Break-Glass-Audit-Id"]
    if how == "rotated":
        path.rename(path.with_name("audit.jsonl.1"))  # what logrotate does
    else:
        path.unlink()
    status, headers, _ = await glass(gw, ANA_OBSERVATIONS)
    assert status == 200
    # The second event is in the file at the configured path, not in the old inode.
    assert [e["id"] for e in audit_lines(gw)] == [headers["X-Break-Glass-Audit-Id"]]
    if how == "rotated":
        old = [orjson.loads(line)["id"] for line in path.with_name("audit.jsonl.1").read_bytes().splitlines()]
        assert old == [first]


async def test_audit_stdout_prints_each_event_as_one_line(
    fake_fhir: FakeFhir, make_gateway: MakeGateway, capfd: pytest.CaptureFixture[str]
) -> None:
    seed(fake_fhir)
    gw = await make_gateway(fake_fhir.base_url, audit={"stdout": True})
    ids = [(await glass(gw, ANA_OBSERVATIONS))[1]["X-Break-Glass-Audit-Id"] for _ in range(2)]
    printed = [orjson.loads(line) for line in capfd.readouterr().out.splitlines() if line.startswith("{")]
    assert all(e["resourceType"] == "AuditEvent" for e in printed)
    # The accounting of disclosures prints its AuditEvents too (the sensitive records released).
    disclosures = [e for e in printed if any(t.get("code") == "disclosure" for t in e.get("meta", {}).get("tag", []))]
    assert len(disclosures) == 2
    printed = [e for e in printed if e not in disclosures]
    assert [e["id"] for e in printed] == ids == [e["id"] for e in audit_lines(gw)]


async def test_concurrent_break_glass_lines_are_whole_and_all_there(gw: GatewayUnderTest) -> None:
    answers = await asyncio.gather(*(
        glass(gw, ANA_OBSERVATIONS if i % 2 else ANA_CONDITIONS, reason=REASONS[i % 3]) for i in range(50)
    ))
    assert [a[0] for a in answers] == [200] * 50
    raw = gw.state.settings.audit.path.read_bytes()
    lines = raw.split(b"\n")
    assert lines[-1] == b"" and len(lines) == 51
    events = [orjson.loads(line) for line in lines[:-1]]  # every line parses on its own
    assert sorted(e["id"] for e in events) == sorted(a[1]["X-Break-Glass-Audit-Id"] for a in answers)
    for event in events:
        assert_r4_audit_event(event)
    assert sum(gw.metric("consent_gateway_break_glass_total", {"reason": r}) for r in REASONS) == 50


# ---------------------------------------------------------------- metric and headers


async def test_metric_counts_per_configured_reason(gw: GatewayUnderTest) -> None:
    await glass(gw, ANA_OBSERVATIONS, reason=REASONS[0])
    await glass(gw, ANA_CONDITIONS, reason=REASONS[0])
    await glass(gw, ANA_OBSERVATIONS, reason=REASONS[2])
    await glass(gw, ANA_OBSERVATIONS, reason="not a configured reason")
    assert gw.metric("consent_gateway_break_glass_total", {"reason": REASONS[0]}) == 2
    assert gw.metric("consent_gateway_break_glass_total", {"reason": REASONS[1]}) == 0
    assert gw.metric("consent_gateway_break_glass_total", {"reason": REASONS[2]}) == 1
    async with gw.session.get(gw.admin_url + "/metrics") as resp:
        text = await resp.text()
    assert f'consent_gateway_break_glass_total{{reason="{REASONS[0]}"}} 2.0' in text
    assert "not a configured reason" not in text


async def test_break_glass_header_never_reaches_the_upstream(gw: GatewayUnderTest, fake_fhir: FakeFhir) -> None:
    await glass(gw, ANA_OBSERVATIONS, **{"X-Actor-Organization": ORGANIZATION})
    await glass(gw, f"/Condition/{c.HIV_CONDITION['id']}")
    assert any(r.path_qs.startswith("/fhir/Observation") for r in fake_fhir.requests)
    assert consent_posts(fake_fhir), "the emergency consent went to the upstream too"
    for recorded in fake_fhir.requests:
        sent = {name.lower() for name in recorded.headers}
        assert not sent & {"x-break-glass", "x-actor", "x-actor-organization", "x-purpose-of-use"}, recorded
        assert REASON.encode() not in b"".join(v.encode() for v in recorded.headers.values())


# ---------------------------------------------------------------- the emergency Consent


async def test_emergency_consent_is_stored_at_the_consent_source(
    fake_fhir: FakeFhir, make_gateway: MakeGateway
) -> None:
    seed(fake_fhir)
    gw = await make_gateway(fake_fhir.base_url, break_glass={"duration_h": 2})
    start = datetime.now(timezone.utc).replace(microsecond=0)
    status, _, _ = await glass(gw, ANA_CONDITIONS)
    assert status == 200
    [consent] = consent_posts(fake_fhir)
    assert consent["resourceType"] == "Consent" and consent["status"] == "active"
    assert consent["patient"]["reference"] == c.PAT_ANA
    assert "patient-privacy" in orjson.dumps(consent["scope"]).decode()
    assert any(cd.get("code") == "emergency" for cat in consent["category"] for cd in cat["coding"])
    assert REASON in orjson.dumps(consent).decode()  # the reason is recorded on the consent
    root = consent["provision"]
    assert root["type"] == "permit"
    assert [a["reference"]["reference"] for a in root["actor"]] == [c.DOCTOR]
    assert [(p["system"], p["code"]) for p in root["purpose"]] == [(V3_ACT_REASON, "TREAT")]
    begins = datetime.fromisoformat(root["period"]["start"].replace("Z", "+00:00"))
    ends = datetime.fromisoformat(root["period"]["end"].replace("Z", "+00:00"))
    assert abs((begins - start).total_seconds()) <= 2
    assert ends - begins == timedelta(hours=2)
    # Ana's Condition search opened HIV, 42 CFR Part 2 / OPIOIDUD (opioid use disorder) and PSY.
    opened = {(lb["system"], lb["code"]) for nested in root["provision"] for lb in nested["securityLabel"]}
    assert opened == {(c.V3_ACT_CODE, code) for code in ("HIV", "42CFRPart2", "OPIOIDUD", "PSY")}
    assert all(nested["type"] == "permit" for nested in root["provision"])


async def test_emergency_consent_goes_to_a_separate_consent_source(
    fake_fhir: FakeFhir, make_gateway: MakeGateway
) -> None:
    seed(fake_fhir)
    consents = FakeFhir()
    server = TestServer(consents.app(), host="127.0.0.1")
    await server.start_server()
    try:
        consents.base_url = f"http://127.0.0.1:{server.port}/fhir"
        consents.add(c.opt_in(c.PAT_ANA))
        gw = await make_gateway(fake_fhir.base_url, consent={"source_url": consents.base_url})
        assert (await glass(gw, ANA_OBSERVATIONS))[0] == 200
        assert len(consent_posts(consents)) == 1
        assert consent_posts(fake_fhir) == []
    finally:
        await server.close()


async def test_no_emergency_consent_without_record_consent(fake_fhir: FakeFhir, make_gateway: MakeGateway) -> None:
    seed(fake_fhir)
    gw = await make_gateway(fake_fhir.base_url, break_glass={"record_consent": False})
    status, headers, _ = await glass(gw, ANA_OBSERVATIONS)
    assert status == 200 and headers["X-Break-Glass-Audit-Id"]
    assert consent_posts(fake_fhir) == []
    status, _, body = await call(gw, "GET", ANA_OBSERVATIONS)
    assert returned_ids(body) == {ANA_CBC_REF}  # no window: the next request is ordinary again


async def test_failing_consent_store_does_not_fail_the_emergency_access(
    gw: GatewayUnderTest, fake_fhir: FakeFhir
) -> None:
    async def refuse_consent_writes(request: web.Request) -> web.StreamResponse | None:
        if request.method == "POST" and request.path == "/fhir/Consent":
            return web.json_response({"resourceType": "OperationOutcome", "issue": []}, status=500)
        return None

    fake_fhir.override = refuse_consent_writes
    status, headers, body = await glass(gw, ANA_OBSERVATIONS)
    assert status == 200 and returned_ids(body) == {ANA_CBC_REF, HIV_TEST_REF}
    assert_no_window_recorded(audit_lines(gw), headers["X-Break-Glass-Audit-Id"])


def assert_no_window_recorded(events: list[JSON], access_id: str) -> None:
    """The access's own event (success), then one saying that no window was recorded."""
    access, no_window = events
    assert access["id"] == access_id and access["outcome"] == "0"
    assert no_window["outcome"] == "4"
    assert "no emergency access window was recorded" in no_window["outcomeDesc"]
    assert {"reference": f"AuditEvent/{access_id}"} in [e["what"] for e in no_window["entity"]]
    assert {"reference": c.PAT_ANA} in [e["what"] for e in no_window["entity"]]
    assert_r4_audit_event(no_window)


async def test_consent_source_down_break_glass_is_served_and_truthfully_audited(
    gw: GatewayUnderTest, fake_fhir: FakeFhir
) -> None:
    async def consents_down(request: web.Request) -> web.StreamResponse | None:
        if request.path == "/fhir/Consent":
            return web.json_response({"resourceType": "OperationOutcome", "issue": []}, status=503)
        return None

    fake_fhir.override = consents_down
    for _ in range(3):
        status, headers, body = await glass(gw, ANA_OBSERVATIONS)
        assert status == 200, body
        assert returned_ids(body) == {ANA_CBC_REF, HIV_TEST_REF}
    events = audit_lines(gw)
    assert len(events) == 6  # each access: its event, then "no window recorded"; nothing else
    for access, no_window in zip(events[::2], events[1::2]):
        assert_no_window_recorded([access, no_window], access["id"])
        details = [d for e in access["entity"] for d in e.get("detail", ())]
        assert details and all(d["valueString"] == "true" for d in details)  # all would-deny
        assert "consents could not be read" in access["outcomeDesc"]


async def test_unreachable_consent_store_does_not_fail_the_emergency_access(
    gw: GatewayUnderTest, fake_fhir: FakeFhir
) -> None:
    async def drop_consent_writes(request: web.Request) -> web.StreamResponse | None:
        if request.method == "POST" and request.path == "/fhir/Consent":
            assert request.transport is not None
            request.transport.close()  # the connection breaks: the client sees a network error
            raise ConnectionResetError
        return None

    fake_fhir.override = drop_consent_writes
    status, headers, body = await glass(gw, ANA_OBSERVATIONS)
    assert status == 200, body
    assert returned_ids(body) == {ANA_CBC_REF, HIV_TEST_REF}
    assert_no_window_recorded(audit_lines(gw), headers["X-Break-Glass-Audit-Id"])


# ---------------------------------------------------------------- the access window


async def test_window_lets_the_same_actor_in_without_the_header_and_audits_it(
    gw: GatewayUnderTest, fake_fhir: FakeFhir
) -> None:
    await glass(gw, ANA_OBSERVATIONS)
    [stored] = stored_emergency(fake_fhir)
    status, headers, body = await call(gw, "GET", ANA_OBSERVATIONS)
    assert status == 200 and returned_ids(body) == {ANA_CBC_REF, HIV_TEST_REF}
    first, second = audit_lines(gw)
    assert headers["X-Break-Glass-Audit-Id"] == second["id"] != first["id"]
    assert_r4_audit_event(second)
    found = entities(second)
    assert f"Consent/{stored['id']}" in found  # names the emergency consent that granted it
    assert f"Consent/{stored['id']}" not in entities(first)
    assert {c.PAT_ANA, HIV_TEST_REF, ANA_CBC_REF} <= set(found)
    assert [a["who"]["reference"] for a in second["agent"] if a["requestor"]] == [c.DOCTOR]
    assert REASON in [p.get("text") for p in second["purposeOfEvent"]]


async def test_window_overrides_an_opt_out(gw: GatewayUnderTest) -> None:
    ben_cbc = f"/Observation/{c.BEN_CBC['id']}"
    assert (await call(gw, "GET", ben_cbc))[0] == 403
    assert (await glass(gw, ben_cbc))[0] == 200
    status, headers, _ = await call(gw, "GET", ben_cbc)
    assert status == 200 and headers.get("X-Break-Glass-Audit-Id")
    assert len(audit_lines(gw)) == 2


async def test_window_opens_only_what_break_glass_opened(gw: GatewayUnderTest) -> None:
    await glass(gw, ANA_OBSERVATIONS)  # opens HIV only
    status, _, body = await call(gw, "GET", ANA_CONDITIONS)
    assert status == 200
    shown = returned_ids(body)
    assert f"Condition/{c.HIV_CONDITION['id']}" in shown
    assert f"Condition/{c.DEPRESSION['id']}" not in shown  # PSY was never opened
    assert f"Condition/{c.OUD_CONDITION['id']}" not in shown  # nor 42 CFR Part 2


async def test_window_is_for_that_actor_and_patient_only(gw: GatewayUnderTest) -> None:
    await glass(gw, ANA_OBSERVATIONS)
    status, headers, body = await call(gw, "GET", ANA_OBSERVATIONS, actor=OTHER_DOCTOR)
    assert status == 200 and returned_ids(body) == {ANA_CBC_REF}
    assert "X-Break-Glass-Audit-Id" not in headers
    # Same actor, another patient (Ben opted out): still denied.
    assert (await call(gw, "GET", f"/Observation/{c.BEN_CBC['id']}"))[0] == 403
    assert len(audit_lines(gw)) == 1


async def test_window_is_for_treatment_only(gw: GatewayUnderTest) -> None:
    await glass(gw, ANA_OBSERVATIONS)
    status, headers, body = await call(gw, "GET", ANA_OBSERVATIONS, **{"X-Purpose-Of-Use": "HPAYMT"})
    assert status == 200
    assert returned_ids(body) == {ANA_CBC_REF}  # a treatment window does not open data for payment
    assert "X-Break-Glass-Audit-Id" not in headers


@pytest.mark.parametrize("path", [ANA_OBSERVATIONS, f"/Observation?patient={c.PAT_BEN}"], ids=["opt-in", "opt-out"])
async def test_repeated_break_glass_in_the_window_creates_no_duplicate(
    path: str, gw: GatewayUnderTest, fake_fhir: FakeFhir
) -> None:
    # Under Ben's opt-out the window does not turn consent into a permit: denials are overridden again.
    for _ in range(3):
        assert (await glass(gw, path))[0] == 200
    assert len(consent_posts(fake_fhir)) == 1
    assert len(audit_lines(gw)) == 3  # each access is still audited


async def test_parallel_break_glass_creates_one_consent(gw: GatewayUnderTest, fake_fhir: FakeFhir) -> None:
    # An EHR opening a chart in an emergency fires its queries at once.
    answers = await asyncio.gather(*(glass(gw, ANA_OBSERVATIONS) for _ in range(5)))
    assert [a[0] for a in answers] == [200] * 5
    assert len(consent_posts(fake_fhir)) == 1


def _seeded_window(start: datetime, hours: float) -> JSON:
    consent = emergency_consent(Actor(c.DOCTOR), c.PAT_ANA, [HIV_LABEL], REASON, start, hours)
    consent["id"] = "emergency-seeded"
    return consent


@pytest.mark.parametrize(("started_h_ago", "open_"), [(1, True), (10, False)])
async def test_seeded_window_permits_only_while_open(
    started_h_ago: float, open_: bool, fake_fhir: FakeFhir, make_gateway: MakeGateway
) -> None:
    seed(fake_fhir)
    fake_fhir.add(_seeded_window(datetime.now(timezone.utc) - timedelta(hours=started_h_ago), 4))
    gw = await make_gateway(fake_fhir.base_url)
    status, headers, body = await call(gw, "GET", ANA_OBSERVATIONS)
    assert status == 200
    assert (HIV_TEST_REF in returned_ids(body)) is open_
    assert ("X-Break-Glass-Audit-Id" in headers) is open_
    assert len(audit_lines(gw)) == (1 if open_ else 0)


async def test_window_closes_on_time_while_cached(fake_fhir: FakeFhir, make_gateway: MakeGateway) -> None:
    seed(fake_fhir)
    now = datetime.now(timezone.utc)
    window = _seeded_window(now - timedelta(hours=1), 1 + 2.5 / 3600)
    fake_fhir.add(window)
    ends = datetime.fromisoformat(window["provision"]["period"]["end"].replace("Z", "+00:00"))
    gw = await make_gateway(fake_fhir.base_url, consent={"cache_ttl_s": 600})
    assert HIV_TEST_REF in returned_ids((await call(gw, "GET", ANA_OBSERVATIONS))[2])
    await asyncio.sleep((ends - datetime.now(timezone.utc)).total_seconds() + 0.1)
    status, headers, body = await call(gw, "GET", ANA_OBSERVATIONS)
    assert status == 200 and returned_ids(body) == {ANA_CBC_REF}
    assert "X-Break-Glass-Audit-Id" not in headers


async def test_window_set_inactive_stops_permitting(gw: GatewayUnderTest, fake_fhir: FakeFhir) -> None:
    await glass(gw, ANA_OBSERVATIONS)
    [stored] = stored_emergency(fake_fhir)
    assert HIV_TEST_REF in returned_ids((await call(gw, "GET", ANA_OBSERVATIONS))[2])  # cached, open
    revoked = {**stored, "status": "inactive"}
    status, _, _ = await call(gw, "PUT", f"/Consent/{stored['id']}", actor=c.DOCTOR, body=revoked)
    assert status == 200
    status, headers, body = await call(gw, "GET", ANA_OBSERVATIONS)
    assert status == 200 and returned_ids(body) == {ANA_CBC_REF}
    assert "X-Break-Glass-Audit-Id" not in headers
    assert len(audit_lines(gw)) == 2
