"""The catch-all (SPEC §4, §7): authenticate from the session cache, then relay to the upstream.

Plain HTTP goes through upstream_client.py (a keep-alive pool per upstream, heads written in one write,
responses parsed by llhttp); WebSockets through aiohttp's client. Request and response bodies stream both ways:
the request body is read from the client chunk by chunk and written upstream, each chunk drained before the
next is read (chunked when the client sent no Content-Length, the client's Content-Length kept when it did);
the response is copied as it arrives (server-sent events flush at once), the upstream's reading paused while
the client is slower. The one exception is a small response of known length, answered with a plain
`web.Response` because that is much cheaper than a streamed one and holds at most SMALL_BODY bytes.

Timeouts:
- `upstream.connect_timeout` bounds opening a TCP connection (a timer only then, never per request); failing
  it is a 502, like a refused connection.
- `upstream.timeout` bounds the wait for the response headers, counted once the request body is sent
  (SPEC §3). A read timeout cannot express that (it also runs between body reads, and would cut
  quiet server-sent event streams), so the request carries its own deadline (see Deadlines): armed from the
  start (covering name resolution, connect, and the wait for the first body chunk to be asked for), lifted
  while we wait for the CLIENT's next body chunk (the client's pace is not the upstream's fault), armed
  while the upstream must accept a chunk (an upstream that stops reading the body is as stuck as one that
  never answers), and armed for good once the last chunk is sent. Expiry is a 504.
- After the headers nothing bounds the body: server-sent events and long downloads may last for hours.

Reusing upstream connections: keepalive.py honours the upstream's advertised `Keep-Alive: timeout=N` and says
when a request that died with a reused connection may be sent again.

The client going away: aiohttp cancels the handler (handler_cancellation, see server.py; aiohttp's
TestServer does the same); the upstream connection of a request not relayed to its end is closed, never
pooled, so the upstream sees it drop. A write to a client that has gone
raises ConnectionResetError, with the same effect.

WebSockets (`upstream.websockets: true`): an authenticated upgrade is relayed message by message (text,
binary, ping, pong, close codes). With `websockets: false` an upgrade request is proxied as the plain HTTP
request it also is: Upgrade and Connection are hop-by-hop and never cross, so the upstream answers it like
any GET (typically 400 or 426) and no tunnel is ever opened.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

import aiohttp
from aiohttp import StreamReader, web
from multidict import CIMultiDict
from yarl import URL

from gateway import keys
from gateway.access.headers import HeaderPolicy
from gateway.access.policy import Decision
from gateway.access.upstreams import strip_path
from gateway.config import UpstreamConfig
from gateway.errors import BadRequest, UpstreamError, UpstreamTimeout
from gateway.identity import Anonymous, Identity, Sender
from gateway.metrics import Metrics
from gateway.sessions.store import SessionStore
from gateway.web import keepalive
from gateway.web.access import Access, refuse, unknown_host
from gateway.web.pages import NO_STORE
from gateway.web.upstream_client import UpstreamPool, header_block, request_line
from gateway.web.upstream_protocol import ConnectionDied, UpstreamConnection, UpstreamFailure

log = logging.getLogger("gateway.proxy")

# Responses of known length up to this size are read whole and answered with web.Response, much cheaper than
# a streamed response (shared/anchors: with the one-cookie read, what took an authenticating aiohttp proxy
# from about 0.7x to 0.9x of a bare one); everything else streams.
SMALL_BODY = 64 * 1024
# A WebSocket message is held whole by the relay: cap it so one client cannot exhaust the gateway's memory.
WS_MAX_MESSAGE = 64 * 1024 * 1024
# How often overdue upstream requests are looked for: `upstream.timeout` fires up to this much late.
SWEEP_INTERVAL = 0.1
# How long each side may take to answer a close frame before its connection is simply dropped.
WS_CLOSE_TIMEOUT = 10.0
# Close codes that may appear in a close frame (RFC 6455 §7.4); others become 1000.
_SENDABLE_CLOSE = frozenset([1000, 1001, 1002, 1003, *range(1007, 1015)])


@dataclass(frozen=True, slots=True)
class Proxy:
    """What the catch-all needs on every request, looked up once per app: one per upstream (SPEC §13), each
    with its own connection pool."""

    pool: UpstreamPool  # plain HTTP (upstream_client.py)
    http: aiohttp.ClientSession  # WebSockets only
    base: str  # upstream.url without a trailing slash; the client's raw path is appended as sent
    upstream_host: str
    timeout: float
    pass_host_header: bool
    websockets: bool
    prefix: str
    policy: HeaderPolicy
    access: Access
    strip: str | None  # strip_prefix: the path prefix cut off before the request goes upstream
    audience: str  # the assertion's aud: this upstream's url
    sessions: SessionStore
    metrics: Metrics
    deadlines: Deadlines


# Not in keys.py: private handles of this module (like app.READINESS), built from keys.* in upstream_ctx.
# PROXIES is in `upstreams:` order; PROXY is the first (the only one with a single `upstream:`).
PROXY = web.AppKey("proxy", Proxy)
PROXIES: web.AppKey[tuple[Proxy, ...]] = web.AppKey("proxies")


def make_session(upstream: UpstreamConfig) -> aiohttp.ClientSession:
    """An upstream's ClientSession for WebSockets: no cookie jar, no decompression, no pool cap (an upgraded
    connection is never pooled anyway)."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=upstream.connect_timeout),
        auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar())


