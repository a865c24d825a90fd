"""The stand-in's group endpoints for automatic provisioning (SPEC §12) answer as GitLab does, and its
GitLab.com-like throttle answers 429 with Retry-After."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from gateway.demo.fake_gitlab import ACCESS_GUEST, ACCESS_MINIMAL, ACCESS_OWNER, FakeGitLab, create_app

TOKEN = "glpat-sync-token-0123456789"


def world() -> FakeGitLab:
    fake = FakeGitLab()
    fake.add_group(1, "acme")
    fake.add_group(2, "platform", parent="acme")
    fake.add_group(3, "sre", parent="acme/platform")
    fake.add_group(4, "web", parent="acme")
    fake.add_group(9, "secret-org")
    fake.add_user(100, "bot", name="Sync bot")
    fake.add_member("bot", "acme", ACCESS_OWNER)  # a group access token's bot user
    fake.add_access_token(TOKEN, "bot")
    for uid in range(1, 6):
        fake.add_user(uid, f"u{uid}")
        fake.add_member(uid, "acme/platform", ACCESS_GUEST)
    fake.add_member(1, "acme/platform/sre", ACCESS_MINIMAL)
    fake.set_user_state(5, "blocked")
    return fake


@pytest.fixture
async def client(aiohttp_client: Any) -> tuple[FakeGitLab, TestClient[Any, Any]]:
    fake = world()
    return fake, await aiohttp_client(create_app(fake))


def private(token: str = TOKEN) -> dict[str, str]:
    return {"PRIVATE-TOKEN": token}


async def test_group_by_id_or_encoded_path(client: Any) -> None:
    _fake, c = client
    by_id = await (await c.get("/api/v4/groups/2", headers=private())).json()
    by_path = await (await c.get("/api/v4/groups/acme%2Fplatform", headers=private())).json()
    assert by_id == by_path
    assert (by_id["id"], by_id["full_path"], by_id["parent_id"]) == (2, "acme/platform", 1)
    bearer = await c.get("/api/v4/groups/acme", headers={"Authorization": f"Bearer {TOKEN}"})
    assert bearer.status == 200


async def test_unknown_or_invisible_group_is_404_and_bad_token_401(client: Any) -> None:
    fake, c = client
    for ref in ("nope", "999", "secret-org"):  # secret-org exists but the bot is no member
        r = await c.get(f"/api/v4/groups/{ref}", headers=private())
        assert (r.status, await r.json()) == (404, {"message": "404 Group Not Found"})
    r = await c.get("/api/v4/groups/acme", headers=private("wrong"))
    assert (r.status, await r.json()) == (401, {"message": "401 Unauthorized"})
    fake.add_access_token("no-scope", "bot", scopes=("read_user",))
    r = await c.get("/api/v4/groups/acme", headers=private("no-scope"))
    assert r.status == 403 and (await r.json())["error"] == "insufficient_scope"


async def test_descendant_groups_every_depth_with_offset_pagination(client: Any) -> None:
    _fake, c = client
    r = await c.get("/api/v4/groups/acme/descendant_groups", params={"per_page": "2"}, headers=private())
    assert r.status == 200
    assert (r.headers["X-Total"], r.headers["X-Next-Page"], r.headers["X-Page"]) == ("3", "2", "1")
    assert 'rel="next"' in r.headers["Link"]
    first = [g["full_path"] for g in await r.json()]
    r = await c.get("/api/v4/groups/acme/descendant_groups", params={"per_page": "2", "page": "2"},
                    headers=private())
    assert r.headers["X-Next-Page"] == ""
    assert sorted(first + [g["full_path"] for g in await r.json()]) == ["acme/platform", "acme/platform/sre",
                                                                         "acme/web"]


async def test_members_are_direct_only_with_state_and_level(client: Any) -> None:
    fake, c = client
    r = await c.get("/api/v4/groups/acme%2Fplatform%2Fsre/members", headers=private())
    assert [(m["username"], m["access_level"]) for m in await r.json()] == [("u1", ACCESS_MINIMAL)]
    r = await c.get("/api/v4/groups/2/members", params={"per_page": "100"}, headers=private())
    members = await r.json()
    assert r.headers["X-Total"] == "5"
    assert [(m["id"], m["state"]) for m in members] == [(1, "active"), (2, "active"), (3, "active"),
                                                        (4, "active"), (5, "blocked")]
    assert "email" not in members[0]  # only administrators see members' emails
    assert {"id", "username", "name", "state", "access_level", "membership_state", "web_url"} <= set(members[0])
    fake.admins.add(100)
    members = await (await c.get("/api/v4/groups/2/members", headers=private())).json()
    assert members[0]["email"] == "u1@example.com"


async def test_throttle_answers_429_with_retry_after_like_gitlab_com(client: Any) -> None:
    fake, c = client
    now = [1000.0]
    fake.clock = lambda: now[0]
    throttle = fake.rate_limit(3, period=60.0)
    statuses = [(await c.get("/api/v4/groups/acme", headers=private())).status for _ in range(4)]
    assert statuses == [200, 200, 200, 429]
    r = await c.get("/api/v4/groups/acme", headers=private())
    assert r.status == 429 and await r.text() == "Retry later\n"
    assert r.headers["Retry-After"] == "20"  # 1000 s is 40 s into a 60 s window
    assert r.headers["RateLimit-Limit"] == "3" and r.headers["RateLimit-Remaining"] == "0"
    assert throttle is not None and throttle.throttled == 2
    now[0] = 1020.0  # the next window
    assert (await c.get("/api/v4/groups/acme", headers=private())).status == 200
    fake.rate_limit(None)
    assert all([(await c.get("/api/v4/groups/acme", headers=private())).status == 200 for _ in range(5)])


async def test_failures_can_target_a_page_of_the_new_endpoints(client: Any) -> None:
    fake, c = client
    fake.fail("descendant_groups", 500, page=2)
    ok = await c.get("/api/v4/groups/acme/descendant_groups", params={"per_page": "2"}, headers=private())
    failed = await c.get("/api/v4/groups/acme/descendant_groups", params={"per_page": "2", "page": "2"},
                         headers=private())
    assert (ok.status, failed.status) == (200, 500)
