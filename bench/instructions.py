"""Instructions per request, counted by valgrind's callgrind: figures that do not move with
the machine's load, for comparing source trees (or the gateway with the bare proxy) on a
noisy machine where CPU time does.

``python -m bench.instructions [LABEL=DIR ...] [--workload W2] [--requests 30]``

Each process under test (the bare proxy, then one gateway per tree, each run from its tree)
runs under ``valgrind --tool=callgrind`` with the fixture upstream and the requests outside
it. After a warm-up, its counters are zeroed (``callgrind_control --zero``), ``--requests``
requests are sent one after the other on one keep-alive connection, and the counters are
dumped: every instruction the process ran for them, in all its threads (the kernel's work for
its system calls, such as fsync, is not counted: fewer instructions can still cost more time,
so a change that moves system calls needs ``bench.compare_trees`` too). Python's hash seed is
fixed, so a tree gives the same count run after run within a fraction of a percent.
"""

from __future__ import annotations

import argparse
import http.client
import random
import re
import socket
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench.upstream as fixture
from bench import procs, run
from bench.upstream import ACTOR, BASE_PATH

VALGRIND = shutil.which("valgrind")
CALLGRIND_CONTROL = shutil.which("callgrind_control")
# A process under valgrind runs some 50 times slower: start-up (the rules) takes minutes.
START_TIMEOUT_S = 600
_TOTALS = re.compile(rb"^(?:summary|totals):\s*(\d+)", re.MULTILINE)


def stable_port() -> int:
    """A free port below the kernel's ephemeral range: a process that starts for minutes under
    valgrind must not find its port taken by a test server bound to port 0 meanwhile (nor have
    the readiness check answered by one)."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(200):
        port = random.randrange(max(1024, low - 12_000), low)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    return procs.free_port()


def headers_for(workload: str) -> dict[str, str]:
    if workload == "W5":
        return {"X-Actor": "Practitioner/er-1", "X-Break-Glass": run.BREAK_GLASS_REASON}
    return {"X-Actor": ACTOR}


def send(port: int, path: str, headers: dict[str, str], count: int) -> None:
    """``count`` requests, one after the other, on one keep-alive connection; each must be a 200."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        for _ in range(count):
            connection.request("GET", path, headers=headers)
            answer = connection.getresponse()
            answer.read()
            if answer.status != 200:
                raise RuntimeError(f"{path} answered {answer.status}")
    finally:
        connection.close()


def _control(*args: str) -> None:
    assert CALLGRIND_CONTROL is not None
    subprocess.run([CALLGRIND_CONTROL, *args], check=True, capture_output=True)


def _dumped(workdir: Path, name: str, seen: int) -> list[int]:
    """The totals of every dump callgrind has written for ``name``, once there are more than ``seen``."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        dumps = sorted(workdir.glob(f"{name}.callgrind.*"), key=lambda d: (len(d.name), d.name))
        found = [int(m) for d in dumps for m in _TOTALS.findall(d.read_bytes())[:1]]
        if len(found) > seen:
            return found
        time.sleep(0.5)
    raise RuntimeError(f"{name}: callgrind wrote no counts")


def count(name: str, command: list[str], cwd: Path | None, workdir: Path, port: int, ready: str,
          path: str, headers: dict[str, str], requests: int) -> float:
    """Instructions per request of the process ``command``, after a warm-up: the counts of
    ``requests`` and of a fifth as many, told apart, so what a dump costs falls out."""
    out = workdir / f"{name}.callgrind"
    log = workdir / f"{name}.log"
    assert VALGRIND is not None
    wrapped = [VALGRIND, "--tool=callgrind", f"--callgrind-out-file={out}.%p", "--dump-instr=no", *command]
    if cwd is not None:
        wrapped = ["sh", "-c", 'cd "$0" && exec "$@"', str(cwd), *wrapped]
    service = procs.start(name, wrapped, port, None, log, ready, timeout_s=START_TIMEOUT_S, env={"PYTHONHASHSEED": "0"})
    few = max(requests // 5, 1)
    try:
        send(port, path, headers, 5)  # warm-up: caches, memos, the consent lookup
        pid = str(service.pid)
        _control("--zero", pid)
        send(port, path, headers, few)
        _control("--dump", pid)
        seen = len(_dumped(workdir, name, 0))
        send(port, path, headers, requests)
        _control("--dump", pid)
        totals = _dumped(workdir, name, seen)
        return (totals[-1] - totals[-2]) / (requests - few)
    except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
        raise RuntimeError(f"{name}: {exc}; its log ends: {log.read_text()[-1500:]}") from None
    finally:
        service.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__.splitlines()[0])
    parser.add_argument("trees", nargs="*", help="LABEL=DIR: a source tree of the gateway (default: this one)")
    parser.add_argument("--workload", default="W2", help="a workload with a fixed path (W1, W2, W3, W5, W6)")
    parser.add_argument("--requests", type=int, default=30)
    args = parser.parse_args(argv)
    if VALGRIND is None or CALLGRIND_CONTROL is None:
        print("bench.instructions needs valgrind (Debian: apt-get install valgrind)", file=sys.stderr)
        return 2
    trees = dict(tree.split("=", 1) for tree in args.trees) or {"gateway": "."}
    path, headers = getattr(fixture, f"{args.workload}_PATH"), headers_for(args.workload)
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="consent-instructions-") as tmp:
        workdir = Path(tmp)
        upstream_port = stable_port()
        upstream = procs.start(
            "upstream", procs.python_module("bench.upstream", "--port", str(upstream_port), "--rounds", "1",
                                            "--cold-patients", "1"),
            upstream_port, None, workdir / "upstream.log", f"{BASE_PATH}/metadata",
        )
        try:
            port = stable_port()
            bare = procs.python_module("bench.bare_proxy", "--upstream", f"http://127.0.0.1:{upstream_port}",
                                       "--port", str(port))
            figures["bare"] = count("bare", bare, None, workdir, port, "/", path, headers, args.requests)
            print(f"{'bare':>10} {figures['bare']:12,.0f} instructions/request", flush=True)
            for label, tree in trees.items():
                own = workdir / label
                own.mkdir()
                port, admin_port = stable_port(), stable_port()
                # Without the consent change poll and the readiness ping, whose instructions would
                # land among the requests' at random.
                config = run.gateway_config(own, upstream_port, port, admin_port, quiet=True)
                command = [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config)]
                # The ready check asks the proxy port: the admin port is another listener.
                figures[label] = count(label, command, Path(tree).resolve(), workdir, port, f"{BASE_PATH}/metadata",
                                       path, headers, args.requests)
                print(f"{label:>10} {figures[label]:12,.0f} instructions/request "
                      f"({figures[label] / figures['bare']:.2f}× bare)", flush=True)
        finally:
            upstream.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