async def upstream_ctx(app: web.Application) -> AsyncIterator[None]:
    cfg = app[keys.CONFIG]
    access = app[keys.ACCESS]
    deadlines = Deadlines()
    proxies = []
    for target in access.table.targets:
        up = target.route.upstream
        proxies.append(Proxy(
            pool=UpstreamPool(up.url, connect_timeout=up.connect_timeout), http=make_session(up),
            base=target.base, upstream_host=urlsplit(up.url).netloc,
            timeout=up.timeout, pass_host_header=up.pass_host_header, websockets=up.websockets,
            prefix=cfg.server.prefix, policy=app[keys.HEADER_POLICY], access=access, strip=target.strip,
            audience=up.url, sessions=app[keys.SESSIONS], metrics=app[keys.METRICS], deadlines=deadlines))
    app[keys.UPSTREAM_HTTP] = proxies[0].http
    app[PROXY] = proxies[0]
    app[PROXIES] = tuple(proxies)
    sweeper = asyncio.create_task(deadlines.sweep())
    yield
    sweeper.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await sweeper
    for proxy in proxies:
        await proxy.pool.close()
        await proxy.http.close()


# ---- the handler ---------------------------------------------------------------------------------------

class View(Sender, Protocol):
    """What relaying a request reads of it: an aiohttp request, or the proxied path's own (fast_lane.py)."""

    @property
    def method(self) -> str: ...

    @property
    def raw_path(self) -> str: ...

    @property
    def scheme(self) -> str: ...

    @property
    def body_exists(self) -> bool: ...

    @property
    def content(self) -> StreamReader: ...


async def handle(request: web.Request) -> web.StreamResponse:
    """Every request that is not one of the gateway's own: authenticate, then relay to the upstream."""
    proxy, identity, decision = await admit(request.app[PROXIES], request)
    request[keys.IDENTITY] = identity
    if decision.outcome != "allow":
        return refuse(proxy.access, request, decision, request.raw_path)
    upgrade = "Upgrade" in request.headers and _is_websocket_upgrade(request)
    if upgrade and proxy.websockets:
        return await _relay_websocket(proxy, request, identity)
    # A refused upgrade also loses its Sec-WebSocket-* headers: the upstream sees a plain GET.
    return await _relay_http(proxy, request, identity, strip_websocket=upgrade)


