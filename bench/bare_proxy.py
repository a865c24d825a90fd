"""A bare aiohttp pass-through proxy with no authentication: the yardstick for the gateway's own cost.

    python bench/bare_proxy.py --listen 127.0.0.1:4190 --upstream http://127.0.0.1:8081

One process, the default event loop, one ClientSession; hop-by-hop headers dropped both ways, the body read
whole (the benchmark's pages are 200 bytes). It does what any aiohttp proxy must do and nothing more.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
                        "trailer", "transfer-encoding", "upgrade", "host", "content-length"})
HTTP = web.AppKey("http", aiohttp.ClientSession)


async def handle(request: web.Request) -> web.Response:
    headers = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP)
    data = await request.read() if request.body_exists else None
    async with request.app[HTTP].request(request.method, request.app[UPSTREAM] + request.raw_path,
                                         headers=headers, data=data, allow_redirects=False) as up:
        body = await up.read()
        out = CIMultiDict((k, v) for k, v in up.headers.items() if k.lower() not in HOP_BY_HOP)
        return web.Response(status=up.status, headers=out, body=body)


UPSTREAM = web.AppKey("upstream", str)


async def client_ctx(app: web.Application) -> AsyncIterator[None]:
    app[HTTP] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False,
                                      cookie_jar=aiohttp.DummyCookieJar())
    yield
    await app[HTTP].close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--listen", default="127.0.0.1:4190")
    parser.add_argument("--upstream", default="http://127.0.0.1:8081")
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    app = web.Application()
    app[UPSTREAM] = args.upstream.rstrip("/")
    app.cleanup_ctx.append(client_ctx)
    app.router.add_route("*", "/{tail:.*}", handle)
    web.run_app(app, host=host, port=int(port), access_log=None, print=None)


if __name__ == "__main__":
    main()
