"""The price of consent, measured against a bare proxy in the same run: ``python -m bench.run``.

Starts a fixture upstream, the baselines (direct upstream, nginx pass-through, a bare aiohttp
proxy) and the gateway (``consent-gateway serve``) as separate processes, the one under test
pinned to its own CPU; warms up; then runs interleaved rounds in rotating order and reports
every figure as a ratio or difference measured side by side within a round. Writes
``bench/results.json`` (``bench/results-smoke.json`` with ``--smoke``) and prints Markdown.

``--smoke`` is a quick check that every workload still runs end to end; it never fails on a
figure. ``--profile W2,W3`` runs the named workloads against a gateway under cProfile instead.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import load, micro, procs
from bench.upstream import (
    ACTOR, BASE_PATH, W1_PATH, W2_PATH, W3_PATH, W5_PATH, W6_PATH, cold_path, cold_patient, cold_set_names,
)

BENCH_DIR = Path(__file__).resolve().parent
CONNECTIONS = 32
BREAK_GLASS_REASON = "Medical emergency"


@dataclass(frozen=True)
class Mode:
    """How long each measurement runs."""

    name: str
    rounds: int
    throughput_s: float
    c1_s: float
    open_loop_s: float
    warmup_s: float
    cold_patients: int
    cold_repeats: int

    @classmethod
    def of(cls, smoke: bool, rounds: int | None) -> Mode:
        if smoke:
            return cls("smoke", rounds or 1, 0.3, 0.2, 0.3, 0.2, 100, 4)
        # wrk runs whole seconds only (it drives the closed loop, warm-up included).
        return cls("full", rounds or 5, 2.0, 0.75, 1.5, 1.0, 1000, 4)


@dataclass(frozen=True)
class Workload:
    """One request shape and the targets it is measured on; ``reference`` is the denominator.

    With ``break_glass_actor``, the ``gateway`` target asks as that actor with X-Break-Glass
    while every other target asks as ``ACTOR``, who has no emergency access window.
    """

    name: str
    title: str
    path: str | None
    targets: tuple[str, ...]
    reference: str = "bare"
    break_glass_actor: str | None = None
    cold: bool = False

    def headers(self, target: str) -> dict[str, str]:
        if self.break_glass_actor and target == "gateway":
            return {"X-Actor": self.break_glass_actor, "X-Break-Glass": BREAK_GLASS_REASON}
        return {"X-Actor": ACTOR}

    def latency_targets(self) -> tuple[str, ...]:
        """The targets whose latencies are compared: the gateway and its references."""
        return tuple(t for t in self.targets if t in ("bare", "gateway", "gateway-nobg"))


ALL = ("direct", "nginx", "bare", "gateway")
WORKLOADS = (
    Workload("W1", "single read, permitted", W1_PATH, ALL),
    Workload("W2", "search, 100 entries, 40 % sensitive, consent filters some", W2_PATH, ALL),
    Workload("W3", "Patient/$everything, 1,000 resources", W3_PATH, ALL),
    Workload("W4", "cold cache: distinct patients, 4 concurrent requests each", None, ALL, cold=True),
    Workload("W5", "break-glass read (audit fsync) vs the same read without", W5_PATH,
             ("bare", "gateway-nobg", "gateway"), reference="gateway-nobg", break_glass_actor="Practitioner/er-1"),
    Workload("W6", "search of a patient who opted out", W6_PATH, ALL),
)


@dataclass
class Sample:
    """One measurement of one target in one round."""

    rps: float = 0.0
    requests: int = 0
    cpu_us: float | None = None
    errors: int = 0
    p50_us: float | None = None
    p99_us: float | None = None


@dataclass
class Series:
    """A target's samples across rounds, per kind of measurement."""

    throughput: list[Sample] = field(default_factory=list)
    c1: list[Sample] = field(default_factory=list)
    open_loop: list[Sample] = field(default_factory=list)


