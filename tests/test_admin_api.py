"""The admin JSON API (SPEC §4) against a real gateway and PostgreSQL: every call, its shapes and its errors."""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
from conftest import ADMIN_TOKEN, audit_actions
from yarl import URL

GROUP_KEYS = {"id", "name", "description", "builtin", "gitlab_group_id", "member_count"}
USER_KEYS = {"login", "name", "email", "active", "gitlab_id", "provisioned_by", "created_at", "last_login_at",
             "last_sync_at", "next_sync_at", "sync_state", "last_sync_error", "groups"}
SESSION_KEYS = {"id", "login", "created_at", "expires_at", "last_seen_at"}
EVENT_KEYS = {"id", "at", "actor", "action", "subject", "details"}


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 2.0) -> float:
    """Poll every 50 ms until check() is true; return the time it took (fails after `timeout`)."""
    started = time.monotonic()
    while not await check():
        assert time.monotonic() - started < timeout, "condition not reached in time"
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def call(api: aiohttp.ClientSession, method: str, path: str, status: int, **kw: Any) -> Any:
    """One API call that must answer `status`; its JSON body (None for 204)."""
    async with api.request(method, path, **kw) as r:
        text = await r.text()
        assert r.status == status, f"{method} {path}: {r.status} {text}"
        if r.status == 204:
            assert text == ""
            return None
        assert r.headers["Content-Type"].startswith("application/json")
        body = json.loads(text)
        if status >= 400:
            assert set(body) == {"error", "message"} and body["message"], body
        return body


async def all_pages(api: aiohttp.ClientSession, path: str, limit: int) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    params: dict[str, Any] = {"limit": limit}
    for _ in range(100):
        page = await call(api, "GET", path, 200, params=params)
        assert set(page) == {"items", "next"}
        assert len(page["items"]) <= limit
        items.extend(page["items"])
        if page["next"] is None:
            return items
        params = {"limit": limit, "cursor": page["next"]}
    raise AssertionError("the cursor never ended")


def is_utc_iso(value: str) -> bool:
    return value.endswith("Z") and datetime.fromisoformat(value).utcoffset() == timedelta(0)


@pytest.fixture
async def gw(gateway_factory: Callable[..., Awaitable[Any]]) -> Any:
    return await gateway_factory()


@pytest.fixture
async def api(gw: Any) -> Any:
    async with gw.admin() as session:
        yield session


# ---- authentication -------------------------------------------------------------------------------------

async def test_api_needs_the_admin_bearer_token(gw, db):
    # none, wrong token, wrong scheme, empty bearer, bare token, another scheme
    for header in [None, "Bearer wrong-token-0123456789", f"Basic {ADMIN_TOKEN}", "Bearer ", ADMIN_TOKEN,
                   f"Token {ADMIN_TOKEN}", f"Bearer {ADMIN_TOKEN}x"]:
        headers = {"Authorization": header} if header is not None else {}
        async with aiohttp.ClientSession(gw.admin_url, headers=headers) as anon:
            for method, path in [("GET", "/api/v1/groups"), ("POST", "/api/v1/groups"), ("GET", "/api/v1/users/x"),
                                 ("PATCH", "/api/v1/users/x"), ("DELETE", "/api/v1/sessions/x"),
                                 ("GET", "/api/v1/audit")]:
                body = await call(anon, method, path, 401, json={"name": "x", "active": False})
                assert body["error"] == "unauthenticated", header
    assert await db.fetchval("SELECT count(*) FROM groups") == 1
    assert await db.fetchval("SELECT count(*) FROM audit_events") == 0
    async with aiohttp.ClientSession(gw.admin_url) as anon, anon.get("/healthz") as r:
        assert r.status == 200  # only /api needs the token
    async with aiohttp.ClientSession(gw.admin_url, headers={"Authorization": f"bearer {ADMIN_TOKEN}"}) as s:
        await call(s, "GET", "/api/v1/groups", 200)  # the scheme is case-insensitive
        async with s.put("/api/v1/groups", json={}) as r:
            assert r.status == 405


@pytest.mark.parametrize("target", ["/%61pi/v1/groups", "/%61%70%69/v1/users", "/ap%69/v1/audit",
                                    "/api%2Fv1/groups"])
