"""The proxied path's own server (web/fast_lane.py): whatever it takes it answers exactly as aiohttp's handler
does, and everything else it hands over to aiohttp with every byte of the request.

The main property is differential: two gateways on one database, one with the lane in front of aiohttp and one
with aiohttp alone, get the same raw requests (drawn by hypothesis: methods, versions, cookies, spoofed and
hop-by-hop headers, bodies, upgrades, paths under the prefix...) and relay them to a scripted upstream that
answers with every framing (length, chunked, close-delimited, cut short), status and size; the client sees the
same bytes from both (but for Date and the ports), the upstream sees the same request, and the connection is
kept or closed alike. Raw sockets on both sides, so no client or server library hides a difference.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httptools
import pytest
from conftest import Gateway, session_cookie
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.web.fast_lane import Lane

# ---- a scripted upstream ------------------------------------------------------------------------------------

_REASON = {200: "OK", 201: "Created", 204: "No Content", 302: "Found", 304: "Not Modified", 404: "Not Found",
           500: "Internal Server Error"}


async def _scripted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers `?status=&framing=&size=&extra=` with a body that starts with the request head it received."""
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
            body = await reader.readexactly(int(length.group(1))) if length else b""
            if re.search(rb"(?im)^transfer-encoding:\s*chunked", head):
                while True:
                    size = int((await reader.readuntil(b"\r\n")).strip(), 16)
                    body += (await reader.readexactly(size + 2))[:-2]
                    if not size:
                        break
            method, target = head.split(b" ", 2)[:2]
            query = {k: v[0] for k, v in parse_qs(urlsplit(target.decode("latin-1")).query).items()}
            status = int(query.get("status", "200"))
            framing = query.get("framing", "length")
            extra = query.get("extra", "")
            payload = head + b"BODY:" + body + b"x" * int(query.get("size", "0"))
            lines = [f"HTTP/1.1 {status} {_REASON[status]}"]
            if "noctype" not in extra:
                lines.append("Content-Type: text/plain")
            if "hop" in extra:
                lines += ["Connection: X-Hop", "X-Hop: secret", "Keep-Alive: timeout=30", "Proxy-Connection: x"]
            if "cookie" in extra:
                lines += ["Set-Cookie: a=1; Path=/", "Set-Cookie: b=2"]
            if "server" in extra:
                lines.append("Server: upstream/1.0")
            empty = status in (204, 304)
            if framing == "length" or framing == "cut":
                lines.append(f"Content-Length: {len(payload) + (100 if framing == 'cut' else 0)}")
            elif framing == "chunked":
                lines.append("Transfer-Encoding: chunked")
            if empty or method == b"HEAD":
                body_bytes = b""
            elif framing == "chunked":
                half = len(payload) // 2
                body_bytes = b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in (payload[:half], payload[half:]) if p)
                body_bytes += b"0\r\n\r\n"
            else:
                body_bytes = payload
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body_bytes)
            await writer.drain()
            if framing in ("close", "cut") and not empty and method != b"HEAD":
                break
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


