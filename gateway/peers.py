"""Several worker processes on one proxy port: which one this is, and reaching the others.

Worker 0 owns the admin port and audit delivery. Every worker listens on a Unix socket in
the supervisor's private run directory (``worker-<i>.sock``) for the one thing that must
reach all of them: dropping cached consents (``/cache/invalidate`` on the admin port, a
Consent written through any worker, an emergency window recorded by one).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import orjson

log = logging.getLogger("gateway.workers")

# How long worker 0 waits for the others to confirm an invalidation before answering 503.
CONFIRM_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class WorkerRole:
    """This process's place among ``count`` workers (the defaults: the only process)."""

    index: int = 0
    count: int = 1
    run_dir: Path | None = None  # the supervisor's private directory (None with one worker)

    @property
    def owner(self) -> bool:
        """Serves the admin port and delivers the audit files."""
        return self.index == 0

    @property
    def shared(self) -> bool:
        """Several processes share the proxy port."""
        return self.count > 1

    @property
    def metrics_dir(self) -> Path | None:
        """Where every worker's metric values are kept (prometheus_client multiprocess mode)."""
        return None if self.run_dir is None else self.run_dir / "metrics"

    def socket_path(self, index: int) -> Path:
        assert self.run_dir is not None
        return self.run_dir / f"worker-{index}.sock"

    def others(self) -> list[int]:
        return [i for i in range(self.count) if i != self.index]


async def _invalidate_one(path: Path, body: bytes) -> bool:
    """True when the worker at ``path`` confirmed, or is not running (its successor starts empty)."""
    try:
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(path))) as session:
            async with session.post(
                "http://worker/cache/invalidate", data=body, headers={"Content-Type": "application/json"},
            ) as resp:
                return resp.status == 200
    except aiohttp.ClientConnectorError:
        # Nobody listens: that worker died and holds no cache; the one that replaces it
        # starts with an empty cache.
        return True
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return False


async def invalidate_others(role: WorkerRole, patient: str | None) -> list[int]:
    """Tell every other worker to drop ``patient``'s consents (everyone's when None);
    returns the indices that did not confirm within ``CONFIRM_TIMEOUT_S``."""
    body = orjson.dumps({} if patient is None else {"patient": patient})
    others = role.others()
    try:
        async with asyncio.timeout(CONFIRM_TIMEOUT_S):
            confirmed = await asyncio.gather(*(_invalidate_one(role.socket_path(i), body) for i in others))
    except TimeoutError:
        return others
    return [i for i, ok in zip(others, confirmed) if not ok]


class Announcer:
    """Passes invalidations made in this worker (a Consent written through it, an emergency
    window recorded) to the others, without holding up the answer that caused them.

    A worker that does not confirm is logged; the change feed still reaches it within
    ``consent.change_poll_s``.
    """

    def __init__(self, role: WorkerRole) -> None:
        self.role = role
        self._sending: set[asyncio.Task[None]] = set()

    def announce(self, patient: str | None) -> None:
        task = asyncio.get_running_loop().create_task(self._send(patient))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, patient: str | None) -> None:
        missed = await invalidate_others(self.role, patient)
        if missed:
            log.warning("cache invalidation not confirmed by workers %s", missed)
