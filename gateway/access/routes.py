"""Route rule syntax (SPEC §3 `routes.*`) and the path normal form (SPEC §4, §16), used by the policy
(access/policy.py, which reads `routes.*` as its first rules) and by redirect validation.

Rules match the percent-decoded PATH only, and only when that path is already in normal form. Anything a
server behind us might read differently from us (dot segments, `//`, backslashes, encoded separators) is not
in normal form, so a crafted path can never ride a public rule into a private page.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote

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
