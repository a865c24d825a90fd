"""The configuration tree (SPEC §3): YAML in, a frozen typed `Config` out, every problem reported at once.

`load_config(path)` raises `ConfigError` carrying the full list of problems, each prefixed by its key path
(`gitlab.url: must be an http(s) URL`). Nothing else in the code reads YAML or the environment for settings.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import SplitResult, urlsplit

import yaml
from cryptography.fernet import Fernet

from gateway.config_access import (
    PolicyRuleConfig,
    UpstreamRoute,
    parse_assertion_keys,
    read_access_sections,
    read_assertion_key_files,
)
from gateway.config_automatic import AutomaticConfig, check_automatic, parse_automatic

T = TypeVar("T")
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(Exception):
    """The configuration is unusable; `problems` lists every reason with its key path."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class Listen:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Rate:
    """`count` requests per `period` seconds ("30/m")."""

    count: int
    period: float


@dataclass(frozen=True, slots=True)
class ServerConfig:
    listen: Listen = Listen("0.0.0.0", 4180)
    public_url: str = "http://127.0.0.1:4180"
    prefix: str = "/oauth2"
    trusted_proxies: tuple[IPNetwork, ...] = ()
    allowed_redirect_domains: tuple[str, ...] = ()
    workers: int = 1
    # SPEC §16: a connection must deliver a request's headers within header_timeout, may sit idle between
    # requests for idle_timeout, and each process serves at most max_connections at once.
    header_timeout: float = 10.0
    idle_timeout: float = 75.0
    max_connections: int = 10000
    # SIGTERM: how long in-flight requests may take to finish, one bound for the whole shutdown.
    shutdown_grace: float = 30.0
    # auto: uvloop when it is installed, else asyncio's own loop (gateway/loops.py).
    event_loop: str = "auto"
    signin_rate: Rate = Rate(30, 60.0)  # anonymous start/callback requests per client address (SPEC §16)

    @property
    def public_host(self) -> str:
        """Host (and port, when not the scheme's default) that browsers use to reach us."""
        return urlsplit(self.public_url).netloc.lower()

    @property
    def callback_url(self) -> str:
        return f"{self.public_url}{self.prefix}/callback"


@dataclass(frozen=True, slots=True)
class AdminToken:
    name: str
    token: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class AdminConfig:
    listen: Listen = Listen("127.0.0.1", 4181)
    tokens: tuple[AdminToken, ...] = field(default=(), repr=False)
    groups: tuple[str, ...] = ()  # SPEC §15: local groups whose members get {prefix}/admin/; empty = off


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    url: str = "http://127.0.0.1:8080"
    timeout: float = 60.0
    connect_timeout: float = 5.0
    pass_host_header: bool = True
    websockets: bool = True


@dataclass(frozen=True, slots=True)
class GitLabConfig:
    url: str = "https://gitlab.com"
    client_id: str = ""
    client_secret: str = field(default="", repr=False)
    groups_source: str = "api"
    scopes: tuple[str, ...] = ("read_user", "read_api")
    ca_file: str | None = None
    timeout: float = 10.0
    # GitLab's external URL as its ID tokens and browsers know it, when gitlab.url is an internal address
    # (SPEC §16); None = read from GitLab's discovery document when needed.
    issuer: str | None = None
    allow_unverified_email: bool = False
    webhook_secret: str | None = field(default=None, repr=False)  # SPEC §11: None = no webhook endpoint


@dataclass(frozen=True, slots=True)
class ProvisioningConfig:
    allow_signup: bool = True
    sync_groups: bool = True
    allowed_groups: tuple[str, ...] = ()
    default_group: str = "gateway-users"
    keep_manual_memberships: bool = False
    resync_interval: float = 15 * 60.0  # SPEC §11; 0 = off (sign-in only, no GitLab token kept)
    resync_grace: float = 3600.0
    automatic: AutomaticConfig | None = None  # SPEC §12; None = off
    allow_any_gitlab_user: bool = False  # accept an open configuration on gitlab.com on purpose (SPEC §16)


