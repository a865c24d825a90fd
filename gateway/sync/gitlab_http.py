"""HTTP/1.1 to GitLab for the GitLab client (gitlab.py): keep-alive connections to one GitLab, each request
written in one piece and its answer parsed by llhttp (httptools).

A sign-in makes four GitLab calls (code exchange, user, groups, the revocation of a token), and aiohttp's
client spent more of the gateway's CPU on them than the calls' own work (bench/README.md, sign-ins). This
transport does what those calls need and nothing else: no redirects followed, no cookies, the bodies read
whole (bounded by MAX_BODY), gzip or deflate decoded. It lives in the GitLab session's connector
(`GitLabConnector`, made by `GitLabClient.make_session`), which closes its connections with its own; what still
goes through aiohttp (automatic provisioning's listings, gitlab_tree.py) shares the session as before.

Connections: a reused connection that the server closed while it sat idle (its keep-alive timeout) fails the
request before any byte of an answer; an idempotent request is then sent once more on a new connection, as
aiohttp does (RFC 9112 section 9.3.1), and idle connections are not reused after KEEPALIVE seconds (aiohttp's
default) so that a POST (never resent) seldom meets one. Errors are OSError (ssl.SSLCertVerificationError when
the certificate is not trusted), TimeoutError from the caller's deadline, or ProtocolError.
"""

from __future__ import annotations

import asyncio
import ssl
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

import aiohttp
import httptools
from multidict import CIMultiDict, CIMultiDictProxy

KEEPALIVE: Final = 15.0  # seconds an idle connection may be reused (aiohttp's keepalive_timeout)
MAX_IDLE: Final = 32  # idle connections kept per GitLab (aiohttp's per-host limit is 0, its total 100)
MAX_BODY: Final = 32 * 1024 * 1024  # a GitLab answer larger than this is refused, not buffered
IDEMPOTENT: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})


class ProtocolError(Exception):
    """The answer was not HTTP/1.1 we can read (malformed, too large, cut short)."""


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes


class _Exchange(asyncio.Protocol):
    """One connection; `send` writes a request and waits for the whole answer."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._waiter: asyncio.Future[None] | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._headers: CIMultiDict[str] = CIMultiDict()
        self._body = bytearray()
        self._received = False  # any byte of the current answer
        self._complete = False
        self._headers_done = False
        self._delimited = True  # the answer has a Content-Length or is chunked
        self.keep_alive = False

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not subclasses

    def data_received(self, data: bytes) -> None:
        self._received = True
        if self._waiter is None:  # bytes nobody asked for: the connection cannot be trusted any more
            self.abort()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(ProtocolError("GitLab switched protocols"))
        except httptools.HttpParserError as exc:  # a callback's own error (on_body's limit) is its context
            cause = exc.__context__
            self._fail(cause if isinstance(cause, ProtocolError) else ProtocolError("malformed answer"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._waiter is None or self._waiter.done():
            return
        if self._headers_done and not self._delimited:
            self._finish()  # a close-delimited body ends with the connection
        else:
            self._waiter.set_exception(_Dropped(self._received, exc))

    # llhttp callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.add(name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))

    def on_headers_complete(self) -> None:
        self._headers_done = True
        self._delimited = "Content-Length" in self._headers or "chunked" in self._headers.get(
            "Transfer-Encoding", "").lower()

    def on_body(self, body: bytes) -> None:
        if len(self._body) + len(body) > MAX_BODY:
            raise ProtocolError(f"answer larger than {MAX_BODY} bytes")
        self._body += body

    def on_message_complete(self) -> None:
        self.keep_alive = self._parser.should_keep_alive()
        self._finish()

    # use

    async def send(self, request: bytes) -> Reply:
        assert self.transport is not None and self._waiter is None
        self._waiter = asyncio.get_running_loop().create_future()
        self._received = self._complete = self._headers_done = False
        self.transport.write(request)
        try:
            await self._waiter
        finally:
            self._waiter = None
        status = self._parser.get_status_code()
        headers, body = CIMultiDictProxy(self._headers), bytes(self._body)
        self._parser = httptools.HttpResponseParser(self)
        self._headers, self._body = CIMultiDict(), bytearray()
        return Reply(status, headers, _decoded(headers, body))

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def _finish(self) -> None:
        self._complete = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _fail(self, exc: Exception) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc)
        self.abort()


class _Dropped(ConnectionResetError):
    """The server closed the connection before the answer was complete."""

    def __init__(self, answered: bool, cause: Exception | None) -> None:
        super().__init__("GitLab closed the connection" + (" during its answer" if answered else ""))
        self.answered = answered
        self.__cause__ = cause


def _decoded(headers: CIMultiDictProxy[str], body: bytes) -> bytes:
    encoding = headers.get("Content-Encoding", "").strip().lower()
    if encoding in ("", "identity") or not body:
        return body
    if encoding not in ("gzip", "deflate"):
        raise ProtocolError(f"unsupported Content-Encoding {encoding[:20]!r}")
    try:
        # gzip, or deflate as zlib data (RFC 9110) or, as some servers send it, raw
        wbits = 16 + zlib.MAX_WBITS if encoding == "gzip" else (zlib.MAX_WBITS if body[:1] == b"\x78" else
                                                                 -zlib.MAX_WBITS)
        decoder = zlib.decompressobj(wbits)
        data = decoder.decompress(body, MAX_BODY)
        if decoder.unconsumed_tail:
            raise ProtocolError(f"answer larger than {MAX_BODY} bytes once decoded")
        return data
    except zlib.error:
        raise ProtocolError("an answer whose compression cannot be read") from None


class GitLabHTTP:
    """Requests to one GitLab (its scheme, host and port, from gitlab.url) over pooled connections."""

    def __init__(self, url: str, *, ssl_context: ssl.SSLContext | None, connect_timeout: float,
                 headers: Mapping[str, str]) -> None:
        parts = urlsplit(url)
        self._tls = parts.scheme == "https"
        self._host = parts.hostname or ""
        self._port = parts.port or (443 if self._tls else 80)
        self._ssl = (ssl_context or ssl.create_default_context()) if self._tls else None
        self._connect_timeout = connect_timeout
        host_header = parts.netloc.rpartition("@")[2]
        self._head = "".join(f"{k}: {v}\r\n" for k, v in {"Host": host_header, **headers}.items())
        self._idle: list[_Exchange] = []
        self._closed = False

    async def request(self, method: str, target: str, *, headers: Mapping[str, str] | None = None,
                      body: bytes | None = None) -> Reply:
        """One request; `target` is the path and query, already encoded. The caller bounds the time."""
        head = f"{method} {target} HTTP/1.1\r\n{self._head}"
        for name, value in (headers or {}).items():
            head += f"{name}: {value}\r\n"
        if body is not None or method in ("POST", "PUT", "PATCH"):
            head += f"Content-Length: {len(body or b'')}\r\n"
        request = head.encode("latin-1") + b"\r\n" + (body or b"")
        retry = method in IDEMPOTENT
        while True:
            conn, reused = await self._acquire()
            try:
                reply = await conn.send(request)
            except _Dropped as exc:
                conn.abort()
                if reused and retry and not exc.answered:
                    retry = False  # once, on a new connection (the old one was closed while idle)
                    continue
                raise
            except BaseException:
                conn.abort()  # cancelled or timed out mid-exchange: its state is unknown
                raise
            self._release(conn)
            return reply

    async def _acquire(self) -> tuple[_Exchange, bool]:
        if self._closed:
            raise ConnectionAbortedError("the GitLab client is closed")
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed and now - conn.idle_since < KEEPALIVE:
                return conn, True
            conn.abort()
        async with asyncio.timeout(self._connect_timeout):
            _transport, conn = await asyncio.get_running_loop().create_connection(
                _Exchange, self._host, self._port, ssl=self._ssl,
                server_hostname=self._host if self._tls else None)
        return conn, False

    def _release(self, conn: _Exchange) -> None:
        if conn.closed or not conn.keep_alive or self._closed or len(self._idle) >= MAX_IDLE:
            conn.abort()
            return
        conn.idle_since = time.monotonic()
        self._idle.append(conn)

    def close(self) -> None:
        self._closed = True
        while self._idle:
            self._idle.pop().abort()


class GitLabConnector(aiohttp.TCPConnector):
    """The GitLab session's connector: aiohttp's, plus the GitLabHTTP pool, closed together with it."""

    def __init__(self, http: GitLabHTTP, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.http = http

    async def close(self, *, abort_ssl: bool = False) -> None:
        self.http.close()
        await super().close(abort_ssl=abort_ssl)
