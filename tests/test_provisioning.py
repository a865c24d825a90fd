"""SPEC §5, rule by rule, driven over HTTP through the GitLab stand-in against real PostgreSQL."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import asyncpg
import pytest
from conftest import Gateway, audit_actions

from gateway.config import ConfigError
from gateway.services import accounts


async def sign_in(gw: Gateway, username: str, *, expect: int = 302) -> tuple[int, str]:
    async with gw.browser() as b:
        r = await b.sign_in(username, expect_status=expect)
        return r.status, await r.text()


async def groups_of(db: asyncpg.Pool, login: str) -> dict[str, str]:
    rows = await db.fetch(
        """SELECT g.name, m.source FROM memberships m JOIN groups g ON g.id = m.group_id
           JOIN users u ON u.id = m.user_id WHERE lower(u.login) = lower($1)""", login)
    return {r["name"]: r["source"] for r in rows}


async def add_local_groups(db: asyncpg.Pool, *names: str) -> None:
    for name in names:
        await db.execute("INSERT INTO groups (name) VALUES ($1)", name)


async def add_manual_membership(db: asyncpg.Pool, group: str) -> None:
    """What an administrator's `add-member` leaves: a membership with source manual (the only user)."""
    await db.execute("""INSERT INTO memberships (user_id, group_id, source)
                        SELECT u.id, g.id, 'manual' FROM users u, groups g WHERE g.name = $1""", group)


def seed_acme(gw: Gateway) -> None:
    fake = gw.fake
    fake.add_group(1, "acme")
    fake.add_group(2, "platform", parent="acme")
    fake.add_group(3, "sre", parent="acme/platform")
    fake.add_group(4, "acme-corp")
    fake.add_group(5, "other-org")
    fake.add_user(10, "alice", name="Alice A", email="alice@example.com")


async def alice_in_250_groups(gw: Gateway, db: asyncpg.Pool) -> None:
    """Three pages of /api/v4/groups (per_page=100); the first and last group exist locally."""
    gw.fake.add_user(10, "alice")
    for i in range(250):
        gw.fake.add_group(100 + i, f"g{i:03d}")
        gw.fake.add_member("alice", f"g{i:03d}")
    await add_local_groups(db, "g000", "g249")


# ---- rule 1: fetch ------------------------------------------------------------------------------------------

async def test_failure_on_page_3_of_groups_changes_nothing(gateway_factory: Any, db: asyncpg.Pool) -> None:
    gw = await gateway_factory()
    await alice_in_250_groups(gw, db)
    gw.fake.fail("groups", 500, page=3)
    _, body = await sign_in(gw, "alice", expect=502)
    assert "GitLab is unavailable" in body
    assert await db.fetchval("SELECT count(*) FROM users") == 0
    assert await db.fetchval("SELECT count(*) FROM memberships") == 0
    # With GitLab healthy again, all three pages are read and both local groups are synced.
    gw.fake.clear_failures()
    await sign_in(gw, "alice")
    assert set(await groups_of(db, "alice")) == {"gateway-users", "g000", "g249"}
    requested_pages = [p for m, p in gw.fake.requests if "/api/v4/groups" in p and "page=3" in p]
    assert requested_pages


async def test_failure_on_page_3_keeps_existing_memberships(gateway_factory: Any, db: asyncpg.Pool) -> None:
    gw = await gateway_factory()
    await alice_in_250_groups(gw, db)
    await sign_in(gw, "alice")
    before = await groups_of(db, "alice")
    last_login = await db.fetchval("SELECT last_login_at FROM users")
    gw.fake.fail("groups", 500, page=3)
    await sign_in(gw, "alice", expect=502)
    assert await groups_of(db, "alice") == before
    assert await db.fetchval("SELECT last_login_at FROM users") == last_login