@pytest.fixture
async def scripted() -> AsyncIterator[str]:
    server = await asyncio.start_server(_scripted, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    server.close()
    await server.wait_closed()


@dataclass
class Pair:
    lane: Gateway
    plain: Gateway
    cookie: str

    def port(self, gw: Gateway) -> int:
        return int(gw.public_url.rsplit(":", 1)[1])


def lane_of(gw: Gateway) -> Lane:
    listener = gw.servers[0].listener  # type: ignore[union-attr]
    assert listener is not None and listener.lane is not None
    return listener.lane  # type: ignore[no-any-return]


@pytest.fixture
async def pair(gateway_factory: Any, scripted: str) -> Pair:
    lane = await gateway_factory(upstream_url=scripted, lane=True)
    plain = await gateway_factory(upstream_url=scripted, lane=False)
    cookie = await session_cookie(lane)
    return Pair(lane, plain, cookie)


# ---- a raw client --------------------------------------------------------------------------------------------

@dataclass
class Answer:
    status: int
    head: list[tuple[str, str]]
    body: bytes
    closed: bool  # the server closed the connection after this answer


class _Collect:
    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.keep_alive = False
        self.headers: list[tuple[str, str]] = []
        self.body = bytearray()
        self.head_done = self.done = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        self.head_done = True
        self.keep_alive = self.parser.should_keep_alive()  # llhttp forgets it once the message is complete

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        if self.parser.get_status_code() < 200:  # 100 Continue: the answer is still to come
            self.headers, self.body, self.head_done = [], bytearray(), False
            return
        self.done = True


def _read_answer(sock: socket.socket, *, head_only: bool) -> Answer:
    collect = _Collect()
    parser = collect.parser
    closed = False
    while not (collect.done or (head_only and collect.head_done)):
        data = sock.recv(65536)
        if not data:
            closed = True
            with contextlib.suppress(httptools.HttpParserError):  # a body cut short: the answer says so
                parser.feed_data(b"")
            break
        parser.feed_data(data)
    status = parser.get_status_code()
    if not closed and not collect.keep_alive:
        sock.settimeout(5)
        closed = sock.recv(1) == b""
    return Answer(status, collect.headers, bytes(collect.body), closed)


def exchange(port: int, requests: list[bytes], *, pieces: int = 1) -> list[Answer]:
    """Send `requests` one after another on one connection (each cut into `pieces` writes); their answers."""
    answers = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for raw in requests:
            raw = raw.replace(b"{PORT}", str(port).encode())
            step = max(1, len(raw) // pieces)
            for i in range(0, len(raw), step):
                sock.sendall(raw[i:i + step])
                if pieces > 1:
                    time.sleep(0.001)
            try:
                answer = _read_answer(sock, head_only=raw.startswith(b"HEAD "))
            except TimeoutError:
                answers.append(Answer(0, [], b"no answer within 10 s", False))
                break
            answers.append(answer)
            if answer.closed:
                break
    return answers


def normalized(answer: Answer, port: int) -> tuple[Any, ...]:
    def clean(text: str) -> str:
        text = text.replace(str(port), "PORT")
        return re.sub(r"request [0-9a-f]{16}", "request ID", text)

    head = sorted((name.lower(), clean(value)) for name, value in answer.head if name.lower() != "date")
    return answer.status, head, clean(answer.body.decode("latin-1")), answer.closed


# ---- the property ------------------------------------------------------------------------------------------

_METHODS = st.sampled_from(["GET", "GET", "HEAD", "DELETE", "OPTIONS", "POST", "PUT0"])
_COOKIES = st.sampled_from(["valid", "valid", "none", "bogus", "valid+other"])
_CONNECTION = st.sampled_from(["", "", "Connection: close", "Connection: keep-alive", "Connection: close, X-Secret",
                               "Connection: X-Secret"])
_EXTRAS = st.lists(st.sampled_from([
    "X-Forwarded-User: mallory", "X_Forwarded_User: mallory", "X-Auth-Request-Email: m@evil.test",
    "X-Secret: 1", "X-Forwarded-For: 6.6.6.6", "Forwarded: for=6.6.6.6", "X-Request-Id: fixed-id",
    "Accept: text/html", "Accept: application/json", "Host: dup.example", "Upgrade: websocket",
    "Expect: 100-continue", "Authorization: Basic dTpw", "TE: trailers", "User-Agent: a",
    "X-Forwarded-Uri: /admin", "X-Forwarded-Method: POST",
]), max_size=4, unique=True)
_PATHS = st.sampled_from(["/u", "/u", "/u/a%2Fb", "/oauth2/userinfo", "/oauth2", "/oauth2x/y", "http://h/u",
                          "/oauth2/auth", "/oauth2/auth"])
_STATUS = st.sampled_from([200, 200, 201, 204, 302, 304, 404, 500])
_FRAMING = st.sampled_from(["length", "length", "chunked", "close", "cut"])
_SIZE = st.sampled_from([0, 7, 70_000])
_UP_EXTRA = st.lists(st.sampled_from(["hop", "cookie", "server", "noctype"]), max_size=2, unique=True)


@st.composite
def requests(draw: Any) -> tuple[list[str], bytes]:
    method = draw(_METHODS)
    version = draw(st.sampled_from(["1.1", "1.1", "1.0"]))
    path = draw(_PATHS)
    query = (f"?status={draw(_STATUS)}&framing={draw(_FRAMING)}&size={draw(_SIZE)}"
             f"&extra={','.join(draw(_UP_EXTRA))}")
    if path == "/oauth2/auth":  # nginx auth_request's check: the query only for allowed_groups
        query = draw(st.sampled_from(["", "", "?allowed_groups=gateway-users", "?allowed_groups=nobody"]))
    lines = [f"{method.removesuffix('0')} {path}{query} HTTP/{version}", "Host: 127.0.0.1:{PORT}"]
    cookie = draw(_COOKIES)
    if cookie.startswith("valid"):
        lines.append("Cookie: " + ("theme=dark; " if "other" in cookie else "") + "_gateway_session={COOKIE}")
    elif cookie == "bogus":
        lines.append("Cookie: _gateway_session=bogus")
    if connection := draw(_CONNECTION):
        lines.append(connection)
    lines += draw(_EXTRAS)
    body = ""
    if method == "POST":
        body = "a=1&b=2"
        lines.append(f"Content-Length: {len(body)}")
    elif method == "PUT0":
        lines.append("Content-Length: 0")
    return lines, ("\r\n".join(lines) + "\r\n\r\n" + body).encode()


async def test_the_lane_answers_as_aiohttp_does(pair: Pair) -> None:
    """Property: for any request (sent twice, then a follow-up GET, on one connection while it is kept), the gateway
    with the lane and the gateway without it send the same status, headers (but Date) and body, close the
    connection alike, and the upstream receives the same request head and body (echoed in the body)."""
    cookie_name = pair.lane.config.session.cookie_name
    follow = (b"GET /u?status=200&size=3 HTTP/1.1\r\nHost: 127.0.0.1:{PORT}\r\nCookie: " + cookie_name.encode()
              + b"=" + pair.cookie.encode() + b"\r\n\r\n")

    @settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))
    @given(requests())
    def same(drawn: tuple[list[str], bytes]) -> None:
        lines, raw = drawn
        raw = raw.replace(b"_gateway_session", cookie_name.encode()).replace(b"{COOKIE}", pair.cookie.encode())
        answers = {}
        for gw in (pair.lane, pair.plain):
            port = pair.port(gw)
            answers[gw is pair.lane] = [normalized(a, port) for a in exchange(port, [raw, raw, follow])]
        assert answers[True] == answers[False], lines

    await asyncio.to_thread(same)
    lane = lane_of(pair.lane)
    # Both sides of the lane were exercised: requests it answered and connections it handed over.
    assert lane.answered > 30 and lane.handed_over > 30, (lane.answered, lane.handed_over)


