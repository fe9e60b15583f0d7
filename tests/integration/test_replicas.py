"""Many replicas, one truth (CONTRACT §9): two gateway processes in front of the real engine.

Each replica caches consents for far longer than the test runs (``cache_ttl_s: 600``), so
only the change feed (``consent.change_poll_s: 1``) can make replica B see what was
written through replica A or straight to the FHIR server. Measured bound: the change is
enforced by B within ``change_poll_s`` plus one request (plus scheduling slack for a
loaded 2-core CI machine, ``SLACK_S``).
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from fhirpy import AsyncFHIRClient

from tests.integration.engine import Engine
from tests.unit._util import free_port, start_serving

POLL_S = 1.0
SLACK_S = 3.0  # one request and the engine's answer on a loaded 2-core machine
DOCTOR = {"X-Actor": "Practitioner/dr-replica"}
ACT = "http://terminology.hl7.org/CodeSystem/v3-ActCode"


@dataclass
class Replica:
    url: str
    admin_url: str
    audit: Path
    process: asyncio.subprocess.Process

    def client(self, headers: dict[str, str]) -> AsyncFHIRClient:
        return AsyncFHIRClient(self.url, extra_headers={"Accept": "application/fhir+json", **headers})


async def start_replica(engine: Engine, root: Path, name: str) -> Replica:
    folder = root / name
    folder.mkdir()
    port, admin = free_port(), free_port()
    config = folder / "gateway.yaml"
    config.write_text(
        f"upstream: {{url: {engine.base_url}, timeout_s: 10}}\n"
        f"listen: {{host: 127.0.0.1, port: {port}}}\n"
        f"admin: {{host: 127.0.0.1, port: {admin}}}\n"
        f"consent: {{change_poll_s: {POLL_S}, cache_ttl_s: 600}}\n"
        f"audit: {{path: {folder / 'audit.jsonl'}}}\n",
        encoding="utf-8",
    )
    process = await start_serving(config, admin, folder, capture=False)
    return Replica(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin}", folder / "audit.jsonl", process)


@pytest.fixture
async def replicas(fhir_engine: Engine, tmp_path: Path) -> AsyncIterator[tuple[Replica, Replica]]:
    a = await start_replica(fhir_engine, tmp_path, "a")
    b = await start_replica(fhir_engine, tmp_path, "b")
    yield a, b
    for replica in (a, b):
        replica.process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(replica.process.wait(), 20)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def consent(cid: str, patient: str, rule: str, status: str = "active") -> dict[str, Any]:
    return {
        "resourceType": "Consent", "id": cid, "status": status,
        "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": patient},
        "dateTime": "2026-01-05T10:00:00Z",
        "policyRule": {"coding": [{"system": ACT, "code": rule}]},
    }


async def new_patient(engine: Engine, rule: str) -> tuple[str, str, dict[str, Any]]:
    """A fresh patient with one heart-rate Observation and one active Consent (OPTIN or OPTOUT)."""
    fhir = AsyncFHIRClient(engine.base_url, extra_headers={"Accept": "application/fhir+json"})
    pid = f"repl-{uuid.uuid4().hex[:12]}"
    await fhir.resource("Patient", id=pid, name=[{"family": "Replica"}]).save()
    obs = fhir.resource(
        "Observation", id=f"{pid}-hr", status="final", subject={"reference": f"Patient/{pid}"},
        code={"coding": [{"system": "http://loinc.org", "code": "8867-4", "display": "Heart rate"}]},
        valueQuantity={"value": 72, "unit": "/min", "system": "http://unitsofmeasure.org", "code": "/min"},
    )
    await obs.save()
    written = consent(f"{pid}-consent", f"Patient/{pid}", rule)
    await fhir.resource("Consent", **written).save()
    return f"Patient/{pid}", f"/Observation/{pid}-hr", written


async def status_of(http: aiohttp.ClientSession, replica: Replica, path: str, headers: dict[str, str]) -> int:
    async with http.get(replica.url + path, headers=headers) as resp:
        await resp.read()
        return resp.status


async def seconds_until(check: Callable[[], Awaitable[bool]], limit_s: float) -> float:
    """How long until ``check`` holds (asked about every 50 ms); fails beyond ``limit_s``."""
    started = time.monotonic()
    while not await check():
        assert time.monotonic() - started < limit_s, f"not within {limit_s} s"
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def put(http: aiohttp.ClientSession, url: str, body: dict[str, Any], headers: dict[str, str]) -> None:
    async with http.put(url, data=orjson.dumps(body), headers={"Content-Type": "application/fhir+json", **headers}) as resp:
        assert resp.status in (200, 201), await resp.text()


@pytest.mark.parametrize("written_to", ["replica A", "the FHIR server", "the FHIR server, deleted"])
async def test_revocation_reaches_replica_b_within_one_poll(
    written_to: str, replicas: tuple[Replica, Replica], fhir_engine: Engine, http: aiohttp.ClientSession
) -> None:
    a, b = replicas
    patient, observation, optin = await new_patient(fhir_engine, "OPTIN")
    assert await status_of(http, b, observation, DOCTOR) == 200  # B has cached the permit
    assert await status_of(http, b, observation, DOCTOR) == 200
    revoked = {**optin, "status": "inactive"}
    if written_to == "replica A":
        await put(http, f"{a.url}/Consent/{optin['id']}", revoked, {"X-Actor": patient})
    elif written_to == "the FHIR server":
        await put(http, f"{fhir_engine.base_url}/Consent/{optin['id']}", revoked, {})
    else:
        # A deletion is in no search listing; the type history names it.
        async with http.delete(f"{fhir_engine.base_url}/Consent/{optin['id']}") as resp:
            assert resp.status in (200, 204), await resp.text()

    async def denied_on_b() -> bool:
        return await status_of(http, b, observation, DOCTOR) == 403

    took = await seconds_until(denied_on_b, POLL_S + SLACK_S)
    print(f"revocation written to {written_to} enforced by replica B after {took:.2f} s")


async def test_emergency_window_opened_on_a_is_honoured_by_b(
    replicas: tuple[Replica, Replica], fhir_engine: Engine, http: aiohttp.ClientSession
) -> None:
    a, b = replicas
    patient, observation, _ = await new_patient(fhir_engine, "OPTOUT")
    assert await status_of(http, b, observation, DOCTOR) == 403  # B has cached the opt-out
    glass = {**DOCTOR, "X-Break-Glass": "Medical emergency"}
    assert await status_of(http, a, observation, glass) == 200

    async def open_on_b() -> bool:
        return await status_of(http, b, observation, DOCTOR) == 200

    took = await seconds_until(open_on_b, POLL_S + SLACK_S)
    print(f"emergency window opened on replica A honoured by replica B after {took:.2f} s")
    # B audits each access in the window like the first (CONTRACT §7).
    events = [orjson.loads(line) for line in b.audit.read_bytes().splitlines()]
    assert events and any({"reference": patient} in [e["what"] for e in ev["entity"]] for ev in events)


async def test_poll_metrics_on_each_replica(replicas: tuple[Replica, Replica], http: aiohttp.ClientSession) -> None:
    await asyncio.sleep(POLL_S * 2)
    for replica in replicas:
        async with http.get(replica.admin_url + "/metrics") as resp:
            text = await resp.text()
        assert "consent_gateway_change_poll_errors_total 0.0" in text
        age = next(float(line.split()[-1]) for line in text.splitlines()
                   if line.startswith("consent_gateway_change_poll_age_seconds "))
        assert age < POLL_S + SLACK_S
        async with http.get(replica.admin_url + "/readyz") as resp:
            assert resp.status == 200, await resp.text()


# ---------------------------------------------------------------- what decides besides Consents


async def excluded_team(engine: Engine, members: list[str]) -> tuple[str, str, str]:
    """A fresh patient whose consent opens everything but to one CareTeam; the team's members.
    Returns the patient's Observation path, the team id and the CareTeam's path."""
    fhir = AsyncFHIRClient(engine.base_url, extra_headers={"Accept": "application/fhir+json"})
    patient, observation, _ = await new_patient(engine, "OPTIN")
    team = f"team-{uuid.uuid4().hex[:12]}"
    await fhir.resource("CareTeam", **care_team(team, patient, members)).save()
    excluding = {**consent(f"{team}-consent", patient, "OPTIN"),
                 "provision": {"provision": [{"type": "deny", "actor": [{
                     "role": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "code": "PRCP"}]},
                     "reference": {"reference": f"CareTeam/{team}"}}]}]}}
    await fhir.resource("Consent", **excluding).save()
    return observation, team, f"/CareTeam/{team}"


def care_team(team: str, patient: str, members: list[str]) -> dict[str, Any]:
    return {"resourceType": "CareTeam", "id": team, "status": "active", "subject": {"reference": patient},
            "participant": [{"member": {"reference": m}} for m in members]}


@pytest.mark.parametrize("change", ["joins", "leaves", "team deleted"])
async def test_a_care_team_changed_on_the_server_reaches_every_replica_within_one_poll(
    change: str, replicas: tuple[Replica, Replica], fhir_engine: Engine, http: aiohttp.ClientSession,
) -> None:
    """Memberships are cached per requester for ``cache_ttl_s`` (600 s here): only the change
    feed makes a replica see a clinician put on, or taken off, the team a patient excluded."""
    _, b = replicas
    doctor = f"Practitioner/dr-{uuid.uuid4().hex[:8]}"
    nurse = f"Practitioner/rn-{uuid.uuid4().hex[:8]}"
    members = [nurse] if change == "joins" else [nurse, doctor]
    observation, team, team_path = await excluded_team(fhir_engine, members)
    before, after = (200, 403) if change == "joins" else (403, 200)
    assert await status_of(http, b, observation, {"X-Actor": doctor}) == before  # B has cached the membership
    assert await status_of(http, b, observation, {"X-Actor": doctor}) == before
    if change == "team deleted":
        async with http.delete(f"{fhir_engine.base_url}{team_path}") as resp:
            assert resp.status in (200, 204), await resp.text()
    else:
        now = [nurse, doctor] if change == "joins" else [nurse]
        patient = (await (await http.get(f"{fhir_engine.base_url}{team_path}")).json())["subject"]["reference"]
        await put(http, f"{fhir_engine.base_url}{team_path}", care_team(team, patient, now), {})

    async def changed_on_b() -> bool:
        return await status_of(http, b, observation, {"X-Actor": doctor}) == after

    took = await seconds_until(changed_on_b, POLL_S + SLACK_S)
    print(f"care team change ({change}) enforced by replica B after {took:.2f} s")


async def test_a_care_team_written_through_a_replica_takes_effect_there_at_once(
    replicas: tuple[Replica, Replica], fhir_engine: Engine, http: aiohttp.ClientSession,
) -> None:
    """The patient puts the doctor on the team she excluded (adding members through the gateway
    is hers and the consent writers' to do: test_red_team_10)."""
    a, _ = replicas
    doctor = f"Practitioner/dr-{uuid.uuid4().hex[:8]}"
    observation, team, team_path = await excluded_team(fhir_engine, [])
    assert await status_of(http, a, observation, {"X-Actor": doctor}) == 200
    patient = (await (await http.get(f"{fhir_engine.base_url}{team_path}")).json())["subject"]["reference"]
    await put(http, f"{a.url}{team_path}", care_team(team, patient, [doctor]), {"X-Actor": patient})
    assert await status_of(http, a, observation, {"X-Actor": doctor}) == 403


RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"


async def test_a_medication_changed_on_the_server_relabels_its_orders_on_every_replica_within_one_poll(
    replicas: tuple[Replica, Replica], fhir_engine: Engine, http: aiohttp.ClientSession,
) -> None:
    """An order names its drug by reference; the drug is read once and cached. When the server's
    Medication becomes buprenorphine (42 CFR Part 2), a general permit no longer opens the order."""
    _, b = replicas
    patient, _, _ = await new_patient(fhir_engine, "OPTIN")
    pid = patient.split("/")[1]
    med = {"resourceType": "Medication", "id": f"{pid}-med",
           "code": {"coding": [{"system": RXNORM, "code": "197361", "display": "amlodipine 5 MG Oral Tablet"}]}}
    order = {"resourceType": "MedicationRequest", "id": f"{pid}-order", "status": "active", "intent": "order",
             "subject": {"reference": patient}, "medicationReference": {"reference": f"Medication/{med['id']}"}}
    await put(http, f"{fhir_engine.base_url}/Medication/{med['id']}", med, {})
    await put(http, f"{fhir_engine.base_url}/MedicationRequest/{order['id']}", order, {})
    path = f"/MedicationRequest/{order['id']}"
    assert await status_of(http, b, path, DOCTOR) == 200  # B has read and cached the drug
    bupe = {**med, "code": {"coding": [{"system": RXNORM, "code": "1010600",
                                        "display": "buprenorphine 2 MG / naloxone 0.5 MG Sublingual Tablet"}]}}
    await put(http, f"{fhir_engine.base_url}/Medication/{med['id']}", bupe, {})

    async def withheld_on_b() -> bool:
        return await status_of(http, b, path, DOCTOR) == 403

    took = await seconds_until(withheld_on_b, POLL_S + SLACK_S)
    print(f"medication change enforced by replica B after {took:.2f} s")
