"""``consent-gateway serve``: a bad config exits 2 with one line; SIGTERM drains, exits 0.

One process per problem the issue names, all started at once in a module fixture (start-up
costs most of the time); further variants call ``cli.main`` in-process.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from gateway.app import build_state, start
from gateway.cli import main
from tests.conftest import gateway_settings
from tests.fakes import FakeFhir
from tests.unit._util import assert_outcome, clean_env, free_port, gateway_command, start_serving

GOOD_UPSTREAM = "upstream: {url: http://127.0.0.1:9/fhir}\n"
TAKEN_PORT = "{taken}"


@dataclass(frozen=True)
class BadStart:
    """One bad start-up: config text (None: the path does not exist), extra env, expected words."""

    config: str | None
    expected: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()


# One process per problem named in the issue; variants of each run in-process below.
BAD_STARTS: dict[str, BadStart] = {
    "unknown-key": BadStart(GOOD_UPSTREAM + "listen: {prot: 8080}\n", ("listen.prot", "unknown key")),
    "wrong-type": BadStart(GOOD_UPSTREAM + "listen: {port: eighty}\n", ("listen.port", "integer")),
    "missing-upstream-url": BadStart("listen: {port: 8080}\n", ("upstream.url", "missing")),
    "bad-url": BadStart("upstream: {url: fhir.local/fhir}\n", ("upstream.url", "http")),
    "env-port-out-of-range": BadStart(GOOD_UPSTREAM, ("admin.port", "65535"), env=(("GATEWAY_ADMIN__PORT", "65536"),)),
    "unreadable-file": BadStart(None, ("cannot read config file", "missing.yaml")),
    "invalid-yaml": BadStart("upstream: {url: http://h/fhir\nlisten: [1, 2\n", ("invalid YAML", "line")),
    "audit-directory-missing": BadStart(
        GOOD_UPSTREAM + "audit: {path: no-such-dir/audit.jsonl}\n", ("audit.path", "cannot write the audit file"),
    ),
    "missing-rules-dir": BadStart(
        GOOD_UPSTREAM + "sensitivity: {rules_dir: ./no-such-rules}\n", ("sensitivity.rules_dir", "no-such-rules", "not a directory")
    ),
    "port-taken": BadStart(
        GOOD_UPSTREAM + "listen: {host: 127.0.0.1, port: " + TAKEN_PORT + "}\nadmin: {host: 127.0.0.1, port: 0}\n",
        ("cannot listen",),
    ),
}


@dataclass(frozen=True)
class Finished:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture(scope="module")
def bad_start_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Finished]:
    """Run every BAD_STARTS case at once (one port held busy) and collect exit code and output."""
    root = tmp_path_factory.mktemp("bad-configs")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        procs: dict[str, subprocess.Popen[str]] = {}
        for name, case in BAD_STARTS.items():
            path = root / name / ("missing.yaml" if case.config is None else "gateway.yaml")
            path.parent.mkdir()
            if case.config is not None:
                path.write_text(case.config.replace(TAKEN_PORT, str(taken.getsockname()[1])), encoding="utf-8")
            procs[name] = subprocess.Popen(
                [*gateway_command(), "serve", "--config", str(path)],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env(case.env), cwd=root,
            )
        results: dict[str, Finished] = {}
        for name, proc in procs.items():
            try:
                out, err = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
            results[name] = Finished(proc.returncode, out, err)
    return results


@pytest.mark.parametrize("name", list(BAD_STARTS))
def test_bad_start_exits_2_with_one_line(name: str, bad_start_results: dict[str, Finished]) -> None:
    result = bad_start_results[name]
    assert result.returncode == 2, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for word in BAD_STARTS[name].expected:
        assert word in lines[0], lines[0]
    assert result.stdout == ""


IN_PROCESS_CASES: dict[str, tuple[str | None, list[str], dict[str, str], tuple[str, ...]]] = {
    "unknown-section": (GOOD_UPSTREAM + "consnet: {cache_ttl_s: 5}\n", [], {}, ("consnet", "unknown key")),
    "wrong-type-bool": (GOOD_UPSTREAM + "break_glass: {enabled: sometimes}\n", [], {}, ("break_glass.enabled",)),
    "empty-file": ("", [], {}, ("upstream.url", "missing")),
    "bad-url-port": ("upstream: {url: 'http://fhir:123456/fhir'}\n", [], {}, ("upstream.url", "port")),
    "port-out-of-range-in-file": (GOOD_UPSTREAM + "listen: {port: 65536}\n", [], {}, ("listen.port", "65535")),
    "unreadable-directory": (None, [], {}, ("cannot read config file",)),
    "env-unknown-key": (GOOD_UPSTREAM, [], {"GATEWAY_UPSTREAM__RETRIES": "3"}, ("upstream.retries", "unknown key")),
    "env-bad-yaml": (GOOD_UPSTREAM, [], {"GATEWAY_BREAK_GLASS__REASONS": "[a, b"}, ("GATEWAY_BREAK_GLASS__REASONS",)),
    "flag-bad-url": ("", ["--upstream", "not-a-url"], {}, ("upstream.url",)),
    "empty-rules-dir": (GOOD_UPSTREAM + "sensitivity: {rules_dir: '{tmp}/empty'}\n", [], {}, ("sensitivity.rules_dir", "no rules")),
    "broken-rules-file": (
        GOOD_UPSTREAM + "sensitivity: {rules_dir: '{tmp}/rules'}\n", [], {}, ("sensitivity.rules_dir", "bad.yaml", "malformed YAML")
    ),
    "passed-hop-by-hop-header": (
        GOOD_UPSTREAM.replace("}", ", passed_response_headers: [X-Rate-Limit, Keep-Alive]}"), [], {},
        ("upstream.passed_response_headers", "Keep-Alive", "hop-by-hop"),
    ),
    "env-passed-gateway-header": (
        GOOD_UPSTREAM, [], {"GATEWAY_UPSTREAM__PASSED_RESPONSE_HEADERS": "X-Rate-Limit,X-Consent-Decision"},
        ("upstream.passed_response_headers", "X-Consent-Decision", "gateway's own"),
    ),
    "env-rules-dir-missing": (
        GOOD_UPSTREAM, [], {"GATEWAY_SENSITIVITY__RULES_DIR": "/nonexistent/rules"}, ("sensitivity.rules_dir", "not a directory")
    ),
}


@pytest.mark.parametrize("name", list(IN_PROCESS_CASES))
def test_bad_config_variants_exit_2_with_one_line(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    text, args, env, expected = IN_PROCESS_CASES[name]
    path = tmp_path / "gateway.yaml"
    (tmp_path / "rules").mkdir()
    (tmp_path / "empty").mkdir()
    (tmp_path / "rules" / "bad.yaml").write_text("kind: [category\n", encoding="utf-8")
    if text is None:
        path.mkdir()
    else:
        path.write_text(text.replace("{tmp}", str(tmp_path)), encoding="utf-8")
    for key in [k for k in os.environ if k.startswith("GATEWAY_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert main(["serve", "--config", str(path), *args]) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("consent-gateway: ")
    for word in expected:
        assert word in lines[0], lines[0]
    assert captured.out == ""


def _serve_config(tmp_path: Path, upstream_url: str, shutdown_timeout_s: float) -> tuple[Path, int, int]:
    """A config file for a gateway in front of ``upstream_url`` on two free ports."""
    proxy_port, admin_port = free_port(), free_port()
    config = tmp_path / "gateway.yaml"
    config.write_text(
        f"upstream: {{url: '{upstream_url}', timeout_s: 30}}\n"
        f"listen: {{host: 127.0.0.1, port: {proxy_port}, shutdown_timeout_s: {shutdown_timeout_s}}}\n"
        f"admin: {{host: 127.0.0.1, port: {admin_port}}}\n"
        f"audit: {{path: '{tmp_path / 'audit.jsonl'}'}}\n",
        encoding="utf-8",
    )
    return config, proxy_port, admin_port


async def _wait_for_request(fake: FakeFhir, path_qs: str) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if any(r.path_qs == path_qs for r in fake.requests):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{path_qs} never reached the upstream")


async def _refused(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return True
    writer.close()
    return False


SHUTDOWN_BOUND_S = 2.0


async def test_sigterm_stops_accepting_finishes_in_flight_within_bound_and_exits_0(
    fake_fhir: FakeFhir, tmp_path: Path
) -> None:
    """A slow request (1 s) in flight completes with 200; a stuck one is cut at the bound."""
    fake_fhir.add({"resourceType": "Practitioner", "id": "pr-slow", "name": [{"family": "Osler"}]})
    release = asyncio.Event()

    async def slow_or_stuck(request: web.Request) -> web.StreamResponse | None:
        if request.path.endswith("/pr-slow"):
            await asyncio.sleep(1.0)
        elif request.path.endswith("/pr-stuck"):
            await asyncio.wait_for(release.wait(), 30)
        return None

    fake_fhir.override = slow_or_stuck
    config, proxy_port, admin_port = _serve_config(tmp_path, fake_fhir.base_url, SHUTDOWN_BOUND_S)
    proc = await start_serving(config, admin_port, tmp_path)
    actor = {"X-Actor": "Practitioner/doc-1"}
    try:
        async with aiohttp.ClientSession() as session:
            slow = asyncio.ensure_future(session.get(f"http://127.0.0.1:{proxy_port}/Practitioner/pr-slow", headers=actor))
            stuck = asyncio.ensure_future(session.get(f"http://127.0.0.1:{proxy_port}/Practitioner/pr-stuck", headers=actor))
            await _wait_for_request(fake_fhir, "/fhir/Practitioner/pr-slow")
            await _wait_for_request(fake_fhir, "/fhir/Practitioner/pr-stuck")
            signalled = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            refused_while_in_flight = False
            while not slow.done() and not refused_while_in_flight:
                refused_while_in_flight = await _refused(proxy_port)
                await asyncio.sleep(0.05)
            assert refused_while_in_flight and not slow.done(), "new connections accepted after SIGTERM"
            resp = await asyncio.wait_for(slow, 10)
            assert resp.status == 200
            assert (await resp.json(content_type=None))["id"] == "pr-slow"
            resp.release()
            # The stuck request is cut at the bound with a 503, not an empty reply.
            cut = await asyncio.wait_for(stuck, 10)
            assert cut.status == 503 and cut.headers["Retry-After"] == "1"
            assert (await cut.json(content_type=None))["resourceType"] == "OperationOutcome"
            _, stderr = await asyncio.wait_for(proc.communicate(), 10)
            elapsed = time.monotonic() - signalled
    finally:
        release.set()
        if proc.returncode is None:
            proc.kill()
            await proc.communicate()
    assert proc.returncode == 0, stderr
    assert b"Traceback" not in stderr
    # Bounded; the strict bound is checked in-process below.
    assert elapsed < 2 * SHUTDOWN_BOUND_S + 1.5, f"shutdown took {elapsed:.1f} s, shutdown_timeout_s {SHUTDOWN_BOUND_S}"


async def test_stuck_request_holds_shutdown_no_longer_than_the_setting_and_answers_503(
    fake_fhir: FakeFhir, tmp_path: Path
) -> None:
    release = asyncio.Event()

    async def stuck(request: web.Request) -> web.StreamResponse | None:
        if request.path.endswith("/pr-stuck"):
            await asyncio.wait_for(release.wait(), 30)
        return None

    fake_fhir.override = stuck
    bound = 0.5
    state = build_state(gateway_settings(
        fake_fhir.base_url, listen={"shutdown_timeout_s": bound}, audit={"path": str(tmp_path / "audit.jsonl")}
    ))
    running = await start(state)
    try:
        async with aiohttp.ClientSession() as session:
            request = asyncio.ensure_future(
                session.get(f"http://127.0.0.1:{running.proxy_port}/Practitioner/pr-stuck",
                            headers={"X-Actor": "Practitioner/doc-1"})
            )
            await _wait_for_request(fake_fhir, "/fhir/Practitioner/pr-stuck")
            started = time.monotonic()
            await running.stop()
            elapsed = time.monotonic() - started
            # The cut request gets an answer, not an empty reply (CONTRACT §2).
            resp = await asyncio.wait_for(request, 5)
            body = await resp.read()
    finally:
        release.set()
    assert elapsed < bound + 0.3, f"stop took {elapsed:.2f} s with shutdown_timeout_s {bound}"
    outcome = assert_outcome(resp.status, resp.content_type, body, 503, issue_code="transient")
    assert outcome["issue"][0]["details"]["coding"][0]["code"] == "shutting-down"
    assert resp.headers["Retry-After"] == "1"
    assert state.metrics.registry.get_sample_value("consent_gateway_errors_total", {"code": "shutting-down"}) == 1
