"""``consent-gateway whatif``: a draft consent replayed over the decision log."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import io
import logging
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from gateway.cli import main
from gateway.demo.server import DemoFhirServer, demo_server
from gateway.web.middleware import JsonLogFormatter
from tests.conftest import serving
from tests.unit._util import MakeGateway

V3 = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"

READS = [
    ("Practitioner/dr-gp", "/Condition?patient=pat-bob"),
    ("Practitioner/dr-gp", "/Observation?patient=pat-bob"),
    ("Practitioner/dr-psych", "/Observation?patient=pat-bob"),
    ("Practitioner/dr-gp", "/Observation/alice-cbc"),          # another patient: not replayed
    ("Practitioner/dr-jones", "/Observation/bob-hiv-test"),     # denied: its id is not logged
]


def _actor(reference: str) -> dict[str, Any]:
    return {"role": {"coding": [{"system": PARTICIPATION, "code": "PRCP"}]}, "reference": {"reference": reference}}


def draft_of(demo: DemoFhirServer) -> dict[str, Any]:
    """Bob's consent revised: his GP may see HIV records, his psychiatrist nothing."""
    draft = copy.deepcopy(demo.resources["Consent/consent-bob-optin-not-jones"])
    draft["provision"]["provision"] += [
        {"type": "permit", "actor": [_actor("Practitioner/dr-gp")], "securityLabel": [{"system": V3, "code": "HIV"}]},
        {"type": "deny", "actor": [_actor("Practitioner/dr-psych")]},
    ]
    return draft


async def _write_log(gw: Any, caplog: pytest.LogCaptureFixture, path: Path) -> None:
    for actor, target in READS:
        async with gw.session.get(gw.url + "/fhir" + target, headers={"X-Actor": actor}) as resp:
            await resp.read()
    formatter = JsonLogFormatter()
    lines = [formatter.format(r) for r in caplog.records if r.name.startswith("gateway")]
    path.write_text("\n".join(lines) + "\nnot json\n")


async def _logged_reads(
    demo_fhir: Any, make_gateway: MakeGateway, caplog: pytest.LogCaptureFixture, tmp_path: Path,
) -> Path:
    """A gateway in front of the demo server, its decision log of ``READS`` in a file."""
    caplog.set_level(logging.INFO, logger="gateway")
    gw = await make_gateway(demo_fhir.base_url)
    log = tmp_path / "gateway.log"
    await _write_log(gw, caplog, log)
    return log


