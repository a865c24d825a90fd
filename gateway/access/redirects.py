"""Post-login and post-logout redirect validation (SPEC §4): is this `rd` safe to put in `Location`?

A target is accepted only when a browser resolving it against `https://<own host>/` lands on our own host
or an allowed domain, AND no later hop (an upstream that decodes once more, a page that reads `?next=`) could
read it as somewhere else. Rather than re-implement every browser quirk (backslashes as slashes, tabs dropped,
extra slashes skipped, percent-decoded hosts), we accept a narrow, unambiguous shape and refuse the rest:

    /path[?query][#fragment]                          a local path in normal form
    http(s)://host[:port][/path][?query][#fragment]   host = own host or an allowed domain, no userinfo

Ports follow oauth2-proxy's rule (SPEC §16): the gateway's own host accepts only the port of `public_url`
(its scheme's default when it names none); an allowed domain listed without a port accepts only the target
scheme's default port; `host:port` accepts that port and `host:*` any port. Another port on an allowed host
is another service (a debug server on 127.0.0.1:1), not us.

The value returned is the very string that was checked; it is never decoded or re-encoded.
"""

from __future__ import annotations

import ipaddress
import re
import string
from collections.abc import Sequence
from urllib.parse import unquote

from gateway.access.routes import normalized_path

MAX_LENGTH = 2048
FALLBACK = "/"

_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")
_DNS_NAME = re.compile(r"[a-z0-9_-]+(?:\.[a-z0-9_-]+)*")
_PORT = re.compile(r"[0-9]{1,5}")
_DEFAULT_PORTS = {"http": 80, "https": 443}
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
# RFC 3986 path/query/fragment characters. Browsers read "\" as "/", drop tabs and newlines anywhere and trim
# controls and spaces, which is how "/\evil.com", "java<TAB>script:" and "/<TAB>/evil.com" pass naive checks;
# none of those characters (nor quotes, angle brackets, braces or non-ASCII) is accepted at all.
_REFERENCE_CHARS = frozenset(string.ascii_letters + string.digits + "-._~" + ":/?#@" + "!$&'()*+,;=" + "%")


def safe_redirect(rd: str | None, *, own_host: str, allowed_domains: Sequence[str] = ()) -> str:
    """Return `rd` unchanged when it is a safe redirect target, else "/"."""
    if rd is not None and _is_safe(rd, own_host, allowed_domains):
        return rd
    return FALLBACK


def _is_safe(rd: str, own_host: str, allowed_domains: Sequence[str]) -> bool:
    if not rd or len(rd) > MAX_LENGTH or len(rd.encode("utf-8", "surrogatepass")) > MAX_LENGTH:
        return False
    if rd.startswith("/"):
        return _is_safe_reference(rd)
    return _is_safe_absolute(rd, own_host, allowed_domains)


def _is_safe_absolute(rd: str, own_host: str, allowed_domains: Sequence[str]) -> bool:
    scheme = _SCHEME.match(rd)
    if scheme is None or scheme.group(1).lower() not in ("http", "https"):
        return False
    rest = rd[scheme.end():]
    # "https:evil.com" is a relative path to a browser on an https page but a host to one on http; and
    # "https:///evil.com" skips the extra slash (its empty host is refused below). Two slashes, then a host.
    if not rest.startswith("//"):
        return False
    authority, tail = _split_authority(rest[2:])
    split = _split_host_port(authority)
    host = None if split is None else _canonical_host(split[0])
    if split is None or host is None:
        return False
    port = int(split[1]) if split[1] else _DEFAULT_PORTS[scheme.group(1).lower()]
    if not _host_is_allowed(host, port, scheme.group(1).lower(), own_host, allowed_domains):
        return False
    return not tail or _is_safe_reference(tail if tail.startswith("/") else "/" + tail)


def _split_authority(text: str) -> tuple[str, str]:
    for index, ch in enumerate(text):
        if ch in "/?#":
            return text[:index], text[index:]
    return text, ""


