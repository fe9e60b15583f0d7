"""A bare aiohttp pass-through proxy: ``python -m bench.bare_proxy --upstream URL --port N``.

The baseline the gateway's price is measured against: the same event loop (asyncio's
default, run by ``asyncio.run``), the same server settings (``AppRunner`` without access
log) and the very same upstream client (``gateway.upstream.Upstream``: one pooled session,
same connector limit, DNS cache, timeout and header handling). It reads the whole answer
and sends it on, as the gateway does, but decides nothing and rewrites nothing.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator

from aiohttp import web
from yarl import URL

from gateway.app import until_signalled
from gateway.upstream import Upstream, end_to_end

UPSTREAM = web.AppKey("upstream", Upstream)
# Recomputed by aiohttp for the other leg (the gateway drops the same ones).
_NOT_FORWARDED_REQUEST = frozenset({"host", "content-length", "accept-encoding"})
_NOT_FORWARDED_RESPONSE = frozenset({"content-length", "content-encoding", "server", "date"})


async def forward(request: web.Request) -> web.Response:
    """Send the request on unchanged (path and query verbatim) and answer with the reply."""
    upstream = request.app[UPSTREAM]
    headers = end_to_end(request.headers)
    for name in list(headers.keys()):
        if name.lower() in _NOT_FORWARDED_REQUEST:
            del headers[name]
    body = await request.read() if request.can_read_body else None
    url = URL(upstream.base_url + request.raw_path, encoded=True)
    answer = await upstream.request(request.method, url, headers=headers, body=body)
    out = end_to_end(answer.headers)
    for name in list(out.keys()):
        if name.lower() in _NOT_FORWARDED_RESPONSE:
            del out[name]
    return web.Response(status=answer.status, body=answer.body, headers=out)


def build_app(upstream: Upstream) -> web.Application:
    """The proxy application; its cleanup_ctx owns the upstream session, like the gateway's."""
    app = web.Application()
    app[UPSTREAM] = upstream

    async def session_ctx(_: web.Application) -> AsyncIterator[None]:
        await upstream.open()
        yield
        await upstream.close()

    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


async def serve(upstream_origin: str, port: int, max_connections: int, timeout_s: float) -> None:
    upstream = Upstream(upstream_origin, timeout_s=timeout_s, max_connections=max_connections)
    runner = web.AppRunner(build_app(upstream), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await until_signalled()
    await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bare_proxy", description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True, help="origin of the upstream, e.g. http://127.0.0.1:8081")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--max-connections", type=int, default=100, help="as upstream.max_connections")
    parser.add_argument("--timeout-s", type=float, default=30.0, help="as upstream.timeout_s")
    args = parser.parse_args()
    asyncio.run(serve(args.upstream, args.port, args.max_connections, args.timeout_s))


if __name__ == "__main__":
    main()
