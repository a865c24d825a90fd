"""The GitLab stand-in's refresh tokens and webhooks, as SPEC §11's tests rely on them: single-use rotating
refresh tokens (a reused one revokes the whole grant, as OAuth 2.0 Security BCP §4.14.2 describes), a count
of refresh calls per token, revocation of an application by its user, blocked users, renames and transfers."""

from __future__ import annotations

import base64
from typing import Any

import aiohttp
from conftest import CLIENT_ID, CLIENT_SECRET
from test_resync import seed

BASIC = "Basic " + base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()


async def refresh(fake_url: str, token: str) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http, http.post(
            f"{fake_url}/oauth/token", data={"grant_type": "refresh_token", "refresh_token": token},
            headers={"Authorization": BASIC}) as r:
        return r.status, await r.json()


async def api_user(fake_url: str, access: str) -> int:
    async with aiohttp.ClientSession() as http, http.get(
            f"{fake_url}/api/v4/user", headers={"Authorization": f"Bearer {access}"}) as r:
        return r.status


async def signed_in(gateway_factory: Any) -> tuple[Any, str]:
    gw = await gateway_factory(provisioning={"resync_interval": "1h"})
    seed(gw)
    async with gw.browser() as b:
        await b.sign_in("alice")
    return gw, gw.fake.issued_tokens()[-1].refresh_token


async def test_refresh_rotates_and_a_reused_token_revokes_the_grant(gateway_factory: Any) -> None:
    gw, first = await signed_in(gateway_factory)
    status, body = await refresh(gw.fake_url, first)
    assert status == 200 and body["refresh_token"] != first
    second = body["refresh_token"]
    assert await api_user(gw.fake_url, body["access_token"]) == 200
    status, body = await refresh(gw.fake_url, first)  # replayed
    assert status == 400 and body["error"] == "invalid_grant"
    status, body = await refresh(gw.fake_url, second)  # the whole grant died with the replay
    assert status == 400 and body["error"] == "invalid_grant"
    assert gw.fake.refresh_calls == {first: 2, second: 1}


async def test_revoked_authorizations_and_blocked_users(gateway_factory: Any) -> None:
    gw, token = await signed_in(gateway_factory)
    gw.fake.set_user_state("alice", "blocked")
    status, body = await refresh(gw.fake_url, token)
    assert status == 200  # the token endpoint still answers; the API refuses the account
    assert await api_user(gw.fake_url, body["access_token"]) == 403
    gw.fake.revoke_authorizations("alice")
    status, body = await refresh(gw.fake_url, body["refresh_token"])
    assert status == 400 and body["error"] == "invalid_grant"


async def test_transfer_keeps_the_id_and_changes_full_paths(gateway_factory: Any) -> None:
    gw, _ = await signed_in(gateway_factory)
    gw.fake.transfer_group("acme/platform", "other")
    assert gw.fake.group(2).full_path == "other/platform"
    gw.fake.transfer_group(2, None)
    assert gw.fake.group(2).full_path == "platform"