async def admit(proxies: tuple[Proxy, ...], request: View) -> tuple[Proxy, Identity | Anonymous, Decision]:
    """Which upstream the request is for, who sent it, and what the policy says of it (GatewayError when the
    target is not a path, no upstream serves the host, or the sender cannot be identified)."""
    raw_path = request.raw_path
    if not raw_path.startswith("/"):
        # Absolute-form ("http://other/x") or "*": appended to upstream.url it would name another URL.
        raise BadRequest("The request target must be a path")
    access = proxies[0].access
    host = access.host_of(request)
    target = access.table.select(host, raw_path)
    if target is None:
        raise unknown_host()  # never the first upstream: an unknown Host must not reach some tool
    proxy = proxies[target.index]
    identity = await proxy.sessions.identify(request)
    decision = access.policy.decide(request.method, host, raw_path,
                                    identity if isinstance(identity, Identity) else None)
    return proxy, identity, decision


def _assertion(proxy: Proxy, identity: Identity | Anonymous) -> str | None:
    """SPEC §13's signed identity for this upstream, when configured (the signer's cached token: the same
    string object until it is renewed)."""
    access = proxy.access
    if access.assertion_header is not None and access.signer is not None and isinstance(identity, Identity):
        return access.signer.token(identity, identity.sid_hash, proxy.audience)
    return None


def _upstream_headers(proxy: Proxy, request: View, identity: Identity | Anonymous, *,
                      websocket: bool = False, assertion: str | None = None) -> CIMultiDict[str]:
    # The direct peer and our own view: the policy decides whether the peer's forwarding claims count.
    incoming = request.headers
    headers = proxy.policy.upstream_request_headers(
        incoming, client_ip=request.remote or "", scheme=request.scheme, host=incoming.get("Host", ""),
        identity=identity,
        pass_host_header=proxy.pass_host_header, upstream_host=proxy.upstream_host, websocket=websocket)
    # aiohttp's server already answered "100 Continue" when the handler started reading; passed on, the
    # header would make the client library wait for a second 100 that an HTTP/1.0 upstream never sends.
    headers.popall("Expect", None)
    if isinstance(identity, Identity) and identity.via_token:
        headers.popall("Authorization", None)  # SPEC §14: the token is the gateway's, never the tool's
    if assertion is not None:
        assert proxy.access.assertion_header is not None
        headers[proxy.access.assertion_header] = assertion
    return headers


def _path(proxy: Proxy, raw_path: str) -> str:
    """The request target as the upstream gets it (after the upstream URL's own path): as the client sent it,
    less `strip_prefix` and any fragment."""
    path = strip_path(proxy.strip, raw_path) if proxy.strip else raw_path
    return path.partition("#")[0] if "#" in path else path


def _target(proxy: Proxy, raw_path: str) -> URL:
    return URL(proxy.base + _path(proxy, raw_path), encoded=True)


# ---- HTTP ----------------------------------------------------------------------------------------------