async def test_an_encoded_spelling_of_api_needs_the_token_too(gw, target):
    """aiohttp routes on the decoded path, so the token check must read the decoded path as well."""
    async with aiohttp.ClientSession() as anon, anon.get(URL(gw.admin_url + target, encoded=True)) as r:
        assert r.status == 401, target
        assert (await r.json())["error"] == "unauthenticated"


# ---- groups ---------------------------------------------------------------------------------------------

async def test_groups_create_get_list(api, db):
    page = await call(api, "GET", "/api/v1/groups", 200)
    assert page["next"] is None
    [default] = page["items"]
    assert default == {"id": default["id"], "name": "gateway-users", "builtin": True, "gitlab_group_id": None,
                       "member_count": 0, "description": default["description"]}

    created = await call(api, "POST", "/api/v1/groups", 201, json={"name": "acme/dev-team", "description": "devs"})
    assert set(created) == GROUP_KEYS
    assert created["name"] == "acme/dev-team" and created["description"] == "devs"
    assert created["builtin"] is False and created["member_count"] == 0 and created["gitlab_group_id"] is None
    assert await call(api, "GET", f"/api/v1/groups/{created['id']}", 200) == created
    local = await call(api, "POST", "/api/v1/groups", 201, json={"name": "Release managers (EU)"})
    assert local["description"] == ""

    names = [g["name"] for g in (await call(api, "GET", "/api/v1/groups", 200))["items"]]
    assert names == ["gateway-users", "acme/dev-team", "Release managers (EU)"]
    assert await db.fetchval("SELECT count(*) FROM groups") == 3


async def test_group_name_taken_is_409(api):
    await call(api, "POST", "/api/v1/groups", 201, json={"name": "acme"})
    body = await call(api, "POST", "/api/v1/groups", 409, json={"name": "acme"})
    assert body["error"] == "conflict" and "acme" in body["message"]
    await call(api, "POST", "/api/v1/groups", 409, json={"name": "gateway-users"})
    # names are case-sensitive, like the sync rule
    await call(api, "POST", "/api/v1/groups", 201, json={"name": "ACME"})


INVALID_GROUP_NAMES = [
    "", "   ", " acme", "acme ", "-acme", "acme-", "_acme", "ac..me", "ac-_me", "acme.git", "a/b.atom", "A.GIT",
    "a//b", "/acme", "acme/", "a/b c", "x" * 256, "/".join(["a"] * 22), "tab\there", "ac/më",
]
VALID_GROUP_NAMES = [
    "a", "acme", "my-group/sub-group", "Acme.Corp_2", "/".join(["a"] * 21), "Release managers", "Ops & SRE",
    "équipe", "x" * 255, "gitlab.git.x",
]


async def test_group_name_rule(api, db):
    for name in INVALID_GROUP_NAMES:
        body = await call(api, "POST", "/api/v1/groups", 422, json={"name": name})
        assert body["error"] == "invalid", name
    assert await db.fetchval("SELECT count(*) FROM groups") == 1
    for name in VALID_GROUP_NAMES:
        assert (await call(api, "POST", "/api/v1/groups", 201, json={"name": name}))["name"] == name


async def test_bad_group_bodies(api, db):
    for body, status in [
        ("not json", 400), ("[1, 2]", 400), ('"acme"', 400), ("", 400), ("null", 400), (b"\xff\xfe", 400),
        ('{"name": 5}', 422), ('{"name": null}', 422), ('{"description": "x"}', 422),
        ('{"name": "acme", "builtin": true}', 422), ('{"name": "acme", "description": 3}', 422),
    ]:
        await call(api, "POST", "/api/v1/groups", status, data=body, headers={"Content-Type": "application/json"})
    assert await db.fetchval("SELECT count(*) FROM groups") == 1


async def test_unknown_group_ids_are_404(api):
    for path in ["/api/v1/groups/999", "/api/v1/groups/abc", "/api/v1/groups/99999999999999999999999",
                 "/api/v1/groups/999/members"]:
        body = await call(api, "GET", path, 404)
        assert body["error"] == "not_found"
    await call(api, "PATCH", "/api/v1/groups/999", 404, json={"name": "x"})
    await call(api, "DELETE", "/api/v1/groups/999", 404)
    await call(api, "POST", "/api/v1/groups/999/members", 404, json={"login": "x"})
    await call(api, "DELETE", "/api/v1/groups/999/members/x", 404)


