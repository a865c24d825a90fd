"""SPEC §4 sign-in endpoints and §6 sessions: state and PKCE, cookies, refusal pages, redirects, sign-out."""

from __future__ import annotations

import json
import time
from datetime import timedelta
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import aiohttp
import asyncpg
import pytest
from conftest import SESSION_KEY, Gateway
from cryptography.fernet import Fernet
from test_redirects import _corpus_lines as corpus_lines
from yarl import URL

from gateway import keys


def set_cookie_headers(r: aiohttp.ClientResponse) -> list[str]:
    return r.headers.getall("Set-Cookie", [])


async def started(gw: Gateway, http: aiohttp.ClientSession, rd: str = "/") -> tuple[str, dict[str, list[str]]]:
    r = await http.get(f"{gw.public_url}/oauth2/start", params={"rd": rd}, allow_redirects=False)
    assert r.status == 302
    loc = r.headers["Location"]
    return loc, parse_qs(urlsplit(loc).query)


async def test_start_redirects_to_gitlab_with_pkce(gateway_factory: Any) -> None:
    gw = await gateway_factory()
    async with aiohttp.ClientSession() as http:
        r = await http.get(f"{gw.public_url}/oauth2/start?rd=/x", allow_redirects=False)
        assert r.status == 302 and r.headers["Cache-Control"] == "no-store"
        loc = r.headers["Location"]
        q = parse_qs(urlsplit(loc).query)
        assert loc.startswith(gw.fake_url + "/oauth/authorize?")
        assert q["redirect_uri"] == [f"{gw.public_url}/oauth2/callback"]
        assert q["code_challenge_method"] == ["S256"] and len(q["code_challenge"][0]) == 43
        assert q["scope"] == ["read_user read_api"] and q["response_type"] == ["code"]
        assert "nonce" not in q and len(q["state"][0]) >= 32
        (cookie,) = set_cookie_headers(r)
        assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Path=/oauth2" in cookie
        assert "Max-Age=600" in cookie and "Secure" not in cookie  # plain-http public_url
        assert cookie.startswith("_gateway_state_")


async def test_userinfo_source_asks_openid_with_nonce(gateway_factory: Any) -> None:
    gw = await gateway_factory(gitlab={"groups_source": "userinfo"})
    async with aiohttp.ClientSession() as http:
        _, q = await started(gw, http)
        assert q["scope"] == ["openid email"] and "nonce" in q


async def test_callback_without_state_cookie_is_400(gateway_factory: Any, db: asyncpg.Pool) -> None:
    gw = await gateway_factory()
    gw.fake.add_user(10, "alice")
    async with aiohttp.ClientSession() as http:
        _, q = await started(gw, http)
    # A different browser (no state cookie) presents the callback.
    async with aiohttp.ClientSession(headers={"Accept": "text/html"}) as other:
        r = await other.get(f"{gw.public_url}/oauth2/callback", params={"code": "x", "state": q["state"][0]},
                            allow_redirects=False)
        assert r.status == 400
        body = await r.text()
        assert "not started in this browser" in body and "Start again" in body
        assert 'id="retry" href="/oauth2/start?rd=%2F"' in body
    assert await db.fetchval("SELECT count(*) FROM users") == 0


async def test_callback_with_wrong_state_is_400(gateway_factory: Any) -> None:
    gw = await gateway_factory()
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        _, q = await started(gw, http)
        state = q["state"][0]
        # Same 12-character prefix (so the cookie is found) but a different state: refused in constant time.
        forged = state[:12] + ("A" if state[12] != "A" else "B") + state[13:]
        r = await http.get(f"{gw.public_url}/oauth2/callback", params={"code": "x", "state": forged},
                           allow_redirects=False)
        assert r.status == 400
        assert (await r.json())["error"] == "invalid_state"
        r = await http.get(f"{gw.public_url}/oauth2/callback", params={"code": "x"}, allow_redirects=False)
        assert r.status == 400


