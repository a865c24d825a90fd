"""Route rules (SPEC §3 `routes.*`, §4): which requests are public, which are API calls, which need a session.

Rules match the percent-decoded PATH only, and only when that path is already in normal form. Anything a
server behind us might read differently from us (dot segments, `//`, backslashes, encoded separators) is
treated as protected, so a crafted path can never ride a public rule into a private page.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal
from urllib.parse import unquote

RouteClass = Literal["public", "api", "protected"]

# Upper-case letters only: "GET=^/static/". A lower-case prefix is almost certainly a typo for a method, and a
# rule that silently never matches is worse than an error at start-up.
_METHOD_PREFIX = re.compile(r"([A-Za-z]+)=")
# Raw spaces, controls, backslashes and non-ASCII never appear in a browser's request target; refuse what a
# lenient upstream might still parse its own way.
_RAW_FORBIDDEN = re.compile(r"[^\x21-\x7e]|\\")
# Encoded '/' and '\' split segments differently for us and for the upstream; encoded controls hide in logs;
# a '%' not followed by two hex digits is decoded differently by different servers; an encoded '%' ("%25")
# makes a new escape for any hop that decodes once more ("/public/%252e%252e/private", SPEC §16).
_ENCODED_FORBIDDEN = re.compile(r"%(?:2[fF5]|5[cC]|[01][0-9a-fA-F]|7[fF]|(?![0-9a-fA-F]{2}))")
# An empty segment ("//"), or a dot segment, also with ";params" that servlet containers drop before resolving
# dots ("/public/..;/private" climbs out too).
_NOT_NORMAL = re.compile(r"//|/\.\.?(?:;[^/]*)?(?:/|\Z)")
# Paths longer than this are classified without caching, so hostile unique URLs cannot bloat the cache.
_MAX_CACHED_PATH = 512


@dataclass(frozen=True, slots=True)
class RouteRule:
    """One `[METHOD=]regex` rule; `method` None matches every method."""

    method: str | None
    pattern: re.Pattern[str]

    def matches(self, method: str, path: str) -> bool:
        """True when the rule applies to this method and normalized path."""
        return (self.method is None or self.method == method) and self.pattern.search(path) is not None


def parse_rule(text: str) -> RouteRule:
    """Parse `[METHOD=]regex`; raise ValueError with a sentence a config author can act on."""
    method: str | None = None
    regex = text
    prefix = _METHOD_PREFIX.match(text)
    if prefix is not None:
        method, regex = prefix.group(1), text[prefix.end():]
        if not method.isupper():
            raise ValueError(f"rule {text!r}: method {method!r} must be upper-case letters, e.g. "
                             "'GET=^/static/' (start a path regex with '^' so it is not read as METHOD=)")
    if not regex:
        raise ValueError(f"rule {text!r} has an empty regex; write '^/' to match every path on purpose")
    try:
        pattern = re.compile(regex)
    except re.error as exc:
        raise ValueError(f"rule {text!r} is not a valid regular expression: {exc}") from None
    return RouteRule(method, pattern)


def normalized_path(raw_path: str) -> str | None:
    """The percent-decoded path of a raw request target, or None when it is not in normal form."""
    path = raw_path.partition("?")[0].partition("#")[0]
    # Absolute-form targets ("http://host/x") and "*" are not paths a route rule may judge.
    if not path.startswith("/") or _RAW_FORBIDDEN.search(path):
        return None
    if "%" in path:
        if _ENCODED_FORBIDDEN.search(path):
            return None
        try:
            path = unquote(path, errors="strict")
        except UnicodeDecodeError:
            return None  # overlong or broken UTF-8 is a classic way to smuggle '.' or '/'
    return None if _NOT_NORMAL.search(path) else path


class RouteTable:
    """Classifies requests as public, api or protected, remembering recent answers."""

    def __init__(
        self, public: Iterable[RouteRule], api: Iterable[RouteRule], *, cache_size: int = 4096
    ) -> None:
        self._public = tuple(public)
        self._api = tuple(api)
        self._cached: Callable[[str, str], RouteClass] = lru_cache(maxsize=cache_size)(self._classify)

    @classmethod
    def from_config(cls, public: Iterable[str], api: Iterable[str]) -> RouteTable:
        """Build from the `routes.public` / `routes.api` strings (already validated by config)."""
        return cls([parse_rule(r) for r in public], [parse_rule(r) for r in api])

    def classify(self, method: str, raw_path: str) -> RouteClass:
        """Which kind of route this request is; a path not in normal form is always protected."""
        if not self._public and not self._api:
            return "protected"
        if len(raw_path) > _MAX_CACHED_PATH:
            return self._classify(method, raw_path)
        return self._cached(method, raw_path)

    def _classify(self, method: str, raw_path: str) -> RouteClass:
        path = normalized_path(raw_path)
        if path is None:
            return "protected"
        if any(rule.matches(method, path) for rule in self._public):
            return "public"
        if any(rule.matches(method, path) for rule in self._api):
            return "api"
        return "protected"