@dataclass(frozen=True, slots=True)
class SessionConfig:
    secrets: tuple[str, ...] = field(default=(), repr=False)
    cookie_name: str = "_gateway"
    lifetime: float = 8 * 3600.0
    secure: bool = True
    samesite: str = "Lax"
    check_interval: float = 30.0


@dataclass(frozen=True, slots=True)
class DatabaseConfig:
    dsn: str | None = field(default=None, repr=False)
    state_dir: Path = Path(".gateway")
    pool_size: int = 10


@dataclass(frozen=True, slots=True)
class RoutesConfig:
    public: tuple[str, ...] = ()
    api: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class HeadersConfig:
    user: str = "X-Forwarded-User"
    email: str = "X-Forwarded-Email"
    preferred_username: str = "X-Forwarded-Preferred-Username"
    groups: str = "X-Forwarded-Groups"
    assertion: str | None = None  # SPEC §13: the signed identity header; None = off
    assertion_keys: tuple[str, ...] = field(default=(), repr=False)  # PEM; the first signs


@dataclass(frozen=True, slots=True)
class TokensConfig:
    """SPEC §14: personal access tokens for programs."""

    enabled: bool = False
    max_lifetime: float = 90 * 86400.0
    accept_gitlab_tokens: bool = False


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: str = "info"
    format: str = "json"


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = ServerConfig()
    admin: AdminConfig = AdminConfig()
    upstream: UpstreamConfig = UpstreamConfig()
    gitlab: GitLabConfig = GitLabConfig()
    provisioning: ProvisioningConfig = ProvisioningConfig()
    session: SessionConfig = SessionConfig()
    database: DatabaseConfig = DatabaseConfig()
    routes: RoutesConfig = RoutesConfig()
    headers: HeadersConfig = HeadersConfig()
    log: LogConfig = LogConfig()
    tokens: TokensConfig = TokensConfig()
    upstreams: tuple[UpstreamRoute, ...] = ()  # SPEC §13; empty = the single `upstream:` for everything
    policy: tuple[PolicyRuleConfig, ...] = ()

    @property
    def routing(self) -> tuple[UpstreamRoute, ...]:
        """Where requests go: `upstreams:` in order, or `upstream:` for every host and path."""
        return self.upstreams or (UpstreamRoute(self.upstream),)

    @property
    def redirect_domains(self) -> tuple[str, ...]:
        """Hosts a redirect may go to besides our own: allowed_redirect_domains and every upstream host."""
        hosts = tuple(r.host for r in self.upstreams if r.host and r.host not in self.server.allowed_redirect_domains)
        return self.server.allowed_redirect_domains + hosts

    @property
    def cookie_secure(self) -> bool:
        """Secure cookies unless the public URL is plain http (a browser would never send them back)."""
        return self.session.secure and self.server.public_url.startswith("https://")


# --------------------------------------------------------------------------------------------------------
# Reading: a small schema of (key -> parser) per section; parsers record problems instead of raising.

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
_COOKIE_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")


class _Problems:
    def __init__(self) -> None:
        self.items: list[str] = []
        self.unset: set[str] = set()  # paths whose ${VAR} failed: already reported, not validated again

    def add(self, path: str, message: str) -> None:
        self.items.append(f"{path}: {message}")

    def reported(self, path: str) -> bool:
        """True when a problem was already recorded for `path` (or its *_file variant, or an item of it)."""
        return any(item.startswith((f"{path}:", f"{path}[", f"{path}_file:")) for item in self.items)


def _interpolate(value: Any, path: str, env: Mapping[str, str], problems: _Problems) -> Any:
    """Replace `${VAR}` in every string of the tree; an unset variable is a problem naming it."""
    if isinstance(value, dict):
        return {k: _interpolate(v, f"{path}.{k}" if path else str(k), env, problems) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, f"{path}[{i}]", env, problems) for i, v in enumerate(value)]
    if isinstance(value, str):

        def sub(m: re.Match[str]) -> str:
            name = m.group(1)
            if name not in env:
                problems.add(path, f"environment variable {name} is not set")
                problems.unset.add(path)
                return ""
            return env[name]

        return _ENV_REF.sub(sub, value)
    return value


