"""The public listener's own HTTP/1.1 server for the proxied path (issue 11).

With the upstream client of its own (upstream_client.py), what was left of a proxied request's cost was mostly
aiohttp's server: per request a message object, a BaseRequest and its URL, a handler task, the middleware
chain, a Response object, its header multidict and the writer's coroutines, for a request that only needs its
head read, a cookie looked up and the upstream's answer copied back. So the proxied path gets a server of its
own here: requests are parsed by llhttp (httptools, the same parser as the upstream side), the gateway's checks
are the ones aiohttp's handler runs (proxy.admit, proxy.Exchange, the same header policy), and the answer goes
out as one `transport.write` of a head serialized the way aiohttp serializes it.

Everything else stays aiohttp's. The lane takes a request only when it is sure to answer it exactly as the
aiohttp handler would; otherwise it hands the CONNECTION over to aiohttp's connection handler (listener.py's
Connection), replaying every byte from the start of that request, before anything was done about it. The
connection then stays with aiohttp. The lane takes a request when:
- it has no body (no Content-Length, no Transfer-Encoding), no Upgrade and no Expect header;
- it is HTTP/1.0 or 1.1 with an origin-form target ("/..."), within aiohttp's parser limits (line and field
  sizes, header count), with no singleton header repeated (aiohttp refuses those), and llhttp parses it;
- its path is outside `server.prefix` (the gateway's own pages are aiohttp's);
- proxy.admit accepts it: an upstream serves its host, its sender is identified without an error (a database
  outage, an unconfirmed account, a bad token: aiohttp answers those) and the policy allows it.
A request the lane took is answered by it: the upstream's response, or the 502/504 page (pages.error_answer).
The access log line, the metrics and the request id are the ones app.errors_middleware writes.

The listener's rules (listener.py) hold here too: a request's headers are due within `server.header_timeout`
of its first byte (or of the connection's opening), an idle keep-alive connection closes after
`server.idle_timeout`, `on_lost` frees the connection's place under `server.max_connections`, and a connection
registers with aiohttp's server like aiohttp's own handler, so the runner's shutdown closes idle connections
and gives a request in flight `server.shutdown_grace` (then cancels it). A client that goes away cancels its
request (and so the upstream's), as aiohttp's handler_cancellation does.
"""

from __future__ import annotations

import asyncio
import logging
import time
from http import HTTPStatus
from typing import Any, cast

import httptools
from aiohttp import StreamReader, hdrs, web
from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import SERVER_SOFTWARE
from multidict import CIMultiDict, istr
from yarl import URL

from gateway import keys, logs
from gateway.errors import GatewayError
from gateway.identity import Identity
from gateway.sessions.store import SessionStore
from gateway.web import auth_request
from gateway.web.access import Access
from gateway.web.pages import error_answer
from gateway.web.proxy import PROXIES, SMALL_BODY, Exchange, HeadMemo, Proxy, _describe, _upstream_error, admit
from gateway.web.upstream_protocol import UpstreamConnection, UpstreamFailure, wake

log = logging.getLogger("gateway.proxy")
_app_log = logging.getLogger("gateway.app")  # where errors_middleware logs the same events

# aiohttp's parser limits (web_protocol.RequestHandler's defaults): a request beyond them is aiohttp's to refuse.
MAX_LINE = 8190
MAX_FIELD = 8190
MAX_HEADERS = 128
# Pipelined requests parsed ahead of the one being answered, and bytes held for a hand-over, before the
# connection stops reading (the client waits; nothing is refused).
MAX_QUEUED = 16
MAX_HELD = 1024 * 1024

# Request headers that make the lane hand the request over: a body, a protocol switch, a 100-continue.
_NOT_TAKEN = frozenset((b"content-length", b"transfer-encoding", b"upgrade", b"expect"))
# Headers aiohttp refuses to see twice (http_parser.SINGLETON_HEADERS).
_SINGLETON = frozenset((b"content-length", b"content-location", b"content-range", b"content-type", b"etag",
                        b"host", b"max-forwards", b"server", b"transfer-encoding", b"user-agent"))
_VERSIONS = (b" HTTP/1.1", b" HTTP/1.0")
# aiohttp's parser spells the header names it knows its own way (X-Request-ID for x-request-id...), and that
# spelling is what goes upstream: so here too.
_SPELLING = {str(name).lower().encode(): str(name) for name in vars(hdrs).values() if isinstance(name, istr)}
_REASONS = {status.value: status.phrase for status in HTTPStatus}
_EMPTY_STATUS = frozenset((204, 304))


class _HandOver(Exception):
    """Raised from a parser callback: this request is aiohttp's (parsing stops here)."""


class _Line:
    """What a request's access log line says besides its request (as errors_middleware writes it)."""

    __slots__ = ("login", "outcome", "status", "taken")

    def __init__(self) -> None:
        self.taken = False  # the lane answers it (else aiohttp does, and writes the line)
        self.status = 500
        self.login: str | None = None
        self.outcome: str | None = None


class LaneRequest:
    """The parts of a request proxy.admit and proxy.Exchange read (proxy.View), as aiohttp would present them."""

    __slots__ = ("auth", "headers", "keep_alive", "length", "method", "path", "raw_path", "remote", "scheme",
                 "version")

    body_exists = False  # the lane takes bodiless requests only

    def __init__(self, method: str, raw_path: str, path: str, headers: CIMultiDict[str], remote: str | None,
                 scheme: str, version: str, keep_alive: bool) -> None:
        self.method = method
        self.raw_path = raw_path
        self.path = path  # decoded, without the query: what the access log shows (aiohttp's rel_url.path)
        self.headers = headers
        self.remote = remote
        self.scheme = scheme
        self.version = version
        self.keep_alive = keep_alive
        self.length = 0  # bytes of the connection's buffer this request takes (its head, any CRLF before it)
        self.auth = False  # `{prefix}/auth` (nginx auth_request), not the catch-all

    @property
    def content(self) -> StreamReader:
        raise AssertionError("the lane takes bodiless requests only")


class Lane:
    """What the lane's connections share: the public app (its proxies once it started) and aiohttp's server."""

    def __init__(self, runner: web.AppRunner, *, cancel_wait: float) -> None:
        self.app = runner.app
        server = runner.server
        assert server is not None, "runner.setup() first"
        self.server = server
        prefix = self.app[keys.CONFIG].server.prefix
        self.own = (prefix, prefix + "/")  # the gateway's own paths: aiohttp's (but for auth_path)
        self.auth_path = prefix + "/auth"
        self.metrics = self.app[keys.METRICS]
        self.cancel_wait = cancel_wait
        self.answers = _AnswerMemo()
        self.answered = 0  # requests the lane answered, and connections it handed over (tests read them)
        self.handed_over = 0
        self._proxies: tuple[Proxy, ...] | None = None

    @property
    def access(self) -> Access:
        return self.app[keys.ACCESS]

    @property
    def sessions(self) -> SessionStore:
        return self.app[keys.SESSIONS]

    @property
    def proxies(self) -> tuple[Proxy, ...]:
        proxies = self._proxies
        if proxies is None:
            proxies = self._proxies = self.app[PROXIES]
        return proxies

    def connection(self, *, fallback: Any, on_lost: Any, header_timeout: float,
                   idle_timeout: float) -> LaneConnection:
        return LaneConnection(self, fallback=fallback, on_lost=on_lost, header_timeout=header_timeout,
                              idle_timeout=idle_timeout)


