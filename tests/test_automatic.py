"""Automatic provisioning runs (SPEC §12) against the GitLab stand-in and a real PostgreSQL."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import asyncpg
import pytest
from conftest import audit_actions, make_config

from gateway.config import Config
from gateway.db import sessions as db_sessions
from gateway.demo.fake_gitlab import ACCESS_DEVELOPER, ACCESS_GUEST, ACCESS_MINIMAL, ACCESS_OWNER, FakeGitLab
from gateway.errors import GitLabUnavailable
from gateway.sync import automatic
from gateway.sync.automatic import Pacing, RunInProgress
from gateway.sync.gitlab_tree import Rate

TOKEN = "glpat-automatic-test-token"
FAST = Pacing(group_rate=None, api_rate=None)


def seed(fake: FakeGitLab) -> None:
    """acme (alice owner) > platform > sre (bob) ; acme > web (carol); eve blocked in platform; dan minimal."""
    fake.add_user(900, "root", name="Administrator")
    fake.admins.add(900)
    fake.add_access_token(TOKEN, "root")
    fake.add_group(1, "acme")
    fake.add_group(2, "platform", parent="acme")
    fake.add_group(3, "sre", parent="acme/platform")
    fake.add_group(4, "web", parent="acme")
    fake.add_group(9, "other-org")
    for uid, name in ((1, "alice"), (2, "bob"), (3, "carol"), (4, "dan"), (5, "eve"), (6, "zed")):
        fake.add_user(uid, name, name=name.title())
    fake.add_member("alice", "acme", ACCESS_OWNER)
    fake.add_member("bob", "acme/platform/sre", ACCESS_DEVELOPER)
    fake.add_member("carol", "acme/web", ACCESS_GUEST)
    fake.add_member("dan", "acme", ACCESS_MINIMAL)
    fake.add_member("eve", "acme/platform", ACCESS_DEVELOPER)
    fake.set_user_state("eve", "blocked")
    fake.add_member("zed", "other-org", ACCESS_OWNER)


def config(url: str, **automatic_keys: Any) -> Config:
    provisioning = {"automatic": {"token": TOKEN, "groups": ["acme"], **automatic_keys}}
    return make_config(public_port=1, admin_port=2, gitlab_url=url, upstream_url="http://127.0.0.1:3",
                       provisioning=provisioning)


@pytest.fixture
async def world(gitlab: tuple[FakeGitLab, str], db: asyncpg.Pool) -> Any:
    fake, url = gitlab
    seed(fake)
    async with aiohttp.ClientSession() as http:
        async def run(cfg: Config | None = None, **kw: Any) -> dict[str, Any]:
            kw.setdefault("pacing", FAST)
            result = await automatic.run(db, cfg or config(url), http, **kw)
            return result.to_json()

        yield fake, url, db, run


async def memberships(db: asyncpg.Pool) -> set[tuple[str, str, str]]:
    rows = await db.fetch("SELECT g.name, u.login, m.source FROM memberships m JOIN groups g ON g.id = m.group_id "
                          "JOIN users u ON u.id = m.user_id WHERE NOT g.builtin")
    return {(r["name"], r["login"], r["source"]) for r in rows}


async def sign_in_session(db: asyncpg.Pool, login: str) -> str:
    uid = await db.fetchval("SELECT id FROM users WHERE login = $1", login)
    sid = f"session-of-{login}-{uid}"
    async with db.acquire() as conn:
        await db_sessions.insert(conn, sid, uid, lifetime=3600, user_agent="t", client_ip="127.0.0.1")
    return sid


async def live(db: asyncpg.Pool, sid: str) -> bool:
    return bool(await db.fetchval("SELECT revoked_at IS NULL FROM sessions WHERE id = $1", sid))


ACME = {("acme", "alice"), ("acme/platform", "alice"), ("acme/platform/sre", "alice"), ("acme/web", "alice"),
        ("acme/platform/sre", "bob"), ("acme/web", "carol")}


async def test_a_three_level_subtree_provisions_groups_users_and_memberships(world: Any) -> None:
    _fake, _url, db, run = world
    report = await run()
    groups = await db.fetch("SELECT name, gitlab_group_id FROM groups WHERE NOT builtin ORDER BY name")
    assert [tuple(r) for r in groups] == [("acme", 1), ("acme/platform", 2), ("acme/platform/sre", 3),
                                          ("acme/web", 4)]
    users = await db.fetch("SELECT login, gitlab_id, provisioned_by, email FROM users ORDER BY login")
    # eve is blocked, dan has Minimal Access, zed is outside the subtree: none is created.
    assert [tuple(r) for r in users] == [("alice", 1, "gitlab", "alice@example.com"),
                                         ("bob", 2, "gitlab", "bob@example.com"),
                                         ("carol", 3, "gitlab", "carol@example.com")]
    assert await memberships(db) == {(g, u, "sync") for g, u in ACME}
    default = await db.fetchval("SELECT count(*) FROM memberships m JOIN groups g ON g.id = m.group_id "
                                "WHERE g.builtin AND m.source = 'default'")
    assert default == 3
    assert report["counts"] == {"groups_created": 4, "groups_bound": 0, "groups_renamed": 0, "users_created": 3,
                                "users_updated": 0, "memberships_added": 6, "memberships_removed": 0,
                                "sessions_revoked": 0, "users_signed_out": 0, "conflicts": 0}
    assert report["listed"] == {"groups": 4, "members": 4, "users": 4}  # Minimal Access is not membership
    events = [(a, s, d) for a, s, d in await audit_actions(db) if a == "sync.automatic"]
    assert len(events) == 1 and events[0][2]["counts"] == report["counts"]
    # A second run with nothing changed in GitLab changes nothing.
    again = await run()
    assert again["counts"]["memberships_added"] == 0 and sum(again["counts"].values()) == 0


async def test_existing_groups_are_bound_and_manual_memberships_follow_the_rule(world: Any) -> None:
    _fake, url, db, run = world
    gid = await db.fetchval("INSERT INTO groups (name) VALUES ('acme/web') RETURNING id")
    await db.execute("INSERT INTO users (login, provisioned_by) VALUES ('mallory', 'admin')")
    await db.execute("INSERT INTO memberships (user_id, group_id, source) "
                     "SELECT id, $1, 'manual' FROM users WHERE login = 'mallory'", gid)
    planned = await run(dry_run=True)
    assert planned["groups"]["bound"] == [{"name": "acme/web", "gitlab_group_id": 4}]
    report = await run(config(url, create_groups=False))
    assert report["groups"]["created"] == [] and report["counts"]["groups_bound"] == 1
    assert await db.fetchval("SELECT gitlab_group_id FROM groups WHERE id = $1", gid) == 4
    # keep_manual_memberships is false: the manual membership GitLab does not give is removed.
    assert await memberships(db) == {("acme/web", "alice", "sync"), ("acme/web", "carol", "sync")}


async def test_same_login_with_another_gitlab_id_is_not_merged(world: Any) -> None:
    _fake, _url, db, run = world
    await db.execute("INSERT INTO users (login, gitlab_id, provisioned_by) VALUES ('Bob', 777, 'jit')")
    await db.execute("INSERT INTO users (login, provisioned_by) VALUES ('carol', 'admin')")  # no GitLab id: linked
    report = await run()
    assert report["users"]["conflicts"] == [{
        "login": "Bob", "gitlab_id": 2, "held_by_gitlab_id": 777,
        "message": "a local user with this login has another GitLab id; not merged"}]
    assert await db.fetchval("SELECT gitlab_id FROM users WHERE login = 'carol'") == 3
    assert await db.fetchval("SELECT count(*) FROM users WHERE lower(login) = 'bob'") == 1
    assert not any(u == "Bob" for _, u, _ in await memberships(db))
    event = next(d for a, _, d in await audit_actions(db) if a == "sync.automatic")
    assert event["conflicts"][0]["held_by_gitlab_id"] == 777


async def test_removed_members_lose_memberships_and_leavers_their_sessions(world: Any) -> None:
    fake, _url, db, run = world
    await run()
    bob = await sign_in_session(db, "bob")
    carol = await sign_in_session(db, "carol")
    alice = await sign_in_session(db, "alice")
    fake.remove_member("bob", "acme/platform/sre")  # out of the whole subtree
    fake.remove_member("carol", "acme/web")
    fake.add_member("carol", "acme/platform", ACCESS_GUEST)  # moved within the subtree: keeps her session
    fake.set_user_state("alice", "blocked")
    report = await run()
    assert await memberships(db) == {("acme/platform", "carol", "sync"), ("acme/platform/sre", "carol", "sync")}
    assert (await live(db, bob), await live(db, carol), await live(db, alice)) == (False, True, False)
    assert report["sessions"]["revoked"] == [
        {"login": "alice", "gitlab_id": 1, "sessions": 1, "reason": "gitlab_state_blocked"},
        {"login": "bob", "gitlab_id": 2, "sessions": 1, "reason": "left_subtree"}]
    # Users are never deleted nor deactivated by a run.
    assert await db.fetchval("SELECT count(*) FROM users WHERE active") == 3
    revoked = [(s, d["reason"]) for a, s, d in await audit_actions(db) if a == "session.revoked"]
    assert sorted(revoked) == [("alice", "gitlab_state_blocked"), ("bob", "left_subtree")]


async def test_renamed_and_moved_groups_are_followed_by_id(world: Any) -> None:
    fake, _url, db, run = world
    await run()
    before = await memberships(db)
    fake.rename_group("acme/platform", "infra")
    fake.transfer_group("acme/web", "acme/infra")
    report = await run()
    assert sorted((r["old"], r["new"]) for r in report["groups"]["renamed"]) == [
        ("acme/platform", "acme/infra"), ("acme/platform/sre", "acme/infra/sre"), ("acme/web", "acme/infra/web")]
    names = {r["gitlab_group_id"]: r["name"] for r in await db.fetch("SELECT name, gitlab_group_id FROM groups")}
    assert names[2] == "acme/infra" and names[3] == "acme/infra/sre" and names[4] == "acme/infra/web"
    rename = {"acme/platform": "acme/infra", "acme/platform/sre": "acme/infra/sre", "acme/web": "acme/infra/web"}
    assert await memberships(db) == {(rename.get(g, g), u, s) for g, u, s in before}
    assert report["counts"]["groups_created"] == 0 and report["counts"]["memberships_removed"] == 0


async def test_the_dry_run_plan_is_what_the_real_run_does(world: Any) -> None:
    fake, _url, db, run = world
    await run()
    await sign_in_session(db, "bob")
    fake.remove_member("bob", "acme/platform/sre")
    fake.rename_group("acme/web", "www")
    fake.add_group(5, "data", parent="acme/platform")
    fake.add_user(7, "gina")
    fake.add_member("gina", "acme/platform/data", ACCESS_DEVELOPER)
    snapshot = await db.fetch("SELECT * FROM memberships ORDER BY user_id, group_id")
    planned = await run(dry_run=True)
    assert await db.fetch("SELECT * FROM memberships ORDER BY user_id, group_id") == snapshot  # nothing changed
    assert planned["dry_run"] and not planned["applied"]
    applied = await run()
    keys = ("counts", "groups", "users", "memberships", "sessions")
    assert {k: planned[k] for k in keys} == {k: applied[k] for k in keys}
    assert applied["counts"]["groups_created"] == 1 and applied["counts"]["users_created"] == 1
    assert ("acme/platform/data", "gina", "sync") in await memberships(db)


async def test_an_unknown_root_group_fails_naming_it(world: Any) -> None:
    fake, url, db, run = world
    with pytest.raises(GitLabUnavailable, match=r"GitLab group 'nope' .* does not exist or the token cannot see"):
        await run(config(url, groups=["acme", "nope"]))
    with pytest.raises(GitLabUnavailable, match="'other-org'"):  # exists, but the token's user cannot read it
        await run(make_config(public_port=1, admin_port=2, gitlab_url=url, upstream_url="http://127.0.0.1:3",
                              provisioning={"automatic": {"token": "glpat-alice", "groups": ["other-org"]}})
                  ) if fake.add_access_token("glpat-alice", "alice") is None else None
    assert await db.fetchval("SELECT count(*) FROM groups") == 1
    assert await db.fetchval("SELECT count(*) FROM users") == 0


async def test_gitlab_failing_on_page_n_of_m_changes_nothing(world: Any) -> None:
    fake, _url, db, run = world
    for i in range(250):  # 3 pages of descendants
        fake.add_group(1000 + i, f"team-{i}", parent="acme/web")
    fake.fail("descendant_groups", 500, page=2)
    with pytest.raises(GitLabUnavailable, match="HTTP 500"):
        await run()
    assert await db.fetchval("SELECT count(*) FROM groups") == 1
    assert await db.fetchval("SELECT count(*) FROM users") == 0
    fake.fail("members", 502, page=1, times=1)
    with pytest.raises(GitLabUnavailable):
        await run()
    assert await db.fetchval("SELECT count(*) FROM groups") == 1
    failed = await db.fetch("SELECT ok, error FROM automatic_runs ORDER BY id")
    assert [r["ok"] for r in failed] == [False, False] and "HTTP 500" in failed[0]["error"]


async def test_the_rate_limiter_is_respected_and_its_429s_waited_out(world: Any) -> None:
    fake, _url, _db, run = world
    throttle = fake.rate_limit(5, period=1.0)
    paced = Pacing(group_rate=Rate(3, 1.0, 1), api_rate=Rate(3, 1.0, 1))  # together never over 5 a second
    report = await run(pacing=paced)
    assert throttle is not None and throttle.throttled == 0  # paced under the limit: no 429 at all
    assert report["gitlab"]["throttled"] == 0 and report["counts"]["users_created"] == 3
    # Unpaced against the same limit: GitLab answers 429s, which are waited out, not failed.
    fake.add_group(20, "extra", parent="acme")
    report = await run(pacing=FAST)
    assert throttle.throttled > 0 and report["gitlab"]["throttled"] == throttle.throttled
    assert report["counts"]["groups_created"] == 1


async def test_two_runs_at_once_one_runs_the_other_says_so(world: Any) -> None:
    fake, _url, _db, run = world
    fake.fail("members", 0, delay=0.5, times=None)  # slow GitLab: the first run holds the lock a while
    first = asyncio.create_task(run())
    await asyncio.sleep(0.2)
    with pytest.raises(RunInProgress, match="in progress"):
        await run()
    report = await first
    assert report["counts"]["users_created"] == 3
