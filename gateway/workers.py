"""``listen.workers`` above 1: a supervisor and the worker processes it starts.

The supervisor checks the settings as a single process would (rules, audit files, keys:
exit 2), makes a private run directory (mode 0700: the settings, the metric files of
prometheus_client's multiprocess mode, the workers' sockets, and the key that seals paging
links when ``enforcement.paging_key_file`` names none) and starts each worker as
``python -m gateway.workers``. Every worker binds the proxy port with SO_REUSEPORT, so the
kernel spreads connections over them; worker 0 also serves the admin port and delivers the
audit files; each listens on a private socket for cache invalidations (``gateway.peers``).

A worker that stops before it listens (a port taken, a file unreadable) stops them all, and
the supervisor exits with its code: restarting would fail the same way. A worker that dies
later is replaced after ``RESTART_DELAY_S``. SIGTERM or SIGINT to the supervisor sends
SIGTERM to every worker, which drains as a single process does (``listen.shutdown_timeout_s``);
a worker whose supervisor is gone (its stdin closes) drains and stops too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import orjson

from gateway.app import build_state, configure_logging, start, tune_gc, until_signalled
from gateway.config import ConfigError, Settings, build_settings
from gateway.peers import Announcer, WorkerRole
from gateway.rules import RulesError
from gateway.sealing import write_random_key
from gateway.web.state import GatewayState

log = logging.getLogger("gateway.workers")

SETTINGS_FILE = "settings.json"
PAGING_KEY_FILE = "paging.key"
LISTENING = b"listening\n"
RESTART_DELAY_S = 1.0
# Beyond listen.shutdown_timeout_s, how long a stopping worker may take before it is killed.
STOP_SLACK_S = 5.0


@dataclass
class _Worker:
    index: int
    process: asyncio.subprocess.Process
    exited: asyncio.Task[int]
    listened: asyncio.Task[bool]  # the worker said it listens (False: it ended before)


def supervise(settings: Settings) -> int:
    """Run ``listen.workers`` workers until SIGTERM or SIGINT; returns the exit code."""
    state = build_state(settings)  # the start-up checks, once, before any worker starts
    state.audit.close()
    if state.disclosures is not None:
        state.disclosures.close()
    try:
        run_dir = Path(tempfile.mkdtemp(prefix="consent-gateway-"))
    except OSError as exc:
        raise ConfigError(
            f"listen.workers: cannot make a run directory in {tempfile.gettempdir()}: {exc.strerror or exc}"
        ) from None
    try:
        (run_dir / "metrics").mkdir()
        settings_path = run_dir / SETTINGS_FILE
        settings_path.touch(0o600)
        shared = settings.model_dump(mode="json")
        if settings.enforcement.paging_key_file is None:
            # Every worker seals and opens paging links under one key: a link one handed out
            # is followed on a connection another one accepts.
            write_random_key(run_dir / PAGING_KEY_FILE)
            shared["enforcement"]["paging_key_file"] = str(run_dir / PAGING_KEY_FILE)
        settings_path.write_bytes(orjson.dumps(shared))
        return asyncio.run(_supervise(settings, run_dir))
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


async def _supervise(settings: Settings, run_dir: Path) -> int:
    count = settings.listen.workers
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    stopping = asyncio.create_task(stop.wait())
    workers = {i: await _spawn(run_dir, i, count) for i in range(count)}
    log.info("supervisor: %d workers started", count)
    code = 0
    while not code and not stop.is_set():
        await asyncio.wait([stopping, *(w.exited for w in workers.values())], return_when=asyncio.FIRST_COMPLETED)
        for index, worker in list(workers.items()):
            if stop.is_set() or not worker.exited.done():
                continue
            status = worker.exited.result()
            _forget(worker, run_dir)
            if not await worker.listened:
                log.error("worker %d exited with code %d before it listened; stopping", index, status)
                code = status if status > 0 else 1
                break
            log.error("worker %d (pid %d) exited with code %d; starting another", index, worker.process.pid, status)
            await asyncio.wait([stopping], timeout=RESTART_DELAY_S)
            if not stop.is_set():
                workers[index] = await _spawn(run_dir, index, count)
    stopped = await _stop_all(list(workers.values()), settings.listen.shutdown_timeout_s + STOP_SLACK_S, run_dir)
    stopping.cancel()
    return code or (0 if stopped else 1)


async def _spawn(run_dir: Path, index: int, count: int) -> _Worker:
    read_fd, write_fd = os.pipe()
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway.workers", str(run_dir), str(index), str(count), str(write_fd),
            # The worker watches its stdin: when it closes, the supervisor is gone.
            stdin=asyncio.subprocess.PIPE, pass_fds=(write_fd,),
            # Its own session: a terminal's Ctrl-C reaches only the supervisor, which stops each once.
            start_new_session=True,
            # prometheus_client reads this when it is imported: set before the worker starts.
            env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(run_dir / "metrics")},
        )
    finally:
        os.close(write_fd)
    return _Worker(index, process, asyncio.create_task(process.wait()), asyncio.create_task(_reported(read_fd)))


async def _reported(fd: int) -> bool:
    """True when the worker wrote LISTENING before closing its end of the pipe."""
    reader = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb"))
    try:
        return await reader.read() == LISTENING
    finally:
        transport.close()


def _forget(worker: _Worker, run_dir: Path) -> None:
    """Drop a dead worker's live gauges (its counters stay in the sums)."""
    from prometheus_client.multiprocess import mark_process_dead

    mark_process_dead(worker.process.pid, str(run_dir / "metrics"))  # type: ignore[no-untyped-call]


