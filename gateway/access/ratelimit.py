"""Per-client rate limiting of anonymous sign-in traffic (SPEC §16, `server.signin_rate`).

A token bucket per client address: `count` requests at once, refilled at `count` per `period`. Memory is
bounded: at most `max_clients` buckets are kept, the least recently used forgotten first (a forgotten client
starts again with a full bucket, which is what it would have by then in most cases). IPv6 clients are counted
per /64, the block one subscriber usually holds, so rotating addresses inside it buys nothing.
"""

from __future__ import annotations

import functools
import ipaddress
import math
import time
from collections import OrderedDict
from collections.abc import Callable

MAX_CLIENTS = 10_000


@functools.lru_cache(maxsize=4096)  # parsing an address costs 8 us; a sign-in asks twice for the same one
def client_key(address: str) -> str:
    """The bucket of a client address: the address itself, its /64 for IPv6."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is None:
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped else ip)


class RateLimiter:
    """`check(address)`: 0 when the request may proceed (and is counted), else whole seconds to wait."""

    def __init__(self, count: int, period: float, *, max_clients: int = MAX_CLIENTS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = float(count)
        self.rate = count / period  # tokens per second
        self.max_clients = max_clients
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, updated)

    def __len__(self) -> int:
        return len(self._buckets)

    def check(self, address: str) -> int:
        key = client_key(address)
        now = self._clock()
        tokens, updated = self._buckets.pop(key, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - updated) * self.rate)
        wait = 0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = max(1, math.ceil((1.0 - tokens) / self.rate))
        self._buckets[key] = (tokens, now)
        while len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)
        return wait
