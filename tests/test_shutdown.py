"""Shutdown (SPEC §9, §16): SIGTERM lets in-flight requests finish, uploads included, within one bound,
`server.shutdown_grace`; the service managers' stop timeouts in deploy/ leave room for it. Against `gateway run`
as a real process and real upstreams."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer
from test_ops import wait_ready

from gateway.config import ServerConfig
from gateway.server import STOP_MARGIN

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
async def slow_upstream() -> AsyncIterator[tuple[str, asyncio.Event]]:
    """/upload waits before reading its body (so the body piles up in the gateway's buffers), then answers
    its length and SHA-256; /hang (POST) never answers. The event is set once a request reached the upstream."""
    arrived = asyncio.Event()

    async def upload(request: web.Request) -> web.Response:
        arrived.set()
        await asyncio.sleep(1.5)
        digest, size = hashlib.sha256(), 0
        async for chunk in request.content.iter_any():
            digest.update(chunk)
            size += len(chunk)
        return web.json_response({"size": size, "sha256": digest.hexdigest()})

    async def hang(request: web.Request) -> web.Response:
        arrived.set()
        await asyncio.sleep(120)
        return web.Response(text="too late")

    async def slow(request: web.Request) -> web.Response:
        arrived.set()
        await asyncio.sleep(1.5)
        return web.Response(text="slow but here")

    app = web.Application()
    app.router.add_post("/upload", upload)
    app.router.add_post("/hang", hang)
    app.router.add_get("/hang", hang)
    app.router.add_get("/slow", slow)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield str(server.make_url("")).rstrip("/"), arrived
    await server.close()


async def run_gateway(write_config, ports, upstream: str, **server: object) -> asyncio.subprocess.Process:
    public_port, admin_port = ports
    config = write_config(
        server={"listen": f"127.0.0.1:{public_port}", "public_url": f"http://127.0.0.1:{public_port}", **server},
        admin={"listen": f"127.0.0.1:{admin_port}"}, upstream={"url": upstream, "timeout": "60s"},
        routes={"public": ["^/(upload|hang|slow)$"]}, log={"level": "info", "format": "json"})
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "run", "-c", str(config), cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        await wait_ready(f"http://127.0.0.1:{admin_port}", proc)
    except BaseException:
        proc.kill()
        await proc.wait()
        raise
    return proc


async def test_sigterm_during_an_upload_lets_it_finish(write_config, slow_upstream, unused_tcp_port_factory):
    upstream, arrived = slow_upstream
    ports = unused_tcp_port_factory(), unused_tcp_port_factory()
    proc = await run_gateway(write_config, ports, upstream, shutdown_grace="20s")
    body = os.urandom(8 * 1024 * 1024)
    try:
        async with aiohttp.ClientSession() as http:
            upload = asyncio.ensure_future(http.post(f"http://127.0.0.1:{ports[0]}/upload", data=io.BytesIO(body)))
            await asyncio.wait_for(arrived.wait(), 10)
            proc.send_signal(signal.SIGTERM)  # most of the body is still in buffers on its way in
            r = await asyncio.wait_for(upload, 15)
            assert r.status == 200, await r.text()
            assert await r.json() == {"size": len(body), "sha256": hashlib.sha256(body).hexdigest()}
        assert await asyncio.wait_for(proc.wait(), 15) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@pytest.mark.parametrize("method", ["POST", "GET"])
async def test_shutdown_is_bounded_by_the_grace_once(write_config, slow_upstream, unused_tcp_port_factory, method):
    """A request in flight gets `shutdown_grace` once, then its connection is cut: a POST (aiohttp's handler)
    and a GET (the proxied path's own server, web/fast_lane.py), each on a connection of its own so no client
    library retries it on the listener that is gone."""
    upstream, arrived = slow_upstream
    ports = unused_tcp_port_factory(), unused_tcp_port_factory()
    proc = await run_gateway(write_config, ports, upstream, shutdown_grace="2s")
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", ports[0])
        writer.write(f"{method} /hang HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".encode()
                     if method == "POST" else b"GET /hang HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.wait_for(arrived.wait(), 10)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(reader.read(), 30) == b""  # cut when the grace ran out, unanswered
        code = await asyncio.wait_for(proc.wait(), 30)
        took = time.monotonic() - started
        assert code == 0
        # The request had its grace (2 s), once: not twice, and not aiohttp's 60 s default.
        assert 1.9 <= took < 2 + STOP_MARGIN, took
        writer.close()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def _raw_get(port: int, path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A GET on a connection of our own (the proxied path's own server takes it; no client library retries)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    return reader, writer


async def test_sigterm_lets_a_proxied_get_finish_and_closes_idle_connections(write_config, slow_upstream,
                                                                            unused_tcp_port_factory):
    """The lane's connections (web/fast_lane.py) shut down as aiohttp's: a request in flight is answered, an
    idle kept-alive connection is closed at once."""
    upstream, arrived = slow_upstream
    ports = unused_tcp_port_factory(), unused_tcp_port_factory()
    proc = await run_gateway(write_config, ports, upstream, shutdown_grace="20s")
    try:
        idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", ports[0])
        reader, writer = await _raw_get(ports[0], "/slow")
        await asyncio.wait_for(arrived.wait(), 10)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(idle_reader.read(), 5) == b""  # closed without waiting for the grace
        answer = await asyncio.wait_for(reader.read(), 15)  # read to the close: the connection is not kept
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"slow but here"), answer
        assert b"\r\nConnection: close\r\n" in answer
        assert await asyncio.wait_for(proc.wait(), 15) == 0
        writer.close()
        idle_writer.close()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def _seconds(text: str) -> float:
    m = re.fullmatch(r"(\d+)(s|min)?", text.strip())
    assert m, text
    return int(m.group(1)) * (60 if m.group(2) == "min" else 1)


def test_service_managers_wait_longer_than_the_gateway_drains():
    grace = ServerConfig().shutdown_grace
    unit = (ROOT / "deploy/systemd/gateway.service").read_text()
    stop = re.search(r"^TimeoutStopSec=(\S+)$", unit, re.M)
    assert stop and _seconds(stop.group(1)) > grace + STOP_MARGIN, "systemd would SIGKILL a draining gateway"
    docs = [d for d in yaml.safe_load_all((ROOT / "deploy/kubernetes/sidecar.yaml").read_text()) if d]
    pod = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in pod["containers"]}

    def pre_stop(name: str) -> float:
        command = containers[name]["lifecycle"]["preStop"]["exec"]["command"]
        assert command[0] == "sleep"
        return float(command[1])

    assert pod["terminationGracePeriodSeconds"] > pre_stop("gateway") + grace + STOP_MARGIN
    assert pre_stop("tool") >= pre_stop("gateway") + grace, "the tool must outlive the gateway's drain"
