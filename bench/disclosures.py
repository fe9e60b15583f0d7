"""W2 with ``audit.disclosures: sensitive`` against the same gateway with ``none``.

``python -m bench.disclosures [--rounds N] [--seconds S] [--connections C]`` starts the bench's
fixture upstream and two gateways (one per setting), then measures W2 on each in interleaved
rounds (the order alternating), and prints the median of the per-round ratios of throughput
and of the gateway's CPU time per request. The disclosure AuditEvents are fsynced and
group-committed as in production. The figure the accounting of disclosures is held to: at
most 10 % (CONTRACT §10).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from bench.procs import free_port
from bench.upstream import ACTOR, W2_PATH

MODES = ("sensitive", "none")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def wait_for(url: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(url) as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise SystemExit(f"not answering: {url}")


async def load(url: str, seconds: float, connections: int) -> int:
    """Closed loop: ``connections`` clients asking ``url`` for ``seconds``; the answers counted."""
    done = 0
    stop = time.monotonic() + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections)) as session:
        async def client() -> None:
            nonlocal done
            while time.monotonic() < stop:
                async with session.get(url, headers={"X-Actor": ACTOR}) as resp:
                    await resp.read()
                    if resp.status != 200:
                        raise SystemExit(f"W2 answered {resp.status}")
                done += 1
        await asyncio.gather(*(client() for _ in range(connections)))
    return done


def start_gateway(workdir: Path, mode: str, upstream: int) -> tuple[subprocess.Popen[bytes], int, int]:
    port, admin = free_port(), free_port()
    config = workdir / f"{mode}.yaml"
    config.write_text(
        f"upstream: {{url: 'http://127.0.0.1:{upstream}/fhir'}}\n"
        f"listen: {{host: 127.0.0.1, port: {port}}}\nadmin: {{host: 127.0.0.1, port: {admin}}}\n"
        "consent: {cache_ttl_s: 3600}\n"
        f"audit: {{path: '{workdir / (mode + '-audit.jsonl')}', disclosures: {mode}}}\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", "--config", str(config)], env=env,
                            stderr=open(workdir / f"{mode}.log", "wb"))
    return proc, port, admin


async def measure(rounds: int, seconds: float, connections: int) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="consent-bench-disclosures-"))
    upstream = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "bench.upstream", "--port", str(upstream), "--rounds", "0",
                               "--cold-patients", "1"])]
    try:
        await wait_for(f"http://127.0.0.1:{upstream}/fhir/metadata")
        gateways = {}
        for mode in MODES:
            proc, port, admin = start_gateway(workdir, mode, upstream)
            procs.append(proc)
            await wait_for(f"http://127.0.0.1:{admin}/healthz")
            gateways[mode] = (proc, f"http://127.0.0.1:{port}{W2_PATH}")
            await load(gateways[mode][1], 2, connections)  # warm-up
        rps: dict[str, list[float]] = {m: [] for m in MODES}
        cpu: dict[str, list[float]] = {m: [] for m in MODES}
        for n in range(rounds):
            for mode in MODES if n % 2 == 0 else tuple(reversed(MODES)):
                proc, url = gateways[mode]
                cpu_before, started = cpu_seconds(proc.pid), time.monotonic()
                answered = await load(url, seconds, connections)
                rps[mode].append(answered / (time.monotonic() - started))
                cpu[mode].append((cpu_seconds(proc.pid) - cpu_before) / answered * 1e6)
        for mode in MODES:
            print(f"{mode:>9}: {statistics.median(rps[mode]):.1f} requests/s, "
                  f"{statistics.median(cpu[mode]):.0f} µs gateway CPU per request (medians of {rounds} rounds)")
        throughput = statistics.median(a / b for a, b in zip(rps["sensitive"], rps["none"]))
        cpu_ratio = statistics.median(a / b for a, b in zip(cpu["sensitive"], cpu["none"]))
        lines = sum(1 for _ in open(workdir / "sensitive-audit.disclosures.jsonl", "rb"))
        print(f"W2 throughput with disclosures / without: {throughput:.3f}")
        print(f"W2 gateway CPU per request with / without: {cpu_ratio:.3f}")
        print(f"{lines} disclosure AuditEvents written")
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.disclosures", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=3.0, help="per round and setting")
    parser.add_argument("--connections", type=int, default=8)
    args = parser.parse_args()
    asyncio.run(measure(args.rounds, args.seconds, args.connections))


if __name__ == "__main__":
    main()
