"""A SMART Backend Services token endpoint for tests: checks the private_key_jwt assertion."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any

import jwt
import orjson
from aiohttp import web
from aiohttp.test_utils import TestServer

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


@dataclass
class TokenServer:
    """Issues ``tok-<n>`` (or ``fixed``) to ``client_id`` when its assertion verifies against ``jwks``."""

    client_id: str
    jwks: dict[str, Any]  # kid -> public JWK registered for the client
    expires_in: int = 300
    fixed: str | None = None
    down: bool = False
    url: str = ""
    issued: list[str] = field(default_factory=list)
    assertions: list[dict[str, Any]] = field(default_factory=list)
    scopes: list[str] = field(default_factory=list)
    _counter: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/token", self._token)
        return app

    async def _token(self, request: web.Request) -> web.Response:
        if self.down:
            return web.json_response({"error": "temporarily_unavailable"}, status=503)
        form = await request.post()
        if form.get("grant_type") != "client_credentials" or form.get("client_assertion_type") != ASSERTION_TYPE:
            return web.json_response({"error": "invalid_request"}, status=400)
        assertion = str(form.get("client_assertion", ""))
        header = jwt.get_unverified_header(assertion)
        jwk = self.jwks.get(header.get("kid", ""))
        if jwk is None or header.get("alg") not in ("RS384", "ES384"):
            return web.json_response({"error": "invalid_client"}, status=401)
        try:
            claims = jwt.decode(assertion, jwt.PyJWK(jwk, header["alg"]).key, algorithms=[header["alg"]], audience=self.url,
                                issuer=self.client_id, options={"require": ["exp", "jti", "sub"]})
        except jwt.InvalidTokenError:
            return web.json_response({"error": "invalid_client"}, status=401)
        if claims["sub"] != self.client_id or claims["exp"] > time.time() + 300:
            return web.json_response({"error": "invalid_client"}, status=401)
        self.assertions.append(claims)
        self.scopes.append(str(form.get("scope", "")))
        token = self.fixed or f"tok-{next(self._counter)}"
        self.issued.append(token)
        body = {"access_token": token, "token_type": "bearer", "expires_in": self.expires_in, "scope": form.get("scope")}
        return web.Response(body=orjson.dumps(body), content_type="application/json")


async def start_token_server(server: TokenServer) -> TestServer:
    test_server = TestServer(server.app(), host="127.0.0.1")
    await test_server.start_server()
    server.url = f"http://127.0.0.1:{test_server.port}/token"
    return test_server