def _parse_duration(text: str) -> float | None:
    text = text.strip()
    pos, total = 0, 0.0
    for m in _DURATION_PART.finditer(text):
        if m.start() != pos:
            return None
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    return total if pos == len(text) and pos > 0 else None


def _duration(v: Any, path: str, p: _Problems) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (str, int, float)):
        p.add(path, "must be a duration like 30s, 5m or 8h")
        return None
    seconds = float(v) if not isinstance(v, str) else _parse_duration(v)
    if seconds is None or seconds <= 0:
        p.add(path, "must be a positive duration like 30s, 5m or 8h")
        return None
    return seconds


def _duration_or_off(v: Any, path: str, p: _Problems) -> float | None:
    """A duration, or "0" (or 0) meaning off."""
    if v in (0, "0") and not isinstance(v, bool):
        return 0.0
    return _duration(v, path, p)


def _bool(v: Any, path: str, p: _Problems) -> bool | None:
    if not isinstance(v, bool):
        p.add(path, "must be true or false")
        return None
    return v


def _int(lo: int, hi: int) -> Callable[[Any, str, _Problems], int | None]:
    def parse(v: Any, path: str, p: _Problems) -> int | None:
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            p.add(path, f"must be an integer from {lo} to {hi}")
            return None
        return v

    return parse


def _str(v: Any, path: str, p: _Problems) -> str | None:
    if not isinstance(v, str) or not v:
        p.add(path, "must be a non-empty string")
        return None
    return v


def _opt_str(v: Any, path: str, p: _Problems) -> str | None:
    return None if v is None else _str(v, path, p)


def _opt_secret(v: Any, path: str, p: _Problems) -> str | None:
    if v is None:
        return None
    if not isinstance(v, str) or len(v) < 16:
        p.add(path, "must be a string of at least 16 characters (or null)")
        return None
    return v


def _choice(*options: str) -> Callable[[Any, str, _Problems], str | None]:
    def parse(v: Any, path: str, p: _Problems) -> str | None:
        if not isinstance(v, str) or v.lower() not in options:
            p.add(path, f"must be one of {', '.join(options)}")
            return None
        return v.lower()

    return parse


def _event_loop(v: Any, path: str, p: _Problems) -> str | None:
    from gateway import loops

    choice = _choice(*loops.CHOICES)(v, path, p)
    if choice == "uvloop" and not loops.uvloop_available():
        p.add(path, "uvloop is not installed (pip install uvloop, Linux and macOS only); use auto or asyncio")
        return None
    return choice


def _str_list(v: Any, path: str, p: _Problems) -> tuple[str, ...] | None:
    if not isinstance(v, list):
        p.add(path, "must be a list of strings")
        return None
    out = []
    for i, item in enumerate(v):
        s = _str(item, f"{path}[{i}]", p)
        if s is not None:
            out.append(s)
    return tuple(out)


def _listen(v: Any, path: str, p: _Problems) -> Listen | None:
    m = re.fullmatch(r"(?:\[([0-9A-Fa-f:.]+)\]|([^\[\]:]*)):(\d{1,5})", v) if isinstance(v, str) else None
    if m is None or not 0 <= int(m.group(3)) <= 65535:
        p.add(path, 'must be "host:port", e.g. "0.0.0.0:4180" or "[::]:4180"')
        return None
    return Listen(m.group(1) or m.group(2) or "0.0.0.0", int(m.group(3)))


def _split_url(v: Any) -> SplitResult | None:
    """urlsplit, or None for a non-string or a URL it cannot parse (an unbalanced "[", a bad port)."""
    if not isinstance(v, str):
        return None
    try:
        parts = urlsplit(v)
        parts.port  # noqa: B018  (raises ValueError for a port that is not a number from 0 to 65535)
    except ValueError:
        return None
    return parts


