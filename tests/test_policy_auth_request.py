"""SPEC §13 in auth_request mode: the policy judges the ORIGINAL request nginx describes in
X-Forwarded-Method/-Host/-Uri (believed only from trusted_proxies), `?allowed_groups=` narrows further, and a
202 carries X-Auth-Request-Assertion. First against the gateway directly, then through a real nginx with
deploy/nginx/several_tools.conf as shipped."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import aiohttp
import asyncpg
import jwt
import pytest
from conftest import Gateway, echoed_headers
from test_nginx import NGINX, run_nginx
from test_policy_proxy import ED_PEM, ES_PEM, cookie_of
from yarl import URL

# The policy of the comment at the top of deploy/nginx/several_tools.conf, plus a host rule.
POLICY: list[dict[str, Any]] = [
    {"match": {"path": "^/docs/public/"}, "public": True},
    {"match": {"path": "^/docs/", "methods": ["POST", "PUT", "PATCH", "DELETE"]}, "allowed_groups": ["writers"]},
    {"match": {"path": "^/admin/"}, "allowed_users": ["alice"]},
    {"match": {"host": "grafana.test"}, "allowed_groups": ["sre"]},
]


async def start(gateway_factory: Any, db: asyncpg.Pool, tools: dict[str, str], **server: Any) -> Gateway:
    await db.execute("INSERT INTO groups (name) VALUES ('writers'), ('sre')")
    gw: Gateway = await gateway_factory(
        server=server,
        upstreams=[{"match": {"path_prefix": "/docs/"}, "url": tools["docs"]}, {"url": tools["grafana"]}],
        policy=POLICY, headers={"assertion": "X-Gateway-Assertion", "assertion_keys": [ED_PEM, ES_PEM]})
    gw.fake.add_group(1, "writers")
    gw.fake.add_group(2, "sre")
    gw.fake.add_user(10, "alice")
    gw.fake.add_user(11, "bob")
    gw.fake.add_member("alice", "writers")
    gw.fake.add_member("alice", "sre")
    return gw


async def auth(gw: Gateway, method: str | None, uri: str | None, *, cookie: str | None = None,
               host: str = "tools.test", query: str = "") -> aiohttp.ClientResponse:
    headers = {"X-Forwarded-Host": host}
    if method:
        headers["X-Forwarded-Method"] = method
    if uri:
        headers["X-Forwarded-Uri"] = uri
    if cookie:
        headers["Cookie"] = f"{gw.config.session.cookie_name}={cookie}"
    async with aiohttp.ClientSession() as http, http.get(f"{gw.public_url}/oauth2/auth{query}",
                                                         headers=headers) as r:
        await r.read()
        return r


async def test_each_rule_kind_through_auth(gateway_factory, db, tools):
    gw = await start(gateway_factory, db, tools, trusted_proxies=["127.0.0.1/32"])
    alice, bob = await cookie_of(gw, "alice"), await cookie_of(gw, "bob")
    cases = [
        ("GET", "/docs/public/x", None, "tools.test", 202),  # public
        ("GET", "/docs/./public/x", None, "tools.test", 401),  # not in normal form: never public
        ("GET", "/docs/page", None, "tools.test", 401),
        ("POST", "/docs/page", alice, "tools.test", 202),  # groups + methods
        ("POST", "/docs/page", bob, "tools.test", 403),
        ("POST", "/docs/%2e/page", bob, "tools.test", 403),
        ("GET", "/docs/page", bob, "tools.test", 202),
        ("GET", "/admin/x", alice, "tools.test", 202),  # users
        ("GET", "/admin/x", bob, "tools.test", 403),
        ("GET", "/x", bob, "grafana.test", 403),  # host
        ("GET", "/x", bob, "GRAFANA.test:443", 403),
        ("GET", "/x", alice, "grafana.test", 202),
        ("GET", "/x", bob, "tools.test", 202),  # default: signed in
        ("GET", "http://tools.test/admin/x", bob, "tools.test", 403),  # absolute form from nginx
    ]
    for method, uri, cookie, host, status in cases:
        r = await auth(gw, method, uri, cookie=cookie, host=host)
        assert r.status == status, (method, uri, host, cookie == alice)
    # A public page: no identity in the answer, even with a session.
    r = await auth(gw, "GET", "/docs/public/x", cookie=bob)
    assert r.status == 202 and "X-Auth-Request-User" in r.headers
    r = await auth(gw, "GET", "/docs/public/x")
    assert r.status == 202 and "X-Auth-Request-User" not in r.headers
    assert "X-Auth-Request-Assertion" not in r.headers
    # ?allowed_groups= still narrows: bob passes the policy for /x but is not in sre.
    assert (await auth(gw, "GET", "/x", cookie=bob, query="?allowed_groups=sre")).status == 403
    assert (await auth(gw, "GET", "/x", cookie=alice, query="?allowed_groups=sre")).status == 202
    assert (await auth(gw, "GET", "/docs/public/x", query="?allowed_groups=sre")).status == 401


async def test_forwarded_facts_from_an_untrusted_client_are_ignored(gateway_factory, db, tools):
    gw = await start(gateway_factory, db, tools)  # no trusted_proxies
    bob = await cookie_of(gw, "bob")
    # The client claims a public URI: not believed; the path is unknown, so it is never public.
    assert (await auth(gw, "GET", "/docs/public/x")).status == 401
    # Unknown method, host and URI: bob must pass every rule that could apply (he is not alice, nor in sre).
    assert (await auth(gw, "GET", "/x", cookie=bob)).status == 403
    alice = await cookie_of(gw, "alice")
    assert (await auth(gw, None, None, cookie=alice)).status == 202


async def test_the_202_carries_an_assertion_for_the_tool(gateway_factory, db, tools):
    gw = await start(gateway_factory, db, tools, trusted_proxies=["127.0.0.1/32"])
    alice = await cookie_of(gw, "alice")
    r = await auth(gw, "GET", "/docs/a", cookie=alice)
    token = r.headers["X-Auth-Request-Assertion"]
    async with aiohttp.ClientSession() as http, http.get(gw.public_url + "/oauth2/jwks.json") as jr:
        jwks = await jr.json()
    keys = {k.key_id: k.key for k in jwt.PyJWKSet.from_dict(jwks).keys}
    claims = jwt.decode(token, keys[jwt.get_unverified_header(token)["kid"]], algorithms=["EdDSA"],
                        audience=tools["docs"], issuer=gw.config.server.public_url)
    assert claims["login"] == "alice" and claims["groups"] == ["gateway-users", "sre", "writers"]


# ---- through a real nginx ----------------------------------------------------------------------------------

@pytest.mark.nginx
@pytest.mark.skipif(NGINX is None, reason="nginx is not installed (Debian: apt-get install nginx-light)")
async def test_several_tools_behind_nginx(gateway_factory, db, tools, unused_tcp_port_factory):
    nginx_port = unused_tcp_port_factory()
    nginx_url = f"http://127.0.0.1:{nginx_port}"
    gw = await start(gateway_factory, db, tools, public_url=nginx_url, trusted_proxies=["127.0.0.1/32"])
    with run_nginx("several_tools.conf", nginx_port=nginx_port, gateway=URL(gw.public_url).raw_authority,
                   upstream=URL(tools["grafana"]).raw_authority,
                   more={"127.0.0.1:8081": URL(tools["docs"]).raw_authority}):
        via: Gateway = dataclasses.replace(gw, public_url=nginx_url)
        spoof = {"X-Forwarded-User": "mallory", "X-Gateway-Assertion": "forged", "X-Forwarded-Uri": "/docs/public/",
                 "X-Forwarded-Method": "GET", "X-Auth-Request-Assertion": "forged"}

        async def call(path: str, cookie: str | None = None, method: str = "GET", host: str | None = None
                       ) -> tuple[int, Any]:
            headers = dict(spoof)
            if cookie:
                headers["Cookie"] = f"{gw.config.session.cookie_name}={cookie}"
            if host:
                headers["Host"] = host
            async with aiohttp.ClientSession() as http, http.request(
                    method, URL(nginx_url + path, encoded=True), headers=headers, allow_redirects=False) as r:
                text = await r.text()
                return r.status, json.loads(text) if r.content_type == "application/json" else r

        # Public page of the docs tool: no sign-in, and no identity reaches the tool (client copies gone).
        status, body = await call("/docs/public/intro")
        assert status == 200 and body["name"] == "docs"
        h = echoed_headers(body)
        assert "x-forwarded-user" not in h and "x-gateway-assertion" not in h and "x-auth-request-assertion" not in h
        # Not public: the gateway's sign-in redirect (also for a dot-segment spelling of the public path).
        for path in ("/docs/page", "/docs/x/../public/intro", "/"):
            status, r = await call(path)
            assert status == 302 and URL(r.headers["Location"]).path == "/oauth2/start", path

        alice, bob = await cookie_of(via, "alice"), await cookie_of(via, "bob")
        # groups + methods (the forged X-Forwarded-Method/-Uri are replaced by nginx)
        assert (await call("/docs/page", alice, "POST"))[0] == 200
        assert (await call("/docs/page", bob, "POST"))[0] == 403
        assert (await call("/docs/page", bob))[0] == 200
        # users
        assert (await call("/admin/x", alice))[0] == 200
        assert (await call("/admin/x", bob))[0] == 403
        # host
        assert (await call("/x", bob, host="grafana.test"))[0] == 403
        assert (await call("/x", alice, host="grafana.test"))[0] == 200
        # per-location narrowing in nginx (?allowed_groups=sre)
        assert (await call("/ops/x", bob))[0] == 403
        status, body = await call("/ops/x", alice)
        assert status == 200 and body["name"] == "grafana"

        # The tools get the identity and an assertion for their own audience.
        async with aiohttp.ClientSession() as http, http.get(nginx_url + "/oauth2/jwks.json") as r:
            assert r.status == 200
            jwks = await r.json()
        keys = {k.key_id: k.key for k in jwt.PyJWKSet.from_dict(jwks).keys}
        for path, tool in (("/docs/page", "docs"), ("/x", "grafana")):
            status, body = await call(path, alice)
            h = echoed_headers(body)
            assert body["name"] == tool and h["x-forwarded-user"] == ["alice"]
            token = h["x-gateway-assertion"][0]
            claims = jwt.decode(token, keys[jwt.get_unverified_header(token)["kid"]], algorithms=["EdDSA"],
                                audience=tools[tool], issuer=nginx_url)
            assert claims["login"] == "alice" and claims["sub"] == "10"
