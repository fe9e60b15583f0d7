"""The only aiohttp client code: one pooled session to the FHIR upstream.

Client errors become GatewayErrors here, with messages that never name the upstream host.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from gateway.core.answer_headers import HOP_BY_HOP
from gateway.core.errors import UpstreamTimeout, UpstreamTooLarge, UpstreamUnavailable
from gateway.upstream_auth import Credentials, CredentialsUnavailable


def connection_named(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> set[str]:
    """The (lower-case) names the Connection header lists: hop-by-hop for this connection."""
    return {t.strip().lower() for v in headers.getall("Connection", ()) for t in v.split(",")}


def end_to_end(
    headers: CIMultiDictProxy[str] | CIMultiDict[str], dropped: frozenset[str] = HOP_BY_HOP,
    dropped_prefixes: tuple[str, ...] = (),
) -> CIMultiDict[str]:
    """Headers without hop-by-hop ones, including any the Connection header names.

    ``dropped`` (lower-case, a superset of HOP_BY_HOP) and ``dropped_prefixes`` name more
    headers to leave out, every occurrence, in the same pass.
    """
    named = connection_named(headers)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        lower = name.lower()
        if lower not in dropped and lower not in named and not lower.startswith(dropped_prefixes):
            out.add(name, value)
    return out


@dataclass(frozen=True, slots=True)
class UpstreamResponse:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes
    seconds: float


def _too_large() -> UpstreamTooLarge:
    return UpstreamTooLarge("The FHIR server's answer is larger than this gateway accepts.")


async def read_capped(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """The whole body, read chunk by chunk; UpstreamTooLarge (502) as soon as it passes ``limit``.

    SECURITY: an answer is never buffered beyond the limit, so no answer can exhaust memory.
    """
    if resp.content_length is not None and resp.content_length > limit:
        raise _too_large()
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise _too_large()
        chunks.append(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class Upstream:
    """A FHIR server reached over one pooled ClientSession (owned by the app's cleanup_ctx)."""

    def __init__(
        self, base_url: str, *, timeout_s: float, max_connections: int,
        tls: ssl.SSLContext | None = None, credentials: Credentials | None = None,
        max_response_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self.max_response_bytes = max_response_bytes
        self.base_url = base_url.rstrip("/")
        self.base = URL(self.base_url)
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None
        self.tls = tls
        # The gateway's own credentials replace any Authorization a caller passes (CONTRACT §4).
        self.credentials = credentials

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("upstream session is not open")
        return self._session

    async def open(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=self._max_connections, ttl_dns_cache=300, ssl=self.tls if self.tls is not None else True
        )
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=self._timeout, auto_decompress=True,
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def url_for(self, path: str, query_string: str = "") -> URL:
        """The upstream URL of a path below the FHIR base; the query string is kept verbatim."""
        raw = f"{self.base_url}/{path.lstrip('/')}" if path else self.base_url
        if query_string:
            raw = f"{raw}?{query_string}"
        return URL(raw, encoded=True)

    async def request(
        self,
        method: str,
        url: URL,
        *,
        headers: Mapping[str, str] | CIMultiDict[str] | None = None,
        body: bytes | None = None,
        timeout_s: float | None = None,
    ) -> UpstreamResponse:
        """Send one request and read the whole answer; connection errors raise GatewayErrors."""
        started = time.perf_counter()
        timeout = aiohttp.ClientTimeout(total=timeout_s) if timeout_s is not None else self._timeout
        if self.credentials is None:
            return await self._send(method, url, headers, body, timeout, started)
        sent = CIMultiDict(headers or {})
        sent["Authorization"] = await self._authorization(None)
        resp = await self._send(method, url, sent, body, timeout, started)
        if resp.status == 401:
            # One renewal and one retry: a token revoked or expired early.
            renewed = await self._authorization(sent["Authorization"])
            if renewed != sent["Authorization"]:
                sent["Authorization"] = renewed
                resp = await self._send(method, url, sent, body, timeout, started)
        if resp.status == 401:
            # The FHIR server refused the gateway's own credentials: the client's request is not
            # at fault, and the server's challenge (its identity provider) is not the client's.
            raise UpstreamUnavailable("The FHIR server refused the gateway's credentials.")
        return resp

    async def _authorization(self, refused: str | None) -> str:
        assert self.credentials is not None
        try:
            if refused is not None and not await self.credentials.renew(self.session, refused):
                return refused
            return await self.credentials.authorization(self.session)
        except CredentialsUnavailable:
            raise UpstreamUnavailable("The gateway could not obtain its credentials for the FHIR server.") from None

    async def _send(
        self, method: str, url: URL, headers: Mapping[str, str] | CIMultiDict[str] | None,
        body: bytes | None, timeout: aiohttp.ClientTimeout, started: float,
    ) -> UpstreamResponse:
        try:
            async with self.session.request(
                method, url, headers=headers, data=body, allow_redirects=False, timeout=timeout
            ) as resp:
                payload = await read_capped(resp, self.max_response_bytes)
                return UpstreamResponse(resp.status, resp.headers, payload, time.perf_counter() - started)
        except asyncio.TimeoutError:
            raise UpstreamTimeout("The FHIR server did not answer in time.") from None
        except (aiohttp.ClientError, OSError):
            raise UpstreamUnavailable("The FHIR server could not be reached.") from None

    async def ping(self, timeout_s: float) -> bool:
        """True when ``/metadata`` answers 2xx within ``timeout_s``."""
        try:
            resp = await self.request(
                "GET", self.url_for("metadata"), headers={"Accept": "application/fhir+json"},
                timeout_s=timeout_s,
            )
        except (UpstreamTimeout, UpstreamUnavailable):
            return False
        return 200 <= resp.status < 300