def _dsn(v: Any, path: str, p: _Problems) -> str | None:
    if v is None:
        return None
    parts = _split_url(v)
    if parts is None or parts.scheme not in ("postgres", "postgresql"):
        p.add(path, "must be a PostgreSQL URL such as postgresql://user:password@host:5432/gateway (or null)")
        return None
    return str(v)


def _http_url(*, allow_path: bool) -> Callable[[Any, str, _Problems], str | None]:
    def parse(v: Any, path: str, p: _Problems) -> str | None:
        parts = _split_url(v)
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            p.add(path, "must be an http(s) URL")
            return None
        if parts.query or parts.fragment or parts.username or parts.password:
            p.add(path, "must not carry a query, fragment or credentials")
            return None
        if not allow_path and parts.path not in ("", "/"):
            p.add(path, "must be an origin such as https://tool.example.com (no path)")
            return None
        return str(v).rstrip("/")

    return parse


def _opt_http_url(v: Any, path: str, p: _Problems) -> str | None:
    return None if v is None else _http_url(allow_path=True)(v, path, p)


def _prefix(v: Any, path: str, p: _Problems) -> str | None:
    if not isinstance(v, str) or not re.fullmatch(r"(/[A-Za-z0-9._~-]+)+", v):
        p.add(path, 'must be a path such as "/oauth2" (leading slash, no trailing slash)')
        return None
    return v


def _networks(v: Any, path: str, p: _Problems) -> tuple[IPNetwork, ...] | None:
    items = _str_list(v, path, p)
    if items is None:
        return None
    out = []
    for i, item in enumerate(items):
        try:
            out.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            p.add(f"{path}[{i}]", f"{item!r} is not an IP address or CIDR")
    return tuple(out)


_RATE_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def _rate(v: Any, path: str, p: _Problems) -> Rate | None:
    m = re.fullmatch(r"\s*(\d{1,6})\s*/\s*([smh])\s*", v) if isinstance(v, str) else None
    if m is None or int(m.group(1)) < 1:
        p.add(path, 'must be a rate such as "30/m" (requests per s, m or h, at least 1)')
        return None
    return Rate(int(m.group(1)), _RATE_UNITS[m.group(2)])


def _domains(v: Any, path: str, p: _Problems) -> tuple[str, ...] | None:
    items = _str_list(v, path, p)
    if items is None:
        return None
    for i, item in enumerate(items):
        if not re.fullmatch(r"\.?[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*(:(\d{1,5}|\*))?", item):
            p.add(f"{path}[{i}]", f"{item!r} is not a host name (use .example.com for subdomains, "
                  "host:8443 or host:* for other ports than the default)")
    return tuple(i.lower() for i in items)


def _tokens(v: Any, path: str, p: _Problems) -> tuple[AdminToken, ...] | None:
    if not isinstance(v, list):
        p.add(path, "must be a list of tokens (strings or {name, token})")
        return None
    out: list[AdminToken] = []
    for i, item in enumerate(v):
        where = f"{path}[{i}]"
        name, token = f"admin-{i + 1}", item
        if isinstance(item, dict):
            unknown = set(item) - {"name", "token"}
            for k in sorted(unknown, key=str):
                p.add(f"{where}.{k}", "unknown key")
            name, token = item.get("name", name), item.get("token")
            if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.@-]{1,64}", name):
                p.add(f"{where}.name", "must be a short name of letters, digits, '_', '.', '@' or '-'")
            where = f"{where}.token"
        if not isinstance(token, str) or len(token) < 16:
            p.add(where, "must be a string of at least 16 characters")
            continue
        out.append(AdminToken(str(name), token))
    names = [t.name for t in out]
    if len(set(names)) != len(names):
        p.add(path, "token names must be unique")
    return tuple(out)


def _fernet_keys(v: Any, path: str, p: _Problems) -> tuple[str, ...] | None:
    items = _str_list(v, path, p)
    if items is None:
        return None
    for i, key in enumerate(items):
        try:
            Fernet(key.encode())
        except (ValueError, TypeError):
            # Never echo the value: it is a secret.
            p.add(f"{path}[{i}]", "must be a Fernet key (32 url-safe base64 bytes); "
                  "make one with: python -c 'from cryptography.fernet import Fernet; "
                  "print(Fernet.generate_key().decode())'")
    return items


