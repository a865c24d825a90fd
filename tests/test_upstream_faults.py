"""Upstreams that misbehave (SPEC §7): a kept-alive connection the upstream closes as it is reused, an
advertised `Keep-Alive: timeout=N`, no answer in time, a body cut half-way, nobody listening. Each is a real
HTTP server written for it (a few lines over asyncio streams), so the race is staged the same way every time."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import pytest

from gateway.web.keepalive import reuse_limit_of


@dataclass
class RawUpstream:
    """HTTP/1.1 keep-alive upstream. `advertise`: send `Keep-Alive: timeout=N`. `closing_after`: a request
    arriving on a connection idle for longer is dropped unanswered (the upstream's close crossed it).
    `drop_reused`: every request after the first on a connection is dropped unanswered. /hang never answers;
    /cut announces 1 MB and sends 100 KB."""

    advertise: int | None = None
    closing_after: float | None = None
    drop_reused: bool = False
    seen: list[tuple[str, int, int]] = field(default_factory=list)  # (method, body length, connection)
    url: str = ""
    _connections: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections += 1
        connection, answered, last = self._connections, 0, time.monotonic()
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
                idle = time.monotonic() - last
                method, path = head.split(" ", 2)[:2]
                length = re.search(r"(?im)^content-length:\s*(\d+)", head)
                body = await reader.readexactly(int(length.group(1))) if length else b""
                self.seen.append((method, len(body), connection))
                if (self.closing_after is not None and answered and idle > self.closing_after) or (
                        self.drop_reused and answered):
                    return
                if path == "/hang":
                    await asyncio.sleep(60)
                    return
                if path == "/cut":
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 100_000)
                    await writer.drain()
                    return
                text = f"{method} {len(body)} on connection {connection}".encode()
                keep = f"Keep-Alive: timeout={self.advertise}\r\n" if self.advertise is not None else ""
                writer.write(f"HTTP/1.1 200 OK\r\nContent-Length: {len(text)}\r\n{keep}\r\n".encode() + text)
                await writer.drain()
                answered, last = answered + 1, time.monotonic()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def raw_upstream() -> AsyncIterator[RawUpstream]:
    upstream = RawUpstream()
    server = await asyncio.start_server(upstream.handle, "127.0.0.1", 0)
    upstream.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    yield upstream
    server.close()


async def proxied_gateway(gateway_factory, upstream: RawUpstream, **upstream_keys: str):
    return await gateway_factory(upstream={"url": upstream.url, **upstream_keys}, routes={"public": ["^/"]})


async def test_an_advertised_keep_alive_timeout_is_honoured(gateway_factory, raw_upstream):
    raw_upstream.advertise, raw_upstream.closing_after = 1, 1.0
    gw = await proxied_gateway(gateway_factory, raw_upstream)
    async with aiohttp.ClientSession() as http:
        for _ in range(3):
            r = await http.post(f"{gw.public_url}/form", data=b"name=value")
            assert r.status == 200, await r.text()
            await asyncio.sleep(1.2)  # past the upstream's 1 s, well within the gateway's own pool keep-alive
    # Never a request on a connection the upstream was closing: each POST went on a fresh one.
    assert [c for _, _, c in raw_upstream.seen] == [1, 2, 3]


def test_reuse_limit_reads_keep_alive_with_a_margin():
    def limit(value: str) -> float | None:
        return reuse_limit_of(value)

    assert limit("timeout=1") == 0.5
    assert limit("timeout=5, max=100") == 4.5
    assert limit("max=100,Timeout = 2") == 1.5
    assert limit("timeout=0") == 0
    assert limit("max=5") is None and limit("") is None


async def test_a_post_without_body_is_retried_once_on_a_dead_reused_connection(gateway_factory, raw_upstream):
    raw_upstream.drop_reused = True
    gw = await proxied_gateway(gateway_factory, raw_upstream)
    async with aiohttp.ClientSession() as http:
        assert (await http.post(f"{gw.public_url}/a")).status == 200
        r = await http.post(f"{gw.public_url}/b")  # on the pooled connection, which the upstream drops
        assert r.status == 200, await r.text()
        assert await r.text() == "POST 0 on connection 2"
        # With a body already sent on the dead connection, the POST is not sent twice: a 502 says so.
        r = await http.post(f"{gw.public_url}/c", data=b"payment=1")
        assert r.status == 502
    assert raw_upstream.seen == [("POST", 0, 1), ("POST", 0, 1), ("POST", 0, 2), ("POST", 9, 2)]


INTERNALS = re.compile(r"\b\w+(Error|Exception)\b|aiohttp|Traceback")


async def test_failures_log_their_cause_and_truncation_is_the_access_logs_outcome(gateway_factory, raw_upstream,
                                                                                  caplog, unused_tcp_port_factory):
    gw = await proxied_gateway(gateway_factory, raw_upstream, timeout="1s")
    async with aiohttp.ClientSession(headers={"Accept": "text/html"}) as http:
        r = await http.get(f"{gw.public_url}/hang")
        assert r.status == 504
        assert not INTERNALS.search(await r.text())
        r = await http.get(f"{gw.public_url}/cut")
        assert r.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await r.read()
    failed = [r for r in caplog.records if r.getMessage() == "request failed"]
    assert [(r.path, r.status) for r in failed] == [("/hang", 504)]
    assert "no response headers" in failed[0].cause
    access = {r.path: r for r in caplog.records if r.name == "gateway.access"}
    assert access["/cut"].outcome == "truncated", "a cut response is logged as a clean 200"
    assert getattr(access["/hang"], "outcome", None) is None
    cut = [r for r in caplog.records if r.getMessage().startswith("upstream failed mid-response")]
    assert len(cut) == 1 and raw_upstream.url.split("//")[1] in cut[0].cause

    nobody = f"http://127.0.0.1:{unused_tcp_port_factory()}"
    gw = await gateway_factory(upstream={"url": nobody}, routes={"public": ["^/"]})
    caplog.clear()
    async with aiohttp.ClientSession(headers={"Accept": "text/html"}) as http:
        r = await http.get(f"{gw.public_url}/x")
        assert r.status == 502
        assert not INTERNALS.search(await r.text()), "the 502 page names an exception"
    [failed] = [r for r in caplog.records if r.getMessage() == "request failed"]
    assert failed.status == 502 and "connect" in failed.cause.lower()
