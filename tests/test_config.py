"""Configuration (SPEC §3): defaults, validation with key paths, ${VAR}, *_file secrets, durations, and every
problem reported at once."""

from __future__ import annotations

import copy
import ipaddress
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.fernet import Fernet
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.config import AdminToken, Config, ConfigError, Listen, build_config, load_config

ROOT = Path(__file__).resolve().parents[1]
KEY = Fernet.generate_key().decode()
KEY2 = Fernet.generate_key().decode()
TOKEN = "admin-token-0123456789"
MINIMAL: dict[str, Any] = {
    "gitlab": {"client_id": "app-id", "client_secret": "app-secret"},
    "session": {"secrets": [KEY]},
    # gitlab.url defaults to gitlab.com: without this, every test here would be an open configuration (SPEC §16).
    "provisioning": {"allow_any_gitlab_user": True},
}
OPEN_OK: dict[str, Any] = {"provisioning": MINIMAL["provisioning"]}
OPEN_GITLAB_COM = "provisioning.allowed_groups: is empty while gitlab.url is gitlab.com and allow_signup is true"
EXAMPLE_ENV = {"GATEWAY_ADMIN_TOKEN": TOKEN, "GITLAB_CLIENT_SECRET": "from-env-secret",
               "GATEWAY_SESSION_SECRET": KEY}


def config(env: dict[str, str] | None = None, **sections: dict[str, Any]) -> Config:
    """MINIMAL with `sections` merged in key by key."""
    data = copy.deepcopy(MINIMAL)
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return build_config(data, env=env or {})


