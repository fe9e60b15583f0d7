"""The demo FHIR server on a real socket, as the upstream of the officer's tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp.test_utils import TestServer

from gateway.demo.server import DemoFhirServer, demo_server


@pytest.fixture
async def demo_fhir() -> AsyncIterator[DemoFhirServer]:
    server = demo_server()
    test_server = TestServer(server.app(), host="127.0.0.1")
    await test_server.start_server()
    server.base_url = f"http://127.0.0.1:{test_server.port}{server.base_path}"
    yield server
    await test_server.close()