@pytest.mark.parametrize(("failure", "status"), [
    ({"endpoint": "groups", "status": 429, "retry_after": 30}, 503),  # SPEC §16: 429 is a 503 with the wait
    ({"endpoint": "user", "status": 503}, 502),
    ({"endpoint": "token", "status": 500}, 502),
])
async def test_gitlab_errors_fail_cleanly(gateway_factory: Any, db: asyncpg.Pool, failure: dict[str, Any],
                                          status: int) -> None:
    gw = await gateway_factory()
    gw.fake.add_user(10, "alice")
    gw.fake.fail(**failure)
    _, body = await sign_in(gw, "alice", expect=status)
    assert "Try again" in body
    assert await db.fetchval("SELECT count(*) FROM users") == 0


async def test_gitlab_timeout_fails_cleanly(gateway_factory: Any, db: asyncpg.Pool) -> None:
    gw = await gateway_factory(gitlab={"timeout": "1s"})
    gw.fake.add_user(10, "alice")
    gw.fake.fail("groups", 0, delay=2.0)
    await sign_in(gw, "alice", expect=502)
    assert await db.fetchval("SELECT count(*) FROM users") == 0


async def test_blocked_gitlab_account_is_refused(gateway_factory: Any, db: asyncpg.Pool) -> None:
    gw = await gateway_factory()
    gw.fake.add_user(10, "dave", state="blocked")
    _, body = await sign_in(gw, "dave", expect=403)
    assert "blocked" in body
    assert await db.fetchval("SELECT count(*) FROM users") == 0
    # Refused by GitLab itself (403 on /api/v4/user), and audited like every other refusal.
    (action, _, details), = await audit_actions(db)
    assert action == "sign_in.refused" and details["reason"] == "blocked"


# ---- rule 2: allowed groups ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("member_of", "allowed", "ok"), [
    ("acme", ["acme"], True),
    ("acme/platform", ["acme"], True),             # a subgroup of an allowed group
    ("acme/platform", ["acme/platform/sre"], True),  # descendants of a direct group count
    ("acme-corp", ["acme"], False),                 # the prefix trap
    ("other-org", ["acme"], False),
    ("acme", ["Acme"], False),                      # case-sensitive
    ("acme/platform", ["acme/plat"], False),
])
async def test_allowed_groups(gateway_factory: Any, db: asyncpg.Pool, member_of: str, allowed: list[str],
                              ok: bool) -> None:
    gw = await gateway_factory(provisioning={"allowed_groups": allowed})
    seed_acme(gw)
    gw.fake.add_member("alice", member_of)
    if ok:
        await sign_in(gw, "alice")
        assert await db.fetchval("SELECT count(*) FROM users") == 1
    else:
        _, body = await sign_in(gw, "alice", expect=403)
        assert "not a member of an allowed GitLab group" in body
        assert await db.fetchval("SELECT count(*) FROM users") == 0
        actions = await audit_actions(db)
        assert actions[-1][:2] == ("sign_in.refused", "alice")
        assert actions[-1][2]["reason"] == "not_allowed"


async def test_allowed_groups_case_sensitive_path(gateway_factory: Any, db: asyncpg.Pool) -> None:
    gw = await gateway_factory(provisioning={"allowed_groups": ["acme/devs"]})
    gw.fake.add_group(1, "Acme")
    gw.fake.add_group(2, "Devs", parent="Acme")
    gw.fake.add_user(10, "alice")
    gw.fake.add_member("alice", "Acme/Devs")
    await sign_in(gw, "alice", expect=403)


async def test_allowed_groups_enforced_without_sync(gateway_factory: Any, db: asyncpg.Pool) -> None:
    gw = await gateway_factory(provisioning={"allowed_groups": ["acme"], "sync_groups": False})
    seed_acme(gw)
    gw.fake.add_member("alice", "other-org")
    await sign_in(gw, "alice", expect=403)
    gw.fake.add_member("alice", "acme")
    await sign_in(gw, "alice")


async def test_refusal_leaves_existing_user_untouched(gateway_factory: Any, db: asyncpg.Pool) -> None:
    gw = await gateway_factory(provisioning={"allowed_groups": ["acme"]})
    seed_acme(gw)
    gw.fake.add_member("alice", "acme")
    await sign_in(gw, "alice")
    before = await db.fetchrow("SELECT * FROM users")
    gw.fake.remove_member("alice", "acme")
    gw.fake.rename_user("alice", "alice2")
    await sign_in(gw, "alice2", expect=403)
    assert await db.fetchrow("SELECT * FROM users") == before