def _header_name(v: Any, path: str, p: _Problems) -> str | None:
    if not isinstance(v, str) or not _HEADER_NAME.fullmatch(v):
        p.add(path, "must be an HTTP header name")
        return None
    return v


def _cookie_name(v: Any, path: str, p: _Problems) -> str | None:
    if not isinstance(v, str) or not _COOKIE_NAME.fullmatch(v):
        p.add(path, "must be a cookie name (letters, digits, _ and -)")
        return None
    return v


def _route_rules(v: Any, path: str, p: _Problems) -> tuple[str, ...] | None:
    from gateway.access.routes import (
        parse_rule,  # routes imports nothing from here; late import keeps config leaf-like
    )

    items = _str_list(v, path, p)
    if items is None:
        return None
    for i, rule in enumerate(items):
        try:
            parse_rule(rule)
        except ValueError as exc:
            p.add(f"{path}[{i}]", str(exc))
    return items


def _group_paths(v: Any, path: str, p: _Problems) -> tuple[str, ...] | None:
    items = _str_list(v, path, p)
    if items is None:
        return None
    for i, g in enumerate(items):
        if g.startswith("/") or g.endswith("/") or "//" in g or g.startswith("http"):
            p.add(f"{path}[{i}]", f"{g!r} must be a GitLab group full path such as my-group/sub-group")
    return items


_SCHEMA: dict[str, tuple[type, dict[str, Callable[[Any, str, _Problems], Any]]]] = {
    "server": (ServerConfig, {
        "listen": _listen, "public_url": _http_url(allow_path=False), "prefix": _prefix,
        "trusted_proxies": _networks, "allowed_redirect_domains": _domains, "workers": _int(0, 256),
        "header_timeout": _duration, "idle_timeout": _duration, "max_connections": _int(1, 1_000_000),
        "shutdown_grace": _duration, "event_loop": _event_loop,
        "signin_rate": _rate,
    }),
    "admin": (AdminConfig, {"listen": _listen, "tokens": _tokens, "groups": _str_list}),
    "upstream": (UpstreamConfig, {
        "url": _http_url(allow_path=True), "timeout": _duration, "connect_timeout": _duration,
        "pass_host_header": _bool, "websockets": _bool,
    }),
    "gitlab": (GitLabConfig, {
        "url": _http_url(allow_path=True), "client_id": _str, "client_secret": _str,
        "groups_source": _choice("api", "userinfo"), "scopes": lambda v, path, p: v, "ca_file": _opt_str,
        "timeout": _duration, "issuer": _opt_http_url,
        "allow_unverified_email": _bool, "webhook_secret": _opt_secret,
    }),
    "provisioning": (ProvisioningConfig, {
        "allow_signup": _bool, "sync_groups": _bool, "allowed_groups": _group_paths,
        "default_group": _str, "keep_manual_memberships": _bool, "allow_any_gitlab_user": _bool,
        "resync_interval": _duration_or_off, "resync_grace": _duration, "automatic": parse_automatic,
    }),
    "session": (SessionConfig, {
        "secrets": _fernet_keys, "cookie_name": _cookie_name, "lifetime": _duration, "secure": _bool,
        "samesite": _choice("lax", "strict", "none"), "check_interval": _duration,
    }),
    "database": (DatabaseConfig, {
        "dsn": _dsn, "state_dir": _str, "pool_size": _int(1, 1000),
    }),
    "routes": (RoutesConfig, {"public": _route_rules, "api": _route_rules}),
    "headers": (HeadersConfig, {
        "user": _header_name, "email": _header_name, "preferred_username": _header_name, "groups": _header_name,
        "assertion": lambda v, path, p: None if v is None else _header_name(v, path, p),
        "assertion_keys": parse_assertion_keys,
    }),
    "tokens": (TokensConfig, {"enabled": _bool, "max_lifetime": _duration, "accept_gitlab_tokens": _bool}),
    "log": (LogConfig, {"level": _choice("debug", "info", "warning", "error"), "format": _choice("json", "text")}),
}

