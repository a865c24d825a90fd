"""Per-route access policy (SPEC §13): which signed-in users may reach which method, host and path.

Rules are compiled once at start (regexes compiled, group and user sets frozen) and evaluated top to bottom;
the first rule whose match fits decides, and with no fitting rule any signed-in user passes. `routes.public`
entries are read as `public: true` rules placed first. `routes.api` entries are placed first too, but only
mark how an anonymous request is refused (401 JSON instead of a redirect): they decide nothing, so a later
group rule on an API path still applies.

Paths: a rule's regex is matched against the normal-form path (routes.normalized_path). A path that is not in
normal form never matches a public rule; for the other rules it is read every way a server behind us might
read it (as sent, percent-decoded, dot segments and `//` resolved, backslashes as slashes) and the user must
pass the rule that decides under EVERY reading, so `/admin/./x` or `/%61dmin/x` cannot dodge a rule on
`^/admin/`. An unknown path (auth_request without a trusted X-Forwarded-Uri) is treated as any path.

Evaluation is pure and touches no database: the identity (login, groups) comes from the session cache.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Literal
from urllib.parse import unquote

from gateway.access.hosts import host_matches
from gateway.access.routes import normalized_path, parse_rule
from gateway.config_access import PolicyRuleConfig
from gateway.identity import Identity

Outcome = Literal["allow", "sign_in", "forbidden"]
_MAX_CACHED_PATH = 512
# Regexes that match every path: a rule with one of them (and no method or host) is a catch-all.
_UNIVERSAL = frozenset({"", "^", "^/", "/", ".*", "^.*", "^/.*", ".", "^."})


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer for one request: allow, need sign-in (`api`: answer 401 JSON) or forbidden (and who'd pass)."""

    outcome: Outcome
    api: bool = False
    groups: tuple[str, ...] = ()  # forbidden: the groups whose members would pass
    users: bool = False  # forbidden: some specific users would pass too
    rule: str | None = None  # key path of the deciding rule ("policy[2]"), for logs and tests


ALLOW = Decision("allow")
SIGN_IN = Decision("sign_in")
SIGN_IN_API = Decision("sign_in", api=True)


@dataclass(frozen=True, slots=True)
class Rule:
    """A compiled rule."""

    where: str
    path: re.Pattern[str] | None = None
    methods: frozenset[str] | None = None
    host: str | None = None
    groups: frozenset[str] | None = None
    users: frozenset[str] | None = None
    public: bool = False
    api: bool = False  # a routes.api marker: says how to refuse anonymous requests, decides nothing
    allow: Decision = field(init=False, repr=False, compare=False)
    forbidden: Decision = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "allow", Decision("allow", rule=self.where))
        object.__setattr__(self, "forbidden", Decision(
            "forbidden", groups=tuple(sorted(self.groups or ())), users=bool(self.users), rule=self.where))

    @property
    def restricts(self) -> bool:
        """True when only some signed-in users pass."""
        return self.groups is not None or self.users is not None

    def fits(self, method: str | None, host: str | None, path: str | None) -> bool:
        """True when this request matches; `method` or `path` None = unknown (fits any condition on it)."""
        if self.methods is not None and method is not None and method not in self.methods:
            return False
        if self.host is not None and not host_matches(self.host, host):
            return False
        return self.path is None or path is None or self.path.search(path) is not None

    def admits(self, identity: Identity) -> bool:
        """Whether this signed-in user passes the rule."""
        if not self.restricts:
            return True
        if self.users is not None and identity.login in self.users:
            return True
        return self.groups is not None and not self.groups.isdisjoint(identity.groups)


