"""safe_redirect (SPEC §4): the 559-payload open-redirect corpus, then tables of accepted and refused rd."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import unquote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.access.redirects import MAX_LENGTH, safe_redirect

OWN = "tool.example.com"
CORPUS_SIZE = 559


def _corpus_file() -> Path:
    """shared/security/ (the source of truth, beside the clone in CI), else the copy kept in tests/data/."""
    shared = os.environ.get("GATEWAY_SHARED_DIR")
    base = Path(shared) if shared else Path(__file__).resolve().parents[2] / "shared"
    path = base / "security" / "open-redirects.txt"
    return path if path.is_file() else Path(__file__).resolve().parent / "data" / "open-redirects.txt"


def _corpus_lines() -> list[str]:
    path = _corpus_file()
    if not path.is_file():
        pytest.skip(f"open-redirect corpus not found at {path} (point GATEWAY_SHARED_DIR at shared/)")
    text = path.read_text(encoding="utf-8")
    # split("\n"), not splitlines(): the payloads may hold characters splitlines() would also break on.
    lines = text.split("\n")
    if text.endswith("\n"):
        lines.pop()
    return lines


# Lines of the corpus that a browser (WHATWG URL parser, checked with Node's `new URL(line, base)`)
# resolves to https://example.com/... once URL-decoded. With example.com allowed they are still refused, each
# for a shape we never accept: extra or encoded slashes (scheme-relative), backslashes, tabs, userinfo, or,
# for the last one, a path that embeds another URL ("//") for a later hop to follow.
RESOLVE_TO_EXAMPLE_COM = (
    "/%09/example.com", "/%2f%2fexample.com", "/%5cexample.com", "/\\/example.com/", "/\\/\\/example.com/",
    "//%09/example.com", "//%5cexample.com", "///%09/example.com", "///%5cexample.com",
    "////%09/example.com", "////%5cexample.com", "/////example.com", "/////example.com/",
    "///\\;@example.com", "////\\;@example.com",
    "//example.com", "//example.com/", "//example.com//", "//example.com/%2e%2e", "//example.com/%2e%2e%2f",
    "//example.com/%2f%2e%2e", "//example.com/%2f..",
    "///example.com", "///example.com/", "///example.com//", "///example.com/%2e%2e",
    "///example.com/%2e%2e%2f", "///example.com/%2f%2e%2e", "///example.com/%2f..",
    "////example.com/", "////example.com//", "////example.com/%2e%2e", "////example.com/%2e%2e%2f",
    "////example.com/%2f%2e%2e", "////example.com/%2f..",
    "https://example.com/https://google.com/",
)


def _accepted(own_host: str, allowed: tuple[str, ...]) -> list[str]:
    payloads = [unquote(line) for line in _corpus_lines()]
    assert len(payloads) == CORPUS_SIZE
    return [p for p in payloads if safe_redirect(p, own_host=own_host, allowed_domains=allowed) != "/"]


@pytest.mark.parametrize(
    ("own_host", "allowed"),
    [
        (OWN, ()),
        # Allowing the corpus' "legitimate" hosts must not open any payload: each one really lands elsewhere
        # (userinfo, "#"/"?" before the "@", dotted suffixes) or has an ambiguous shape.
        (OWN, ("example.com",)),
        ("www.whitelisteddomain.tld", (".whitelisteddomain.tld",)),
        ("tool.example.com:4180", (".example.com", "www.whitelisteddomain.tld")),
    ],
    ids=["no-allowed-domains", "example.com-allowed", "whitelisted-own-host", "wildcard-and-port"],
)
def test_every_corpus_payload_is_refused(own_host: str, allowed: tuple[str, ...]) -> None:
    assert _accepted(own_host, allowed) == []


def test_lines_a_browser_resolves_to_an_allowed_host_are_refused_for_their_shape() -> None:
    lines = set(_corpus_lines())
    assert len(set(RESOLVE_TO_EXAMPLE_COM)) == 36
    for line in RESOLVE_TO_EXAMPLE_COM:
        assert line in lines, f"corpus changed: {line!r} is gone; recompute RESOLVE_TO_EXAMPLE_COM"
        assert safe_redirect(unquote(line), own_host=OWN, allowed_domains=["example.com"]) == "/", line


ALLOWED_ORG = (".allowed.org", "exact.net")


@pytest.mark.parametrize(
    ("rd", "own_host", "allowed"),
    [
        ("/", OWN, ()),
        ("/a?b=c", OWN, ()),
        ("/x#y", OWN, ()),
        ("/a/b#frag", OWN, ()),
        ("/dashboard?tab=1&x=%20y", OWN, ()),
        ("/caf%C3%A9/menu?q=a%2Fb", OWN, ()),
        ("/.well-known/security.txt", OWN, ()),
        ("/" + "a" * (MAX_LENGTH - 1), OWN, ()),
        ("https://tool.example.com/p", OWN, ()),
        ("https://tool.example.com", OWN, ()),
        ("https://tool.example.com?x=1", OWN, ()),
        ("HTTPS://Tool.Example.COM/p", OWN, ()),
        ("https://sub.allowed.org/p", OWN, ALLOWED_ORG),
        ("https://a.b.allowed.org/p?q=1#f", OWN, ALLOWED_ORG),
        ("https://allowed.org/", OWN, ALLOWED_ORG),
        ("https://exact.net/x", OWN, ALLOWED_ORG),
        ("https://bücher.example/x", OWN, ("xn--bcher-kva.example",)),
        ("https://xn--bcher-kva.example/x", OWN, ("bücher.example",)),
        ("http://[::1]:4180/x", "[::1]:4180", ()),
        # SPEC §16 port rule: the own host at public_url's port, its scheme default when it names none.
        ("https://tool.example.com:4180/p", "tool.example.com:4180", ()),
        ("http://tool.example.com:80/p", OWN, ()),
        ("https://tool.example.com:443/p", OWN, ()),
        ("https://exact.net:9443/x", OWN, ("exact.net:9443",)),
        ("https://exact.net:9443/x", OWN, ("exact.net:*",)),
        ("https://a.allowed.org:8443/x", OWN, (".allowed.org:*",)),
    ],
)
def test_accepted_targets_are_returned_unchanged(rd: str, own_host: str, allowed: tuple[str, ...]) -> None:
    assert safe_redirect(rd, own_host=own_host, allowed_domains=allowed) == rd


@pytest.mark.parametrize(
    ("rd", "allowed"),
    [
        (None, ()),
        ("", ()),
        ("//evil.com", ()),
        ("/\\evil.com", ()),
        ("\\\\evil.com", ()),
        ("javascript:alert(1)", ()),
        ("JaVaScRiPt:alert(1)", ()),
        ("java\tscript:alert(1)", ()),
        ("\x01javascript:alert(1)", ()),
        ("data:text/html,<script>alert(1)</script>", ()),
        ("ftp://tool.example.com/", ()),
        ("http://evil.com/", ()),
        ("https://tool.example.com@evil.com/", ()),
        ("https://user@tool.example.com/", ()),
        ("https://:@tool.example.com/", ()),
        ("https:evil.com", ()),
        ("https:\\\\tool.example.com/p", ()),
        ("https:/\\tool.example.com/p", ()),
        ("https:xxtool.example.com/p", ()),
        ("https:/evil.com", ()),
        ("https:///tool.example.com/", ()),
        ("https://tool.example.com%2f@evil.com/", ()),
        ("https://tool%2eexample.com/", ()),
        ("https://tool.example.com./", ()),
        ("https://tool.example.com:99999/", ()),
        ("https://tool.example.com:99999/", ("tool.example.com:*",)),  # any port, but a port
        ("https://tool.example.com:/", ()),
        ("https://tool.example.com:x/", ()),
        ("https://[::1/", ()),
        ("http://[::1]x80/", ("[::1]",)),
        ("https://b\u00fc cher.example/", ("b\u00fc cher.example",)),
        ("https://tool.example.com//evil.com", ()),
        ("https://tool.example.com/..", ()),
        ("https://sub.exact.net/", ALLOWED_ORG),
        ("https://allowed.org.evil.com/", ALLOWED_ORG),
        ("https://evilallowed.org/", ALLOWED_ORG),
        # IDNA 2003 folds these to an allowed name, but browsers (UTS 46) keep them apart.
        ("https://faß.example/", ("fass.example",)),
        ("https://allowed\u3002org/", ("allowed.org",)),
        ("https://\uff41llowed.org/", ("allowed.org",)),
        ("a/b", ()),
        ("?next=/x", ()),
        ("#top", ()),
        ("/%2f%2fevil.com", ()),
        ("/%5cevil.com", ()),
        ("/%252f%252fevil.com", ()),
        ("/a/../b", ()),
        ("/a/%2e%2e/b", ()),
        ("/a/./b", ()),
        ("/a//b", ()),
        ("/a?x=%zz", ()),
        ("/login?next=//evil.com", ()),
        ("/login?next=https://evil.com", ()),
        ("/login?next=%2F%2Fevil.com", ()),
        ("/login?next=%5Cevil.com", ()),
        ("/x#//evil.com", ()),
        ("/<script>", ()),
        ('/a"b', ()),
        ("/a b", ()),
        (" /a", ()),
        ("/a ", ()),
        ("/a\x00", ()),
        ("/a\r\nSet-Cookie: x=1", ()),
        ("/a%0d%0aSet-Cookie:%20x=1", ()),
        ("/a?x=%0d%0aSet-Cookie:%20x=1", ()),
        ("/\u3031evil.com", ()),
        ("/" + "a" * MAX_LENGTH, ()),
    ],
)
def test_refused_targets_fall_back_to_root(rd: str | None, allowed: tuple[str, ...]) -> None:
    assert safe_redirect(rd, own_host=OWN, allowed_domains=allowed) == "/"


@pytest.mark.parametrize(
    ("rd", "own_host", "allowed"),
    [
        # The case: the gateway's own host (http://127.0.0.1:4180), another port.
        ("http://127.0.0.1:1/x", "127.0.0.1:4180", ()),
        ("http://127.0.0.1/x", "127.0.0.1:4180", ()),
        ("http://tool.example.com:8443/p", OWN, ()),
        ("https://tool.example.com/p", "tool.example.com:4180", ()),
        ("https://tool.example.com:80/p", OWN, ()),
        ("https://exact.net:9443/x", OWN, ("exact.net",)),
        ("https://exact.net:9443/x", OWN, ("exact.net:443",)),
        ("https://a.allowed.org:8443/x", OWN, (".allowed.org",)),
        ("https://a.allowed.org:8443/x", OWN, (".allowed.org:9443",)),
    ],
)
def test_port_rule_refuses_other_ports_of_allowed_hosts(rd: str, own_host: str, allowed: tuple[str, ...]) -> None:
    """SPEC §16: a host listed without a port (or our own host) accepts only its default (or public_url's) port."""
    assert safe_redirect(rd, own_host=own_host, allowed_domains=allowed) == "/"


def test_rd_longer_than_2048_bytes_falls_back_even_when_shorter_in_characters() -> None:
    rd = "https://b\u00fccher.example/" + "a" * 2025
    assert len(rd) <= MAX_LENGTH < len(rd.encode())
    assert safe_redirect(rd, own_host=OWN, allowed_domains=("xn--bcher-kva.example",)) == "/"


# ---- properties (hypothesis) ------------------------------------------------------------------------------

_PIECES = ["/", "//", "\\", ":", "@", ".", "?", "#", "%", "%2f", "%5c", "%09", "%25", "\t", "\n", " ", "\x00",
           "http:", "https:", "javascript:", "evil.com", "tool.example.com", "allowed.org", "sub.", "127.0.0.1",
           "[::1]", ":80", ":443", ":1", ":4180", ":8443", "a", "..", "x=1", "&", "\u3002", "\uff41", "\u00df"]
_OWN_HOSTS = ["tool.example.com", "tool.example.com:4180", "127.0.0.1:4180", "[::1]:4180"]
_ALLOWED = [(), (".allowed.org",), ("allowed.org:8443",), (".allowed.org:*",), ("evil.com:1",)]


def _browser_resolves(rd: str, own_host: str) -> tuple[str, int]:
    """(host, port) a browser navigates to for Location: rd on a page of https://own_host/ (WHATWG-ish:
    tabs and newlines dropped, controls and spaces trimmed, backslashes read as slashes)."""
    from urllib.parse import urljoin, urlsplit

    cleaned = rd.replace("\t", "").replace("\n", "").replace("\r", "").strip("\x00 ").replace("\\", "/")
    target = urlsplit(urljoin(f"https://{own_host}/", cleaned))
    default = {"http": 80, "https": 443}.get(target.scheme, -1)
    return (target.hostname or "").lower(), target.port or default


def _may_land_on(host: str, port: int, own_host: str, allowed: tuple[str, ...]) -> bool:
    from urllib.parse import urlsplit

    own = urlsplit(f"https://{own_host}/")
    if host == own.hostname and port in ({own.port} if own.port else {80, 443}):
        return True
    for entry in allowed:
        name, _, want = entry.lstrip(".").partition(":")
        host_ok = host == name or (entry.startswith(".") and host.endswith("." + name))
        if host_ok and (want == "*" or (port == int(want) if want else port in (80, 443))):
            return True
    return False


# Absolute URLs on hosts near the allowed ones, with and without ports: where the port rule matters.
_ABSOLUTE = st.builds(
    lambda scheme, host, port, tail: f"{scheme}//{host}{port}{tail}",
    st.sampled_from(["http:", "https:", "HTTPS:"]),
    st.sampled_from(["tool.example.com", "127.0.0.1", "[::1]", "allowed.org", "a.allowed.org", "evil.com"]),
    st.sampled_from(["", ":80", ":443", ":1", ":4180", ":8443", ":65535"]),
    st.lists(st.sampled_from(_PIECES), max_size=4).map("".join),
)


@settings(max_examples=600, deadline=None)
@given(rd=st.one_of(st.lists(st.sampled_from(_PIECES), max_size=12).map("".join), _ABSOLUTE,
                    st.text(max_size=40)),
       own_host=st.sampled_from(_OWN_HOSTS), allowed=st.sampled_from(_ALLOWED))
def test_no_accepted_rd_resolves_to_a_foreign_host(rd: str, own_host: str, allowed: tuple[str, ...]) -> None:
    """Property: an accepted rd is returned unchanged, and a browser resolving it lands on our own host at
    public_url's port or on an allowed domain at a port its entry allows (SPEC §4, §16); never elsewhere."""
    got = safe_redirect(rd, own_host=own_host, allowed_domains=allowed)
    if got == "/":
        return
    assert got == rd
    host, port = _browser_resolves(rd, own_host)
    assert _may_land_on(host, port, own_host, allowed), (rd, host, port)