@dataclass
class Bench:
    """The running processes and what has been measured so far."""

    mode: Mode
    client: str
    cores: procs.Cores
    workdir: Path
    services: dict[str, procs.Service]
    series: dict[str, dict[str, Series]] = field(default_factory=dict)
    rates: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    cold_queries: list[dict[str, Any]] = field(default_factory=list)
    audit: dict[str, int] = field(default_factory=lambda: {"answered": 0, "audited": 0})
    probes: dict[str, dict[str, Any]] = field(default_factory=dict)
    break_glass: bool = False
    load_average: float = field(default_factory=lambda: os.getloadavg()[0])

    def service(self, target: str) -> procs.Service:
        return self.services["gateway" if target.startswith("gateway") else ("upstream" if target == "direct" else target)]

    def record(self, workload: str, target: str) -> Series:
        return self.series.setdefault(workload, {}).setdefault(target, Series())


# ---- processes -------------------------------------------------------------------------

def gateway_config(workdir: Path, upstream_port: int, port: int, admin_port: int, *, quiet: bool = False) -> Path:
    """The gateway's YAML: defaults, except a cache TTL that outlasts the run; ``quiet``: also
    without the timed background work (the consent change poll, the readiness ping)."""
    path = workdir / "gateway.yaml"
    upstream_extra, consent_extra = (", health_interval_s: 3600", ", change_poll_s: 0") if quiet else ("", "")
    path.write_text(
        f"upstream: {{url: 'http://127.0.0.1:{upstream_port}{BASE_PATH}'{upstream_extra}}}\n"
        f"listen: {{host: 127.0.0.1, port: {port}}}\n"
        f"admin: {{host: 127.0.0.1, port: {admin_port}}}\n"
        f"consent: {{cache_ttl_s: 3600{consent_extra}}}\n"
        f"audit: {{path: '{workdir / 'audit.jsonl'}'}}\n"
    )
    return path


def start_gateway(workdir: Path, upstream_port: int, cores: procs.Cores, profile: Path | None = None) -> procs.Service:
    port, admin_port = procs.free_port(), procs.free_port()
    config = gateway_config(workdir, upstream_port, port, admin_port)
    runner = ["-m", "cProfile", "-o", str(profile)] if profile else []
    command = [sys.executable, *runner, "-m", "gateway.cli", "serve", "--config", str(config)]
    service = procs.start("gateway", command, admin_port, cores.under_test, workdir / "gateway.log", "/healthz")
    return procs.Service("gateway", service.proc, port)


def start_baselines(
    workdir: Path, cores: procs.Cores, rounds: int, cold_patients: int, services: dict[str, procs.Service],
) -> int:
    """Start the fixture upstream (on the load CPU) and the bare proxy (on the CPU under test)
    into ``services``; the upstream's port."""
    upstream_port = procs.free_port()
    services["upstream"] = procs.start(
        "upstream",
        procs.python_module("bench.upstream", "--port", str(upstream_port), "--rounds", str(rounds),
                            "--cold-patients", str(cold_patients)),
        upstream_port, cores.load, workdir / "upstream.log", f"{BASE_PATH}/metadata",
    )
    bare_port = procs.free_port()
    services["bare"] = procs.start(
        "bare", procs.python_module("bench.bare_proxy", "--upstream", f"http://127.0.0.1:{upstream_port}",
                                    "--port", str(bare_port)),
        bare_port, cores.under_test, workdir / "bare.log",
    )
    return upstream_port


def start_services(mode: Mode, workdir: Path, cores: procs.Cores) -> dict[str, procs.Service]:
    services: dict[str, procs.Service] = {}
    upstream_port = start_baselines(workdir, cores, mode.rounds, mode.cold_patients, services)
    nginx = procs.start_nginx(workdir, procs.free_port(), upstream_port, cores.under_test)
    if nginx is not None:
        services["nginx"] = nginx
    services["gateway"] = start_gateway(workdir, upstream_port, cores)
    return services


def run_setup() -> str | None:
    """Install wrk and nginx when possible; the one-line note setup.sh prints, if any."""
    done = subprocess.run(["bash", str(BENCH_DIR / "setup.sh")], capture_output=True, text=True, timeout=300)
    return done.stdout.strip() or None


