"""Which upstream a request goes to (SPEC §13): the first `upstreams:` entry whose host and path prefix fit.

Pure: the web layer passes the canonical host (hosts.canonical_host) and the raw path as the client sent it;
the prefix is matched on that raw path, because it is what the chosen upstream receives.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gateway.access.hosts import host_matches
from gateway.config_access import UpstreamRoute


@dataclass(frozen=True, slots=True)
class Target:
    """A routing entry with its matching precomputed."""

    route: UpstreamRoute
    index: int
    base: str  # url without a trailing slash

    @property
    def strip(self) -> str | None:
        """The prefix to cut off the path before it goes upstream, or None."""
        prefix = self.route.path_prefix
        return prefix.rstrip("/") if prefix and self.route.strip_prefix else None


def prefix_matches(prefix: str, raw_path: str) -> bool:
    """`/docs/` matches /docs/...; `/docs` matches /docs, /docs/... and /docs?..., never /docsx."""
    if prefix.endswith("/"):
        return raw_path.startswith(prefix)
    if not raw_path.startswith(prefix):
        return False
    rest = raw_path[len(prefix):]
    return not rest or rest[0] in "/?"


def strip_path(prefix: str, raw_path: str) -> str:
    """The path the upstream sees with `strip_prefix`: /docs/a -> /a, /docs -> /, /docs?x -> /?x."""
    rest = raw_path[len(prefix):]
    return rest if rest.startswith("/") else "/" + rest


class UpstreamTable:
    """The routing table; `select` is called on every proxied request."""

    def __init__(self, routes: Sequence[UpstreamRoute]) -> None:
        self.targets = tuple(Target(r, i, r.upstream.url.rstrip("/")) for i, r in enumerate(routes))
        self.by_host = any(r.host for r in routes)
        # One catch-all entry (the single `upstream:`): no matching needed at all.
        self._only = self.targets[0] if len(routes) == 1 and not routes[0].host and not routes[0].path_prefix \
            else None

    def select(self, host: str | None, raw_path: str) -> Target | None:
        """First entry whose conditions all fit; None for an unknown host (never a fallback to the first)."""
        if self._only is not None:
            return self._only
        for target in self.targets:
            route = target.route
            if route.host is not None and not host_matches(route.host, host):
                continue
            if route.path_prefix is not None and not prefix_matches(route.path_prefix, raw_path):
                continue
            return target
        return None