class _Messages:
    """Every response of one connection, however they arrive (one parser over the whole stream)."""

    def __init__(self) -> None:
        self.done: list[tuple[int, bytes]] = []
        self.body = bytearray()
        self.parser = httptools.HttpResponseParser(self)

    def on_message_begin(self) -> None:
        self.body = bytearray()

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.done.append((self.parser.get_status_code(), bytes(self.body)))


async def test_pipelined_and_split_requests_are_answered_in_order(pair: Pair) -> None:
    """Requests pipelined in one write, or cut into many small writes, get their answers in order: the lane
    answers the first ones, aiohttp the ones from the first the lane does not take (a POST with a body)."""
    name = pair.lane.config.session.cookie_name
    cookie = f"Cookie: {name}={pair.cookie}\r\n"

    def get(n: int, method: str = "GET") -> bytes:
        return f"{method} /u?size={n} HTTP/1.1\r\nHost: x\r\n{cookie}\r\n".encode()

    post = f"POST /u?size=1 HTTP/1.1\r\nHost: x\r\n{cookie}Content-Length: 3\r\n\r\nabc".encode()
    stream = get(1) + get(2, "DELETE") + get(3) + post + get(4)
    port = pair.port(pair.lane)
    before = lane_of(pair.lane).answered
    for pieces in (1, 7, len(stream)):
        def run(pieces: int = pieces) -> list[tuple[int, bytes]]:
            messages = _Messages()
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                step = max(1, len(stream) // pieces)
                for i in range(0, len(stream), step):
                    sock.sendall(stream[i:i + step])
                    if pieces > 1:
                        time.sleep(0.0005)
                while len(messages.done) < 5:
                    data = sock.recv(65536)
                    assert data, messages.done
                    messages.parser.feed_data(data)
            return messages.done

        answers = await asyncio.to_thread(run)
        assert [status for status, _ in answers] == [200] * 5
        bodies = [body for _, body in answers]
        assert bodies[0].startswith(b"GET ") and bodies[0].endswith(b"BODY:x")
        assert bodies[1].startswith(b"DELETE ") and bodies[1].endswith(b"BODY:xx")
        assert bodies[2].endswith(b"BODY:xxx")
        assert bodies[3].startswith(b"POST ") and bodies[3].endswith(b"BODY:abcx")
        assert bodies[4].endswith(b"BODY:xxxx")
    assert lane_of(pair.lane).answered - before == 3 * 3  # three per stream; the POST and what follows: aiohttp


async def test_a_lane_connection_keeps_the_listener_timeouts(gateway_factory: Any, scripted: str) -> None:
    """`server.idle_timeout` closes an idle kept-alive lane connection; `server.header_timeout` one whose next
    request's headers do not arrive in time."""
    gw = await gateway_factory(upstream_url=scripted, lane=True,
                               server={"idle_timeout": "1s", "header_timeout": "1s"})
    cookie = await session_cookie(gw)
    port = int(gw.public_url.rsplit(":", 1)[1])
    request = f"GET /u HTTP/1.1\r\nHost: x\r\nCookie: {gw.config.session.cookie_name}={cookie}\r\n\r\n".encode()

    def idle(partial: bytes) -> float:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(request)
            answer = _read_answer(sock, head_only=False)
            assert answer.status == 200 and not answer.closed, answer.head
            started = time.monotonic()
            if partial:
                sock.sendall(partial)
            assert sock.recv(1) == b""
            return time.monotonic() - started

    lane = lane_of(gw)
    answered, handed_over = lane.answered, lane.handed_over  # the sign-in's pages: aiohttp's
    assert 0.5 < await asyncio.to_thread(idle, b"") < 3
    assert 0.5 < await asyncio.to_thread(idle, b"GET /u HTTP/1.1\r\nHo") < 3
    assert (lane.answered - answered, lane.handed_over - handed_over) == (2, 0)


async def test_the_lane_answers_the_plain_auth_request_check(pair: Pair) -> None:
    """`{prefix}/auth` for a signed-in user is the lane's (202 and the X-Auth-Request-* headers); a check that
    needs a refusal, or carries a query, is aiohttp's."""
    name, prefix = pair.lane.config.session.cookie_name, pair.lane.config.server.prefix
    port = pair.port(pair.lane)
    lane = lane_of(pair.lane)

    def check(extra: str, query: str = "") -> Answer:
        raw = f"GET {prefix}/auth{query} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode()
        return exchange(port, [raw])[0]

    answered, handed_over = lane.answered, lane.handed_over
    granted = await asyncio.to_thread(check, f"Cookie: {name}={pair.cookie}\r\n")
    assert granted.status == 202 and granted.body == b""
    assert ("X-Auth-Request-User", "alice") in granted.head and ("Cache-Control", "no-store") in granted.head
    assert (lane.answered - answered, lane.handed_over - handed_over) == (1, 0)
    assert (await asyncio.to_thread(check, "")).status == 401
    assert (await asyncio.to_thread(check, f"Cookie: {name}={pair.cookie}\r\n", "?allowed_groups=x")).status == 403
    assert (lane.answered - answered, lane.handed_over - handed_over) == (1, 2)


@pytest.mark.parametrize("lane", [True, False])
async def test_a_streamed_body_of_unknown_length_ends_an_http_1_0_connection(gateway_factory: Any, scripted: str,
                                                                              lane: bool) -> None:
    """HTTP/1.0 has no chunked encoding: a body of unknown length runs to the close, so the connection closes
    even when the client asked for keep-alive (aiohttp alone left it open, the client waiting for the end)."""
    gw = await gateway_factory(upstream_url=scripted, lane=lane)
    cookie = await session_cookie(gw)
    raw = (f"GET /u?framing=chunked&size=100000 HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n"
           f"Cookie: {gw.config.session.cookie_name}={cookie}\r\n\r\n").encode()
    answer = (await asyncio.to_thread(exchange, int(gw.public_url.rsplit(":", 1)[1]), [raw]))[0]
    assert answer.status == 200 and answer.closed and answer.body.endswith(b"x" * 100_000)
    assert not any(name.lower() in ("transfer-encoding", "content-length") for name, _ in answer.head)