def http(method: str, url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


# ---- measuring -------------------------------------------------------------------------

def workload_targets(bench: Bench, workload: Workload) -> tuple[str, ...]:
    return tuple(t for t in workload.targets if t != "nginx" or "nginx" in bench.services)


def rotated(items: tuple[str, ...], shift: int) -> tuple[str, ...]:
    shift %= len(items)
    return items[shift:] + items[:shift]


def cold_requests(bench: Bench, workload: Workload, port: int, cold_set: str) -> Iterator[bytes]:
    """Each patient of the set asked ``cold_repeats`` times in a row, so they arrive together."""
    for n in range(bench.mode.cold_patients):
        request = load.raw_request(cold_path(cold_patient(cold_set, n)), port, workload.headers("gateway"))
        for _ in range(bench.mode.cold_repeats):
            yield request


async def throughput(bench: Bench, workload: Workload, target: str, seconds: float, cold_set: str) -> Sample:
    """Closed loop at CONNECTIONS; the target process's CPU per request from /proc."""
    service = bench.service(target)
    headers = workload.headers(target)
    cpu_before = service.cpu()
    if workload.cold:
        result = await load.closed_loop(
            service.port, cold_requests(bench, workload, service.port, cold_set), connections=CONNECTIONS, seconds=None
        )
    elif bench.client == "wrk":
        assert workload.path is not None
        result = load.run_wrk(f"http://127.0.0.1:{service.port}{workload.path}", headers,
                              connections=CONNECTIONS, seconds=seconds, cpus=bench.cores.load)
    else:
        assert workload.path is not None
        request = load.raw_request(workload.path, service.port, headers)
        result = await load.closed_loop(service.port, load.repeat(request), connections=CONNECTIONS, seconds=seconds)
    cpu = service.cpu() - cpu_before
    return Sample(result.rps, result.requests, cpu / result.requests * 1e6 if result.requests else None,
                  unexpected_errors(bench, workload, target, result), result.p50_us, result.p99_us)


def unexpected_errors(bench: Bench, workload: Workload, target: str, result: load.LoadResult) -> int:
    """Failures: connection errors and 5xx, plus non-2xx answers where the probe got a 2xx."""
    errors = result.errors
    if 0 in result.statuses and bench.probes.get(f"{workload.name}/{target}", {}).get("status", 200) < 300:
        errors += result.statuses[0]
    return errors


async def latency_c1(bench: Bench, workload: Workload, target: str) -> Sample:
    """One request at a time: the latency the gateway adds when nothing queues."""
    assert workload.path is not None
    service = bench.service(target)
    request = load.raw_request(workload.path, service.port, workload.headers(target))
    result = await load.closed_loop(service.port, load.repeat(request), connections=1, seconds=bench.mode.c1_s)
    return Sample(result.rps, result.requests, None, result.errors, result.p50_us, result.p99_us)


async def latency_open(bench: Bench, workload: Workload, target: str) -> Sample:
    """Open loop at the workload's fixed rate: latency from each request's scheduled time."""
    assert workload.path is not None
    service = bench.service(target)
    request = load.raw_request(workload.path, service.port, workload.headers(target))
    result = await load.open_loop(service.port, request, rate=bench.rates[workload.name], seconds=bench.mode.open_loop_s)
    return Sample(result.rps, result.requests, None, result.errors, result.p50_us, result.p99_us)


def audit_lines(bench: Bench) -> int:
    path = bench.workdir / "audit.jsonl"
    return sum(1 for _ in path.open("rb")) if path.exists() else 0


async def measure_throughput(bench: Bench, workload: Workload, target: str, seconds: float, cold_set: str) -> Sample:
    """A throughput sample, with W4's consent-query count and W5's audit count around it."""
    is_cold_gateway = workload.cold and target == "gateway"
    upstream = f"http://127.0.0.1:{bench.services['upstream'].port}"
    if is_cold_gateway:
        http("POST", f"{upstream}/_bench/reset")
    audited_before = audit_lines(bench)
    sample = await throughput(bench, workload, target, seconds, cold_set)
    if is_cold_gateway:
        _, _, body = http("GET", f"{upstream}/_bench/consent-queries")
        counts = json.loads(body)
        per_patient = [counts.get(cold_patient(cold_set, n), 0) for n in range(bench.mode.cold_patients)]
        bench.cold_queries.append({
            "set": cold_set, "patients": len(per_patient), "queries": sum(per_patient),
            "min": min(per_patient), "max": max(per_patient), "errors": sample.errors,
        })
    if workload.name == "W5" and target == "gateway" and cold_set != "w":
        bench.audit["answered"] += sample.requests - sample.errors
        bench.audit["audited"] += audit_lines(bench) - audited_before
    return sample


async def one_round(bench: Bench, workloads: list[Workload], round_no: int) -> None:
    cold_set = str(round_no)
    for workload in workloads:
        targets = rotated(workload_targets(bench, workload), round_no)
        for target in targets:
            sample = await measure_throughput(bench, workload, target, bench.mode.throughput_s, cold_set)
            bench.record(workload.name, target).throughput.append(sample)
        if workload.cold:
            continue
        for target in rotated(workload.latency_targets(), round_no):
            bench.record(workload.name, target).c1.append(await latency_c1(bench, workload, target))
        for target in rotated(workload.latency_targets(), round_no):
            bench.record(workload.name, target).open_loop.append(await latency_open(bench, workload, target))


async def warm_up(bench: Bench, workloads: list[Workload]) -> None:
    """Fill caches, pools and JITs of every target; set each workload's open-loop rate."""
    for workload in workloads:
        speeds = {}
        for target in workload_targets(bench, workload):
            sample = await measure_throughput(bench, workload, target, bench.mode.warmup_s, "w")
            speeds[target] = sample.rps
        if not workload.cold:
            slowest = min(speeds[t] for t in workload.latency_targets())
            # A third of the slowest target's capacity: a load it serves without queueing,
            # with headroom for the noise of a shared machine.
            bench.rates[workload.name] = max(5.0, min(1000.0, round(slowest / 3)))


def probe(bench: Bench, workloads: list[Workload]) -> None:
    """One request per workload and target: status, decision header and entries returned."""
    for workload in workloads:
        path = workload.path or cold_path(cold_patient("w", 0))
        for target in workload_targets(bench, workload):
            status, headers, body = http("GET", f"http://127.0.0.1:{bench.service(target).port}{path}",
                                         workload.headers(target))
            found: dict[str, Any] = {"status": status, "bytes": len(body)}
            if "X-Consent-Decision" in headers:
                found["decision"] = headers["X-Consent-Decision"]
            try:
                parsed = json.loads(body)
                if parsed.get("resourceType") == "Bundle":
                    found["entries"] = len(parsed.get("entry") or ())
            except ValueError:
                pass
            if workload.name == "W5" and target == "gateway":
                bench.break_glass = "X-Break-Glass-Audit-Id" in headers and status == 200
                found["audit_id"] = "X-Break-Glass-Audit-Id" in headers
            bench.probes[f"{workload.name}/{target}"] = found


# ---- figures ---------------------------------------------------------------------------

def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def paired(a: list[Sample], b: list[Sample], attr: str, op: str) -> float | None:
    """Median over rounds of a per-round ratio (``/``) or difference (``-``) of one figure."""
    values = []
    for x, y in zip(a, b):
        vx, vy = getattr(x, attr), getattr(y, attr)
        if vx is None or vy is None or (op == "/" and not vy):
            continue
        values.append(vx / vy if op == "/" else vx - vy)
    return median(values)


def summarize(bench: Bench, workload: Workload) -> dict[str, Any]:
    """The workload's figures: per-round values and the medians of paired comparisons."""
    series = bench.series.get(workload.name, {})
    gateway = series.get("gateway", Series())
    reference = series.get(workload.reference, Series())
    bare = series.get("bare", Series())
    out: dict[str, Any] = {
        "title": workload.title,
        "request": f"GET {workload.path or cold_path('Patient/<cold patient>')}",
        "reference": workload.reference,
        "open_loop_rate_per_s": bench.rates.get(workload.name),
        "targets": {
            name: {
                "rps": [round(s.rps, 1) for s in s_.throughput],
                "cpu_us_per_request": [round(s.cpu_us, 1) for s in s_.throughput if s.cpu_us is not None],
                "errors": sum(s.errors for s in s_.throughput + s_.c1 + s_.open_loop),
                "c1_p50_us": [s.p50_us for s in s_.c1], "c1_p99_us": [s.p99_us for s in s_.c1],
                "open_loop_p50_us": [s.p50_us for s in s_.open_loop],
                "open_loop_p99_us": [s.p99_us for s in s_.open_loop],
                "probe": bench.probes.get(f"{workload.name}/{name}"),
            }
            for name, s_ in series.items()
        },
        "throughput_ratio": paired(gateway.throughput, reference.throughput, "rps", "/"),
        "throughput_ratio_to_bare": paired(gateway.throughput, bare.throughput, "rps", "/"),
        "added_cpu_us_per_request": paired(gateway.throughput, bare.throughput, "cpu_us", "-"),
        "gateway_cpu_us_per_request": median([s.cpu_us for s in gateway.throughput if s.cpu_us is not None]),
        "bare_cpu_us_per_request": median([s.cpu_us for s in bare.throughput if s.cpu_us is not None]),
        "added_c1_p50_us": paired(gateway.c1, bare.c1, "p50_us", "-"),
        "added_c1_p99_us": paired(gateway.c1, bare.c1, "p99_us", "-"),
        "added_open_loop_p50_us": paired(gateway.open_loop, bare.open_loop, "p50_us", "-"),
        "added_open_loop_p99_us": paired(gateway.open_loop, bare.open_loop, "p99_us", "-"),
    }
    for base in ("nginx", "direct"):
        if base in series:
            out[f"throughput_ratio_to_{base}"] = paired(gateway.throughput, series[base].throughput, "rps", "/")
    return out


def target(name: str, figure: float | None, limit: float, at_least: bool, unit: str) -> dict[str, Any]:
    met = None if figure is None else (figure >= limit if at_least else figure <= limit)
    return {"target": name, "figure": None if figure is None else round(figure, 3), "limit": limit,
            "unit": unit, "met": met}


def targets(results: dict[str, Any], bench: Bench) -> list[dict[str, Any]]:
    w = results["workloads"]
    micro_figures = results["in_process"]
    # Resources parsed whole: what answers of W2's and W3's size take.
    decision = max(v for k, v in micro_figures["decision_us_per_resource"].items() if "views" not in k)
    out = [
        target("W1 throughput ≥ 0.75× bare", w["W1"]["throughput_ratio"], 0.75, True, "×"),
        target("W2 throughput ≥ 0.35× bare", w["W2"]["throughput_ratio"], 0.35, True, "×"),
        target("W3 CPU ≤ 5 ms above bare per 1,000-resource response",
               w["W3"]["added_cpu_us_per_request"], 5000, False, "µs"),
        target("label extraction + decision ≤ 1.5 µs per resource", decision, 1.5, False, "µs"),
        target("peak memory ≤ 3× the answer (large answer, views)", micro_figures["peak_memory"]["peak_ratio"],
               3.0, False, "×"),
        target("≤ 4 KiB per cached patient with 2 Consents", micro_figures["bytes_per_cached_patient"], 4096, False, "B"),
    ]
    cold = [c for c in bench.cold_queries if c["set"] != "w"]  # the rounds' sets, not the warm-up's
    exact = bool(cold) and all(c["min"] == 1 and c["max"] == 1 and c["errors"] == 0 for c in cold)
    per_patient = sum(c["queries"] for c in cold) / max(1, sum(c["patients"] for c in cold))
    out.append({"target": "W4 exactly one consent query per patient, zero errors", "figure": round(per_patient, 3),
                "limit": 1, "unit": "queries/patient", "met": exact,
                "detail": f"min {min((c['min'] for c in cold), default=0)}, max {max((c['max'] for c in cold), default=0)}, "
                          f"errors {sum(c['errors'] for c in cold)}"})
    if bench.break_glass:
        row = target("W5 break-glass ≥ 0.95× the same request without", w["W5"]["throughput_ratio"], 0.95, True, "×")
        audited = bench.audit["audited"] >= bench.audit["answered"] > 0
        row["met"] = bool(row["met"]) and audited
        row["detail"] = f"{bench.audit['audited']} audit lines for {bench.audit['answered']} answered requests"
    else:
        row = {"target": "W5 break-glass ≥ 0.95× the same request without, every request audited", "figure": None,
               "limit": 0.95, "unit": "×", "met": None, "detail": "not measurable yet: break-glass is not supported"}
    out.append(row)
    return out


# ---- report ----------------------------------------------------------------------------

def fmt(value: float | None, unit: str = "", digits: int = 0) -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}{unit}"


