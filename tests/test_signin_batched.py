"""The sign-in transaction's batched statements (gateway/db/signin.py) against SPEC §5.

1. Property: whatever the local groups (bound or not), the user's memberships (sync, manual, default or none),
   the GitLab groups, keep_manual_memberships, allowed_groups and sync_groups, one sign-in leaves exactly the
   memberships rule 6 describes, reports exactly the groups it added and removed in the `sign_in` audit event,
   and gives the identity the names of the user's local groups, sorted.
2. A sign-in costs a few round trips to PostgreSQL whatever the number of groups (they were one or more per
   row: 19 for a repeat sign-in, over 60 for a first one with 50 groups), and a repeat sign-in that changes
   nothing writes no membership.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.config import ProvisioningConfig
from gateway.sync import provisioning
from gateway.sync.gitlab import GitLabGroup, GitLabUser

# GitLab groups the examples draw from (id = 100 + index); "A" exists only as a local group: it matches "a"
# except for case (SPEC §11 "Case": never a match).
PATHS = ("a", "a/b", "b", "c/d", "e")
LOCAL_ONLY = ("A", "zz")
ALICE = GitLabUser(id=7, username="alice", name="Alice", email="alice@example.com", state="active")
SESSION = provisioning.NewSession(lifetime=3600.0, user_agent="test", client_ip="127.0.0.1")

local_groups = st.dictionaries(st.sampled_from(PATHS + LOCAL_ONLY), st.booleans(), max_size=7)  # name -> bound
existing = st.none() | st.dictionaries(st.sampled_from(PATHS + LOCAL_ONLY + ("<default>",)),
                                       st.sampled_from(["sync", "manual"]), max_size=8)
gitlab_groups = st.lists(st.sampled_from(PATHS), unique=True, max_size=5)


def gitlab_id(path: str) -> int:
    return 100 + PATHS.index(path)


def expected(local: dict[str, bool], before: dict[str, str], gitlab: list[str], cfg: ProvisioningConfig
             ) -> tuple[dict[str, str], list[str], list[str]]:
    """Rule 6, written from the SPEC: (memberships name -> source after the sign-in, added, removed)."""
    after = dict(before)
    after.setdefault("gateway-users", "default")
    if not cfg.sync_groups:
        return after, [], []
    considered = [p for p in gitlab if not cfg.allowed_groups or provisioning.in_allowed_groups(
        (GitLabGroup(p, None),), cfg.allowed_groups)]
    target = {name for name in local if name in considered}
    added = sorted(target - set(before))
    removed = sorted(name for name, source in before.items() if name not in target and name != "gateway-users"
                     and (source == "sync" or not cfg.keep_manual_memberships))
    for name in added:
        after[name] = "sync"
    for name in removed:
        del after[name]
    return after, added, removed


async def example(dsn: str, local: dict[str, bool], before: dict[str, str] | None, gitlab: list[str],
                  cfg: ProvisioningConfig, bind_groups: bool) -> None:
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    assert pool is not None
    try:
        await pool.execute("TRUNCATE users, sessions, memberships, audit_events, group_case_mismatches CASCADE; "
                           "DELETE FROM groups WHERE NOT builtin")
        for name, bound in local.items():
            await pool.execute("INSERT INTO groups (name, description, gitlab_group_id) VALUES ($1, '', $2)",
                               name, gitlab_id(name) if bound and name in PATHS else None)
        members: dict[str, str] = {}
        if before is not None:
            uid = await pool.fetchval("INSERT INTO users (gitlab_id, login, name, email, provisioned_by) "
                                      "VALUES (7, 'alice', 'Alice', 'alice@example.com', 'jit') RETURNING id")
            for name, source in before.items():
                name = "gateway-users" if name == "<default>" else name
                if name == "gateway-users":
                    source = "default"
                elif name not in local:
                    continue
                await pool.execute("INSERT INTO memberships (user_id, group_id, source) "
                                   "SELECT $1, id, $3 FROM groups WHERE name = $2", uid, name, source)
                members[name] = source
        groups = tuple(GitLabGroup(p, gitlab_id(p)) for p in gitlab)
        result = await provisioning.sign_in(pool, cfg, ALICE, groups, bind_groups=bind_groups, session=SESSION)
        want, added, removed = expected(local, members, gitlab, cfg)
        rows = await pool.fetch("SELECT g.name, m.source FROM memberships m JOIN groups g ON g.id = m.group_id "
                                "JOIN users u ON u.id = m.user_id WHERE u.login = 'alice'")
        assert {r["name"]: r["source"] for r in rows} == want
        assert (list(result.added), list(result.removed)) == (added, removed)
        assert result.identity.groups == tuple(sorted(want))
        event = json.loads(await pool.fetchval(
            "SELECT details::text FROM audit_events WHERE action = 'sign_in' ORDER BY id DESC LIMIT 1"))
        assert (event["added"], event["removed"]) == (added, removed)
        # A second sign-in with the same answers from GitLab changes nothing.
        again = await provisioning.sign_in(pool, cfg, ALICE, groups, bind_groups=bind_groups, session=SESSION)
        assert (again.added, again.removed) == ((), ())
        assert again.identity.groups == result.identity.groups
    finally:
        await pool.close()


configs = st.builds(ProvisioningConfig, sync_groups=st.booleans(), keep_manual_memberships=st.booleans(),
                    allowed_groups=st.sampled_from([(), ("a",)]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(local=local_groups, before=existing, gitlab=gitlab_groups, cfg=configs, bind_groups=st.booleans())
def test_memberships_after_a_sign_in_follow_rule_6(dsn: str, local: dict[str, bool], before: dict[str, str] | None,
                                                   gitlab: list[str], cfg: ProvisioningConfig,
                                                   bind_groups: bool) -> None:
    if cfg.allowed_groups and not any(p == "a" or p.startswith("a/") for p in gitlab):
        gitlab = [*gitlab, "a"]  # rule 2 would refuse the sign-in: not what this property is about
    asyncio.run(example(dsn, local, before, gitlab, cfg, bind_groups))


# ---- round trips ------------------------------------------------------------------------------------------

@pytest.fixture
def statements(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every statement asyncpg sends from now on (through its public methods, a pool's reset included)."""
    seen: list[str] = []
    for method in ("execute", "fetch", "fetchrow", "fetchval"):
        original = getattr(asyncpg.Connection, method)

        async def counting(self: asyncpg.Connection, query: str, *args: Any, _original: Any = original,
                           **kwargs: Any) -> Any:
            seen.append(" ".join(query.split())[:80])
            return await _original(self, query, *args, **kwargs)

        monkeypatch.setattr(asyncpg.Connection, method, counting)
    return seen


