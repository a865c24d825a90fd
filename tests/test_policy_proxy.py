"""SPEC §13 in proxy mode, through real servers: routing to two upstreams by host and path prefix, each rule
kind, the 403 page and JSON, Host spoofing, the assertion header and the JWKS."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import asyncpg
import jwt
import pytest
from conftest import Gateway
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from yarl import URL

from gateway import keys

ES_PEM = ec.generate_private_key(ec.SECP256R1()).private_bytes(
    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
ED_PEM = ed25519.Ed25519PrivateKey.generate().private_bytes(
    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()


POLICY: list[dict[str, Any]] = [
    {"match": {"path": "^/admin/", "methods": ["POST", "DELETE"]}, "allowed_groups": ["sre"]},
    {"match": {"host": "grafana.test", "path": "^/api/"}, "allowed_users": ["alice"]},
    {"match": {"path": "^/healthz$"}, "public": True},
    {"match": {"path": "^/team/"}, "allowed_groups": ["sre", "ops"]},
]


async def start(gateway_factory: Any, db: asyncpg.Pool, tools: dict[str, str], **extra: Any) -> Gateway:
    await db.execute("INSERT INTO groups (name) VALUES ('sre'), ('ops')")
    sections: dict[str, Any] = {
        "upstreams": [
            {"match": {"host": "grafana.test"}, "url": tools["grafana"], "timeout": "5s"},
            {"match": {"host": "tools.test", "path_prefix": "/docs/"}, "url": tools["docs"], "strip_prefix": True},
            {"match": {"host": "tools.test"}, "url": tools["grafana"] + "/"},
        ],
        "policy": POLICY,
        "headers": {"assertion": "X-Gateway-Assertion", "assertion_keys": [ES_PEM, ED_PEM]},
    }
    sections.update(extra)
    gw: Gateway = await gateway_factory(**sections)
    gw.fake.add_group(1, "sre")
    gw.fake.add_user(10, "alice")
    gw.fake.add_user(11, "bob")
    gw.fake.add_member("alice", "sre")
    return gw


async def cookie_of(gw: Gateway, login: str) -> str:
    async with gw.browser() as b:
        await b.sign_in(login)
        value = b.cookie(gw.config.session.cookie_name)
    assert value
    return value


async def call(gw: Gateway, path: str, *, host: str = "grafana.test", cookie: str | None = None,
               method: str = "GET", html: bool = False, headers: dict[str, str] | None = None
               ) -> tuple[int, Any, aiohttp.ClientResponse]:
    """One request with a chosen Host header; (status, JSON or text body, response)."""
    sent = {"Host": host, **(headers or {})}
    if cookie:
        sent["Cookie"] = f"{gw.config.session.cookie_name}={cookie}"
    if html:
        sent["Accept"] = "text/html"
    async with aiohttp.ClientSession() as http, http.request(
            method, URL(gw.public_url + path, encoded=True), headers=sent, allow_redirects=False) as r:
        text = await r.text()
        body: Any = json.loads(text) if r.content_type == "application/json" else text
        return r.status, body, r


def header(payload: dict[str, Any], name: str) -> list[str]:
    return [v for k, v in payload["headers"] if k.lower() == name.lower()]


async def test_host_and_prefix_routing_to_two_upstreams(gateway_factory, db, tools):
    gw = await start(gateway_factory, db, tools)
    alice = await cookie_of(gw, "alice")
    status, body, _ = await call(gw, "/d/1?x=1", cookie=alice)
    assert (status, body["name"], body["path"]) == (200, "grafana", "/d/1?x=1")
    status, body, _ = await call(gw, "/docs/intro?q=1", host="tools.test", cookie=alice)
    assert (status, body["name"], body["path"]) == (200, "docs", "/intro?q=1")  # strip_prefix
    status, body, _ = await call(gw, "/docs", host="tools.test", cookie=alice)
    assert (status, body["name"], body["path"]) == (200, "grafana", "/docs")  # "/docs/" needs the slash
    # Spellings of the same host: same upstream.
    for spelling in ("GRAFANA.test", "grafana.test:8443", "grafana.test."):
        status, body, _ = await call(gw, "/x", host=spelling, cookie=alice)
        assert (status, body["name"]) == (200, "grafana"), spelling


@pytest.mark.parametrize("host", ["evil.test", "grafana.test.evil.test", "xgrafana.test", "grafana.test@evil",
                                  "127.0.0.1", "grafana.test, tools.test"])
async def test_an_unknown_host_is_a_404_never_the_first_upstream(gateway_factory, db, tools, host):
    gw = await start(gateway_factory, db, tools)
    alice = await cookie_of(gw, "alice")
    status, body, r = await call(gw, "/x", host=host, cookie=alice, html=True)
    assert status == 404 and "No application is served at this address" in body
    assert r.headers["Cache-Control"] == "no-store"
    status, body, _ = await call(gw, "/x", host=host, cookie=alice)
    assert status == 404 and body["error"] == "unknown_host"


async def test_forwarded_host_counts_only_from_a_trusted_proxy(gateway_factory, db, tools):
    gw = await start(gateway_factory, db, tools)
    bob = await cookie_of(gw, "bob")
    # Untrusted client: its X-Forwarded-Host is ignored for routing AND for the policy (bob stays refused).
    assert (await call(gw, "/api/x", cookie=bob, headers={"X-Forwarded-Host": "tools.test"}))[0] == 403
    assert (await call(gw, "/x", host="evil.test", cookie=bob, headers={"X-Forwarded-Host": "grafana.test"}))[0] == 404


async def test_forwarded_host_from_a_trusted_proxy_selects(gateway_factory, db, tools):
    gw = await start(gateway_factory, db, tools, server={"trusted_proxies": ["127.0.0.1/32"]})
    alice = await cookie_of(gw, "alice")
    status, body, _ = await call(gw, "/docs/a", host="evil.test", cookie=alice,
                                 headers={"X-Forwarded-Host": "tools.test"})
    assert (status, body["name"], body["path"]) == (200, "docs", "/a")


async def test_absolute_form_request_line_cannot_pick_an_upstream(gateway_factory, db, tools):
    gw = await start(gateway_factory, db, tools)
    port = URL(gw.public_url).port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET http://grafana.test/api/x HTTP/1.1\r\nHost: tools.test\r\nConnection: close\r\n\r\n")
    await writer.drain()
    status_line = await reader.readline()
    writer.close()
    assert status_line.split()[1] == b"400"


async def test_each_rule_kind(gateway_factory, db, tools):
    gw = await start(gateway_factory, db, tools)
    alice, bob = await cookie_of(gw, "alice"), await cookie_of(gw, "bob")
    # public: no sign-in, no identity; with a session, identity headers are set
    status, body, _ = await call(gw, "/healthz")
    assert status == 200 and not header(body, "X-Forwarded-User") and not header(body, "X-Gateway-Assertion")
    status, body, _ = await call(gw, "/healthz", cookie=bob)
    assert header(body, "X-Forwarded-User") == ["bob"]
    # a path not in normal form never rides the public rule
    status, _, r = await call(gw, "/healthz/.", html=True)
    assert status == 302 and "/oauth2/start" in r.headers["Location"]
    # groups + methods
    assert (await call(gw, "/admin/x", method="POST", cookie=alice))[0] == 200
    assert (await call(gw, "/admin/x", method="POST", cookie=bob))[0] == 403
    assert (await call(gw, "/admin/./x", method="POST", cookie=bob))[0] == 403
    assert (await call(gw, "/%61dmin/x", method="POST", cookie=bob))[0] == 403
    assert (await call(gw, "/admin/x", method="GET", cookie=bob))[0] == 200
    # users + host
    assert (await call(gw, "/api/x", cookie=alice))[0] == 200
    assert (await call(gw, "/api/x", cookie=bob))[0] == 403
    for spelling in ("GRAFANA.test", "grafana.test:8443", "grafana.test.", "Grafana.Test.:1"):
        assert (await call(gw, "/api/x", host=spelling, cookie=bob))[0] == 403, spelling
    assert (await call(gw, "/api/x", host="tools.test", cookie=bob))[0] == 200
    # default: signed in
    status, _, r = await call(gw, "/other", html=True)
    assert status == 302
    assert (await call(gw, "/other"))[0] == 401
    assert (await call(gw, "/other", cookie=bob))[0] == 200


async def test_the_403_page_and_json_name_who_would_pass(gateway_factory, db, tools, caplog):
    gw = await start(gateway_factory, db, tools)
    bob = await cookie_of(gw, "bob")
    status, page, r = await call(gw, "/team/plan?x=1", cookie=bob, html=True)
    assert status == 403 and r.headers["Cache-Control"] == "no-store"
    refusals = [rec for rec in caplog.records if rec.getMessage() == "refused by policy"]
    assert [getattr(rec, "rule", None) for rec in refusals] == ["policy[3]"]
    assert "Only members of the groups “ops” or “sre” can use this page." in page
    assert 'href="/oauth2/sign_out?rd=%2Foauth2%2Fstart%3Frd%3D%252Fteam%252Fplan%253Fx%253D1"' in page
    assert "Sign in with another account" in page
    assert f'id="gitlab-sign-out" href="{gw.fake_url}/"' in page and "then choose Sign in with another account" in page
    status, body, _ = await call(gw, "/team/plan", cookie=bob)
    assert status == 403 and body == {
        "error": "forbidden", "message": "Only members of the groups “ops” or “sre” can use this page.",
        "allowed_groups": ["ops", "sre"], "specific_users": False}
    status, body, _ = await call(gw, "/api/x", cookie=bob)
    assert body["message"] == "Only specific users can use this page." and body["specific_users"] is True
    # The link works: it signs bob out and starts a new sign-in that comes back to the page.
    async with gw.browser() as b:
        await b.sign_in("bob")
        r = await b.get("/oauth2/sign_out?rd=%2Foauth2%2Fstart%3Frd%3D%252Fteam%252Fplan")
        assert r.status == 302 and r.headers["Location"] == "/oauth2/start?rd=%2Fteam%2Fplan"


async def test_membership_change_applies_without_restart(gateway_factory, db, tools):
    gw = await start(gateway_factory, db, tools)
    bob = await cookie_of(gw, "bob")
    assert (await call(gw, "/team/x", cookie=bob))[0] == 403
    async with gw.admin() as admin:
        groups = await (await admin.get("/api/v1/groups")).json()
        ops = next(g for g in groups["items"] if g["name"] == "ops")
        r = await admin.post(f"/api/v1/groups/{ops['id']}/members", json={"login": "bob"})
        assert r.status in (200, 201), await r.text()
    for _ in range(200):  # NOTIFY arrives within a second; a busy machine gets ten
        if (await call(gw, "/team/x", cookie=bob))[0] == 200:
            break
        await asyncio.sleep(0.05)
    assert (await call(gw, "/team/x", cookie=bob))[0] == 200


async def test_assertion_header_verifies_with_the_published_jwks(gateway_factory, db, tools):
    gw = await start(gateway_factory, db, tools)
    alice = await cookie_of(gw, "alice")
    forged = "eyJhbGciOiJub25lIn0.eyJsb2dpbiI6Im1hbGxvcnkifQ."
    _, body, _ = await call(gw, "/d", cookie=alice, headers={"X-Gateway-Assertion": forged,
                                                              "X_Gateway_Assertion": forged})
    tokens = header(body, "X-Gateway-Assertion")
    assert len(tokens) == 1 and tokens[0] != forged and not header(body, "X_Gateway_Assertion")
    async with aiohttp.ClientSession() as http:
        async with http.get(gw.public_url + "/oauth2/jwks.json") as r:
            assert r.status == 200 and r.headers["Cache-Control"] == "public, max-age=300"
            jwks = await r.json()
        async with http.get(gw.admin_url + "/jwks.json") as r:
            assert r.status == 200 and await r.json() == jwks
    assert [k["alg"] for k in jwks["keys"]] == ["ES256", "EdDSA"]
    keys = {k.key_id: k for k in jwt.PyJWKSet.from_dict(jwks).keys}
    token = tokens[0]
    claims = jwt.decode(token, keys[jwt.get_unverified_header(token)["kid"]].key, algorithms=["ES256"],
                        audience=tools["grafana"], issuer=gw.config.server.public_url)
    assert claims["login"] == "alice" and claims["sub"] == "10" and claims["groups"] == ["gateway-users", "sre"]
    assert claims["exp"] - claims["iat"] == 300 and alice not in token
    # The docs upstream gets a token for its own audience; one for grafana does not verify there.
    _, body, _ = await call(gw, "/docs/x", host="tools.test", cookie=alice)
    docs_token = header(body, "X-Gateway-Assertion")[0]
    key = keys[jwt.get_unverified_header(docs_token)["kid"]].key
    assert jwt.decode(docs_token, key, algorithms=["ES256"], audience=tools["docs"])["sid"] == claims["sid"]
    with pytest.raises(jwt.InvalidAudienceError):
        jwt.decode(token, key, algorithms=["ES256"], audience=tools["docs"])
    # Anonymous on a public route: no assertion at all.
    _, body, _ = await call(gw, "/healthz", headers={"X-Gateway-Assertion": forged})
    assert not header(body, "X-Gateway-Assertion")


async def test_jwks_is_404_without_keys(gateway_factory):
    gw = await gateway_factory()
    async with aiohttp.ClientSession() as http, http.get(gw.public_url + "/oauth2/jwks.json") as r:
        assert r.status == 404


async def test_redirects_accept_every_upstream_host(gateway_factory, db, tools):
    gw = await start(gateway_factory, db, tools)
    async with gw.browser() as b:
        r = await b.sign_in("alice", rd="http://grafana.test/d/1")
        assert r.headers["Location"] == "http://grafana.test/d/1"
        r = await b.sign_in("alice", rd="http://evil.test/d/1")
        assert r.headers["Location"] == "/"


async def test_deciding_touches_no_database(gateway_factory, db, tools):
    gw = await start(gateway_factory, db, tools)
    alice, bob = await cookie_of(gw, "alice"), await cookie_of(gw, "bob")
    store = gw.public_app[keys.SESSIONS]
    for who in (alice, bob):  # the first request of each session on this process may look it up
        await call(gw, "/x", cookie=who)
    before = store.queries
    for path, method, who, status in (("/admin/x", "POST", alice, 200), ("/admin/x", "POST", bob, 403),
                                      ("/api/x", "GET", bob, 403), ("/healthz", "GET", None, 200),
                                      ("/team/a", "GET", alice, 200), ("/other", "GET", None, 401)):
        assert (await call(gw, path, method=method, cookie=who))[0] == status
    assert store.queries == before
