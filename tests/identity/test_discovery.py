"""/metadata and /.well-known/smart-configuration answer without any identity."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
import pytest

from gateway.demo.issuer import LocalIssuer
from tests.conftest import GatewayUnderTest
from tests.fakes import FakeFhir

SMART = "http://terminology.hl7.org/CodeSystem/restful-security-service"


@pytest.mark.parametrize("prefix", ["", "/fhir"])
async def test_metadata_in_jwt_mode_names_smart(jwt_gateway: GatewayUnderTest, issuer: LocalIssuer, prefix: str) -> None:
    async with jwt_gateway.session.get(jwt_gateway.url + prefix + "/metadata") as resp:
        assert resp.status == 200
        body = orjson.loads(await resp.read())
    assert body["resourceType"] == "CapabilityStatement"
    security = body["rest"][0]["security"]
    assert security["service"][0]["coding"][0] == {"system": SMART, "code": "SMART-on-FHIR", "display": "SMART-on-FHIR"}
    uris = {e["url"]: e["valueUri"] for e in security["extension"][0]["extension"]}
    assert uris["token"] == f"{issuer.base_url}/token" and uris["authorize"] == f"{issuer.base_url}/authorize"


async def test_metadata_in_headers_mode_needs_no_actor(gateway: GatewayUnderTest, fake_fhir: FakeFhir) -> None:
    async with gateway.session.get(gateway.url + "/metadata") as resp:
        assert resp.status == 200
        body = orjson.loads(await resp.read())
    assert body["resourceType"] == "CapabilityStatement"
    assert "security" not in (body.get("rest") or [{}])[0]


async def test_metadata_never_passes_patient_data(gateway: GatewayUnderTest, fake_fhir: FakeFhir) -> None:
    async def patient_instead(request: Any) -> Any:
        from aiohttp import web
        return web.json_response({"resourceType": "Patient", "id": "p9", "name": [{"family": "Secret"}]})

    fake_fhir.override = patient_instead
    async with gateway.session.get(gateway.url + "/metadata") as resp:
        assert resp.status == 502
        assert b"Secret" not in await resp.read()


async def test_smart_configuration_from_the_issuer(jwt_gateway: GatewayUnderTest, issuer: LocalIssuer) -> None:
    for prefix in ("", "/fhir"):
        async with jwt_gateway.session.get(jwt_gateway.url + prefix + "/.well-known/smart-configuration") as resp:
            assert resp.status == 200
            config = orjson.loads(await resp.read())
        assert config["issuer"] == issuer.base_url
        assert config["token_endpoint"] == f"{issuer.base_url}/token"
        assert config["jwks_uri"] == f"{issuer.base_url}/.well-known/jwks.json"
        assert "permission-v2" in config["capabilities"]


async def test_smart_configuration_is_404_in_headers_mode(gateway: GatewayUnderTest) -> None:
    async with gateway.session.get(gateway.url + "/.well-known/smart-configuration") as resp:
        assert resp.status == 404
        assert resp.headers["Content-Type"] == "application/fhir+json"


async def test_smart_configuration_unreachable_issuer_is_503(issuer: LocalIssuer, fake_fhir: FakeFhir, make_gateway: Callable[..., Any]) -> None:
    gw: GatewayUnderTest = await make_gateway(
        fake_fhir.base_url, auth={"mode": "jwt", "jwt": {"issuer": "http://127.0.0.1:9", "audience": "x"}})
    async with gw.session.get(gw.url + "/.well-known/smart-configuration") as resp:
        assert resp.status == 503