# Sections that are lists (SPEC §13), read by config_access.
_LIST_SECTIONS = ("upstreams", "policy")

# Secrets that may instead be read from a file (`client_secret_file: /run/secrets/x`): one value, or one per
# line for the list-valued ones.
_SECRET_FILES = {
    ("gitlab", "client_secret"): False,
    ("gitlab", "webhook_secret"): False,
    ("session", "secrets"): True,
    ("admin", "tokens"): True,
    ("database", "dsn"): False,
}


def _read_secret_files(section: str, raw: dict[str, Any], p: _Problems) -> None:
    for (sec, key), is_list in _SECRET_FILES.items():
        file_key = f"{key}_file"
        if sec != section or file_key not in raw:
            continue
        path = f"{section}.{file_key}"
        if key in raw:
            p.add(path, f"set either {key} or {file_key}, not both")
            raw.pop(file_key)
            continue
        file_name = raw.pop(file_key)
        try:
            text = Path(str(file_name)).read_text(encoding="utf-8")
        except OSError as exc:
            p.add(path, f"cannot read {file_name}: {exc.strerror}")
            continue
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        raw[key] = lines if is_list else (lines[0] if lines else "")


def _scopes(raw: Any, gitlab_source: str, need_groups: bool, p: _Problems) -> tuple[str, ...]:
    if raw is None:
        return ("openid", "email") if gitlab_source == "userinfo" else ("read_user", "read_api")
    scopes = raw.split() if isinstance(raw, str) else raw
    if not isinstance(scopes, list) or not scopes or not all(isinstance(s, str) and s for s in scopes):
        p.add("gitlab.scopes", 'must be a list of scopes or a space-separated string, or null for the default')
        return ()
    chosen = set(scopes)
    if gitlab_source == "userinfo" and "openid" not in chosen:
        p.add("gitlab.scopes", 'must include "openid" when groups_source is "userinfo"')
    if gitlab_source == "api" and not chosen & {"read_user", "read_api", "api"}:
        p.add("gitlab.scopes", 'must include read_user, read_api or api when groups_source is "api"')
    if gitlab_source == "api" and need_groups and not chosen & {"read_api", "api"}:
        p.add("gitlab.scopes", "must include read_api (or api) to list groups for sync_groups/allowed_groups")
    return tuple(scopes)


# SPEC §3's defaults for the three secrets are environment variables: used when neither the key nor its
# *_file variant is in the file and the variable is set.
_ENV_DEFAULTS = {
    ("gitlab", "client_secret"): ("GITLAB_CLIENT_SECRET", False),
    ("session", "secrets"): ("GATEWAY_SESSION_SECRET", True),
    ("admin", "tokens"): ("GATEWAY_ADMIN_TOKEN", True),
}


def _apply_env_defaults(data: dict[str, Any], env: Mapping[str, str]) -> None:
    for (section, key), (var, is_list) in _ENV_DEFAULTS.items():
        raw = data.get(section)
        if raw is None:
            raw = data[section] = {}
        if not isinstance(raw, dict) or key in raw or f"{key}_file" in raw or var not in env:
            continue
        raw[key] = [env[var]] if is_list else env[var]


def _unknown_key(key: str, known: list[str]) -> str:
    """'unknown key', with the nearest known key when the name looks like a typo of one."""
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.75)
    return f"unknown key (did you mean {close[0]}?)" if close else "unknown key"


