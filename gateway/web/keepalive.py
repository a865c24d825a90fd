"""Reusing upstream connections safely (SPEC §7).

An upstream closes a kept-alive connection after its own idle timeout, which it may advertise in
`Keep-Alive: timeout=N`. A request sent on a connection the upstream is closing at that very moment fails
before any response byte; aiohttp's client retries it once when the method is idempotent, a POST gets a 502.
Two defences, both here so the proxy's request path stays as it is:

- `UpstreamResponse` reads the advertised timeout and `UpstreamConnector` never hands out a pooled connection
  idle for longer than that, less a margin (REUSE_MARGIN): the upstream will not be closing it.
- `may_retry` says when the proxy may send a failed non-idempotent request again: only when the connection was
  reused (the upstream's close crossed our request) and not a byte of its body had been taken from the client
  (nothing was sent that the upstream could have acted on, and nothing is lost by sending it again).

Both use aiohttp's connector internals (`_get`, `_conns`); tests/test_upstream_keepalive.py stages each race.
"""

from __future__ import annotations

import re
from contextvars import ContextVar
from time import monotonic
from typing import Any

import aiohttp
from multidict import CIMultiDictProxy

# Reuse a connection only while it has been idle for less than the advertised timeout minus this much (half the
# timeout when that is shorter): the upstream's close timer and ours do not start at the same instant.
REUSE_MARGIN = 0.5
_TIMEOUT = re.compile(r"(?:^|[,;\s])timeout\s*=\s*(\d+)", re.IGNORECASE)
_IDLE_LIMIT = "gateway_idle_limit"  # set on a connection's protocol object by UpstreamResponse

# Whether the current task's last upstream request went out on a pooled (reused) connection.
_REUSED: ContextVar[bool] = ContextVar("upstream_connection_reused", default=False)


def reuse_limit(headers: CIMultiDictProxy[str]) -> float | None:
    """How long a connection may idle before we stop reusing it, from `Keep-Alive: timeout=N`; None when the
    upstream advertises nothing."""
    value = headers.get("Keep-Alive")
    if not value:
        return None
    m = _TIMEOUT.search(value)
    if m is None:
        return None
    seconds = float(m.group(1))
    return seconds - min(REUSE_MARGIN, seconds / 2)


class UpstreamResponse(aiohttp.ClientResponse):
    """Notes the upstream's advertised keep-alive timeout on the connection that carried the response."""

    async def start(self, connection: aiohttp.connector.Connection) -> aiohttp.ClientResponse:
        protocol = connection.protocol  # gone from `connection` once an empty body releases it in start()
        response = await super().start(connection)
        limit = reuse_limit(self.headers)
        if limit is not None and protocol is not None:
            setattr(protocol, _IDLE_LIMIT, limit)
        return response


class UpstreamConnector(aiohttp.TCPConnector):
    """aiohttp's connector, dropping pooled connections idle past their upstream's advertised timeout."""

    async def _get(self, key: Any, traces: list[Any]) -> Any:
        conns = self._conns.get(key)
        if conns:
            now = monotonic()
            # The pool hands out its oldest idle connection first (FIFO): drop those past their limit.
            while conns:
                protocol, released = conns[0]
                limit = getattr(protocol, _IDLE_LIMIT, None)
                if limit is None or now - released < limit:
                    break
                conns.popleft()
                protocol.close()
            if not conns:
                del self._conns[key]
        connection = await super()._get(key, traces)
        _REUSED.set(connection is not None)
        return connection


# RFC 9110 §9.2.2; aiohttp's client retries these once by itself on a connection that died.
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
# What a connection that died under a request raises before the response (the retryable kind).
CONNECTION_DIED = (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)


def may_retry(method: str, *, body_started: bool) -> bool:
    """A non-idempotent request failed with CONNECTION_DIED: may it be sent again, once?"""
    return method not in IDEMPOTENT and not body_started and _REUSED.get()