async def test_expired_state_cookie_is_400(gateway_factory: Any) -> None:
    gw = await gateway_factory()
    state = "s" * 43
    sealed = Fernet(SESSION_KEY.encode()).encrypt_at_time(
        json.dumps({"state": state, "verifier": "v" * 64, "nonce": None, "rd": "/"}).encode(),
        int(time.time()) - 601).decode()
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        http.cookie_jar.update_cookies({f"_gateway_state_{state[:12]}": sealed}, URL(gw.public_url))
        r = await http.get(f"{gw.public_url}/oauth2/callback", params={"code": "x", "state": state},
                           allow_redirects=False)
        # Refused by our own check, before the code goes to GitLab (which would refuse "x" anyway).
        assert r.status == 400 and "This sign-in has expired" in (await r.json())["message"]
    assert not [u for _, u in gw.fake.requests if "/oauth/token" in u]


async def test_access_denied_at_gitlab_is_403(gateway_factory: Any, db: asyncpg.Pool) -> None:
    gw = await gateway_factory()
    gw.fake.add_user(10, "alice")
    async with gw.browser() as b:
        _, q = await started(gw, b.http)
        r = await b.http.get(f"{gw.public_url}/oauth2/callback", allow_redirects=False, params={
            "error": "access_denied", "error_description": "The resource owner denied the request.",
            "state": q["state"][0]})
        assert r.status == 403
        page = await r.text()
        assert "declined" in page and 'href="/oauth2/start?rd=%2F&amp;again=access_denied"' in page
    assert await db.fetchval("SELECT count(*) FROM users") == 0


async def test_code_cannot_be_replayed(gateway_factory: Any, db: asyncpg.Pool) -> None:
    gw = await gateway_factory()
    gw.fake.add_user(10, "alice")
    async with gw.browser() as b:
        callback = await b.callback_url("alice")
        state = parse_qs(urlsplit(callback).query)["state"][0]
        r = await b.http.get(callback, allow_redirects=False)
        assert r.status == 302
        # The sign-in deletes its state cookie...
        assert any(c.startswith(f"_gateway_state_{state[:12]}=") and "Max-Age=0" in c for c in set_cookie_headers(r))
        assert b.cookie(f"_gateway_state_{state[:12]}") is None
        # ...so replaying the callback URL stops at our own state check (not only at GitLab, which refuses a used
        # code anyway): 400, and never a second session.
        exchanges = len([u for _, u in gw.fake.requests if "/oauth/token" in u])
        r2 = await b.http.get(callback, allow_redirects=False)
        assert r2.status == 400
        assert "not started in this browser" in await r2.text()
        assert len([u for _, u in gw.fake.requests if "/oauth/token" in u]) == exchanges
    assert await db.fetchval("SELECT count(*) FROM sessions") == 1


async def test_forged_state_with_a_valid_code_does_not_sign_in(gateway_factory: Any, db: asyncpg.Pool) -> None:
    """The state cookie is found by the state's first 12 characters; the whole state must still match, even when
    the code is one GitLab would accept."""
    gw = await gateway_factory()
    gw.fake.add_user(10, "alice")
    async with gw.browser() as b:
        callback = await b.callback_url("alice")
        query = parse_qs(urlsplit(callback).query)
        state, code = query["state"][0], query["code"][0]
        forged = state[:12] + ("A" if state[12] != "A" else "B") + state[13:]
        r = await b.http.get(f"{gw.public_url}/oauth2/callback", params={"code": code, "state": forged},
                             allow_redirects=False)
        assert r.status == 400
        assert "does not match" in await r.text()
        assert b.cookie("_gateway") is None
        assert await db.fetchval("SELECT count(*) FROM sessions") == 0
        # The state is checked before the code is spent: the genuine callback still signs in.
        r = await b.http.get(callback, allow_redirects=False)
        assert r.status == 302 and b.cookie("_gateway")


async def test_session_cookie_flags_and_new_id_every_sign_in(gateway_factory: Any, db: asyncpg.Pool) -> None:
    gw = await gateway_factory()
    gw.fake.add_user(10, "alice")
    async with gw.browser() as b:
        r = await b.sign_in("alice")
        session_cookie = [c for c in set_cookie_headers(r) if c.startswith("_gateway=")]
        assert session_cookie, set_cookie_headers(r)
        c = session_cookie[0]
        assert "HttpOnly" in c and "SameSite=Lax" in c and "Path=/" in c and "Max-Age=28800" in c
        first = b.cookie("_gateway")
        first_sid = await db.fetchval("SELECT id FROM sessions")
        # The server-side row ends with the cookie: session.lifetime (8 h by default) after the sign-in.
        assert await db.fetchval("SELECT expires_at - created_at FROM sessions") == timedelta(hours=8)
        await b.sign_in("alice")
        second = b.cookie("_gateway")
        assert first != second
        rows = await db.fetch("SELECT id, revoked_at FROM sessions ORDER BY created_at")
        assert len(rows) == 2 and rows[0]["id"] == first_sid
        assert rows[0]["revoked_at"] is not None and rows[1]["revoked_at"] is None  # the old one is revoked