def markdown(results: dict[str, Any]) -> str:
    lines = [
        f"Consent gateway vs bare aiohttp proxy — {results['mode']} mode, {results['rounds']} interleaved "
        f"round(s), client {results['client']}, {results['cores']}.",
        "",
        "| workload | gw/bare thr. | gw/nginx | gw/direct | +p50 c=1 | +p99 c=1 | rate | +p50 open | +p99 open "
        "| CPU/req gw (bare) | gw answer | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, w in results["workloads"].items():
        gw = w["targets"].get("gateway", {})
        bare = w["targets"].get("bare", {})
        probe_ = gw.get("probe") or {}
        answer = " ".join(str(x) for x in (probe_.get("status"), probe_.get("decision"),
                                             f"{probe_['entries']} entries" if "entries" in probe_ else None) if x)
        ratio = fmt(w["throughput_ratio_to_bare"], "×", 2)
        if w["reference"] != "bare":
            ratio += f" ({fmt(w['throughput_ratio'], '×', 2)} vs {w['reference']})"
        lines.append(
            f"| {name} {w['title']} | {ratio} | {fmt(w.get('throughput_ratio_to_nginx'), '×', 2)} "
            f"| {fmt(w.get('throughput_ratio_to_direct'), '×', 2)} "
            f"| {fmt(w['added_c1_p50_us'], ' µs')} | {fmt(w['added_c1_p99_us'], ' µs')} "
            f"| {fmt(w['open_loop_rate_per_s'], '/s')} "
            f"| {fmt(w['added_open_loop_p50_us'], ' µs')} | {fmt(w['added_open_loop_p99_us'], ' µs')} "
            f"| {fmt(w['gateway_cpu_us_per_request'], ' µs')} ({fmt(w['bare_cpu_us_per_request'], ' µs')}) "
            f"| {answer} | {gw.get('errors', 0)} (bare {bare.get('errors', 0)}) |"
        )
    figures = results["in_process"]
    lines += ["", "In process (no sockets):", ""]
    for name, value in figures["decision_us_per_resource"].items():
        lines.append(f"- label extraction + decision, {name} resources: {value:.2f} µs per resource")
    lines.append(f"- consent cache: {figures['bytes_per_cached_patient']:,.0f} bytes per patient with 2 Consents")
    peak = figures["peak_memory"]
    lines.append(f"- a {peak['answer_bytes'] / 1e6:,.1f} MB answer of small resources, decided on views: the pipeline's "
                 f"peak allocations {peak['peak_ratio']:.2f}× the answer")
    for name, p in figures["pipeline"].items():
        lines.append(
            f"- {name} body parse + enforce + splice: {p['gateway_us']:,.0f} µs (first reading, nothing remembered: "
            f"{p['gateway_first_reading_us']:,.0f} µs; on views: {p['views_us']:,.0f} µs); "
            f"whole-body orjson round trip "
            f"{p['orjson_round_trip_us']:,.0f} µs; stdlib json round trip {p['stdlib_json_round_trip_us']:,.0f} µs "
            f"({p['stdlib_json_round_trip_us'] / p['gateway_us']:.2f}× the gateway's time; the aim is ≥ 2×)"
        )
    lines += ["", "| target | figure | met |", "|---|---|---|"]
    for row in results["targets"]:
        met = {True: "met", False: "NOT met", None: "not measured"}[row["met"]]
        digits = 2 if row["unit"] in ("×", "queries/patient") or row["figure"] and row["figure"] < 100 else 0
        figure = "–" if row["figure"] is None else f"{row['figure']:,.{digits}f} {row['unit']}"
        detail = f" ({row['detail']})" if row.get("detail") else ""
        lines.append(f"| {row['target']} | {figure}{detail} | {met} |")
    if results["notes"]:
        lines += [""] + [f"Note: {n}" for n in results["notes"]]
    return "\n".join(lines)


# ---- main ------------------------------------------------------------------------------

def results_of(bench: Bench, workloads: list[Workload], micro_figures: dict[str, Any], seconds: float) -> dict[str, Any]:
    results: dict[str, Any] = {
        "command": "python -m bench.run" + (" --smoke" if bench.mode.name == "smoke" else ""),
        "mode": bench.mode.name,
        "rounds": bench.mode.rounds,
        "client": bench.client,
        "cores": bench.cores.describe(),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                    "load_average_at_start": bench.load_average, "load_average_at_end": os.getloadavg()[0]},
        "seconds": round(seconds, 1),
        "connections": CONNECTIONS,
        "in_process": micro_figures,
        "workloads": {w.name: summarize(bench, w) for w in workloads},
        "cold_cache_consent_queries": bench.cold_queries,
        "notes": bench.notes,
    }
    results["targets"] = targets(results, bench)
    return results


