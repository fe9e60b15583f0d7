"""``consent-gateway demo --jwt``: a local issuer, a token per demo user, and curl commands that work."""

from __future__ import annotations

import os
import re
import selectors
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def _read_until(process: subprocess.Popen[bytes], marker: str, timeout_s: float = 60.0) -> str:
    """Everything the demo printed up to ``marker`` (read unbuffered: the text comes in one write)."""
    assert process.stdout is not None
    out = b""
    fd = process.stdout.fileno()
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and marker.encode() not in out:
            if selector.select(timeout=0.5):
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                out += chunk
    if marker.encode() not in out:
        raise AssertionError(f"demo did not print {marker!r} (exit {process.poll()}): {out.decode()[-2000:]}")
    return out.decode()


def _get(url: str, token: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def test_demo_jwt_prints_working_tokens(tmp_path: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "demo", "--jwt", "--port", "0", "--admin-port", "0", "--quiet-log",
         "--dir", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=0, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        text = _read_until(process, "Press Ctrl-C")
        tokens = dict(re.findall(r"^export (\w+)=(\S+)$", text, re.M))
        assert set(tokens) >= {"GP", "PSYCH", "JONES", "ER", "ALICE"}
        base = re.search(r"gateway on (http://localhost:\d+)", text)
        assert base is not None
        g = base.group(1)
        assert "curl" in text and "$GP" in text
        assert _get(f"{g}/Observation/alice-cbc", tokens["GP"])[0] == 200
        assert _get(f"{g}/Observation/bob-cbc", tokens["JONES"])[0] == 403
        status, body = _get(f"{g}/Observation", tokens["ALICE"])
        assert status == 200 and b"pat-alice" in body and b"pat-bob" not in body
        assert _get(f"{g}/Observation/alice-cbc")[0] == 401
        assert _get(f"{g}/.well-known/smart-configuration")[0] == 200
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