def problems(env: dict[str, str] | None = None, data: Any = None, **sections: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        if data is not None:
            build_config(data, env=env or {})
        else:
            config(env, **sections)
    return info.value.problems


# ---- defaults --------------------------------------------------------------------------------------------

def test_defaults_match_the_spec():
    cfg = config()
    assert cfg.server.listen == Listen("0.0.0.0", 4180)
    assert cfg.server.prefix == "/oauth2"
    assert cfg.server.trusted_proxies == () and cfg.server.allowed_redirect_domains == ()
    assert cfg.server.workers == 1
    assert cfg.admin.listen == Listen("127.0.0.1", 4181) and cfg.admin.tokens == ()
    assert cfg.upstream.url == "http://127.0.0.1:8080"
    assert (cfg.upstream.timeout, cfg.upstream.connect_timeout) == (60.0, 5.0)
    assert cfg.upstream.pass_host_header is True and cfg.upstream.websockets is True
    assert cfg.gitlab.url == "https://gitlab.com" and cfg.gitlab.groups_source == "api"
    assert cfg.gitlab.scopes == ("read_user", "read_api")
    assert cfg.gitlab.ca_file is None and cfg.gitlab.timeout == 10.0
    p = cfg.provisioning
    assert (p.allow_signup, p.sync_groups, p.allowed_groups, p.default_group, p.keep_manual_memberships) == (
        True, True, (), "gateway-users", False)
    s = cfg.session
    assert (s.cookie_name, s.lifetime, s.secure, s.samesite, s.check_interval) == (
        "_gateway", 8 * 3600.0, True, "Lax", 30.0)
    assert cfg.database.dsn is None and cfg.database.state_dir == Path(".gateway") and cfg.database.pool_size == 10
    assert cfg.routes.public == () and cfg.routes.api == ()
    assert (cfg.headers.user, cfg.headers.email, cfg.headers.preferred_username, cfg.headers.groups) == (
        "X-Forwarded-User", "X-Forwarded-Email", "X-Forwarded-Preferred-Username", "X-Forwarded-Groups")
    assert (cfg.log.level, cfg.log.format) == ("info", "json")


def test_an_empty_file_names_the_three_required_settings():
    assert [p for p in problems(data={}) if not p.startswith(OPEN_GITLAB_COM)] == [
        "gitlab.client_id: is required (the Application ID of your GitLab OAuth application)",
        "gitlab.client_secret: is required (or gitlab.client_secret_file, or $GITLAB_CLIENT_SECRET)",
        "session.secrets: needs at least one Fernet key (or session.secrets_file, or $GATEWAY_SESSION_SECRET)",
    ]
    assert any(p.startswith(OPEN_GITLAB_COM) for p in problems(data={"provisioning": {}}))


def test_every_key_can_be_set():
    cfg = config(
        server={"listen": "[::]:8443", "public_url": "https://tool.example.com/", "prefix": "/_auth",
                "trusted_proxies": ["10.0.0.0/8", "192.168.1.1"], "allowed_redirect_domains": [".Example.com"],
                "workers": 0},
        admin={"listen": "127.0.0.1:9000", "tokens": [TOKEN]},
        upstream={"url": "http://app:3000/base", "timeout": "2m", "connect_timeout": "500ms",
                  "pass_host_header": False, "websockets": False},
        gitlab={"url": "https://git.example.com/gitlab", "groups_source": "userinfo", "scopes": "openid email",
                "timeout": "3s"},
        provisioning={"allow_signup": False, "sync_groups": False, "allowed_groups": ["acme", "acme/sre"],
                      "default_group": "everyone", "keep_manual_memberships": True},
        session={"secrets": [KEY, KEY2], "cookie_name": "_tool", "lifetime": "1h30m", "secure": True,
                 "samesite": "strict", "check_interval": "5s"},
        database={"dsn": "postgresql://gw@db/gw", "state_dir": "/var/lib/gw", "pool_size": 3},
        routes={"public": ["^/health$", "GET=^/static/"], "api": ["^/api/"]},
        headers={"user": "X-User", "email": "X-Email", "preferred_username": "X-Login", "groups": "X-Groups"},
        log={"level": "DEBUG", "format": "text"},
    )
    assert cfg.server.listen == Listen("::", 8443) and str(cfg.server.listen) == "[::]:8443"
    assert cfg.server.public_url == "https://tool.example.com"  # trailing slash dropped
    assert cfg.server.callback_url == "https://tool.example.com/_auth/callback"
    assert cfg.server.trusted_proxies == (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("192.168.1.1"))
    assert cfg.server.allowed_redirect_domains == (".example.com",)
    assert cfg.server.workers == 0
    assert cfg.upstream.timeout == 120.0 and cfg.upstream.connect_timeout == 0.5
    assert cfg.gitlab.scopes == ("openid", "email")
    assert cfg.provisioning.allowed_groups == ("acme", "acme/sre")
    assert cfg.session.secrets == (KEY, KEY2) and cfg.session.lifetime == 5400.0 and cfg.session.samesite == "Strict"
    assert cfg.database.state_dir == Path("/var/lib/gw")
    assert cfg.log.level == "debug" and cfg.log.format == "text"
    assert cfg.cookie_secure


def test_userinfo_source_defaults_to_openid_scopes():
    assert config(gitlab={"groups_source": "userinfo"}).gitlab.scopes == ("openid", "email")


# ---- validation: one bad value per key, each reported with its key path -----------------------------------

BAD_VALUES = [
    ("server", "listen", "4180", 'server.listen: must be "host:port"'),
    ("server", "listen", "0.0.0.0:99999", 'server.listen: must be "host:port"'),
    ("server", "public_url", "tool.example.com", "server.public_url: must be an http(s) URL"),
    ("server", "public_url", "ftp://tool.example.com", "server.public_url: must be an http(s) URL"),
    ("server", "public_url", "https://tool.example.com/app", "server.public_url: must be an origin"),
    ("server", "public_url", "https://u:p@tool.example.com", "server.public_url: must not carry"),
    ("server", "prefix", "oauth2", "server.prefix: must be a path"),
    ("server", "prefix", "/oauth2/", "server.prefix: must be a path"),
    ("server", "trusted_proxies", ["10.0.0.0/33"], "server.trusted_proxies[0]: '10.0.0.0/33' is not an IP"),
    ("server", "trusted_proxies", "10.0.0.0/8", "server.trusted_proxies: must be a list of strings"),
    ("server", "allowed_redirect_domains", ["https://evil.com/"], "server.allowed_redirect_domains[0]:"),
    ("server", "workers", -1, "server.workers: must be an integer from 0 to 256"),
    ("server", "workers", "2", "server.workers: must be an integer"),
    ("server", "header_timeout", "soon", "server.header_timeout: must be a positive duration"),
    ("server", "idle_timeout", 0, "server.idle_timeout: must be a positive duration"),
    ("server", "max_connections", 0, "server.max_connections: must be an integer from 1 to 1000000"),
    ("server", "shutdown_grace", "-1s", "server.shutdown_grace: must be a positive duration"),
    ("server", "event_loop", "trio", "server.event_loop: must be one of auto, asyncio, uvloop"),
    ("server", "signin_rate", "30", 'server.signin_rate: must be a rate such as "30/m"'),
    ("server", "signin_rate", "0/m", 'server.signin_rate: must be a rate such as "30/m"'),
    ("server", "signin_rate", "30/day", 'server.signin_rate: must be a rate such as "30/m"'),
    ("server", "signin_rate", 30, 'server.signin_rate: must be a rate such as "30/m"'),
    ("server", "allowed_redirect_domains", ["example.com:x"], "server.allowed_redirect_domains[0]:"),
    ("admin", "listen", "localhost", 'admin.listen: must be "host:port"'),
    ("admin", "tokens", "just-one-string-token", "admin.tokens: must be a list of tokens"),
    ("admin", "tokens", ["short"], "admin.tokens[0]: must be a string of at least 16 characters"),
    ("upstream", "url", "127.0.0.1:8080", "upstream.url: must be an http(s) URL"),
    ("upstream", "timeout", "60", "upstream.timeout: must be a positive duration"),
    ("upstream", "connect_timeout", "fast", "upstream.connect_timeout: must be a positive duration"),
    ("upstream", "pass_host_header", "yes", "upstream.pass_host_header: must be true or false"),
    ("upstream", "websockets", 1, "upstream.websockets: must be true or false"),
    ("gitlab", "url", "gitlab.com", "gitlab.url: must be an http(s) URL"),
    ("gitlab", "client_id", "", "gitlab.client_id: must be a non-empty string"),
    ("gitlab", "client_secret", 42, "gitlab.client_secret: must be a non-empty string"),
    ("gitlab", "groups_source", "ldap", "gitlab.groups_source: must be one of api, userinfo"),
    ("gitlab", "scopes", ["read_user"], "gitlab.scopes: must include read_api"),
    ("gitlab", "scopes", [], "gitlab.scopes: must be a list of scopes"),
    ("gitlab", "ca_file", "/nonexistent/ca.pem", "gitlab.ca_file: /nonexistent/ca.pem is not a readable file"),
    ("gitlab", "timeout", "10 seconds", "gitlab.timeout: must be a positive duration"),
    ("gitlab", "issuer", "gitlab.example.com", "gitlab.issuer: must be an http(s) URL"),
    ("gitlab", "allow_unverified_email", "yes", "gitlab.allow_unverified_email: must be true or false"),
    ("provisioning", "allow_signup", "false", "provisioning.allow_signup: must be true or false"),
    ("provisioning", "sync_groups", None, "provisioning.sync_groups: must be true or false"),
    ("provisioning", "allowed_groups", ["https://gitlab.com/acme"], "provisioning.allowed_groups[0]:"),
    ("provisioning", "allowed_groups", ["acme/"], "provisioning.allowed_groups[0]:"),
    ("provisioning", "default_group", "", "provisioning.default_group: must be a non-empty string"),
    ("provisioning", "keep_manual_memberships", "no", "provisioning.keep_manual_memberships: must be true"),
    ("provisioning", "resync_interval", "-5m", "provisioning.resync_interval: must be a positive duration"),
    ("provisioning", "resync_grace", "0", "provisioning.resync_grace: must be a positive duration"),
    ("gitlab", "webhook_secret", "short", "gitlab.webhook_secret: must be a string of at least 16"),
    ("provisioning", "automatic", "on", "provisioning.automatic: must be a mapping"),
    ("provisioning", "allow_any_gitlab_user", "yes", "provisioning.allow_any_gitlab_user: must be true or false"),
    ("session", "secrets", ["not-a-fernet-key"], "session.secrets[0]: must be a Fernet key"),
    ("session", "secrets", KEY, "session.secrets: must be a list of strings"),
    ("session", "cookie_name", "my cookie", "session.cookie_name: must be a cookie name"),
    ("session", "lifetime", "forever", "session.lifetime: must be a positive duration"),
    ("session", "secure", "true", "session.secure: must be true or false"),
    ("session", "samesite", "sometimes", "session.samesite: must be one of lax, strict, none"),
    ("session", "samesite", "none", "session.samesite: none requires secure cookies"),
    ("session", "check_interval", "0s", "session.check_interval: must be a positive duration"),
    ("database", "dsn", 5432, "database.dsn: must be a PostgreSQL URL"),
    ("database", "dsn", "mysql://db/gw", "database.dsn: must be a PostgreSQL URL"),
    ("database", "dsn", "postgresql://u@127.0.0.1:99999/gw", "database.dsn: must be a PostgreSQL URL"),
    ("database", "state_dir", "", "database.state_dir: must be a non-empty string"),
    ("database", "pool_size", 0, "database.pool_size: must be an integer from 1 to 1000"),
    ("routes", "public", ["GET=(unclosed"], "routes.public[0]:"),
    ("routes", "api", "^/api/", "routes.api: must be a list of strings"),
    ("headers", "user", "X User", "headers.user: must be an HTTP header name"),
    ("headers", "email", "X-Email:", "headers.email: must be an HTTP header name"),
    ("headers", "preferred_username", "", "headers.preferred_username: must be an HTTP header name"),
    ("headers", "groups", "X-Forwarded-User", "headers: the four identity header names must differ"),
    ("headers", "assertion", "X Assertion", "headers.assertion: must be an HTTP header name"),
    ("headers", "assertion_keys", ["-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----"],
     "headers.assertion_keys[0]: must be an unencrypted PEM private key"),
    ("log", "level", "trace", "log.level: must be one of debug, info, warning, error"),
    ("admin", "groups", "admins", "admin.groups: must be a list of strings"),
    ("tokens", "enabled", "yes", "tokens.enabled: must be true or false"),
    ("tokens", "max_lifetime", "forever", "tokens.max_lifetime: must be a positive duration like 30s, 5m or 8h"),
    ("tokens", "accept_gitlab_tokens", 1, "tokens.accept_gitlab_tokens: must be true or false"),
    ("log", "format", "xml", "log.format: must be one of json, text"),
]


@pytest.mark.parametrize(("section", "key", "value", "expected"), BAD_VALUES,
                         ids=[f"{s}.{k}={v!r}" for s, k, v, _ in BAD_VALUES])
def test_a_bad_value_is_reported_with_its_key_path(section, key, value, expected):
    found = problems(**{section: {key: value}})
    assert any(p.startswith(expected) for p in found), found
    assert len(found) == 1, found


def test_every_section_key_has_a_validation_case():
    # upstreams and policy are lists, checked in test_policy_config.py
    sections = {name: set(getattr(Config(), name).__dataclass_fields__) for name in Config.__dataclass_fields__
                if name not in ("upstreams", "policy")}
    covered = {(s, k) for s, k, _, _ in BAD_VALUES}
    missing = {(s, k) for s, keys in sections.items() for k in keys} - covered
    assert missing == set()


def test_secret_values_are_never_echoed_in_problems():
    found = problems(session={"secrets": ["hunter2-not-a-key"]})
    assert "hunter2" not in "\n".join(found)


def test_top_level_and_section_shapes():
    assert problems(data=["server"]) == ["(top level): must be a mapping of sections (server, gitlab, ...)"]
    assert "server: must be a mapping" in problems(data={**MINIMAL, "server": "0.0.0.0:4180"})


def test_unknown_keys_and_sections_are_errors():
    found = problems(data={**copy.deepcopy(MINIMAL), "sever": {"listen": "0.0.0.0:1"},
                           "gitlab": {"client_id": "a", "client_secret": "b", "clientsecret": "c"}})
    assert found[0].startswith("sever: unknown section (known: server, admin, upstream, gitlab,")
    assert "gitlab.clientsecret: unknown key (did you mean client_secret?)" in found
    assert "server.colour: unknown key" in problems(server={"colour": "blue"})
    assert "admin.tokens[0].role: unknown key" in problems(admin={"tokens": [{"token": TOKEN, "role": "x"}]})


def test_all_problems_are_reported_at_once():
    found = problems(
        {"A": "a"},
        server={"listen": "nope", "public_url": "not a url"},
        gitlab={"url": "gitlab", "client_secret": "${MISSING_SECRET}"},
        upstream={"timeout": "soon"},
        log={"level": "loud"},
        extra={"x": 1},
    )
    paths = {p.split(":", 1)[0] for p in found}
    assert paths == {"server.listen", "server.public_url", "gitlab.url", "gitlab.client_secret",
                     "upstream.timeout", "log.level", "extra"}, found


# ---- cross-field rules -------------------------------------------------------------------------------------

def test_insecure_cookies_are_refused_with_an_https_public_url():
    found = problems(server={"public_url": "https://tool.example.com"}, session={"secrets": [KEY], "secure": False})
    assert found == ["session.secure: cannot be false when server.public_url is https"]
    cfg = config(server={"public_url": "http://127.0.0.1:4180"}, session={"secure": False})
    assert cfg.cookie_secure is False
    assert config(server={"public_url": "http://127.0.0.1:4180"}).cookie_secure is False  # http: never Secure
    assert config(server={"public_url": "https://tool.example.com"}).cookie_secure is True


def test_admin_listener_must_differ_from_public():
    assert problems(server={"listen": "127.0.0.1:4181"}) == [
        "admin.listen: must differ from server.listen (the admin API is never on the public listener)"]


def test_userinfo_groups_need_openid():
    assert problems(gitlab={"groups_source": "userinfo", "scopes": ["read_user"]}) == [
        'gitlab.scopes: must include "openid" when groups_source is "userinfo"']
    # read_user alone is enough when neither sync nor allowed_groups needs the group list
    cfg = config(gitlab={"scopes": "read_user"}, provisioning={"sync_groups": False})
    assert cfg.gitlab.scopes == ("read_user",)


# ---- admin tokens ------------------------------------------------------------------------------------------

def test_admin_tokens_strings_or_named():
    cfg = config(admin={"tokens": ["a" * 16, {"name": "ci", "token": "b" * 20}, "c" * 16,
                                   {"token": "d" * 16}]})
    assert cfg.admin.tokens == (AdminToken("admin-1", "a" * 16), AdminToken("ci", "b" * 20),
                                AdminToken("admin-3", "c" * 16), AdminToken("admin-4", "d" * 16))
    assert [t.name for t in cfg.admin.tokens] == ["admin-1", "ci", "admin-3", "admin-4"]
    assert "a" * 16 not in repr(cfg)  # never in a repr (and so never in a log line by accident)


def test_admin_token_problems():
    found = problems(admin={"tokens": [{"name": "ci", "token": "x" * 16}, {"name": "ci", "token": "y" * 16},
                                       {"name": "bad name!", "token": "z" * 16}, {"name": "nt"}]})
    assert "admin.tokens: token names must be unique" in found
    assert any(p.startswith("admin.tokens[2].name: must be a short name") for p in found)
    assert "admin.tokens[3].token: must be a string of at least 16 characters" in found


# ---- ${VAR} ------------------------------------------------------------------------------------------------

def test_env_references_are_replaced_anywhere_in_strings():
    env = {"HOST": "tool.example.com", "SECRET": "s3cret", "KEY": KEY, "TOKEN": TOKEN, "PORT": "9443"}
    cfg = build_config({**OPEN_OK,
        "server": {"public_url": "https://${HOST}", "listen": "0.0.0.0:${PORT}"},
        "admin": {"tokens": ["${TOKEN}", {"name": "ci", "token": "${TOKEN}-ci"}]},
        "gitlab": {"client_id": "id-${HOST}-${PORT}", "client_secret": "${SECRET}"},
        "session": {"secrets": ["${KEY}"]},
    }, env=env)
    assert cfg.server.public_url == "https://tool.example.com" and cfg.server.listen.port == 9443
    assert cfg.gitlab.client_id == "id-tool.example.com-9443" and cfg.gitlab.client_secret == "s3cret"
    assert [t.token for t in cfg.admin.tokens] == [TOKEN, f"{TOKEN}-ci"]
    assert cfg.session.secrets == (KEY,)


def test_unset_variables_are_errors_naming_them():
    found = problems(data={**OPEN_OK,
                           "gitlab": {"client_id": "${APP_ID}-${APP_SUFFIX}", "client_secret": "${GL_SECRET}"},
                           "session": {"secrets": ["${SESSION_KEY_VAR}"]},
                           "admin": {"tokens": ["${ADMIN_TOKEN_VAR}"]}}, env={"APP_ID": "x"})
    assert "gitlab.client_id: environment variable APP_SUFFIX is not set" in found
    assert "gitlab.client_secret: environment variable GL_SECRET is not set" in found
    assert "session.secrets[0]: environment variable SESSION_KEY_VAR is not set" in found
    assert "admin.tokens[0]: environment variable ADMIN_TOKEN_VAR is not set" in found
    assert len(found) == 4, found  # no follow-up noise about the emptied values


def test_env_defaults_to_the_process_environment(monkeypatch):
    monkeypatch.setenv("GW_TEST_CLIENT_SECRET", "from-process-env")
    cfg = build_config({**OPEN_OK, "gitlab": {"client_id": "a", "client_secret": "${GW_TEST_CLIENT_SECRET}"},
                        "session": {"secrets": [KEY]}})
    assert cfg.gitlab.client_secret == "from-process-env"


def test_a_dollar_without_braces_is_literal():
    assert config(gitlab={"client_secret": "pa$$word$HOME"}).gitlab.client_secret == "pa$$word$HOME"


# ---- *_file secrets ----------------------------------------------------------------------------------------

def test_secret_files(tmp_path):
    (tmp_path / "client_secret").write_text("file-secret\n")
    (tmp_path / "keys").write_text(f"{KEY2}\n\n{KEY}\n")
    (tmp_path / "tokens").write_text(f"{TOKEN}\n{TOKEN}-two\n")
    (tmp_path / "dsn").write_text("postgresql://gw:pw@db:5432/gw\n")
    cfg = build_config({**OPEN_OK,
        "gitlab": {"client_id": "a", "client_secret_file": str(tmp_path / "client_secret")},
        "session": {"secrets_file": str(tmp_path / "keys")},
        "admin": {"tokens_file": str(tmp_path / "tokens")},
        "database": {"dsn_file": str(tmp_path / "dsn")},
    }, env={})
    assert cfg.gitlab.client_secret == "file-secret"
    assert cfg.session.secrets == (KEY2, KEY)
    assert cfg.admin.tokens == (AdminToken("admin-1", TOKEN), AdminToken("admin-2", f"{TOKEN}-two"))
    assert cfg.database.dsn == "postgresql://gw:pw@db:5432/gw"


def test_secret_file_paths_take_env_references(tmp_path):
    (tmp_path / "s").write_text("file-secret")
    cfg = build_config({**OPEN_OK, "gitlab": {"client_id": "a", "client_secret_file": "${SECRETS}/s"},
                        "session": {"secrets": [KEY]}}, env={"SECRETS": str(tmp_path)})
    assert cfg.gitlab.client_secret == "file-secret"


def test_secret_file_problems(tmp_path):
    (tmp_path / "bad_keys").write_text("not-a-key\n")
    found = problems(data={**OPEN_OK,
        "gitlab": {"client_id": "a", "client_secret": "x", "client_secret_file": str(tmp_path / "s")},
        "session": {"secrets_file": str(tmp_path / "bad_keys")},
        "admin": {"tokens_file": str(tmp_path / "missing")},
        "database": {"dsn_file": str(tmp_path / "missing-dsn")},
    })
    assert "gitlab.client_secret_file: set either client_secret or client_secret_file, not both" in found
    assert any(p.startswith("session.secrets[0]: must be a Fernet key") for p in found)
    assert f"admin.tokens_file: cannot read {tmp_path / 'missing'}: No such file or directory" in found
    assert f"database.dsn_file: cannot read {tmp_path / 'missing-dsn'}: No such file or directory" in found
    assert len(found) == 4, found


def test_only_secrets_have_file_variants():
    assert problems(upstream={"url_file": "/etc/hostname"}) == ["upstream.url_file: unknown key"]


# ---- durations ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "seconds"), [
    ("30s", 30.0), ("5m", 300.0), ("8h", 28800.0), ("1h30m", 5400.0), ("2d", 172800.0), ("250ms", 0.25),
    ("1.5h", 5400.0), ("1m30s", 90.0), (" 45s ", 45.0),
])
def test_durations(text, seconds):
    assert config(session={"lifetime": text}).session.lifetime == seconds