def build_config(data: Any, env: Mapping[str, str] | None = None) -> Config:
    """Validate an already-parsed YAML tree; raise ConfigError listing every problem."""
    p = _Problems()
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(["(top level): must be a mapping of sections (server, gitlab, ...)"])
    environment = os.environ if env is None else env
    data = _interpolate(data, "", environment, p)
    _apply_env_defaults(data, environment)
    sections: dict[str, Any] = {}
    raw_scopes: Any = None
    for name in data:
        if name not in _SCHEMA and name not in _LIST_SECTIONS:
            p.add(str(name), f"unknown section (known: {', '.join([*_SCHEMA, *_LIST_SECTIONS])})")
    read_assertion_key_files(data.get("headers"), p)
    for name, (cls, fields) in _SCHEMA.items():
        raw = data.get(name) or {}
        if not isinstance(raw, dict):
            p.add(name, "must be a mapping")
            sections[name] = cls()
            continue
        raw = dict(raw)
        _read_secret_files(name, raw, p)
        values: dict[str, Any] = {}
        for key, value in raw.items():
            path = f"{name}.{key}"
            parser = fields.get(str(key))
            if parser is None:
                p.add(path, _unknown_key(str(key), [*fields, *(f"{k}_file" for (sec, k) in _SECRET_FILES
                                                               if sec == name)]))
                continue
            if name == "gitlab" and key == "scopes":
                raw_scopes = value
                continue
            if path in p.unset or any(u.startswith(path + "[") for u in p.unset):
                continue
            parsed = parser(value, path, p)
            if parsed is not None:
                values[str(key)] = Path(parsed) if key == "state_dir" else parsed
        if name == "session" and "samesite" in values:
            values["samesite"] = values["samesite"].capitalize()
        sections[name] = cls(**values)
    upstreams, policy = read_access_sections(data, "upstream" in data, p)
    if upstreams:
        sections["upstream"] = upstreams[0].upstream  # what one-upstream code paths (logs, demo) show
    cfg = Config(**sections, upstreams=upstreams, policy=policy)
    need_groups = cfg.provisioning.sync_groups or bool(cfg.provisioning.allowed_groups)
    scopes = _scopes(raw_scopes, cfg.gitlab.groups_source, need_groups, p)
    cfg = _replace(cfg, "gitlab", scopes=scopes)
    _cross_checks(cfg, data, p)
    if p.items:
        raise ConfigError(p.items)
    return cfg


def _replace(cfg: Config, section: str, **changes: Any) -> Config:
    from dataclasses import replace

    return replace(cfg, **{section: replace(getattr(cfg, section), **changes)})


def _cross_checks(cfg: Config, data: dict[str, Any], p: _Problems) -> None:
    check_automatic(cfg.provisioning.automatic, cfg.provisioning.allowed_groups, p)
    gitlab = data.get("gitlab") if isinstance(data.get("gitlab"), dict) else {}
    assert isinstance(gitlab, dict)
    if not cfg.gitlab.client_id and "client_id" not in gitlab:
        p.add("gitlab.client_id", "is required (the Application ID of your GitLab OAuth application)")
    # Whatever supplied them (the key, its *_file, or the environment variable), these must end up non-empty;
    # a problem already reported under the same key (an unset ${VAR}, an unreadable file) says enough.
    if not cfg.gitlab.client_secret and not p.reported("gitlab.client_secret"):
        p.add("gitlab.client_secret", "is required (or gitlab.client_secret_file, or $GITLAB_CLIENT_SECRET)")
    if not cfg.session.secrets and not p.reported("session.secrets"):
        p.add("session.secrets", "needs at least one Fernet key (or session.secrets_file, or "
              "$GATEWAY_SESSION_SECRET)")
    if cfg.server.public_url.startswith("https://") and not cfg.session.secure:
        p.add("session.secure", "cannot be false when server.public_url is https")
    if cfg.session.samesite == "None" and not cfg.cookie_secure:
        p.add("session.samesite", "none requires secure cookies (an https public_url)")
    if cfg.server.listen == cfg.admin.listen:
        p.add("admin.listen", "must differ from server.listen (the admin API is never on the public listener)")
    if cfg.gitlab.ca_file and not Path(cfg.gitlab.ca_file).is_file():
        p.add("gitlab.ca_file", f"{cfg.gitlab.ca_file} is not a readable file")
    prov = cfg.provisioning
    if (_split_url(cfg.gitlab.url) or urlsplit("")).hostname in _GITLAB_COM and prov.allow_signup \
            and not prov.allowed_groups and not prov.allow_any_gitlab_user \
            and not any(p.reported(k) for k in ("gitlab.url", "provisioning.allow_any_gitlab_user",
                                                "provisioning.allow_signup", "provisioning.allowed_groups")):
        p.add("provisioning.allowed_groups", "is empty while gitlab.url is gitlab.com and allow_signup is true: "
              "anyone with a gitlab.com account could sign in. List your GitLab groups here, or set allow_signup: "
              "false, or set provisioning.allow_any_gitlab_user: true if that is really what you want")
    headers = [cfg.headers.user, cfg.headers.email, cfg.headers.preferred_username, cfg.headers.groups]
    if len({h.lower() for h in headers}) != len(headers):
        p.add("headers", "the four identity header names must differ")
    if cfg.headers.assertion is not None:
        if cfg.headers.assertion.lower() in {h.lower() for h in headers}:
            p.add("headers.assertion", "must differ from the other identity header names")
        if not cfg.headers.assertion_keys and not p.reported("headers.assertion_keys"):
            p.add("headers.assertion_keys", "needs at least one PEM private key (ES256 or Ed25519) to sign "
                  "with, or headers.assertion_keys_file")