async def test_patch_group(api, db):
    g = await call(api, "POST", "/api/v1/groups", 201, json={"name": "acme"})
    other = await call(api, "POST", "/api/v1/groups", 201, json={"name": "other"})
    renamed = await call(api, "PATCH", f"/api/v1/groups/{g['id']}", 200, json={"name": "acme/core"})
    assert renamed == {**g, "name": "acme/core"}
    described = await call(api, "PATCH", f"/api/v1/groups/{g['id']}", 200, json={"description": "the core"})
    assert described == {**renamed, "description": "the core"}
    await call(api, "PATCH", f"/api/v1/groups/{g['id']}", 409, json={"name": "other"})
    await call(api, "PATCH", f"/api/v1/groups/{g['id']}", 422, json={"name": "bad//name"})
    await call(api, "PATCH", f"/api/v1/groups/{g['id']}", 422, json={})
    await call(api, "PATCH", f"/api/v1/groups/{g['id']}", 422, json={"id": 3})
    await call(api, "PATCH", f"/api/v1/groups/{g['id']}", 400, data="{")
    assert await db.fetchval("SELECT name FROM groups WHERE id = $1", other["id"]) == "other"


async def test_default_group_is_protected(api):
    [default] = (await call(api, "GET", "/api/v1/groups", 200))["items"]
    body = await call(api, "DELETE", f"/api/v1/groups/{default['id']}", 409)
    assert "default group" in body["message"]
    body = await call(api, "PATCH", f"/api/v1/groups/{default['id']}", 409, json={"name": "everyone"})
    assert "provisioning.default_group" in body["message"]
    # its description is the administrators' to change, and "renaming" it to its own name is no change
    changed = await call(api, "PATCH", f"/api/v1/groups/{default['id']}", 200,
                         json={"name": "gateway-users", "description": "all of us"})
    assert changed["description"] == "all of us" and changed["name"] == "gateway-users"


async def test_delete_group(api, db):
    g = await call(api, "POST", "/api/v1/groups", 201, json={"name": "acme"})
    await call(api, "POST", "/api/v1/users", 201, json={"login": "alice", "email": "a@x.org", "name": "A"})
    await call(api, "POST", f"/api/v1/groups/{g['id']}/members", 201, json={"login": "alice"})
    await call(api, "DELETE", f"/api/v1/groups/{g['id']}", 204)
    await call(api, "GET", f"/api/v1/groups/{g['id']}", 404)
    await call(api, "DELETE", f"/api/v1/groups/{g['id']}", 404)
    assert await db.fetchval("SELECT count(*) FROM memberships WHERE group_id = $1", g["id"]) == 0
    user = await call(api, "GET", "/api/v1/users/alice", 200)
    assert user["groups"] == [{"name": "gateway-users", "source": "default"}]
    deleted = [a for a in await audit_actions(db) if a[0] == "group.deleted"]
    assert deleted == [("group.deleted", "acme", {"group": "acme", "group_id": g["id"], "members": ["alice"]})]


# ---- members --------------------------------------------------------------------------------------------

async def test_members(api, db):
    g = await call(api, "POST", "/api/v1/groups", 201, json={"name": "acme"})
    members_path = f"/api/v1/groups/{g['id']}/members"
    for login in ("bob", "Alice"):
        await call(api, "POST", "/api/v1/users", 201, json={"login": login, "email": f"{login}@x.org", "name": login})
    added = await call(api, "POST", members_path, 201, json={"login": "alice"})  # logins are case-insensitive
    assert set(added) == {"login", "name", "email", "active", "source", "added_at"}
    assert added["login"] == "Alice" and added["source"] == "manual" and is_utc_iso(added["added_at"])
    await call(api, "POST", members_path, 201, json={"login": "bob"})
    body = await call(api, "POST", members_path, 409, json={"login": "bob"})
    assert "already a member" in body["message"]
    await call(api, "POST", members_path, 404, json={"login": "nobody"})
    await call(api, "POST", members_path, 422, json={"login": 7})
    await call(api, "POST", members_path, 422, json={})
    await call(api, "POST", members_path, 400, data="login=bob")

    page = await call(api, "GET", members_path, 200)
    assert [m["login"] for m in page["items"]] == ["Alice", "bob"] and page["next"] is None
    assert (await call(api, "GET", f"/api/v1/groups/{g['id']}", 200))["member_count"] == 2
    bob = await call(api, "GET", "/api/v1/users/bob", 200)
    assert bob["groups"] == [{"name": "acme", "source": "manual"}, {"name": "gateway-users", "source": "default"}]

    await call(api, "DELETE", f"{members_path}/BOB", 204)
    await call(api, "DELETE", f"{members_path}/bob", 404)
    await call(api, "DELETE", f"{members_path}/nobody", 404)
    assert [m["login"] for m in (await call(api, "GET", members_path, 200))["items"]] == ["Alice"]

    [default] = [x for x in (await call(api, "GET", "/api/v1/groups", 200))["items"] if x["builtin"]]
    assert default["member_count"] == 2
    body = await call(api, "DELETE", f"/api/v1/groups/{default['id']}/members/bob", 409)
    assert "default group" in body["message"]
    events = [(a, s, d) for a, s, d in await audit_actions(db) if a.startswith("group.member")]
    assert events == [
        ("group.member_added", "Alice", {"group": "acme", "group_id": g["id"], "login": "Alice", "source": "manual"}),
        ("group.member_added", "bob", {"group": "acme", "group_id": g["id"], "login": "bob", "source": "manual"}),
        ("group.member_removed", "bob", {"group": "acme", "group_id": g["id"], "login": "bob", "source": "manual"}),
    ]


