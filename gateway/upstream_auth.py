"""The gateway's own credentials and TLS settings toward the FHIR server (CONTRACT §3).

Every call the gateway makes on its own (consent lookups, memberships, related reads,
emergency Consents, audit delivery, the readiness ping) goes through ``Upstream.request``,
which asks the ``Credentials`` here for the ``Authorization`` value and, after a 401, for
one renewal. Key, certificate and token files that cannot be read at start-up raise
``ConfigError`` (one line naming the key; the command exits 2). Secrets never reach a log
line, an error message or a metric.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import os
import ssl
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from gateway.config import ConfigError, UpstreamAuthSettings, UpstreamSettings

log = logging.getLogger("gateway.upstream")

CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ASSERTION_LIFETIME_S = 300  # SMART Backend Services: at most five minutes
# A token is renewed this long before it expires (a fifth of its life when that is shorter).
RENEW_BEFORE_S = 60.0


class CredentialsUnavailable(Exception):
    """No credential could be obtained (token endpoint down, token file gone)."""


def tls_context(settings: UpstreamSettings) -> ssl.SSLContext | None:
    """The TLS context for the FHIR server: ``ca_file`` (else system CAs) and the mTLS pair.

    None when nothing is configured (aiohttp's default verification applies).
    """
    if settings.ca_file is None and settings.client_cert_file is None:
        return None
    _readable(settings.ca_file, "upstream.ca_file")
    _readable(settings.client_cert_file, "upstream.client_cert_file")
    _readable(settings.client_key_file, "upstream.client_key_file")
    try:
        context = ssl.create_default_context(cafile=str(settings.ca_file) if settings.ca_file else None)
    except (ssl.SSLError, OSError):
        raise ConfigError(f"upstream.ca_file: {settings.ca_file} is not a PEM CA bundle") from None
    if settings.client_cert_file is not None:
        try:
            context.load_cert_chain(str(settings.client_cert_file), str(settings.client_key_file))
        except (ssl.SSLError, OSError):
            raise ConfigError(
                "upstream.client_cert_file: the certificate and upstream.client_key_file do not form "
                "a PEM certificate and matching unencrypted key"
            ) from None
    return context


def _readable(path: Path | None, key: str) -> bytes:
    if path is None:
        return b""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror or exc}") from None


class Credentials(ABC):
    """Where the ``Authorization`` header of the gateway's own calls comes from."""

    @abstractmethod
    async def authorization(self, session: aiohttp.ClientSession) -> str:
        """The header value to send now; raises CredentialsUnavailable."""

    @abstractmethod
    async def renew(self, session: aiohttp.ClientSession, refused: str) -> bool:
        """After a 401 for ``refused``: get a fresh credential; False when there is none."""


class EnvBearer(Credentials):
    """A fixed token from an environment variable, read once at start-up."""

    def __init__(self, token: str) -> None:
        self._value = f"Bearer {token}"

    async def authorization(self, session: aiohttp.ClientSession) -> str:
        return self._value

    async def renew(self, session: aiohttp.ClientSession, refused: str) -> bool:
        return False


class FileBearer(Credentials):
    """A token in a file, re-read whenever the file changes (mounted secrets that rotate).

    A file that vanishes or empties for a moment during rotation keeps the last token.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._value = ""
        if not self._reload():
            raise ConfigError(f"upstream.auth.token_file: {path} holds no token")

    def _reload(self) -> bool:
        try:
            stat = os.stat(self.path)
            stamp = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
            if stamp == self._stamp:
                return True
            token = self.path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            if self._stamp is None:
                raise ConfigError(f"upstream.auth.token_file: cannot read {self.path}: {exc.strerror or exc}") from None
            return bool(self._value)
        except UnicodeDecodeError:
            raise ConfigError(f"upstream.auth.token_file: {self.path} is not text") from None
        if not token:
            return bool(self._value)
        self._stamp, self._value = stamp, f"Bearer {token}"
        return True

    async def authorization(self, session: aiohttp.ClientSession) -> str:
        self._reload()
        return self._value

    async def renew(self, session: aiohttp.ClientSession, refused: str) -> bool:
        self._reload()
        return self._value != refused


@dataclass(frozen=True, slots=True)
class _Token:
    value: str
    renew_at: float  # monotonic seconds


class SmartBackend(Credentials):
    """SMART Backend Services client credentials with a ``private_key_jwt`` assertion.

    The token is cached and renewed shortly before it expires; concurrent callers share one
    token request. A 401 with the current token asks for one new token.
    """

    def __init__(
        self, token_url: str, client_id: str, key: Any, algorithm: str, key_id: str, scope: str,
        timeout_s: float = 30.0,
    ) -> None:
        self.token_url = token_url
        self.client_id = client_id
        self.key = key
        self.algorithm = algorithm
        self.key_id = key_id
        self.scope = scope
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._token: _Token | None = None
        self._pending: asyncio.Future[_Token] | None = None

    def assertion(self, now: float) -> str:
        """The signed client assertion (RFC 7523; SMART Backend Services)."""
        claims = {
            "iss": self.client_id, "sub": self.client_id, "aud": self.token_url,
            "iat": int(now), "exp": int(now) + ASSERTION_LIFETIME_S, "jti": uuid.uuid4().hex,
        }
        return jwt.encode(claims, self.key, algorithm=self.algorithm, headers={"kid": self.key_id, "typ": "JWT"})

    async def authorization(self, session: aiohttp.ClientSession) -> str:
        token = self._token
        if token is None or time.monotonic() >= token.renew_at:
            token = await self._shared_request(session)
        return f"Bearer {token.value}"

    async def renew(self, session: aiohttp.ClientSession, refused: str) -> bool:
        current = self._token
        if current is not None and f"Bearer {current.value}" != refused:
            return True  # another request already renewed it
        self._token = None
        await self._shared_request(session)
        return True

    async def _shared_request(self, session: aiohttp.ClientSession) -> _Token:
        if self._pending is None:
            self._pending = asyncio.ensure_future(self._request(session))
            pending = self._pending
            pending.add_done_callback(lambda _: setattr(self, "_pending", None))
        try:
            token = await asyncio.shield(self._pending)
        except CredentialsUnavailable:
            raise
        except Exception:
            raise CredentialsUnavailable("token request failed") from None
        self._token = token
        return token

    async def _request(self, session: aiohttp.ClientSession) -> _Token:
        form = {
            "grant_type": "client_credentials",
            "scope": self.scope,
            "client_assertion_type": CLIENT_ASSERTION_TYPE,
            "client_assertion": self.assertion(time.time()),
        }
        try:
            async with session.post(
                self.token_url, data=form, headers={"Accept": "application/json"},
                timeout=self.timeout, allow_redirects=False,
            ) as resp:
                status, body = resp.status, await resp.read()
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            log.warning("upstream token request failed: %s", type(exc).__name__)
            raise CredentialsUnavailable("token endpoint unreachable") from None
        if status != 200:
            log.warning("upstream token request refused: HTTP %d", status)
            raise CredentialsUnavailable("token refused")
        try:
            answer = orjson.loads(body)
            value = answer["access_token"]
            lifetime = float(answer.get("expires_in", 300))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            raise CredentialsUnavailable("malformed token answer") from None
        if not isinstance(value, str) or not value:
            raise CredentialsUnavailable("malformed token answer")
        margin = min(RENEW_BEFORE_S, lifetime / 5)
        return _Token(value, time.monotonic() + max(0.0, lifetime - margin))


def load_private_key(path: Path) -> tuple[Any, str]:
    """The signing key in ``path`` (PEM, unencrypted) and its algorithm: RS384 or ES384."""
    data = _readable(path, "upstream.auth.private_key_file")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise ConfigError(
            f"upstream.auth.private_key_file: {path} is not an unencrypted PEM private key"
        ) from None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < 2048:
            raise ConfigError("upstream.auth.private_key_file: an RSA key needs at least 2048 bits")
        return key, "RS384"
    if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP384R1):
        return key, "ES384"
    raise ConfigError("upstream.auth.private_key_file: the key must be RSA (RS384) or EC P-384 (ES384)")


def jwk_thumbprint(public_jwk: Mapping[str, Any]) -> str:
    """RFC 7638 thumbprint (SHA-256, base64url) of a public RSA or EC JWK."""
    members = ("e", "kty", "n") if public_jwk["kty"] == "RSA" else ("crv", "kty", "x", "y")
    canonical = orjson.dumps({m: public_jwk[m] for m in members}, option=orjson.OPT_SORT_KEYS)
    return base64.urlsafe_b64encode(hashlib.sha256(canonical).digest()).rstrip(b"=").decode()


def public_jwk(key: Any, algorithm: str) -> dict[str, Any]:
    """The public JWK of a private key, as a JWKS entry (``kid`` = thumbprint, ``alg``)."""
    algo = jwt.get_algorithm_by_name(algorithm)
    jwk: dict[str, Any] = orjson.loads(algo.to_jwk(key.public_key()))
    jwk["alg"] = algorithm
    jwk["kid"] = jwk_thumbprint(jwk)
    return jwk


def build_credentials(settings: UpstreamAuthSettings, environ: Mapping[str, str], timeout_s: float = 30.0) -> Credentials | None:
    """The Credentials ``upstream.auth`` describes, None for ``kind: none``; ConfigError otherwise."""
    if settings.kind == "none":
        return None
    if settings.kind == "bearer":
        if settings.token_file is not None:
            return FileBearer(settings.token_file)
        token = environ.get(settings.token_env or "", "").strip()
        if not token:
            # SECURITY: names the variable, never its value.
            raise ConfigError(f"upstream.auth.token_env: environment variable {settings.token_env} is not set")
        return EnvBearer(token)
    assert settings.private_key_file and settings.token_url and settings.client_id  # the settings require them
    key, algorithm = load_private_key(settings.private_key_file)
    key_id = settings.key_id or public_jwk(key, algorithm)["kid"]
    return SmartBackend(settings.token_url, settings.client_id, key, algorithm, key_id, settings.scope, timeout_s)
