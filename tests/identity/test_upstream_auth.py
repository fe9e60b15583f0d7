"""upstream.auth and TLS: every call the gateway makes on its own carries its credentials."""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from gateway.cli import main
from gateway.upstream_auth import public_jwk
from tests.conftest import GatewayUnderTest
from tests.fakes import FakeFhir
from tests.fixtures.clinical import not_this_doctor
from tests.identity.conftest import observation
from tests.identity.pki import Pki, make_pki
from tests.identity.token_server import TokenServer, start_token_server

DOC = {"X-Actor": "Practitioner/dr-1"}


def secure(fake: FakeFhir, accepted: set[str]) -> None:
    """The fake answers 401 to any request without one of the ``accepted`` Authorization values."""

    async def check(request: web.Request) -> web.StreamResponse | None:
        if request.headers.get("Authorization") not in accepted:
            return web.json_response({"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "login"}]},
                                     status=401, headers={"WWW-Authenticate": "Bearer"})
        return None

    fake.override = check


def seed(fake: FakeFhir) -> None:
    fake.add(
        {"resourceType": "Patient", "id": "p1"}, observation("o1", "p1"),
        not_this_doctor("Patient/p1", "Group/g1", cid="k1"),
        {"resourceType": "Group", "id": "g1", "type": "practitioner", "actual": True,
         "member": [{"entity": {"reference": "Practitioner/dr-1"}}]},
        {"resourceType": "Practitioner", "id": "dr-1"},
    )


async def until(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_bearer_from_env_on_every_own_call(fake_fhir: FakeFhir, make_gateway: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> None:
    seed(fake_fhir)
    secure(fake_fhir, {"Bearer gw-secret"})
    monkeypatch.setenv("FHIR_TOKEN", "gw-secret")
    gw: GatewayUnderTest = await make_gateway(
        fake_fhir.base_url, upstream={"health_interval_s": 0.2, "auth": {"kind": "bearer", "token_env": "FHIR_TOKEN"}},
        audit={"fhir_url": fake_fhir.base_url},
    )
    headers = {**DOC, "X-Break-Glass": "Medical emergency", "Authorization": "Bearer the-clients-own"}
    async with gw.session.get(gw.url + "/Observation/o1", headers=headers) as resp:
        assert resp.status == 200, await resp.text()
    await until(lambda: any(r.path_qs.startswith("/fhir/AuditEvent/") for r in fake_fhir.requests))
    async with gw.session.get(gw.admin_url + "/readyz") as resp:
        assert resp.status == 200
    seen = {(r.method, r.path_qs.split("?")[0].removeprefix("/fhir/").split("/")[0]) for r in fake_fhir.requests}
    # Readiness, consent lookup, memberships, the forwarded read, the emergency Consent, audit delivery.
    for call in [("GET", "metadata"), ("GET", "Consent"), ("GET", "Group"), ("GET", "Observation"),
                 ("POST", "Consent"), ("PUT", "AuditEvent")]:
        assert call in seen, call
    assert {r.headers.get("Authorization") for r in fake_fhir.requests} == {"Bearer gw-secret"}
    assert all(r.headers.get("Authorization") != "Bearer the-clients-own" for r in fake_fhir.requests)


async def test_without_credentials_a_secured_server_is_503_and_not_ready(fake_fhir: FakeFhir, make_gateway: Callable[..., Any]) -> None:
    seed(fake_fhir)
    secure(fake_fhir, {"Bearer the-clients-own"})
    gw: GatewayUnderTest = await make_gateway(fake_fhir.base_url, upstream={"health_interval_s": 0.2})
    # The client's token reaches the server (kind none forwards it), but the gateway's own
    # consent lookup carries nothing: the answer is withheld, never released undecided.
    async with gw.session.get(gw.url + "/Observation/o1", headers={**DOC, "Authorization": "Bearer the-clients-own"}) as resp:
        assert resp.status == 503
        assert b"718-7" not in await resp.read()
    async with gw.session.get(gw.admin_url + "/readyz") as resp:
        assert resp.status == 503


async def test_bearer_file_is_reread_when_it_changes(fake_fhir: FakeFhir, make_gateway: Callable[..., Any], tmp_path: Path) -> None:
    seed(fake_fhir)
    secure(fake_fhir, {"Bearer first"})
    token_file = tmp_path / "token"
    token_file.write_text("first\n")
    gw: GatewayUnderTest = await make_gateway(fake_fhir.base_url, upstream={"auth": {"kind": "bearer", "token_file": str(token_file)}})
    async with gw.session.get(gw.url + "/Practitioner/dr-1", headers=DOC) as resp:
        assert resp.status == 200
    # The mounted secret rotates (a new file renamed into place, as Kubernetes does).
    secure(fake_fhir, {"Bearer second"})
    fresh = tmp_path / "token.new"
    fresh.write_text("second")
    os.replace(fresh, token_file)
    async with gw.session.get(gw.url + "/Practitioner/dr-1", headers=DOC) as resp:
        assert resp.status == 200
    assert fake_fhir.requests[-1].headers["Authorization"] == "Bearer second"
    # While the file is briefly gone the last token is kept.
    token_file.unlink()
    async with gw.session.get(gw.url + "/Practitioner/dr-1", headers=DOC) as resp:
        assert resp.status == 200


def _key_file(path: Path, kind: str) -> Any:
    key: Any = rsa.generate_private_key(public_exponent=65537, key_size=2048) if kind == "rsa" else ec.generate_private_key(ec.SECP384R1())
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return key


@pytest.fixture
async def token_server(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[tuple[TokenServer, Path]]:
    kind = getattr(request, "param", "rsa")
    key_path = tmp_path / f"client-{kind}.pem"
    key = _key_file(key_path, kind)
    jwk = public_jwk(key, "RS384" if kind == "rsa" else "ES384")
    server = TokenServer("gateway-client", {jwk["kid"]: jwk})
    test_server = await start_token_server(server)
    yield server, key_path
    await test_server.close()


def _smart(server: TokenServer, key_path: Path) -> dict[str, Any]:
    return {"kind": "smart-backend", "token_url": server.url, "client_id": "gateway-client",
            "private_key_file": str(key_path), "scope": "system/*.rs system/Consent.c system/AuditEvent.cu"}


@pytest.mark.parametrize("token_server", ["rsa", "ec"], indirect=True)
async def test_smart_backend_token_is_cached_and_renewed_on_401(
    fake_fhir: FakeFhir, make_gateway: Callable[..., Any], token_server: tuple[TokenServer, Path]
) -> None:
    server, key_path = token_server
    seed(fake_fhir)
    accepted = {"Bearer tok-1"}
    secure(fake_fhir, accepted)
    gw: GatewayUnderTest = await make_gateway(fake_fhir.base_url, upstream={"auth": _smart(server, key_path)})
    for _ in range(3):
        async with gw.session.get(gw.url + "/Practitioner/dr-1", headers=DOC) as resp:
            assert resp.status == 200
    assert server.issued[-1] == "tok-1" and server.scopes[-1].startswith("system/*.rs")
    issued = len(server.issued)
    # The server revokes the token: one renewal, one retry, and the request succeeds.
    accepted.clear()
    accepted.add(f"Bearer tok-{issued + 1}")
    before = len(fake_fhir.requests)
    async with gw.session.get(gw.url + "/Practitioner/dr-1", headers=DOC) as resp:
        assert resp.status == 200
    assert len(server.issued) == issued + 1
    assert len(fake_fhir.requests) == before + 2
    # A server that refuses every token: one renewal and one retry only, then its answer.
    accepted.clear()
    before, issued = len(fake_fhir.requests), len(server.issued)
    async with gw.session.get(gw.url + "/Practitioner/dr-1", headers=DOC) as resp:
        assert resp.status == 401
        assert "WWW-Authenticate" not in resp.headers or "gateway" not in resp.headers["WWW-Authenticate"]
    assert len(fake_fhir.requests) == before + 2 and len(server.issued) == issued + 1
    assert server.assertions[0]["aud"] == server.url and server.assertions[0]["iss"] == "gateway-client"


async def test_smart_backend_token_renewed_before_it_expires(
    fake_fhir: FakeFhir, make_gateway: Callable[..., Any], token_server: tuple[TokenServer, Path]
) -> None:
    server, key_path = token_server
    server.expires_in = 1  # renewed a fifth of its life early
    seed(fake_fhir)
    gw: GatewayUnderTest = await make_gateway(fake_fhir.base_url, upstream={"auth": _smart(server, key_path)})
    async with gw.session.get(gw.url + "/Practitioner/dr-1", headers=DOC) as resp:
        assert resp.status == 200
    first = len(server.issued)
    await asyncio.sleep(0.85)
    async with gw.session.get(gw.url + "/Practitioner/dr-1", headers=DOC) as resp:
        assert resp.status == 200
    assert len(server.issued) == first + 1
    assert fake_fhir.requests[-1].headers["Authorization"] == f"Bearer {server.issued[-1]}"


async def test_concurrent_requests_share_one_token_request(
    fake_fhir: FakeFhir, make_gateway: Callable[..., Any], token_server: tuple[TokenServer, Path]
) -> None:
    server, key_path = token_server
    seed(fake_fhir)
    gw: GatewayUnderTest = await make_gateway(fake_fhir.base_url, upstream={"auth": _smart(server, key_path)})
    start = len(server.issued)

    async def one() -> int:
        async with gw.session.get(gw.url + "/Practitioner/dr-1", headers=DOC) as resp:
            return resp.status

    assert await asyncio.gather(*(one() for _ in range(10))) == [200] * 10
    assert len(server.issued) - start <= 1


async def test_token_endpoint_down_fails_closed(
    fake_fhir: FakeFhir, make_gateway: Callable[..., Any], token_server: tuple[TokenServer, Path]
) -> None:
    server, key_path = token_server
    server.down = True
    seed(fake_fhir)
    gw: GatewayUnderTest = await make_gateway(fake_fhir.base_url, upstream={"auth": _smart(server, key_path)})
    async with gw.session.get(gw.url + "/Observation/o1", headers=DOC) as resp:
        body = await resp.read()
        assert resp.status in (502, 503)
        assert b"o1" not in body and b"718-7" not in body
    assert not any(r.path_qs.startswith("/fhir/Observation") for r in fake_fhir.requests)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path)


@pytest.fixture
async def tls_fhir(pki: Pki) -> AsyncIterator[FakeFhir]:
    """The fake FHIR server over TLS, requiring a client certificate from the test CA."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.ca_file))
    context.load_cert_chain(str(pki.server_cert), str(pki.server_key))
    context.verify_mode = ssl.CERT_REQUIRED
    fake = FakeFhir()
    server = TestServer(fake.app(), host="127.0.0.1")
    await server.start_server(ssl=context)
    fake.base_url = f"https://127.0.0.1:{server.port}{fake.base_path}"
    seed(fake)
    yield fake
    await server.close()


async def test_ca_file_and_client_certificate(tls_fhir: FakeFhir, pki: Pki, make_gateway: Callable[..., Any]) -> None:
    gw: GatewayUnderTest = await make_gateway(tls_fhir.base_url, upstream={
        "ca_file": str(pki.ca_file), "client_cert_file": str(pki.client_cert), "client_key_file": str(pki.client_key)})
    async with gw.session.get(gw.url + "/Observation/o1", headers={"X-Actor": "Patient/p1"}) as resp:
        assert resp.status == 200, await resp.text()
        assert orjson.loads(await resp.read())["id"] == "o1"


@pytest.mark.parametrize("missing", ["client certificate", "trusted CA"])
async def test_tls_without_the_right_material_is_502(tls_fhir: FakeFhir, pki: Pki, make_gateway: Callable[..., Any], missing: str) -> None:
    upstream: dict[str, Any] = {"ca_file": str(pki.ca_file)} if missing == "client certificate" else {
        "ca_file": str(pki.other_ca_file), "client_cert_file": str(pki.client_cert), "client_key_file": str(pki.client_key)}
    gw: GatewayUnderTest = await make_gateway(tls_fhir.base_url, upstream=upstream)
    async with gw.session.get(gw.url + "/Practitioner/dr-1", headers=DOC) as resp:
        assert resp.status == 502
    assert not tls_fhir.requests


def _serve(tmp_path: Path, capsys: pytest.CaptureFixture[str], upstream: dict[str, Any]) -> tuple[int, str]:
    config = tmp_path / "gateway.yaml"
    config.write_text(orjson.dumps({"upstream": {"url": "https://fhir.example.org/fhir", **upstream},
                                    "audit": {"path": str(tmp_path / "audit.jsonl")},
                                    "listen": {"port": 0}, "admin": {"port": 0}}).decode())
    code = main(["serve", "--config", str(config)])
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize(("upstream", "key"), [
    ({"ca_file": "/nonexistent/ca.pem"}, "upstream.ca_file"),
    ({"client_cert_file": "/nonexistent/c.pem", "client_key_file": "/nonexistent/k.pem"}, "upstream.client_cert_file"),
    ({"auth": {"kind": "smart-backend", "token_url": "https://auth.example.org/token", "client_id": "gw",
               "private_key_file": "/nonexistent/key.pem"}}, "upstream.auth.private_key_file"),
    ({"auth": {"kind": "bearer", "token_file": "/nonexistent/token"}}, "upstream.auth.token_file"),
    ({"auth": {"kind": "bearer", "token_env": "SURELY_UNSET_GATEWAY_TOKEN"}}, "upstream.auth.token_env"),
])
def test_unreadable_credentials_stop_start_up(tmp_path: Path, capsys: pytest.CaptureFixture[str], upstream: dict[str, Any], key: str) -> None:
    code, err = _serve(tmp_path, capsys, upstream)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and key in lines[0], err


def test_unusable_key_material_stops_start_up(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p256 = tmp_path / "p256.pem"
    p256.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a key")
    for path, words in ((p256, "P-384"), (garbage, "PEM private key")):
        code, err = _serve(tmp_path, capsys, {"auth": {"kind": "smart-backend", "token_url": "https://a.example.org/t",
                                                        "client_id": "gw", "private_key_file": str(path)}})
        assert code == 2 and "upstream.auth.private_key_file" in err and words in err, err
    pki = make_pki(tmp_path)
    code, err = _serve(tmp_path, capsys, {"client_cert_file": str(pki.client_cert), "client_key_file": str(pki.server_key)})
    assert code == 2 and "upstream.client_cert_file" in err and len(err.splitlines()) == 1, err
    code, err = _serve(tmp_path, capsys, {"ca_file": str(garbage)})
    assert code == 2 and "upstream.ca_file" in err, err
