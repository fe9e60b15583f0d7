"""Helpers shared by the proxy-core unit tests: error-body checks, raw HTTP, free ports."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from tests.conftest import GatewayUnderTest

FHIR_JSON = "application/fhir+json"

MakeGateway = Callable[..., Awaitable[GatewayUnderTest]]

# Text that must never appear in an error body the gateway makes.
INTERNAL_MARKERS = ("Traceback", "/work/", 'File "', "site-packages", "aiohttp.", "Error(")


def assert_outcome(
    status: int,
    content_type: str,
    body: bytes,
    expected_status: int,
    *,
    issue_code: str | None = None,
    upstream: str | None = None,
) -> dict[str, Any]:
    """Check one gateway error answer and return the parsed OperationOutcome.

    ``upstream`` is the upstream's ``host:port``; it must not appear in the body.
    """
    assert status == expected_status, body
    assert content_type == FHIR_JSON
    text = body.decode("utf-8")
    for marker in INTERNAL_MARKERS:
        assert marker not in text, f"{marker!r} leaked into {text}"
    if upstream is not None:
        assert upstream not in text
    outcome: dict[str, Any] = orjson.loads(body)
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"] and outcome["issue"][0]["severity"] in ("error", "fatal")
    if issue_code is not None:
        assert outcome["issue"][0]["code"] == issue_code
    return outcome


def diagnostics(outcome: dict[str, Any]) -> str:
    """The human-readable text of the first issue."""
    return str(outcome["issue"][0].get("diagnostics", ""))


def host_port(url: str) -> str:
    """``127.0.0.1:1234`` out of ``http://127.0.0.1:1234/fhir``."""
    return url.split("://", 1)[1].split("/", 1)[0]


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def raw_http(port: int, request: bytes, timeout_s: float = 5.0) -> bytes:
    """Send bytes as-is (the request should say ``Connection: close``) and read until EOF."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout_s)
    finally:
        writer.close()


def split_http(answer: bytes) -> tuple[int, dict[str, str], bytes]:
    """Status, lower-cased headers and body of a raw HTTP/1.x answer."""
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


def gateway_command() -> list[str]:
    """The installed ``consent-gateway`` script of this interpreter, else ``python -m gateway.cli``."""
    script = Path(sys.executable).parent / "consent-gateway"
    if script.exists():
        return [str(script)]
    found = shutil.which("consent-gateway")
    return [found] if found else [sys.executable, "-m", "gateway.cli"]


def clean_env(extra: tuple[tuple[str, str], ...] = ()) -> dict[str, str]:
    """The environment without any GATEWAY_* setting of the caller's, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(extra)
    return env


async def start_serving(
    config: Path, admin_port: int, cwd: Path, *, capture: bool = True, timeout_s: float = 20.0
) -> asyncio.subprocess.Process:
    """Start ``consent-gateway serve`` without blocking this loop (a fake upstream may run on it)
    and wait until its /healthz answers."""
    output = asyncio.subprocess.PIPE if capture else asyncio.subprocess.DEVNULL
    proc = await asyncio.create_subprocess_exec(
        *gateway_command(), "serve", "--config", str(config),
        stdout=output, stderr=output, env=clean_env(), cwd=cwd,
    )
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            assert proc.returncode is None, "gateway exited during start-up"
            try:
                async with session.get(f"http://127.0.0.1:{admin_port}/healthz") as resp:
                    if resp.status == 200:
                        return proc
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.05)
    proc.kill()
    raise AssertionError("gateway did not start")
