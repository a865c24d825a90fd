"""SPEC §11, "the database down during a re-check: nothing half-applied, retried later": PostgreSQL stops at
each point of a re-check (as it begins, after GitLab rotated the refresh token but before it was saved, inside
the rules transaction). Nothing is half-applied, no session is revoked because of the blip, no refresh token is
presented twice, and once the database is back the user is re-checked with success by themselves.

Each test stages the outage on a PostgreSQL of its own (tests/own_postgres.py), never on the shared one."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
from conftest import Gateway, audit_actions
from own_postgres import OwnPostgres
from test_outage import own_pg  # noqa: F401 (the fixture)
from test_resync import a_recheck_waits_for_a_lock, groups_header, seed, status, wait_until

PROVISIONING = {"resync_interval": "1s", "resync_grace": "1h"}


async def started(gateway_factory: Any, pg: OwnPostgres, *local_groups: str) -> Gateway:
    gw: Gateway = await gateway_factory(database=pg.dsn, provisioning=PROVISIONING)
    seed(gw)
    conn = await asyncpg.connect(pg.dsn)
    try:
        for name in local_groups:
            await conn.execute("INSERT INTO groups (name) VALUES ($1)", name)
    finally:
        await conn.close()
    return gw


async def token_requests(gw: Gateway) -> int:
    return sum(1 for method, path in gw.fake.requests if method == "POST" and path.endswith("/oauth/token"))


@contextlib.asynccontextmanager
async def back_and_confirmed(pg: OwnPostgres, *, expire_leases: bool) -> AsyncIterator[asyncpg.Pool]:
    """Start PostgreSQL again; with expire_leases, end every lease as if the outage had outlasted it (a
    lease is 4 x gitlab.timeout + 30 s); then wait until the user is re-checked with success."""
    await asyncio.to_thread(pg.restart)
    restarted = time.time()
    db = await asyncpg.create_pool(pg.dsn, min_size=1, max_size=2)
    assert db is not None
    if expire_leases:
        await db.execute("UPDATE gitlab_grants SET lease_until = now() - interval '1 second' "
                         "WHERE lease_until IS NOT NULL")

    async def confirmed() -> bool:
        row = await db.fetchrow("SELECT refresh_token IS NOT NULL AS kept, failures, "
                                "EXTRACT(EPOCH FROM confirmed_at)::float8 AS at FROM gitlab_grants")
        assert row["kept"], f"the grant was dropped: {await db.fetchval('SELECT last_error FROM gitlab_grants')}"
        return bool(row["failures"] == 0 and row["at"] > restarted)

    try:
        await wait_until(confirmed, timeout=15, what="no successful re-check after the database came back")
        yield db
    finally:
        await db.close()


async def stop_while_a_recheck_waits(pg: OwnPostgres, lock: str) -> None:
    """Take a lock (`lock`, in a transaction), wait until a re-check of the gateway waits for it, then stop
    PostgreSQL: the re-check's statement fails at exactly that point."""
    locker = await asyncpg.connect(pg.dsn)
    watcher = await asyncpg.create_pool(pg.dsn, min_size=1, max_size=1)
    assert watcher is not None
    try:
        await locker.execute("BEGIN")
        await locker.execute(lock)
        await a_recheck_waits_for_a_lock(watcher, 10)
    finally:
        await watcher.close()
    await asyncio.to_thread(pg.stop)
    locker.terminate()


async def assert_nobody_signed_out(gw: Gateway, db: asyncpg.Pool, b: Any) -> None:
    assert await db.fetchval("SELECT count(*) FROM sessions WHERE revoked_at IS NOT NULL") == 0
    assert [a for a in await audit_actions(db) if a[0] == "session.revoked"] == []
    assert await status(b) == 200
    assert max(gw.fake.refresh_calls.values()) == 1, "a refresh token was presented twice"


async def test_database_down_as_a_recheck_begins(own_pg, gateway_factory) -> None:  # noqa: F811
    """The re-check's first statement (its claim, reading the user's sessions) is cut by the outage: GitLab is
    not asked, and the user is re-checked as soon as the database answers (not when a lease runs out)."""
    gw = await started(gateway_factory, own_pg)
    async with gw.browser() as b:
        await b.sign_in("alice")
        refreshes = sum(gw.fake.refresh_calls.values())
        await stop_while_a_recheck_waits(own_pg, "LOCK TABLE sessions IN ACCESS EXCLUSIVE MODE")
        assert sum(gw.fake.refresh_calls.values()) == refreshes  # GitLab was not asked
        await asyncio.sleep(1)
        async with back_and_confirmed(own_pg, expire_leases=False) as db:
            await assert_nobody_signed_out(gw, db, b)


async def test_database_down_after_gitlab_rotated_the_token(own_pg, gateway_factory) -> None:  # noqa: F811
    """GitLab answers the refresh (rotating the token: the old one is dead) after PostgreSQL stopped: the new
    token cannot be saved yet. It is kept in memory and saved once the database is back; the next re-check
    uses it. Before, it was lost and the next attempt's invalid_grant signed the user out."""
    gw = await started(gateway_factory, own_pg)
    async with gw.browser() as b:
        await b.sign_in("alice")
        before = await token_requests(gw)
        gw.fake.fail("token", 0, delay=2.0, times=1)  # the next refresh is answered 2 s late (gitlab.timeout: 3 s)
        await wait_until(lambda: _more(token_requests(gw), before), what="no refresh was attempted")
        refreshes = sum(gw.fake.refresh_calls.values())
        await asyncio.to_thread(own_pg.stop)
        assert sum(gw.fake.refresh_calls.values()) == refreshes, "staging: GitLab answered before the outage"
        await wait_until(lambda: _more(_refreshes(gw), refreshes), what="GitLab never answered the refresh")
        await asyncio.sleep(1)  # the re-check finds the database gone
        async with back_and_confirmed(own_pg, expire_leases=True) as db:
            await assert_nobody_signed_out(gw, db, b)


async def test_database_down_inside_the_rules_transaction(own_pg, gateway_factory) -> None:  # noqa: F811
    """The refresh and the GitLab reads succeeded; PostgreSQL stops while the rules transaction runs (it waits
    for a row lock this test holds). Nothing of it is applied; once the database is back the re-check runs
    again with the saved token and applies the change exactly once."""
    gw = await started(gateway_factory, own_pg, "other")
    async with gw.browser() as b:
        await b.sign_in("alice")
        gw.fake.add_member("alice", "other")  # the change the interrupted re-check was applying
        await stop_while_a_recheck_waits(own_pg, "SELECT 1 FROM users WHERE login = 'alice' FOR UPDATE")
        await asyncio.sleep(1)
        async with back_and_confirmed(own_pg, expire_leases=True) as db:
            await assert_nobody_signed_out(gw, db, b)
            applied = [a for a in await audit_actions(db) if a[0] == "sync.resync" and a[2]["added"]]
            assert [a[2]["added"] for a in applied] == [["other"]]
            assert await db.fetchval("SELECT count(*) FROM memberships m JOIN groups g ON g.id = m.group_id "
                                     "WHERE g.name = 'other'") == 1
            assert "other" in (await groups_header(b)).split(",")


async def _more(count: Any, than: int) -> bool:
    return bool(await count > than)


async def _refreshes(gw: Gateway) -> int:
    return sum(gw.fake.refresh_calls.values())