async def test_https_public_url_makes_cookies_secure(gateway_factory: Any) -> None:
    gw = await gateway_factory(server={"public_url": "https://tool.example.com"})
    async with aiohttp.ClientSession() as http:
        r = await http.get(f"{gw.public_url}/oauth2/start", allow_redirects=False)
        assert "Secure" in set_cookie_headers(r)[0]
        assert parse_qs(urlsplit(r.headers["Location"]).query)["redirect_uri"] == [
            "https://tool.example.com/oauth2/callback"]


async def test_refusal_is_json_for_api_clients(gateway_factory: Any) -> None:
    gw = await gateway_factory(provisioning={"allow_signup": False})
    gw.fake.add_user(10, "alice")
    async with gw.browser() as b:
        b.http.headers["Accept"] = "application/json"
        r = await b.sign_in("alice", expect_status=403)
        assert await r.json() == {"error": "signup_disabled",
                                  "message": "Sign-up is disabled: ask an administrator to create your account"}


async def test_sign_out_revokes_and_clears(gateway_factory: Any, db: asyncpg.Pool) -> None:
    gw = await gateway_factory()
    gw.fake.add_user(10, "alice")
    async with gw.browser() as b:
        await b.sign_in("alice")
        assert (await b.get("/oauth2/userinfo")).status == 200
        stolen = b.cookie("_gateway")
        r = await b.get("/oauth2/sign_out?rd=/bye")
        assert r.status == 302 and r.headers["Location"] == "/bye"
        assert any(c.startswith('_gateway=""') or c.startswith("_gateway=;") for c in set_cookie_headers(r))
        assert await db.fetchval("SELECT revoked_at IS NOT NULL FROM sessions")
        assert (await b.get("/oauth2/userinfo")).status == 401
    # A copy of the cookie taken before sign-out is worthless too.
    revoked_at = await db.fetchval("SELECT revoked_at FROM sessions")
    async with aiohttp.ClientSession() as http:
        r = await http.get(f"{gw.public_url}/oauth2/userinfo", headers={"Cookie": f"_gateway={stolen}"})
        assert r.status == 401
        # Signing out with it again changes nothing: the revocation time stays what it was (it is evidence).
        r = await http.get(f"{gw.public_url}/oauth2/sign_out", headers={"Cookie": f"_gateway={stolen}"},
                           allow_redirects=False)
        assert r.status == 302
    assert await db.fetchval("SELECT revoked_at FROM sessions") == revoked_at
    assert "sign_out" in [a for (a,) in await db.fetch("SELECT action FROM audit_events")]


async def test_post_sign_out(gateway_factory: Any) -> None:
    gw = await gateway_factory()
    gw.fake.add_user(10, "alice")
    async with gw.browser() as b:
        await b.sign_in("alice")
        r = await b.http.post(f"{gw.public_url}/oauth2/sign_out", allow_redirects=False)
        assert r.status == 302 and r.headers["Location"] == "/"
        assert (await b.get("/oauth2/userinfo")).status == 401


async def test_tampered_or_foreign_cookies_are_signed_out(gateway_factory: Any) -> None:
    gw = await gateway_factory()
    gw.fake.add_user(10, "alice")
    async with gw.browser() as b:
        await b.sign_in("alice")
        good = b.cookie("_gateway")
    assert good
    foreign = Fernet(Fernet.generate_key()).encrypt(
        json.dumps({"created": int(time.time()), "session": {"sid": "x", "uid": 1}}).encode()).decode()
    tampered = good[:-6] + ("AAAAAA" if not good.endswith("AAAAAA") else "BBBBBB")
    async with aiohttp.ClientSession() as http:
        for value in (tampered, foreign, "garbage", '"', ""):
            r = await http.get(f"{gw.public_url}/oauth2/userinfo", headers={"Cookie": f"_gateway={value}"})
            assert r.status == 401, value
        r = await http.get(f"{gw.public_url}/oauth2/userinfo", headers={"Cookie": f"_gateway={good}"})
        assert r.status == 200