# ---- users ----------------------------------------------------------------------------------------------

async def test_create_and_get_user(api, db):
    created = await call(api, "POST", "/api/v1/users", 201,
                         json={"login": "alice", "email": "alice@example.com", "name": "Alice A", "gitlab_id": 10})
    assert set(created) == USER_KEYS
    assert created["login"] == "alice" and created["gitlab_id"] == 10 and created["active"] is True
    assert created["provisioned_by"] == "admin" and is_utc_iso(created["created_at"])
    assert created["last_login_at"] is None and created["last_sync_at"] is None
    assert created["groups"] == [{"name": "gateway-users", "source": "default"}]
    assert await call(api, "GET", "/api/v1/users/ALICE", 200) == created
    without_id = await call(api, "POST", "/api/v1/users", 201,
                            json={"login": "bob", "email": "bob@example.com", "name": "Bob", "gitlab_id": None})
    assert without_id["gitlab_id"] is None
    await call(api, "GET", "/api/v1/users/nobody", 404)
    assert await db.fetchval("SELECT provisioned_by FROM users WHERE login = 'bob'") == "admin"


async def test_create_user_conflicts(api):
    await call(api, "POST", "/api/v1/users", 201, json={"login": "alice", "email": "a@x.org", "name": "A",
                                                       "gitlab_id": 10})
    body = await call(api, "POST", "/api/v1/users", 409, json={"login": "ALICE", "email": "b@x.org", "name": "B"})
    assert "alice" in body["message"]
    body = await call(api, "POST", "/api/v1/users", 409, json={"login": "bob", "email": "b@x.org", "name": "B",
                                                              "gitlab_id": 10})
    assert "gitlab_id 10" in body["message"]


INVALID_USERS = [
    {"login": "", "email": "a@x.org", "name": "A"},
    {"login": "-alice", "email": "a@x.org", "name": "A"},
    {"login": "al ice", "email": "a@x.org", "name": "A"},
    {"login": "alice.", "email": "a@x.org", "name": "A"},
    {"login": "alice.git", "email": "a@x.org", "name": "A"},
    {"login": "alice", "email": "not-an-email", "name": "A"},
    {"login": "alice", "email": "", "name": "A"},
    {"login": "alice", "email": "a@x.org", "name": "  "},
    {"login": "alice", "email": "a@x.org", "name": "A", "gitlab_id": 0},
    {"login": "alice", "email": "a@x.org", "name": "A", "gitlab_id": -3},
    {"login": "alice", "email": "a@x.org", "name": "A", "gitlab_id": "10"},
    {"login": "alice", "email": "a@x.org", "name": "A", "gitlab_id": True},
    {"login": "alice", "email": "a@x.org", "name": "A", "gitlab_id": 1.5},
    {"login": "alice", "email": "a@x.org"},
    {"login": "alice", "email": "a@x.org", "name": "A", "active": False},
    {"login": ["alice"], "email": "a@x.org", "name": "A"},
]