# Values copied from gateway.example.yaml or the deploy/ examples that were never filled in. Matched
# case-insensitively; the example's hosts are RFC 2606's reserved names, which no real service uses.
_PLACEHOLDERS = re.compile(r"your-application-id|your-gitlab-group|replace-|replace_me|change-?me", re.IGNORECASE)
_EXAMPLE_HOST = re.compile(r"(?:^|\.)example(?:\.(?:com|org|net))?$|\.example$")


def placeholder_warnings(cfg: Config) -> list[str]:
    """Keys still holding an example's placeholder (SPEC §16): warnings for check-config, never errors.

    One line per key, naming it with its path; secret values are never echoed (only an example host name).
    """
    found: dict[str, str] = {}
    for path, text in _strings(cfg, ""):
        if cfg.upstreams and path.startswith("upstream."):
            continue  # `upstream` then only mirrors upstreams[0], which is reported under its own key
        problem = _placeholder(text)
        key = re.sub(r"\[\d+\](\.token)?$", "", path)  # admin.tokens[0].token -> admin.tokens
        if problem and key not in found:
            found[key] = f"{key}: {problem}"
    return list(found.values())


def _strings(value: Any, path: str) -> Iterator[tuple[str, str]]:
    """Every string in the configuration tree with its key path (`upstreams[1].url`)."""
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, tuple):
        for i, item in enumerate(value):
            yield from _strings(item, f"{path}[{i}]")
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            # A field marked "inline" holds keys written at its parent's level (upstreams[0].url).
            sub = path if f.metadata.get("inline") else f"{path}.{f.name}" if path else f.name
            yield from _strings(getattr(value, f.name), sub)


def _placeholder(text: str) -> str | None:
    if _PLACEHOLDERS.search(text):
        return "still holds a placeholder from the example; put your own value"
    parts = _split_url(text) if "://" in text else None
    host = (parts.hostname or "") if parts is not None else ""
    if host and _EXAMPLE_HOST.search(host):
        return f"{host} is an example host name (RFC 2606); put your own"
    return None


# gitlab.com is open to anyone who registers (SPEC §16); a self-managed GitLab's users are the organization's.
_GITLAB_COM = frozenset({"gitlab.com", "www.gitlab.com"})


def default_config_path() -> Path:
    return Path(os.environ.get("GATEWAY_CONFIG", "gateway.yaml"))


def load_config(path: Path | str | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Read and validate a YAML file; raise ConfigError with every problem."""
    file = Path(path) if path is not None else default_config_path()
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{file}: cannot read the configuration file: {exc.strerror}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError([f"{file}: not valid YAML{where}: {getattr(exc, 'problem', exc)}"]) from None
    return build_config(data, env)
