"""SPEC §6: the per-process identity cache, its refresh after check_interval, and instant invalidation of every
process through LISTEN/NOTIFY."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
import asyncpg
import pytest
from conftest import SESSION_KEY, session_cookie
from cryptography.fernet import Fernet
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import keys
from gateway.db import notify as db_notify
from gateway.services import accounts
from gateway.sessions.store import MAX_COOKIE_VALUE, cookie_value


async def userinfo(http: aiohttp.ClientSession, base: str, cookie: str) -> int:
    r = await http.get(f"{base}/oauth2/userinfo", headers={"Cookie": f"_gateway={cookie}"})
    return r.status


async def wait_for_status(http: aiohttp.ClientSession, bases: list[str], cookie: str, status: int,
                          limit: float) -> float:
    started = time.monotonic()
    while True:
        got = [await userinfo(http, b, cookie) for b in bases]
        elapsed = time.monotonic() - started
        if all(s == status for s in got):
            return elapsed
        assert elapsed < limit, f"still {got} after {elapsed:.2f}s"
        await asyncio.sleep(0.05)


async def signed_in_everywhere(gateway_factory: Any, n: int = 2, **sections: Any) -> tuple[list[Any], str]:
    gateways = [await gateway_factory(**sections) for _ in range(n)]
    gateways[0].fake.add_user(10, "alice")
    async with gateways[0].browser() as b:
        await b.sign_in("alice")
        cookie = b.cookie("_gateway")
    assert cookie
    async with aiohttp.ClientSession() as http:
        for gw in gateways:  # warm every process's cache
            assert await userinfo(http, gw.public_url, cookie) == 200
    return gateways, cookie


async def test_deactivation_reaches_every_process_within_a_second(gateway_factory: Any, db: asyncpg.Pool) -> None:
    gateways, cookie = await signed_in_everywhere(gateway_factory, 3, session={"check_interval": "1h"})
    await accounts.set_active(db, "alice", False, actor="test")
    async with aiohttp.ClientSession() as http:
        elapsed = await wait_for_status(http, [g.public_url for g in gateways], cookie, 401, limit=1.0)
    assert elapsed < 1.0
    assert await db.fetchval("SELECT count(*) FROM sessions WHERE revoked_at IS NULL") == 0


async def test_revoked_session_reaches_every_process(gateway_factory: Any, db: asyncpg.Pool) -> None:
    gateways, cookie = await signed_in_everywhere(gateway_factory, 2, session={"check_interval": "1h"})
    sid = gateways[0].public_app[keys.SESSIONS].decode(cookie).sid  # type: ignore[union-attr]
    await gateways[1].public_app[keys.SESSIONS].revoke(sid)
    async with aiohttp.ClientSession() as http:
        await wait_for_status(http, [g.public_url for g in gateways], cookie, 401, limit=1.0)


async def test_membership_change_reaches_every_process(gateway_factory: Any, db: asyncpg.Pool) -> None:
    gateways, cookie = await signed_in_everywhere(gateway_factory, 2, session={"check_interval": "1h"})
    async with db.acquire() as conn, conn.transaction():
        gid = await conn.fetchval("INSERT INTO groups (name) VALUES ('ops') RETURNING id")
        uid = await conn.fetchval("SELECT id FROM users")
        await conn.execute("INSERT INTO memberships (user_id, group_id, source) VALUES ($1, $2, 'manual')", uid, gid)
        await db_notify.notify(conn, "user", uid)
    async with aiohttp.ClientSession() as http:
        for gw in gateways:
            deadline = time.monotonic() + 1.0
            while True:
                r = await http.get(f"{gw.public_url}/oauth2/userinfo", headers={"Cookie": f"_gateway={cookie}"})
                if (await r.json())["groups"] == ["gateway-users", "ops"]:
                    break
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)


async def test_cache_holds_without_notify_until_check_interval(gateway_factory: Any, db: asyncpg.Pool) -> None:
    """A change made behind the gateway's back (no NOTIFY) shows after check_interval, not before: the cache
    really answers the proxy path, and really expires."""
    gateways, cookie = await signed_in_everywhere(gateway_factory, 1, session={"check_interval": "1s"})
    (gw,) = gateways
    await db.execute("UPDATE users SET active = false")
    async with aiohttp.ClientSession() as http:
        assert await userinfo(http, gw.public_url, cookie) == 200  # cached
        await asyncio.sleep(1.1)
        assert await userinfo(http, gw.public_url, cookie) == 401  # refreshed


async def test_listener_reconnects_and_forgets_cache(gateway_factory: Any, db: asyncpg.Pool) -> None:
    gateways, cookie = await signed_in_everywhere(gateway_factory, 1, session={"check_interval": "1h"})
    (gw,) = gateways
    store = gw.public_app[keys.SESSIONS]
    # Kill the LISTEN connection: while it is down NOTIFYs would be missed, so the cache must be dropped.
    await db.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                     "WHERE datname = current_database() AND query ILIKE 'LISTEN%'")
    deadline = time.monotonic() + 5
    while store.listening:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    await db.execute("UPDATE users SET active = false")
    async with aiohttp.ClientSession() as http:
        assert await userinfo(http, gw.public_url, cookie) == 401
    while not store.listening:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    await accounts.set_active(db, "alice", True, actor="test")


def test_cookie_value_parsing() -> None:
    assert cookie_value("a=1; _gateway=abc; _gateway_state_x=zzz", "_gateway") == "abc"
    assert cookie_value('_gateway="quoted=="', "_gateway") == "quoted=="
    assert cookie_value("_gateway_state_x=zzz", "_gateway") is None
    assert cookie_value("x_gateway=1", "_gateway") is None
    assert cookie_value(None, "_gateway") is None
    assert cookie_value("_gateway=", "_gateway") is None


async def test_an_invalidation_during_a_cache_miss_keeps_the_stale_answer_out_of_the_cache(
        gateway_factory: Any, db: asyncpg.Pool, dsn: str) -> None:
    """A NOTIFY that arrives while a look-up's query is in flight: the query may have read the world before the
    change, so its answer serves that one request but is not cached (else it would stand until check_interval)."""
    gateways, cookie = await signed_in_everywhere(gateway_factory, 1, session={"check_interval": "1h"})
    store = gateways[0].public_app[keys.SESSIONS]
    ref = store.decode(cookie)
    assert ref is not None
    store.invalidate_all()  # the next look-up is a cache miss
    holder = await asyncpg.connect(dsn)
    try:
        # Hold the session row: the look-up's UPDATE ... RETURNING waits on it with its snapshot already taken.
        tx = holder.transaction()
        await tx.start()
        await holder.execute("SELECT 1 FROM sessions WHERE id = $1 FOR UPDATE", ref.sid)
        lookup = asyncio.ensure_future(store.lookup(ref.sid))
        deadline = time.monotonic() + 5
        while not await db.fetchval("SELECT count(*) FROM pg_locks WHERE NOT granted AND pid <> pg_backend_pid()"):
            assert time.monotonic() < deadline, "the look-up never reached the database"
            await asyncio.sleep(0.02)
        # Meanwhile an administrator deactivates the user (the NOTIFY is what an admin change sends).
        generation = store.generation
        async with db.acquire() as conn, conn.transaction():
            await conn.execute("UPDATE users SET active = false WHERE id = $1", ref.uid)
            await db_notify.notify(conn, "user", ref.uid)
        while store.generation == generation:
            assert time.monotonic() < deadline, "the NOTIFY never arrived"
            await asyncio.sleep(0.02)
        await tx.commit()
        stale = await asyncio.wait_for(lookup, 5)
    finally:
        await holder.close()
    assert stale is not None and stale.login == "alice"  # read before the deactivation: fine for that request
    queries = store.queries
    assert await store.lookup(ref.sid) is None  # asked again, not served from the cache
    assert store.queries == queries + 1


async def test_memoized_cookies_and_cached_sessions_expire(gateway_factory: Any, db: asyncpg.Pool,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The two per-process memories honour time with a clock moved past the session's end: a memoized cookie
    decryption still checks session.lifetime, and a cached identity still checks the row's expires_at (each is
    masked end to end by the other check, so the store is asked directly)."""
    gateways, cookie = await signed_in_everywhere(gateway_factory, 1, session={"check_interval": "1h"})
    store = gateways[0].public_app[keys.SESSIONS]
    ref = store.decode(cookie)  # decrypted and memoized
    assert ref is not None
    assert await store.lookup(ref.sid) is not None  # cached
    # The session ends in the database; nothing tells the gateway (no NOTIFY: expiry is not an event).
    await db.execute("UPDATE sessions SET expires_at = now() - interval '1 second'")
    assert await store.lookup(ref.sid) is not None  # within check_interval and the cached expiry: a cache hit
    later = time.time() + store.lifetime + 60
    monkeypatch.setattr(time, "time", lambda: later)
    assert store.decode(cookie) is None
    queries = store.queries
    assert await store.lookup(ref.sid) is None
    assert store.queries == queries + 1