async def test_create_user_invalid_is_422(api, db):
    for payload in INVALID_USERS:
        body = await call(api, "POST", "/api/v1/users", 422, json=payload)
        assert body["error"] == "invalid", payload
    await call(api, "POST", "/api/v1/users", 400, data="[]")
    assert await db.fetchval("SELECT count(*) FROM users") == 0


async def test_list_and_search_users(api):
    for login, name in [("carol", "Carol King"), ("alice", "Alice Smith"), ("Bob", "Bob 100%_sure")]:
        await call(api, "POST", "/api/v1/users", 201, json={"login": login, "email": f"{login}@ex.org", "name": name})
    await call(api, "PATCH", "/api/v1/users/carol", 200, json={"active": False})

    page = await call(api, "GET", "/api/v1/users", 200)
    assert [u["login"] for u in page["items"]] == ["alice", "Bob", "carol"] and page["next"] is None
    assert all(set(u) == USER_KEYS for u in page["items"])
    assert page["items"][0]["groups"] == [{"name": "gateway-users", "source": "default"}]

    async def logins(**params: str) -> list[str]:
        return [u["login"] for u in (await call(api, "GET", "/api/v1/users", 200, params=params))["items"]]

    assert await logins(q="SMITH") == ["alice"]
    assert await logins(q="ex.org") == ["alice", "Bob", "carol"]
    assert await logins(q="%_") == ["Bob"]  # LIKE wildcards are literal text
    assert await logins(q="_") == ["Bob"]
    assert await logins(active="true") == ["alice", "Bob"]
    assert await logins(active="false") == ["carol"]
    assert await logins(active="false", q="ali") == []
    await call(api, "GET", "/api/v1/users", 400, params={"active": "maybe"})


async def test_patch_user_bodies(api):
    await call(api, "POST", "/api/v1/users", 201, json={"login": "alice", "email": "a@x.org", "name": "A"})
    await call(api, "PATCH", "/api/v1/users/alice", 422, json={"active": "no"})
    await call(api, "PATCH", "/api/v1/users/alice", 422, json={"active": 0})
    await call(api, "PATCH", "/api/v1/users/alice", 422, json={})
    await call(api, "PATCH", "/api/v1/users/alice", 422, json={"active": False, "name": "x"})
    await call(api, "PATCH", "/api/v1/users/alice", 400, data="{nope")
    await call(api, "PATCH", "/api/v1/users/nobody", 404, json={"active": False})
    off = await call(api, "PATCH", "/api/v1/users/alice", 200, json={"active": False})
    assert off["active"] is False and set(off) == USER_KEYS
    on = await call(api, "PATCH", "/api/v1/users/ALICE", 200, json={"active": True})
    assert on["active"] is True


# ---- pagination -----------------------------------------------------------------------------------------

async def test_pagination_with_cursors(api):
    for i in range(7):
        await call(api, "POST", "/api/v1/groups", 201, json={"name": f"team-{i}"})
        await call(api, "POST", "/api/v1/users", 201, json={"login": f"user{i}", "email": f"u{i}@x.org", "name": "U"})
    groups = await all_pages(api, "/api/v1/groups", 3)
    assert [g["name"] for g in groups] == ["gateway-users"] + [f"team-{i}" for i in range(7)]
    users = await all_pages(api, "/api/v1/users", 2)
    assert [u["login"] for u in users] == [f"user{i}" for i in range(7)]
    audit = await all_pages(api, "/api/v1/audit", 4)
    assert len(audit) == 14 and len({e["id"] for e in audit}) == 14
    assert [e["id"] for e in audit] == sorted((e["id"] for e in audit), reverse=True)

    first = await call(api, "GET", "/api/v1/groups", 200, params={"limit": 8})
    assert len(first["items"]) == 8 and first["next"] is None  # exactly full: no empty last page
    default_limit = await call(api, "GET", "/api/v1/audit", 200)
    assert len(default_limit["items"]) == 14

    users_cursor = (await call(api, "GET", "/api/v1/users", 200, params={"limit": 1}))["next"]
    for params in [{"limit": "0"}, {"limit": "501"}, {"limit": "ten"}, {"limit": "-1"}, {"cursor": "garbage"},
                   {"cursor": users_cursor}, {"cursor": "W10"}]:
        body = await call(api, "GET", "/api/v1/groups", 400, params=params)
        assert body["error"] == "bad_request"
    assert len((await call(api, "GET", "/api/v1/groups", 200, params={"limit": 500}))["items"]) == 8