@pytest.mark.parametrize("text", ["30", "s", "5 m", "5m 30s", "-5s", "0s", "1h-30m", "5min", "1y", "", "PT5M",
                                  "30s5", True, None, [30]])
def test_bad_durations(text):
    assert problems(upstream={"timeout": text}) == [
        "upstream.timeout: " + ("must be a duration like 30s, 5m or 8h" if not isinstance(text, str)
                                else "must be a positive duration like 30s, 5m or 8h")]


# ---- files -------------------------------------------------------------------------------------------------

def test_example_file_validates_with_its_env_vars(monkeypatch):
    for k, v in EXAMPLE_ENV.items():
        monkeypatch.setenv(k, v)
    cfg = load_config(ROOT / "gateway.example.yaml")
    assert cfg.gitlab.client_secret == "from-env-secret"
    assert cfg.admin.tokens == (AdminToken("admin-1", TOKEN),)
    assert cfg.session.secrets == (KEY,)
    assert cfg.server.public_url == "https://tool.example.com"


def test_example_file_documents_every_key():
    text = (ROOT / "gateway.example.yaml").read_text()
    data = yaml.safe_load(text)
    for section in Config.__dataclass_fields__:
        if section in ("upstreams", "policy"):  # lists (SPEC §13): shown, commented where they clash
            assert f"\n{section}:" in text or f"\n# {section}:" in text, f"{section} is not in the example"
            continue
        assert section in data, f"section {section} is missing from gateway.example.yaml"
        for key in getattr(Config(), section).__dataclass_fields__:
            assert key in data[section], f"{section}.{key} is missing from gateway.example.yaml"
    # every key has a comment above it, alone or heading a block of sibling keys (the four header names)
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("  ") and not line.startswith("    ") and not line.strip().startswith(("#", "-")):
            j = i - 1
            while lines[j].startswith("  ") and not lines[j].startswith("    ") and ":" in lines[j] \
                    and not lines[j].strip().startswith("#"):
                j -= 1
            assert lines[j].strip().startswith("#"), f"no comment above: {line.strip()}"