def compile_rules(public: Iterable[str] = (), api: Iterable[str] = (),
                  policy: Sequence[PolicyRuleConfig] = ()) -> tuple[Rule, ...]:
    """routes.public, then routes.api, then policy: validated by config, compiled here once."""
    rules: list[Rule] = []
    for kind, texts in (("public", public), ("api", api)):
        for i, text in enumerate(texts):
            parsed = parse_rule(text)
            rules.append(Rule(f"routes.{kind}[{i}]", parsed.pattern,
                              frozenset([parsed.method]) if parsed.method else None,
                              public=kind == "public", api=kind == "api"))
    for r in policy:
        rules.append(Rule(
            r.where, re.compile(r.path) if r.path is not None else None,
            frozenset(r.methods) if r.methods else None, r.host,
            frozenset(r.allowed_groups) if r.allowed_groups is not None else None,
            frozenset(r.allowed_users) if r.allowed_users is not None else None, r.public))
    return tuple(rules)


# (rules that may decide, None = the default "signed in"; public; api)
_Resolution = tuple[tuple[Rule | None, ...], bool, bool]


class Policy:
    """The compiled rules; `decide` is called on every request."""

    def __init__(self, rules: Sequence[Rule], *, cache_size: int = 4096) -> None:
        self.rules = tuple(rules)
        self._deciding = tuple(r for r in self.rules if not r.api)
        self._api = tuple(r for r in self.rules if r.api)
        self._cached: Callable[[str, str | None, str], _Resolution] = lru_cache(maxsize=cache_size)(self._resolve)

    @classmethod
    def from_config(cls, public: Iterable[str], api: Iterable[str], policy: Sequence[PolicyRuleConfig]) -> Policy:
        return cls(compile_rules(public, api, policy))

    @property
    def empty(self) -> bool:
        return not self.rules

    def decide(self, method: str | None, host: str | None, raw_path: str | None,
               identity: Identity | None) -> Decision:
        """allow / sign_in / forbidden for this request; `raw_path` as sent, `host` canonical; `method` or
        `raw_path` None = unknown (auth_request without trusted facts): the strictest reading counts."""
        if not self.rules:
            return ALLOW if identity is not None else SIGN_IN
        if raw_path is None or method is None:
            resolution = self._resolve_unknown(method, host, raw_path)
        else:
            path = raw_path.partition("?")[0]
            resolution = self._cached(method, host, path) if len(path) <= _MAX_CACHED_PATH else \
                self._resolve(method, host, path)
        deciders, public, api = resolution
        if public:
            return deciders[0].allow if deciders and deciders[0] is not None else ALLOW
        if identity is None:
            return SIGN_IN_API if api else SIGN_IN
        for rule in deciders:
            if rule is not None and not rule.admits(identity):
                return rule.forbidden
        rule = deciders[0] if len(deciders) == 1 else None
        return rule.allow if rule is not None else ALLOW

    def _first(self, method: str, host: str | None, path: str | None, *, public_ok: bool) -> Rule | None:
        for rule in self._deciding:
            if rule.public and not public_ok:
                continue
            if rule.fits(method, host, path):
                return rule
        return None

    def _resolve(self, method: str, host: str | None, path: str) -> _Resolution:
        normal = normalized_path(path)
        if normal is not None:
            rule = self._first(method, host, normal, public_ok=True)
            api = any(r.fits(method, host, normal) for r in self._api)
            # ";params" pass as normal form, but servlet containers drop them ("/admin;x/users" is
            # /admin/users); a "%" left after decoding ("%2561") is decoded again by some servers.
            if (";" not in normal and "%" not in normal) or (rule is not None and rule.public):
                return (rule,), rule is not None and rule.public, api
        forms = readings(path)
        deciders = tuple(dict.fromkeys(self._first(method, host, f, public_ok=False) for f in forms))
        api = any(r.fits(method, host, f) for r in self._api for f in (*forms, normal) if f is not None)
        return deciders, False, api

    def _resolve_unknown(self, method: str | None, host: str | None, raw_path: str | None) -> _Resolution:
        # Every non-public rule that fits what is known may be the one deciding: all must admit.
        if raw_path is None:
            forms: tuple[str | None, ...] = (None,)
        else:
            path = raw_path.partition("?")[0]
            forms = (normalized_path(path), *readings(path))
        deciders = tuple(r for r in self._deciding
                         if not r.public and any(r.fits(method, host, f) for f in forms if f is not None or
                                                 raw_path is None))
        api = any(r.fits(method, host, f) for r in self._api for f in forms if f is not None or raw_path is None)
        return (*deciders, None), False, api