# ---- rules 3 and 4: finding or creating the user --------------------------------------------------------------

async def test_username_change_followed_by_gitlab_id(gateway_factory: Any, db: asyncpg.Pool) -> None:
    gw = await gateway_factory()
    gw.fake.add_user(10, "alice", email="a@example.com")
    await sign_in(gw, "alice")
    gw.fake.rename_user("alice", "alice.new")
    await sign_in(gw, "alice.new")
    rows = await db.fetch("SELECT login, gitlab_id FROM users")
    assert [tuple(r) for r in rows] == [("alice.new", 10)]
    assert ("user.updated", "alice.new") in [a[:2] for a in await audit_actions(db)]


async def test_pre_provisioned_user_linked_by_username(gateway_factory: Any, db: asyncpg.Pool) -> None:
    gw = await gateway_factory(provisioning={"allow_signup": False})
    await db.execute("INSERT INTO users (login, email, name, provisioned_by) VALUES ('Alice', 'x@x', 'X', 'admin')")
    gw.fake.add_user(10, "alice", name="Alice A", email="alice@example.com")
    await sign_in(gw, "alice")
    row = await db.fetchrow("SELECT login, gitlab_id, email, provisioned_by FROM users")
    assert tuple(row) == ("alice", 10, "alice@example.com", "admin")
    assert await db.fetchval("SELECT count(*) FROM users") == 1


async def test_pre_provisioned_user_linked_by_gitlab_id(gateway_factory: Any, db: asyncpg.Pool) -> None:
    gw = await gateway_factory(provisioning={"allow_signup": False})
    await db.execute("INSERT INTO users (login, gitlab_id, provisioned_by) VALUES ('a-different-name', 10, 'admin')")
    gw.fake.add_user(10, "alice")
    await sign_in(gw, "alice")
    assert await db.fetchval("SELECT login FROM users WHERE gitlab_id = 10") == "alice"


async def test_pre_provisioned_with_other_gitlab_id_is_not_claimed(gateway_factory: Any, db: asyncpg.Pool) -> None:
    gw = await gateway_factory()
    await db.execute("INSERT INTO users (login, gitlab_id, provisioned_by) VALUES ('alice', 99, 'admin')")
    gw.fake.add_user(10, "alice")
    _, body = await sign_in(gw, "alice", expect=403)
    assert "already used by another account" in body
    assert await db.fetchval("SELECT gitlab_id FROM users WHERE login = 'alice'") == 99


async def test_signup_disabled(gateway_factory: Any, db: asyncpg.Pool) -> None:
    gw = await gateway_factory(provisioning={"allow_signup": False})
    gw.fake.add_user(10, "alice")
    _, body = await sign_in(gw, "alice", expect=403)
    assert "Sign-up is disabled: ask an administrator to create your account" in body
    assert await db.fetchval("SELECT count(*) FROM users") == 0
    assert (await audit_actions(db))[-1][2]["reason"] == "signup_disabled"


async def test_new_user_created_in_default_group(gateway_factory: Any, db: asyncpg.Pool) -> None:
    gw = await gateway_factory()
    gw.fake.add_user(10, "alice", name="Alice A", email="alice@example.com")
    await sign_in(gw, "alice")
    row = await db.fetchrow("SELECT login, name, email, provisioned_by, active FROM users")
    assert tuple(row) == ("alice", "Alice A", "alice@example.com", "jit", True)
    assert await groups_of(db, "alice") == {"gateway-users": "default"}
    assert ("user.created", "alice") in [a[:2] for a in await audit_actions(db)]


async def test_default_group_follows_configuration(gateway_factory: Any, db: asyncpg.Pool) -> None:
    gw = await gateway_factory(provisioning={"default_group": "everyone"})
    gw.fake.add_user(10, "alice")
    await sign_in(gw, "alice")
    assert await groups_of(db, "alice") == {"everyone": "default"}


