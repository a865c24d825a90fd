"""Route rules (SPEC §3 routes.*, §4): parsing, path normal form, and `routes.public` / `routes.api` as the
policy reads them (its first rules, access/policy.py), which no path trick can bend."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.access.policy import Policy
from gateway.access.routes import normalized_path, parse_rule


@pytest.mark.parametrize(
    ("text", "method", "regex"),
    [
        ("GET=^/static/", "GET", "^/static/"),
        ("^/health$", None, "^/health$"),
        ("POST=^/hooks/[a-z]+$", "POST", "^/hooks/[a-z]+$"),
        ("PROPFIND=^/dav/", "PROPFIND", "^/dav/"),
        ("^/a=b", None, "^/a=b"),
        ("GET=^/x=y", "GET", "^/x=y"),
    ],
)
def test_parse_rule(text: str, method: str | None, regex: str) -> None:
    rule = parse_rule(text)
    assert rule.method == method
    assert rule.pattern.pattern == regex


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("get=^/static/", "must be upper-case"),
        ("Get=^/static/", "must be upper-case"),
        ("GET=", "empty regex"),
        ("", "empty regex"),
        ("^/(", "not a valid regular expression"),
        ("GET=[", "not a valid regular expression"),
    ],
)
def test_bad_rules_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_rule(text)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/", "/"),
        ("/a/b", "/a/b"),
        ("/a/b/", "/a/b/"),
        ("/a%20b", "/a b"),
        ("/caf%C3%A9", "/café"),
        ("/%70ublic/x", "/public/x"),
        ("/.well-known/x", "/.well-known/x"),
        ("/a/.../b", "/a/.../b"),
        ("/a;v=1/b", "/a;v=1/b"),
        ("/a?x=/../y", "/a"),
        ("/a?x=%zz", "/a"),
        ("/a#/../b", "/a"),
    ],
)
def test_normal_paths_are_decoded(raw: str, expected: str) -> None:
    assert normalized_path(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "/public/../private", "/public/./private", "/public/..", "/public/.", "/..", "/.",
        "/public/%2e%2e/private", "/public/%2E%2E/private", "/public/.%2e/private", "/public/%2e/private",
        "/public%2f..%2fprivate", "/public%2F..", "/public%5c..%5cprivate", "/public%5C",
        # An encoded separator alone, with nothing else odd about the path, is enough to refuse it.
        "/public%2Fadmin", "/public%2fadmin", "/a%2Fb", "/public%5Cadmin",
        "//public", "/public//private", "/public/\\..\\private", "/public\\",
        "/public/..;/private", "/public/.;x/private",
        "/a%00", "/a%0a", "/a%0D", "/a%7f", "/a%zz", "/a%", "/a%2",
        "/a%c0%ae%c0%ae/", "/a%ff",
        "/public/%252e%252e/private", "/public/%25", "/a%252f", "/100%25",
        "/a\x00", "/a\t", "/a b", "/caf\u00e9",
        "http://evil.example/public", "*", "", "public",
    ],
)
def test_paths_not_in_normal_form_are_refused(raw: str) -> None:
    assert normalized_path(raw) is None


def routes(public: list[str], api: list[str], *, cache_size: int = 4096) -> Policy:
    """The policy of a configuration holding only `routes.public` and `routes.api` (no `policy:`)."""
    return Policy(Policy.from_config(public, api, ()).rules, cache_size=cache_size)


def classify(policy: Policy, method: str, raw: str) -> str:
    """What an anonymous request gets: public (allowed), api (401 JSON) or protected (sent to sign in)."""
    decision = policy.decide(method, None, raw, None)
    if decision.outcome == "allow":
        return "public"
    assert decision.outcome == "sign_in", decision
    return "api" if decision.api else "protected"


TABLE = routes(public=["^/public/", "GET=^/static/", "^/health$"], api=["^/api/"])


@pytest.mark.parametrize(
    ("method", "raw", "expected"),
    [
        ("GET", "/public/x", "public"),
        ("POST", "/public/x", "public"),
        ("GET", "/public/x?y=1", "public"),
        ("GET", "/%70ublic/x", "public"),
        ("GET", "/health", "public"),
        ("GET", "/health/x", "protected"),
        ("GET", "/static/app.js", "public"),
        ("POST", "/static/app.js", "protected"),
        ("HEAD", "/static/app.js", "protected"),
        ("GET", "/api/v1/things", "api"),
        ("DELETE", "/api/v1/things/1", "api"),
        ("GET", "/private", "protected"),
        # The query and fragment are never matched (SPEC §3).
        ("GET", "/private?x=/public/", "protected"),
        ("GET", "/private?/public/", "protected"),
        ("GET", "/private#/public/", "protected"),
        # Anything an upstream might resolve differently is protected, even when it "matches".
        ("GET", "/public/../private", "protected"),
        ("GET", "/public/%2e%2e/private", "protected"),
        ("GET", "/public/%2E%2E/private", "protected"),
        ("GET", "/public%2f..%2fprivate", "protected"),
        ("GET", "/public%2Fadmin", "protected"),
        ("GET", "/static%2Fapp.js", "protected"),
        ("GET", "/public/..%2fprivate", "protected"),
        ("GET", "/public/..;/private", "protected"),
        ("GET", "/public/..\\private", "protected"),
        ("GET", "//public/x", "protected"),
        ("GET", "/public//x", "protected"),
        # Never public; refused the API way (401 JSON), as one way a server could read them is under /api/.
        ("GET", "/api/../public/x", "api"),
        ("GET", "/api//v1", "api"),
        ("GET", "http://evil.example/public/x", "protected"),
        # SPEC §16: "%25" is not normal form (a hop that decodes twice sees "/public/../private").
        ("GET", "/public/%252e%252e/private", "protected"),
        ("GET", "/public/%25", "protected"),
    ],
)
def test_classify(method: str, raw: str, expected: str) -> None:
    assert classify(TABLE, method, raw) == expected
    assert classify(TABLE, method, raw) == expected  # the cached answer is the same answer


def test_long_paths_are_classified_without_the_cache() -> None:
    table = routes(public=["^/public/"], api=[])
    long_public = "/public/" + "a" * 4000
    assert classify(table, "GET", long_public) == "public"
    assert classify(table, "GET", long_public + "/../../x") == "protected"
    # Hostile unique long URLs are not remembered: the per-process cache stays empty.
    assert table._cached.cache_info().currsize == 0  # type: ignore[attr-defined]
    classify(table, "GET", "/public/short")
    assert table._cached.cache_info().currsize == 1  # type: ignore[attr-defined]


def test_a_tiny_cache_still_answers_correctly() -> None:
    table = routes(["^/public/"], [], cache_size=2)
    for _ in range(3):
        for i in range(5):
            assert classify(table, "GET", f"/public/{i}") == "public"
            assert classify(table, "GET", f"/private/{i}") == "protected"


def test_without_rules_everything_is_protected() -> None:
    table = routes([], [])
    assert classify(table, "GET", "/public/x") == "protected"
    assert classify(table, "GET", "/") == "protected"


_SEGMENT = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_.~", min_size=1, max_size=8)


@given(before=st.lists(_SEGMENT, max_size=3), after=st.lists(_SEGMENT, max_size=3),
       separator=st.sampled_from(["%2F", "%2f", "%5C", "%5c"]), method=st.sampled_from(["GET", "POST"]))
def test_an_encoded_separator_never_rides_a_public_rule(before: list[str], after: list[str], separator: str,
                                                        method: str) -> None:
    """Property: a path holding an encoded '/' or '\\' anywhere is never public, whatever else it looks like
    (we would match the decoded path while the upstream may split segments differently)."""
    path = "/public/" + "/".join(before) + separator + "/".join(after)
    assert normalized_path(path) is None
    assert classify(TABLE, method, path) != "public"


# ---- properties (hypothesis) ------------------------------------------------------------------------------

PUBLIC_ONLY = routes(public=["^/public/"], api=[])
_PATH_PIECES = ["/", "//", ".", "..", "%2e", "%2E", "%2f", "%5c", "%25", "%252e", "%", "%41", "%c3%a9", "%00",
                "\\", ";", "public", "private", "x", "?", "#", "\t", " ", "\u00e9"]


@settings(max_examples=500, deadline=None)
@given(raw=st.one_of(st.lists(st.sampled_from(_PATH_PIECES), max_size=10).map("".join), st.text(max_size=30)))
def test_a_public_path_is_in_normal_form_and_its_decoding_is_stable(raw: str) -> None:
    """Property: whenever a request is classified public, its path is in normal form (no empty or dot segment,
    no backslash, no control character) and decoding it once more changes nothing, so no later hop can read
    it as another path (SPEC §4, §16)."""
    from urllib.parse import unquote

    if classify(PUBLIC_ONLY, "GET", "/public/" + raw) != "public":
        return
    path = normalized_path("/public/" + raw)
    assert path is not None and path.startswith("/public/")
    assert unquote(path) == path
    segments = path.split("/")[1:]
    assert all(seg not in ("", ".", "..") for seg in segments[:-1]) and segments[-1] not in (".", "..")
    assert "\\" not in path and not any(ord(c) < 0x20 or ord(c) == 0x7F for c in path)