def _is_safe_reference(ref: str) -> bool:
    """`ref` starts with "/": a path in normal form, then a query/fragment no later hop reads as a URL."""
    if not all(ch in _REFERENCE_CHARS for ch in ref) or _BAD_ESCAPE.search(ref):
        return False
    cut = min((i for i in (ref.find("?"), ref.find("#")) if i >= 0), default=len(ref))
    path, rest = ref[:cut], ref[cut:]
    # A normal-form path has no "//" (scheme-relative to browsers), no dot segments, no encoded "/" or "\".
    # "%25" decodes to a literal "%" that becomes a new escape for a hop that decodes twice.
    if normalized_path(path) is None or "%25" in path:
        return False
    # "/login?next=%2F%2Fevil.com" is local to a browser, but the page behind it may redirect again.
    again = unquote(rest)
    return "//" not in again and "\\" not in again and not any(ch < " " or ch == "\x7f" for ch in again)


def _split_host_port(authority: str, *, wildcard: bool = False) -> tuple[str, str | None] | None:
    """(host, port text or None); None when it is not a plain host[:port].

    Userinfo ("allowed.com@evil.com"), escapes a browser would decode ("evil%2ecom"), backslashes and spaces
    all fail the host shape, as does the empty host of "https:///evil.com". `wildcard` admits the port "*" of
    a configured `host:*`.
    """
    if authority.startswith("["):
        end = authority.find("]")
        host, after = authority[: end + 1], authority[end + 1:]
        if end < 0 or (after and not after.startswith(":")):
            return None
        port = after[1:] if after else None
    else:
        host, sep, port_text = authority.partition(":")
        port = port_text if sep else None
    if port is not None and not (wildcard and port == "*") and (not _PORT.fullmatch(port) or int(port) > 65535):
        return None
    return host, port


def _canonical_host(host: str) -> str | None:
    if host.startswith("["):
        try:
            return f"[{ipaddress.IPv6Address(host[1:-1]).compressed}]"
        except ValueError:
            return None
    if not host.isascii():
        return _idna_host(host)
    host = host.lower()
    return host if _DNS_NAME.fullmatch(host) else None


def _idna_host(host: str) -> str | None:
    """Punycode of an internationalized host, only when it is in the one form every browser agrees on."""
    try:
        ascii_host = host.encode("idna").decode("ascii").lower()
        round_trip = ascii_host.encode("ascii").decode("idna")
    except UnicodeError:
        return None
    # Python's IDNA 2003 folds "ß" to "ss", "。" to "." and full-width letters to ASCII, where browsers
    # (UTS 46) may not: a host that does not survive the round trip could name a different domain to them.
    if round_trip != host.lower():
        return None
    return ascii_host if _DNS_NAME.fullmatch(ascii_host) else None


def _host_is_allowed(host: str, port: int, scheme: str, own_host: str, allowed_domains: Sequence[str]) -> bool:
    """`host` (canonical) with its effective `port` is the gateway's own origin or an allowed domain."""
    own = _configured(own_host)
    # Our own host: only public_url's port (or, when it names none, the target scheme's default port).
    if own is not None and host == own[0] and _port_allowed(port, scheme, own[1]):
        return True
    for entry in allowed_domains:
        # oauth2-proxy: ".example.com" allows example.com and its subdomains; "example.com" only itself.
        wildcard = entry.startswith(".")
        allowed = _configured(entry[1:] if wildcard else entry)
        if allowed is None or not _port_allowed(port, scheme, allowed[1]):
            continue
        if host == allowed[0] or (wildcard and host.endswith("." + allowed[0])):
            return True
    return False


def _port_allowed(port: int, scheme: str, allowed: str | None) -> bool:
    """oauth2-proxy's port rule: no configured port = the scheme's default only; "*" = any; else that one."""
    if allowed is None:
        return port == _DEFAULT_PORTS[scheme]
    return allowed == "*" or port == int(allowed)


def _configured(entry: str) -> tuple[str, str | None] | None:
    """(canonical host, port text or None) of a configured name such as "example.com:8443" or "host:*"."""
    split = _split_host_port(entry.strip(), wildcard=True)
    if split is None:
        return None
    host = _canonical_host(split[0])
    return None if host is None else (host, split[1])
