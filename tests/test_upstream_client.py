"""The upstream client of the proxied path (gateway/web/upstream_client.py, upstream_protocol.py).

Against raw upstreams written over asyncio streams, so each byte is where the test puts it: responses split at
every byte boundary (and, below the gateway, at any set of boundaries: hypothesis), a pooled connection the
upstream closes just as it is reused, 1xx/HEAD/204/304 on one kept-alive connection, and backpressure with a
slow reader on either side (the bytes in flight between upstream and client stay bounded).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.web.upstream_client import UpstreamPool
from gateway.web.upstream_protocol import READ_HIGH, UpstreamConnection

# Responses on one kept-alive connection: (request method, the raw response, what the client must get).
EARLY_HINTS_CHUNKED = (b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n"
                       b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: b\r\nConnection: keep-alive, X-A\r\n"
                       b"\r\n5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n")
CONTINUE_LENGTH = (b"HTTP/1.1 100 Continue\r\n\r\n"
                   b"HTTP/1.1 201 Created\r\nContent-Length: 11\r\nX-B: c\r\nKeep-Alive: timeout=30\r\n\r\nhello world")
HEAD_WITH_LENGTH = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\nX-C: d\r\n\r\n"
NO_CONTENT = b"HTTP/1.1 204 No Content\r\nX-D: e\r\n\r\n"
NOT_MODIFIED = b"HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\nContent-Length: 1000\r\n\r\n"
CASES: dict[str, tuple[str, bytes, int, bytes, dict[str, str]]] = {
    # name: (method, response, status, body, headers the client must see)
    "hints+chunked": ("GET", EARLY_HINTS_CHUNKED, 200, b"hello world", {}),
    "continue+length": ("POST", CONTINUE_LENGTH, 201, b"hello world", {"X-B": "c"}),
    "head": ("HEAD", HEAD_WITH_LENGTH, 200, b"", {"X-C": "d", "Content-Length": "1000"}),
    "204": ("GET", NO_CONTENT, 204, b"", {"X-D": "e"}),
    "304": ("GET", NOT_MODIFIED, 304, b"", {"ETag": '"x"'}),
}


@dataclass
class SplitUpstream:
    """Answers `/<case>/<cut>` with CASES[case]'s response written in two pieces, cut at byte <cut>, with a pause
    between them so they arrive as two reads. Counts the connections it accepted."""

    connections: int = 0
    url: str = ""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
                length = re.search(r"(?im)^content-length:\s*(\d+)", head)
                if length:
                    await reader.readexactly(int(length.group(1)))
                _, case, cut = head.split(" ", 2)[1].split("/")
                response = CASES[case][1]
                writer.write(response[:int(cut)])
                await writer.drain()
                await asyncio.sleep(0.002)
                writer.write(response[int(cut):])
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def public_gateway(gateway_factory: Any, url: str, **upstream: str) -> Any:
    return await gateway_factory(upstream={"url": url, **upstream}, routes={"public": ["^/"]})


@pytest.fixture
async def serve_raw() -> AsyncIterator[Callable[[Callable[..., Awaitable[None]]], Awaitable[str]]]:
    """Start raw upstreams; every connection they accepted is closed and its handler finished at the end."""
    servers: list[asyncio.Server] = []
    handlers: set[asyncio.Task[None]] = set()

    async def start(handler: Callable[..., Awaitable[None]]) -> str:
        async def tracked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            handlers.add(task)
            try:
                await handler(reader, writer)
            finally:
                writer.close()

        server = await asyncio.start_server(tracked, "127.0.0.1", 0)
        servers.append(server)
        return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"

    yield start
    for server in servers:
        server.close()
    for task in handlers:
        task.cancel()
    await asyncio.gather(*handlers, return_exceptions=True)


async def test_a_response_split_at_every_byte_boundary_is_relayed_whole(gateway_factory, serve_raw):
    upstream = SplitUpstream()
    gw = await public_gateway(gateway_factory, await serve_raw(upstream.handle))
    async with aiohttp.ClientSession(auto_decompress=False) as http:
        for name, (method, response, status, body, expected) in CASES.items():
            for cut in range(len(response) + 1):
                async with http.request(method, f"{gw.public_url}/{name}/{cut}",
                                        data=b"x" if method == "POST" else None) as r:
                    got = (r.status, await r.read(), {k: r.headers.get(k) for k in expected})
                assert got == (status, body, expected), (name, cut)
                # Hop-by-hop and interim-response headers stay at the gateway.
                assert "X-A" not in r.headers and "Link" not in r.headers and "Keep-Alive" not in r.headers
    # Every response, however split, left the connection clean for the next one: one connection for all.
    assert upstream.connections == 1


@dataclass
class DroppingUpstream:
    """Answers the first request on each connection; a later one is read whole, then the connection is
    dropped (the upstream's idle close crossing our reuse), after `partial` bytes of an answer if given."""

    partial: bytes = b""
    seen: list[tuple[str, int, int]] = field(default_factory=list)  # (method, body length, connection)
    connections: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        connection, answered = self.connections, 0
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
                length = re.search(r"(?im)^content-length:\s*(\d+)", head)
                body = await reader.readexactly(int(length.group(1))) if length else b""
                self.seen.append((head.split(" ", 1)[0], len(body), connection))
                if answered:
                    writer.write(self.partial)
                    await writer.drain()
                    return
                method = head.split(" ", 1)[0]
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n" + (b"" if method == "HEAD" else b"ok"))
                await writer.drain()
                answered += 1
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def test_a_pooled_connection_closed_as_it_is_reused(gateway_factory, serve_raw):
    """Retried once, on a new connection, when nothing of the request could have been acted on and no byte
    of an answer came; a POST whose body went up is a 502, never sent twice."""
    upstream = DroppingUpstream()
    gw = await public_gateway(gateway_factory, await serve_raw(upstream.handle))
    async with aiohttp.ClientSession() as http:
        for method in ("GET", "HEAD", "DELETE"):
            assert (await http.request(method, f"{gw.public_url}/warm")).status == 200
            r = await http.request(method, f"{gw.public_url}/again")
            assert r.status == 200, await r.text()
        r = await http.post(f"{gw.public_url}/pay", data=b"amount=1")
        assert r.status == 502
    # This upstream drops every request on a reused connection: each one after the first is dropped once,
    # then retried on a fresh connection (never on another pooled one), which answers it.
    assert upstream.seen == [("GET", 0, 1), ("GET", 0, 1), ("GET", 0, 2), ("HEAD", 0, 2), ("HEAD", 0, 3),
                             ("HEAD", 0, 3), ("HEAD", 0, 4), ("DELETE", 0, 4), ("DELETE", 0, 5), ("DELETE", 0, 5),
                             ("DELETE", 0, 6), ("POST", 8, 6)]


async def test_a_post_whose_body_had_not_started_is_retried(gateway_factory, serve_raw):
    """The reused connection dies while the client's first body chunk is still on its way: nothing of the
    body was taken, so the POST goes again on a new connection, body and all."""
    upstream = DroppingUpstream()
    gw = await public_gateway(gateway_factory, await serve_raw(upstream.handle))
    async with aiohttp.ClientSession() as http:
        assert (await http.get(f"{gw.public_url}/warm")).status == 200
    host, port = gw.public_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        # The head alone first (a client library would hold it back until the first chunk).
        writer.write(f"POST /late HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
        await writer.drain()
        for _ in range(500):  # the upstream gets the head on the pooled connection, and drops it
            if len(upstream.seen) == 2:
                break
            await asyncio.sleep(0.01)
        assert upstream.seen[1][0] == "POST"
        # Only once the gateway has seen the drop (its retry opens connection 2) does the body go: sent sooner,
        # on a busy machine the chunk can reach the gateway before the upstream's close does, and then part of
        # the body was taken and a 502 is the right answer (the next test), not a retry.
        for _ in range(500):
            if upstream.connections == 2:
                break
            await asyncio.sleep(0.01)
        writer.write(b"4\r\nlate\r\n0\r\n\r\n")
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 10)
    finally:
        writer.close()
    assert status_line.startswith(b"HTTP/1.1 200"), status_line
    # The dropped POST and its retry on connection 2 (which answers it without reading the chunked body).
    assert [(m, c) for m, _, c in upstream.seen] == [("GET", 1), ("POST", 1), ("POST", 2)]


async def test_a_connection_dropped_after_part_of_an_answer_is_never_retried(gateway_factory, serve_raw, caplog):
    upstream = DroppingUpstream(partial=b"HTTP/1.1 200 O")
    gw = await public_gateway(gateway_factory, await serve_raw(upstream.handle))
    async with aiohttp.ClientSession() as http:
        assert (await http.get(f"{gw.public_url}/warm")).status == 200
        assert (await http.get(f"{gw.public_url}/again")).status == 502  # the upstream had the request
    assert [m for m, _, _ in upstream.seen] == ["GET", "GET"]
    [failed] = [r for r in caplog.records if r.getMessage() == "request failed"]
    assert "closed the connection" in failed.cause


@pytest.mark.parametrize("response", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok",
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 70_000 + b"\r\nContent-Length: 0\r\n\r\n",
])
async def test_ambiguous_or_malformed_responses_are_a_502(gateway_factory, serve_raw, response):
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(response)
        await writer.drain()
        await reader.read()  # until the gateway hangs up

    gw = await public_gateway(gateway_factory, await serve_raw(handle))
    async with aiohttp.ClientSession() as http, http.get(f"{gw.public_url}/x") as r:
        assert r.status == 502