class Deadlines:
    """Header deadlines of in-flight upstream requests, enforced by one sweeping task.

    A timer per request (asyncio.timeout) costs a heap push, a cancelled handle left in the loop's heap
    until it is cleaned up, and the Timeout bookkeeping: measurable at thousands of requests per second.
    Here a request only sets and pops a dict entry; a sweep every SWEEP_INTERVAL cancels the tasks that are
    overdue, so a deadline fires up to SWEEP_INTERVAL late.
    """

    def __init__(self) -> None:
        self._due: dict[asyncio.Task[Any], float] = {}
        self._expired: set[asyncio.Task[Any]] = set()
        self._pending = asyncio.Event()

    def set(self, task: asyncio.Task[Any], when: float) -> None:
        if not self._due:
            self._pending.set()
        self._due[task] = when

    def clear(self, task: asyncio.Task[Any]) -> None:
        """No deadline for `task` for now (its body pacer may set one again)."""
        self._due.pop(task, None)

    def done(self, task: asyncio.Task[Any]) -> None:
        """`task` no longer waits for headers: forget it entirely."""
        self._due.pop(task, None)
        self._expired.discard(task)

    def expired(self, task: asyncio.Task[Any]) -> bool:
        """True (once) when the sweep cancelled `task` for being overdue."""
        if task in self._expired:
            self._expired.discard(task)
            return True
        return False

    async def sweep(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._due:
                self._pending.clear()
                await self._pending.wait()
            await asyncio.sleep(SWEEP_INTERVAL)
            now = loop.time()
            for task in [t for t, when in self._due.items() if when <= now]:
                del self._due[task]
                self._expired.add(task)
                task.cancel()


class _BodyPacer:
    """Moves a request's deadline as its body goes up (see the module docstring)."""

    __slots__ = ("deadlines", "loop", "seconds", "started", "task", "waiting")

    def __init__(self, deadlines: Deadlines, task: asyncio.Task[Any], seconds: float) -> None:
        self.deadlines = deadlines
        self.task = task
        self.loop = asyncio.get_running_loop()
        self.seconds = seconds
        self.waiting = True  # False once the headers arrived: the body may still flow, with no deadline
        self.started = False  # a chunk was taken from the client: the request cannot be sent again

    def arm(self) -> None:
        if self.waiting:
            self.deadlines.set(self.task, self.loop.time() + self.seconds)

    def disarm(self) -> None:
        self.deadlines.clear(self.task)

    async def upload(self, conn: UpstreamConnection, content: StreamReader, chunked: bool) -> None:
        """The client's body to the upstream, chunk by chunk as it arrives, moving the deadline as it goes;
        each chunk is written and drained before the next is read (the slower side sets the pace)."""
        try:
            while True:
                self.disarm()  # waiting for the client: its pace is not the upstream's fault
                chunk = await content.readany()
                if not chunk:
                    break
                self.started = True
                self.arm()  # the upstream must take this chunk in time
                conn.write(b"".join((b"%x\r\n" % len(chunk), chunk, b"\r\n")) if chunked else chunk)
                await conn.drain()
            if chunked:
                conn.write(b"0\r\n\r\n")
            conn.request_sent()
            self.arm()  # all sent: the headers are due within `seconds`
        except BaseException:
            # `started` stays as it was: a body cancelled before its first chunk was taken (the connection died
            # under the head) may still go again whole.
            conn.abort()
            raise


_NO_BODY_METHODS = frozenset(("GET", "HEAD", "OPTIONS", "TRACE"))


async def _relay_http(proxy: Proxy, request: web.Request, identity: Identity | Anonymous, *,
                      strip_websocket: bool = False) -> web.StreamResponse:
    exchange = Exchange()
    try:
        conn = await exchange.send(proxy, request, identity, strip_websocket=strip_websocket)
        return await _respond(proxy, request, conn)
    finally:
        await exchange.end()


class HeadMemo:
    """The upstream header block of a client connection's last request (web/fast_lane.py keeps one per
    connection). A kept-alive client sends the same headers request after request (the lane then hands over
    the very same parsed headers), and the same headers from the same identity (the session cache's object,
    replaced whenever the session changes) with the same signed assertion (the signer's cached token, renewed
    before it expires) to the same upstream make the same block: built once, not per request. Only bodiless
    requests are kept."""

    __slots__ = ("assertion", "block", "bodiless_kind", "headers", "identity", "proxy")

    def __init__(self) -> None:
        self.headers: object = None
        self.identity: object = None
        self.proxy: object = None
        self.bodiless_kind = False
        self.assertion: str | None = None
        self.block = b""

    def holds(self, request: View, identity: Identity | Anonymous, proxy: Proxy, bodiless_kind: bool,
              assertion: str | None) -> bool:
        return (self.headers is request.headers and self.identity is identity and self.proxy is proxy
                and self.bodiless_kind == bodiless_kind and self.assertion is assertion and not request.body_exists)

    def keep(self, request: View, identity: Identity | Anonymous, proxy: Proxy, bodiless_kind: bool,
             assertion: str | None, block: bytes) -> None:
        self.headers, self.identity, self.proxy = request.headers, identity, proxy
        self.bodiless_kind, self.assertion, self.block = bodiless_kind, assertion, block


class Exchange:
    """One request relayed over the upstream client: `send` it, relay the response, then always `end`."""

    __slots__ = ("conn", "upload")

    def __init__(self) -> None:
        self.conn: UpstreamConnection | None = None
        self.upload: asyncio.Future[None] | None = None

    async def send(self, proxy: Proxy, request: View, identity: Identity | Anonymous, *,
                   strip_websocket: bool = False, memo: HeadMemo | None = None) -> UpstreamConnection:
        """Send the request (its body streaming up) and wait for the response headers: the connection to read
        the response from, or UpstreamError (502) / UpstreamTimeout (504). `memo`: the client connection's
        last upstream header block, reused when the same headers come from the same identity again."""
        method = request.method
        has_body = request.body_exists
        chunked = False
        bodiless_kind = method in _NO_BODY_METHODS
        assertion = _assertion(proxy, identity)
        if memo is not None and memo.holds(request, identity, proxy, bodiless_kind, assertion):
            block = memo.block
        else:
            headers = _upstream_headers(proxy, request, identity, websocket=strip_websocket, assertion=assertion)
            if has_body:
                if "Content-Length" not in headers:  # the client's own length is kept; else the body is chunked
                    headers["Transfer-Encoding"] = "chunked"
                    chunked = True
            elif not bodiless_kind and "Content-Length" not in headers:
                headers["Content-Length"] = "0"  # as aiohttp's client: some servers refuse a bodiless POST without
            block = header_block(headers.items())
            if memo is not None and not has_body and not strip_websocket:
                memo.keep(request, identity, proxy, bodiless_kind, assertion, block)
        pool = proxy.pool
        head = request_line(method, pool.path + _path(proxy, request.raw_path)) + block
        task = asyncio.current_task()
        assert task is not None
        deadlines = proxy.deadlines
        loop = task.get_loop()  # not get_running_loop(): on CPython 3.11 each look-up is a getpid() system call
        started = loop.time()
        # Armed from the start (connect, the first chunk); with a body, the pacer moves it as it goes.
        deadlines.set(task, started + proxy.timeout)
        pacer = _BodyPacer(deadlines, task, proxy.timeout) if has_body else None

        async def send(conn: UpstreamConnection) -> asyncio.Future[None] | None:
            conn.start(head, is_head=method == "HEAD", has_body=has_body)
            sending = asyncio.ensure_future(pacer.upload(conn, request.content, chunked)) if pacer else None
            try:
                await conn.response()
            except BaseException:
                if sending is not None:
                    await _cancelled(sending)
                raise
            return sending

        try:
            try:
                self.conn = pool.take() or await pool.connect()
                self.upload = await send(self.conn)
            except ConnectionDied as exc:
                if not keepalive.may_retry(reused=exc.reused, answered=exc.answered,
                                           body_started=pacer is not None and pacer.started):
                    raise
                # A reused connection the upstream was closing, and nothing of the request consumed: once more.
                log.info("upstream closed a reused connection under a request; sending it again",
                         extra={"cause": str(exc)})
                self.conn = await pool.connect()
                self.upload = await send(self.conn)
        except asyncio.CancelledError:
            if self.conn is not None:
                self.conn.abort()
            if deadlines.expired(task):
                task.uncancel()
                err: UpstreamError | UpstreamTimeout = UpstreamTimeout(
                    f"No response from the application within {proxy.timeout:g} seconds")
                err.cause = f"no response headers from {proxy.upstream_host} within upstream.timeout"
                raise err from None
            raise
        except (UpstreamFailure, OSError) as exc:
            if self.conn is not None:
                self.conn.abort()
            raise _upstream_error(proxy, "request", exc) from None
        finally:
            if pacer is not None:
                pacer.waiting = False
            deadlines.done(task)
        proxy.metrics.upstream(loop.time() - started)
        return self.conn

    async def end(self) -> None:
        upload, conn = self.upload, self.conn
        if upload is not None and not upload.done():
            await _cancelled(upload)  # the upstream answered without taking the whole body
        if conn is not None and conn.busy:
            conn.abort()  # a response not relayed to its end closes its connection instead of pooling it


async def _cancelled(task: asyncio.Future[None]) -> None:
    task.cancel()
    with contextlib.suppress(BaseException):
        await task


async def _respond(proxy: Proxy, request: web.Request, conn: UpstreamConnection) -> web.StreamResponse:
    status = conn.status
    headers = proxy.policy.relayed_response_headers(conn.headers)
    length = conn.content_length
    if (length is not None and length <= SMALL_BODY) or request.method == "HEAD" or status in (204, 304):
        try:
            body = await conn.read_all()
        except UpstreamFailure as exc:
            raise _upstream_error(proxy, "response body", exc) from None
        conn.finish()
        return web.Response(status=status, headers=headers, body=body)
    if conn.failed is not None:  # nothing sent yet: the client may still get an honest 502
        raise _upstream_error(proxy, "response body", conn.failed)
    response = web.StreamResponse(status=status, headers=headers)
    if length is None and request.version < aiohttp.HttpVersion11:
        # The body runs to the close for an HTTP/1.0 client: close it, even if the client asked for keep-alive
        # (aiohttp would leave it open, and the client waiting for the end of the body).
        response.force_close()
    await response.prepare(request)
    try:
        while chunk := await conn.read():
            await response.write(chunk)
    except UpstreamFailure as exc:
        # Headers are gone: the only honest signal left is to cut the connection, so the client sees a
        # truncated body instead of a complete-looking one.
        conn.abort()
        cause = f"{proxy.upstream_host}: {_describe(exc)}"
        # The access log line says so too: the status it shows was sent, the body was not.
        request[keys.OUTCOME] = "truncated"
        log.warning("upstream failed mid-response: the response was cut", extra={"cause": cause})
        if request.transport is not None:
            request.transport.close()
        return response
    conn.finish()
    await response.write_eof()
    return response


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()[:200]
    return f"{text} ({type(exc).__name__})" if text else type(exc).__name__


def _upstream_error(proxy: Proxy, what: str, exc: BaseException) -> UpstreamError:
    """The 502 for a failed upstream `what`: the page says the application is not answering, the log why."""
    err = UpstreamError()
    err.cause = f"{what} to {proxy.upstream_host}: {_describe(exc)}"
    return err


# ---- WebSocket -----------------------------------------------------------------------------------------

def _is_websocket_upgrade(request: web.Request) -> bool:
    if request.method != "GET" or request.headers.get("Upgrade", "").lower() != "websocket":
        return False
    tokens = {t.strip().lower() for v in request.headers.getall("Connection", ()) for t in v.split(",")}
    return "upgrade" in tokens


def _requested_subprotocols(request: web.Request) -> tuple[str, ...]:
    values = request.headers.getall("Sec-WebSocket-Protocol", ())
    return tuple(p.strip() for v in values for p in v.split(",") if p.strip())


async def _relay_websocket(proxy: Proxy, request: web.Request,
                           identity: Identity | Anonymous) -> web.StreamResponse:
    headers = _upstream_headers(proxy, request, identity, websocket=True, assertion=_assertion(proxy, identity))
    url = _target(proxy, request.raw_path)
    loop = asyncio.get_running_loop()
    started = loop.time()
    timer = asyncio.timeout(proxy.timeout)
    try:
        async with timer:
            upstream = await proxy.http.ws_connect(
                url, headers=headers, protocols=_requested_subprotocols(request), autoclose=False,
                autoping=False, max_msg_size=WS_MAX_MESSAGE,
                timeout=aiohttp.ClientWSTimeout(ws_close=WS_CLOSE_TIMEOUT))
    except aiohttp.WSServerHandshakeError as exc:
        if exc.status == 101:  # a 101 with a wrong Sec-WebSocket-Accept or protocol: not a sane upstream
            raise UpstreamError("the upstream's WebSocket handshake is invalid") from None
        # The upstream refused the upgrade (401, 404, 426...): say so with its status (its body is lost).
        return web.Response(status=exc.status, text=exc.message or "", headers=NO_STORE)
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        if timer.expired():
            raise UpstreamTimeout("the upstream did not accept the WebSocket in time") from None
        raise _upstream_error(proxy, "WebSocket", exc) from None
    proxy.metrics.upstream(loop.time() - started)
    async with upstream:
        client = web.WebSocketResponse(protocols=(upstream.protocol,) if upstream.protocol else (),
                                       autoclose=False, autoping=False, max_msg_size=WS_MAX_MESSAGE,
                                       timeout=WS_CLOSE_TIMEOUT)
        await client.prepare(request)
        await _pump_both(client, upstream)
    return client


WebSocket = web.WebSocketResponse | aiohttp.ClientWebSocketResponse


async def _pump_both(client: web.WebSocketResponse, upstream: aiohttp.ClientWebSocketResponse) -> None:
    """Relay until either side closes; a close is passed on with its code, a dropped side closes the other."""
    to_upstream = asyncio.ensure_future(_pump(client, upstream))
    to_client = asyncio.ensure_future(_pump(upstream, client))
    try:
        done, pending = await asyncio.wait({to_upstream, to_client}, return_when=asyncio.FIRST_COMPLETED)
        if any(task.result() == "gone" for task in done):
            # One side dropped without a closing handshake: tell the other one we are going away.
            await asyncio.gather(_going_away(upstream), _going_away(client), return_exceptions=True)
        # Otherwise a closing handshake is under way in the other pump: let it finish (aiohttp bounds
        # each close() by its own timeout, 10 s).
        await asyncio.wait(pending, timeout=WS_CLOSE_TIMEOUT * 2 + 1)
    finally:
        for task in (to_upstream, to_client):
            task.cancel()
        await asyncio.gather(to_upstream, to_client, return_exceptions=True)
        await asyncio.gather(_going_away(upstream), _going_away(client), return_exceptions=True)


async def _going_away(ws: WebSocket) -> None:
    if not ws.closed:
        await ws.close(code=aiohttp.WSCloseCode.GOING_AWAY)


async def _pump(src: WebSocket, dst: WebSocket) -> str:
    """Copy messages from src to dst; "closed" after passing a close on, "closing" when the other pump is
    closing src, "gone" when src dropped."""
    while True:
        msg = await src.receive()
        kind = msg.type
        if kind is aiohttp.WSMsgType.TEXT:
            await dst.send_str(msg.data)
        elif kind is aiohttp.WSMsgType.BINARY:
            await dst.send_bytes(msg.data)
        elif kind is aiohttp.WSMsgType.PING:
            await dst.ping(msg.data)
        elif kind is aiohttp.WSMsgType.PONG:
            await dst.pong(msg.data)
        elif kind is aiohttp.WSMsgType.CLOSE:
            code = msg.data if msg.data in _SENDABLE_CLOSE or 3000 <= msg.data <= 4999 else 1000
            reason = _close_reason(msg.extra)
            await dst.close(code=code, message=reason)  # sends the close on and waits for its answer
            await src.close(code=code, message=reason)  # completes the closing handshake on this side
            return "closed"
        elif kind is aiohttp.WSMsgType.CLOSING:
            return "closing"
        else:  # CLOSED or ERROR: the connection dropped or broke the protocol
            return "gone"


def _close_reason(extra: Any) -> bytes:
    reason = extra.encode() if isinstance(extra, str) else b""
    return reason[:123]  # a close frame's payload is at most 125 bytes, two of them the code