async def test_key_rotation(gateway_factory: Any) -> None:
    gw = await gateway_factory()
    gw.fake.add_user(10, "alice")
    async with gw.browser() as b:
        await b.sign_in("alice")
        old_cookie = b.cookie("_gateway")
    # A second gateway on the same database with a new first key still reads cookies of the old key.
    new_key = Fernet.generate_key().decode()
    gw2 = await gateway_factory(session={"secrets": [new_key, SESSION_KEY]})
    gw3 = await gateway_factory(session={"secrets": [new_key]})
    async with aiohttp.ClientSession() as http:
        r = await http.get(f"{gw2.public_url}/oauth2/userinfo", headers={"Cookie": f"_gateway={old_cookie}"})
        assert r.status == 200 and (await r.json())["user"] == "alice"
        r = await http.get(f"{gw3.public_url}/oauth2/userinfo", headers={"Cookie": f"_gateway={old_cookie}"})
        assert r.status == 401


async def test_open_redirects_refused_end_to_end(gateway_factory: Any) -> None:
    """Every corpus payload given as `rd` to sign_out (and start) ends in a redirect to `/`."""
    payloads = [unquote(line) for line in corpus_lines()]
    assert len(payloads) == 559
    gw = await gateway_factory()
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        for rd in payloads:
            r = await http.get(f"{gw.public_url}/oauth2/sign_out", params={"rd": rd}, allow_redirects=False)
            assert r.status == 302 and r.headers["Location"] == "/", rd
        for rd in payloads[::10]:
            r = await http.get(f"{gw.public_url}/oauth2/start", params={"rd": rd}, allow_redirects=False)
            state = parse_qs(urlsplit(r.headers["Location"]).query)["state"][0]
            cookie = next(c for c in http.cookie_jar if c.key == f"_gateway_state_{state[:12]}")
            data = json.loads(Fernet(SESSION_KEY.encode()).decrypt(cookie.value.encode()))
            assert data["rd"] == "/", rd


async def test_local_redirect_kept_exactly(gateway_factory: Any) -> None:
    gw = await gateway_factory()
    gw.fake.add_user(10, "alice")
    async with gw.browser() as b:
        r = await b.sign_in("alice", rd="/dash/board?tab=1&q=a%20b#frag")
        assert r.headers["Location"] == "/dash/board?tab=1&q=a%20b#frag"


async def test_sign_in_primes_cache_and_database_outage_is_503(gateway_factory: Any, db: asyncpg.Pool,
                                                                dsn: str) -> None:
    gw = await gateway_factory()
    gw.fake.add_user(10, "alice")
    store = gw.public_app[keys.SESSIONS]
    async with gw.browser() as b:
        await b.sign_in("alice")
        before = store.queries
        assert (await b.get("/oauth2/userinfo")).status == 200
        assert store.queries == before  # primed at sign-in: no query
        name = urlsplit(dsn).path.lstrip("/")
        admin = await asyncpg.connect(dsn.replace(f"/{name}", "/postgres"))
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name)
        try:
            r = await b.sign_in("alice", expect_status=503)
            assert "database" in (await r.text()).lower()
        finally:
            await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
            await admin.close()


def test_id_token_checks() -> None:
    import base64 as b64

    from gateway.errors import GatewayError
    from gateway.web.login import check_id_token

    def tok(**claims: Any) -> str:
        body = {"iss": "https://gl.example", "aud": "cid", "nonce": "n1", "exp": int(time.time()) + 60, **claims}
        return "e30." + b64.urlsafe_b64encode(json.dumps(body).encode()).decode().rstrip("=") + ".sig"

    check_id_token(tok(), nonce="n1", client_id="cid", issuer="https://gl.example")
    for bad in (tok(nonce="n2"), tok(aud="other"), tok(iss="https://evil"), tok(exp=1), "x", None):
        with pytest.raises(GatewayError):
            check_id_token(bad, nonce="n1", client_id="cid", issuer="https://gl.example")