async def test_default_group_name_taken_is_a_config_error(gateway_factory: Any, db: asyncpg.Pool) -> None:
    await add_local_groups(db, "staff")
    with pytest.raises(ConfigError) as info:
        await gateway_factory(provisioning={"default_group": "staff"})
    assert info.value.problems[0].startswith("provisioning.default_group: a group named 'staff' already exists")


# ---- rule 5: existing users -------------------------------------------------------------------------------------

async def test_deactivated_user_refused_and_stays_deactivated(gateway_factory: Any, db: asyncpg.Pool) -> None:
    gw = await gateway_factory()
    gw.fake.add_user(10, "alice", name="Alice")
    await sign_in(gw, "alice")
    await db.execute("UPDATE users SET active = false")
    gw.fake.rename_user("alice", "alice2")
    _, body = await sign_in(gw, "alice2", expect=403)
    assert "Your account is deactivated" in body
    row = await db.fetchrow("SELECT login, active FROM users")
    assert tuple(row) == ("alice", False)


async def test_username_taken_by_another_row(gateway_factory: Any, db: asyncpg.Pool) -> None:
    gw = await gateway_factory()
    gw.fake.add_user(10, "alice")
    gw.fake.add_user(11, "bob")
    await sign_in(gw, "alice")
    await sign_in(gw, "bob")
    gw.fake.rename_user("bob", "bob-old")
    gw.fake.rename_user("alice", "BOB")  # case-insensitive clash with the row of GitLab user 11
    # GitLab user 11 is now bob-old at GitLab, but our row still says bob.
    _, body = await sign_in(gw, "BOB", expect=403)
    assert "already used by another account" in body
    assert {r["login"] for r in await db.fetch("SELECT login FROM users")} == {"alice", "bob"}
    actions = await audit_actions(db)
    assert actions[-1][0] == "sign_in.refused" and actions[-1][2]["reason"] == "username_taken"
    # Once bob signs in under the new name, the old one is free.
    await sign_in(gw, "bob-old")
    await sign_in(gw, "BOB")
    assert {r["login"] for r in await db.fetch("SELECT login FROM users")} == {"BOB", "bob-old"}


# ---- rules 6-8: synchronization and binding --------------------------------------------------------------------

async def test_sync_adds_matching_groups_and_ignores_others(gateway_factory: Any, db: asyncpg.Pool) -> None:
    gw = await gateway_factory()
    seed_acme(gw)
    gw.fake.add_member("alice", "acme/platform")
    await add_local_groups(db, "acme/platform", "acme/platform/sre", "acme", "Acme/Platform")
    await sign_in(gw, "alice")
    # Descendants count, ancestors do not; names match exactly and case-sensitively.
    assert await groups_of(db, "alice") == {
        "gateway-users": "default", "acme/platform": "sync", "acme/platform/sre": "sync"}
    assert await db.fetchval("SELECT count(*) FROM groups") == 5  # sync never creates groups
    event = [a for a in await audit_actions(db) if a[0] == "sign_in"][-1]
    assert event[2]["added"] == ["acme/platform", "acme/platform/sre"] and event[2]["removed"] == []


async def test_memberships_synced_at_sign_in_reach_other_processes_at_once(gateway_factory: Any,
                                                                           db: asyncpg.Pool) -> None:
    """A sign-in that changes memberships announces it (NOTIFY): another process serving an older session of
    the same user drops its cached groups instead of serving them until check_interval."""
    gw = await gateway_factory(session={"check_interval": "1h"})
    other = await gateway_factory(session={"check_interval": "1h"})
    seed_acme(gw)
    await add_local_groups(db, "acme")

    async def groups_seen_by_other(cookie: str) -> list[str]:
        async with aiohttp.ClientSession() as http, http.get(f"{other.public_url}/oauth2/userinfo",
                                                             headers={"Cookie": f"_gateway={cookie}"}) as r:
            assert r.status == 200
            groups: list[str] = (await r.json())["groups"]
            return groups

    async with gw.browser() as laptop:
        await laptop.sign_in("alice")
        cookie = laptop.cookie("_gateway")
        assert cookie and await groups_seen_by_other(cookie) == ["gateway-users"]  # now cached there
        gw.fake.add_member("alice", "acme")
        await sign_in(gw, "alice")  # from another browser: the laptop's session stays
        deadline = asyncio.get_running_loop().time() + 2
        while await groups_seen_by_other(cookie) != ["acme", "gateway-users"]:
            assert asyncio.get_running_loop().time() < deadline, "the other process kept the old groups"
            await asyncio.sleep(0.05)