async def test_member_pagination(api):
    g = await call(api, "POST", "/api/v1/groups", 201, json={"name": "acme"})
    for i in range(5):
        await call(api, "POST", "/api/v1/users", 201, json={"login": f"m{i}", "email": f"m{i}@x.org", "name": "M"})
        await call(api, "POST", f"/api/v1/groups/{g['id']}/members", 201, json={"login": f"m{i}"})
    members = await all_pages(api, f"/api/v1/groups/{g['id']}/members", 2)
    assert [m["login"] for m in members] == [f"m{i}" for i in range(5)]


# ---- audit ----------------------------------------------------------------------------------------------

async def test_audit_events(api, gateway_factory):
    g = await call(api, "POST", "/api/v1/groups", 201, json={"name": "acme"})
    await call(api, "POST", "/api/v1/users", 201, json={"login": "alice", "email": "a@x.org", "name": "A"})
    await call(api, "POST", f"/api/v1/groups/{g['id']}/members", 201, json={"login": "alice"})
    await call(api, "PATCH", f"/api/v1/groups/{g['id']}", 200, json={"name": "acme/core"})
    await call(api, "PATCH", "/api/v1/users/alice", 200, json={"active": False})

    events = (await call(api, "GET", "/api/v1/audit", 200))["items"]
    assert all(set(e) == EVENT_KEYS and is_utc_iso(e["at"]) for e in events)
    assert [(e["actor"], e["action"], e["subject"]) for e in events] == [
        ("tester", "user.deactivated", "alice"),
        ("tester", "group.updated", "acme/core"),
        ("tester", "group.member_added", "alice"),
        ("tester", "user.created", "alice"),
        ("tester", "group.created", "acme"),
    ]
    assert events[1]["details"] == {"group": "acme/core", "group_id": g["id"], "name": ["acme", "acme/core"]}
    assert events[3]["details"]["groups"] == ["gateway-users"]

    alice = (await call(api, "GET", "/api/v1/audit", 200, params={"login": "ALICE"}))["items"]
    assert [e["action"] for e in alice] == ["user.deactivated", "group.member_added", "user.created"]
    by_actor = (await call(api, "GET", "/api/v1/audit", 200, params={"login": "tester"}))["items"]
    assert len(by_actor) == 5
    limited = (await call(api, "GET", "/api/v1/audit", 200, params={"limit": 2}))["items"]
    assert [e["action"] for e in limited] == ["user.deactivated", "group.updated"]
    future = (datetime.now(UTC) + timedelta(minutes=5)).isoformat()
    assert (await call(api, "GET", "/api/v1/audit", 200, params={"since": future}))["items"] == []
    since = events[1]["at"]  # what the API shows is usable as ?since=
    recent = (await call(api, "GET", "/api/v1/audit", 200, params={"since": since}))["items"]
    assert [e["action"] for e in recent] == ["user.deactivated", "group.updated"]
    assert len((await call(api, "GET", "/api/v1/audit", 200, params={"since": "2000-01-01"}))["items"]) == 5
    await call(api, "GET", "/api/v1/audit", 400, params={"since": "yesterday"})
    await call(api, "GET", "/api/v1/audit", 400, params={"limit": "1000"})


async def test_audit_actor_is_the_token_name(gateway_factory):
    gw = await gateway_factory(admin={"tokens": [{"name": "ci-bot", "token": "ci-bot-token-0123456789"},
                                                 "unnamed-token-0123456789"]})
    for token, actor in [("ci-bot-token-0123456789", "ci-bot"), ("unnamed-token-0123456789", "admin-2")]:
        async with aiohttp.ClientSession(gw.admin_url, headers={"Authorization": f"Bearer {token}"}) as s:
            await call(s, "POST", "/api/v1/groups", 201, json={"name": f"by-{actor}"})
            [event] = (await call(s, "GET", "/api/v1/audit", 200, params={"login": actor}))["items"]
            assert (event["actor"], event["action"], event["subject"]) == (actor, "group.created", f"by-{actor}")


# ---- sessions, deactivation, and what signed-in users see -----------------------------------------------

async def userinfo(b: Any) -> tuple[int, Any]:
    r = await b.get(f"{b.gw.config.server.prefix}/userinfo", headers={"Accept": "application/json"})
    body = await r.json() if r.status == 200 else None
    return r.status, body


