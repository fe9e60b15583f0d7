"""The wheel: built from the checkout, installed into a fresh virtualenv, it serves with its own rules.

This is what ``pip install .`` and the Dockerfile do. The wheel is built and installed once per
session (pip's cache makes the dependency install quick); the checks then run the installed
``consent-gateway`` from a directory that holds no source tree, so nothing of the checkout can
stand in for what the wheel lacks.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from .support import REPO


@dataclass(frozen=True)
class Installed:
    wheel: Path
    script: Path
    home: Path  # an empty working directory, far from the checkout


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "PYTHON", "VIRTUAL_ENV"))}
    return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    root = tmp_path_factory.mktemp("wheel")
    dist = root / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(dist), str(REPO)],
        check=True, env=_env(), cwd=root, timeout=300,
    )
    (wheel,) = dist.glob("consent_gateway-*.whl")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(wheel)],
        check=True, env=_env(), cwd=root, timeout=600,
    )
    home = root / "home"
    home.mkdir()
    return Installed(wheel, venv / "bin" / "consent-gateway", home)


def test_wheel_carries_every_rules_file(installed: Installed) -> None:
    with zipfile.ZipFile(installed.wheel) as wheel:
        names = wheel.namelist()
    shipped = {Path(n).name for n in names if n.startswith("gateway/bundled_rules/")}
    assert shipped == {p.name for p in (REPO / "rules").glob("*.yaml")}
    assert "gateway/demo/seed.json" in names  # consent-gateway demo loads it
    assert "gateway/py.typed" in names


def test_installed_label_command_uses_the_bundled_rules(installed: Installed) -> None:
    condition = {
        "resourceType": "Condition",
        "id": "c1",
        "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "F11.20"}]},
    }
    path = installed.home / "condition.json"
    path.write_text(json.dumps(condition), encoding="utf-8")
    result = subprocess.run(
        [str(installed.script), "label", str(path)],
        capture_output=True, text=True, env=_env(), cwd=installed.home, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "OPIOIDUD" in result.stdout


def test_installed_label_command_reads_the_bundled_term_lists(installed: Installed) -> None:
    flag = {"resourceType": "Flag", "id": "f1", "status": "active", "code": {"text": "HIV-1 positive"}}
    path = installed.home / "flag.json"
    path.write_text(json.dumps(flag), encoding="utf-8")
    result = subprocess.run(
        [str(installed.script), "label", str(path)],
        capture_output=True, text=True, env=_env(), cwd=installed.home, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "HIV" in result.stdout and "terms-hiv-sti.yaml" in result.stdout


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_installed_serve_starts_with_no_rules_dir(installed: Installed) -> None:
    admin = _free_port()
    config = installed.home / "gateway.yaml"
    config.write_text(
        "upstream: {url: http://127.0.0.1:9/fhir}\n"
        f"listen: {{host: 127.0.0.1, port: {_free_port()}}}\n"
        f"admin: {{host: 127.0.0.1, port: {admin}}}\n"
        f"audit: {{path: {installed.home / 'audit.jsonl'}}}\n",
        encoding="utf-8",
    )
    proc = subprocess.Popen(
        [str(installed.script), "serve", "--config", str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=installed.home,
    )
    try:
        status = _wait_for_health(proc, admin)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert status == 200, err
    assert "Traceback" not in err
    assert proc.returncode == 0, err


def _wait_for_health(proc: subprocess.Popen[str], port: int, timeout_s: float = 30.0) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return -1
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as resp:
                return int(resp.status)
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.1)
    return 0


def test_installed_serve_with_a_bad_rules_dir_is_one_line_exit_2(installed: Installed) -> None:
    config = installed.home / "bad-rules.yaml"
    config.write_text(
        "upstream: {url: http://127.0.0.1:9/fhir}\nsensitivity: {rules_dir: /nonexistent/rules}\n", encoding="utf-8"
    )
    result = subprocess.run(
        [str(installed.script), "serve", "--config", str(config)],
        capture_output=True, text=True, env=_env(), cwd=installed.home, timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "consent-gateway: config error: sensitivity.rules_dir: /nonexistent/rules: not a directory"
    ]
