"""SPEC §16 at the sign-in endpoints: state cookies that cannot lock a browser out, sign-out that another site
cannot trigger, identity values GitLab holds with control characters, and rate-limited anonymous sign-in."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import asyncpg
import pytest
from conftest import Gateway, audit_actions, echoed_headers

from gateway.access.ratelimit import RateLimiter
from gateway.web.login import MAX_STATE_COOKIES


def state_cookies(b: Any) -> list[str]:
    return [c.key for c in b.jar if c.key.startswith("_gateway_state_")]


async def test_many_starts_never_lock_the_browser_out_of_the_prefix(gateway_factory: Any) -> None:
    """Twenty abandoned sign-ins with the longest accepted rd: the browser keeps at most 5 state cookies, can
    still sign out, and its newest sign-in completes."""
    gw: Gateway = await gateway_factory()
    gw.fake.add_user(10, "alice")
    long_rd = "/" + "a" * 2000
    async with gw.browser() as b:
        for _ in range(20):
            r = await b.get(f"/oauth2/start?rd={long_rd}")
            assert r.status == 302, r.status
            assert len(state_cookies(b)) <= MAX_STATE_COOKIES
        assert (await b.get("/oauth2/sign_out")).status == 302
        assert (await b.get("/oauth2/userinfo")).status == 401
        r = await b.sign_in("alice", rd=long_rd)
        assert r.headers["Location"] == long_rd
        assert (await b.get("/oauth2/userinfo")).status == 200


async def test_the_oldest_state_cookie_is_dropped_first(gateway_factory: Any) -> None:
    gw: Gateway = await gateway_factory()
    async with gw.browser() as b:
        states = []
        for i in range(MAX_STATE_COOKIES + 1):
            r = await b.get(f"/oauth2/start?rd=/{i}")
            states.append(parse_qs(urlsplit(r.headers["Location"]).query)["state"][0])
        held = set(state_cookies(b))
        assert len(held) == MAX_STATE_COOKIES
        assert f"_gateway_state_{states[0][:12]}" not in held
        assert {f"_gateway_state_{s[:12]}" for s in states[1:]} == held


async def test_rd_over_2048_bytes_falls_back_to_root(gateway_factory: Any) -> None:
    gw: Gateway = await gateway_factory()
    gw.fake.add_user(10, "alice")
    async with gw.browser() as b:
        r = await b.sign_in("alice", rd="/" + "a" * 2048)
        assert r.headers["Location"] == "/"


# ---- sign-out ------------------------------------------------------------------------------------------------

async def test_cross_site_get_does_not_sign_out_but_offers_a_button(gateway_factory: Any,
                                                                      db: asyncpg.Pool) -> None:
    gw: Gateway = await gateway_factory()
    gw.fake.add_user(10, "alice")
    async with gw.browser() as b:
        await b.sign_in("alice")
        for site in ("cross-site", "same-site"):
            r = await b.get("/oauth2/sign_out?rd=/bye", headers={"Sec-Fetch-Site": site})
            assert r.status == 200 and r.headers["Cache-Control"] == "no-store"
            body = await r.text()
            assert '<form method="post" action="/oauth2/sign_out?rd=%2Fbye">' in body
            assert not any(c.startswith("_gateway=") for c in r.headers.getall("Set-Cookie", []))
            assert (await b.get("/oauth2/userinfo")).status == 200
        # An auto-submitting form on another site: the same page, no sign-out.
        r = await b.http.post(f"{gw.public_url}/oauth2/sign_out", allow_redirects=False,
                              headers={"Sec-Fetch-Site": "cross-site"})
        assert r.status == 200 and '<form method="post"' in await r.text()
        assert not any(c.startswith("_gateway=") for c in r.headers.getall("Set-Cookie", []))
        assert await db.fetchval("SELECT revoked_at IS NULL FROM sessions")
        # The button: a POST (what the page's form sends) signs out.
        r = await b.http.post(f"{gw.public_url}/oauth2/sign_out?rd=%2Fbye", allow_redirects=False,
                              headers={"Sec-Fetch-Site": "same-origin"})
        assert r.status == 302 and r.headers["Location"] == "/bye"
        assert (await b.get("/oauth2/userinfo")).status == 401


async def test_own_navigations_sign_out_with_a_get(gateway_factory: Any) -> None:
    gw: Gateway = await gateway_factory()
    gw.fake.add_user(10, "alice")
    for site in (None, "same-origin", "none"):
        async with gw.browser() as b:
            await b.sign_in("alice")
            headers = {"Sec-Fetch-Site": site} if site else {}
            r = await b.get("/oauth2/sign_out", headers=headers)
            assert r.status == 302, site
            assert (await b.get("/oauth2/userinfo")).status == 401


# ---- identity values from GitLab ---------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("field", "profile"),
    [
        ("username", {"username": "mallory\r\nX-Forwarded-User: root"}),
        ("username", {"username": "mal\x00lory"}),
        ("name", {"name": "Mal\x00lory"}),
        ("name", {"name": "Mal\ud800lory"}),
        ("email", {"email": "mallory@example.com\nX-Evil: 1"}),
    ],
)
@pytest.mark.parametrize("source", ["api", "userinfo"])
async def test_control_characters_in_the_gitlab_profile_refuse_the_sign_in(
        gateway_factory: Any, db: asyncpg.Pool, field: str, profile: dict[str, str], source: str) -> None:
    gw: Gateway = await gateway_factory(gitlab={"groups_source": source})
    username = profile.get("username", "mallory")
    gw.fake.add_user(66, username, name=profile.get("name", "Mallory"),
                     email=profile.get("email", "mallory@example.com"))
    async with gw.browser() as b:
        r = await b.sign_in(username, expect_status=403)
        body = await r.text()
        assert f"Your GitLab {field} contains control characters" in body
        assert 'id="retry"' in body
        assert (await b.get("/oauth2/userinfo")).status == 401
    assert await db.fetchval("SELECT count(*) FROM users") == 0
    ((_action, subject, details),) = [a for a in await audit_actions(db) if a[0] == "sign_in.refused"]
    assert details["reason"] == "invalid_profile" and details["field"] == field and details["gitlab_id"] == 66
    assert "\n" not in subject and "\x00" not in subject


async def test_non_ascii_profiles_pass_as_utf8(gateway_factory: Any, upstream: str) -> None:
    gw: Gateway = await gateway_factory()
    gw.fake.add_user(12, "zoe", name="Zoë Ünïcødé 山田", email="zoë@exämple.com")
    async with gw.browser() as b:
        await b.sign_in("zoe")
        r = await b.get("/oauth2/userinfo")
        assert r.status == 200 and (await r.json())["email"] == "zoë@exämple.com"
        r = await b.get("/anything", headers={"Accept": "application/json"})
        assert r.status == 200
        echoed = echoed_headers(await r.json())
        assert echoed["x-forwarded-email"] == ["zoë@exämple.com"]


# ---- rate limit of anonymous sign-in traffic ----------------------------------------------------------------

async def test_anonymous_sign_in_traffic_is_rate_limited_per_client(gateway_factory: Any) -> None:
    gw: Gateway = await gateway_factory(server={"signin_rate": "3/m"})
    async with aiohttp.ClientSession(headers={"Accept": "text/html"}) as http:
        for _ in range(3):
            r = await http.get(f"{gw.public_url}/oauth2/start", allow_redirects=False)
            assert r.status == 302
        r = await http.get(f"{gw.public_url}/oauth2/callback?code=x&state=y", allow_redirects=False)
        assert r.status == 429 and r.headers["Cache-Control"] == "no-store"
        assert 1 <= int(r.headers["Retry-After"]) <= 20
        assert "Too many sign-in attempts" in await r.text()
        # An untrusted peer cannot buy a fresh bucket with a forged X-Forwarded-For.
        r = await http.get(f"{gw.public_url}/oauth2/start", headers={"X-Forwarded-For": "198.51.100.7"},
                           allow_redirects=False)
        assert r.status == 429
        # Everything else (the proxy, userinfo, sign-out) is not limited.
        assert (await http.get(f"{gw.public_url}/oauth2/userinfo")).status == 401
        assert (await http.get(f"{gw.public_url}/oauth2/sign_out", allow_redirects=False)).status == 302


async def test_behind_a_trusted_proxy_each_forwarded_client_has_its_own_bucket(gateway_factory: Any) -> None:
    gw: Gateway = await gateway_factory(server={"signin_rate": "2/m", "trusted_proxies": ["127.0.0.1/32"]})
    async with aiohttp.ClientSession() as http:
        for client in ("198.51.100.7", "198.51.100.8"):
            for _ in range(2):
                r = await http.get(f"{gw.public_url}/oauth2/start", headers={"X-Forwarded-For": client},
                                   allow_redirects=False)
                assert r.status == 302, client
        r = await http.get(f"{gw.public_url}/oauth2/start", headers={"X-Forwarded-For": "198.51.100.7"},
                           allow_redirects=False)
        assert r.status == 429


async def test_callbacks_without_a_valid_state_cookie_never_reach_gitlab(gateway_factory: Any) -> None:
    gw: Gateway = await gateway_factory()
    gw.fake.add_user(10, "alice")
    async with gw.browser() as b:
        r = await b.get("/oauth2/start")
        state = parse_qs(urlsplit(r.headers["Location"]).query)["state"][0]
        for query in ("code=x&state=" + state[:12] + "X" * 31, "code=x&state=junk", "code=x", "state=" + state):
            r = await b.get(f"/oauth2/callback?{query}")
            assert r.status == 400, query
    async with aiohttp.ClientSession() as other:  # the right state, in another browser
        r = await other.get(f"{gw.public_url}/oauth2/callback?code=x&state={state}", allow_redirects=False)
        assert r.status == 400
    assert [path for method, path in gw.fake.requests if path.startswith("/oauth/token")] == []


def test_rate_limiter_refills_and_keeps_bounded_memory() -> None:
    now = [0.0]
    limiter = RateLimiter(2, 60.0, max_clients=100, clock=lambda: now[0])
    assert [limiter.check("192.0.2.1") for _ in range(3)] == [0, 0, 30]
    now[0] += 30
    assert limiter.check("192.0.2.1") == 0 and limiter.check("192.0.2.1") == 30
    # Rotating addresses inside one IPv6 /64 shares one bucket; IPv4-mapped addresses count as IPv4.
    assert [limiter.check(f"2001:db8::{i:x}") for i in range(3)] == [0, 0, 30]
    assert limiter.check("::ffff:192.0.2.1") == 30
    for i in range(10_000):
        limiter.check(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}")
    assert len(limiter) == 100