async def test_a_sign_in_is_a_few_round_trips_whatever_the_groups(gateway_factory: Any, db: asyncpg.Pool,
                                                                   statements: list[str]) -> None:
    gw = await gateway_factory(provisioning={"resync_interval": "0"})
    gw.fake.add_user(7, "alice")
    for gid in range(1, 51):
        gw.fake.add_group(gid, f"team-{gid}")
        gw.fake.add_member(7, gid)
    await db.execute("INSERT INTO groups (name, description) SELECT 'team-' || i, '' FROM generate_series(1, 50) i")

    async def sign_in() -> list[str]:
        statements.clear()
        async with gw.browser() as browser:
            await browser.sign_in("alice")
        return list(statements)

    first = await sign_in()
    # BEGIN + lock, read, the user (with its audit event), memberships, finish, COMMIT (the pool's release sends
    # nothing: db/server.py); plus the first binding of 50 groups (lock them, read them again, then one bind and
    # one audit event per group).
    assert len(first) <= 6 + 2 + 2 * 50, first
    assert await db.fetchval("SELECT count(*) FROM memberships m JOIN users u ON u.id = m.user_id "
                             "WHERE u.login = 'alice'") == 51
    added_at = await db.fetch("SELECT group_id, added_at FROM memberships ORDER BY group_id")
    second = await sign_in()
    assert len(second) <= 4, second  # BEGIN + lock, read, finish, COMMIT
    assert await db.fetch("SELECT group_id, added_at FROM memberships ORDER BY group_id") == added_at

    gw.fake.add_user(8, "bob")
    for gid in range(1, 51):
        gw.fake.add_member(8, gid)
    statements.clear()
    async with gw.browser() as browser:
        await browser.sign_in("bob")
    assert len(statements) <= 6, statements  # a first sign-in once the groups are bound


async def test_a_sign_in_that_binds_a_group_still_replaces_and_revokes_the_older_grant(gateway_factory: Any,
                                                                                       db: asyncpg.Pool) -> None:
    """When a sign-in binds a group (it locks group rows), the grant is written first (db/locks.py's order):
    the older grant is still the one returned and revoked at GitLab, and one grant row is kept."""
    gw = await gateway_factory(provisioning={"resync_interval": "15m"})
    gw.fake.add_user(7, "alice")
    gw.fake.add_group(1, "acme")
    gw.fake.add_member(7, 1)
    async with gw.browser() as browser:
        await browser.sign_in("alice")
    first = gw.fake.issued_tokens()[-1]
    await db.execute("INSERT INTO groups (name, description) VALUES ('acme', '')")  # unbound: bound next time
    async with gw.browser() as browser:
        await browser.sign_in("alice")
    assert await db.fetchval("SELECT gitlab_group_id FROM groups WHERE name = 'acme'") == 1
    for _ in range(100):  # the revocation runs in the background
        if {t.access_token: t for t in gw.fake.issued_tokens()}[first.access_token].revoked:
            break
        await asyncio.sleep(0.02)
    assert {t.access_token: t for t in gw.fake.issued_tokens()}[first.access_token].revoked
    assert not gw.fake.issued_tokens()[-1].revoked
    assert await db.fetchval("SELECT count(*) FROM gitlab_grants") == 1
