"""One HTTP/1.1 connection to an upstream, parsed as its bytes arrive (the protocol half of upstream_client.py).

The parser is `httptools`, the Python binding of llhttp (Node.js's HTTP parser, in C) that uvicorn uses:
- it is strict about framing by default: Content-Length together with Transfer-Encoding, two different
  Content-Lengths, a bad chunk size, bare LF and the like are errors (a 502 here), never guessed at, so no
  response can be read two ways (request smuggling's mirror image);
- it is fast (a C callback per header and per body piece, no Python per byte) and handles 1xx responses,
  204/304 and keep-alive rules (HTTP/1.0, `Connection: close`) itself;
- it is maintained (MagicStack, wheels for current CPython on Linux, macOS and Windows).
Alternatives weighed: h11 (pure Python, several times the CPU per message on this path), aiohttp's own C
parser (a private API of the very client this replaces), picohttpparser bindings (unmaintained). llhttp as
bound by httptools has two gaps, filled here: it cannot be told that a response answers HEAD (we stop
reading after its headers and start a fresh parser), and it has no end-of-input call (a close-delimited body
ends when the connection closes, decided here from the headers).

Flow control both ways, with no timer of its own:
- response body: pieces are queued until the relay takes them; past READ_HIGH bytes queued, reading from the
  upstream socket pauses (`transport.pause_reading`) and resumes when the relay takes the queue, so an upstream
  faster than the client fills the kernel's buffers, not ours;
- request body: `drain()` waits while the transport's write buffer is over its high-water mark
  (`pause_writing`/`resume_writing`), so a client faster than the upstream is held back in the same way.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, cast

import httptools

from gateway.web.keepalive import reuse_limit_of

if TYPE_CHECKING:
    from gateway.web.upstream_client import UpstreamPool

# Response body bytes queued before reading from the upstream pauses (one read may add up to 256 KiB more).
READ_HIGH = 256 * 1024
# A response head (status line excluded) larger than this is refused, as aiohttp's client refused fields
# over 8 KiB: an upstream must not be able to make the gateway hold an endless header.
MAX_HEAD = 64 * 1024
# Keep-Alive (10), Content-Length (14), Transfer-Encoding (17): the only response headers read here.
_FRAMING_LENGTHS = frozenset((10, 14, 17))


def wake(waiter: asyncio.Future[None] | None) -> None:
    """Let whoever waits on `waiter` (a drain, a body read) go on, unless it gave up already."""
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


class UpstreamFailure(Exception):
    """The upstream exchange failed; `str()` says how, for the log line (never for the client)."""


class ConnectionDied(UpstreamFailure):
    """The connection closed before the response's headers. `reused`: it had carried an earlier response;
    `answered`: some byte of this response had arrived (then the request reached the upstream for sure)."""

    def __init__(self, message: str, *, reused: bool, answered: bool) -> None:
        super().__init__(message)
        self.reused = reused
        self.answered = answered


class ProtocolViolation(UpstreamFailure):
    """The upstream's bytes are not a well-formed HTTP/1.1 response."""


class BodyCut(UpstreamFailure):
    """The connection closed before the end of a response body whose end was announced."""


