"""The floor under the gateway's proxied path: aiohttp's server and the gateway's upstream client, nothing else.

    python bench/relay_floor.py --listen 127.0.0.1:4191 --upstream http://127.0.0.1:8081

One process on uvloop (as `gateway run`), GET/HEAD-sized relaying only (bodies are not read: the benchmark's
requests have none): take a pooled connection, write the head, read the response, answer it with hop-by-hop
headers dropped. No middleware, session, policy, identity headers, deadline or access log. What the gateway
spends per request above this row is its own work (bench/README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import uvloop
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.access.headers import HeaderPolicy
from gateway.web.upstream_client import UpstreamPool, request_head


async def serve(listen: str, upstream: str) -> None:
    pool = UpstreamPool(upstream, connect_timeout=5)

    async def handle(request: web.Request) -> web.Response:
        conn = pool.take() or await pool.connect()
        headers = [("Host", pool.netloc), *((k, v) for k, v in request.headers.items() if k.lower() != "host")]
        conn.start(request_head(request.method, request.raw_path, headers), is_head=request.method == "HEAD",
                   has_body=False)
        await conn.response()
        body = await conn.read_all()
        conn.finish()
        return web.Response(status=conn.status, headers=HeaderPolicy.relayed_response_headers(conn.headers),
                            body=body)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    host, _, port = listen.rpartition(":")
    await web.TCPSite(runner, host, int(port)).start()
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--listen", required=True)
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()
    uvloop.run(serve(args.listen, args.upstream))


if __name__ == "__main__":
    main()
