"""Reusing upstream connections safely (SPEC §7).

An upstream closes a kept-alive connection after its own idle timeout, which it may advertise in
`Keep-Alive: timeout=N`. A request sent on a connection the upstream is closing at that very moment fails
before any response byte. Two defences, used by upstream_client.py:

- `reuse_limit_of` reads the advertised timeout, and the pool never hands out a connection idle for longer than
  that, less a margin (REUSE_MARGIN): the upstream will not be closing it.
- `may_retry` says when a request that died that way is sent again, once: only when the connection was reused
  (the upstream's close crossed our request), no byte of a response had arrived, and not a byte of the request's
  body had been taken from the client (nothing is lost by sending it again; the body is never buffered to be
  replayed). That holds for any method: an idempotent one may be repeated anyway, and a POST without a body
  is retried as before, when the upstream could not have answered it.

tests/test_upstream_faults.py and tests/test_upstream_client.py stage each race.
"""

from __future__ import annotations

import re

# Reuse a connection only while it has been idle for less than the advertised timeout minus this much (half the
# timeout when that is shorter): the upstream's close timer and ours do not start at the same instant.
REUSE_MARGIN = 0.5
_TIMEOUT = re.compile(r"(?:^|[,;\s])timeout\s*=\s*(\d+)", re.IGNORECASE)


def reuse_limit_of(value: str) -> float | None:
    """How long a connection may idle before we stop reusing it, from a `Keep-Alive` value; None when it
    advertises no timeout."""
    m = _TIMEOUT.search(value)
    if m is None:
        return None
    seconds = float(m.group(1))
    return seconds - min(REUSE_MARGIN, seconds / 2)


def may_retry(*, reused: bool, answered: bool, body_started: bool) -> bool:
    """A request's connection died before its response: may it be sent again, once, on a new connection?"""
    return reused and not answered and not body_started