class LaneConnection(asyncio.Protocol):
    """One client connection, until it closes or is handed over to aiohttp (`fallback()` builds the handler)."""

    __slots__ = (
        "_closing",
        "_current",
        "_drain_waiter",
        "_due",
        "_fallback",
        "_header_timeout",
        "_headers",
        "_idle_timeout",
        "_lane",
        "_last_block",
        "_last_headers",
        "_loop",
        "_memo",
        "_on_lost",
        "_parsed",
        "_parser",
        "_queue",
        "_raw",
        "_reading_paused",
        "_remote",
        "_scheme",
        "_stopped",
        "_task",
        "_task_handler",
        "_timer",
        "_transport",
        "_url",
        "_write_paused",
    )

    def __init__(self, lane: Lane, *, fallback: Any, on_lost: Any, header_timeout: float,
                 idle_timeout: float) -> None:
        self._lane = lane
        self._fallback = fallback
        self._on_lost = on_lost
        self._header_timeout = header_timeout
        self._idle_timeout = idle_timeout
        self._loop = asyncio.get_event_loop()
        self._transport: asyncio.Transport | None = None
        self._parser: httptools.HttpRequestParser | None = None
        self._raw = bytearray()  # received bytes from the start of the first request not answered yet
        self._parsed = 0  # ... of which this many belong to requests parsed whole
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._current: LaneRequest | None = None  # parsed head whose message is not complete yet
        self._queue: list[LaneRequest] = []
        self._task: asyncio.Task[None] | None = None
        self._task_handler = None  # aiohttp's Server.connection_lost reads it (a handler's own task)
        self._stopped = False  # parsing ended: what follows in _raw is aiohttp's
        self._closing = False
        self._reading_paused = False
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._due: float | None = None  # when the connection is closed unless something happens (loop time)
        self._timer: asyncio.TimerHandle | None = None
        self._remote: str | None = None
        self._scheme = "http"
        self._last_block = b"\0"  # the header block of the last request taken (never matches a real one at first)
        self._last_headers: CIMultiDict[str] | None = None  # ... parsed
        self._memo: HeadMemo | None = None  # the upstream header block of the last request relayed

    # ---- asyncio.Protocol --------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self._remote = peer[0] if isinstance(peer, (list, tuple)) else None
        if transport.get_extra_info("sslcontext") is not None:
            self._scheme = "https"
        self._parser = httptools.HttpRequestParser(self)
        self._lane.server.connection_made(cast(web.RequestHandler, self), self._transport)
        self._set_due(self._header_timeout)  # a connection that sends nothing is closed too

    def data_received(self, data: bytes) -> None:
        raw = self._raw
        if not raw and self._task is None and not self._queue:
            self._set_due(self._header_timeout)  # the first bytes of a request: its headers are due
        raw += data
        if self._stopped:
            self._hold()
            return
        parser = self._parser
        assert parser is not None
        try:
            parser.feed_data(data)
        except httptools.HttpParserError:  # _HandOver from a callback, a request llhttp refuses, an upgrade
            self._stopped = True
            self._current = None
        if len(self._queue) > MAX_QUEUED:
            self._pause_reading()
        if self._stopped:
            if self._task is None:
                self._hand_over()
            else:
                self._hold()

    def eof_received(self) -> bool | None:
        return None  # as aiohttp's handler: the transport closes, a request in flight is cancelled

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._closing = True
        self._queue.clear()
        self._lane.server.connection_lost(cast(web.RequestHandler, self), exc)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        task = self._task
        if task is not None and not task.done():
            task.cancel()  # the client went away: the upstream request goes too
        on_lost, self._on_lost = self._on_lost, None
        if on_lost is not None:
            on_lost()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        waiter, self._drain_waiter = self._drain_waiter, None
        wake(waiter)

    # ---- httptools callbacks -----------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._current = self._take()

    def on_message_complete(self) -> None:
        request = self._current
        if request is None:
            raise _HandOver  # llhttp finished a message the lane did not take (cannot happen: checked above)
        self._current = None
        self._parsed += request.length  # a bodiless request ends with its head
        self._queue.append(request)
        if self._task is None:
            self._due = None
            self._task = self._loop.create_task(self._serve_queue())

    def _take(self) -> LaneRequest:
        """The request whose head just ended, if the lane takes it (else _HandOver)."""
        parser = self._parser
        assert parser is not None
        url = self._url
        if not url.startswith(b"/") or len(url) > MAX_LINE or parser.get_method() == b"CONNECT":
            raise _HandOver
        raw = self._raw
        begin = self._parsed
        while raw[begin:begin + 2] == b"\r\n":
            begin += 2
        line_end = raw.find(b"\r\n", begin)
        if raw[line_end - 9:line_end] not in _VERSIONS:  # llhttp also reads RTSP/ and ICE/ requests
            raise _HandOver
        end = raw.find(b"\r\n\r\n", line_end)  # the head is all in: llhttp just ended it
        length = end + 4 - self._parsed  # with any CRLF before the request line
        block = raw[line_end - 9:end]  # the version too: Host is needed in 1.1
        if block == self._last_block:
            # A kept-alive client sends the same headers request after request: the same parsed headers (and
            # so the connection's HeadMemo holds for the upstream's block too). Every check below is on them alone.
            cached = self._last_headers
            assert cached is not None
            return self._request(parser, cached, length)
        headers = self._headers
        if len(headers) > MAX_HEADERS:
            raise _HandOver
        seen: list[bytes] = []
        pairs = []
        spelling = _SPELLING
        for name, value in headers:
            if len(name) > MAX_FIELD or len(value) > MAX_FIELD or b"\0" in value:
                raise _HandOver
            lower = name.lower()
            if lower in _SINGLETON:
                if lower in _NOT_TAKEN or lower in seen:
                    raise _HandOver
                seen.append(lower)
            elif lower in _NOT_TAKEN or lower == b"sec-websocket-key1":  # aiohttp refuses the old WebSocket draft
                raise _HandOver
            # aiohttp's decoding (llhttp leaves the spaces after a value): any other byte is sent on unchanged.
            pairs.append((spelling.get(lower) or name.decode("utf-8", "surrogateescape"),
                          value.rstrip(b" \t").decode("utf-8", "surrogateescape")))
        if b"host" not in seen and parser.get_http_version() == "1.1":
            raise _HandOver  # aiohttp refuses an HTTP/1.1 request without Host
        parsed = CIMultiDict(pairs)
        request = self._request(parser, parsed, length)
        self._last_block, self._last_headers = bytes(block), parsed
        return request

    def _request(self, parser: httptools.HttpRequestParser, headers: CIMultiDict[str], length: int) -> LaneRequest:
        url = self._url
        raw_path = url.decode("utf-8", "surrogateescape")
        path = raw_path.partition("?")[0].partition("#")[0]
        if "%" in path:
            path = URL.build(path=path, encoded=True).path  # aiohttp's rel_url.path
        method = parser.get_method().decode("ascii")
        auth = False
        own = self._lane.own
        if path == own[0] or path.startswith(own[1]):
            # The gateway's own paths are aiohttp's, but for the plainest auth_request check (a query: aiohttp's).
            if path != self._lane.auth_path or method != "GET" or raw_path != path:
                raise _HandOver
            auth = True
        request = LaneRequest(method, raw_path, path, headers, self._remote, self._scheme,
                              parser.get_http_version(), parser.should_keep_alive())
        request.auth = auth
        request.length = length
        return request

    # ---- answering -------------------------------------------------------------------------------------

    async def _serve_queue(self) -> None:
        try:
            await self._serve_all()
        except (ConnectionResetError, OSError):  # a write to a client that has gone
            if self._transport is not None:
                self._transport.close()
        finally:
            self._task = None
        if self._transport is None:
            return
        if self._stopped:
            self._hand_over()
        elif self._closing:
            self._transport.close()
        elif self._raw:
            self._set_due(self._header_timeout)  # part of the next request is in: its headers are due
        else:
            self._set_due(self._idle_timeout)

    async def _serve_all(self) -> None:
        queue = self._queue
        while queue and not self._closing:
            request = queue[0]
            if not await self._serve(request):
                queue.clear()
                self._stopped = True
                break
            if self._transport is None:
                return  # the client went away as the answer went out
            del queue[0]
            del self._raw[:request.length]
            self._parsed -= request.length
            if not request.keep_alive or self._closing:
                queue.clear()
                if self._transport is not None:
                    self._transport.close()
                return
            if self._reading_paused and len(queue) <= MAX_QUEUED // 2:
                self._resume_reading()

    async def _serve(self, request: LaneRequest) -> bool:
        """Answer one request: False (nothing done) when it is aiohttp's after all."""
        started = time.perf_counter()
        request_id = logs.request_id(request.headers.get("X-Request-Id"))
        context = logs.REQUEST_ID.set(request_id)
        line = _Line()
        try:
            if request.auth:
                return await self._auth(request, line)
            return await self._proxy(request, request_id, line)
        finally:
            if line.taken:  # the line errors_middleware writes
                elapsed = time.perf_counter() - started
                self._lane.metrics.request(line.status, elapsed)
                logs.ACCESS.write(request_id, request.method, request.path, line.status, elapsed, request.remote,
                                  line.login, **({"outcome": line.outcome} if line.outcome else {}))
            logs.REQUEST_ID.reset(context)

    async def _proxy(self, request: LaneRequest, request_id: str, line: _Line) -> bool:
        """The catch-all (proxy.handle): admitted and allowed, relayed; else aiohttp's."""
        try:
            proxy, identity, decision = await admit(self._lane.proxies, request)
        except Exception:  # a GatewayError, or a bug: either way aiohttp's page and log line
            return False  # aiohttp answers it again from the start
        if decision.outcome != "allow":
            return False
        line.taken = True
        if isinstance(identity, Identity):
            line.login = identity.login
        self._lane.answered += 1
        exchange = Exchange()
        try:
            memo = self._memo
            if memo is None:
                memo = self._memo = HeadMemo()
            conn = await exchange.send(proxy, request, identity, memo=memo)
            line.status = conn.status
            line.outcome = await self._relay(proxy, request, conn)
        except GatewayError as err:
            line.status = err.status
            if err.status >= 500:
                _app_log.warning("request failed", extra={
                    "request_id": request_id, "path": request.path, "status": err.status, "error": err.code,
                    "cause": err.cause})
            self._answer(request, err, request_id)
        except (asyncio.CancelledError, ConnectionResetError):
            line.status = 500  # as errors_middleware logs a request whose client went away
            raise
        except Exception:
            _app_log.exception("unhandled error", extra={"request_id": request_id})
            line.status = 500
            self._answer(request, GatewayError("The gateway failed to handle this request"), request_id)
        finally:
            await exchange.end()
        return True

    async def _auth(self, request: LaneRequest, line: _Line) -> bool:
        """`{prefix}/auth` (auth_request.auth) when the policy allows: the 202; anything else is aiohttp's."""
        lane = self._lane
        try:
            found, decision, host, uri = await auth_request.check(lane.access, lane.sessions, request)
        except Exception:  # as in _proxy: aiohttp answers it again
            return False
        if decision.outcome != "allow":
            return False
        identity = found if isinstance(found, Identity) else None
        line.taken = True
        line.status = 202
        line.login = identity.login if identity is not None else None
        lane.answered += 1
        self._write_whole(request, 202, list(auth_request.granted(lane.app, identity, host, uri).items()), b"")
        return True

    async def _relay(self, proxy: Proxy, request: LaneRequest, conn: UpstreamConnection) -> str | None:
        """The upstream's response to the client; "truncated" when the upstream failed in the middle of it."""
        status = conn.status
        length = conn.content_length
        method = request.method
        if (length is not None and length <= SMALL_BODY) or method == "HEAD" or status in _EMPTY_STATUS:
            try:
                body = await conn.read_all()
            except UpstreamFailure as exc:
                raise _upstream_error(proxy, "response body", exc) from None
            conn.finish()
            self._relay_whole(proxy, request, conn, body)
            return None
        if conn.failed is not None:  # nothing sent yet: the client may still get an honest 502
            raise _upstream_error(proxy, "response body", conn.failed)
        headers = proxy.policy.relayed_response_headers(conn.headers)
        chunked = length is None and request.version == "1.1"
        keep_alive = request.keep_alive and (length is not None or chunked)
        request.keep_alive = keep_alive
        transport = self._transport
        if transport is None:
            raise ConnectionResetError("the client closed the connection")
        head, _ = _head(request, status, headers, length=length, chunked=chunked, keep_alive=keep_alive,
                        closing=self._closing)
        transport.write(head)
        try:
            while chunk := await conn.read():
                if transport.is_closing():
                    raise ConnectionResetError("the client closed the connection")
                transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
                if self._write_paused:
                    await self._drain()
        except UpstreamFailure as exc:
            # Headers are gone: the only honest signal left is to cut the connection, so the client sees a
            # truncated body instead of a complete-looking one.
            conn.abort()
            log.warning("upstream failed mid-response: the response was cut",
                        extra={"cause": f"{proxy.upstream_host}: {_describe(exc)}"})
            request.keep_alive = False
            transport.close()
            return "truncated"
        conn.finish()
        if chunked:
            transport.write(b"0\r\n\r\n")
        return None

    def _write_whole(self, request: LaneRequest, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        """A response whose body is in hand (aiohttp's web.Response)."""
        transport = self._transport
        if transport is None:
            raise ConnectionResetError("the client closed the connection")
        head, with_body, _ = _whole_head(request, status, headers, body, closing=self._closing)
        transport.write(head + body if with_body and body else head)

    def _relay_whole(self, proxy: Proxy, request: LaneRequest, conn: UpstreamConnection, body: bytes) -> None:
        """An upstream response read whole. Its head is the last one's when the upstream's head and everything
        else that shapes it are the same (Lane.answers): an upstream serving one kind of page sends the same
        head again and again (its Date moves once a second)."""
        transport = self._transport
        if transport is None:
            raise ConnectionResetError("the client closed the connection")
        memo = self._lane.answers
        key = (conn.status, request.method, len(body), request.version, request.keep_alive, self._closing)
        raw = conn.raw_headers
        if memo.key == key and memo.raw == raw:
            head, with_body, request.keep_alive = memo.head, memo.with_body, memo.keep_alive
        else:
            headers = proxy.policy.relayed_response_headers(conn.headers)
            head, with_body, lasting = _whole_head(request, conn.status, headers, body, closing=self._closing)
            if lasting:
                memo.key, memo.raw, memo.head, memo.with_body = key, raw, head, with_body
                memo.keep_alive = request.keep_alive
        transport.write(head + body if with_body and body else head)

    def _answer(self, request: LaneRequest, err: GatewayError, request_id: str) -> None:
        """The page (or JSON) for `err`, as pages.render answers it."""
        status, headers, body = error_answer(err, request_id=request_id, accept=request.headers.get("Accept", ""),
                                             navigating=request.method in ("GET", "HEAD"))
        pairs = [*headers.items(), ("Content-Length", str(len(body)))]
        self._write_whole(request, status, pairs, body)

    async def _drain(self) -> None:
        if self._write_paused and self._transport is not None:
            # The client going away cancels this task, and with it this wait (connection_lost).
            waiter = self._drain_waiter = self._loop.create_future()
            await waiter

    # ---- hand-over, reading, the deadline -------------------------------------------------------------------

    def _hand_over(self) -> None:
        """From the request at the start of the buffer on, the connection is aiohttp's."""
        transport = self._transport
        if transport is None:
            return
        if self._closing:
            transport.close()  # shutting down: aiohttp would not take a new request either
            return
        self._lane.server.connection_lost(cast(web.RequestHandler, self), None)  # the handler registers itself
        self._lane.handed_over += 1
        handler = self._fallback(on_lost=self._on_lost)
        self._on_lost = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        data = bytes(self._raw)
        self._raw = bytearray()
        self._parser = None
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if self._write_paused:
            handler.pause_writing()
        if self._reading_paused:
            self._reading_paused = False
            transport.resume_reading()
        if data:
            handler.data_received(data)

    def _hold(self) -> None:
        if len(self._raw) > MAX_HELD:
            self._pause_reading()

    def _pause_reading(self) -> None:
        if not self._reading_paused and self._transport is not None:
            self._reading_paused = True
            self._transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._reading_paused and self._transport is not None:
            self._reading_paused = False
            self._transport.resume_reading()

    # The timer is lazy (as listener.Connection's): a request only moves the deadline; the one pending timer,
    # when it fires, finds nothing due, or sets itself again for the deadline, or closes the connection.

    def _set_due(self, seconds: float) -> None:
        self._due = self._loop.time() + seconds
        if self._timer is None:
            self._timer = self._loop.call_at(self._due, self._check_due)

    def _check_due(self) -> None:
        self._timer = None
        due = self._due
        if due is None or self._transport is None:
            return
        if self._loop.time() < due:
            self._timer = self._loop.call_at(due, self._check_due)
            return
        self._due = None
        if self._task is None:
            self._transport.close()  # headers not in time, or idle for idle_timeout

    # ---- shutdown, as aiohttp's server drives its handlers -------------------------------------------------

    def close(self) -> None:
        """Stop taking requests: an idle connection closes now, a busy one after its current response."""
        self._closing = True
        if self._task is None and self._transport is not None:
            self._transport.close()

    async def shutdown(self, timeout: float | None = 15.0) -> None:  # noqa: ASYNC109 (aiohttp's signature)
        """Let the request in flight finish within `timeout`, then cancel it and close the connection."""
        self._closing = True
        task = self._task
        if task is not None and timeout:
            await asyncio.wait({task}, timeout=timeout)
        task = self._task
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=self._lane.cancel_wait)
        if self._transport is not None:
            self._transport.close()


