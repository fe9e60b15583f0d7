"""Load clients: wrk (closed loop) when installed, and a lean Python HTTP/1.1 client.

The Python client speaks keep-alive HTTP/1.1 over raw asyncio protocols with requests
serialized in advance, so it costs a few tens of microseconds per request; aiohttp's own
client would cost more than the bare proxy it measures. It drives the closed loop when wrk
is missing, the fixed lists of W4, and the open loop: requests leave on a fixed schedule
whatever the answers do, and each latency counts from the scheduled time, so a stall shows
up in the percentiles instead of silently slowing the client down.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field


@dataclass
class LoadResult:
    """One measured run against one target."""

    requests: int = 0
    seconds: float = 0.0
    errors: int = 0                      # connection failures and 5xx answers
    statuses: dict[int, int] = field(default_factory=dict)
    latencies_us: list[float] = field(default_factory=list)
    p50_us: float | None = None
    p99_us: float | None = None

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    def finish(self) -> LoadResult:
        """Fill the percentiles from the recorded latencies."""
        if self.latencies_us:
            ordered = sorted(self.latencies_us)
            self.p50_us = percentile(ordered, 50)
            self.p99_us = percentile(ordered, 99)
        return self

    def count(self, status: int) -> None:
        self.statuses[status] = self.statuses.get(status, 0) + 1
        if status >= 500:
            self.errors += 1


def percentile(ordered: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of an ascending sequence."""
    rank = max(0, min(len(ordered) - 1, math.ceil(pct / 100 * len(ordered)) - 1))
    return ordered[rank]


def raw_request(path: str, port: int, headers: dict[str, str]) -> bytes:
    """A serialized GET with keep-alive."""
    lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Accept: application/fhir+json"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class _Connection(asyncio.Protocol):
    """One keep-alive connection; ``send`` resolves to the status when the whole answer is in."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[int] | None = None
        self.closed = False
        self._status = 0
        self._body_start = -1
        self._length = -1
        self._chunked = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("connection closed"))

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.waiter is not None and not self.waiter.done():
            self._parse()

    def _parse(self) -> None:
        if self._body_start < 0:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buffer[:end]).lower()
            self._status = int(head[9:12])
            self._body_start = end + 4
            found = re.search(rb"\r\ncontent-length:\s*(\d+)", head)
            self._length = int(found.group(1)) if found else -1
            self._chunked = found is None and b"transfer-encoding: chunked" in head
        if self._chunked:
            done = _chunked_end(self.buffer, self._body_start)
        else:
            done = self._body_start + max(self._length, 0)
            if len(self.buffer) < done:
                return
        if done < 0:
            return
        del self.buffer[:done]
        self._body_start = -1
        assert self.waiter is not None
        self.waiter.set_result(self._status)

    async def send(self, request: bytes) -> int:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return await self.waiter

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def _chunked_end(buffer: bytearray, start: int) -> int:
    """Offset just past a complete chunked body starting at ``start``, or -1."""
    pos = start
    while True:
        line_end = buffer.find(b"\r\n", pos)
        if line_end < 0:
            return -1
        size = int(bytes(buffer[pos:line_end]).split(b";")[0], 16)
        pos = line_end + 2
        if size == 0:
            end = buffer.find(b"\r\n", pos)
            return -1 if end < 0 else end + 2
        pos += size + 2
        if pos > len(buffer):
            return -1


async def _connect(port: int) -> _Connection:
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(_Connection, "127.0.0.1", port)
    return conn


async def closed_loop(
    port: int, requests: Iterable[bytes], *, connections: int, seconds: float | None
) -> LoadResult:
    """``connections`` workers send back to back until ``seconds`` pass or ``requests`` run out."""
    result = LoadResult()
    source = iter(requests)
    conns = [await _connect(port) for _ in range(connections)]
    started = time.perf_counter()
    deadline = started + seconds if seconds is not None else float("inf")

    async def worker(conn: _Connection) -> None:
        for request in source:
            if time.perf_counter() >= deadline:
                return
            if conn.closed:
                conn = await _connect(port)
            sent = time.perf_counter()
            try:
                status = await conn.send(request)
            except ConnectionError:
                result.errors += 1
                continue
            result.latencies_us.append((time.perf_counter() - sent) * 1e6)
            result.count(status)
            result.requests += 1

    await asyncio.gather(*(worker(c) for c in conns))
    result.seconds = time.perf_counter() - started
    for conn in conns:
        conn.close()
    return result.finish()


async def open_loop(port: int, request: bytes, *, rate: float, seconds: float) -> LoadResult:
    """Send at ``rate`` per second on a fixed schedule; latency counts from the scheduled time."""
    result = LoadResult()
    idle: list[_Connection] = [await _connect(port) for _ in range(4)]
    loop = asyncio.get_running_loop()
    tasks: list[asyncio.Task[None]] = []

    async def one(scheduled: float) -> None:
        conn = idle.pop() if idle else await _connect(port)
        try:
            status = await conn.send(request)
        except ConnectionError:
            result.errors += 1
            return
        result.latencies_us.append((time.perf_counter() - scheduled) * 1e6)
        result.count(status)
        result.requests += 1
        if not conn.closed:
            idle.append(conn)

    total = max(1, int(rate * seconds))
    started = time.perf_counter()
    for n in range(total):
        scheduled = started + n / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(loop.create_task(one(scheduled)))
    await asyncio.gather(*tasks)
    result.seconds = time.perf_counter() - started
    for conn in idle:
        conn.close()
    return result.finish()


def repeat(request: bytes) -> Iterable[bytes]:
    return itertools.repeat(request)


WRK = shutil.which("wrk")
_UNITS = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6}


def _micros(text: str) -> float:
    found = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not found:
        raise ValueError(f"unexpected wrk latency {text!r}")
    return float(found.group(1)) * _UNITS[found.group(2)]


def parse_wrk(output: str) -> LoadResult:
    """Requests, duration, non-2xx/3xx answers, socket errors and p50/p99 from wrk --latency."""
    result = LoadResult()
    done = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m),", output)
    if not done:
        raise ValueError("wrk printed no request count")
    result.requests = int(done.group(1))
    result.seconds = _micros(done.group(2) + done.group(3)) / 1e6
    for pct, value in re.findall(r"^\s+(50|99)%\s+(\S+)$", output, re.M):
        if pct == "50":
            result.p50_us = _micros(value)
        else:
            result.p99_us = _micros(value)
    non_ok = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if non_ok:
        result.statuses[0] = int(non_ok.group(1))
    sockets = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    if sockets:
        result.errors += sum(int(n) for n in sockets.groups())
    return result


def run_wrk(
    url: str, headers: dict[str, str], *, connections: int, seconds: float, cpus: set[int] | None
) -> LoadResult:
    """One wrk run (one thread), pinned to ``cpus``; wrk counts whole seconds, at least one."""
    assert WRK is not None
    command = [WRK, "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency", "--timeout", "10s"]
    for name, value in headers.items():
        command += ["-H", f"{name}: {value}"]
    command.append(url)
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if cpus:
        os.sched_setaffinity(proc.pid, cpus)
    output, _ = proc.communicate(timeout=seconds + 30)
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed: {output.strip()[:300]}")
    return parse_wrk(output)