async def test_sessions_list_and_revoke(gw, api, db):
    gw.fake.add_user(10, "alice", name="Alice", email="alice@example.com")
    gw.fake.add_user(11, "bob", name="Bob", email="bob@example.com")
    async with gw.browser() as a1, gw.browser() as a2, gw.browser() as b:
        await a1.sign_in("alice")
        await a2.sign_in("alice")
        await b.sign_in("bob")
        listing = await call(api, "GET", "/api/v1/sessions", 200)
        assert [s["login"] for s in listing["items"]] == ["bob", "alice", "alice"]  # newest first
        assert all(set(s) == SESSION_KEYS and is_utc_iso(s["expires_at"]) for s in listing["items"])
        mine = (await call(api, "GET", "/api/v1/sessions", 200, params={"login": "ALICE"}))["items"]
        assert len(mine) == 2
        assert [s["id"] for s in await all_pages(api, "/api/v1/sessions", 1)] == [s["id"] for s in listing["items"]]
        await call(api, "GET", "/api/v1/sessions", 404, params={"login": "nobody"})

        assert (await userinfo(a1))[0] == 200 and (await userinfo(a2))[0] == 200
        # which of alice's sessions is a1's: the older one
        await call(api, "DELETE", f"/api/v1/sessions/{mine[1]['id']}", 204)
        await call(api, "DELETE", f"/api/v1/sessions/{mine[1]['id']}", 404)
        await call(api, "DELETE", "/api/v1/sessions/no-such-session", 404)

        async def a1_signed_out() -> bool:
            return (await userinfo(a1))[0] == 401

        await eventually(a1_signed_out)
        assert (await userinfo(a2))[0] == 200 and (await userinfo(b))[0] == 200
        left = (await call(api, "GET", "/api/v1/sessions", 200))["items"]
        assert {s["id"] for s in left} == {mine[0]["id"], listing["items"][0]["id"]}
    [(_, subject, details)] = [a for a in await audit_actions(db) if a[0] == "session.revoked"]
    assert (subject, details["login"]) == ("alice", "alice") and mine[1]["id"].startswith(details["session"])


async def test_expired_sessions_are_not_listed(gw, api, db):
    gw.fake.add_user(10, "alice", name="Alice", email="alice@example.com")
    async with gw.browser() as a1, gw.browser() as a2:
        await a1.sign_in("alice")
        await a2.sign_in("alice")
    ended = await db.fetchval("UPDATE sessions SET expires_at = now() - interval '1 second' "
                              "WHERE id = (SELECT min(id) FROM sessions) RETURNING id")
    listed = [s["id"] for s in (await call(api, "GET", "/api/v1/sessions", 200))["items"]]
    assert len(listed) == 1 and ended not in listed
    listed = [s["id"] for s in (await call(api, "GET", "/api/v1/sessions", 200, params={"login": "alice"}))["items"]]
    assert len(listed) == 1 and ended not in listed


async def test_deactivation_signs_the_user_out(gw, api, db):
    gw.fake.add_user(10, "alice", name="Alice", email="alice@example.com")
    async with gw.browser() as b, gw.browser() as b2:
        await b.sign_in("alice")
        await b2.sign_in("alice")
        status, info = await userinfo(b)
        assert status == 200 and info["user"] == "alice"
        details = await call(api, "GET", "/api/v1/users/alice", 200)
        assert details["provisioned_by"] == "jit" and details["gitlab_id"] == 10
        assert is_utc_iso(details["last_login_at"]) and is_utc_iso(details["last_sync_at"])

        off = await call(api, "PATCH", "/api/v1/users/alice", 200, json={"active": False})
        assert off["active"] is False

        async def signed_out() -> bool:
            return (await userinfo(b))[0] == 401 and (await userinfo(b2))[0] == 401

        assert await eventually(signed_out) < 1.0
        r = await b.get("/some/page")  # the proxy treats the session as signed out too
        assert r.status in (302, 401)
        assert (await call(api, "GET", "/api/v1/sessions", 200, params={"login": "alice"}))["items"] == []
        assert await db.fetchval("SELECT count(*) FROM sessions WHERE revoked_at IS NULL") == 0
        # a deactivated user cannot sign in again until reactivated
        await b.sign_in("alice", expect_status=403)
        await call(api, "PATCH", "/api/v1/users/alice", 200, json={"active": True})
        await b.sign_in("alice")
        assert (await userinfo(b))[0] == 200
    deactivated = [d for a, s, d in await audit_actions(db) if a == "user.deactivated" and s == "alice"]
    assert deactivated == [{"sessions_revoked": 2}]


