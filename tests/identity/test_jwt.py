"""auth.mode jwt: every way a token can be wrong is a 401 with WWW-Authenticate: Bearer.

The issuer runs on 127.0.0.1 with real RSA and EC keys; the gateway fetches its JWKS.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from cryptography.hazmat.primitives import serialization

from gateway.demo.issuer import LocalIssuer, rsa_key
from tests.conftest import GatewayUnderTest
from tests.fakes import FakeFhir
from tests.identity.conftest import AUDIENCE, jwt_sections

DOCTOR = {"fhirUser": "Practitioner/dr-1", "scope": "openid fhirUser user/*.rs"}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


async def get(gw: GatewayUnderTest, path: str, token: str | None, **headers: str) -> tuple[int, dict[str, str], bytes]:
    hdrs = dict(headers)
    if token is not None:
        hdrs["Authorization"] = f"Bearer {token}"
    async with gw.session.get(gw.url + path, headers=hdrs) as resp:
        return resp.status, dict(resp.headers), await resp.read()


def assert_refused(status: int, headers: dict[str, str], body: bytes, error: str | None = "invalid_token") -> None:
    assert status == 401, body
    challenge = headers["WWW-Authenticate"]
    assert challenge.startswith("Bearer ")
    if error:
        assert f'error="{error}"' in challenge
    outcome = orjson.loads(body)
    assert outcome["resourceType"] == "OperationOutcome" and outcome["issue"][0]["code"] == "login"
    assert headers["Content-Type"] == "application/fhir+json"


async def test_valid_rsa_and_ec_tokens_are_accepted(jwt_gateway: GatewayUnderTest, issuer: LocalIssuer, clinical: FakeFhir) -> None:
    for kid in ("rsa-1", "ec-1"):
        status, headers, body = await get(jwt_gateway, "/Observation/o1", issuer.mint(DOCTOR, kid=kid, audience=AUDIENCE))
        assert status == 200, body
        assert orjson.loads(body)["id"] == "o1"
        assert headers["X-Consent-Decision"] == "permit"
    # The requester's token is the requester's: without upstream credentials it goes on as sent.
    assert clinical.requests[-1].headers["Authorization"].startswith("Bearer ")


async def test_fhir_user_as_absolute_url_names_the_requester(jwt_gateway: GatewayUnderTest, issuer: LocalIssuer) -> None:
    token = issuer.mint({"fhirUser": "https://ehr.example.org/fhir/Practitioner/dr-1", "scope": "user/*.rs"}, audience=AUDIENCE)
    status, _, body = await get(jwt_gateway, "/Observation/o1", token)
    assert status == 200, body


async def test_missing_token_is_401_with_bearer_challenge(jwt_gateway: GatewayUnderTest) -> None:
    status, headers, body = await get(jwt_gateway, "/Observation/o1", None)
    assert_refused(status, headers, body, error=None)
    status, headers, body = await get(jwt_gateway, "/Observation/o1", None, Authorization="Basic dXNlcjpwdw==")
    assert_refused(status, headers, body, error=None)


@pytest.mark.parametrize("case", ["expired", "not-yet-valid", "wrong-audience", "wrong-issuer", "no-exp", "no-fhir-user"])
async def test_invalid_claims_are_401(jwt_gateway: GatewayUnderTest, issuer: LocalIssuer, clinical: FakeFhir, case: str) -> None:
    now = time.time()
    claims: dict[str, Any] = dict(DOCTOR)
    audience: str | None = AUDIENCE
    kwargs: dict[str, Any] = {}
    if case == "expired":
        kwargs = {"now": now - 7200, "lifetime_s": 3600}  # expired an hour ago, far beyond leeway
    elif case == "not-yet-valid":
        claims["nbf"] = int(now) + 600
    elif case == "wrong-audience":
        audience = "https://other.example.org/fhir"
    elif case == "wrong-issuer":
        claims["iss"] = "https://evil.example.org"
    elif case == "no-fhir-user":
        del claims["fhirUser"]
    token = issuer.mint(claims, audience=audience, **kwargs)
    if case == "no-exp":
        token = issuer.mint({**claims, "exp": None}, audience=audience)
    before = len(clinical.requests)
    status, headers, body = await get(jwt_gateway, "/Observation/o1", token)
    assert_refused(status, headers, body)
    assert len(clinical.requests) == before, "nothing reaches the FHIR server"


async def test_expiry_within_leeway_is_accepted(jwt_gateway: GatewayUnderTest, issuer: LocalIssuer) -> None:
    token = issuer.mint(DOCTOR, audience=AUDIENCE, now=time.time() - 3610, lifetime_s=3600)  # 10 s ago, leeway 30 s
    status, _, body = await get(jwt_gateway, "/Observation/o1", token)
    assert status == 200, body


async def test_alg_none_is_401(jwt_gateway: GatewayUnderTest) -> None:
    header = b64(orjson.dumps({"alg": "none", "typ": "JWT"}))
    payload = b64(orjson.dumps({**DOCTOR, "iss": "x", "aud": AUDIENCE, "exp": int(time.time()) + 600}))
    for token in (f"{header}.{payload}.", f"{header}.{payload}"):
        status, headers, body = await get(jwt_gateway, "/Observation/o1", token)
        assert_refused(status, headers, body)


async def test_hs256_signed_with_the_public_key_is_401(jwt_gateway: GatewayUnderTest, issuer: LocalIssuer) -> None:
    public_pem = issuer.key("rsa-1").private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = b64(orjson.dumps({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}))
    payload = b64(orjson.dumps({**DOCTOR, "iss": issuer.base_url, "aud": AUDIENCE, "exp": int(time.time()) + 600}))
    signature = b64(hmac.new(public_pem, f"{header}.{payload}".encode(), hashlib.sha256).digest())
    status, headers, body = await get(jwt_gateway, "/Observation/o1", f"{header}.{payload}.{signature}")
    assert_refused(status, headers, body)


async def test_hs256_would_be_refused_even_if_allowed_by_mistake(issuer: LocalIssuer, clinical: FakeFhir, make_gateway: Callable[..., Any]) -> None:
    # The configuration cannot name a symmetric algorithm at all.
    from gateway.config import ConfigError, build_settings
    with pytest.raises(ConfigError, match="auth.jwt.algorithms"):
        build_settings({"upstream": {"url": clinical.base_url}, **jwt_sections(issuer, algorithms=["HS256"])})


async def test_tampered_payload_is_401(jwt_gateway: GatewayUnderTest, issuer: LocalIssuer) -> None:
    for kid in ("rsa-1", "ec-1"):
        header, _, signature = issuer.mint({**DOCTOR, "fhirUser": "Practitioner/dr-1"}, kid=kid, audience=AUDIENCE).split(".")
        forged = b64(orjson.dumps({**DOCTOR, "fhirUser": "Practitioner/dr-2", "iss": issuer.base_url,
                                   "aud": AUDIENCE, "exp": int(time.time()) + 600}))
        status, headers, body = await get(jwt_gateway, "/Observation/o1", f"{header}.{forged}.{signature}")
        assert_refused(status, headers, body)


async def test_ec_key_cannot_verify_an_rsa_algorithm(jwt_gateway: GatewayUnderTest, issuer: LocalIssuer) -> None:
    good = issuer.mint(DOCTOR, kid="ec-1", audience=AUDIENCE)
    _, payload, signature = good.split(".")
    header = b64(orjson.dumps({"alg": "RS256", "typ": "JWT", "kid": "ec-1"}))
    status, headers, body = await get(jwt_gateway, "/Observation/o1", f"{header}.{payload}.{signature}")
    assert_refused(status, headers, body)


async def test_unknown_kid_refetches_the_jwks_at_most_once_a_minute(jwt_gateway: GatewayUnderTest, issuer: LocalIssuer) -> None:
    clock = [1000.0]
    assert jwt_gateway.state.issuer is not None
    jwt_gateway.state.issuer.clock = lambda: clock[0]
    status, _, _ = await get(jwt_gateway, "/Observation/o1", issuer.mint(DOCTOR, audience=AUDIENCE))
    assert status == 200 and issuer.jwks_fetches == 1
    # The issuer rotates in a new key; within the minute an unknown kid does not refetch.
    issuer.keys.append(rsa_key("rsa-2"))
    rotated = issuer.mint(DOCTOR, kid="rsa-2", audience=AUDIENCE)
    for _ in range(5):
        status, headers, body = await get(jwt_gateway, "/Observation/o1", rotated)
        assert_refused(status, headers, body)
    assert issuer.jwks_fetches == 1
    clock[0] += 61
    status, _, body = await get(jwt_gateway, "/Observation/o1", rotated)
    assert status == 200, body
    assert issuer.jwks_fetches == 2
    # A kid the issuer never published: one refetch a minute later, then 401.
    stranger = rsa_key("never-published")
    issuer.keys.append(stranger)
    stranger.published = False
    token = issuer.mint(DOCTOR, kid="never-published", audience=AUDIENCE)
    clock[0] += 61
    for _ in range(3):
        status, headers, body = await get(jwt_gateway, "/Observation/o1", token)
        assert_refused(status, headers, body)
    assert issuer.jwks_fetches == 3


async def test_issuer_unreachable_is_503_not_a_permit(issuer: LocalIssuer, clinical: FakeFhir, make_gateway: Callable[..., Any]) -> None:
    gw: GatewayUnderTest = await make_gateway(clinical.base_url, **jwt_sections(issuer, jwks_url="http://127.0.0.1:9/jwks.json"))
    status, _, body = await get(gw, "/Observation/o1", issuer.mint(DOCTOR, audience=AUDIENCE))
    assert status == 503, body
    assert orjson.loads(body)["issue"][0]["details"]["coding"][0]["code"] == "identity-unavailable"


@pytest.mark.parametrize("header", ["X-Actor", "X-Actor-Organization", "X-Actor-Role", "X-Purpose-Of-Use", "x-actor-extra"])
async def test_actor_headers_are_refused_in_jwt_mode(jwt_gateway: GatewayUnderTest, issuer: LocalIssuer, header: str) -> None:
    value = {"X-Actor": "Practitioner/dr-2", "X-Purpose-Of-Use": "TREAT"}.get(header, "PRCP")
    status, _, body = await get(jwt_gateway, "/Observation/o1", issuer.mint(DOCTOR, audience=AUDIENCE), **{header: value})
    assert status == 400, body
    assert orjson.loads(body)["issue"][0]["code"] == "invalid"


async def test_authorization_twice_is_400(jwt_gateway: GatewayUnderTest, issuer: LocalIssuer) -> None:
    token = issuer.mint(DOCTOR, audience=AUDIENCE)
    async with jwt_gateway.session.get(
        jwt_gateway.url + "/Observation/o1", headers=[("Authorization", f"Bearer {token}"), ("Authorization", f"Bearer {token}")]
    ) as resp:
        assert resp.status == 400


async def test_break_glass_header_stays_in_jwt_mode(jwt_gateway: GatewayUnderTest, issuer: LocalIssuer) -> None:
    token = issuer.mint(DOCTOR, audience=AUDIENCE)
    status, headers, body = await get(jwt_gateway, "/Observation/o1", token, **{"X-Break-Glass": "Medical emergency"})
    assert status == 200, body
    assert "X-Break-Glass-Audit-Id" in headers


async def test_claims_give_purpose_and_organization(jwt_gateway: GatewayUnderTest, issuer: LocalIssuer, clinical: FakeFhir) -> None:
    # Patient p1 permits research only for Organization/org-1.
    clinical.add({
        "resourceType": "Consent", "id": "k1", "status": "active",
        "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "research"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": "Patient/p1"}, "policyRule": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTOUT"}]},
        "provision": {"provision": [{"type": "permit", "actor": [{"reference": {"reference": "Organization/org-1"}}],
                                     "purpose": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "HRESCH"}]}]},
    })
    research = {**DOCTOR, "purpose_of_use": "HRESCH"}
    status, _, _ = await get(jwt_gateway, "/Observation/o1", issuer.mint({**research, "org": "Organization/org-1"}, audience=AUDIENCE))
    assert status == 200
    status, _, _ = await get(jwt_gateway, "/Observation/o1", issuer.mint({**research, "org": "Organization/org-2"}, audience=AUDIENCE))
    assert status == 403
    status, headers, body = await get(jwt_gateway, "/Observation/o1", issuer.mint({**DOCTOR, "purpose_of_use": "NOPE"}, audience=AUDIENCE))
    assert_refused(status, headers, body)