def _whole_head(request: LaneRequest, status: int, headers: list[tuple[str, str]], body: bytes, *,
                closing: bool) -> tuple[bytes, bool, bool]:
    """(head, whether the body follows it, whether the head holds for the same upstream head later) of a
    response whose body is in hand: Content-Length as aiohttp's web.Response sets it."""
    empty = status in _EMPTY_STATUS or status < 200 or request.method == "HEAD"
    length = None
    for name, value in headers:
        if len(name) == 14 and name.lower() == "content-length":
            length = int(value)
    if status in _EMPTY_STATUS:
        headers = [(n, v) for n, v in headers if n.lower() != "content-length"]
        length = None
    elif length is None and (body or request.method != "HEAD"):
        length = len(body)
        headers.append(("Content-Length", str(length)))
    head, stamped = _head(request, status, headers, length=length, chunked=False, keep_alive=request.keep_alive,
                          closing=closing, empty=empty)
    return head, not empty, not stamped  # a Date of our own holds for this second only


class _AnswerMemo:
    """The last head the lane made for an upstream response read whole (see LaneConnection._relay_whole)."""

    __slots__ = ("head", "keep_alive", "key", "raw", "with_body")

    def __init__(self) -> None:
        self.key: tuple[Any, ...] = ()
        self.raw: list[tuple[bytes, bytes]] = []
        self.head = b""
        self.with_body = False
        self.keep_alive = False


