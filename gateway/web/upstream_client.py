"""The upstream HTTP/1.1 client built for relaying (SPEC §7): one keep-alive pool per upstream (SPEC §13).

aiohttp's ClientSession was a quarter of the gateway's CPU under load (issue 11): per request it builds a
ClientRequest and a ClientResponse, a URL, a timer, trace hooks, cookie and redirect machinery, and it
serializes the head in pieces. A relay needs none of it: the head is serialized here in one join and written
in one `transport.write`, the response is parsed by llhttp (upstream_protocol.py says why httptools), and
the bytes go on as they come. WebSockets stay on aiohttp's client (proxy.py).

The pool hands out the most recently used idle connection first (LIFO): the hot ones stay warm and the others
age out. A connection is reused only while it has been idle for less than its limit, `UPSTREAM_KEEPALIVE`
or the upstream's advertised `Keep-Alive: timeout=N` less a margin (keepalive.py), checked when it is taken;
a connection the upstream closes while idle leaves the pool at once (connection_lost). So there is no timer
per request and none per connection; the header deadline is the proxy's Deadlines sweep.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterable
from urllib.parse import urlsplit

from gateway.errors import BadRequest
from gateway.web.upstream_protocol import UpstreamConnection, UpstreamFailure

# Idle upstream connections are dropped before the usual 5 s keep-alive of upstream servers (uvicorn, Node),
# so a request rarely lands on a connection the upstream is closing at that very moment.
UPSTREAM_KEEPALIVE = 4.0
# Idle connections kept per upstream; more are closed when they come back (the pool never limits how many
# requests run at once, like aiohttp's limit=0 before it).
MAX_IDLE = 1024


class ConnectFailed(UpstreamFailure):
    """No connection could be opened (refused, unreachable, name unknown, connect_timeout)."""


class UpstreamPool:
    """Keep-alive connections to one upstream URL."""

    def __init__(self, url: str, *, connect_timeout: float, keepalive: float = UPSTREAM_KEEPALIVE) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or ""
        self.secure = parts.scheme == "https"
        self.port = parts.port or (443 if self.secure else 80)
        self.netloc = parts.netloc
        self.path = parts.path.rstrip("/")  # prefixed to every request target
        self.connect_timeout = connect_timeout
        self.keepalive = keepalive
        self._ssl: ssl.SSLContext | None = ssl.create_default_context() if self.secure else None
        self._idle: list[UpstreamConnection] = []
        self._open: set[UpstreamConnection] = set()

    def take(self) -> UpstreamConnection | None:
        """An idle connection young enough to reuse, if there is one (else `connect`)."""
        idle = self._idle
        if idle:
            now = idle[-1].loop.time()
            while idle:
                conn = idle.pop()
                if now - conn.idle_since < conn.idle_limit and not conn.closed:
                    return conn
                conn.close()
        return None

    async def acquire(self) -> UpstreamConnection:
        """An idle connection young enough to reuse, or a new one."""
        return self.take() or await self.connect()

    async def connect(self) -> UpstreamConnection:
        """A new connection (a retry never takes a pooled one: it could be dying too)."""
        loop = asyncio.get_running_loop()
        try:
            # A timer only when a connection is opened, never per request.
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: UpstreamConnection(self, loop), self.host, self.port, ssl=self._ssl,
                    server_hostname=self.host if self.secure else None)
        except TimeoutError:
            raise ConnectFailed(f"connect to {self.netloc}: no connection within "
                                f"{self.connect_timeout:g} s (upstream.connect_timeout)") from None
        except OSError as exc:
            raise ConnectFailed(f"connect to {self.netloc}: {exc.strerror or exc} ({type(exc).__name__})") from None
        self._open.add(conn)
        return conn

    def release(self, conn: UpstreamConnection) -> None:
        """`conn` finished an exchange cleanly and may carry another."""
        idle = self._idle
        if len(idle) >= MAX_IDLE:
            conn.close()
            return
        conn.idle_since = conn.loop.time()
        idle.append(conn)

    def forget(self, conn: UpstreamConnection) -> None:
        """`conn` closed (either side): out of the pool."""
        self._open.discard(conn)
        if self._idle and conn in self._idle:
            self._idle.remove(conn)

    async def close(self) -> None:
        """Close every connection, idle or not (at shutdown, after in-flight requests had their grace)."""
        for conn in list(self._open):
            conn.close()
        self._idle.clear()
        # Let the transports deliver connection_lost before the loop goes away.
        await asyncio.sleep(0)


def request_head(method: str, target: str, headers: Iterable[tuple[str, str]]) -> bytes:
    """The request line and header block, ready for one write."""
    return request_line(method, target) + header_block(headers)


def request_line(method: str, target: str) -> bytes:
    """`METHOD target HTTP/1.1` and its line break (the target as the client sent it, which no parser lets hold
    a line break; checked once more, as every head is)."""
    line = f"{method} {target} HTTP/1.1\r\n"
    if line.count("\n") != 1 or line.count("\r") != 1:
        raise BadRequest("The request target holds a line break")
    return line.encode("utf-8", "surrogateescape")


def header_block(headers: Iterable[tuple[str, str]]) -> bytes:
    """The header lines and the empty line that ends a head.

    Names and values come from the client's parsed request (the parser refused CR and LF in them) and from our
    own config and identity (checked when they were read); one count of line breaks over the whole block is the
    last guard that no value could start a header or a request of its own (response splitting's mirror image).
    """
    lines = [*map(": ".join, headers), "", ""]
    text = "\r\n".join(lines)
    if text.count("\n") != len(lines) - 1 or text.count("\r") != len(lines) - 1:
        raise BadRequest("A request header holds a line break")
    # aiohttp's encoding of what its parser decoded with surrogateescape: the bytes the client sent.
    return text.encode("utf-8", "surrogateescape")