async def _whatif(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()

    def call() -> int:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            return main(["whatif", *argv])

    code = await asyncio.to_thread(call)
    return code, out.getvalue(), err.getvalue()


async def test_whatif_reports_what_the_draft_would_change(
    demo_fhir: DemoFhirServer, make_gateway: MakeGateway, caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    log = await _logged_reads(demo_fhir, make_gateway, caplog, tmp_path)
    draft = tmp_path / "draft.json"
    draft.write_bytes(orjson.dumps(draft_of(demo_fhir)))
    code, out, err = await _whatif("--consent", str(draft), "--log", str(log), "--patient", "Patient/pat-bob",
                                   "--upstream", demo_fhir.base_url)
    assert code == 0, err
    rows = {tuple(line.split()[:2]): line.split()[2:] for line in out.splitlines() if line.startswith("Practitioner/")}
    assert rows == {
        ("Practitioner/dr-gp", "Condition"): ["0", "1"],     # bob-hiv newly released
        ("Practitioner/dr-gp", "Observation"): ["0", "1"],   # bob-hiv-test newly released
        ("Practitioner/dr-psych", "Observation"): ["1", "0"],  # bob-cbc newly denied
    }
    assert "replayed 3 logged read(s); skipped 1 not replayable" in out
    for secret in ("bob-hiv", "bob-cbc", "B20", "75622"):
        assert secret not in out


async def test_whatif_refuses_a_draft_for_another_patient(demo_fhir: DemoFhirServer, tmp_path: Path) -> None:
    draft = tmp_path / "draft.json"
    draft.write_bytes(orjson.dumps(draft_of(demo_fhir)))
    log = tmp_path / "empty.log"
    log.write_text("")
    code, _, err = await _whatif("--consent", str(draft), "--log", str(log), "--patient", "Patient/pat-alice",
                                 "--upstream", demo_fhir.base_url)
    assert code == 2 and err.count("\n") == 1 and "Patient/pat-bob" in err
    draft.write_text("{}")
    code, _, err = await _whatif("--consent", str(draft), "--log", str(log), "--upstream", demo_fhir.base_url)
    assert code == 2 and "not a Consent" in err


OTHER = "https://hie.elsewhere.example/fhir"


def _rebased_actor(draft: dict[str, Any], actor: str, base: str) -> dict[str, Any]:
    return dict(orjson.loads(orjson.dumps(draft).replace(f'"{actor}"'.encode(), f'"{base}/{actor}"'.encode())))


@pytest.mark.parametrize("base", ["own", "other"])
async def test_whatif_reads_the_drafts_references_as_the_proxy_does(
    demo_fhir: DemoFhirServer, make_gateway: MakeGateway, caplog: pytest.LogCaptureFixture,
    tmp_path: Path, base: str,
) -> None:
    """The draft's patient and actors written with the FHIR server's own base are this server's
    (the same report as the relative draft); another server's psychiatrist and GP are not ours:
    the permit for that GP opens nothing, the deny for that psychiatrist is unknown and closes to
    every requester of Bob's records (CONTRACT §5)."""
    log = await _logged_reads(demo_fhir, make_gateway, caplog, tmp_path)
    prefix = demo_fhir.base_url if base == "own" else OTHER
    draft = draft_of(demo_fhir)
    for actor in ("Practitioner/dr-gp", "Practitioner/dr-psych"):
        draft = _rebased_actor(draft, actor, prefix)
    if base == "own":
        draft["patient"] = {"reference": f"{demo_fhir.base_url}/Patient/pat-bob"}
    path = tmp_path / "draft.json"
    path.write_bytes(orjson.dumps(draft))
    code, out, err = await _whatif("--consent", str(path), "--log", str(log), "--patient", "Patient/pat-bob",
                                   "--upstream", demo_fhir.base_url)
    assert code == 0, err
    rows = {tuple(line.split()[:2]): line.split()[2:] for line in out.splitlines() if line.startswith("Practitioner/")}
    if base == "own":
        assert rows == {
            ("Practitioner/dr-gp", "Condition"): ["0", "1"],
            ("Practitioner/dr-gp", "Observation"): ["0", "1"],
            ("Practitioner/dr-psych", "Observation"): ["1", "0"],
        }
    else:
        assert not any(row[1] != "0" for row in rows.values()), out  # nothing newly released
        assert rows[("Practitioner/dr-gp", "Observation")][0] != "0", out  # the unknown deny closes


async def test_whatif_refuses_a_draft_about_another_servers_patient(demo_fhir: DemoFhirServer, tmp_path: Path) -> None:
    draft = draft_of(demo_fhir)
    draft["patient"] = {"reference": f"{OTHER}/Patient/pat-bob"}
    path = tmp_path / "draft.json"
    path.write_bytes(orjson.dumps(draft))
    log = tmp_path / "empty.log"
    log.write_text("")
    code, _, err = await _whatif("--consent", str(path), "--log", str(log), "--upstream", demo_fhir.base_url)
    assert code == 2 and err.count("\n") == 1 and "another FHIR server's patient" in err


async def test_whatif_without_patient_replays_with_the_gateways_upstream_credentials(
    demo_fhir: DemoFhirServer, make_gateway: MakeGateway, caplog: pytest.LogCaptureFixture,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """CONTRACT §10: ``[--patient P]`` is optional (the draft names its patient), and the reads
    are replayed "with the gateway's upstream credentials" (``upstream.auth`` of ``--config``)."""
    log = await _logged_reads(demo_fhir, make_gateway, caplog, tmp_path)
    draft = tmp_path / "draft.json"
    draft.write_bytes(orjson.dumps(draft_of(demo_fhir)))

    secured = demo_server()
    seen: list[str | None] = []

    @web.middleware
    async def bearer_only(request: web.Request, handler: Any) -> web.StreamResponse:
        seen.append(request.headers.get("Authorization"))
        if request.headers.get("Authorization") != "Bearer whatif-secret":
            return web.json_response({"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "login"}]},
                                     status=401)
        response: web.StreamResponse = await handler(request)
        return response

    app = secured.app()
    app.middlewares.append(bearer_only)
    async with serving(app) as url:
        config = tmp_path / "gateway.yaml"
        config.write_text(f"upstream:\n  url: {url}{secured.base_path}\n  auth: {{kind: bearer, token_env: WHATIF_TOKEN}}\n",
                          encoding="utf-8")
        monkeypatch.setenv("WHATIF_TOKEN", "whatif-secret")
        code, out, err = await _whatif("--consent", str(draft), "--log", str(log), "--config", str(config))
    assert code == 0, err
    rows = {tuple(line.split()[:2]): line.split()[2:] for line in out.splitlines() if line.startswith("Practitioner/")}
    assert rows == {
        ("Practitioner/dr-gp", "Condition"): ["0", "1"],
        ("Practitioner/dr-gp", "Observation"): ["0", "1"],
        ("Practitioner/dr-psych", "Observation"): ["1", "0"],
    }
    assert "replayed 3 logged read(s)" in out and "0 failed" in out
    assert seen and set(seen) == {"Bearer whatif-secret"}