async def test_membership_changes_reach_signed_in_users(gw, api):
    gw.fake.add_user(10, "alice", name="Alice", email="alice@example.com")
    g = await call(api, "POST", "/api/v1/groups", 201, json={"name": "Local team"})
    async with gw.browser() as b:
        await b.sign_in("alice")
        assert (await userinfo(b))[1]["groups"] == ["gateway-users"]

        async def groups_are(expected: list[str]) -> Callable[[], Awaitable[bool]]:
            async def check() -> bool:
                return (await userinfo(b))[1]["groups"] == expected
            return check

        await call(api, "POST", f"/api/v1/groups/{g['id']}/members", 201, json={"login": "alice"})
        await eventually(await groups_are(["Local team", "gateway-users"]))
        await call(api, "PATCH", f"/api/v1/groups/{g['id']}", 200, json={"name": "Local crew"})
        await eventually(await groups_are(["Local crew", "gateway-users"]))
        await call(api, "DELETE", f"/api/v1/groups/{g['id']}/members/alice", 204)
        await eventually(await groups_are(["gateway-users"]))
        await call(api, "POST", f"/api/v1/groups/{g['id']}/members", 201, json={"login": "alice"})
        await eventually(await groups_are(["Local crew", "gateway-users"]))
        await call(api, "DELETE", f"/api/v1/groups/{g['id']}", 204)
        await eventually(await groups_are(["gateway-users"]))


async def test_pre_provisioned_user_is_linked_at_first_sign_in(gw, api):
    await call(api, "POST", "/api/v1/users", 201, json={"login": "alice", "email": "old@x.org", "name": "Old"})
    g = await call(api, "POST", "/api/v1/groups", 201, json={"name": "Early access"})
    await call(api, "POST", f"/api/v1/groups/{g['id']}/members", 201, json={"login": "alice"})
    gw.fake.add_user(10, "alice", name="Alice", email="alice@example.com")
    async with gw.browser() as b:
        await b.sign_in("alice")
    user = await call(api, "GET", "/api/v1/users/alice", 200)
    assert (user["gitlab_id"], user["email"], user["provisioned_by"]) == (10, "alice@example.com", "admin")
    assert len((await call(api, "GET", "/api/v1/users", 200))["items"]) == 1


async def test_every_admin_error_is_json(api: Any) -> None:
    """aiohttp's own 404/405/413 and errors for a client that accepts HTML keep the API's JSON shape."""
    cases = [("GET", "/api/v1/nope", {}, 404, "not_found"),
             ("PUT", "/api/v1/groups", {}, 405, "method_not_allowed"),
             ("GET", "/api/v1/groups/999", {"Accept": "text/html"}, 404, "not_found"),
             ("POST", "/api/v1/groups", {"Content-Type": "application/json"}, 413, "request_entity_too_large")]
    for method, path, headers, status, code in cases:
        data = io.BytesIO(b'{"name": "' + b"x" * (2 * 1024**2) + b'"}') if status == 413 else None
        async with api.request(method, path, headers=headers, data=data) as r:
            assert r.status == status, (method, path)
            assert r.content_type == "application/json", (method, path)
            body = await r.json()
            assert body["error"] == code and body["message"], body


async def test_reactivating_an_active_user_changes_nothing(gw: Any, api: Any, db: Any) -> None:
    async with api.post("/api/v1/users", json={"login": "bob", "email": "b@example.com", "name": "Bob"}) as r:
        assert r.status == 201
    before = await db.fetchval("SELECT count(*) FROM audit_events")
    async with api.patch("/api/v1/users/bob", json={"active": True}) as r:
        assert r.status == 200 and (await r.json())["active"] is True
    assert await db.fetchval("SELECT count(*) FROM audit_events") == before
    async with api.patch("/api/v1/users/bob", json={"active": False}) as r:
        assert r.status == 200
    async with api.patch("/api/v1/users/bob", json={"active": False}) as r:
        assert r.status == 200
    actions = [a for (a,) in await db.fetch("SELECT action FROM audit_events WHERE subject = 'bob' ORDER BY id")]
    assert actions.count("user.deactivated") == 1
