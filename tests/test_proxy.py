"""The catch-all proxy (SPEC §4, §7) end to end: a real gateway on a real database, real upstreams."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import Gateway, echoed_headers
from conftest import session_cookie as sign_in
from yarl import URL

from gateway import keys

COOKIE = "_gateway"
IDENTITY_HEADERS = ("x-forwarded-user", "x-forwarded-email", "x-forwarded-preferred-username",
                    "x-forwarded-groups")


# ---- helpers -------------------------------------------------------------------------------------------



def client(**kw: Any) -> aiohttp.ClientSession:
    """A bare client that adds no headers of its own and keeps no cookies."""
    return aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False,
                                 skip_auto_headers=("Accept-Encoding", "User-Agent"), **kw)


def raw(gw: Gateway, target: str) -> URL:
    """The gateway URL for a request target sent exactly as written (no normalization, no re-encoding)."""
    return URL(gw.public_url + target, encoded=True)


async def echo(gw: Gateway, target: str, *, cookie: str | None, method: str = "GET",
               headers: list[tuple[str, str]] | None = None, **kw: Any) -> dict[str, Any]:
    async with client() as http:
        hdrs = list(headers or [])
        if cookie:
            hdrs.append(("Cookie", f"{COOKIE}={cookie}"))
        async with http.request(method, raw(gw, target), headers=hdrs, allow_redirects=False, **kw) as r:
            assert r.status == 200, (r.status, await r.text())
            payload: dict[str, Any] = await r.json()
            return payload


@pytest.fixture
async def serve_app() -> AsyncIterator[Callable[[web.Application], Awaitable[str]]]:
    """Start aiohttp apps on real ports (special upstreams); returns their base URLs."""
    servers: list[TestServer] = []

    async def start(app: web.Application) -> str:
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return str(server.make_url("")).rstrip("/")

    yield start
    for server in servers:
        await server.close()


# ---- methods, paths, bodies ----------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
async def test_every_method_reaches_the_upstream_with_its_body(gateway_factory, method):
    gw = await gateway_factory()
    cookie = await sign_in(gw)
    body = f"payload of {method} \x00\xff".encode("latin-1")
    payload = await echo(gw, "/m?x=1", cookie=cookie, method=method, data=body)
    assert payload["method"] == method
    assert payload["path"] == "/m?x=1"
    assert payload["body"].encode("latin-1") == body
    h = echoed_headers(payload)
    assert h["content-length"] == [str(len(body))]  # the client's length kept: not re-chunked
    assert "transfer-encoding" not in h
    assert h["x-forwarded-user"] == ["alice"]


@pytest.mark.parametrize(("method", "body"), [("GET", None), ("POST", b"raw"), ("POST", None), ("PUT", b"x"),
                                             ("DELETE", b"x"), ("PATCH", None)])
async def test_the_gateway_invents_no_request_headers(gateway_factory, method, body):
    """What the upstream receives is what the client sent plus the forwarding and identity headers."""
    gw = await gateway_factory()
    cookie = await sign_in(gw)
    bare = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar(), skip_auto_headers=(
        "Accept", "Accept-Encoding", "User-Agent", "Content-Type"))
    async with bare as http, http.request(method, raw(gw, "/bare"), data=body,
                                          headers={"Cookie": f"{COOKIE}={cookie}"}) as r:
        h = echoed_headers(await r.json())
    assert not {"accept", "accept-encoding", "user-agent", "content-type"} & set(h), h
    payload = await echo(gw, "/typed", cookie=cookie, method="POST", data=b"{}", headers=[
        ("Content-Type", "application/json"), ("User-Agent", "curl/8"), ("Accept", "text/plain")])
    h = echoed_headers(payload)
    assert (h["content-type"], h["user-agent"], h["accept"]) == (["application/json"], ["curl/8"], ["text/plain"])


async def test_expect_100_continue_is_answered_by_the_gateway_not_forwarded(gateway_factory):
    """The gateway's server answers the client's 100 Continue itself; passed on, Expect would make the
    upstream request wait for a second 100 that an HTTP/1.0 upstream never sends."""
    gw = await gateway_factory()
    cookie = await sign_in(gw)
    payload = await echo(gw, "/expect", cookie=cookie, method="POST", data=b"body", expect100=True)
    assert payload["body"] == "body"
    assert "expect" not in echoed_headers(payload)


@pytest.mark.parametrize("size", [100, 1_000_000])
async def test_head_gets_the_upstream_headers_and_no_body(gateway_factory, serve_app, size):
    gw = await gateway_factory(upstream={"url": await serve_app(special_upstream())})
    cookie = await sign_in(gw)
    headers = {"Cookie": f"{COOKIE}={cookie}"}
    async with client() as http, http.head(raw(gw, f"/fixed?n={size}"), headers=headers) as r:
        assert r.status == 200
        assert r.headers["Content-Length"] == str(size)  # the length a GET would have had
        assert await r.read() == b""


async def test_chunked_request_body_is_streamed_chunked(gateway_factory):
    gw = await gateway_factory()
    cookie = await sign_in(gw)

    async def parts() -> AsyncIterator[bytes]:
        for i in range(5):
            yield f"part{i};".encode()

    payload = await echo(gw, "/upload", cookie=cookie, method="POST", data=parts())
    assert payload["body"] == "part0;part1;part2;part3;part4;"
    h = echoed_headers(payload)
    assert h["transfer-encoding"] == ["chunked"] and "content-length" not in h


@pytest.mark.parametrize("target", [
    "/a%2Fb/../c?x=%20",
    "/./x//y/%2e%2e/z?q=a+b&c=%2F&c=%2f#",
    "/caf%C3%A9/%7Euser;param=1?%E2%82%AC=%25",
    "//double/slash",
    "/trailing/?empty=&&=",
])
async def test_path_and_query_reach_the_upstream_exactly_as_sent(gateway_factory, target):
    gw = await gateway_factory()
    cookie = await sign_in(gw)
    payload = await echo(gw, target.rstrip("#"), cookie=cookie)
    assert payload["path"] == target.rstrip("#")


async def test_absolute_form_target_is_refused_not_proxied_elsewhere(gateway_factory):
    gw = await gateway_factory()
    cookie = await sign_in(gw)
    host, port = URL(gw.public_url).host, URL(gw.public_url).port
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(f"GET http://169.254.169.254/latest HTTP/1.1\r\nHost: {host}\r\n"
                 f"Cookie: {COOKIE}={cookie}\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    answer = await reader.read()
    writer.close()
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]


# ---- identity headers and spoofing ---------------------------------------------------------------------

SPOOFS = [
    ("X-Forwarded-User", "mallory"),
    ("X-Forwarded-User", "mallory2"),  # repeated
    ("x-forwarded-email", "mallory@evil.example"),
    ("X-FORWARDED-GROUPS", "admins"),
    ("x_forwarded_groups", "admins"),  # underscores: read as dashes by WSGI/CGI stacks
    ("X_Forwarded_User", "mallory"),
    ("X-Forwarded-Preferred-Username", "mallory"),
    ("X-Auth-Request-User", "mallory"),
    ("X-Auth-Request-Email", "mallory@evil.example"),
    ("x_auth_request_groups", "admins"),
    ("X-Auth-Request-Access-Token", "stolen"),
]


async def test_signed_in_upstream_sees_only_the_gateways_identity(gateway_factory):
    gw = await gateway_factory()
    cookie = await sign_in(gw)
    payload = await echo(gw, "/who", cookie=cookie, headers=SPOOFS)
    h = echoed_headers(payload)
    assert h["x-forwarded-user"] == ["alice"]
    assert h["x-forwarded-preferred-username"] == ["alice"]
    assert h["x-forwarded-email"] == ["alice@example.com"]
    assert h["x-forwarded-groups"] == ["gateway-users"]
    names = [k.lower() for k, _ in payload["headers"]]
    assert not [n for n in names if "_" in n or n.startswith("x-auth-request")], names


@pytest.mark.parametrize("path", ["/private", "/public/page"])
async def test_anonymous_never_passes_an_identity_header(gateway_factory, path):
    gw = await gateway_factory(routes={"public": ["^/public/"]})
    async with client() as http, http.get(raw(gw, path), headers=SPOOFS, allow_redirects=False) as r:
        if path == "/private":
            assert r.status == 401  # never reaches the upstream at all
            return
        assert r.status == 200
        payload = await r.json()
    names = {k.lower().replace("_", "-") for k, _ in payload["headers"]}
    assert not names & set(IDENTITY_HEADERS)
    assert not [n for n in names if n.startswith("x-auth-request")]


async def test_public_route_with_a_session_carries_the_identity(gateway_factory):
    gw = await gateway_factory(routes={"public": ["^/public/"]})
    cookie = await sign_in(gw)
    h = echoed_headers(await echo(gw, "/public/page", cookie=cookie, headers=SPOOFS))
    assert h["x-forwarded-user"] == ["alice"]
    # An invalid cookie on a public route: proxied, but as nobody.
    h = echoed_headers(await echo(gw, "/public/page", cookie="forged", headers=SPOOFS))
    assert not set(h) & set(IDENTITY_HEADERS)


async def test_custom_identity_header_names_are_set_and_their_spoofs_dropped(gateway_factory):
    gw = await gateway_factory(headers={"user": "X-Remote-User", "groups": "Remote-Groups"})
    cookie = await sign_in(gw)
    spoofs = [("X-Remote-User", "mallory"), ("x_remote_user", "mallory"), ("REMOTE-GROUPS", "admins"),
              ("remote_groups", "admins")]
    payload = await echo(gw, "/who", cookie=cookie, headers=spoofs)
    h = echoed_headers(payload)
    assert h["x-remote-user"] == ["alice"]
    assert h["remote-groups"] == ["gateway-users"]
    assert not [k for k, _ in payload["headers"] if "_" in k]
    assert "x-forwarded-user" not in h and "x-forwarded-groups" not in h  # renamed, not added twice


async def test_gateway_cookies_are_stripped_and_others_kept(gateway_factory):
    gw = await gateway_factory()
    cookie = await sign_in(gw)
    async with client() as http:
        header = f"theme=dark; {COOKIE}={cookie}; {COOKIE}_state_abcdef=xyz; lang=en; {COOKIE}x=1"
        async with http.get(raw(gw, "/c"), headers={"Cookie": header}) as r:
            assert r.status == 200
            h = echoed_headers(await r.json())
    assert h["cookie"] == ["theme=dark; lang=en"]
    assert h["x-forwarded-user"] == ["alice"]


# ---- routes --------------------------------------------------------------------------------------------

ROUTES = {"public": ["^/public(/|$)", "GET=^/assets/"], "api": ["^/api/"]}


@pytest.mark.parametrize(("method", "target", "accept", "expected"), [
    ("GET", "/public/x", "text/html", 200),
    ("POST", "/public", "*/*", 200),
    ("GET", "/assets/app.js", "*/*", 200),
    ("POST", "/assets/app.js", "*/*", 401),          # the rule names GET only
    ("GET", "/private?x=/public", "text/html", 302),  # rules judge the path, never the query
    ("GET", "/private?x=/public", "application/json", 401),
    ("GET", "/api/items", "text/html", 401),          # api: 401 JSON even for a browser
    ("HEAD", "/private", "text/html", 302),
    ("GET", "/public/../private", "text/html", 302),
    ("GET", "/public/%2e%2e/private", "text/html", 302),
    ("GET", "/public%2F..%2Fprivate", "text/html", 302),
    ("GET", "/public/..;/private", "text/html", 302),
    ("GET", "//public/x", "text/html", 302),
    ("GET", "/public\\..\\private", "text/html", 302),
    ("GET", "/PUBLIC/x", "text/html", 302),
])
async def test_route_classes_for_anonymous_requests(gateway_factory, method, target, accept, expected):
    gw = await gateway_factory(routes=ROUTES)
    async with client() as http, http.request(method, raw(gw, target), headers={"Accept": accept},
                            allow_redirects=False) as r:
        assert r.status == expected, await r.text()
        if expected == 200:
            assert "cache-control" not in r.headers  # proxied answers are the upstream's own
            if method != "HEAD":
                assert (await r.json())["path"] == target
        else:
            assert r.headers["Cache-Control"] == "no-store"
        if expected == 302:
            loc = URL(r.headers["Location"])
            assert loc.path == "/oauth2/start" and loc.query["rd"] == target
        if expected == 401:
            assert r.content_type == "application/json"
            assert (await r.json())["error"] == "unauthenticated"


async def test_sign_in_redirect_keeps_the_exact_target(gateway_factory):
    gw = await gateway_factory()
    async with client() as http:
        target = "/a%2Fb/page?x=1&y=a%26b&z=%20"
        async with http.get(raw(gw, target), headers={"Accept": "text/html"}, allow_redirects=False) as r:
            assert r.status == 302
            location = r.headers["Location"]
    assert URL(location).query["rd"] == target


# ---- forwarding facts and Host -------------------------------------------------------------------------

CLAIMS = [("X-Forwarded-For", "6.6.6.6"), ("X-Forwarded-Proto", "https"),
          ("X-Forwarded-Host", "evil.example"), ("Forwarded", "for=6.6.6.6"), ("X-Real-IP", "6.6.6.6")]


async def test_forwarding_claims_of_an_untrusted_client_are_replaced(gateway_factory):
    gw = await gateway_factory(server={"trusted_proxies": []})
    cookie = await sign_in(gw)
    h = echoed_headers(await echo(gw, "/f", cookie=cookie, headers=CLAIMS))
    assert h["x-forwarded-for"] == ["127.0.0.1"]
    assert h["x-forwarded-proto"] == ["http"]
    assert h["x-forwarded-host"] == [URL(gw.public_url).raw_authority]
    assert "forwarded" not in h and "x-real-ip" not in h


async def test_forwarding_claims_of_a_trusted_proxy_are_kept_and_extended(gateway_factory):
    gw = await gateway_factory(server={"trusted_proxies": ["127.0.0.1/32"]})
    cookie = await sign_in(gw)
    h = echoed_headers(await echo(gw, "/f", cookie=cookie, headers=CLAIMS))
    assert h["x-forwarded-for"] == ["6.6.6.6, 127.0.0.1"]
    assert h["x-forwarded-proto"] == ["https"]
    assert h["x-forwarded-host"] == ["evil.example"]
    assert h["x-real-ip"] == ["6.6.6.6"]


@pytest.mark.parametrize("pass_host", [True, False])
async def test_pass_host_header(gateway_factory, upstream, pass_host):
    gw = await gateway_factory(upstream={"pass_host_header": pass_host})
    cookie = await sign_in(gw)
    h = echoed_headers(await echo(gw, "/h", cookie=cookie, headers=[("Host", "tool.example.com")]))
    assert h["host"] == (["tool.example.com"] if pass_host else [URL(upstream).raw_authority])


# ---- what comes back -----------------------------------------------------------------------------------

async def _redirecting(request: web.Request) -> web.Response:
    response = web.Response(status=302, headers={"Location": "http://elsewhere.example/next?a=%2F&b=%zz"})
    response.headers.add("Set-Cookie", "app_session=abc; Path=/; HttpOnly; SameSite=Strict")
    response.headers.add("Set-Cookie", "prefs=1; Max-Age=60")
    return response


async def _gzipped(request: web.Request) -> web.Response:
    return web.Response(body=gzip.compress(b"hello " * 1000), headers={
        "Content-Encoding": "gzip", "Content-Type": "text/plain", "X-Seen-Accept-Encoding":
        request.headers.get("Accept-Encoding", "-")})


async def _big(request: web.Request) -> web.StreamResponse:
    size = int(request.query["n"])
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    if "known" in request.query:
        response.content_length = size
    await response.prepare(request)
    for i in range(0, size, 10_000):
        await response.write(bytes([i // 10_000 % 256]) * min(10_000, size - i))
    await response.write_eof()
    return response


async def _truncated(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse()
    response.content_length = 1_000_000
    await response.prepare(request)
    await response.write(b"x" * 100_000)
    assert request.transport is not None
    request.transport.close()
    return response


async def _fixed(request: web.Request) -> web.Response:
    return web.Response(body=b"z" * int(request.query["n"]))


async def _hop_by_hop(request: web.Request) -> web.Response:
    # Connection names a header meant for the next hop only (us): it must stop here, like Keep-Alive.
    return web.Response(text="ok", headers={"Connection": "X-Private-Hop", "X-Private-Hop": "for the proxy",
                                            "Keep-Alive": "timeout=5", "X-Kept": "yes"})


def special_upstream() -> web.Application:
    app = web.Application()
    app.router.add_get("/fixed", _fixed)
    app.router.add_get("/redirect", _redirecting)
    app.router.add_get("/gzip", _gzipped)
    app.router.add_get("/big", _big)
    app.router.add_get("/truncated", _truncated)
    app.router.add_get("/hop", _hop_by_hop)
    return app


async def test_upstream_redirect_and_set_cookie_pass_unchanged(gateway_factory, serve_app):
    gw = await gateway_factory(upstream={"url": await serve_app(special_upstream())})
    cookie = await sign_in(gw)
    async with client() as http, http.get(raw(gw, "/redirect"), headers={"Cookie": f"{COOKIE}={cookie}"},
                        allow_redirects=False) as r:
        assert r.status == 302
        assert r.headers["Location"] == "http://elsewhere.example/next?a=%2F&b=%zz"
        assert r.headers.getall("Set-Cookie") == ["app_session=abc; Path=/; HttpOnly; SameSite=Strict",
                                                  "prefs=1; Max-Age=60"]
        assert "Cache-Control" not in r.headers


async def test_hop_by_hop_response_headers_stop_at_the_gateway(gateway_factory, serve_app):
    gw = await gateway_factory(upstream={"url": await serve_app(special_upstream())})
    cookie = await sign_in(gw)
    async with client() as http, http.get(raw(gw, "/hop"), headers={"Cookie": f"{COOKIE}={cookie}"}) as r:
        assert r.status == 200 and await r.text() == "ok"
        assert r.headers["X-Kept"] == "yes"
        assert "X-Private-Hop" not in r.headers and "Keep-Alive" not in r.headers
        assert "X-Private-Hop" not in r.headers.get("Connection", "")


async def test_content_encoding_passes_through_raw(gateway_factory, serve_app):
    gw = await gateway_factory(upstream={"url": await serve_app(special_upstream())})
    cookie = await sign_in(gw)
    async with client() as http:
        async with http.get(raw(gw, "/gzip"), headers={"Cookie": f"{COOKIE}={cookie}"}) as r:
            assert r.headers["X-Seen-Accept-Encoding"] == "-"  # the gateway added none of its own
            assert r.headers["Content-Encoding"] == "gzip"
            assert gzip.decompress(await r.read()) == b"hello " * 1000
        headers = {"Cookie": f"{COOKIE}={cookie}", "Accept-Encoding": "gzip"}
        async with http.get(raw(gw, "/gzip"), headers=headers) as r:
            assert r.headers["X-Seen-Accept-Encoding"] == "gzip"


@pytest.mark.parametrize("query", ["n=70000&known=1", "n=70000", "n=1000", "n=0&known=1", "n=65536&known=1"])
async def test_bodies_small_and_large_known_and_unknown_length(gateway_factory, serve_app, query):
    gw = await gateway_factory(upstream={"url": await serve_app(special_upstream())})
    cookie = await sign_in(gw)
    size = int(URL(f"/?{query}").query["n"])
    headers = {"Cookie": f"{COOKIE}={cookie}"}
    async with client() as http, http.get(raw(gw, f"/big?{query}"), headers=headers) as r:
        body = await r.read()
        if "known" in query:
            assert r.headers["Content-Length"] == str(size)
        else:
            assert r.headers.get("Transfer-Encoding") == "chunked"
    assert len(body) == size
    expected = b"".join(bytes([i // 10_000 % 256]) * min(10_000, size - i) for i in range(0, size, 10_000))
    assert body == expected


async def test_upstream_dying_mid_body_truncates_the_client_response(gateway_factory, serve_app):
    gw = await gateway_factory(upstream={"url": await serve_app(special_upstream())})
    cookie = await sign_in(gw)
    headers = {"Cookie": f"{COOKIE}={cookie}"}
    async with client() as http, http.get(raw(gw, "/truncated"), headers=headers) as r:
        assert r.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await r.read()


# ---- failures ------------------------------------------------------------------------------------------

async def test_upstream_down_is_a_502_page(gateway_factory, unused_tcp_port_factory):
    gw = await gateway_factory(upstream={"url": f"http://127.0.0.1:{unused_tcp_port_factory()}"})
    cookie = await sign_in(gw)
    async with client() as http:
        headers = {"Cookie": f"{COOKIE}={cookie}", "Accept": "text/html"}
        async with http.get(raw(gw, "/x"), headers=headers) as r:
            assert r.status == 502
            assert r.headers["Cache-Control"] == "no-store"
            assert "The application is not answering" in await r.text()
        async with http.post(raw(gw, "/x"), headers={"Cookie": f"{COOKIE}={cookie}"}, data=b"x") as r:
            assert r.status == 502
            assert (await r.json())["error"] == "bad_gateway"


async def test_no_headers_within_the_timeout_is_a_504(gateway_factory):
    gw = await gateway_factory(upstream={"timeout": "1s"})
    cookie = await sign_in(gw)
    async with client() as http:
        started = time.monotonic()
        headers = {"Cookie": f"{COOKIE}={cookie}", "Accept": "text/html"}
        async with http.get(raw(gw, "/_upstream/slow?s=3"), headers=headers) as r:
            assert r.status == 504
            assert r.headers["Cache-Control"] == "no-store"
            assert "took too long" in await r.text()
        assert 0.9 < time.monotonic() - started < 2.5
        async with http.get(raw(gw, "/_upstream/slow?s=0.2"), headers=headers) as r:
            assert r.status == 200


async def test_the_timeout_counts_from_the_end_of_a_slow_upload(gateway_factory):
    """A client pausing longer than the 1 s upstream timeout between body chunks does not make it fire."""
    gw = await gateway_factory(upstream={"timeout": "1s"})
    cookie = await sign_in(gw)

    async def slow_body() -> AsyncIterator[bytes]:
        for i in range(3):
            if i:
                await asyncio.sleep(1.3)
            yield f"{i}".encode()

    payload = await echo(gw, "/upload", cookie=cookie, method="POST", data=slow_body())
    assert payload["body"] == "012"


async def stalling_upstream(gateway_factory: Any, serve_app: Any, release: asyncio.Event, *,
                            read_body: bool) -> tuple[Gateway, str, list[bytes]]:
    """A signed-in gateway (upstream.timeout 1 s) before an upstream whose POST /stall answers only once
    `release` is set (or after 30 s); with `read_body` it first takes the whole body (returned list), else it
    never reads it."""
    received: list[bytes] = []

    async def stalls(request: web.Request) -> web.Response:
        if read_body:
            received.append(await request.read())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(release.wait(), 30)
        return web.Response(text="late")

    app = web.Application()
    app.router.add_post("/stall", stalls)
    gw = await gateway_factory(upstream={"url": await serve_app(app), "timeout": "1s"})
    return gw, await sign_in(gw), received


@pytest.mark.parametrize("pause", [0.0, 1.3])
async def test_an_upstream_that_reads_the_body_then_stalls_is_a_504(gateway_factory, serve_app, pause):
    """The deadline is armed again once the last body chunk is sent: a POST (sent at once, or slowly with
    pauses longer than the timeout) whose upstream takes the whole body and then never answers gets its 504,
    about `upstream.timeout` after the upload ended."""
    release = asyncio.Event()
    gw, cookie, received = await stalling_upstream(gateway_factory, serve_app, release, read_body=True)
    sent: dict[str, float] = {}

    async def body() -> AsyncIterator[bytes]:
        for i in range(3):
            if i and pause:
                await asyncio.sleep(pause)
            yield f"{i}".encode()
        sent["at"] = time.monotonic()

    try:
        async with client(timeout=aiohttp.ClientTimeout(total=8)) as http, http.post(
                raw(gw, "/stall"), data=body(), headers={"Cookie": f"{COOKIE}={cookie}"}) as r:
            assert r.status == 504
            assert (await r.json())["error"] == "gateway_timeout"
            answered = time.monotonic()
    finally:
        release.set()
    assert received == [b"012"]
    assert answered - sent["at"] >= 0.9  # counted from the end of the upload, not from its start


async def test_an_upstream_that_stops_reading_the_body_is_a_504(gateway_factory, serve_app):
    # The upstream never reads the body: the gateway's writes stall once the socket buffers are full. (Its
    # reading paused, that server would not even notice the gateway hanging up: the test releases it.)
    finished = asyncio.Event()
    gw, cookie, _ = await stalling_upstream(gateway_factory, serve_app, finished, read_body=False)

    async def endless() -> AsyncIterator[bytes]:
        block = b"u" * 65536
        for _ in range(2048):  # 128 MiB, far more than socket buffers hold
            yield block

    started = time.monotonic()
    async with client(timeout=aiohttp.ClientTimeout(total=15)) as http, http.post(raw(gw, "/stall"), data=endless(),
                                           headers={"Cookie": f"{COOKIE}={cookie}"}) as r:
        assert r.status == 504
    assert time.monotonic() - started < 10
    finished.set()


async def test_client_leaving_before_the_headers_cancels_the_upstream_request(gateway_factory, serve_app):
    seen: dict[str, float] = {}

    async def slow(request: web.Request) -> web.Response:
        seen["started"] = time.monotonic()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:  # TestServer cancels the handler when its client goes away
            seen["cancelled"] = time.monotonic()
            raise
        return web.Response(text="late")

    app = web.Application()
    app.router.add_get("/slow", slow)
    gw = await gateway_factory(upstream={"url": await serve_app(app), "timeout": "30s"})
    cookie = await sign_in(gw)
    async with client(timeout=aiohttp.ClientTimeout(total=0.5)) as http:
        with pytest.raises(asyncio.TimeoutError):
            await http.get(raw(gw, "/slow"), headers={"Cookie": f"{COOKIE}={cookie}"})
    for _ in range(100):
        if "cancelled" in seen:
            break
        await asyncio.sleep(0.02)
    assert "cancelled" in seen, "the upstream request outlived its client"
    assert seen["cancelled"] - seen["started"] < 2


async def test_client_leaving_mid_download_closes_the_upstream_stream(gateway_factory, serve_app):
    state: dict[str, Any] = {"sent": 0}

    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        try:
            while True:
                await response.write(b"y" * 65536)
                state["sent"] += 65536
                await asyncio.sleep(0.001)
        except (ConnectionError, asyncio.CancelledError):
            state["stopped"] = time.monotonic()
            raise

    app = web.Application()
    app.router.add_get("/endless", endless)
    gw = await gateway_factory(upstream={"url": await serve_app(app)})
    cookie = await sign_in(gw)
    async with client() as http:
        r = await http.get(raw(gw, "/endless"), headers={"Cookie": f"{COOKIE}={cookie}"})
        await r.content.readexactly(100_000)
        r.close()
        closed_at = time.monotonic()
    for _ in range(100):
        if "stopped" in state:
            break
        await asyncio.sleep(0.02)
    assert "stopped" in state, "the upstream kept streaming to nobody"
    assert state["stopped"] - closed_at < 2


# ---- the proxied path costs no database query and no GitLab call ------------------------------------------

async def test_proxied_requests_make_no_database_query(gateway_factory):
    gw = await gateway_factory()
    cookie = await sign_in(gw)
    store = gw.public_app[keys.SESSIONS]
    queries, gitlab_calls = store.queries, len(gw.fake.requests)
    async with client() as http:
        for i in range(50):
            method = ("GET", "POST", "PUT")[i % 3]
            async with http.request(method, raw(gw, f"/n/{i}"), headers={"Cookie": f"{COOKIE}={cookie}"},
                                    data=b"x" if method != "GET" else None) as r:
                assert r.status == 200
                assert echoed_headers(await r.json())["x-forwarded-user"] == ["alice"]
        assert store.queries == queries
        assert len(gw.fake.requests) == gitlab_calls
        # And the proof that can fail loudly: with the gateway's pool closed, a query would be a 503.
        await gw.public_app[keys.POOL].close()
        for i in range(10):
            async with http.get(raw(gw, f"/after/{i}"), headers={"Cookie": f"{COOKIE}={cookie}"}) as r:
                assert r.status == 200, await r.text()


async def test_upstream_duration_is_recorded(gateway_factory):
    gw = await gateway_factory()
    cookie = await sign_in(gw)
    await echo(gw, "/_upstream/slow?s=0.1", cookie=cookie)
    text = gw.public_app[keys.METRICS].render()
    count = [line for line in text.splitlines() if line.startswith("gateway_upstream_duration_seconds_count")]
    assert count == ["gateway_upstream_duration_seconds_count 1"]
    total = [line for line in text.splitlines() if line.startswith("gateway_upstream_duration_seconds_sum")]
    assert 0.1 <= float(total[0].split()[1]) < 1


async def test_database_down_on_a_cache_miss_is_a_503_not_a_pass(gateway_factory):
    """Fail closed: a session the process has not cached cannot be checked without the database."""
    gw = await gateway_factory()
    cookie = await sign_in(gw)
    gw.public_app[keys.SESSIONS].invalidate_all()
    await gw.public_app[keys.POOL].close()
    async with client() as http, http.get(raw(gw, "/x"), headers={"Cookie": f"{COOKIE}={cookie}"}) as r:
        assert r.status == 503
        assert json.loads(await r.text())["error"] == "database_unavailable"
