"""Fixtures: each vendor's fake API on a real socket, and the credential in the environment."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TypeVar

import pytest
from aiohttp.test_utils import TestServer

from tests.sources.vendor_fakes import HEALTHEINTENT_BASE, SECRET, FakeClinikApi, FakeHealtheIntent, FakeHealthEx, FakeVendor

KEY_ENV = "CONSENT_VENDOR_KEY"
V = TypeVar("V", bound=FakeVendor)


@pytest.fixture(autouse=True)
def vendor_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, SECRET)


async def _serve(fake: V, path: str) -> AsyncIterator[V]:
    server = TestServer(fake.app(), host="127.0.0.1")
    await server.start_server()
    fake.base_url = f"http://127.0.0.1:{server.port}{path}"
    yield fake
    await server.close()


@pytest.fixture
async def clinikapi() -> AsyncIterator[FakeClinikApi]:
    async for fake in _serve(FakeClinikApi(), "/v1"):
        yield fake


@pytest.fixture
async def healthex() -> AsyncIterator[FakeHealthEx]:
    async for fake in _serve(FakeHealthEx(), "/getPatientConsents"):
        yield fake


@pytest.fixture
async def healtheintent() -> AsyncIterator[FakeHealtheIntent]:
    async for fake in _serve(FakeHealtheIntent(), HEALTHEINTENT_BASE):
        yield fake