def test_example_file_without_env_names_each_variable():
    found = problems(data=yaml.safe_load((ROOT / "gateway.example.yaml").read_text()))
    assert sorted(found) == [
        "admin.tokens[0]: environment variable GATEWAY_ADMIN_TOKEN is not set",
        "gitlab.client_secret: environment variable GITLAB_CLIENT_SECRET is not set",
        "session.secrets[0]: environment variable GATEWAY_SESSION_SECRET is not set",
    ]


def test_load_config_file_problems(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "absent.yaml", env={})
    assert info.value.problems == [f"{tmp_path / 'absent.yaml'}: cannot read the configuration file: "
                                   "No such file or directory"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("server:\n  listen: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad, env={})
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith(f"{bad}: not valid YAML (line ")
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ConfigError) as info:
        load_config(empty, env={})
    assert len(info.value.problems) == 4  # the three required settings, and the open gitlab.com configuration


def test_load_config_reads_gateway_config_env(tmp_path, monkeypatch):
    path = tmp_path / "custom.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    monkeypatch.setenv("GATEWAY_CONFIG", str(path))
    assert load_config(env={}).gitlab.client_id == "app-id"


def test_config_is_frozen():
    cfg = config()
    with pytest.raises(AttributeError):
        cfg.server.workers = 3  # type: ignore[misc]


@pytest.mark.parametrize("secrets", [{"secrets": []}, {"secrets_file": "EMPTY"}])
def test_no_session_key_from_any_source_is_an_error(secrets, tmp_path):
    if "secrets_file" in secrets:
        (tmp_path / "keys").write_text("\n  \n")
        secrets = {"secrets_file": str(tmp_path / "keys")}
    found = problems(data={**OPEN_OK, "gitlab": MINIMAL["gitlab"], "session": secrets})
    assert found == ["session.secrets: needs at least one Fernet key (or session.secrets_file, or "
                     "$GATEWAY_SESSION_SECRET)"]


@pytest.mark.parametrize(("key", "value"), [
    ("url", "http://[gitlab.internal"), ("url", "http://gitlab:abc"), ("url", "http://gitlab:99999"),
])
def test_urls_that_cannot_be_parsed_are_problems_not_tracebacks(key, value):
    assert problems(gitlab={key: value}) == [f"gitlab.{key}: must be an http(s) URL"]


@pytest.mark.parametrize("value", ["[::1:4180", "::1:4180", "host:port", "h:70000"])
def test_bad_listen_addresses(value):
    assert problems(server={"listen": value})[0].startswith("server.listen: must be")


def test_listen_forms():
    assert str(config(server={"listen": "[::1]:4180"}).server.listen) == "[::1]:4180"
    assert config(server={"listen": ":4180"}).server.listen.host == "0.0.0.0"


def test_secrets_default_to_the_environment_variables_of_the_spec():
    cfg = build_config({**OPEN_OK, "gitlab": {"client_id": "app"}}, env=EXAMPLE_ENV)
    assert cfg.gitlab.client_secret == "from-env-secret"
    assert cfg.session.secrets == (KEY,)
    assert [(t.name, t.token) for t in cfg.admin.tokens] == [("admin-1", TOKEN)]
    # A key in the file wins over the variable; without the variable nothing is invented.
    cfg = build_config({**MINIMAL, "admin": {"tokens": []}}, env=EXAMPLE_ENV)
    assert cfg.gitlab.client_secret == "app-secret" and cfg.admin.tokens == ()
    assert build_config(MINIMAL, env={}).admin.tokens == ()


# ---- property (hypothesis) ------------------------------------------------------------------------------------

_SECTION_KEYS = {name: sorted(getattr(Config(), name).__dataclass_fields__)
                 for name in Config.__dataclass_fields__ if name not in ("upstreams", "policy")}
_LEAVES = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
                    st.text(max_size=20), st.sampled_from(["30s", "30/m", "0.0.0.0:1", "https://gitlab.com",
                                                           "${UNSET_GW_VAR}", "[", "acme/", "none", "*"]))
