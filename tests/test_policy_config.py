"""Configuration of SPEC §13: upstreams, policy and the assertion keys, each problem with its key path."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from gateway.config import Config, ConfigError, build_config, placeholder_warnings

KEY = Fernet.generate_key().decode()
BASE: dict[str, Any] = {"gitlab": {"client_id": "app-id", "client_secret": "app-secret"},
                        "session": {"secrets": [KEY]},
                        # gitlab.url defaults to gitlab.com: not an open configuration on purpose (SPEC §16)
                        "provisioning": {"allow_any_gitlab_user": True}}
ED_PEM = ed25519.Ed25519PrivateKey.generate().private_bytes(
    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()


def build(**top: Any) -> Config:
    data = copy.deepcopy(BASE)
    data.update(top)
    return build_config(data, env={})


def problems(**top: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        build(**top)
    return info.value.problems


def test_upstreams_are_read_with_their_options():
    cfg = build(upstreams=[
        {"match": {"host": "Grafana.example.com"}, "url": "http://127.0.0.1:3000/", "timeout": "5s",
         "websockets": False},
        {"match": {"path_prefix": "/docs/"}, "url": "http://127.0.0.1:8081", "strip_prefix": True},
        {"url": "http://127.0.0.1:8080"},
    ])
    first, docs, rest = cfg.routing
    assert (first.host, first.upstream.url, first.upstream.timeout, first.upstream.websockets) == (
        "grafana.example.com", "http://127.0.0.1:3000", 5.0, False)
    assert (docs.path_prefix, docs.strip_prefix, docs.upstream.connect_timeout) == ("/docs/", True, 5.0)
    assert rest.host is None and rest.path_prefix is None
    assert cfg.upstream.url == "http://127.0.0.1:3000"  # what one-upstream messages show
    assert cfg.redirect_domains == ("grafana.example.com",)


def test_the_single_upstream_keeps_working():
    cfg = build(upstream={"url": "http://127.0.0.1:9000"})
    assert len(cfg.routing) == 1 and cfg.routing[0].upstream.url == "http://127.0.0.1:9000"
    assert cfg.routing[0].host is None and cfg.upstreams == ()


def test_policy_is_read():
    cfg = build(policy=[
        {"match": {"path": "^/admin/", "methods": ["post", "DELETE"]}, "allowed_groups": ["acme/sre"]},
        {"match": {"host": ".example.com"}, "allowed_users": ["alice"], "allowed_groups": ["ops"]},
        {"match": {"path": "^/healthz$"}, "public": True},
        {"match": {"path": "^/"}},
    ])
    a, b, c, d = cfg.policy
    assert (a.path, a.methods, a.allowed_groups) == ("^/admin/", ("POST", "DELETE"), ("acme/sre",))
    assert a.where == "policy[0]"
    assert (b.host, b.allowed_users, b.allowed_groups) == (".example.com", ("alice",), ("ops",))
    assert c.public and d.allowed_groups is None and d.allowed_users is None and not d.public


@pytest.mark.parametrize(("top", "expected"), [
    ({"upstream": {"url": "http://a:1"}, "upstreams": [{"url": "http://b:1"}]}, "upstreams: set either upstream"),
    ({"upstreams": []}, "upstreams: must be a non-empty list"),
    ({"upstreams": [{"match": {"host": "a.example.com"}}]}, "upstreams[0].url: is required"),
    ({"upstreams": [{"url": "ftp://x"}]}, "upstreams[0].url: must be an http(s) URL"),
    ({"upstreams": [{"url": "http://x", "timout": "5s"}]}, "upstreams[0].timout: unknown key (did you mean timeout?)"),
    ({"upstreams": [{"url": "http://x", "match": {"hots": "a"}}]}, "upstreams[0].match.hots: unknown key"),
    ({"upstreams": [{"url": "http://x", "match": {"host": "a.example.com:443"}}]}, "upstreams[0].match.host:"),
    ({"upstreams": [{"url": "http://x", "match": {"path_prefix": "docs"}}]}, "upstreams[0].match.path_prefix:"),
    ({"upstreams": [{"url": "http://x", "match": {"path_prefix": "/a/../b"}}]}, "upstreams[0].match.path_prefix:"),
    ({"upstreams": [{"url": "http://x", "strip_prefix": True}]}, "upstreams[0].strip_prefix: needs match.path_prefix"),
    ({"upstreams": [{"url": "http://x", "strip_prefix": "yes"}]}, "upstreams[0].strip_prefix: must be true or false"),
    ({"policy": {"match": {}}}, "policy: must be a list"),
    ({"policy": ["^/admin"]}, "policy[0]: must be a mapping"),
    ({"policy": [{"match": {"path": "(unclosed"}}]}, "policy[0].match.path: '(unclosed' is not a valid regular"),
    ({"policy": [{"match": {"path": ""}}]}, "policy[0].match.path: must be a regular expression"),
    ({"policy": [{"match": {"pth": "^/"}}]}, "policy[0].match.pth: unknown key (did you mean path?)"),
    ({"policy": [{"match": {"methods": "GET"}}]}, "policy[0].match.methods: must be a list"),
    ({"policy": [{"match": {"methods": ["GE T"]}}]}, "policy[0].match.methods: must be a list"),
    ({"policy": [{"allowed_group": ["x"]}]}, "policy[0].allowed_group: unknown key (did you mean allowed_groups?)"),
    ({"policy": [{"allowed_groups": []}]}, "policy[0].allowed_groups: must name at least one"),
    ({"policy": [{"allowed_users": "alice"}]}, "policy[0].allowed_users: must be a list of strings"),
    ({"policy": [{"allowed_groups": ["sre", "a,b"]}]}, "policy[0].allowed_groups[1]: 'a,b' cannot match"),
    ({"policy": [{"allowed_users": [" alice"]}]}, "policy[0].allowed_users[0]: ' alice' cannot match"),
    ({"policy": [{"public": "yes"}]}, "policy[0].public: must be true or false"),
    ({"policy": [{"public": True, "allowed_users": ["a"]}]}, "policy[0].public: cannot be combined"),
    ({"headers": {"assertion": "X-Gateway-Assertion"}}, "headers.assertion_keys: needs at least one PEM"),
    ({"headers": {"assertion": "X-Forwarded-User", "assertion_keys": [ED_PEM]}}, "headers.assertion: must differ"),
    ({"headers": {"assertion_keys": "pem"}}, "headers.assertion_keys: must be a list"),
    ({"headers": {"assertion_keys_file": "/nonexistent/k.pem"}}, "headers.assertion_keys_file: cannot read"),
    ({"headers": {"assertion_keys_file": "/x", "assertion_keys": []}}, "headers.assertion_keys_file: set either"),
])
def test_problems_name_their_key_path(top, expected):
    found = problems(**top)
    assert any(p.startswith(expected) for p in found), found


def test_key_files_may_hold_several_keys(tmp_path: Path):
    other = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
    (tmp_path / "keys.pem").write_text(ED_PEM + other)
    cfg = build(headers={"assertion": "X-Gateway-Assertion", "assertion_keys_file": str(tmp_path / "keys.pem")})
    assert cfg.headers.assertion_keys == (ED_PEM.strip(), other.strip())
    cfg = build(headers={"assertion_keys_file": [str(tmp_path / "keys.pem")]})
    assert len(cfg.headers.assertion_keys) == 2


def test_a_bad_key_is_never_echoed():
    found = problems(headers={"assertion_keys": ["-----BEGIN PRIVATE KEY-----\nc2VjcmV0\n-----END PRIVATE KEY-----"]})
    assert "c2VjcmV0" not in "\n".join(found)


def test_placeholders_in_upstreams_are_named_by_their_own_key_path():
    cfg = build(upstreams=[{"match": {"host": "a.corp"}, "url": "http://127.0.0.1:3000"},
                           {"url": "http://tool.example.com:8080"}])
    assert [w.split(":")[0] for w in placeholder_warnings(cfg)] == ["upstreams[1].url"]
    cfg = build(upstreams=[{"url": "http://grafana.example.com"}])
    assert [w.split(":")[0] for w in placeholder_warnings(cfg)] == ["upstreams[0].url"]
