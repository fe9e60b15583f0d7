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
import logging
import os
from pathlib import Path

import orjson

from gateway.core.errors import AuditUnavailable
from gateway.core.fhir import JSON
from gateway.upstream import Upstream

log = logging.getLogger("gateway.audit")


def disclosures_path(audit_path: Path) -> Path:
    """Where disclosure AuditEvents go: beside the break-glass audit file (``audit.jsonl`` ->
    ``audit.disclosures.jsonl``), so each file keeps one kind of event."""
    return audit_path.with_name(f"{audit_path.stem}.disclosures{audit_path.suffix or '.jsonl'}")


class AuditLog:
    """Appends AuditEvents durably; ``append`` returns only after the line is on disk."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._pending: list[tuple[bytes, asyncio.Future[None]]] = []
        self._flushing: asyncio.Task[None] | None = None
        self.written = asyncio.Event()  # set after each durable batch (wakes delivery)

    def _open(self) -> int:
        if self._fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                # A crash mid-write left a partial line: end it so the next event parses.
                os.write(fd, b"\n")
            self._fd = fd
        return self._fd

    def _write(self, data: bytes) -> None:
        fd = self._open()
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
            try:
                await asyncio.to_thread(self._write, b"".join(line for line, _ in batch))
            except OSError as exc:
                log.error("audit write failed: %s", exc.strerror or exc)
                self.close()
                for _, future in batch:
                    future.set_exception(AuditUnavailable("The access could not be audited; nothing was returned."))
                continue
            for _, future in batch:
                future.set_result(None)
            self.written.set()

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None


class AuditDelivery:
    """Delivers audit lines to a FHIR server (``PUT AuditEvent/<id>``, so retries are idempotent)."""

    def __init__(self, audit: AuditLog, server: Upstream, retry_s: float = 5.0) -> None:
        self.audit = audit
        self.server = server
        self.retry_s = retry_s
        self.offset_path = audit.path.with_name(audit.path.name + ".delivered")

    def _offset(self) -> int:
        try:
            return int(self.offset_path.read_text().strip() or 0)
        except (OSError, ValueError):
            return 0

    def _save_offset(self, offset: int) -> None:
        tmp = self.offset_path.with_name(self.offset_path.name + ".tmp")
        with open(tmp, "w") as fh:
            fh.write(str(offset))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.offset_path)

    def _read_from(self, offset: int) -> bytes:
        try:
            with open(self.audit.path, "rb") as fh:
                fh.seek(offset)
                return fh.read()
        except FileNotFoundError:
            return b""

    async def deliver_once(self) -> bool:
        """Send every undelivered line; True when all went through."""
        offset = self._offset()
        data = await asyncio.to_thread(self._read_from, offset)
        while data:
            line, sep, data = data.partition(b"\n")
            if not sep:
                break  # a line still being written
            try:
                event = orjson.loads(line)
                event_id = str(event["id"])
            except (orjson.JSONDecodeError, KeyError, TypeError):
                # A line cut short by a crash stays in the local file; delivery moves past it.
                log.error("audit line at offset %d is not an AuditEvent; not delivered", offset)
                offset += len(line) + 1
                await asyncio.to_thread(self._save_offset, offset)
                continue
            url = self.server.url_for(f"AuditEvent/{event_id}")
            resp = await self.server.request(
                "PUT", url, body=line, headers={"Content-Type": "application/fhir+json"}
            )
            if resp.status >= 300:
                return False
            offset += len(line) + 1
            await asyncio.to_thread(self._save_offset, offset)
        return True

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
                await self.audit.written.wait()
            else:
                await asyncio.sleep(self.retry_s)