async def test_a_close_delimited_response_ends_with_the_connection(gateway_factory, serve_raw):
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n")
        for i in range(100):
            writer.write(b"%d," % i)
            await writer.drain()
        writer.close()

    gw = await public_gateway(gateway_factory, await serve_raw(handle))
    async with aiohttp.ClientSession() as http:
        for _ in range(2):
            async with http.get(f"{gw.public_url}/x") as r:
                assert r.status == 200
                assert await r.read() == b"".join(b"%d," % i for i in range(100))


# ---- byte splits below the gateway: any set of cut points (hypothesis) ---------------------------------

class FakeTransport(asyncio.Transport):
    """What UpstreamConnection writes and whether it paused reading; closing it reports connection_lost."""

    def __init__(self, protocol: UpstreamConnection) -> None:
        super().__init__()
        self.protocol = protocol
        self.written: list[bytes] = []
        self.closing = False
        self.paused = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            self.protocol.connection_lost(None)

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False


def _pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True) if b > a]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(st.integers(min_value=0, max_value=500), max_size=12), min_size=len(CASES),
                max_size=len(CASES)))
def test_every_split_of_every_response_parses_the_same(cuts: list[list[int]]) -> None:
    """Property: however the responses of one kept-alive connection are cut into reads, each exchange
    yields the status, headers and body of the uncut response, and the connection goes back to the pool."""

    async def run() -> None:
        loop = asyncio.get_running_loop()
        pool = UpstreamPool("http://upstream.test", connect_timeout=1)
        conn = UpstreamConnection(pool, loop)
        transport = FakeTransport(conn)
        conn.connection_made(transport)
        for (method, response, status, body, expected), case_cuts in zip(CASES.values(), cuts, strict=True):
            conn.start(b"%s / HTTP/1.1\r\n\r\n" % method.encode(), is_head=method == "HEAD", has_body=False)
            pieces = _pieces(response, case_cuts)
            for piece in pieces:
                conn.data_received(piece)
            await asyncio.wait_for(conn.response(), 1)
            got = await asyncio.wait_for(conn.read_all(), 1)
            assert (conn.status, got) == (status, body)
            headers = dict(conn.headers)
            assert {k: headers.get(k) for k in expected} == expected
            assert "Link" not in headers  # the 103's headers are not the response's
            conn.finish()
            assert not transport.closing, (method, pieces)
            assert await pool.acquire() is conn

    asyncio.run(run())


