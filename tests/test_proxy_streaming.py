"""Streaming through the proxy (SPEC §7): multi-GB bodies in bounded memory, SSE and chunked bodies flushed as
they come, uploads reaching the upstream before the client has finished sending.

The big-transfer test keeps the gateway in this process and puts everything that touches the data (a
source/sink upstream and the client) in a child process, so this process's RSS is the gateway's memory.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import session_cookie as sign_in

COOKIE = "_gateway"
# 2 GiB each way. Measured on the 2-core CI machine: about 3 s per direction (~650 MB/s through the gateway on
# one core, the child on the other), about 10 s for the whole test. GATEWAY_STREAM_BYTES overrides the size.
BIG = int(os.environ.get("GATEWAY_STREAM_BYTES", str(2 * 1024**3)))
MEMORY_BUDGET = 50 * 1024**2
CHUNK = 1024 * 1024




# ---- the child process: a source/sink upstream and the client, both in one asyncio loop ---------------

CHILD = r'''
import asyncio, json, sys, time
import aiohttp
from aiohttp import web

port, gateway, cookie, size, chunk = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
block = b"\xa5" * chunk

async def sink(request):
    n = 0
    async for data in request.content.iter_any():
        n += len(data)
    return web.json_response({"received": n})

async def source(request):
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    response.content_length = size
    await response.prepare(request)
    left = size
    while left > 0:
        piece = block if left >= chunk else block[:left]
        await response.write(piece)
        left -= len(piece)
    await response.write_eof()
    return response

async def main():
    app = web.Application(client_max_size=0)
    app.router.add_post("/sink", sink)
    app.router.add_get("/source", source)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", int(port)).start()
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    result = {}
    headers = {"Cookie": f"_gateway={cookie}"}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as http:
        async def body():
            left = size
            while left > 0:
                piece = block if left >= chunk else block[:left]
                yield piece
                left -= len(piece)
        started = time.monotonic()
        async with http.post(gateway + "/sink", data=body(),
                             headers={**headers, "Content-Length": str(size)}) as r:
            result["upload_status"] = r.status
            result["uploaded"] = (await r.json())["received"] if r.status == 200 else await r.text()
        result["upload_seconds"] = time.monotonic() - started
        started = time.monotonic()
        async with http.get(gateway + "/source", headers=headers) as r:
            result["download_status"] = r.status
            n = 0
            async for data in r.content.iter_any():
                n += len(data)
            result["downloaded"] = n
        result["download_seconds"] = time.monotonic() - started
    print(json.dumps(result), flush=True)
    await runner.cleanup()

asyncio.run(main())
'''


async def _read_line(proc: asyncio.subprocess.Process, timeout: float) -> str:
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), timeout)
    return line.decode().strip()


async def test_two_gigabytes_each_way_in_bounded_memory(gateway_factory, unused_tcp_port_factory):
    port = unused_tcp_port_factory()
    gw = await gateway_factory(upstream={"url": f"http://127.0.0.1:{port}", "timeout": "60s"})
    cookie = await sign_in(gw)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, str(port), gw.public_url, cookie, str(BIG), str(CHUNK),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    me = psutil.Process()
    try:
        assert await _read_line(proc, 30) == "ready"
        # Warm up the path (connection pools, buffers, code paths) before taking the baseline.
        async with aiohttp.ClientSession() as http:
            for _ in range(3):
                async with http.post(gw.public_url + "/sink", data=io.BytesIO(b"w" * 5 * CHUNK),
                                     headers={"Cookie": f"{COOKIE}={cookie}"}) as r:
                    assert r.status == 200
        baseline = me.memory_info().rss
        peak = baseline
        assert proc.stdin is not None
        proc.stdin.write(b"go\n")
        await proc.stdin.drain()
        result_line = asyncio.ensure_future(_read_line(proc, 240))
        while not result_line.done():
            peak = max(peak, me.memory_info().rss)
            await asyncio.wait({result_line}, timeout=0.05)
        result: dict[str, Any] = json.loads(result_line.result())
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
    print(f"\n{BIG / 1024**3:.2f} GiB: upload {result['upload_seconds']:.1f}s, download "
          f"{result['download_seconds']:.1f}s, gateway RSS growth {(peak - baseline) / 1024**2:.1f} MiB")
    assert result["upload_status"] == 200 and result["uploaded"] == BIG
    assert result["download_status"] == 200 and result["downloaded"] == BIG
    assert peak - baseline < MEMORY_BUDGET


@pytest.mark.parametrize("content_type", ["text/event-stream", "application/octet-stream"])
async def test_response_chunks_reach_the_client_before_the_upstream_finishes(gateway_factory, content_type):
    release = asyncio.Event()
    outcome: dict[str, bool] = {}

    async def events(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": content_type, "Cache-Control": "no-cache"})
        await response.prepare(request)
        await response.write(b"data: one\n\n")
        try:
            await asyncio.wait_for(release.wait(), 5)
            outcome["released_by_client"] = True
        except TimeoutError:
            outcome["released_by_client"] = False  # the first event never got through on its own
        await response.write(b"data: two\n\n")
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/events", events)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        gw = await gateway_factory(upstream={"url": str(server.make_url("")).rstrip("/")})
        cookie = await sign_in(gw)
        async with aiohttp.ClientSession() as http, http.get(
                gw.public_url + "/events", headers={"Cookie": f"{COOKIE}={cookie}"}) as r:
            assert r.status == 200
            assert r.headers["Content-Type"] == content_type
            first = await asyncio.wait_for(r.content.readuntil(b"\n\n"), 3)
            assert first == b"data: one\n\n"
            release.set()
            assert await r.content.read() == b"data: two\n\n"
    finally:
        await server.close()
    assert outcome == {"released_by_client": True}


async def test_request_body_reaches_the_upstream_before_the_client_finishes(gateway_factory):
    first_seen = asyncio.Event()

    async def sink(request: web.Request) -> web.Response:
        received = await request.content.readany()
        first_seen.set()
        rest = await request.content.read()
        return web.json_response({"first": received.decode(), "total": len(received) + len(rest)})

    app = web.Application()
    app.router.add_post("/sink", sink)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        gw = await gateway_factory(upstream={"url": str(server.make_url("")).rstrip("/")})
        cookie = await sign_in(gw)

        async def body() -> AsyncIterator[bytes]:
            yield b"first"
            # Only a gateway that streams lets the upstream see "first" while we are still sending.
            await asyncio.wait_for(first_seen.wait(), 5)
            yield b"-second"

        started = time.monotonic()
        async with aiohttp.ClientSession() as http, http.post(
                gw.public_url + "/sink", data=body(), headers={"Cookie": f"{COOKIE}={cookie}"}) as r:
            assert r.status == 200, await r.text()
            assert await r.json() == {"first": "first", "total": len(b"first-second")}
        assert time.monotonic() - started < 3
    finally:
        await server.close()


def test_child_script_is_valid_python() -> None:
    compile(CHILD, str(Path(__file__).with_suffix(".child.py")), "exec")
