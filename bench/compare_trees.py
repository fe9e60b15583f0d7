"""CPU per request of the gateway from two or more source trees, in one run, alternating.

``python -m bench.compare_trees main=/path/to/main mine=. [--workload W1] [--rounds 8]``

One fixture upstream (on the load CPU), the bare proxy and one gateway per tree (each run
from its tree, so ``-m gateway.cli`` imports that tree's package) on the CPU under test;
``wrk`` loads each in turn, the order reversed every round, and each process's CPU per
answered request is read from ``/proc/<pid>/stat``. On a noisy machine only figures of the
same run compare; the medians and every round are printed.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import bench.upstream as fixture
from bench import procs, run
from bench.upstream import ACTOR


def wrk(port: int, path: str, seconds: int, connections: int, cpus: set[int] | None,
        headers: dict[str, str] | None = None) -> int:
    """Answered requests of one wrk run (with the bench's requester header unless ``headers``)."""
    pin = ["taskset", "-c", ",".join(map(str, sorted(cpus)))] if cpus else []
    sent = headers if headers is not None else {"X-Actor": ACTOR}
    flags = [part for name, value in sent.items() for part in ("-H", f"{name}: {value}")]
    out = subprocess.run(
        [*pin, "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", *flags,
         f"http://127.0.0.1:{port}{path}"],
        capture_output=True, text=True, check=True,
    ).stdout
    found = re.search(r"(\d+) requests in", out)
    if found is None:
        raise RuntimeError(f"wrk said: {out}")
    return int(found[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compare_trees", description=__doc__.splitlines()[0])
    parser.add_argument("trees", nargs="+", help="LABEL=DIR: a source tree of the gateway")
    parser.add_argument("--workload", default="W1", help="a workload with a fixed path (W1, W2, W3, W5: break-glass, W6)")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=8)
    args = parser.parse_args(argv)
    trees = dict(tree.split("=", 1) for tree in args.trees)
    path = getattr(fixture, f"{args.workload}_PATH")
    # W5 is the break-glass read: every request audited (fsync) before its answer.
    headers = {"X-Actor": "Practitioner/er-1", "X-Break-Glass": run.BREAK_GLASS_REASON} if args.workload == "W5" else None
    cores = procs.Cores.split()
    services: dict[str, procs.Service] = {}
    with tempfile.TemporaryDirectory(prefix="consent-compare-") as tmp:
        workdir = Path(tmp)
        try:
            upstream_port = run.start_baselines(workdir, cores, 1, 10, services)
            for label, tree in trees.items():
                own = workdir / label
                own.mkdir()
                port, admin_port = procs.free_port(), procs.free_port()
                config = run.gateway_config(own, upstream_port, port, admin_port)
                command = ["sh", "-c", 'cd "$0" && exec "$1" -m gateway.cli serve --config "$2"',
                           str(Path(tree).resolve()), sys.executable, str(config)]
                started = procs.start(label, command, admin_port, cores.under_test, own / "gateway.log", "/healthz")
                services[label] = procs.Service(label, started.proc, port)
            measured = ["bare", *trees]
            figures: dict[str, list[float]] = {name: [] for name in measured}
            for name in measured:  # warm-up
                wrk(services[name].port, path, 2, args.connections, cores.load, headers)
            for round_no in range(args.rounds):
                for name in measured if round_no % 2 == 0 else reversed(measured):
                    pid = services[name].proc.pid
                    before = procs.cpu_seconds(pid)
                    answered = wrk(services[name].port, path, args.seconds, args.connections, cores.load, headers)
                    per_request = (procs.cpu_seconds(pid) - before) / answered * 1e6
                    figures[name].append(per_request)
                    print(f"round {round_no} {name:>10} {answered:7d} requests {per_request:7.0f} µs CPU/request",
                          flush=True)
        finally:
            for service in reversed(services.values()):
                service.stop()
    print(f"\n{args.workload}, CPU per request (median, then every round):")
    for name, values in figures.items():
        print(f"{name:>10} {statistics.median(values):7.0f} µs  {[round(v) for v in values]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
