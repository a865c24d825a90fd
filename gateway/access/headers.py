"""What crosses the proxy (SPEC §7): hop-by-hop removal, anti-spoofing, forwarding facts, identity injection.

Everything here is pure and runs on every proxied request, so a `HeaderPolicy` is built once from the config
and remembers (in bounded caches) how it treats each header name and each peer address it has seen.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Final

from multidict import CIMultiDict, MultiMapping

from gateway.identity import Anonymous, Identity

if TYPE_CHECKING:
    from gateway.config import Config

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

HOP_BY_HOP: Final = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "transfer-encoding", "upgrade",
})
AUTH_REQUEST_PREFIX: Final = "x-auth-request-"
_NONE_LISTED: Final[frozenset[str]] = frozenset()

# Other spellings of the facts X-Forwarded-* carry: believed from a trusted proxy, dropped from anyone else
# so an upstream that reads them cannot be fooled about the client.
_OTHER_CLIENT_FACTS = frozenset({"forwarded", "x-real-ip"})
# The WebSocket relay negotiates key, version, extensions and subprotocols itself; a client's copies would
# make the upstream agree to things (permessage-deflate) the relay never asked for.
_WEBSOCKET_HANDSHAKE_PREFIX = "sec-websocket-"
_FORWARDED_HOST = re.compile(r"(?:[A-Za-z0-9_.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")
# Header names and peer addresses come from clients: caches are bounded so they cannot be used to fill memory.
_CACHE_SIZE = 1024


class _Kind(enum.IntEnum):
    """How an incoming request header is treated, decided once per header name."""

    # IntEnum rather than Enum: members hash in C, and they key a dict on every request.
    DROP = enum.auto()  # hop-by-hop, Host (we set it), or a spoofed identity header
    FORWARDED_FOR = enum.auto()
    FORWARDED_PROTO = enum.auto()
    FORWARDED_HOST = enum.auto()
    COOKIE = enum.auto()
    CLIENT_FACT = enum.auto()
    WEBSOCKET_HANDSHAKE = enum.auto()
    PASS = enum.auto()


_FIXED_KINDS: Final = {
    "host": _Kind.DROP,
    "x-forwarded-for": _Kind.FORWARDED_FOR,
    "x-forwarded-proto": _Kind.FORWARDED_PROTO,
    "x-forwarded-host": _Kind.FORWARDED_HOST,
    "cookie": _Kind.COOKIE,
    **{name: _Kind.DROP for name in HOP_BY_HOP},
    **{name: _Kind.CLIENT_FACT for name in _OTHER_CLIENT_FACTS},
}


def connection_tokens(headers: MultiMapping[str]) -> frozenset[str]:
    """Lower-case tokens of every Connection header: names the sender declared hop-by-hop."""
    listed = headers.getall("Connection", ())
    if not listed:
        return frozenset()
    return frozenset(t for value in listed for token in value.split(",") if (t := token.strip().lower()))


def hop_by_hop_names(headers: MultiMapping[str]) -> frozenset[str]:
    """Lower-case names that must not cross the proxy: HOP_BY_HOP plus every token of every Connection."""
    return HOP_BY_HOP | connection_tokens(headers)


def spoof_key(name: str) -> str:
    """The form in which header names are compared for spoofing: lower-case, `_` read as `-`."""
    # Many upstream stacks (WSGI/CGI, some nginx setups) map "X_Forwarded_User" onto the same variable as
    # "X-Forwarded-User" (CVE-2025-64484 class), so both spellings are the same header for us.
    return name.lower().replace("_", "-")


def is_spoofed(name: str, identity_header_names: frozenset[str]) -> bool:
    """True when a client-sent header claims to be identity: one of ours, or any `X-Auth-Request-*`."""
    key = spoof_key(name)
    return key in identity_header_names or key.startswith(AUTH_REQUEST_PREFIX)


def auth_response_headers(identity: Identity) -> dict[str, str]:
    """The `X-Auth-Request-*` headers of a 202 answer to nginx auth_request."""
    return {
        "X-Auth-Request-User": identity.login,
        "X-Auth-Request-Email": identity.email,
        "X-Auth-Request-Preferred-Username": identity.login,
        "X-Auth-Request-Groups": identity.groups_csv,
    }


@dataclass(frozen=True, slots=True)
class HeaderPolicy:
    """Header rules built once from config: identity header names, own cookie prefix, trusted proxies."""

    user: str = "X-Forwarded-User"
    email: str = "X-Forwarded-Email"
    preferred_username: str = "X-Forwarded-Preferred-Username"
    groups: str = "X-Forwarded-Groups"
    cookie_prefix: str = "_gateway"
    trusted_proxies: tuple[IPNetwork, ...] = ()
    assertion: str | None = None  # SPEC §13's signed identity header: an identity header like the others
    identity_names: frozenset[str] = field(init=False, repr=False)
    _kind_of: Callable[[str], _Kind] = field(init=False, repr=False, compare=False)
    _trusted_ip: Callable[[str], bool] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.cookie_prefix:
            raise ValueError("cookie_prefix must not be empty: every cookie would be stripped")
        names = frozenset(spoof_key(n) for n in (self.user, self.email, self.preferred_username, self.groups,
                                                 *([self.assertion] if self.assertion else [])))
        object.__setattr__(self, "identity_names", names)
        object.__setattr__(self, "_kind_of", lru_cache(maxsize=_CACHE_SIZE)(self._classify))
        object.__setattr__(self, "_trusted_ip", lru_cache(maxsize=_CACHE_SIZE)(self._parse_and_trust))

    @classmethod
    def from_config(cls, config: Config) -> HeaderPolicy:
        """Policy for `headers.*`, `session.cookie_name` and `server.trusted_proxies`."""
        h = config.headers
        return cls(h.user, h.email, h.preferred_username, h.groups,
                   config.session.cookie_name, tuple(config.server.trusted_proxies), h.assertion)

    auth_response_headers = staticmethod(auth_response_headers)

    def upstream_request_headers(
        self, incoming: MultiMapping[str], *, client_ip: str, scheme: str, host: str,
        identity: Identity | Anonymous | None, pass_host_header: bool, upstream_host: str,
        websocket: bool = False,
    ) -> CIMultiDict[str]:
        """Headers for the upstream request: `client_ip` is the direct peer, `scheme`/`host` our own view."""
        trusted = self.client_ip_is_trusted(client_ip)
        # Names a Connection header lists beyond the standard ones ("keep-alive" is already dropped by kind).
        listed = connection_tokens(incoming) - HOP_BY_HOP if "Connection" in incoming else _NONE_LISTED
        out: CIMultiDict[str] = CIMultiDict()
        out["Host"] = incoming.get("Host", upstream_host) if pass_host_header else upstream_host
        # An untrusted peer's forwarding claims are dropped: not even collected.
        facts: dict[_Kind, list[str]] | None = {
            _Kind.FORWARDED_FOR: [], _Kind.FORWARDED_PROTO: [], _Kind.FORWARDED_HOST: []} if trusted else None
        kind_of = self._kind_of
        for name, value in incoming.items():
            kind = kind_of(name)
            if kind is _Kind.PASS and not listed:  # most headers: straight through
                out.add(name, value)
                continue
            if kind is _Kind.DROP or (listed and name.lower() in listed):
                continue
            if kind is _Kind.PASS or (kind is _Kind.CLIENT_FACT and trusted) or (
                kind is _Kind.WEBSOCKET_HANDSHAKE and not websocket
            ):
                out.add(name, value)
            elif kind is _Kind.COOKIE:
                kept = self.strip_own_cookies(value)
                if kept:
                    out.add(name, kept)
            elif facts is not None and kind in facts:
                facts[kind].append(value)
        self._set_forwarding(out, facts, client_ip, scheme, host)
        if isinstance(identity, Identity):
            self._set_identity(out, identity)
        return out

    def strip_own_cookies(self, cookie_header: str) -> str:
        """A Cookie header value without the gateway's own cookies; the others kept as sent, in order."""
        prefix = self.cookie_prefix
        if prefix not in cookie_header:
            return cookie_header  # nothing of ours: untouched, byte for byte
        # Cookie names cannot hold "=", so a piece starting with the prefix is one of ours; a piece without
        # "=" (a nameless cookie to browsers, a name to some servers) is judged the same way.
        kept = [cookie for cookie in (piece.strip() for piece in cookie_header.split(";"))
                if cookie and not cookie.startswith(prefix)]
        return "; ".join(kept)

    def response_headers(self, upstream: MultiMapping[str]) -> CIMultiDict[str]:
        """Upstream response headers for the client: all but hop-by-hop (Set-Cookie, Location as sent)."""
        drop = hop_by_hop_names(upstream)
        out: CIMultiDict[str] = CIMultiDict()
        for name, value in upstream.items():
            if name.lower() not in drop:
                out.add(name, value)
        return out

    @staticmethod
    def relayed_response_headers(pairs: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
        """`response_headers` for the (name, value) pairs of a parsed response head, in one pass (the proxied
        path's upstream client hands them over as parsed; aiohttp's Response builds its multidict from them)."""
        kept: list[tuple[str, str, str]] = []
        listed: set[str] = set()
        for name, value in pairs:
            lower = name.lower()
            if lower in HOP_BY_HOP:
                if lower == "connection":
                    listed.update(t for token in value.split(",") if (t := token.strip().lower()))
                continue
            kept.append((lower, name, value))
        return [(name, value) for lower, name, value in kept if lower not in listed]

    def client_ip_is_trusted(self, ip: str) -> bool:
        """True when `ip` is inside `server.trusted_proxies`."""
        return bool(self.trusted_proxies) and self._trusted_ip(ip)

    def effective_client(
        self, remote: str, headers: MultiMapping[str], *, scheme: str
    ) -> tuple[str, str, str]:
        """(client address, scheme, host) to report; forwarding headers count only from a trusted peer."""
        host = headers.get("Host", "")
        if not self.client_ip_is_trusted(remote):
            return remote, scheme, host
        proto = _first_value(headers, "X-Forwarded-Proto").lower()
        forwarded_host = _first_value(headers, "X-Forwarded-Host")
        return (
            self._rightmost_untrusted(remote, headers),
            proto if proto in ("http", "https") else scheme,
            forwarded_host if _FORWARDED_HOST.fullmatch(forwarded_host) else host,
        )

    def _classify(self, name: str) -> _Kind:
        # Every name is read as an upstream that folds "_" into "-" reads it: "X_Forwarded_For" is a forwarding
        # claim, "Transfer_Encoding" and "Content_Length" would desynchronise message framing.
        key = spoof_key(name)
        if key == "content-length" and "_" in name:
            return _Kind.DROP
        fixed = _FIXED_KINDS.get(key)
        if fixed is not None:
            return fixed
        if key in self.identity_names or key.startswith(AUTH_REQUEST_PREFIX):
            return _Kind.DROP
        if key.startswith(_WEBSOCKET_HANDSHAKE_PREFIX):
            return _Kind.WEBSOCKET_HANDSHAKE
        return _Kind.PASS

    def _rightmost_untrusted(self, remote: str, headers: MultiMapping[str]) -> str:
        # Each X-Forwarded-For entry was appended by the hop to its right; only entries added by trusted hops
        # are credible, so walk leftwards until the first address that is not one of our proxies.
        entries = [e.strip() for value in headers.getall("X-Forwarded-For", ()) for e in value.split(",")]
        client = remote
        for entry in reversed(entries):
            address = parse_ip(entry)
            if address is None:
                break  # garbage from a hop we cannot vouch for: report the last address we can
            client = str(address)
            if not self._is_trusted(address):
                break
        return client

    def _parse_and_trust(self, ip: str) -> bool:
        address = parse_ip(ip)
        return address is not None and self._is_trusted(address)

    def _is_trusted(self, address: IPAddress) -> bool:
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            mapped = address.ipv4_mapped  # a dual-stack listener reports IPv4 peers as ::ffff:a.b.c.d
            return any(mapped in net or address in net for net in self.trusted_proxies)
        return any(address in net for net in self.trusted_proxies)

    @staticmethod
    def _set_forwarding(out: CIMultiDict[str], trusted_facts: dict[_Kind, list[str]] | None,
                        client_ip: str, scheme: str, host: str) -> None:
        if trusted_facts is None:  # an untrusted peer: our own view only
            out["X-Forwarded-For"] = client_ip
            out["X-Forwarded-Proto"] = scheme
            if host:
                out["X-Forwarded-Host"] = host
            return
        facts = trusted_facts
        out["X-Forwarded-For"] = ", ".join([*facts.get(_Kind.FORWARDED_FOR, ()), client_ip])
        out["X-Forwarded-Proto"] = ", ".join(facts.get(_Kind.FORWARDED_PROTO) or [scheme])
        forwarded_host = ", ".join(facts.get(_Kind.FORWARDED_HOST) or [host])
        if forwarded_host:
            out["X-Forwarded-Host"] = forwarded_host

    def _set_identity(self, out: CIMultiDict[str], identity: Identity) -> None:
        out[self.user] = identity.login
        out[self.email] = identity.email
        out[self.preferred_username] = identity.login
        out[self.groups] = identity.groups_csv


def parse_ip(text: str) -> IPAddress | None:
    """An IP address, also from the `1.2.3.4:port` and `[v6]:port` forms some proxies write; else None."""
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        pass
    if text.startswith("["):
        candidate = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        candidate = text.partition(":")[0]
    else:
        return None
    try:
        return ipaddress.ip_address(candidate)
    except ValueError:
        return None


def _first_value(headers: MultiMapping[str], name: str) -> str:
    # The left-most value was written by the proxy nearest the client, which saw the original request.
    return headers.get(name, "").partition(",")[0].strip()
