"""The token issuer as the gateway sees it: its signing keys (JWKS) and discovery document.

Verification (CONTRACT §4): the signature against a key of the issuer's JWKS chosen by
``kid``, the algorithm in ``auth.jwt.algorithms`` and matching the key's type and curve
(symmetric keys are never used: an HS256 token "signed" with a public key fails), ``iss``,
``aud``, ``exp`` (required) and ``nbf`` with ``leeway_s``. Keys are cached; an unknown
``kid`` refetches the JWKS at most once a minute. Every token problem is
``Unauthenticated`` (401 with ``WWW-Authenticate: Bearer``); an issuer that cannot be
reached while no cached key fits is ``IdentityUnavailable`` (503).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import jwt
import orjson

from gateway.config import JwtSettings
from gateway.core.errors import IdentityUnavailable, Unauthenticated

log = logging.getLogger("gateway.identity")

REFETCH_AFTER_S = 60.0       # an unknown kid refetches the JWKS at most this often
RETRY_FAILED_AFTER_S = 5.0   # a failed fetch is retried no sooner than this
DISCOVERY_TTL_S = 300.0
_CURVES = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}
CHALLENGE = 'Bearer realm="FHIR"'


def invalid_token(description: str) -> Unauthenticated:
    """A 401 whose challenge says the token was refused (RFC 6750 §3.1)."""
    return Unauthenticated(
        f"The access token is not valid: {description}.",
        headers={"WWW-Authenticate": f'{CHALLENGE}, error="invalid_token", error_description="{description}"'},
    )


def no_token() -> Unauthenticated:
    return Unauthenticated(
        "An access token is required (Authorization: Bearer).", headers={"WWW-Authenticate": CHALLENGE}
    )


def _key_fits(jwk: dict[str, Any], algorithm: str) -> bool:
    """The key can verify ``algorithm``: RSA for RS/PS, EC on the algorithm's curve."""
    if jwk.get("use", "sig") != "sig" or jwk.get("alg", algorithm) != algorithm:
        return False
    if algorithm[:2] in ("RS", "PS"):
        return jwk.get("kty") == "RSA"
    return jwk.get("kty") == "EC" and jwk.get("crv") == _CURVES.get(algorithm)


_REJECTIONS: tuple[tuple[type[Exception], str], ...] = (
    (jwt.ExpiredSignatureError, "token expired"),
    (jwt.ImmatureSignatureError, "token not yet valid"),
    (jwt.InvalidAudienceError, "wrong audience"),
    (jwt.InvalidIssuerError, "wrong issuer"),
    (jwt.InvalidSignatureError, "bad signature"),
)


