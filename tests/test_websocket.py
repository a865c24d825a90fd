"""WebSocket relay (SPEC §7, `upstream.websockets`): messages both ways, close codes, identity in the handshake."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import Gateway
from conftest import session_cookie as sign_in

COOKIE = "_gateway"


@dataclass
class WsUpstream:
    url: str
    handshakes: list[dict[str, list[str]]] = field(default_factory=list)
    plain_requests: list[dict[str, list[str]]] = field(default_factory=list)
    closes: list[tuple[int | None, str]] = field(default_factory=list)
    closed: asyncio.Event = field(default_factory=asyncio.Event)


def _headers(request: web.Request) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for k, v in request.headers.items():
        out.setdefault(k.lower(), []).append(v)
    return out


@pytest.fixture
async def ws_upstream() -> AsyncIterator[WsUpstream]:
    """An upstream that echoes WebSocket messages and records handshakes and close codes."""
    state = WsUpstream("")

    async def handler(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(protocols=("v2.chat", "v1.chat"))
        if not ws.can_prepare(request).ok:
            state.plain_requests.append(_headers(request))
            return web.Response(status=426, text="WebSocket only here")
        if request.path == "/forbidden":
            return web.Response(status=403, text="no")
        state.handshakes.append(_headers(request))
        await ws.prepare(request)
        async for msg in ws:
            if msg.type is aiohttp.WSMsgType.TEXT:
                if msg.data.startswith("close:"):
                    await ws.close(code=int(msg.data[6:]), message=b"bye from upstream")
                    break
                await ws.send_str(f"echo:{msg.data}")
            elif msg.type is aiohttp.WSMsgType.BINARY:
                await ws.send_bytes(msg.data[::-1])
        state.closes.append((ws.close_code, ""))
        state.closed.set()
        return ws

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    state.url = str(server.make_url("")).rstrip("/")
    yield state
    await server.close()




def ws_url(gw: Gateway, path: str) -> str:
    return gw.public_url.replace("http://", "ws://") + path


async def test_messages_both_ways_through_the_gateway(gateway_factory, ws_upstream):
    gw = await gateway_factory(upstream={"url": ws_upstream.url})
    cookie = await sign_in(gw)
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(ws_url(gw, "/socket?room=1"), headers={"Cookie": f"{COOKIE}={cookie}"},
                                   protocols=("v1.chat", "other"), autoping=False)
        assert ws.protocol == "v1.chat"  # the upstream's choice among the client's offers
        await ws.send_str("hello")
        assert (await ws.receive(timeout=3)).data == "echo:hello"
        await ws.send_bytes(b"\x00\x01\x02")
        msg = await ws.receive(timeout=3)
        assert msg.type is aiohttp.WSMsgType.BINARY and msg.data == b"\x02\x01\x00"
        await ws.ping(b"are you there")
        msg = await ws.receive(timeout=3)
        assert msg.type is aiohttp.WSMsgType.PONG and msg.data == b"are you there"  # the upstream's pong
        big = "x" * 1_000_000
        await ws.send_str(big)
        assert (await ws.receive(timeout=5)).data == "echo:" + big
        # The upstream closes with its own code and reason: the client sees exactly those.
        await ws.send_str("close:4001")
        msg = await ws.receive(timeout=3)
        assert msg.type is aiohttp.WSMsgType.CLOSE
        assert (msg.data, msg.extra) == (4001, "bye from upstream")
        await ws.close()
    await asyncio.wait_for(ws_upstream.closed.wait(), 3)
    offered = [p.strip() for v in ws_upstream.handshakes[0]["sec-websocket-protocol"] for p in v.split(",")]
    assert offered == ["v1.chat", "other"]


async def test_client_close_code_reaches_the_upstream(gateway_factory, ws_upstream):
    gw = await gateway_factory(upstream={"url": ws_upstream.url})
    cookie = await sign_in(gw)
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(ws_url(gw, "/socket"), headers={"Cookie": f"{COOKIE}={cookie}"})
        await ws.send_str("one")
        assert (await ws.receive(timeout=3)).data == "echo:one"
        await ws.close(code=4002, message=b"done")
        assert ws.close_code == 4002  # the upstream answered the close with the same code, via the gateway
    await asyncio.wait_for(ws_upstream.closed.wait(), 3)
    assert ws_upstream.closes == [(4002, "")]


async def test_client_vanishing_closes_the_upstream_socket(gateway_factory, ws_upstream):
    gw = await gateway_factory(upstream={"url": ws_upstream.url})
    cookie = await sign_in(gw)
    http = aiohttp.ClientSession()
    ws = await http.ws_connect(ws_url(gw, "/socket"), headers={"Cookie": f"{COOKIE}={cookie}"})
    await ws.send_str("one")
    assert (await ws.receive(timeout=3)).data == "echo:one"
    await http.close()  # drops the TCP connection without a close frame
    await asyncio.wait_for(ws_upstream.closed.wait(), 5)


async def test_identity_reaches_the_upstream_handshake_and_spoofs_do_not(gateway_factory, ws_upstream):
    gw = await gateway_factory(upstream={"url": ws_upstream.url})
    cookie = await sign_in(gw)
    spoofs = {"X-Forwarded-User": "mallory", "X-Auth-Request-User": "mallory", "x_forwarded_groups": "admins",
              "Cookie": f"{COOKIE}={cookie}; theme=dark", "Origin": "http://tool.example"}
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(ws_url(gw, "/socket"), headers=spoofs)
        await ws.close()
    h = ws_upstream.handshakes[0]
    assert h["x-forwarded-user"] == ["alice"]
    assert h["x-forwarded-email"] == ["alice@example.com"]
    assert h["x-forwarded-groups"] == ["gateway-users"]
    assert "x-auth-request-user" not in h and not [k for k in h if "_" in k]
    assert h["cookie"] == ["theme=dark"]
    assert h["origin"] == ["http://tool.example"]
    assert h["x-forwarded-for"] == ["127.0.0.1"]


UPGRADE = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
           "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}


@pytest.mark.parametrize(("accept", "status"), [("*/*", 401), ("text/html", 302)])
async def test_unauthenticated_upgrade_is_refused(gateway_factory, ws_upstream, accept, status):
    gw = await gateway_factory(upstream={"url": ws_upstream.url})
    headers = {**UPGRADE, "Cookie": f"{COOKIE}=forged", "Accept": accept}
    async with aiohttp.ClientSession() as http, http.get(gw.public_url + "/socket", headers=headers,
                                                         allow_redirects=False) as r:
        assert r.status == status
        assert r.headers["Cache-Control"] == "no-store"
    assert ws_upstream.handshakes == [] and ws_upstream.plain_requests == []


async def test_upstream_refusing_the_upgrade_is_passed_on(gateway_factory, ws_upstream):
    gw = await gateway_factory(upstream={"url": ws_upstream.url})
    cookie = await sign_in(gw)
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
            await http.ws_connect(ws_url(gw, "/forbidden"), headers={"Cookie": f"{COOKIE}={cookie}"})
    assert caught.value.status == 403


async def test_with_websockets_off_an_upgrade_is_a_plain_request(gateway_factory, ws_upstream):
    gw = await gateway_factory(upstream={"url": ws_upstream.url, "websockets": False})
    cookie = await sign_in(gw)
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
            await http.ws_connect(ws_url(gw, "/socket"), headers={"Cookie": f"{COOKIE}={cookie}"})
    assert caught.value.status == 426  # the upstream's answer to a GET without Upgrade
    assert ws_upstream.handshakes == []
    seen: dict[str, Any] = ws_upstream.plain_requests[0]
    assert "upgrade" not in seen and "sec-websocket-key" not in seen
    assert seen["x-forwarded-user"] == ["alice"]


@pytest.mark.parametrize("upgrade", ["WebSocket", "WEBSOCKET"])
async def test_the_upgrade_token_is_case_insensitive(gateway_factory, ws_upstream, upgrade):
    """RFC 6455 §4.2.1: the Upgrade value is matched case-insensitively; aiohttp's client always sends
    "websocket", so the handshake is written by hand."""
    gw = await gateway_factory(upstream={"url": ws_upstream.url})
    cookie = await sign_in(gw)
    host = gw.public_url.removeprefix("http://")
    reader, writer = await asyncio.open_connection(*host.split(":"))
    try:
        writer.write((f"GET /socket HTTP/1.1\r\nHost: {host}\r\nUpgrade: {upgrade}\r\nConnection: Upgrade\r\n"
                      "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                      f"Cookie: {COOKIE}={cookie}\r\n\r\n").encode())
        await writer.drain()
        status = await asyncio.wait_for(reader.readline(), 5)
    finally:
        writer.close()
    assert status.startswith(b"HTTP/1.1 101 "), status
    assert len(ws_upstream.handshakes) == 1 and ws_upstream.plain_requests == []
