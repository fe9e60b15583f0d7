"""Shutdown: requests still running when the grace period ends answer 503, not an empty reply.

aiohttp waits for handlers during shutdown, then cancels them and closes their connections
at once, so a cancelled handler can no longer answer. The gateway cuts them itself a little
earlier: each cut handler is cancelled, this middleware catches that cancellation and answers
an OperationOutcome (503, ``Retry-After``), which aiohttp then sends before closing.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from aiohttp import web
from aiohttp.typedefs import Middleware

from gateway.metrics import Metrics
from gateway.web.middleware import Handler, error_response


@dataclass
class Drain:
    """The proxy's running handlers, and whether shutdown has cut them."""

    running: set[asyncio.Task[object]] = field(default_factory=set)
    cut: set[asyncio.Task[object]] = field(default_factory=set)

    def cut_all(self) -> int:
        """Cancel every running handler (each answers 503); returns how many were cut."""
        for task in self.running:
            self.cut.add(task)
            task.cancel()
        return len(self.running)


def build_drain_middleware(drain: Drain, metrics: Metrics) -> Middleware:
    @web.middleware
    async def drain_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        task = asyncio.current_task()
        assert task is not None
        drain.running.add(task)
        try:
            return await handler(request)
        except asyncio.CancelledError:
            if task not in drain.cut:
                raise
            task.uncancel()
            metrics.count_error("shutting-down")
            return error_response(
                503, "transient", "The gateway is shutting down; retry the request.", "shutting-down",
                {"Retry-After": "1", "Connection": "close"},
            )
        finally:
            drain.running.discard(task)
            drain.cut.discard(task)

    return drain_middleware
