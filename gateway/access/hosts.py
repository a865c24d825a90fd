"""Host matching for upstreams and policy rules (SPEC §13): one reading of the Host header for both.

The request's host is compared without its port and without a trailing dot, lower-cased: "Grafana.example.com.:8443"
is grafana.example.com, so no spelling of a host can reach another upstream or skip a rule written for it.
A Host that is not a plain host[:port] matches no host condition at all.
"""

from __future__ import annotations

import re
from functools import lru_cache

_HOST = re.compile(r"([a-z0-9_-]+(?:\.[a-z0-9_-]+)*)\.?(?::[0-9]{1,5})?")
_IPV6 = re.compile(r"(\[[0-9a-f:.]+\])(?::[0-9]{1,5})?")


@lru_cache(maxsize=1024)
def canonical_host(value: str) -> str | None:
    """The host part of a Host header value, lower-case, no port, no trailing dot; None when malformed."""
    text = value.strip().lower()
    m = _HOST.fullmatch(text) or _IPV6.fullmatch(text)
    return m.group(1) if m else None


def host_matches(pattern: str, host: str | None) -> bool:
    """`pattern` is a configured host ("a.example.com") or domain (".example.com": it and its subdomains)."""
    if host is None:
        return False
    if pattern.startswith("."):
        return host == pattern[1:] or host.endswith(pattern)
    return host == pattern
