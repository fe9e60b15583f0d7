"""CONTRACT §2 ``consent-gateway demo``: the printed curl commands are ready to paste and show
a permit, a filtered search, a deny and a break-glass (run here as printed, through bash)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from tests.identity.test_demo_jwt import _read_until
from tests.unit._util import clean_env, gateway_command


def _run(line: str) -> tuple[int, dict[str, str]]:
    """Run one printed curl command as-is, adding only where to put the status and headers."""
    done = subprocess.run(
        ["bash", "-c", line + " -o /dev/null -D - -w 'STATUS:%{http_code}'"],
        capture_output=True, text=True, timeout=30, check=False,
    )
    head, _, status = done.stdout.rpartition("STATUS:")
    headers = {}
    for header in head.splitlines()[1:]:
        name, sep, value = header.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return int(status), headers


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_demo_prints_curl_commands_that_show_permit_filter_deny_and_break_glass(tmp_path: Path) -> None:
    process = subprocess.Popen(
        [*gateway_command(), "demo", "--port", "0", "--admin-port", "0", "--shadow-port", "0", "--quiet-log",
         "--dir", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=0, env={**clean_env(), "PYTHONUNBUFFERED": "1"},
    )
    try:
        text = _read_until(process, "Press Ctrl-C")
        sections = re.split(r"^# (\d+)\. ", text, flags=re.M)
        by_number = {int(sections[i]): sections[i + 1] for i in range(1, len(sections) - 1, 2)}
        curls = {n: [line for line in body.splitlines() if line.startswith("curl ")] for n, body in by_number.items()}
        [permit] = curls[1]
        status, headers = _run(permit)
        assert (status, headers["x-consent-decision"]) == (200, "permit")
        bob, psych, gp = curls[2]
        assert (_run(bob)[0], _run(bob)[1]["x-consent-decision"]) == (200, "filtered")
        assert _run(psych)[1]["x-consent-decision"] == "permit"
        assert _run(gp)[1]["x-consent-decision"] == "filtered"
        for deny in curls[3]:
            status, headers = _run(deny)
            assert (status, headers["x-consent-decision"]) == (403, "deny"), deny
        glass, window = curls[4]
        status, headers = _run(glass)
        assert status == 200 and headers["x-break-glass-audit-id"]
        status, headers = _run(window)
        assert status == 200 and headers["x-break-glass-audit-id"]
        audit = (tmp_path / "audit.jsonl").read_text().splitlines()
        assert len(audit) >= 2
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
