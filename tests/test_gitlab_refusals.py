"""SPEC §16 "GitLab's refusals", issuer, 429 and refused users leaving the loop, end to end: the gateway, the
GitLab stand-in answering as GitLab does (gateway/demo/fake_gitlab.py, FakeUser.api_refusal), a real PostgreSQL."""

from __future__ import annotations

import html
import logging
from typing import Any
from urllib.parse import parse_qs, urlsplit

import asyncpg
import pytest
from conftest import Browser, Gateway, audit_actions

# (how GitLab holds the user, the gateway's refusal code, words the page must say)
GITLAB_REFUSALS = [
    ({"state": "blocked"}, "blocked", "is blocked"),
    ({"state": "banned"}, "blocked", "is blocked"),
    ({"state": "deactivated"}, "gitlab_deactivated", "is deactivated"),
    ({"state": "blocked_pending_approval"}, "gitlab_pending_approval", "waiting for an administrator"),
    ({"email_confirmation": "required"}, "gitlab_email_unconfirmed", "email address is not confirmed"),
    ({"password_expired": True}, "gitlab_password_expired", "password has expired"),
    ({"terms_accepted": False}, "gitlab_terms", "Terms of Service"),
    ({"user_type": "support_bot"}, "gitlab_internal_user", "internal (bot) account"),
]


def page_text(body: str) -> str:
    return html.unescape(body)


async def follow(b: Browser, url: str) -> Any:
    """Follow redirects between the gateway and the stand-in (the browser is already signed in at GitLab)."""
    for _ in range(6):
        if url.startswith("/"):
            url = b.gw.public_url + url
        r = await b.http.get(url, allow_redirects=False)
        if r.status != 302:
            return r
        url = r.headers["Location"]
    raise AssertionError("redirect loop")


@pytest.mark.parametrize(("holds", "code", "words"), GITLAB_REFUSALS, ids=[c for _, c, _ in GITLAB_REFUSALS])
async def test_every_gitlab_refusal_is_a_403_page_with_the_reason(
        gateway_factory: Any, db: asyncpg.Pool, holds: dict[str, Any], code: str, words: str,
        caplog: pytest.LogCaptureFixture) -> None:
    gw: Gateway = await gateway_factory()
    gw.fake.add_user(10, "ann", **holds)
    caplog.set_level(logging.INFO, logger="gateway.login")
    async with gw.browser() as b:
        r = await b.sign_in("ann", expect_status=403)
        body = page_text(await r.text())
    assert words in body and f"Error 403 · {code}" in body
    assert "unavailable" not in body.lower()
    assert 'id="advice"' in body and 'id="switch-account"' in body
    refused = [(s, d) for a, s, d in await audit_actions(db) if a == "sign_in.refused"]
    # GitLab names no one on a refusal: /oauth/token/info gives the id, and no local user has it yet.
    assert refused == [("gitlab-user:10", {"reason": code, "gitlab_id": 10, "message": refused[0][1]["message"]})]
    assert await db.fetchval("SELECT count(*) FROM users") == 0
    lines = [rec for rec in caplog.records if rec.getMessage() == "sign-in failed"]
    assert lines and getattr(lines[-1], "user", None) == "gitlab-user:10"


async def test_a_known_user_refused_by_gitlab_is_audited_under_their_login(gateway_factory: Any,
                                                                             db: asyncpg.Pool) -> None:
    gw: Gateway = await gateway_factory()
    gw.fake.add_user(10, "ann")
    async with gw.browser() as b:
        await b.sign_in("ann")
        gw.fake.set_user_state("ann", "deactivated")
        await b.sign_in("ann", expect_status=403)
    refused = [(s, d["reason"]) for a, s, d in await audit_actions(db) if a == "sign_in.refused"]
    assert refused == [("ann", "gitlab_deactivated")]


@pytest.mark.parametrize("holds", [{"state": "blocked"}, {"state": "deactivated"}, {"user_type": "alert_bot"}],
                         ids=["blocked", "deactivated", "internal"])
async def test_userinfo_mode_inactive_users_are_refused_not_unavailable(gateway_factory: Any, db: asyncpg.Pool,
                                                                         holds: dict[str, Any]) -> None:
    # GitLab's userinfo answers 401 for them (User.active finds nobody) while the token itself is valid.
    gw: Gateway = await gateway_factory(gitlab={"groups_source": "userinfo"})
    gw.fake.add_user(10, "ann", **holds)
    async with gw.browser() as b:
        r = await b.sign_in("ann", expect_status=403)
        body = page_text(await r.text())
    assert "Error 403 · gitlab_inactive" in body and "not active" in body and 'id="switch-account"' in body
    assert [(s, d["reason"]) for a, s, d in await audit_actions(db) if a == "sign_in.refused"] == [
        ("gitlab-user:10", "gitlab_inactive")]


async def test_userinfo_mode_refusals_name_the_user_too(gateway_factory: Any, db: asyncpg.Pool) -> None:
    gw: Gateway = await gateway_factory(gitlab={"groups_source": "userinfo"})
    gw.fake.add_user(10, "ann", email_confirmation="pending")
    async with gw.browser() as b:
        r = await b.sign_in("ann", expect_status=403)
        assert "email address is not verified" in page_text(await r.text())
    assert [(s, d["reason"]) for a, s, d in await audit_actions(db) if a == "sign_in.refused"] == [
        ("ann", "email_unverified")]


