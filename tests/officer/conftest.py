"""The demo FHIR server on a real socket, as the upstream of the officer's tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from gateway.demo.server import DemoFhirServer, demo_server
from tests.conftest import serving


@pytest.fixture
async def demo_fhir() -> AsyncIterator[DemoFhirServer]:
    server = demo_server()
    async with serving(server.app()) as url:
        server.base_url = url + server.base_path
        yield server
