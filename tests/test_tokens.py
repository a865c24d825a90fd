"""Personal access tokens (SPEC §14): bearer tokens through the proxy and /auth, revocation within a second,
bad tokens as 401 JSON with a bounded negative cache, usage written off the request path, the same-origin
{prefix}/api/tokens, the admin API, `gateway tokens ...` and GitLab access tokens."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway import keys
from gateway.services import tokens as svc_tokens
from gateway.sessions.tokens import TokenStore
from tests.conftest import audit_actions, echoed_headers, session_cookie
from tests.test_admin_cli import Cli

ON = {"enabled": True}


async def _admin_token(gw: Any, login: str = "alice", **extra: Any) -> dict[str, Any]:
    async with gw.admin() as admin:
        r = await admin.post("/api/v1/tokens", json={"login": login, "name": "ci job", **extra})
        assert r.status == 201, await r.text()
        return dict(await r.json())


async def _get(gw: Any, path: str, token: str | None, **headers: str) -> aiohttp.ClientResponse:
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    async with aiohttp.ClientSession() as http:
        r = await http.get(gw.public_url + path, headers=headers, allow_redirects=False)
        await r.read()
        return r


def _store(gw: Any) -> TokenStore:
    store = gw.public_app[keys.SESSIONS].tokens
    assert store is not None
    return store


async def _refused_within_a_second(gw: Any, token: str) -> None:
    # NOTIFY makes it about instant; the bound is loose so that a busy machine does not fail the test.
    for _ in range(250):
        r = await _get(gw, "/tool", token)
        if r.status == 401:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the token was still accepted a second later")


async def test_a_token_is_its_owner_through_the_proxy_and_never_reaches_the_upstream(gateway_factory):
    gw = await gateway_factory(tokens=ON)
    await session_cookie(gw, "alice")
    made = await _admin_token(gw)
    secret = made["token"]
    assert secret.startswith("gwp_") and len(secret) == 44 and svc_tokens.looks_like_ours(secret)
    async with aiohttp.ClientSession() as http:
        r = await http.get(gw.public_url + "/tool?x=1", headers={"Authorization": f"Bearer {secret}"})
        assert r.status == 200
        seen = echoed_headers(await r.json())
    assert seen["x-forwarded-user"] == ["alice"]
    assert seen["x-forwarded-groups"] == ["gateway-users"]
    assert "authorization" not in seen
    r = await _get(gw, "/oauth2/auth", secret)
    assert r.status == 202 and r.headers["X-Auth-Request-User"] == "alice"


async def test_a_token_is_stored_only_as_its_hash(gateway_factory, db):
    gw = await gateway_factory(tokens=ON)
    await session_cookie(gw, "alice")
    secret = (await _admin_token(gw))["token"]
    row = await db.fetchrow("SELECT * FROM tokens")
    assert bytes(row["hash"]) == svc_tokens.digest(secret)
    assert secret not in str(dict(row)) and secret[4:] not in str(await audit_actions(db))


async def test_revocation_and_deactivation_are_refused_within_a_second(gateway_factory):
    gw = await gateway_factory(tokens=ON)
    await session_cookie(gw, "alice")
    first, second = (await _admin_token(gw))["token"], await _admin_token(gw)
    assert (await _get(gw, "/tool", first)).status == 200
    assert (await _get(gw, "/tool", second["token"])).status == 200
    async with gw.admin() as admin:
        assert (await admin.delete(f"/api/v1/tokens/{second['id']}")).status == 204
    await _refused_within_a_second(gw, second["token"])
    assert (await _get(gw, "/tool", first)).status == 200
    async with gw.admin() as admin:
        assert (await admin.patch("/api/v1/users/alice", json={"active": False})).status == 200
    await _refused_within_a_second(gw, first)
    async with gw.admin() as admin:  # reactivated: the token works again (it was neither revoked nor expired)
        assert (await admin.patch("/api/v1/users/alice", json={"active": True})).status == 200
    for _ in range(250):
        if (await _get(gw, "/tool", first)).status == 200:
            break
        await asyncio.sleep(0.02)
    else:
        raise AssertionError("a reactivated owner's token stayed refused")


async def test_an_expired_token_is_refused(gateway_factory, db):
    gw = await gateway_factory(tokens=ON)
    await session_cookie(gw, "alice")
    secret = (await _admin_token(gw))["token"]
    await db.execute("UPDATE tokens SET expires_at = now() - interval '1 second'")
    r = await _get(gw, "/tool", secret)
    assert r.status == 401


@pytest.mark.parametrize("value", ["gwp_short", "gwp_" + "!" * 40, "gwp_" + "a" * 41, "Basic abc", "gwp_" + "a" * 40])
async def test_bad_tokens_are_401_json_never_a_redirect(gateway_factory, value):
    gw = await gateway_factory(tokens=ON)
    header = value if value.startswith("Basic") else f"Bearer {value}"
    r = await _get(gw, "/tool", None, Authorization=header, Accept="text/html")
    if value.startswith("Basic"):  # not a bearer token: an unauthenticated browser, sent to sign in
        assert r.status == 302
        return
    assert r.status == 401 and r.content_type == "application/json"
    assert r.headers["Cache-Control"] == "no-store"
    r = await _get(gw, "/oauth2/auth", value)
    assert r.status == 401


async def test_an_unknown_token_costs_one_query_then_none(gateway_factory):
    gw = await gateway_factory(tokens=ON)
    store = _store(gw)
    unknown = svc_tokens.generate()
    before = store.queries
    for _ in range(5):
        assert (await _get(gw, "/tool", unknown)).status == 401
    assert store.queries == before + 1
    # A revoked one: refused from then on without a query either.
    await session_cookie(gw, "alice")
    made = await _admin_token(gw)
    async with gw.admin() as admin:
        assert (await admin.delete(f"/api/v1/tokens/{made['id']}")).status == 204
    before = store.queries
    for _ in range(3):
        assert (await _get(gw, "/tool", made["token"])).status == 401
    assert store.queries == before + 1
    # Malformed tokens never cost one.
    for _ in range(3):
        assert (await _get(gw, "/tool", "gwp_x")).status == 401
    assert store.queries == before + 1


async def test_a_known_token_is_cached(gateway_factory):
    gw = await gateway_factory(tokens=ON)
    await session_cookie(gw, "alice")
    secret = (await _admin_token(gw))["token"]
    store = _store(gw)
    before = store.queries
    for _ in range(5):
        assert (await _get(gw, "/tool", secret)).status == 200
    assert store.queries == before + 1


async def test_a_token_in_the_query_string_is_ignored_and_not_logged(gateway_factory, caplog):
    gw = await gateway_factory(tokens=ON)
    await session_cookie(gw, "alice")
    secret = (await _admin_token(gw))["token"]
    caplog.set_level(logging.DEBUG)
    r = await _get(gw, f"/tool?access_token={secret}&private_token={secret}", None, Accept="text/html")
    assert r.status == 302 and "/oauth2/start" in r.headers["Location"]
    r = await _get(gw, f"/tool?access_token={secret}", None)
    assert r.status == 401
    # Our logs (aiohttp's own access log is off in `gateway run`; TestServer turns it on) hold no trace of it.
    ours = " ".join(str(r.__dict__) for r in caplog.records if r.name.startswith("gateway"))
    assert "request" in ours and secret[4:20] not in ours


async def test_with_tokens_disabled_the_authorization_header_is_the_tools(gateway_factory):
    gw = await gateway_factory()
    cookie = await session_cookie(gw, "alice")
    async with aiohttp.ClientSession() as http:
        r = await http.get(gw.public_url + "/tool", headers={
            "Authorization": "Bearer gwp_" + "a" * 40, "Cookie": f"{gw.config.session.cookie_name}={cookie}"})
        assert r.status == 200
        assert echoed_headers(await r.json())["authorization"] == ["Bearer gwp_" + "a" * 40]
        r = await http.get(gw.public_url + "/oauth2/api/tokens",
                           headers={"Cookie": f"{gw.config.session.cookie_name}={cookie}"})
        assert r.status == 404


async def test_a_token_follows_the_policy_of_its_owner(gateway_factory):
    policy = [{"match": {"path": "^/ops/"}, "allowed_groups": ["sre"]}]
    gw = await gateway_factory(tokens=ON, policy=policy)
    await session_cookie(gw, "alice")
    secret = (await _admin_token(gw))["token"]
    assert (await _get(gw, "/tool", secret)).status == 200
    r = await _get(gw, "/ops/x", secret, Accept="text/html")
    assert r.status == 403
    async with gw.admin() as admin:
        r = await admin.post("/api/v1/groups", json={"name": "sre"})
        group = await r.json()
        assert (await admin.post(f"/api/v1/groups/{group['id']}/members", json={"login": "alice"})).status == 201
    for _ in range(500):
        if (await _get(gw, "/ops/x", secret)).status == 200:
            break
        await asyncio.sleep(0.02)
    else:
        raise AssertionError("the owner's new group did not reach the token")


async def test_last_used_and_new_addresses_are_written_off_the_request_path(gateway_factory, db):
    gw = await gateway_factory(tokens=ON)
    await session_cookie(gw, "alice")
    secret = (await _admin_token(gw))["token"]
    for _ in range(3):
        assert (await _get(gw, "/tool", secret)).status == 200
    assert await db.fetchval("SELECT last_used_at FROM tokens") is None  # not on the request path
    await _store(gw).flush()
    first = await db.fetchval("SELECT last_used_at FROM tokens")
    assert first is not None
    assert (await _get(gw, "/tool", secret)).status == 200
    await _store(gw).flush()
    assert await db.fetchval("SELECT last_used_at FROM tokens") == first  # at most once a minute
    uses = [e for e in await audit_actions(db) if e[0] == "token.used_from_new_address"]
    assert len(uses) == 1 and uses[0][1] == "alice" and uses[0][2]["address"] == "127.0.0.1"
    created = [e for e in await audit_actions(db) if e[0] == "token.created"]
    assert created[0][2]["name"] == "ci job"


async def test_own_tokens_api_is_same_origin_and_signed_in(gateway_factory, db):
    gw = await gateway_factory(tokens=ON)
    cookie = await session_cookie(gw, "alice")
    jar = {"Cookie": f"{gw.config.session.cookie_name}={cookie}"}
    same = {**jar, "Origin": gw.public_url}
    url = gw.public_url + "/oauth2/api/tokens"
    async with aiohttp.ClientSession() as http:
        assert (await http.post(url, json={"name": "x"})).status == 401  # not signed in
        r = await http.post(url, json={"name": "x"}, headers={**jar, "Origin": "https://evil.example"})
        assert r.status == 403
        assert (await http.post(url, json={"name": "x"}, headers=jar)).status == 403  # no Origin at all
        assert await db.fetchval("SELECT count(*) FROM tokens") == 0
        r = await http.post(url, json={"name": "laptop", "expires_in_days": 7}, headers=same)
        assert r.status == 201
        made = await r.json()
        assert made["login"] == "alice" and made["token"].startswith("gwp_")
        r = await http.post(url, json={"name": "x", "expires_in_days": 91}, headers=same)
        assert r.status == 422
        r = await http.get(url, headers=jar)
        listed = await r.json()
        assert [t["name"] for t in listed["items"]] == ["laptop"] and "token" not in listed["items"][0]
        # A token cannot manage tokens.
        r = await http.get(url, headers={"Authorization": f"Bearer {made['token']}"})
        assert r.status == 401
        assert (await http.delete(f"{url}/{made['id']}", headers=jar)).status == 403
        assert (await http.delete(f"{url}/{made['id']}", headers=same)).status == 204
        assert (await http.delete(f"{url}/{made['id']}", headers=same)).status == 404
    await _refused_within_a_second(gw, made["token"])


async def test_one_cannot_revoke_someone_elses_token(gateway_factory):
    gw = await gateway_factory(tokens=ON)
    await session_cookie(gw, "alice")
    bob = await session_cookie(gw, "bob", uid=11)
    made = await _admin_token(gw, "alice")
    async with aiohttp.ClientSession() as http:
        r = await http.delete(f"{gw.public_url}/oauth2/api/tokens/{made['id']}", headers={
            "Cookie": f"{gw.config.session.cookie_name}={bob}", "Origin": gw.public_url})
        assert r.status == 404
    assert (await _get(gw, "/tool", made["token"])).status == 200


async def test_admin_api_refuses_bad_input(gateway_factory):
    gw = await gateway_factory(tokens=ON)
    await session_cookie(gw, "alice")
    async with gw.admin() as admin:
        assert (await admin.post("/api/v1/tokens", json={"login": "nobody", "name": "x"})).status == 404
        assert (await admin.post("/api/v1/tokens", json={"login": "alice", "name": ""})).status == 422
        assert (await admin.post("/api/v1/tokens", json={"login": "alice", "name": "a\nb"})).status == 422
        assert (await admin.post("/api/v1/tokens", json={"login": "alice", "name": "x",
                                                         "expires_in_days": 0})).status == 422
        assert (await admin.delete("/api/v1/tokens/abc")).status == 404
        assert (await admin.delete("/api/v1/tokens/99999")).status == 404
        await admin.patch("/api/v1/users/alice", json={"active": False})
        assert (await admin.post("/api/v1/tokens", json={"login": "alice", "name": "x"})).status == 422


async def test_cli_creates_lists_and_revokes(gateway_factory, write_config, db):
    gw = await gateway_factory(tokens=ON)
    await session_cookie(gw, "alice")
    cli = Cli(write_config(tokens={"enabled": True, "max_lifetime": "30d"}))
    made = await cli.json("tokens", "create", "alice", "--name", "deploy", "--days", "10")
    assert made["token"].startswith("gwp_")
    assert (await _get(gw, "/tool", made["token"])).status == 200
    listed = await cli.json("tokens", "list", "--login", "alice")
    assert [t["id"] for t in listed["items"]] == [made["id"]]
    await cli("tokens", "create", "alice", "--name", "x", "--days", "31", expect=2)
    out, _ = await cli("tokens", "revoke", str(made["id"]))
    assert "revoked" in out
    await _refused_within_a_second(gw, made["token"])
    assert (await cli.json("tokens", "list"))["items"] == []
    assert len((await cli.json("tokens", "list", "--all"))["items"]) == 1


async def test_gitlab_access_tokens_map_to_existing_active_users(gateway_factory):
    gw = await gateway_factory(tokens={"enabled": True, "accept_gitlab_tokens": True})
    await session_cookie(gw, "alice")
    pat = gw.fake.add_personal_access_token("alice")
    gw.fake.add_user(30, "stranger", name="Stranger", email="s@example.com")
    stranger = gw.fake.add_personal_access_token("stranger")
    calls = lambda: sum(1 for _, p in gw.fake.requests if p.startswith("/api/v4/user"))  # noqa: E731
    before = calls()
    for _ in range(3):
        r = await _get(gw, "/tool", pat)
        assert r.status == 200
    assert calls() == before + 1  # checked once, then cached by hash
    assert (await _get(gw, "/tool", stranger)).status == 401  # no sign-up through tokens
    assert (await _get(gw, "/tool", "glpat-not-a-real-token")).status == 401
    gw.fake.revoke_token(pat)
    assert (await _get(gw, "/tool", pat)).status == 200  # cached for session.check_interval (30 s here)


async def test_without_accept_gitlab_tokens_other_bearer_tokens_pass_through(gateway_factory):
    gw = await gateway_factory(tokens=ON)
    cookie = await session_cookie(gw, "alice")
    async with aiohttp.ClientSession() as http:
        r = await http.get(gw.public_url + "/tool", headers={
            "Authorization": "Bearer tool-own-token", "Cookie": f"{gw.config.session.cookie_name}={cookie}"})
        assert r.status == 200
        assert echoed_headers(await r.json())["authorization"] == ["Bearer tool-own-token"]


@given(st.text(max_size=60))
def test_only_the_exact_shape_is_ours(text):
    assert svc_tokens.looks_like_ours(text) == (
        len(text) == 44 and text.startswith("gwp_") and all(c.isascii() and c.isalnum() for c in text[4:]))


def test_generated_tokens_have_the_documented_shape():
    made = {svc_tokens.generate() for _ in range(200)}
    assert len(made) == 200 and all(svc_tokens.looks_like_ours(t) for t in made)