@pytest.mark.parametrize("source", ["api", "userinfo"])
async def test_unverified_email_is_refused_unless_allowed(gateway_factory: Any, db: asyncpg.Pool,
                                                          source: str) -> None:
    # "pending": GitLab's soft confirmation lets the user in for a while, with confirmed_at null in
    # /api/v4/user and email_verified false in userinfo.
    strict: Gateway = await gateway_factory(gitlab={"groups_source": source})
    strict.fake.add_user(10, "ann", email_confirmation="pending")
    async with strict.browser() as b:
        r = await b.sign_in("ann", expect_status=403)
        assert "Error 403 · email_unverified" in page_text(await r.text())
    assert await db.fetchval("SELECT count(*) FROM users") == 0
    lenient: Gateway = await gateway_factory(gitlab={"groups_source": source, "allow_unverified_email": True})
    async with lenient.browser() as b:
        await b.sign_in("ann")
    assert await db.fetchval("SELECT login FROM users") == "ann"


async def test_issuer_comes_from_discovery_not_gitlab_url(gateway_factory: Any, db: asyncpg.Pool) -> None:
    """An in-cluster gitlab.url: the stand-in is reached at 127.0.0.1 but announces http://localhost:PORT."""
    gw: Gateway = await gateway_factory(gitlab={"groups_source": "userinfo"})
    external = gw.fake_url.replace("127.0.0.1", "localhost")
    gw.fake.external_url = external
    gw.fake.add_user(10, "ann")
    async with gw.browser() as b:
        r = await b.http.get(f"{gw.public_url}/oauth2/start", allow_redirects=False)
        # Browsers are sent where GitLab says it lives, not to the gateway's internal address for it.
        assert r.headers["Location"].startswith(f"{external}/oauth/authorize?")
        await b.sign_in("ann")
        await b.sign_in("ann")
    assert await db.fetchval("SELECT count(*) FROM sessions") == 2
    discovery = [u for _, u in gw.fake.requests if u.endswith("/.well-known/openid-configuration")]
    assert len(discovery) == 1  # fetched once


async def test_configured_issuer_is_used_without_discovery(gateway_factory: Any) -> None:
    gw0: Gateway = await gateway_factory(gitlab={"groups_source": "userinfo"})
    external = gw0.fake_url.replace("127.0.0.1", "localhost")
    gw: Gateway = await gateway_factory(gitlab={"groups_source": "userinfo", "issuer": external + "/"})
    gw.fake.external_url = external
    gw.fake.add_user(10, "ann")
    async with gw.browser() as b:
        await b.sign_in("ann")
    assert not [u for _, u in gw.fake.requests if "openid-configuration" in u]


@pytest.mark.parametrize("endpoint", ["token", "user", "groups"])
async def test_gitlab_429_is_a_503_with_retry_after(gateway_factory: Any, db: asyncpg.Pool, endpoint: str) -> None:
    gw: Gateway = await gateway_factory()
    gw.fake.add_user(10, "ann")
    gw.fake.fail(endpoint, 429, retry_after=120)
    async with gw.browser() as b:
        r = await b.sign_in("ann", expect_status=503)
        assert r.headers["Retry-After"] == "120"
        body = page_text(await r.text())
        assert "in 120 seconds" in body and "gitlab_rate_limited" in body
    assert await db.fetchval("SELECT count(*) FROM users") == 0


async def test_a_refused_user_can_leave_the_loop(gateway_factory: Any) -> None:
    """carol of the demo: not in the allowed group. The page shows how to switch GitLab accounts, and a
    "Try again" that meets the same refusal says so."""
    gw: Gateway = await gateway_factory(provisioning={"allowed_groups": ["acme"]})
    gw.fake.add_group(100, "acme")
    gw.fake.add_group(200, "other-org")
    gw.fake.add_user(3, "carol")
    gw.fake.add_member("carol", "other-org")
    gw.fake.add_user(1, "alice")
    gw.fake.add_member("alice", "acme")
    async with gw.browser() as b:
        r = await b.sign_in("carol", expect_status=403)
        first = page_text(await r.text())
        assert "Same answer" not in first
        assert f'id="gitlab-sign-out" href="{gw.fake_url}/"' in first
        retry = first.split('id="retry" href="')[1].split('"')[0]
        assert retry == "/oauth2/start?rd=%2F&again=not_allowed"
        # GitLab still has carol signed in: trying again meets the same refusal, and says so.
        r = await follow(b, retry)
        assert r.status == 403
        again = page_text(await r.text())
        assert "Same answer as before" in again and "sign out of GitLab first" in again
        # The way out: sign out at GitLab, try again, pick another account.
        signed_out = await b.http.get(f"{gw.fake_url}/users/sign_out", allow_redirects=False)
        assert signed_out.status == 302
        await b.sign_in("alice")
        assert (await b.get("/oauth2/userinfo")).status == 200


async def test_try_again_after_a_different_refusal_is_not_called_the_same(gateway_factory: Any) -> None:
    gw: Gateway = await gateway_factory(provisioning={"allow_signup": False})
    gw.fake.add_user(10, "ann")
    async with gw.browser() as b:
        r = await b.get("/oauth2/start?rd=/&again=not_allowed")
        r = await follow(b, r.headers["Location"])  # GitLab's sign-in page: sign in as ann there
        sign_in = urlsplit(str(r.url))
        r = await b.http.post(f"{gw.fake_url}{sign_in.path}",
                              data={"username": "ann", "redirect_to": parse_qs(sign_in.query)["redirect_to"][0]},
                              allow_redirects=False)
        r = await follow(b, r.headers["Location"])
        assert r.status == 403
        body = page_text(await r.text())
        assert "signup_disabled" in body and "Same answer" not in body
