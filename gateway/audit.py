"""Break-glass audit: AuditEvents appended to a JSON-lines file, fsynced before the answer.

Writes are group-committed: concurrent events share one write and one fsync, so a line is
never interleaved or lost and the cost of fsync is paid once per batch. With
``audit.fhir_url`` every line is also delivered to a FHIR server from the file itself: the
byte offset delivered so far is kept in ``<path>.delivered``, so a server that is down
loses nothing and a restart resumes where delivery stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import orjson

from gateway.core.errors import AuditUnavailable
from gateway.core.fhir import JSON
from gateway.metrics import Metrics
from gateway.upstream import Upstream

log = logging.getLogger("gateway.audit")


def disclosures_path(audit_path: Path) -> Path:
    """Where disclosure AuditEvents go: beside the break-glass audit file (``audit.jsonl`` ->
    ``audit.disclosures.jsonl``), so each file keeps one kind of event."""
    return audit_path.with_name(f"{audit_path.stem}.disclosures{audit_path.suffix or '.jsonl'}")


class AuditLog:
    """Appends AuditEvents durably; ``append`` returns only after the line is on disk.

    The file is reopened when it was rotated (renamed) or deleted since the last write, so
    events never go to a file nobody can find. With ``stdout`` each durable line is also
    printed on standard output (the gateway's own log goes to stderr) for a SIEM pipeline.
    """

    def __init__(self, path: Path, *, stdout: bool = False) -> None:
        self.path = path
        self.stdout = stdout
        self._fd: int | None = None
        self._failed = False  # the last write failed (readiness)
        self._pending: list[tuple[bytes, asyncio.Future[None]]] = []
        self._flushing: asyncio.Task[None] | None = None
        self.written = asyncio.Event()  # set after each durable batch (wakes delivery)

    def open(self) -> None:
        """Open (create) the file now; OSError when it cannot be written (start-up check)."""
        self._open()

    def writable(self) -> bool:
        """True when the last write succeeded and the file (or its directory) can be written."""
        if self._failed:
            return False
        target = self.path if self.path.exists() else self.path.parent
        return os.access(target, os.W_OK)

    def _current(self) -> bool:
        """The open descriptor still is the file at ``path`` (not rotated away or deleted)."""
        assert self._fd is not None
        try:
            at_path = os.stat(self.path)
        except FileNotFoundError:
            return False
        opened = os.fstat(self._fd)
        return (at_path.st_dev, at_path.st_ino) == (opened.st_dev, opened.st_ino)

    def _open(self) -> int:
        if self._fd is not None and not self._current():
            log.warning("audit file was rotated or deleted; reopening it")
            self.close()
        if self._fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
            # Exclusive: another process's write in progress (its size grows page by page)
            # would look like a partial line, and a newline added after it an empty one.
            with _locked(fd, fcntl.LOCK_EX):
                size = os.fstat(fd).st_size
                if size and os.pread(fd, 1, size - 1) != b"\n":
                    # A crash mid-write left a partial line: end it so the next event parses.
                    os.write(fd, b"\n")
            self._fd = fd
        return self._fd

    def _write(self, data: bytes) -> None:
        fd = self._open()
        with _locked(fd, fcntl.LOCK_SH):  # writers share the file; an opener's check waits
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
        os.fsync(fd)

    async def append(self, event: JSON) -> None:
        """Write one event as one line; AuditUnavailable (503) when it cannot be made durable."""
        line = orjson.dumps(event) + b"\n"
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((line, future))
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.create_task(self._flush())
        await future

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            data = b"".join(line for line, _ in batch)
            try:
                await asyncio.to_thread(self._write, data)
            except OSError as exc:
                log.error("audit write failed: %s", exc.strerror or exc)
                self._failed = True
                self.close()
                for _, future in batch:
                    future.set_exception(AuditUnavailable("The access could not be audited; nothing was returned."))
                continue
            self._failed = False
            if self.stdout:
                _print(data)
            for _, future in batch:
                future.set_result(None)
            self.written.set()

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None


@contextlib.contextmanager
def _locked(fd: int, kind: int) -> Iterator[None]:
    """``flock`` ``kind`` on ``fd`` for the block (several processes append to one file); the
    block runs unlocked where the file system has no such locks."""
    try:
        fcntl.flock(fd, kind)
    except OSError:
        locked = False
    else:
        locked = True
    try:
        yield
    finally:
        if locked:
            fcntl.flock(fd, fcntl.LOCK_UN)


def _print(data: bytes) -> None:
    # A closed or broken stdout must not fail an access already made durable on disk.
    with contextlib.suppress(OSError, ValueError):
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()


class AuditDelivery:
    """Delivers audit lines to a FHIR server (``PUT AuditEvent/<id>``, so retries are idempotent).

    Progress (the file's inode and the byte offset delivered) is kept in ``<path>.delivered``,
    so a restart from the same storage resumes where delivery stopped. Delivery reads through
    its own descriptor: a file rotated away or deleted is delivered to its end before the new
    file is started. ``backlog`` (bytes written but not delivered) feeds the metric.
    """

    def __init__(
        self, audit: AuditLog, server: Upstream, retry_s: float = 5.0, metrics: Metrics | None = None,
        poll_s: float | None = None,
    ) -> None:
        self.audit = audit
        self.server = server
        self.retry_s = retry_s
        self.metrics = metrics
        # Other processes append to the same file (listen.workers): look every ``poll_s``
        # as well as after this process's own writes.
        self.poll_s = poll_s
        self.offset_path = audit.path.with_name(audit.path.name + ".delivered")
        self._file: BinaryIO | None = None
        self._inode: int | None = None
        self._offset = 0

    def _load(self) -> None:
        """Open the file delivery is at, resuming from the saved progress."""
        try:
            saved = self.offset_path.read_text().split()
        except OSError:
            saved = []
        if not self._open_current():
            return
        try:
            if len(saved) == 1:  # the progress format of earlier versions: an offset only
                self._offset = int(saved[0])
            elif len(saved) == 2 and int(saved[0]) == self._inode:
                self._offset = int(saved[1])
            elif saved:
                log.error("audit file was replaced while the gateway was stopped; "
                          "delivery starts at the new file")
                self._offset = 0
        except ValueError:
            self._offset = 0

    def _open_current(self) -> bool:
        try:
            self._file = open(self.audit.path, "rb")  # noqa: SIM115 - kept open across rotations
        except FileNotFoundError:
            return False
        self._inode = os.fstat(self._file.fileno()).st_ino
        return True

    def _save(self) -> None:
        tmp = self.offset_path.with_name(self.offset_path.name + ".tmp")
        with open(tmp, "w") as fh:
            fh.write(f"{self._inode} {self._offset}")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.offset_path)

    def _read(self) -> bytes:
        """Undelivered bytes of the current file; moves on to a new file at ``path`` at the end."""
        if self._file is None:
            self._load()
            if self._file is None:
                return b""
        self._file.seek(self._offset)
        data = self._file.read()
        if not data and self._rotated():
            self._file.close()
            self._file, self._offset = None, 0
            if not self._open_current():
                return b""
            self._save()
            return self._read()
        return data

    def _rotated(self) -> bool:
        try:
            return os.stat(self.audit.path).st_ino != self._inode
        except FileNotFoundError:
            return False

    def backlog(self) -> int:
        """Bytes written to the audit file(s) and not delivered yet."""
        total = 0
        if self._file is not None:
            total += max(0, os.fstat(self._file.fileno()).st_size - self._offset)
        try:
            at_path = os.stat(self.audit.path)
        except FileNotFoundError:
            return total
        if self._file is None:
            return at_path.st_size
        return total + (at_path.st_size if at_path.st_ino != self._inode else 0)

    async def deliver_once(self) -> bool:
        """Send every undelivered line; True when all went through."""
        try:
            data = await asyncio.to_thread(self._read)
            while data:
                line, sep, data = data.partition(b"\n")
                if not sep:
                    break  # a line still being written
                if not await self._deliver(line):
                    return False
                self._offset += len(line) + 1
                await asyncio.to_thread(self._save)
                if not data:
                    data = await asyncio.to_thread(self._read)
            return True
        finally:
            if self.metrics is not None:
                self.metrics.audit_backlog.set(await asyncio.to_thread(self.backlog))

    async def _deliver(self, line: bytes) -> bool:
        try:
            event = orjson.loads(line)
            event_id = str(event["id"])
        except (orjson.JSONDecodeError, KeyError, TypeError):
            # A line cut short by a crash stays in the local file; delivery moves past it.
            log.error("audit line at offset %d is not an AuditEvent; not delivered", self._offset)
            return True
        url = self.server.url_for(f"AuditEvent/{event_id}")
        resp = await self.server.request("PUT", url, body=line, headers={"Content-Type": "application/fhir+json"})
        return resp.status < 300

    async def run(self) -> None:
        """Deliver forever: after each durable write, and every ``retry_s`` until caught up."""
        while True:
            self.audit.written.clear()
            try:
                done = await self.deliver_once()
            except Exception as exc:  # a down server or a bad line: keep the queue, retry later
                log.warning("audit delivery failed: %s", type(exc).__name__)
                done = False
            if done:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.poll_s):
                        await self.audit.written.wait()
            else:
                await asyncio.sleep(self.retry_s)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