_VALUES = st.recursive(_LEAVES, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                        st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                       max_leaves=6)


@st.composite
def _config_trees(draw: Any) -> Any:
    tree: dict[Any, Any] = copy.deepcopy(MINIMAL)
    for section in draw(st.lists(st.sampled_from([*_SECTION_KEYS, "upstreams", "policy", "sever"]), max_size=3)):
        keys = _SECTION_KEYS.get(section, ["match", "url", "x"])
        if draw(st.booleans()):
            tree[section] = draw(_VALUES)
        else:
            body = tree.setdefault(section, {}) if isinstance(tree.get(section), dict) else {}
            for key in draw(st.lists(st.sampled_from(keys), max_size=3)):
                body[key] = draw(_VALUES)
            tree[section] = body
    return tree


@settings(max_examples=200, deadline=None)
@given(tree=_config_trees())
def test_every_invalid_value_is_reported_with_its_key_path_never_an_exception(tree: Any) -> None:
    """Property: whatever YAML tree is loaded, build_config either returns a Config or raises ConfigError whose
    every problem starts with the key path it is about (a known section, or "(top level)"), never another
    exception (SPEC §3)."""
    try:
        build_config(tree, env={})
    except ConfigError as err:
        assert err.problems
        for problem in err.problems:
            path = problem.split(": ", 1)[0]
            assert path == "(top level)" or path.split(".")[0].split("[")[0] in tree, problem
