"""gateway/db/server.py's pool: a released connection goes back without a round trip, unless it holds
session state (automatic provisioning's session-level run lock), which the release then clears."""

from __future__ import annotations

import asyncpg

from gateway.db.server import close_pool, create_pool, hold_session_state

ADVISORY_LOCKS = ("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
                  "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())")


async def test_a_released_connection_costs_no_statement(dsn: str) -> None:
    pool = await create_pool(dsn, size=1)
    try:
        async with pool.acquire() as conn:
            await conn.fetchval("SELECT 1")
            raw = conn._con
            before = raw._protocol.queries_count
        assert raw._protocol.queries_count == before  # asyncpg's reset would be one more query
        async with pool.acquire() as conn:  # the same connection, usable
            assert conn._con is raw and await conn.fetchval("SELECT 2") == 2
    finally:
        await close_pool(pool)


async def test_an_open_transaction_is_still_rolled_back_at_release(dsn: str) -> None:
    pool = await create_pool(dsn, size=1)
    try:
        async with pool.acquire() as conn:
            await conn.execute("BEGIN; CREATE TABLE left_open (x int)")
        async with pool.acquire() as conn:
            assert await conn.fetchval("SELECT to_regclass('left_open')") is None
            assert await conn.fetchval("SELECT pg_current_xact_id_if_assigned()") is None
    finally:
        await close_pool(pool)


async def test_session_state_is_cleared_when_the_connection_said_it_holds_some(dsn: str) -> None:
    pool = await create_pool(dsn, size=1)
    other = await asyncpg.connect(dsn)
    try:
        async with pool.acquire() as conn:
            hold_session_state(conn)
            assert await conn.fetchval("SELECT pg_try_advisory_lock(4242)")
            await conn.execute("SET application_name = 'left-behind'")
            assert await other.fetchval(ADVISORY_LOCKS) == 1
        # released without unlocking (a cancelled run): the release reset it
        assert await other.fetchval(ADVISORY_LOCKS) == 0
        async with pool.acquire() as conn:
            assert await conn.fetchval("SHOW application_name") != "left-behind"
            raw = conn._con
            before = raw._protocol.queries_count
        assert raw._protocol.queries_count == before  # the mark lasts one release
    finally:
        await other.close()
        await close_pool(pool)
