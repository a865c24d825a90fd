"""SPEC §11: GitLab stays the source of truth while sessions live (re-checks, grants, grace, renames, admin sync).

Real PostgreSQL, the real GitLab stand-in and in-process gateways; re-check intervals of about a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
from conftest import SESSION_KEY, Browser, Gateway, audit_actions, echoed_headers
from cryptography.fernet import Fernet

FAST = {"resync_interval": "1s", "resync_grace": "1s"}


async def wait_until(check: Callable[[], Awaitable[bool]], timeout: float = 10.0, what: str = "") -> float:
    """Poll `check` until it is true; the seconds it took (fails after `timeout`)."""
    started = time.monotonic()
    while not await check():
        assert time.monotonic() - started < timeout, f"not within {timeout}s: {what}"
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def status(b: Browser, path: str = "/oauth2/userinfo", accept: str = "application/json") -> int:
    async with b.http.get(b.gw.public_url + path, headers={"Accept": accept}, allow_redirects=False) as r:
        return r.status


async def groups_header(b: Browser) -> str:
    async with b.http.get(b.gw.public_url + "/tool", allow_redirects=False) as r:
        assert r.status == 200, await r.text()
        return echoed_headers(await r.json()).get("x-forwarded-groups", [""])[0]


def seed(gw: Gateway) -> None:
    gw.fake.add_group(1, "acme")
    gw.fake.add_group(2, "platform", parent="acme")
    gw.fake.add_group(3, "other")
    gw.fake.add_user(10, "alice")
    gw.fake.add_member("alice", "acme")


async def local_groups(db: asyncpg.Pool, *names: str) -> None:
    for n in names:
        await db.execute("INSERT INTO groups (name) VALUES ($1)", n)


async def started(gateway_factory: Any, db: asyncpg.Pool, *local: str, **provisioning: Any) -> Gateway:
    """A gateway re-checking every second (unless overridden), the seeded GitLab, and these local groups."""
    gw: Gateway = await gateway_factory(provisioning={**FAST, **provisioning})
    seed(gw)
    await local_groups(db, *local)
    return gw


# ---- what is kept ---------------------------------------------------------------------------------------

async def test_the_refresh_token_is_kept_encrypted_and_an_older_grant_is_revoked(gateway_factory: Any,
                                                                                   db: asyncpg.Pool) -> None:
    gw = await gateway_factory(provisioning={"resync_interval": "15m"})
    seed(gw)
    async with gw.browser() as b:
        await b.sign_in("alice")
    first = gw.fake.issued_tokens()[-1]
    sealed = await db.fetchval("SELECT refresh_token FROM gitlab_grants")
    assert first.refresh_token not in sealed  # encrypted at rest
    assert Fernet(SESSION_KEY.encode()).decrypt(sealed.encode()).decode() == first.refresh_token
    assert not first.revoked  # kept alive for re-checks
    async with gw.browser() as b:
        await b.sign_in("alice")
    tokens = {t.access_token: t for t in gw.fake.issued_tokens()}
    assert tokens[first.access_token].revoked  # the newer sign-in's grant replaces the older one at GitLab
    second = gw.fake.issued_tokens()[-1]
    assert not second.revoked
    assert await db.fetchval("SELECT count(*) FROM gitlab_grants") == 1


async def test_resync_off_keeps_nothing_and_revokes_the_token(gateway_factory: Any, db: asyncpg.Pool) -> None:
    gw = await gateway_factory(provisioning={"resync_interval": "0"})
    seed(gw)
    async with gw.browser() as b:
        await b.sign_in("alice")
    assert gw.fake.issued_tokens()[-1].revoked
    assert await db.fetchval("SELECT count(*) FROM gitlab_grants") == 0


# ---- outcomes of a re-check ---------------------------------------------------------------------------------

async def test_a_user_blocked_in_gitlab_loses_access_within_the_interval(gateway_factory: Any,
                                                                        db: asyncpg.Pool) -> None:
    gw = await started(gateway_factory, db)
    async with gw.browser() as b:
        await b.sign_in("alice")
        assert await status(b) == 200
        gw.fake.set_user_state("alice", "blocked")
        await wait_until(lambda: _is(status(b), 401), what="a blocked user still gets in")
    assert await db.fetchval("SELECT active FROM users WHERE login = 'alice'") is True  # not deactivated
    revoked = [a for a in await audit_actions(db) if a[0] == "session.revoked"]
    assert revoked and revoked[0][1] == "alice" and revoked[0][2]["reason"] == "blocked"


async def _is(awaitable: Awaitable[int], expected: int) -> bool:
    return await awaitable == expected


async def test_leaving_the_allowed_groups_revokes_every_session(gateway_factory: Any, db: asyncpg.Pool) -> None:
    gw = await started(gateway_factory, db, allowed_groups=["acme"])
    async with gw.browser() as one, gw.browser() as two:
        await one.sign_in("alice")
        await two.sign_in("alice")
        gw.fake.remove_member("alice", "acme")
        await wait_until(lambda: _is(status(one), 401))
        assert await status(two) == 401
    revoked = [a for a in await audit_actions(db) if a[0] == "session.revoked"]
    assert revoked[0][2]["reason"] == "not_allowed" and revoked[0][2]["sessions_revoked"] == 2


async def test_a_group_added_in_gitlab_reaches_the_upstream_without_a_new_sign_in(gateway_factory: Any,
                                                                                  db: asyncpg.Pool) -> None:
    gw = await started(gateway_factory, db, "acme", "other")
    async with alice_sees(gw, "acme,gateway-users") as b:
        assert gw.fake.user_groups("alice") == ["acme", "acme/platform"]  # platform has no local group
        gw.fake.add_member("alice", "other")
        await header_becomes(b, "acme,gateway-users,other")
        gw.fake.remove_member("alice", "acme")
        await header_becomes(b, "gateway-users,other")
    resyncs = [a for a in await audit_actions(db) if a[0] == "sync.resync" and (a[2]["added"] or a[2]["removed"])]
    assert resyncs[0][2]["added"] == ["other"] and resyncs[1][2]["removed"] == ["acme"]


async def _eq(awaitable: Awaitable[str], expected: str) -> bool:
    return await awaitable == expected


@contextlib.asynccontextmanager
async def alice_sees(gw: Gateway, header: str) -> AsyncIterator[Browser]:
    """A browser signed in as alice, whose requests reach the upstream with this groups header."""
    async with gw.browser() as b:
        await b.sign_in("alice")
        assert await groups_header(b) == header
        yield b


async def header_becomes(b: Browser, expected: str, timeout: float = 10.0) -> float:
    """Wait until the upstream receives `expected` as the groups header; the seconds it took."""
    return await wait_until(lambda: _eq(groups_header(b), expected), timeout=timeout, what=f"groups {expected}")


async def test_a_recheck_that_changes_nothing_writes_only_the_sync_fields(gateway_factory: Any,
                                                                         db: asyncpg.Pool) -> None:
    """Every user with a session is re-checked every resync_interval: one that finds nothing changed moves the
    sync fields (last_sync_at, the schedule, the rotated token) and writes no audit row."""
    gw = await started(gateway_factory, db, "acme")
    async with gw.browser() as b:
        await b.sign_in("alice")
    audit = await db.fetchval("SELECT count(*) FROM audit_events")
    synced = await db.fetchval("SELECT last_sync_at FROM users WHERE login = 'alice'")
    calls = sum(gw.fake.refresh_calls.values())
    await wait_until(lambda: _refreshed(gw, calls + 2), what="two re-checks")
    await wait_until(lambda: _synced_after(db, synced), what="last_sync_at did not move")
    assert await db.fetchval("SELECT count(*) FROM audit_events") == audit
    assert await db.fetchval("SELECT failures FROM gitlab_grants") == 0


async def _refreshed(gw: Gateway, calls: int) -> bool:
    return sum(gw.fake.refresh_calls.values()) >= calls


async def _synced_after(db: asyncpg.Pool, before: Any) -> bool:
    return bool(await db.fetchval("SELECT last_sync_at > $1 FROM users WHERE login = 'alice'", before))


async def test_a_grant_revoked_at_gitlab_ends_in_no_grant_not_a_loop(gateway_factory: Any,
                                                                    db: asyncpg.Pool) -> None:
    gw = await started(gateway_factory, db)
    async with gw.browser() as b:
        await b.sign_in("alice")
        gw.fake.revoke_authorizations("alice")
        await wait_until(lambda: _is(status(b), 401))
    row = await db.fetchrow("SELECT refresh_token, next_sync_at FROM gitlab_grants")
    assert row["refresh_token"] is None and row["next_sync_at"] is None
    calls = sum(gw.fake.refresh_calls.values())
    await asyncio.sleep(2.5)  # two more intervals: nothing is tried again
    assert sum(gw.fake.refresh_calls.values()) == calls
    async with gw.admin() as api, api.get("/api/v1/users/alice") as r:
        assert (await r.json())["sync_state"] == "no_grant"


async def test_gitlab_down_past_the_grace_gives_503_and_recovers_by_itself(gateway_factory: Any,
                                                                          db: asyncpg.Pool) -> None:
    gw = await started(gateway_factory, db)
    async with gw.browser() as b:
        await b.sign_in("alice")
        gw.fake.fail("token", 503, times=None)
        await wait_until(lambda: _is(status(b, "/tool", "text/html"), 503), what="no 503 past the grace")
        async with b.http.get(gw.public_url + "/tool", headers={"Accept": "text/html"}) as r:
            assert "cannot confirm your access with gitlab" in (await r.text()).lower()
        async with gw.admin() as api, api.get("/api/v1/users/alice") as r:
            shown = await r.json()
            assert shown["sync_state"] == "retrying" and shown["last_sync_error"]
        gw.fake.clear_failures()
        await wait_until(lambda: _is(status(b, "/tool", "text/html"), 200), what="no recovery")
    assert await db.fetchval("SELECT count(*) FROM sessions WHERE revoked_at IS NOT NULL") == 0


async def test_gitlab_429_honours_retry_after(gateway_factory: Any, db: asyncpg.Pool) -> None:
    gw = await gateway_factory(provisioning={"resync_interval": "1s", "resync_grace": "1h"})
    seed(gw)
    async with gw.browser() as b:
        await b.sign_in("alice")
        gw.fake.fail("token", 429, times=1, retry_after=3)
        await wait_until(lambda: _has_failure(db))
        failed_at = time.monotonic()
        await wait_until(lambda: _recovered(db), timeout=10)
        assert time.monotonic() - failed_at >= 2.5  # waited as GitLab asked, not the 1 s interval
        assert await status(b) == 200


async def _has_failure(db: asyncpg.Pool) -> bool:
    return bool(await db.fetchval("SELECT failures > 0 FROM gitlab_grants"))


async def _recovered(db: asyncpg.Pool) -> bool:
    return bool(await db.fetchval("SELECT failures = 0 AND confirmed_at > now() - interval '1 second' "
                                  "FROM gitlab_grants"))


async def test_two_gateways_never_refresh_the_same_token_twice(gateway_factory: Any, db: asyncpg.Pool) -> None:
    first = await gateway_factory(provisioning={"resync_interval": "1s"})
    await gateway_factory(provisioning={"resync_interval": "1s"})
    await gateway_factory(provisioning={"resync_interval": "1s"})
    seed(first)
    for i in range(5):
        first.fake.add_user(20 + i, f"user{i}")
        first.fake.add_member(f"user{i}", "acme")
    async with first.browser() as b:
        await b.sign_in("alice")
    for i in range(5):
        async with first.browser() as b:
            await b.sign_in(f"user{i}")
    await asyncio.sleep(4)
    calls = first.fake.refresh_calls
    assert len(calls) >= 12  # several rounds of six users happened
    assert max(calls.values()) == 1, "a refresh token was presented twice"
    assert await db.fetchval("SELECT count(*) FROM gitlab_grants WHERE refresh_token IS NULL") == 0


async def test_a_slow_recheck_does_not_hold_up_the_others(gateway_factory: Any, db: asyncpg.Pool) -> None:
    """One re-check stuck (here on a row lock this test holds, as behind a slow GitLab or database) takes one
    of the scheduler's slots, not the scheduler: a user blocked in GitLab meanwhile still loses access within
    resync_interval plus the second a revocation takes (SPEC §11)."""
    interval, propagation = 2.0, 1.0
    gw = await started(gateway_factory, db, resync_interval=f"{interval:g}s", resync_grace="1h")
    gw.fake.add_user(11, "bob")
    async with gw.browser() as alice, gw.browser() as bob:
        await alice.sign_in("alice")
        await bob.sign_in("bob")
        async with db.acquire() as conn, conn.transaction():
            await conn.execute("SELECT 1 FROM users WHERE login = 'bob' FOR UPDATE")
            await a_recheck_waits_for_a_lock(db, 3 * interval)  # bob's re-check read GitLab and now waits
            gw.fake.set_user_state("alice", "blocked")
            blocked = time.monotonic()
            while await status(alice) != 401:
                assert time.monotonic() - blocked < interval + propagation, "a blocked user still gets in"
                await asyncio.sleep(0.05)
        assert await status(bob) == 200
    assert await db.fetchval("SELECT failures FROM gitlab_grants g JOIN users u ON u.id = g.user_id "
                             "WHERE login = 'bob'") == 0


async def a_recheck_waits_for_a_lock(db: asyncpg.Pool, within: float) -> None:
    """Until some transaction of the gateway waits for a lock (one this test holds)."""
    await wait_until(lambda: _waiting(db), timeout=within, what="no re-check came to wait for the lock")


async def _waiting(db: asyncpg.Pool) -> bool:
    return bool(await db.fetchval("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                  "AND datname = current_database()"))


# ---- renames ---------------------------------------------------------------------------------------------

async def test_a_renamed_gitlab_group_keeps_its_members_and_the_local_group_follows(gateway_factory: Any,
                                                                                   db: asyncpg.Pool) -> None:
    gw = await started(gateway_factory, db, "acme", "acme/platform")
    async with alice_sees(gw, "acme,acme/platform,gateway-users") as b:
        gw.fake.rename_group("acme", "acme-corp")
        await header_becomes(b, "acme-corp,acme-corp/platform,gateway-users")
    renamed = {a[2]["old"]: a[2]["new"] for a in await audit_actions(db) if a[0] == "group.renamed"}
    assert renamed == {"acme": "acme-corp", "acme/platform": "acme-corp/platform"}
    removed = [a for a in await audit_actions(db) if a[0] == "sync.resync" and a[2]["removed"]]
    assert removed == []  # memberships never dropped


async def test_case_mismatch_is_audited_once_per_pair(gateway_factory: Any, db: asyncpg.Pool) -> None:
    gw = await gateway_factory(provisioning={"resync_interval": "0"})
    seed(gw)
    await local_groups(db, "ACME")
    for _ in range(2):
        async with gw.browser() as b:
            await b.sign_in("alice")
    events = [a for a in await audit_actions(db) if a[0] == "group.case_mismatch"]
    assert len(events) == 1 and events[0][1] == "ACME" and events[0][2]["gitlab_path"] == "acme"


# ---- admin ----------------------------------------------------------------------------------------------

async def test_admin_sync_rechecks_now(gateway_factory: Any, db: asyncpg.Pool) -> None:
    gw = await gateway_factory(provisioning={"resync_interval": "1h"})
    seed(gw)
    await local_groups(db, "other")
    async with gw.browser() as b:
        await b.sign_in("alice")
    gw.fake.add_member("alice", "other")
    async with gw.admin() as api:
        async with api.post("/api/v1/users/alice/sync") as r:
            assert r.status == 200, await r.text()
            body = await r.json()
        assert {"name": "other", "source": "sync"} in body["groups"]
        assert body["sync_state"] == "ok" and body["next_sync_at"]
        # Audited under the admin token's name, not as the background re-check.
        assert await db.fetchval("SELECT actor FROM audit_events WHERE action = 'sync.resync' ORDER BY id DESC "
                                 "LIMIT 1") == "tester"
        gw.fake.fail("token", 500)
        async with api.post("/api/v1/users/alice/sync") as r:
            assert r.status == 502
        async with api.post("/api/v1/users/nobody/sync") as r:
            assert r.status == 404
    gw.fake.add_user(11, "bob")
    await db.execute("INSERT INTO users (login, provisioned_by) VALUES ('bob', 'admin')")
    async with gw.admin() as api, api.post("/api/v1/users/bob/sync") as r:
        assert r.status == 409


async def test_metrics(gateway_factory: Any, db: asyncpg.Pool) -> None:
    gw = await started(gateway_factory, db)
    async with gw.browser() as b:
        await b.sign_in("alice")

    async def counted() -> bool:
        async with gw.admin() as api, api.get("/metrics") as r:
            text = await r.text()
        return 'gateway_resync_total{result="unchanged"}' in text and "gateway_resync_lag_seconds " in text

    await wait_until(counted)


async def test_cli_users_sync(gateway_factory: Any, db: asyncpg.Pool, write_config: Any) -> None:
    from test_admin_cli import Cli

    gw = await started(gateway_factory, db, "other", resync_interval="1h")
    async with gw.browser() as b:
        await b.sign_in("alice")
    gw.fake.add_member("alice", "other")
    cli = Cli(write_config(gitlab={"url": gw.fake_url}))
    out, _ = await cli("users", "sync", "alice")
    assert out.startswith("re-checked alice with GitLab: changed")
    shown = await cli.json("users", "show", "alice")
    assert {"name": "other", "source": "sync"} in shown["groups"] and shown["sync_state"] == "ok"
    gw.fake.fail("token", 502)
    _, err = await cli("users", "sync", "alice", expect=1)
    assert "GitLab" in err
    await db.execute("INSERT INTO users (login, provisioned_by) VALUES ('bob', 'admin')")
    _, err = await cli("users", "sync", "bob", expect=2)
    assert "No GitLab grant" in err


async def test_a_failed_group_listing_changes_nothing(gateway_factory: Any, db: asyncpg.Pool) -> None:
    """SPEC §5 rule 1 at a re-check: the token refresh succeeds but the groups cannot be listed: the rotated
    token is kept (the next re-check works), memberships and sessions stay, the user is `retrying`."""
    gw = await started(gateway_factory, db, "acme", resync_grace="1h")
    async with gw.browser() as b:
        await b.sign_in("alice")
        gw.fake.remove_member("alice", "acme")
        gw.fake.fail("groups", 500, times=None)
        await wait_until(lambda: _has_failure(db))
        assert await groups_header(b) == "acme,gateway-users"
        gw.fake.clear_failures()
        await header_becomes(b, "gateway-users")
    assert max(gw.fake.refresh_calls.values()) == 1