async def measure(bench: Bench, workloads: list[Workload]) -> None:
    probe(bench, workloads)
    if not bench.break_glass:
        bench.notes.append("W5 not measurable yet: the gateway does not answer break-glass with an audit id.")
        workloads[:] = [w for w in workloads if w.name != "W5"]
    await warm_up(bench, workloads)
    for round_no in range(bench.mode.rounds):
        await one_round(bench, workloads, round_no)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="one short round of everything (≤ 60 s)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 5; 1 with --smoke)")
    parser.add_argument("--client", choices=("wrk", "python"), help="closed-loop load client (default: wrk if installed)")
    parser.add_argument("--no-setup", action="store_true", help="do not try to install wrk and nginx")
    parser.add_argument("--out", type=Path, help="results file (default bench/results.json, or results-smoke.json)")
    parser.add_argument("--profile", help="comma-separated workloads to run under cProfile (e.g. W2,W3)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    mode = Mode.of(args.smoke, args.rounds)
    notes: list[str] = []
    if not (args.smoke or args.no_setup):
        note = run_setup()
        if note:
            notes.append(note)
    # Smoke runs are too short for wrk's whole seconds, and exercise the Python client CI has.
    client = args.client or ("wrk" if load.WRK and not args.smoke else "python")
    if client == "wrk" and not load.WRK:
        parser.error("wrk is not installed")
    cores = procs.Cores.split()
    if cores.load:
        os.sched_setaffinity(0, cores.load)
    with tempfile.TemporaryDirectory(prefix="consent-bench-") as tmp:
        workdir = Path(tmp)
        if args.profile:
            return profile(mode, workdir, cores, [w for w in WORKLOADS if w.name in args.profile.split(",")])
        services = start_services(mode, workdir, cores)
        if "nginx" not in services:
            notes.append("nginx is not installed: no nginx baseline.")
        bench = Bench(mode, client, cores, workdir, services, notes=notes)
        workloads = list(WORKLOADS)
        try:
            micro_figures = micro.measure(args.smoke, f"http://127.0.0.1:{services['upstream'].port}{BASE_PATH}")
            asyncio.run(measure(bench, workloads))
        finally:
            for service in reversed(services.values()):
                service.stop()
    results = results_of(bench, workloads, micro_figures, time.perf_counter() - started)
    out = args.out or BENCH_DIR / ("results-smoke.json" if args.smoke else "results.json")
    out.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    print(markdown(results))
    print(f"\n{results['command']}: {results['seconds']} s; figures in {out}")
    return 0


def profile(mode: Mode, workdir: Path, cores: procs.Cores, workloads: list[Workload]) -> int:
    """Run each workload for a few seconds against a gateway under cProfile; print the hot spots."""
    services = start_services(mode, workdir, cores)
    services["gateway"].stop()
    try:
        for workload in workloads:
            assert workload.path is not None, "profile a workload with a fixed request"
            prof = workdir / f"{workload.name}.prof"
            services["gateway"] = start_gateway(workdir, services["upstream"].port, cores, prof)
            request = load.raw_request(workload.path, services["gateway"].port, workload.headers("gateway"))
            result = asyncio.run(load.closed_loop(services["gateway"].port, load.repeat(request),
                                                  connections=CONNECTIONS, seconds=8.0))
            services["gateway"].stop()
            print(f"\n## {workload.name} {workload.title}: {result.requests} requests under cProfile\n")
            stats = pstats.Stats(str(prof))
            stats.sort_stats("tottime").print_stats(25)
            saved = Path(tempfile.gettempdir()) / f"consent-bench-profile-{workload.name}.prof"
            saved.write_bytes(prof.read_bytes())
            print(f"(saved {saved}; per request divide by {result.requests})")
    finally:
        for service in services.values():
            service.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