# ---- backpressure: a slow reader on either side ---------------------------------------------------------

BIG = 256 * 1024**2
# Bytes allowed in flight between the two ends while one of them is not reading: the kernel's socket buffers
# on loopback (up to a few MiB per socket, four sockets on the way) plus the gateway's own queues (READ_HIGH,
# aiohttp's request buffer, the transports' high-water marks). Without backpressure the gateway takes in
# everything the fast side sends, hundreds of MiB in the stall.
IN_FLIGHT_BOUND = 48 * 1024**2
STALL = 1.5


async def test_a_slow_client_holds_the_upstream_back(gateway_factory, serve_raw):
    sent = {"bytes": 0}

    async def fast_source(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % BIG)
        block = b"s" * (256 * 1024)
        try:
            while sent["bytes"] < BIG:
                writer.write(block)
                await writer.drain()
                sent["bytes"] += len(block)
        except ConnectionError:
            pass
        finally:
            writer.close()

    gw = await public_gateway(gateway_factory, await serve_raw(fast_source))
    host, port = gw.public_url.removeprefix("http://").split(":")
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    client.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(client, (host, int(port)))
    await loop.sock_sendall(client, f"GET /big HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    received = len(await loop.sock_recv(client, 65536))
    await asyncio.sleep(STALL)  # not reading: the gateway must stop reading from the upstream too
    in_flight = sent["bytes"] - received
    gateway_queued = _gateway_queued(gw)
    try:
        while True:
            data = await loop.sock_recv(client, 1024 * 1024)
            if not data:
                break
            received += len(data)
            if received >= BIG:  # with the head's bytes: the body is (nearly) all there
                break
    finally:
        client.close()
    assert in_flight < IN_FLIGHT_BOUND, f"{in_flight / 1024**2:.1f} MiB taken from the upstream for a stalled client"
    assert gateway_queued <= READ_HIGH + 1024**2  # one socket read more than READ_HIGH at most
    assert received >= BIG


def _gateway_queued(gw: Any) -> int:
    """Response bytes held by the gateway's upstream connections right now."""
    from gateway.web.proxy import PROXIES

    total = 0
    for proxy in gw.public_app[PROXIES]:
        for conn in proxy.pool._open:
            total += conn._buffered
    return total


async def test_a_slow_upstream_holds_the_client_back(gateway_factory, serve_raw):
    received = {"bytes": 0}
    reading = asyncio.Event()

    async def slow_sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        assert b"transfer-encoding: chunked" in head.lower()
        await reading.wait()
        tail = b""
        while data := await reader.read(1024 * 1024):
            received["bytes"] += len(data)
            tail = (tail + data)[-5:]
            if tail == b"0\r\n\r\n":
                break
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()

    gw = await public_gateway(gateway_factory, await serve_raw(slow_sink), timeout="30s")
    sent = {"bytes": 0}

    async def body() -> AsyncIterator[bytes]:
        block = b"u" * (256 * 1024)
        while sent["bytes"] < BIG:
            yield block
            sent["bytes"] += len(block)

    async with aiohttp.ClientSession() as http:
        upload = asyncio.ensure_future(http.post(f"{gw.public_url}/up", data=body()))
        started = time.monotonic()
        while time.monotonic() - started < STALL and not upload.done():
            await asyncio.sleep(0.05)
        in_flight = sent["bytes"]  # the upstream has read nothing yet
        reading.set()
        r = await asyncio.wait_for(upload, 60)
        assert r.status == 200
    assert in_flight < IN_FLIGHT_BOUND, f"{in_flight / 1024**2:.1f} MiB taken from the client for a stalled upstream"
    assert received["bytes"] > BIG  # the chunked framing adds a few bytes


# ---- a gigabyte, chunked, each way ----------------------------------------------------------------------

# As in test_proxy_streaming.py: the gateway stays in this process (its RSS is what is measured), the upstream
# and the client run in a child. Both bodies are chunked and generated on the fly; the chunk sizes vary
# (1 MiB, then odd small ones) so chunk boundaries fall everywhere in the reads. About 3-5 s on 2 cores.
GIGABYTE = int(os.environ.get("GATEWAY_CHUNKED_BYTES", str(1024**3)))
CHUNKED_CHILD = r"""
import asyncio, json, sys
import aiohttp
from aiohttp import web

port, gateway, size = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
SIZES = [1024 * 1024, 1, 7, 4093, 65536 + 3]
POOL = b"\x5a" * (1024 * 1024)

def pieces():
    left, i = size, 0
    while left > 0:
        n = min(SIZES[i % len(SIZES)], left)
        yield POOL[:n]
        left -= n
        i += 1

async def sink(request):
    n = 0
    async for data in request.content.iter_any():
        n += len(data)
    return web.json_response({"received": n, "chunked": request.headers.get("Transfer-Encoding")})

async def source(request):
    response = web.StreamResponse()  # no length: chunked
    await response.prepare(request)
    for piece in pieces():
        await response.write(piece)
    await response.write_eof()
    return response

async def main():
    app = web.Application(client_max_size=0)
    app.router.add_post("/sink", sink)
    app.router.add_get("/source", source)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    result = {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as http:
        async def body():
            for piece in pieces():
                yield piece
        async with http.post(gateway + "/sink", data=body()) as r:
            result["upload"] = await r.json()
        async with http.get(gateway + "/source") as r:
            result["download_chunked"] = r.headers.get("Transfer-Encoding")
            n = 0
            async for data in r.content.iter_any():
                n += len(data)
            result["downloaded"] = n
    print(json.dumps(result), flush=True)
    await runner.cleanup()

asyncio.run(main())
"""


async def test_a_gigabyte_chunked_each_way_in_bounded_memory(gateway_factory, unused_tcp_port_factory):
    port = unused_tcp_port_factory()
    gw = await public_gateway(gateway_factory, f"http://127.0.0.1:{port}", timeout="60s")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHUNKED_CHILD, str(port), gw.public_url, str(GIGABYTE),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    me = psutil.Process()
    assert proc.stdout is not None and proc.stdin is not None
    try:
        assert (await asyncio.wait_for(proc.stdout.readline(), 30)).strip() == b"ready"
        baseline = peak = me.memory_info().rss
        proc.stdin.write(b"go\n")
        await proc.stdin.drain()
        result_line = asyncio.ensure_future(asyncio.wait_for(proc.stdout.readline(), 240))
        while not result_line.done():
            peak = max(peak, me.memory_info().rss)
            await asyncio.wait({result_line}, timeout=0.05)
        result = json.loads(result_line.result())
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
    assert result["upload"] == {"received": GIGABYTE, "chunked": "chunked"}
    assert result["download_chunked"] == "chunked" and result["downloaded"] == GIGABYTE
    assert peak - baseline < 50 * 1024**2, f"gateway RSS grew {(peak - baseline) / 1024**2:.0f} MiB"


# ---- the relayed response's headers ---------------------------------------------------------------------

_NAMES = st.sampled_from(["Connection", "connection", "Keep-Alive", "Transfer-Encoding", "X-Hop", "x-hop", "Set-Cookie",
                          "Content-Length", "Upgrade", "TE", "Trailer", "Proxy-Authenticate", "X-Kept", "Location"])
_VALUES = st.sampled_from(["close", "X-Hop", "x-hop, keep-alive", " X-Kept ,", "a=b; Path=/", "1", "", "chunked"])


@given(st.lists(st.tuples(_NAMES, _VALUES), max_size=12))
def test_relayed_response_headers_match_the_policys_response_headers(pairs: list[tuple[str, str]]) -> None:
    """Property: the one-pass filter of the proxied path keeps exactly what HeaderPolicy.response_headers
    keeps (hop-by-hop and Connection-listed names dropped, the rest in order, repeated names kept)."""
    from multidict import CIMultiDict, CIMultiDictProxy

    from gateway.access.headers import HeaderPolicy

    expected = list(HeaderPolicy().response_headers(CIMultiDictProxy(CIMultiDict(pairs))).items())
    assert HeaderPolicy.relayed_response_headers(pairs) == expected
