"""The listener (SPEC §16 timeouts and limits): slow or silent connections are closed after
`server.header_timeout`, idle keep-alive ones after `server.idle_timeout`, and beyond `server.max_connections`
new connections wait in the listen backlog. Raw sockets against a real listener, so nothing is hidden by a
client library."""

from __future__ import annotations

import asyncio
import gc
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web
from conftest import make_config

from gateway.config import Listen, ServerConfig
from gateway.listener import Limits, Listener

Start = Callable[..., Awaitable[int]]


class _Held:
    """Something a handler leaves in its request's state (an identity, say)."""


HELD: weakref.WeakSet[_Held] = weakref.WeakSet()
HELD_KEY = web.RequestKey("held", _Held)


async def _hello(request: web.Request) -> web.Response:
    body = await request.read()
    if request.path == "/hold":
        held = _Held()
        HELD.add(held)
        request[HELD_KEY] = held
        return web.Response(text="x" * 1000, headers={"X-Big": "y" * 1000})
    return web.Response(text=f"got {len(body)}")


@pytest.fixture
async def listen() -> AsyncIterator[Start]:
    """Start a real listener on a free port with the given limits: `port = await listen(header_timeout=...)`."""
    started: list[tuple[web.AppRunner, Listener]] = []

    async def start(*, header_timeout: float = 10.0, idle_timeout: float = 75.0, max_connections: int = 100) -> int:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", _hello)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
        await runner.setup()
        listener = Listener(runner, Listen("127.0.0.1", 0), Limits(header_timeout, idle_timeout, max_connections),
                            what="server.listen")
        await listener.start()
        started.append((runner, listener))
        return listener.port

    yield start
    for runner, listener in started:
        listener.close()
        await runner.cleanup()


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    """True when the server closes the connection (EOF or reset) within `seconds`, reading whatever it sends."""
    try:
        async with asyncio.timeout(seconds):
            while await reader.read(65536):
                pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


async def request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, body: bytes = b"") -> bytes:
    """One keep-alive request on an open connection; the response's body."""
    writer.write(b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.lower().split(b"\r\n")
    length = next(int(line.split(b":")[1]) for line in lines if line.startswith(b"content-length"))
    return await reader.readexactly(length)


async def test_a_connection_that_sends_nothing_is_closed_after_header_timeout(listen):
    port = await listen(header_timeout=0.5)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    assert await closed_within(reader, 5), "a silent connection stays open"
    assert time.monotonic() - started >= 0.4
    writer.close()


async def test_slowloris_headers_are_cut_while_still_dribbling(listen):
    port = await listen(header_timeout=0.8)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\nHost: t\r\n")
    closed = asyncio.ensure_future(closed_within(reader, 6))
    # One header line every 0.2 s: each byte arrives well within any per-read timeout, never the whole head.
    for i in range(25):
        if closed.done():
            break
        try:
            writer.write(b"X-Slow-%d: y\r\n" % i)
            await writer.drain()
        except ConnectionError:
            break
        await asyncio.sleep(0.2)
    assert await closed, "a connection dribbling its headers is never closed"
    writer.close()


async def test_keep_alive_then_idle_timeout_and_header_timeout_of_the_next_request(listen):
    port = await listen(header_timeout=0.6, idle_timeout=1.5)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert await request(reader, writer, b"abc") == b"got 3"
    await asyncio.sleep(0.9)  # idle longer than header_timeout: idle is not "slow headers"
    assert await request(reader, writer) == b"got 0", "an idle keep-alive connection is kept until idle_timeout"
    # The next request starts but never completes its headers: header_timeout, not idle_timeout.
    writer.write(b"GET / HTTP/1.1\r\n")
    started = time.monotonic()
    assert await closed_within(reader, 5)
    assert time.monotonic() - started < 1.4, "cut by header_timeout (0.6 s), not idle_timeout (1.5 s)"
    writer.close()
    # A connection left idle after a response is closed after idle_timeout.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert await request(reader, writer) == b"got 0"
    assert await closed_within(reader, 5)
    writer.close()


async def test_a_slow_body_is_not_cut_by_the_header_timeout(listen):
    port = await listen(header_timeout=0.5)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\n")
    for _ in range(10):  # 2 s for the body: four header timeouts
        writer.write(b"x")
        await writer.drain()
        await asyncio.sleep(0.2)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200")
    assert await reader.readexactly(6) == b"got 10"
    writer.close()


async def test_beyond_max_connections_new_ones_wait_in_the_backlog(listen):
    port = await listen(max_connections=2)
    first = await asyncio.open_connection("127.0.0.1", port)
    second = await asyncio.open_connection("127.0.0.1", port)
    assert await request(*first) == b"got 0"
    assert await request(*second) == b"got 0"
    # The kernel completes the handshake (backlog), but the gateway does not take the connection yet.
    third = await asyncio.open_connection("127.0.0.1", port)
    answer = asyncio.ensure_future(request(*third, b"hi"))
    await asyncio.sleep(0.5)
    assert not answer.done(), "a third connection was served beyond max_connections: 2"
    first[1].close()  # room for one more
    assert await asyncio.wait_for(answer, 5) == b"got 2"
    for _, writer in (second, third):
        writer.close()


def test_server_timeouts_and_limits_have_the_spec_defaults():
    cfg = ServerConfig()
    assert (cfg.header_timeout, cfg.idle_timeout, cfg.max_connections, cfg.shutdown_grace) == (10, 75, 10000, 30)
    cfg = make_config(public_port=1, admin_port=2, gitlab_url="http://gitlab", upstream_url="http://up",
                      server={"header_timeout": "2s", "idle_timeout": "1m", "max_connections": 50,
                              "shutdown_grace": "5s"}).server
    assert (cfg.header_timeout, cfg.idle_timeout, cfg.max_connections, cfg.shutdown_grace) == (2, 60, 50, 5)


async def test_an_idle_keep_alive_connection_keeps_nothing_of_its_last_request(listen: Start) -> None:
    """aiohttp's connection loop keeps its last request and response while it waits on a keep-alive connection;
    what the handler left in the request's state must not live on with it (10,000 idle connections would
    each keep an identity, bench/memory.py)."""
    port = await listen()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /hold HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"X-Big" in head
    await reader.readexactly(1000)
    await asyncio.sleep(0.05)
    gc.collect()
    assert len(HELD) == 0  # the connection is open and idle, the handler's object gone
    writer.write(b"GET /again HTTP/1.1\r\nHost: x\r\n\r\n")  # and the connection still serves
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
    writer.close()
    await writer.wait_closed()
