"""safe_redirect (SPEC §4): the 559-payload open-redirect corpus, then tables of accepted and refused rd."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import unquote

import pytest

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
        ("http://tool.example.com:8443/p", OWN, ()),
        ("https://tool.example.com/p", "tool.example.com:4180", ()),
        ("https://sub.allowed.org/p", OWN, ALLOWED_ORG),
        ("https://a.b.allowed.org/p?q=1#f", OWN, ALLOWED_ORG),
        ("https://allowed.org/", OWN, ALLOWED_ORG),
        ("https://exact.net/x", OWN, ALLOWED_ORG),
        ("https://exact.net:9443/x", OWN, ("exact.net:443",)),
        ("https://bücher.example/x", OWN, ("xn--bcher-kva.example",)),
        ("https://xn--bcher-kva.example/x", OWN, ("bücher.example",)),
        ("http://[::1]:4180/x", "[::1]:4180", ()),
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