async def test_failed_decryptions_are_not_remembered(gateway_factory: Any) -> None:
    """SPEC §16: garbage cookies cost a decryption each but never stay in the process's memory."""
    gw = await gateway_factory()
    store = gw.public_app[keys.SESSIONS]
    async with aiohttp.ClientSession() as http:
        for i in range(200):
            assert await userinfo(http, gw.public_url, f"gAAAAA{i:04d}" + "x" * 3000) == 401
    assert len(store._decoded) == 0
    cookie = await session_cookie(gw)
    async with aiohttp.ClientSession() as http:
        assert await userinfo(http, gw.public_url, cookie) == 200
    assert len(store._decoded) == 1


async def test_a_cookie_over_4_kb_is_not_signed_in_even_when_it_decrypts(gateway_factory: Any,
                                                                          db: asyncpg.Pool) -> None:
    gw = await gateway_factory()
    await session_cookie(gw)
    sid, uid = await db.fetchval("SELECT id FROM sessions"), await db.fetchval("SELECT id FROM users")

    def sealed(pad: int) -> str:
        payload = {"created": int(time.time()), "session": {"sid": sid, "uid": uid, "pad": "x" * pad}}
        return Fernet(SESSION_KEY.encode()).encrypt(json.dumps(payload).encode()).decode()

    small, big = sealed(10), sealed(3200)
    assert len(small) < MAX_COOKIE_VALUE < len(big)
    async with aiohttp.ClientSession() as http:
        assert await userinfo(http, gw.public_url, small) == 200
        assert await userinfo(http, gw.public_url, big) == 401


_COOKIE_NAMES = st.sampled_from(["_gateway", "_gateway_state_x", "x_gateway", "_gatewayx", "a", "_GATEWAY",
                                 " _gateway", "_gateway "])
_COOKIE_VALUES = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters=';"'),
                         max_size=12)


@settings(max_examples=300, deadline=None)
@given(pairs=st.lists(st.tuples(_COOKIE_NAMES, _COOKIE_VALUES), max_size=6))
def test_cookie_value_is_the_first_cookie_of_exactly_that_name(pairs: list[tuple[str, str]]) -> None:
    """Property: cookie_value(header, "_gateway") is the value of the first cookie named exactly "_gateway"
    (spaces around names and values are insignificant, an empty value is no cookie), never the value of a
    cookie whose name merely contains it, and None when there is none."""
    header = "; ".join(f"{k}={v}" for k, v in pairs)
    named = [v.strip() for k, v in pairs if k.strip() == "_gateway"]
    assert cookie_value(header, "_gateway") == (named[0] or None if named else None)
