"""A small local token issuer for the demo and the tests (not an authorization server).

Keys are made when it starts (RSA 2048 and EC P-256); it publishes them at
``/.well-known/jwks.json`` with a SMART discovery document at
``/.well-known/smart-configuration``, and ``mint`` signs access tokens for given claims.
It counts JWKS fetches so that tests can check the gateway's caching.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import jwt
import orjson
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from gateway.upstream_auth import public_jwk


@dataclass
class SigningKey:
    kid: str
    algorithm: str
    private: Any
    published: bool = True

    def jwk(self) -> dict[str, Any]:
        entry = public_jwk(self.private, self.algorithm)
        entry["kid"] = self.kid
        entry["use"] = "sig"
        return entry


def rsa_key(kid: str, algorithm: str = "RS256") -> SigningKey:
    return SigningKey(kid, algorithm, rsa.generate_private_key(public_exponent=65537, key_size=2048))


def ec_key(kid: str, algorithm: str = "ES256") -> SigningKey:
    curve: ec.EllipticCurve = ec.SECP384R1() if algorithm == "ES384" else ec.SECP256R1()
    return SigningKey(kid, algorithm, ec.generate_private_key(curve))


@dataclass
class LocalIssuer:
    """Signs tokens with its keys; ``base_url`` is set once its app is listening."""

    keys: list[SigningKey] = field(default_factory=lambda: [rsa_key("rsa-1"), ec_key("ec-1")])
    base_url: str = ""
    jwks_fetches: int = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/.well-known/jwks.json", self._jwks)
        app.router.add_get("/.well-known/smart-configuration", self._discovery)
        return app

    async def _jwks(self, request: web.Request) -> web.Response:
        self.jwks_fetches += 1
        keys = [k.jwk() for k in self.keys if k.published]
        return web.json_response({"keys": keys}, dumps=lambda v: orjson.dumps(v).decode())

    async def _discovery(self, request: web.Request) -> web.Response:
        return web.json_response({
            "issuer": self.base_url,
            "jwks_uri": f"{self.base_url}/.well-known/jwks.json",
            "authorization_endpoint": f"{self.base_url}/authorize",
            "token_endpoint": f"{self.base_url}/token",
            "grant_types_supported": ["authorization_code", "client_credentials"],
            "scopes_supported": ["openid", "fhirUser", "launch/patient", "patient/*.rs", "user/*.rs"],
            "capabilities": ["launch-standalone", "client-confidential-asymmetric", "permission-v2"],
        })

    def key(self, kid: str) -> SigningKey:
        return next(k for k in self.keys if k.kid == kid)

    def mint(self, claims: dict[str, Any], *, kid: str = "rsa-1", audience: str | None = None,
             lifetime_s: int = 3600, now: float | None = None) -> str:
        """A signed access token with ``iss``, ``aud``, ``iat``, ``exp`` and ``jti`` added."""
        key = self.key(kid)
        issued = int(now if now is not None else time.time())
        body = {"iss": self.base_url, "iat": issued, "exp": issued + lifetime_s, "jti": uuid.uuid4().hex}
        if audience is not None:
            body["aud"] = audience
        body.update(claims)
        return jwt.encode(body, key.private, algorithm=key.algorithm, headers={"kid": key.kid})
