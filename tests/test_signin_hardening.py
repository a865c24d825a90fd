"""SPEC §16 at the sign-in endpoints: state cookies that cannot lock a browser out, sign-out that another site
cannot trigger, identity values GitLab holds with control characters, and rate-limited anonymous sign-in."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, urlsplit

import asyncpg
from conftest import Gateway, audit_actions

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
