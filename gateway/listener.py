"""The listening sockets of `gateway run` and the connections they accept (SPEC §9, §16).

aiohttp's own site and connection handler leave four gaps that this module closes:

- **Slow headers.** aiohttp's keep-alive timer is armed when a connection opens and after each response, and
  is not moved by incoming bytes, so a client that dribbles its headers (slowloris) holds the connection for the
  whole keep-alive timeout. Here a request's headers must arrive within `server.header_timeout`, counted from
  the connection's opening or from the first byte of the next request; `server.idle_timeout` is aiohttp's
  keep-alive timeout.
- **How many connections.** `server.max_connections` per process: at the limit the accept loop simply stops
  accepting, so new connections wait in the kernel's listen backlog instead of being refused.
- **Uploads at shutdown.** On SIGTERM aiohttp marks every connection as closing and from then on drops the
  bytes that arrive on it, so an upload whose handler is still reading its body stalls until the grace runs
  out. A closing connection here still feeds the body of the request in progress.
- **One shutdown bound.** aiohttp waits its shutdown timeout for a handler, then cancels it and waits the same
  timeout again (twice the grace). Here the handler gets `server.shutdown_grace`, then CANCEL_WAIT to unwind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from gateway.config import Listen
from gateway.errors import GatewayError

log = logging.getLogger("gateway.listener")

# After the grace, how long a cancelled handler may take to unwind before its connection is closed.
CANCEL_WAIT = 0.5
BACKLOG = 1024
# accept() failing for lack of file descriptors: pause rather than spin.
ACCEPT_RETRY = 0.1


@dataclass(frozen=True, slots=True)
class Limits:
    header_timeout: float
    idle_timeout: float
    max_connections: int


class Connection(web.RequestHandler):
    """aiohttp's connection handler with a header deadline, body bytes kept while closing, one shutdown bound.

    It reads a few of aiohttp's private attributes (`_request_in_progress`, `_request_count`, `_messages`,
    `_handler_waiter`, `_close`, `_force_close`); tests/test_listener.py fails if their meaning changes.
    """

    # aiohttp's handler has __slots__: without ours every connection would also carry a __dict__.
    __slots__ = ("_body", "_header_due", "_header_timeout", "_header_timer", "_on_lost")

    def __init__(self, manager: web.Server, *, header_timeout: float, on_lost: Any, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        # A connection holds at most a few pipelined requests: a list, not aiohttp's deque (whose first block
        # alone is 64 slots, about 0.6 KB per connection, idle ones included).
        self._messages = _Pending()  # type: ignore[assignment]
        self._header_timeout = header_timeout
        self._header_due: float | None = None  # when the awaited request headers are due (loop time)
        self._header_timer: asyncio.TimerHandle | None = None
        self._body: Any = None  # the payload of the last request whose headers arrived
        self._on_lost = on_lost

    # -- the header deadline --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm()  # a connection that sends nothing is closed too

    def data_received(self, data: bytes) -> None:
        if data and self._header_due is None and self._between_requests():
            self._arm()  # the first bytes of a request: its headers are due
        count = self._request_count
        if (self._close or self._force_close) and self._request_in_progress and self.transport is not None:
            # aiohttp drops what arrives on a closing connection; the request being handled still needs its body.
            closing, forced = self._close, self._force_close
            self._close = self._force_close = False
            try:
                super().data_received(data)
            finally:
                self._close, self._force_close = self._close or closing, self._force_close or forced
        else:
            super().data_received(data)
        if self._request_count != count:  # a request's headers are complete
            self._disarm()
            if self._messages:
                self._body = self._messages[-1][1]

    def _between_requests(self) -> bool:
        """True unless the bytes arriving now belong to a request body or an upgraded connection."""
        if self._upgraded or self._payload_parser is not None:
            return False
        return self._body is None or self._body.is_eof()

    # The timer is lazy: a request only moves the deadline, and the one pending timer, when it fires, either
    # finds nothing due, or sets itself again for the deadline, or closes the connection. A busy keep-alive
    # connection thus costs one timer per header_timeout, not a timer set and cancelled per request.

    def _arm(self) -> None:
        self._header_due = self._loop.time() + self._header_timeout
        if self._header_timer is None:
            self._header_timer = self._loop.call_at(self._header_due, self._headers_due)

    def _disarm(self) -> None:
        self._header_due = None

    def _headers_due(self) -> None:
        self._header_timer = None
        due = self._header_due
        if due is None:
            return
        if self._loop.time() < due:
            self._header_timer = self._loop.call_at(due, self._headers_due)
            return
        self._header_due = None
        if self.transport is not None and not self._request_in_progress:
            log.debug("closing a connection that did not send its request headers in time",
                      extra={"timeout_s": self._header_timeout})
            self.force_close()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        self._body = None
        try:
            super().connection_lost(exc)
        finally:
            on_lost, self._on_lost = self._on_lost, None
            if on_lost is not None:
                on_lost()

    # -- what an idle keep-alive connection keeps --

    async def _handle_request(self, request: Any, start_time: Any, request_handler: Any) -> Any:
        """aiohttp's connection loop keeps its last request and response referenced while it waits for the
        next request: with 10,000 idle keep-alive connections, 10,000 of each. Once the response is sent,
        what they carry for the handler (the request's state, cached values, addresses and route, the response's
        headers and body) is of no use: dropped here (bench/memory.py: about 2 KB per idle connection)."""
        resp, reset = await super()._handle_request(request, start_time, request_handler)
        request._state.clear()
        request._cache.clear()
        request._transport_peername = request._transport_sockname = request._match_info = None
        resp.headers.clear()
        if isinstance(resp, web.Response):
            resp._body = None  # a small proxied body, a page
        return resp, reset

    # -- shutdown --

    async def shutdown(self, timeout: float | None = 15.0) -> None:  # noqa: ASYNC109 (aiohttp's signature)
        """Let the request in progress finish within `timeout`, then cancel it (CANCEL_WAIT) and close."""
        if self._request_in_progress and timeout:
            waiter = self._handler_waiter = self._loop.create_future()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(waiter), timeout)
            if self._handler_waiter is waiter:
                self._handler_waiter = None
        await super().shutdown(CANCEL_WAIT)


class _Pending(list):  # type: ignore[type-arg]
    """The queue of parsed requests aiohttp keeps per connection (append, popleft, len)."""

    __slots__ = ()

    def popleft(self) -> Any:
        return self.pop(0)


class Listener:
    """Accepts connections on `listen` for a set-up AppRunner, at most `max_connections` open at once."""

    def __init__(self, runner: web.AppRunner, listen: Listen, limits: Limits, *, what: str,
                 reuse_port: bool = False, lane: Any = None) -> None:
        self.runner = runner
        # The public listener's proxied path has a server of its own (web/fast_lane.py), which hands a
        # connection over to aiohttp's handler (`connection` below) for anything else.
        self.lane = lane
        self.listen = listen
        self.limits = limits
        self.what = what
        self.reuse_port = reuse_port
        self.sockets: list[socket.socket] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._room = asyncio.Semaphore(limits.max_connections)

    @property
    def port(self) -> int:
        return int(self.sockets[0].getsockname()[1])

    async def start(self) -> None:
        """Listen, or a GatewayError naming the address and what to check."""
        try:
            self.sockets = _bind(self.listen, reuse_port=self.reuse_port)
        except OSError as exc:
            raise GatewayError(f"cannot listen on {self.listen} ({self.what}): {exc.strerror or exc}; is another "
                               f"process using the port? Check {self.what}.") from None
        self._tasks = [asyncio.create_task(self._accept(sock)) for sock in self.sockets]

    def close(self) -> None:
        """Stop accepting: the sockets close, so new connections are refused (open ones carry on)."""
        for task in self._tasks:
            task.cancel()
        for sock in self.sockets:
            sock.close()

    async def _accept(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        server = self.runner.server
        assert server is not None, "runner.setup() first"
        limits = self.limits

        def connection(on_lost: Any = self._room.release) -> Connection:
            return Connection(server, loop=loop, header_timeout=limits.header_timeout, on_lost=on_lost,
                              keepalive_timeout=limits.idle_timeout, access_log=None)

        factory: Any = connection
        lane = self.lane
        if lane is not None:
            def factory() -> asyncio.Protocol:
                return lane.connection(fallback=connection, on_lost=self._room.release,  # type: ignore[no-any-return]
                                       header_timeout=limits.header_timeout, idle_timeout=limits.idle_timeout)

        while True:
            await self._room.acquire()  # at the limit, new connections wait in the listen backlog
            try:
                conn, _ = await loop.sock_accept(sock)
            except OSError as exc:
                self._room.release()
                log.warning("accept failed", extra={"listener": self.what, "error": exc.strerror or str(exc)})
                await asyncio.sleep(ACCEPT_RETRY)
                continue
            except BaseException:
                self._room.release()
                raise
            try:
                await loop.connect_accepted_socket(factory, conn)
            except OSError:  # the client went away before we set it up
                conn.close()
                self._room.release()


def _bind(listen: Listen, *, reuse_port: bool) -> list[socket.socket]:
    """One listening socket per address of `listen.host` (as asyncio's create_server does)."""
    infos = socket.getaddrinfo(listen.host or None, listen.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(BACKLOG)
            sock.setblocking(False)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets
