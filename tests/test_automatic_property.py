"""Properties of automatic provisioning (SPEC §12) over random GitLab trees, against the stand-in and PostgreSQL:

1. after a run, the sync memberships of the subtree's groups are exactly "active direct member (>= Guest) of
   the group or of an ancestor", named by the groups' current GitLab paths;
2. a dry run plans exactly what the following real run then does;
3. a run right after a run changes nothing.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import asyncpg
from aiohttp.test_utils import TestServer
from conftest import make_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.demo.fake_gitlab import FakeGitLab, create_app
from gateway.sync import automatic
from gateway.sync.automatic import Pacing

TOKEN = "glpat-property"
KEYS = ("counts", "groups", "users", "memberships", "sessions")
USERS = 5

trees = st.integers(min_value=1, max_value=7).flatmap(
    lambda n: st.tuples(*(st.integers(min_value=0, max_value=max(i - 1, 0)) for i in range(1, n))))
memberships = st.lists(st.tuples(st.integers(1, USERS), st.integers(0, 6), st.sampled_from([5, 10, 30, 50])),
                       max_size=10)
states = st.lists(st.sampled_from(["active", "active", "blocked"]), min_size=USERS, max_size=USERS)


def build(parents: tuple[int, ...], members: list[tuple[int, int, int]], user_states: list[str]) -> FakeGitLab:
    fake = FakeGitLab()
    fake.add_user(99, "root")
    fake.admins.add(99)
    fake.add_access_token(TOKEN, "root")
    fake.add_group(1, "acme")
    for i, parent in enumerate(parents, start=2):
        fake.add_group(i, f"g{i}", parent=parent + 1)
    for uid in range(1, USERS + 1):
        fake.add_user(uid, f"user{uid}", state=user_states[uid - 1])
    apply_members(fake, members)
    return fake


def apply_members(fake: FakeGitLab, members: list[tuple[int, int, int]]) -> None:
    fake._members = {k: v for k, v in fake._members.items() if k[0] == 99}
    count = len(fake._groups)
    for uid, g, level in members:
        fake.add_member(uid, g % count + 1, level)


def expected(fake: FakeGitLab) -> set[tuple[str, str]]:
    """The rule, computed independently from the stand-in's own model."""
    out = set()
    for gid, group in fake._groups.items():
        chain = [gid, *fake._ancestors(gid)]
        for (uid, member_of), level in fake._members.items():
            user = fake._users[uid]
            if uid != 99 and member_of in chain and level >= 10 and user.state == "active":
                out.add((group.full_path, user.username))
    return out


async def actual(db: asyncpg.Pool) -> set[tuple[str, str]]:
    rows = await db.fetch("SELECT g.name, u.login FROM memberships m JOIN groups g ON g.id = m.group_id "
                          "JOIN users u ON u.id = m.user_id WHERE m.source = 'sync'")
    return {(r["name"], r["login"]) for r in rows}


async def example(dsn: str, parents: tuple[int, ...], first: list[tuple[int, int, int]],
                  second: list[tuple[int, int, int]], user_states: list[str], rename: int | None) -> None:
    fake = build(parents, first, user_states)
    server = TestServer(create_app(fake), host="127.0.0.1")
    await server.start_server()
    db = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    try:
        await db.execute("TRUNCATE users, sessions, memberships, audit_events, automatic_runs CASCADE; "
                         "DELETE FROM groups WHERE NOT builtin")
        cfg = make_config(public_port=1, admin_port=2, gitlab_url=str(server.make_url("")).rstrip("/"),
                          upstream_url="http://127.0.0.1:3",
                          provisioning={"automatic": {"token": TOKEN, "groups": ["acme"]}})
        async with aiohttp.ClientSession() as http:
            async def run(dry_run: bool = False) -> dict[str, Any]:
                result = await automatic.run(db, cfg, http, dry_run=dry_run, pacing=Pacing(None, None))
                return result.to_json()

            for step in range(2):
                if step == 1:
                    apply_members(fake, second)
                    if rename is not None and len(fake._groups) > 1:  # not the root: the run must name it
                        fake.rename_group(rename % (len(fake._groups) - 1) + 2, "renamed")
                planned = await run(dry_run=True)
                applied = await run()
                assert {k: planned[k] for k in KEYS} == {k: applied[k] for k in KEYS}
                assert await actual(db) == expected(fake)
                assert (await run())["counts"] == dict.fromkeys(applied["counts"], 0)
    finally:
        await db.close()
        await server.close()


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parents=trees, first=memberships, second=memberships, user_states=states,
       rename=st.none() | st.integers(0, 6))
def test_memberships_follow_the_rule_and_runs_are_idempotent(dsn: str, parents: tuple[int, ...],
                                                            first: list[tuple[int, int, int]],
                                                            second: list[tuple[int, int, int]],
                                                            user_states: list[str], rename: int | None) -> None:
    asyncio.run(example(dsn, parents, first, second, user_states, rename))