class UpstreamConnection(asyncio.Protocol):
    """One connection, carrying one exchange at a time: `start`, `response`, `read` ... `finish` (or `abort`)."""

    def __init__(self, pool: UpstreamPool, loop: asyncio.AbstractEventLoop) -> None:
        self.pool = pool
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reused = False  # has carried a response before the current one
        self.idle_since = 0.0
        self.idle_limit = pool.keepalive  # lowered by the upstream's `Keep-Alive: timeout=N`
        self.busy = False
        self._parser = httptools.HttpResponseParser(self)
        # The current exchange (reset by start()).
        self.status = 0
        self.raw_headers: list[tuple[bytes, bytes]] = []  # the final response's header lines, as parsed
        self._headers: list[tuple[str, str]] | None = []
        self._raw: list[tuple[bytes, bytes]] = []  # the head being parsed
        self.content_length: int | None = None
        self.keep_alive = False
        self._head_bytes = 0
        self._chunked = False
        self._is_head = False
        self._final = False  # the final (non-1xx) response's headers are in
        self._complete = False  # ... and its body too
        self._answered = False
        self._request_done = False
        self._error: UpstreamFailure | None = None
        self._headers_waiter: asyncio.Future[None] | None = None
        self._body: list[bytes] = []
        self._buffered = 0
        self._body_waiter: asyncio.Future[None] | None = None
        self._reading_paused = False
        self._writing_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None

    @property
    def headers(self) -> list[tuple[str, str]]:
        """The final response's headers, decoded as aiohttp decodes them (surrogateescape): any byte the upstream
        sent is sent on unchanged."""
        headers = self._headers
        if headers is None:
            headers = self._headers = [
                (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
                for name, value in self.raw_headers]
        return headers

    # ---- the exchange, as the relay drives it ------------------------------------------------------------

    def start(self, head: bytes, *, is_head: bool, has_body: bool) -> None:
        """Send a request head (the whole head in one write); its body, if any, follows with write/drain."""
        self.busy = True
        self.status = 0
        self.raw_headers = []
        self._headers = []
        self._raw = []
        self.content_length = None
        self.keep_alive = False
        self._head_bytes = 0
        self._chunked = False
        self._is_head = is_head
        self._final = self._complete = self._answered = False
        self._request_done = not has_body
        self._error = None
        self._headers_waiter = self.loop.create_future()
        self._body = []
        self._buffered = 0
        assert self.transport is not None
        self.transport.write(head)

    async def response(self) -> None:
        """Wait for the final response's headers (status, headers, content_length, keep_alive)."""
        if not self._final:
            waiter = self._headers_waiter  # carries the failure, if one came first
            assert waiter is not None
            await waiter

    def write(self, data: bytes) -> None:
        """A piece of the request body, framed by the caller."""
        if self.transport is None or self.closed:
            raise ConnectionResetError("the upstream closed the connection")
        self.transport.write(data)

    async def drain(self) -> None:
        """Wait while the upstream is not taking the request body as fast as it comes."""
        if self.closed:
            raise ConnectionResetError("the upstream closed the connection")
        if self._writing_paused:
            waiter = self._drain_waiter = self.loop.create_future()
            await waiter

    @property
    def failed(self) -> UpstreamFailure | None:
        """The failure that ended the exchange, if one did (a body may fail before the relay reads it)."""
        return self._error

    def request_sent(self) -> None:
        self._request_done = True

    async def read(self) -> bytes:
        """The response body queued so far (waiting for some), b"" at its end; BodyCut if it was cut."""
        while not self._body:
            if self._complete:
                return b""
            if self._error is not None:
                raise self._error
            waiter = self._body_waiter = self.loop.create_future()
            await waiter
        body = self._body
        data = body[0] if len(body) == 1 else b"".join(body)
        self._body = []
        self._buffered = 0
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()
        return data

    async def read_all(self) -> bytes:
        """The whole response body (callers use it only for bodies known to be small)."""
        if self._complete:  # the usual case: the body came with the headers
            body = self._body
            self._body = []
            self._buffered = 0
            return body[0] if len(body) == 1 else b"".join(body)
        parts = []
        while data := await self.read():
            parts.append(data)
        return b"".join(parts)

    def finish(self) -> None:
        """The response was relayed whole: pool the connection if it can carry another, else close it."""
        if not self.busy:
            return
        self.busy = False
        if self._complete and self._request_done and self.keep_alive and not self.closed:
            self.reused = True
            self.pool.release(self)
        else:
            self.close()

    def abort(self) -> None:
        """Give the connection up mid-exchange (timeout, client gone, failure): the upstream sees it close."""
        self.busy = False
        self.close()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.closed = True

    # ---- asyncio.Protocol ------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's

    def data_received(self, data: bytes) -> None:
        if not self.busy:
            # Bytes nobody asked for (on an idle connection): whatever they are, this connection is spoiled.
            self.close()
            return
        self._answered = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(ProtocolViolation("the upstream switched protocols (101) without being asked to"))
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            self._fail(cause if isinstance(cause, UpstreamFailure) else ProtocolViolation(str(exc)))
        except httptools.HttpParserError as exc:
            self._fail(ProtocolViolation(f"malformed response: {exc}"))
        if self._is_head and self._final:
            # llhttp cannot be told the response answers HEAD: it would wait for the announced body. Nothing
            # may follow the head on this connection, so a fresh parser takes the next response.
            self._parser = httptools.HttpResponseParser(self)

    def eof_received(self) -> bool | None:
        return None  # close our side too: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        was_closed = self.closed
        self.closed = True
        self.transport = None
        self.pool.forget(self)
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_exception(ConnectionResetError("the upstream closed the connection"))
        if not self.busy or was_closed:
            return
        if not self._final:
            why = f": {exc}" if exc is not None else ""
            self._fail(ConnectionDied(f"the upstream closed the connection before answering{why}",
                                      reused=self.reused, answered=self._answered))
        elif not self._complete:
            if self._close_delimited():
                self._complete = True
                self._wake_body()
            else:
                self._fail(BodyCut("the upstream closed the connection before the end of the body"))

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        waiter, self._drain_waiter = self._drain_waiter, None
        wake(waiter)

    # ---- httptools callbacks ---------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._final:
            # A second response to one request (or garbage after the first): this connection is spoiled.
            raise ProtocolViolation("bytes after the end of the response")

    def on_header(self, name: bytes, value: bytes) -> None:
        # Called per header: kept minimal, the head is read once it is complete (on_headers_complete).
        raw = self._raw
        raw.append((name, value))
        self._head_bytes += len(name) + len(value)
        if self._head_bytes > MAX_HEAD:
            raise ProtocolViolation(f"response head over {MAX_HEAD} bytes")

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        raw = self._raw
        self._raw = []
        if status < 200:
            # 100 Continue, 103 Early Hints...: consumed here, as aiohttp's client did (101 ends in HttpParserUpgrade).
            return
        for name, value in raw:
            if len(name) in _FRAMING_LENGTHS:
                self._framing(name.lower(), value)
        self.raw_headers = raw
        self._headers = None  # decoded when asked for: the lane may serve a head it made before (fast_lane.py)
        self.status = status
        self.keep_alive = self._parser.should_keep_alive()
        self._final = True
        if self._is_head:
            self._complete = True
        waiter = self._headers_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _framing(self, lower: bytes, value: bytes) -> None:
        """What Content-Length, Transfer-Encoding and Keep-Alive say about the body and the connection."""
        if lower == b"content-length":
            self.content_length = int(value)  # llhttp checked it: digits only, one value
        elif lower == b"transfer-encoding":
            # The last coding decides (RFC 9112 §6.3): chunked, or the body runs to the close.
            self._chunked = value.rpartition(b",")[2].strip().lower() == b"chunked"
        elif lower == b"keep-alive":
            limit = reuse_limit_of(value.decode("latin-1"))
            if limit is not None:
                self.idle_limit = min(self.pool.keepalive, limit)

    def on_body(self, body: bytes) -> None:
        if self._is_head:
            self.keep_alive = False  # bytes after a HEAD response: nothing can be trusted on this connection
            return
        self._body.append(body)
        self._buffered += len(body)
        if self._buffered > READ_HIGH and not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake_body()

    def on_message_complete(self) -> None:
        if not self._final or self._is_head:
            return  # the end of a 1xx response, or llhttp's own end of a HEAD response
        self._complete = True
        self._wake_body()

    # ---- helpers -----------------------------------------------------------------------------------------

    def _close_delimited(self) -> bool:
        """The body runs until the connection closes: no Content-Length, not chunked, and a body allowed."""
        return (self.content_length is None and not self._chunked and not self._is_head
                and self.status not in (204, 304))

    def _wake_body(self) -> None:
        waiter = self._body_waiter
        if waiter is not None:
            self._body_waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _fail(self, error: UpstreamFailure) -> None:
        if self._error is None:
            self._error = error
        self.keep_alive = False
        self.close()
        for waiter in (self._headers_waiter, self._body_waiter):
            if waiter is not None and not waiter.done():
                waiter.set_exception(error)
        self._body_waiter = None