class Issuer:
    """One token issuer: cached JWKS, verification, cached discovery document."""

    def __init__(self, settings: JwtSettings, clock: Callable[[], float] = time.monotonic, timeout_s: float = 10.0) -> None:
        assert settings.issuer is not None and settings.audience is not None  # required in jwt mode
        self.settings = settings
        self.issuer = settings.issuer
        self.jwks_url = settings.jwks
        self.clock = clock
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None
        self._keys: dict[str, dict[str, Any]] = {}  # kid ("" when absent) -> JWK
        self._parsed: dict[tuple[str, str], jwt.PyJWK] = {}
        self._fetched_at: float | None = None
        self._failed_at: float | None = None
        self._fetching: asyncio.Future[None] | None = None
        self._discovery: tuple[float, dict[str, Any]] | None = None
        self.fetches = 0

    async def open(self) -> None:
        self._session = aiohttp.ClientSession(timeout=self.timeout)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _get_json(self, url: str) -> dict[str, Any]:
        if self._session is None:
            raise RuntimeError("issuer session is not open")
        async with self._session.get(url, headers={"Accept": "application/json"}, allow_redirects=False) as resp:
            if resp.status != 200:
                raise ValueError(f"HTTP {resp.status}")
            data = orjson.loads(await resp.read())
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return data

    async def _fetch_keys(self) -> None:
        self.fetches += 1
        try:
            data = await self._get_json(self.jwks_url)
            keys = data.get("keys")
            if not isinstance(keys, list):
                raise ValueError("no keys")
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError, ValueError, orjson.JSONDecodeError) as exc:
            self._failed_at = self.clock()
            log.warning("issuer keys could not be fetched: %s", type(exc).__name__)
            return
        # SECURITY: symmetric keys are never verification keys here.
        self._keys = {
            str(k.get("kid", "")): k for k in keys if isinstance(k, dict) and k.get("kty") in ("RSA", "EC")
        }
        self._parsed.clear()
        self._fetched_at, self._failed_at = self.clock(), None

    async def _refresh(self) -> None:
        """Fetch the JWKS once for all concurrent callers."""
        if self._fetching is None:
            self._fetching = asyncio.ensure_future(self._fetch_keys())
            self._fetching.add_done_callback(lambda _: setattr(self, "_fetching", None))
        await asyncio.shield(self._fetching)

    def _may_refetch(self) -> bool:
        now = self.clock()
        if self._failed_at is not None and now - self._failed_at < RETRY_FAILED_AFTER_S:
            return False
        return self._fetched_at is None or now - self._fetched_at >= REFETCH_AFTER_S

    def _lookup(self, kid: str | None) -> dict[str, Any] | None:
        if kid is not None:
            return self._keys.get(kid)
        # A token without kid is accepted only while the issuer publishes a single key.
        return next(iter(self._keys.values())) if len(self._keys) == 1 else None

    async def key(self, kid: str | None, algorithm: str) -> jwt.PyJWK:
        """The verification key for ``kid``; refetches once a minute at most when unknown."""
        jwk = self._lookup(kid)
        if jwk is None and self._may_refetch():
            await self._refresh()
            jwk = self._lookup(kid)
        if jwk is None:
            if self._fetched_at is None:
                raise IdentityUnavailable("The token issuer's keys cannot be read.")
            raise invalid_token("unknown signing key")
        if not _key_fits(jwk, algorithm):
            raise invalid_token("the algorithm does not match the signing key")
        cache_key = (str(jwk.get("kid", "")), algorithm)
        parsed = self._parsed.get(cache_key)
        if parsed is None:
            try:
                parsed = self._parsed[cache_key] = jwt.PyJWK(jwk, algorithm)
            except jwt.PyJWKError:
                raise invalid_token("unusable signing key") from None
        return parsed

    async def verify(self, token: str) -> dict[str, Any]:
        """The claims of a valid token; ``Unauthenticated`` (401) for anything else."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise invalid_token("malformed token") from None
        algorithm = header.get("alg")
        # SECURITY: the algorithm comes from configuration, never from the token alone ("none",
        # HS256 keyed with a public key).
        if not isinstance(algorithm, str) or algorithm not in self.settings.algorithms:
            raise invalid_token("algorithm not allowed")
        kid = header.get("kid")
        key = await self.key(kid if isinstance(kid, str) else None, algorithm)
        try:
            claims: dict[str, Any] = jwt.decode(
                token, key.key, algorithms=[algorithm], audience=self.settings.audience, issuer=self.issuer,
                leeway=self.settings.leeway_s, options={"require": ["exp", "iss", "aud"]},
            )
        except jwt.InvalidTokenError as exc:
            # The most specific reason first; a client learns what to fix, nothing else.
            why = next((text for kind, text in _REJECTIONS if isinstance(exc, kind)), "token rejected")
            raise invalid_token(why) from None
        return claims

    async def discovery(self) -> dict[str, Any]:
        """The issuer's SMART configuration (its ``.well-known/smart-configuration``, else
        its OpenID configuration), cached for five minutes."""
        cached = self._discovery
        if cached is not None and self.clock() - cached[0] < DISCOVERY_TTL_S:
            return cached[1]
        for name in ("smart-configuration", "openid-configuration"):
            try:
                document = await self._get_json(f"{self.issuer.rstrip('/')}/.well-known/{name}")
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError, ValueError, orjson.JSONDecodeError):
                continue
            self._discovery = (self.clock(), document)
            return document
        if cached is not None:
            return cached[1]
        raise IdentityUnavailable("The token issuer's configuration cannot be read.")