def _head(request: LaneRequest, status: int, headers: list[tuple[str, str]], *, length: int | None, chunked: bool,
          keep_alive: bool, closing: bool, empty: bool = False) -> tuple[bytes, bool]:
    """The status line and header block of a response, with what aiohttp's response adds to relayed headers:
    the framing (Transfer-Encoding, or Content-Length), a default Content-Type when there is a body, Date,
    Server, and Connection when the connection's fate differs from the version's default; and whether the
    Date is ours."""
    version = request.version
    lines = [f"HTTP/{version} {status} {_REASONS.get(status, '')}"]
    has_type = has_date = has_server = False
    for name, value in headers:
        if len(name) in (4, 6, 12):
            lower = name.lower()
            if lower == "date":
                has_date = True
            elif lower == "server":
                has_server = True
            elif lower == "content-type":
                has_type = True
        lines.append(f"{name}: {value}")
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    if not empty and length != 0 and not has_type:
        lines.append("Content-Type: application/octet-stream")
    if not has_date:
        lines.append(f"Date: {rfc822_formatted_time()}")
    if not has_server:
        lines.append(f"Server: {SERVER_SOFTWARE}")
    keep = keep_alive and not closing
    if keep and version == "1.0":
        lines.append("Connection: keep-alive")
    elif not keep and version == "1.1":
        lines.append("Connection: close")
    if not keep:
        request.keep_alive = False
    lines.append("\r\n")
    return "\r\n".join(lines).encode("utf-8", "surrogateescape"), not has_date
