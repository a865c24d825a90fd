"""SPEC §5 ("never deadlock") and §11: a sign-in racing a background re-check of the same user.

Both lock the same person's rows: the per-GitLab-user advisory lock, the users row and the gitlab_grants row.
They used to take them in opposite orders (the re-check its grant row first, the sign-in the advisory lock
first), so a sign-in arriving while a re-check applied its result deadlocked; PostgreSQL aborted the sign-in
after deadlock_timeout and it was retried. The race is staged exactly: a lock this test holds on the audit table
stops the sign-in after its advisory lock; the re-check then comes to its own lock step; the test lets go.

Real PostgreSQL, the real GitLab stand-in, an in-process gateway; the re-check is the scheduler's own code
(`Resyncer.process` on a claimed grant), only its start is chosen by the test.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import asyncpg
import pytest
from conftest import SESSION_KEY, audit_actions
from cryptography.fernet import Fernet
from test_resync import seed, status, wait_until

from gateway.db import grants as db_grants
from gateway.sync.resync import RESYNC

# A re-check is due only when the test says so (the scheduler leaves alice alone meanwhile).
SLOW = {"resync_interval": "1h", "resync_grace": "1h"}


async def _lock_waiters(db: asyncpg.Pool) -> list[str]:
    """The statements of this database's sessions that wait for a lock right now."""
    rows = await db.fetch("SELECT query FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                          "AND datname = current_database()")
    return [r["query"] for r in rows]


async def _waiting(db: asyncpg.Pool, count: int) -> bool:
    return len(await _lock_waiters(db)) >= count


def _kept(sealed: str) -> str:
    return Fernet(SESSION_KEY.encode()).decrypt(sealed.encode()).decode()


async def test_a_sign_in_racing_a_recheck_of_the_same_user_never_deadlocks(
        gateway_factory: Any, db: asyncpg.Pool, dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    gw = await gateway_factory(provisioning=SLOW)
    seed(gw)
    resyncer = gw.public_app[RESYNC]
    async with gw.browser() as first, gw.browser() as second:
        await first.sign_in("alice")
        uid = await db.fetchval("SELECT id FROM users WHERE login = 'alice'")
        kept_at_first = _kept(await db.fetchval("SELECT refresh_token FROM gitlab_grants"))
        deadlock_timeout = await db.fetchval(
            "SELECT setting::float8 / 1000 FROM pg_settings WHERE name = 'deadlock_timeout'")

        locker = await asyncpg.connect(dsn)
        try:
            # 0. alice is claimed for a re-check, as the scheduler claims her.
            owner = "test-recheck"
            grant = await db_grants.claim_one(db, uid, owner, lease=60)
            assert grant is not None
            # 1. The sign-in takes the advisory lock (and the users row), then stops at its first audit row.
            await locker.execute("BEGIN")
            await locker.execute("LOCK TABLE audit_events IN SHARE ROW EXCLUSIVE MODE")
            sign_in = asyncio.create_task(second.sign_in("alice"))
            await wait_until(lambda: _waiting(db, 1), timeout=30, what="the sign-in never reached its audit row")
            # 2. The re-check: GitLab rotates the token, then the re-check comes to wait for a lock the sign-in
            # holds (before: in its rules transaction, holding the grant row, waiting for the advisory lock).
            recheck = asyncio.create_task(resyncer.process(grant, owner, require_session=True))
            await wait_until(lambda: _waiting(db, 2), timeout=30, what="the re-check never came to wait for a lock")
            # Past the re-check's own deadlock check (it found no cycle yet): the order now decides alone.
            await asyncio.sleep(2 * deadlock_timeout)
            # 3. The sign-in goes on to keep its grant.
            await locker.execute("ROLLBACK")
            response = await asyncio.wait_for(sign_in, 30)
            outcome = await asyncio.wait_for(recheck, 30)
        finally:
            await locker.close()

        # Both completed, neither was aborted by PostgreSQL's deadlock detector and retried.
        raced = [r for r in caplog.records if "Deadlock" in str(getattr(r, "error", ""))]
        assert raced == [], [r.getMessage() for r in raced]
        assert response.status == 302
        assert outcome.result == "lost", outcome  # the sign-in's newer grant and rules won; nothing to apply
        assert await status(first) == 200 and await status(second) == 200  # nobody signed out

    # No refresh token was presented twice (GitLab would have revoked the whole grant).
    assert max(gw.fake.refresh_calls.values()) == 1
    assert gw.fake.refresh_calls == {kept_at_first: 1}
    # The newest sign-in's grant is the one kept, alive at GitLab; the token the re-check's refresh rotated in
    # was replaced by it and is revoked at GitLab (nothing of it lingers).
    _first, rotated, newest = _pairs(gw, kept_at_first)
    row = await db.fetchrow("SELECT refresh_token, lease_owner, failures FROM gitlab_grants WHERE user_id = $1", uid)
    assert _kept(row["refresh_token"]) == newest.refresh_token and not newest.revoked
    assert row["lease_owner"] is None and row["failures"] == 0
    await wait_until(lambda: _revoked(gw, rotated.access_token), what="the re-check's rotated token lives on")
    # Nothing half-applied: two sign-ins, two live sessions, one grant, one user.
    signed_in = [a for a in await audit_actions(db) if a[0] == "sign_in"]
    assert len(signed_in) == 2
    assert await db.fetchval("SELECT count(*) FROM sessions WHERE revoked_at IS NULL") == 2
    assert await db.fetchval("SELECT count(*) FROM gitlab_grants") == 1
    assert await db.fetchval("SELECT count(*) FROM users") == 1


def _pairs(gw: Any, first_refresh: str) -> tuple[Any, Any, Any]:
    """The first sign-in's token pair, the pair the re-check's refresh rotated it into (same GitLab grant), and
    the second sign-in's pair (a grant of its own)."""
    tokens = gw.fake.issued_tokens()
    first = next(t for t in tokens if t.refresh_token == first_refresh)
    grant_of = {t.access_token: t.grant_id for t in gw.fake._tokens.values()}
    same = [t for t in tokens if grant_of[t.access_token] == grant_of[first.access_token] and t != first]
    other = [t for t in tokens if grant_of[t.access_token] != grant_of[first.access_token]]
    assert len(same) == 1 and len(other) == 1, (same, other)
    return first, same[0], other[0]


async def _revoked(gw: Any, access_token: str) -> bool:
    return any(t.revoked for t in gw.fake.issued_tokens() if t.access_token == access_token)