async def test_manual_membership_reset_at_next_sign_in(gateway_factory: Any, db: asyncpg.Pool) -> None:
    gw = await gateway_factory()
    seed_acme(gw)
    gw.fake.add_member("alice", "acme")
    await add_local_groups(db, "acme", "ops")
    await sign_in(gw, "alice")
    await add_manual_membership(db, "ops")
    await sign_in(gw, "alice")
    assert await groups_of(db, "alice") == {"gateway-users": "default", "acme": "sync"}
    event = [a for a in await audit_actions(db) if a[0] == "sign_in"][-1]
    assert event[2]["removed"] == ["ops"]


async def test_keep_manual_memberships(gateway_factory: Any, db: asyncpg.Pool) -> None:
    gw = await gateway_factory(provisioning={"keep_manual_memberships": True})
    seed_acme(gw)
    gw.fake.add_member("alice", "acme")
    await add_local_groups(db, "acme", "ops")
    await sign_in(gw, "alice")
    await add_manual_membership(db, "ops")
    gw.fake.remove_member("alice", "acme")
    await sign_in(gw, "alice")
    assert await groups_of(db, "alice") == {"gateway-users": "default", "ops": "manual"}


async def test_default_group_survives_every_sync(gateway_factory: Any, db: asyncpg.Pool) -> None:
    gw = await gateway_factory()
    seed_acme(gw)
    # Even a GitLab group named like the default group neither duplicates nor removes it.
    gw.fake.add_group(9, "gateway-users")
    gw.fake.add_member("alice", "gateway-users")
    await sign_in(gw, "alice")
    gw.fake.remove_member("alice", "gateway-users")
    await sign_in(gw, "alice")
    assert await groups_of(db, "alice") == {"gateway-users": "default"}


async def test_sync_off_leaves_memberships(gateway_factory: Any, db: asyncpg.Pool) -> None:
    gw = await gateway_factory(provisioning={"sync_groups": False})
    seed_acme(gw)
    gw.fake.add_member("alice", "acme")
    await add_local_groups(db, "acme", "ops")
    await sign_in(gw, "alice")
    assert await groups_of(db, "alice") == {"gateway-users": "default"}
    await add_manual_membership(db, "ops")
    await sign_in(gw, "alice")
    assert await groups_of(db, "alice") == {"gateway-users": "default", "ops": "manual"}
    assert not any("/api/v4/groups" in p for _, p in gw.fake.requests)  # not even fetched


async def test_group_binding_by_gitlab_id(gateway_factory: Any, db: asyncpg.Pool) -> None:
    gw = await gateway_factory()
    seed_acme(gw)
    gw.fake.add_user(11, "mallory")
    gw.fake.add_member("alice", "acme")
    await add_local_groups(db, "acme")
    await sign_in(gw, "alice")
    assert await db.fetchval("SELECT gitlab_group_id FROM groups WHERE name = 'acme'") == 1
    # The real acme is renamed; someone else claims the old path with a new group.
    gw.fake.rename_group("acme", "acme-renamed")
    gw.fake.add_group(77, "acme")
    gw.fake.add_member("mallory", "acme")
    await sign_in(gw, "mallory")
    assert await groups_of(db, "mallory") == {"gateway-users": "default"}
    mismatch = [a for a in await audit_actions(db) if a[0] == "group.binding_mismatch"]
    assert mismatch and mismatch[0][1] == "acme" and mismatch[0][2]["seen_gitlab_group_id"] == 77