def readings(path: str) -> tuple[str, ...]:
    """Every way a server might read a path that is not in normal form (see the module docstring)."""
    once = unquote(path, errors="replace")
    forms = dict.fromkeys([path, once, unquote(once, errors="replace")])
    for form in list(forms):
        forms[_resolve_dots(form)] = None
        forms[_resolve_dots(re.sub(r";[^/]*", "", form))] = None  # servlet containers drop ";params"
    return tuple(forms)


def _resolve_dots(path: str) -> str:
    path = "/" + path.replace("\\", "/").lstrip("/")
    resolved = posixpath.normpath(path)  # collapses "//", removes "." and ".." (never above the root)
    resolved = "/" + resolved.lstrip("/")
    return resolved + "/" if path.endswith(("/", "/.", "/..")) and resolved != "/" else resolved


# ---- check-config ---------------------------------------------------------------------------------------

def _catch_all(rule: Rule) -> bool:
    return rule.methods is None and rule.host is None and (rule.path is None or rule.path.pattern in _UNIVERSAL)


def _covers(earlier: Rule, later: Rule) -> bool:
    """True when every request `later` matches is also matched by `earlier` (as far as we can tell)."""
    if earlier.methods is not None and (later.methods is None or not later.methods <= earlier.methods):
        return False
    if earlier.host is not None and (later.host is None or not host_matches(earlier.host, later.host.lstrip("."))
                                     or (later.host.startswith(".") and not earlier.host.startswith("."))):
        return False
    if earlier.path is None or earlier.path.pattern in _UNIVERSAL:
        return True
    return later.path is not None and later.path.pattern == earlier.path.pattern


def _overlaps(a: Rule, b: Rule) -> bool:
    """True when both have the same path regex and some method and host fit both: likely a mistake (a rule
    on a path with no regex or a different one overlapping is just how first-match-wins is used)."""
    if a.path is None or b.path is None or a.path.pattern != b.path.pattern:
        return False
    if a.methods is not None and b.methods is not None and not a.methods & b.methods:
        return False
    return a.host is None or b.host is None or host_matches(a.host, b.host.lstrip(".")) or \
        host_matches(b.host, a.host.lstrip("."))


def review(rules: Sequence[Rule], known_groups: Iterable[str] | None = None) -> list[str]:
    """Warnings for `gateway check-config`, each starting with the key path of the rule concerned."""
    out: list[str] = []
    deciding = [r for r in rules if not r.api]
    for i, later in enumerate(deciding):
        earlier_rules = deciding[:i]
        shadow = next((e for e in earlier_rules if _catch_all(e)), None)
        if shadow is not None:
            out.append(f"{later.where}: unreachable: {shadow.where} before it matches every request")
            continue
        shadow = next((e for e in earlier_rules if _covers(e, later)), None)
        if shadow is not None:
            out.append(f"{later.where}: unreachable: {shadow.where} already decides every request it matches")
            continue
        shadow = next((e for e in earlier_rules if _overlaps(e, later)
                       and (e.public, e.groups, e.users) != (later.public, later.groups, later.users)), None)
        if shadow is not None:
            out.append(f"{later.where}: overlaps {shadow.where}, which decides the requests both match")
    if known_groups is not None:
        known = set(known_groups)
        for rule in deciding:
            for group in sorted((rule.groups or frozenset()) - known):
                out.append(f"{rule.where}.allowed_groups: no local group named {group!r} (yet): nobody passes "
                           "through it until an administrator creates it")
    return out