async def _stop_all(workers: list[_Worker], limit_s: float, run_dir: Path) -> bool:
    """SIGTERM each worker and wait for all; True when every one stopped by itself with 0."""
    for worker in workers:
        if worker.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                worker.process.send_signal(signal.SIGTERM)
    clean = True
    try:
        async with asyncio.timeout(limit_s):
            codes = await asyncio.gather(*(w.exited for w in workers))
        # -SIGTERM: a worker stopped before it had set up its own handling (still starting).
        clean = all(c in (0, -signal.SIGTERM) for c in codes)
    except TimeoutError:
        clean = False
        for worker in workers:
            if worker.process.returncode is None:
                log.error("worker %d did not stop within %.0f s; killing it", worker.index, limit_s)
                worker.process.kill()
        await asyncio.gather(*(w.exited for w in workers))
    for worker in workers:
        worker.listened.cancel()
        if worker.process.stdin is not None:
            worker.process.stdin.close()
        _forget(worker, run_dir)
    return clean


class _WorkerField(logging.Filter):
    """Puts ``worker`` (the index) on every log line of a worker process."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.index
        return True


def worker_main(argv: Sequence[str]) -> int:
    """One worker: ``<run_dir> <index> <count> <ready_fd>``, as the supervisor starts it."""
    run_dir, index, count, ready_fd = Path(argv[0]), int(argv[1]), int(argv[2]), int(argv[3])
    configure_logging()
    for handler in logging.getLogger("gateway").handlers:
        handler.addFilter(_WorkerField(index))
    try:
        settings = build_settings(orjson.loads((run_dir / SETTINGS_FILE).read_bytes()))
        state = build_state(settings)
    except (ConfigError, RulesError) as exc:
        print(f"consent-gateway: config error: {exc}", file=sys.stderr)
        return 2
    state.worker = WorkerRole(index, count, run_dir)
    state.store.announce = Announcer(state.worker).announce
    try:
        asyncio.run(_serve(state, ready_fd))
    except OSError as exc:
        print(f"consent-gateway: cannot listen: {exc.strerror or exc}", file=sys.stderr)
        return 2
    return 0


async def _serve(state: GatewayState, ready_fd: int) -> None:
    running = await start(state)
    tune_gc()
    listen = state.settings.listen
    if state.worker.owner:
        log.info("listening: proxy %s:%d, admin %s:%d", listen.host, running.proxy_port,
                 state.settings.admin.host, running.admin_port)
    else:
        log.info("listening: proxy %s:%d", listen.host, running.proxy_port)
    os.write(ready_fd, LISTENING)
    os.close(ready_fd)
    signalled = asyncio.create_task(until_signalled())
    orphaned = asyncio.create_task(_stdin_closed())
    await asyncio.wait([signalled, orphaned], return_when=asyncio.FIRST_COMPLETED)
    for task in (signalled, orphaned):
        task.cancel()
    await running.stop()


async def _stdin_closed() -> None:
    """Returns when standard input reaches its end (the supervisor has gone)."""
    reader = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        while await reader.read(4096):
            pass
    finally:
        transport.close()


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