async def test_group_renamed_at_gitlab_and_recreated_locally(gateway_factory: Any, db: asyncpg.Pool) -> None:
    """acme (bound to GitLab id 1) is renamed acme-new at GitLab and an admin creates a local acme-new: SPEC §11,
    acme still matches by id (its rename is refused as a conflict, audited), acme-new cannot be bound to the
    same GitLab group; sign-in still works and the audit says why."""
    gw = await gateway_factory()
    seed_acme(gw)
    gw.fake.add_member("alice", "acme")
    await add_local_groups(db, "acme")
    await sign_in(gw, "alice")
    gw.fake.rename_group("acme", "acme-new")
    await add_local_groups(db, "acme-new")
    await sign_in(gw, "alice")
    assert await groups_of(db, "alice") == {"gateway-users": "default", "acme": "sync"}
    assert await db.fetchval("SELECT gitlab_group_id FROM groups WHERE name = 'acme-new'") is None
    conflict = [a for a in await audit_actions(db) if a[0] == "group.rename_conflict"]
    assert conflict[-1][1] == "acme" and conflict[-1][2]["new_name"] == "acme-new"
    mismatch = [a for a in await audit_actions(db) if a[0] == "group.binding_mismatch"]
    assert mismatch[-1][1] == "acme-new" and mismatch[-1][2]["seen_gitlab_group_id"] == 1


async def test_group_deleted_during_sign_in(gateway_factory: Any, db: asyncpg.Pool, dsn: str) -> None:
    """An administrator deletes a group while a sign-in is adding the user to it: the sign-in starts over
    and succeeds without it (never a 500)."""
    gw = await gateway_factory()
    seed_acme(gw)
    gw.fake.add_member("alice", "acme")
    await add_local_groups(db, "acme")
    await sign_in(gw, "alice")
    await db.execute("DELETE FROM memberships m USING groups g WHERE g.id = m.group_id AND g.name = 'acme'")
    admin = await asyncpg.connect(dsn)
    try:
        async with admin.transaction():
            await admin.execute("DELETE FROM groups WHERE name = 'acme'")
            signing_in = asyncio.create_task(sign_in(gw, "alice"))
            # The sign-in read the group and now waits for our transaction on its membership insert.
            await wait_for_lock_waiter(db)
        assert (await signing_in)[0] == 302
    finally:
        await admin.close()
    assert await groups_of(db, "alice") == {"gateway-users": "default"}


