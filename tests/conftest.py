"""Shared fixtures: a fake FHIR upstream on a real socket and a gateway in front of it."""

from __future__ import annotations

import contextlib
import logging
import socket

from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry

from gateway.app import RunningGateway, build_state, start
from gateway.rules import load_rules
from gateway.config import Settings, build_settings
from gateway.metrics import Metrics
from gateway.web.state import GatewayState
from tests.fakes import FakeFhir
from gateway.demo.issuer import LocalIssuer


LABELS = load_rules()  # the bundled rules, loaded once for the whole test session


@dataclass
class GatewayUnderTest:
    state: GatewayState
    running: RunningGateway
    session: aiohttp.ClientSession

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.running.proxy_port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.running.admin_port}"

    @property
    def registry(self) -> CollectorRegistry:
        return self.state.metrics.registry

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        return self.registry.get_sample_value(name, labels or {}) or 0.0

    async def get(self, path: str, actor: str | None = "Practitioner/doc-1", **headers: str) -> aiohttp.ClientResponse:
        hdrs = dict(headers)
        if actor is not None:
            hdrs["X-Actor"] = actor
        return await self.session.get(self.url + path, headers=hdrs)


@contextlib.asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[str]:
    """Serve ``app`` on a free 127.0.0.1 port for the block; yields its ``http://host:port``."""
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        await server.close()


@pytest.fixture
async def issuer() -> AsyncIterator[LocalIssuer]:
    """A SMART authorization server on 127.0.0.1 with real RSA and EC keys."""
    local = LocalIssuer()
    async with serving(local.app()) as url:
        local.base_url = url
        yield local


@pytest.fixture(autouse=True)
def _gateway_logger_restored() -> Iterator[None]:
    """Each test leaves the ``gateway`` logger as it found it: ``cli.main`` run in process
    installs a handler on the stderr of that moment, which pytest closes after the test, and
    a later test's lines would meet a closed stream there."""
    logger = logging.getLogger("gateway")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved[0], saved[1], saved[2]


@pytest.fixture
def dead_url() -> Iterator[str]:
    """A FHIR base on 127.0.0.1 that refuses connections for the whole test.

    The port stays bound (never listening), so no server started during the test, the
    gateway under test included, can be given it: a port merely free a moment ago can be.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/fhir"


@pytest.fixture
async def fake_fhir() -> AsyncIterator[FakeFhir]:
    fake = FakeFhir()
    async with serving(fake.app()) as url:
        fake.base_url = url + fake.base_path
        yield fake


def gateway_settings(upstream_url: str, **sections: Any) -> Settings:
    data: dict[str, Any] = {
        "upstream": {"url": upstream_url, "timeout_s": 5},
        "listen": {"host": "127.0.0.1", "port": 0},
        "admin": {"host": "127.0.0.1", "port": 0},
        # The fake upstream has no change listing; tests of the change feed turn it on.
        "consent": {"change_poll_s": 0},
    }
    for name, values in sections.items():
        if isinstance(values, dict):
            data.setdefault(name, {}).update(values)
        else:
            data[name] = values
    return build_settings(data)


@pytest.fixture
async def make_gateway(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    started: list[GatewayUnderTest] = []

    async def factory(upstream_url: str, **sections: Any) -> GatewayUnderTest:
        sections.setdefault("audit", {})
        sections["audit"].setdefault("path", str(tmp_path / "audit.jsonl"))
        state = build_state(gateway_settings(upstream_url, **sections), Metrics(CollectorRegistry()), LABELS)
        running = await start(state)
        gut = GatewayUnderTest(state, running, aiohttp.ClientSession())
        started.append(gut)
        return gut

    yield factory
    for gut in started:
        await gut.session.close()
        await gut.running.stop()


@pytest.fixture
async def gateway(fake_fhir: FakeFhir, make_gateway: Callable[..., Any]) -> GatewayUnderTest:
    gut: GatewayUnderTest = await make_gateway(fake_fhir.base_url)
    return gut
