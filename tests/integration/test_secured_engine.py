"""The gateway in front of the real FHIR engine when the engine requires a bearer token.

The engine answers 401 to anything without ``Bearer engine-secret``: the gateway's own calls
(readiness, consent lookups, memberships) must carry its credentials, and a requester's
token is never what reaches the engine.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from fhirpy import AsyncFHIRClient

from gateway.demo.issuer import LocalIssuer
from gateway.upstream_auth import public_jwk
from tests.conftest import GatewayUnderTest
from tests.integration.conftest import NOT_INSTALLED
from tests.integration.engine import Engine, engine_installed, start_engine
from tests.identity.token_server import TokenServer, start_token_server

SECRET = "engine-secret"
AUDIENCE = "https://gateway.example.org/fhir"
# Alice opted in, but her depression is for her psychiatrist only.


@pytest.fixture(scope="module")
def secured_engine() -> Iterator[Engine]:
    if not engine_installed():
        pytest.skip(NOT_INSTALLED)
    with start_engine(require_bearer=SECRET) as engine:
        yield engine


async def ready(gw: GatewayUnderTest, timeout_s: float = 10.0) -> int:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        async with gw.session.get(gw.admin_url + "/readyz") as resp:
            if resp.status == 200 or asyncio.get_running_loop().time() > deadline:
                return resp.status
        await asyncio.sleep(0.1)


async def conditions(client: AsyncFHIRClient, patient: str) -> set[str]:
    return {r["id"] for r in await client.resources("Condition").search(patient=patient).fetch_all()}


async def test_engine_refuses_requests_without_the_token(secured_engine: Engine, make_gateway: Callable[..., Any]) -> None:
    gw: GatewayUnderTest = await make_gateway(secured_engine.base_url, upstream={"health_interval_s": 0.2})
    assert await ready(gw, timeout_s=1.0) == 503
    async with gw.session.get(gw.url + "/Condition?patient=Patient/pat-alice",
                              headers={"X-Actor": "Practitioner/dr-gp", "Authorization": f"Bearer {SECRET}"}) as resp:
        # The requester's token opens the engine, but the gateway's consent lookup has none.
        assert resp.status == 503
        assert b"alice-depression" not in await resp.read()


async def test_bearer_credentials_for_the_gateways_own_calls(
    secured_engine: Engine, make_gateway: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ENGINE_TOKEN", SECRET)
    gw: GatewayUnderTest = await make_gateway(
        secured_engine.base_url, upstream={"health_interval_s": 0.2, "auth": {"kind": "bearer", "token_env": "ENGINE_TOKEN"}})
    assert await ready(gw) == 200
    client = AsyncFHIRClient(gw.url, extra_headers={"X-Actor": "Practitioner/dr-gp"})
    assert await conditions(client, "Patient/pat-alice") == {"alice-htn"}
    obs = await client.reference("Observation", "alice-cbc").to_resource()
    assert obs["id"] == "alice-cbc"


@pytest.fixture
async def smart_token_server(tmp_path: Path) -> AsyncIterator[tuple[TokenServer, Path]]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    key_path = tmp_path / "client.pem"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    jwk = public_jwk(key, "RS384")
    server = TokenServer("consent-gateway", {jwk["kid"]: jwk}, fixed=SECRET)
    test_server = await start_token_server(server)
    yield server, key_path
    await test_server.close()


async def test_smart_backend_credentials_for_the_gateways_own_calls(
    secured_engine: Engine, make_gateway: Callable[..., Any], smart_token_server: tuple[TokenServer, Path]
) -> None:
    server, key_path = smart_token_server
    gw: GatewayUnderTest = await make_gateway(secured_engine.base_url, upstream={"health_interval_s": 0.2, "auth": {
        "kind": "smart-backend", "token_url": server.url, "client_id": "consent-gateway", "private_key_file": str(key_path)}})
    assert await ready(gw) == 200
    client = AsyncFHIRClient(gw.url, extra_headers={"X-Actor": "Practitioner/dr-gp"})
    assert await conditions(client, "Patient/pat-alice") == {"alice-htn"}
    assert len(server.issued) == 1, "one token serves every call until it nears expiry"


async def test_fhirpy_with_a_smart_token_through_the_gateway(
    secured_engine: Engine, make_gateway: Callable[..., Any], issuer: LocalIssuer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ENGINE_TOKEN", SECRET)
    gw: GatewayUnderTest = await make_gateway(
        secured_engine.base_url,
        upstream={"auth": {"kind": "bearer", "token_env": "ENGINE_TOKEN"}},
        auth={"mode": "jwt", "jwt": {"issuer": issuer.base_url, "audience": AUDIENCE}},
    )
    doctor = issuer.mint({"fhirUser": "Practitioner/dr-gp", "scope": "openid fhirUser user/*.rs"}, audience=AUDIENCE)
    client = AsyncFHIRClient(gw.url, authorization=f"Bearer {doctor}")
    assert await conditions(client, "Patient/pat-alice") == {"alice-htn"}
    # A patient app: confined to Alice's compartment by its patient/ scopes.
    alice = issuer.mint({"fhirUser": "Patient/pat-alice", "patient": "pat-alice", "scope": "launch/patient patient/Observation.rs"},
                        audience=AUDIENCE)
    app = AsyncFHIRClient(gw.url, authorization=f"Bearer {alice}")
    observations = await app.resources("Observation").fetch_all()
    assert observations and {o["subject"]["reference"] for o in observations} == {"Patient/pat-alice"}
    assert not await app.resources("Condition").search(patient="Patient/pat-alice").fetch_all()
    # No token, or a forged one: 401 before anything reaches the engine.
    async with gw.session.get(gw.url + "/Observation") as resp:
        assert resp.status == 401 and resp.headers["WWW-Authenticate"].startswith("Bearer")