async def wait_for_lock_waiter(db: asyncpg.Pool) -> None:
    for _ in range(200):
        if await db.fetchval("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                             "AND datname = current_database()"):
            return
        await asyncio.sleep(0.02)
    raise AssertionError("nothing ever waited for the lock")


async def test_deactivation_before_a_sign_in_commits(gateway_factory: Any, db: asyncpg.Pool, dsn: str) -> None:
    """A deactivation holding the user row while a sign-in starts: the sign-in waits, then is refused."""
    gw = await gateway_factory()
    gw.fake.add_user(10, "alice")
    await sign_in(gw, "alice")
    admin = await asyncpg.connect(dsn)
    try:
        async with admin.transaction():
            await admin.execute("UPDATE users SET active = false")
            await admin.execute("UPDATE sessions SET revoked_at = now() WHERE revoked_at IS NULL")
            signing_in = asyncio.create_task(sign_in(gw, "alice", expect=403))
            await wait_for_lock_waiter(db)
        _, body = await signing_in
    finally:
        await admin.close()
    assert "deactivated" in body
    assert await db.fetchval("SELECT count(*) FROM sessions WHERE revoked_at IS NULL") == 0


async def test_deactivation_while_a_sign_in_is_committing(gateway_factory: Any, db: asyncpg.Pool,
                                                          dsn: str) -> None:
    """The other order: the sign-in holds the user row when an administrator deactivates. The deactivation
    waits for it, then revokes every session, the new one included: the new cookie is refused everywhere."""
    gw = await gateway_factory(session={"check_interval": "1h"})
    gw.fake.add_user(10, "alice")
    await sign_in(gw, "alice")
    blocker = await asyncpg.connect(dsn)
    try:
        async with gw.browser() as b:
            async with blocker.transaction():
                # Lets the sign-in lock the user row and do its work, then stops it at its session insert.
                await blocker.execute("LOCK TABLE sessions IN SHARE MODE")
                signing_in = asyncio.create_task(b.sign_in("alice"))
                await wait_for_lock_waiter(db)
                deactivating = asyncio.create_task(accounts.set_active(db, "alice", False, actor="test"))
                await asyncio.sleep(0.2)
                assert not deactivating.done()  # it waits for the sign-in's lock on the user row
            await signing_in
            await deactivating
            assert await db.fetchval("SELECT count(*) FROM sessions WHERE revoked_at IS NULL") == 0
            # The deactivation's NOTIFY reaches this process within a second (SPEC §2), not necessarily
            # before the next request: the sign-in may have cached the identity just before it.
            for _ in range(20):
                if (await b.get("/oauth2/userinfo")).status == 401:
                    break
                await asyncio.sleep(0.05)
            assert (await b.get("/oauth2/userinfo")).status == 401
    finally:
        await blocker.close()


async def test_records_login_and_sync_times(gateway_factory: Any, db: asyncpg.Pool) -> None:
    gw = await gateway_factory()
    gw.fake.add_user(10, "alice")
    await sign_in(gw, "alice")
    row = await db.fetchrow("SELECT last_login_at, last_sync_at FROM users")
    assert row["last_login_at"] is not None and row["last_sync_at"] is not None


async def test_userinfo_groups_source(gateway_factory: Any, db: asyncpg.Pool) -> None:
    gw = await gateway_factory(gitlab={"groups_source": "userinfo"}, provisioning={"allowed_groups": ["acme"]})
    seed_acme(gw)
    gw.fake.add_member("alice", "acme/platform")
    await add_local_groups(db, "acme/platform/sre")
    await sign_in(gw, "alice")
    assert await groups_of(db, "alice") == {"gateway-users": "default", "acme/platform/sre": "sync"}
    # No group ids in this mode: nothing is bound.
    assert await db.fetchval("SELECT gitlab_group_id FROM groups WHERE name = 'acme/platform/sre'") is None
    assert not any("/api/v4/" in p for _, p in gw.fake.requests)


# ---- concurrency -------------------------------------------------------------------------------------------------

async def test_twenty_concurrent_first_sign_ins_make_one_user(gateway_factory: Any, db: asyncpg.Pool) -> None:
    gw = await gateway_factory()
    seed_acme(gw)
    gw.fake.add_member("alice", "acme")
    await add_local_groups(db, "acme", "acme/platform", "acme/platform/sre")
    results = await asyncio.gather(*(sign_in(gw, "alice") for _ in range(20)))
    assert [s for s, _ in results] == [302] * 20
    assert await db.fetchval("SELECT count(*) FROM users") == 1
    assert await groups_of(db, "alice") == {
        "gateway-users": "default", "acme": "sync", "acme/platform": "sync", "acme/platform/sre": "sync"}
    assert await db.fetchval("SELECT count(*) FROM sessions WHERE revoked_at IS NULL") == 20
    assert sum(1 for a in await audit_actions(db) if a[0] == "user.created") == 1


async def test_many_users_at_once(gateway_factory: Any, db: asyncpg.Pool) -> None:
    gw = await gateway_factory()
    gw.fake.add_group(1, "acme")
    gw.fake.add_group(2, "platform", parent="acme")
    await add_local_groups(db, "acme", "acme/platform")
    for i in range(15):
        gw.fake.add_user(100 + i, f"user{i}")
        gw.fake.add_member(f"user{i}", "acme")
    results = await asyncio.gather(*(sign_in(gw, f"user{i}") for i in range(15) for _ in range(2)))
    assert all(s == 302 for s, _ in results)
    assert await db.fetchval("SELECT count(*) FROM users") == 15
    assert await db.fetchval("SELECT count(*) FROM memberships") == 15 * 3
    assert await db.fetchval("SELECT gitlab_group_id FROM groups WHERE name = 'acme'") == 1
