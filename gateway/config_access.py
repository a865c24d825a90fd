"""The SPEC §13 keys of the configuration: `upstreams:`, `policy:` and `headers.assertion_keys(_file)`.

Kept beside config.py (which owns the tree and calls `read_access_sections`) so that the shared loader stays
small. Values are checked here with their key paths; the regexes and keys are compiled again by the pure
modules in gateway/access/ at start-up, which is where they are used.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from gateway.config import UpstreamConfig, _Problems

T = TypeVar("T")
HOST_PATTERN = re.compile(r"\.?[a-z0-9_-]+(?:\.[a-z0-9_-]+)*")
_METHOD = re.compile(r"[A-Z]+")
_PREFIX = re.compile(r"/(?:[A-Za-z0-9._~!$&'()*+,;=:@-]+/?)*")
_UPSTREAM_KEYS = ("match", "url", "timeout", "connect_timeout", "pass_host_header", "websockets", "strip_prefix")
_RULE_KEYS = ("match", "allowed_groups", "allowed_users", "public")


@dataclass(frozen=True, slots=True)
class UpstreamRoute:
    """One entry of `upstreams:` (or the single `upstream:`, matching every request)."""

    upstream: UpstreamConfig = field(metadata={"inline": True})  # its keys sit beside match: in the YAML
    host: str | None = None  # lower-case; ".example.com" = that domain and its subdomains
    path_prefix: str | None = None
    strip_prefix: bool = False


@dataclass(frozen=True, slots=True)
class PolicyRuleConfig:
    """One entry of `policy:`; with neither allowed_* nor public, any signed-in user passes."""

    path: str | None = None
    methods: tuple[str, ...] = ()
    host: str | None = None
    allowed_groups: tuple[str, ...] | None = None
    allowed_users: tuple[str, ...] | None = None
    public: bool = False
    where: str = field(default="policy", compare=False)  # its key path, for check-config reports


def read_assertion_key_files(headers: Any, p: _Problems) -> None:
    """`headers.assertion_keys_file`: one path or a list of paths, each a PEM file (one or more keys)."""
    if not isinstance(headers, dict) or "assertion_keys_file" not in headers:
        return
    paths = headers.pop("assertion_keys_file")
    where = "headers.assertion_keys_file"
    if "assertion_keys" in headers:
        p.add(where, "set either assertion_keys or assertion_keys_file, not both")
        return
    if isinstance(paths, str):
        paths = [paths]
    if not isinstance(paths, list) or not all(isinstance(x, str) and x for x in paths):
        p.add(where, "must be a path or a list of paths to PEM private keys")
        return
    keys: list[str] = []
    for i, name in enumerate(paths):
        try:
            text = Path(name).read_text(encoding="utf-8")
        except OSError as exc:
            p.add(f"{where}[{i}]" if len(paths) > 1 else where, f"cannot read {name}: {exc.strerror}")
            continue
        # One file may hold several keys (rotation): each PEM block is a key.
        keys.extend(m.group(0) for m in re.finditer(r"-----BEGIN [A-Z ]+-----.*?-----END [A-Z ]+-----", text, re.S))
    headers["assertion_keys"] = keys


def parse_assertion_keys(v: Any, path: str, p: _Problems) -> tuple[str, ...] | None:
    """PEM private keys, ES256 (P-256) or Ed25519; never echoed in a problem (they are secrets)."""
    from gateway.access.assertion import load_signing_key

    if not isinstance(v, list):
        p.add(path, "must be a list of PEM private keys (ES256 P-256 or Ed25519)")
        return None
    out = []
    for i, pem in enumerate(v):
        try:
            load_signing_key(pem if isinstance(pem, str) else "")
        except ValueError as exc:
            p.add(f"{path}[{i}]", str(exc))
            continue
        out.append(pem)
    return tuple(out)


def parse_host(v: Any, path: str, p: _Problems) -> str | None:
    if not isinstance(v, str) or not HOST_PATTERN.fullmatch(v.lower()):
        p.add(path, 'must be a host name ("grafana.example.com", or ".example.com" for it and its subdomains), '
              "without a port")
        return None
    return v.lower()


def _check_keys(raw: dict[Any, Any], known: tuple[str, ...], where: str, p: _Problems) -> None:
    from gateway.config import _unknown_key

    for key in raw:
        if key not in known:
            p.add(f"{where}.{key}", _unknown_key(str(key), list(known)))


def _entry(raw: Any, keys: tuple[str, ...], match_keys: tuple[str, ...], where: str, p: _Problems
           ) -> dict[str, Any] | None:
    """The `match` mapping of one list entry (empty = matches everything), or None when `raw` is unusable."""
    if not isinstance(raw, dict):
        p.add(where, f"must be a mapping with {', '.join(keys)}")
        return None
    _check_keys(raw, keys, where, p)
    return _match(raw, match_keys, where, p)


def _match(raw: dict[str, Any], known: tuple[str, ...], where: str, p: _Problems) -> dict[str, Any]:
    m = raw.get("match", {})
    if m is None:
        return {}
    if not isinstance(m, dict):
        p.add(f"{where}.match", f"must be a mapping with {', '.join(known)}")
        return {}
    _check_keys(m, known, f"{where}.match", p)
    return m


def _upstream(raw: Any, where: str, p: _Problems) -> UpstreamRoute | None:
    from gateway.config import _SCHEMA, UpstreamConfig, _bool

    m = _entry(raw, _UPSTREAM_KEYS, ("host", "path_prefix"), where, p)
    if m is None:
        return None
    host = parse_host(m["host"], f"{where}.match.host", p) if "host" in m else None
    prefix = m.get("path_prefix")
    if prefix is not None and (not isinstance(prefix, str) or not _PREFIX.fullmatch(prefix)
                               or "/./" in prefix + "/" or "/../" in prefix + "/"):
        p.add(f"{where}.match.path_prefix", 'must be a path such as "/docs/" (leading slash, normal form)')
        prefix = None
    if "url" not in raw:
        p.add(f"{where}.url", "is required (the tool's URL, e.g. http://127.0.0.1:3000)")
    fields = _SCHEMA["upstream"][1]
    values = {}
    for key, value in raw.items():
        if key in fields:
            parsed = fields[key](value, f"{where}.{key}", p)
            if parsed is not None:
                values[key] = parsed
    strip = _bool(raw["strip_prefix"], f"{where}.strip_prefix", p) if "strip_prefix" in raw else False
    if strip and prefix is None:
        p.add(f"{where}.strip_prefix", "needs match.path_prefix")
    return UpstreamRoute(UpstreamConfig(**values), host, prefix, bool(strip))


def _names(v: Any, path: str, p: _Problems) -> tuple[str, ...] | None:
    from gateway.config import _str_list

    items = _str_list(v, path, p)
    if items is not None and not items:
        p.add(path, "must name at least one (omit the key to let any signed-in user pass)")
        return None
    for i, name in enumerate(items or ()):
        # Group names never hold these (SPEC §16), logins neither: such an entry could never match.
        if "," in name or name != name.strip():
            p.add(f"{path}[{i}]", f"{name!r} cannot match: names have no ',' and no surrounding spaces")
    return items


def _rule(raw: Any, where: str, p: _Problems) -> PolicyRuleConfig | None:
    from gateway.config import _bool

    m = _entry(raw, _RULE_KEYS, ("path", "methods", "host"), where, p)
    if m is None:
        return None
    path = m.get("path")
    if path is not None:
        try:
            re.compile(path) if isinstance(path, str) and path else None
        except re.error as exc:
            p.add(f"{where}.match.path", f"{path!r} is not a valid regular expression: {exc}")
            path = None
        else:
            if not isinstance(path, str) or not path:
                p.add(f"{where}.match.path", 'must be a regular expression such as "^/admin/"')
                path = None
    methods: tuple[str, ...] = ()
    if "methods" in m:
        raw_methods = m["methods"]
        if not isinstance(raw_methods, list) or not raw_methods or not all(
                isinstance(x, str) and _METHOD.fullmatch(x.upper()) for x in raw_methods):
            p.add(f"{where}.match.methods", 'must be a list of HTTP methods such as ["POST", "DELETE"]')
        else:
            methods = tuple(x.upper() for x in raw_methods)
    host = parse_host(m["host"], f"{where}.match.host", p) if "host" in m else None
    groups = _names(raw["allowed_groups"], f"{where}.allowed_groups", p) if "allowed_groups" in raw else None
    users = _names(raw["allowed_users"], f"{where}.allowed_users", p) if "allowed_users" in raw else None
    public = bool(_bool(raw["public"], f"{where}.public", p)) if "public" in raw else False
    if public and ("allowed_groups" in raw or "allowed_users" in raw):
        p.add(f"{where}.public", "cannot be combined with allowed_groups or allowed_users")
    return PolicyRuleConfig(path, methods, host, groups, users, public, where)


def _each(raw: list[Any], name: str, parse: Callable[[Any, str, _Problems], T | None], p: _Problems
          ) -> tuple[T, ...]:
    parsed = (parse(item, f"{name}[{i}]", p) for i, item in enumerate(raw))
    return tuple(x for x in parsed if x is not None)


def read_access_sections(data: dict[str, Any], upstream_given: bool, p: _Problems
                         ) -> tuple[tuple[UpstreamRoute, ...], tuple[PolicyRuleConfig, ...]]:
    """Parse `upstreams:` and `policy:` (lists, so outside config.py's per-section schema)."""
    routes: tuple[UpstreamRoute, ...] = ()
    raw_upstreams = data.get("upstreams")
    if raw_upstreams is not None:
        if upstream_given:
            p.add("upstreams", "set either upstream (one tool) or upstreams (several), not both")
        if not isinstance(raw_upstreams, list) or not raw_upstreams:
            p.add("upstreams", "must be a non-empty list of {match, url, ...}")
        else:
            routes = _each(raw_upstreams, "upstreams", _upstream, p)
    rules: tuple[PolicyRuleConfig, ...] = ()
    raw_policy = data.get("policy")
    if isinstance(raw_policy, list):
        rules = _each(raw_policy, "policy", _rule, p)
    elif raw_policy is not None:
        p.add("policy", "must be a list of rules {match, allowed_groups | allowed_users | public}")
    return routes, rules
