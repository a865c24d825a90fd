"""PostgreSQL outages (SPEC §2, §6, §16 review): a hung server fails requests fast and /readyz answers in
time; a stopped server does not sign anybody out at once (cached sessions serve for `check_interval`), sign-out
still clears the cookie; after a restart, caches start afresh and a deactivation is enforced within a second.
Each test stages the outage on a PostgreSQL of its own (tests/own_postgres.py), never on the shared one."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
from conftest import session_cookie
from own_postgres import OwnPostgres

from gateway import keys

# What a page must never show: internal exception and library names (TimeoutError, asyncpg, a traceback).
INTERNALS = re.compile(r"\b\w+(Error|Exception)\b|asyncpg|Traceback")


@pytest.fixture
async def own_pg() -> AsyncIterator[OwnPostgres]:
    pg = await OwnPostgres.start()
    try:
        yield pg
    finally:
        await asyncio.to_thread(pg.close)


async def get(url: str, cookie: str | None = None, **headers: str) -> tuple[int, str, float]:
    """(status, body, seconds) of a GET, cookie-jar free so the test says exactly what is sent."""
    if cookie:
        headers["Cookie"] = f"_gateway={cookie}"
    started = time.monotonic()
    async with aiohttp.ClientSession() as http:
        r = await http.get(url, headers=headers, allow_redirects=False)
        body = await r.text()
    return r.status, body, time.monotonic() - started


async def until(condition, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


def assert_no_internals(body: str) -> None:
    found = INTERNALS.search(body)
    assert found is None, f"the page shows {found.group(0)!r}"


async def test_a_hung_database_fails_requests_fast_and_readyz_answers_in_time(own_pg, gateway_factory):
    gw = await gateway_factory(database=own_pg.dsn, session={"check_interval": "1s"})
    cookie = await session_cookie(gw)
    assert (await get(f"{gw.public_url}/hello", cookie))[0] == 200
    await asyncio.sleep(1.1)  # the cached identity is now due for a re-check
    own_pg.freeze()
    try:
        # More requests at once than the pool has connections (10): none may wait without limit.
        results = await asyncio.wait_for(
            asyncio.gather(*(get(f"{gw.public_url}/hello", cookie, Accept="text/html") for _ in range(15))), 30)
        for status, body, seconds in results:
            assert status == 503, body
            assert "database" in body.lower()
            assert_no_internals(body)
            assert seconds < 8, f"a request waited {seconds:.1f}s for a hung database"
        for _ in range(2):  # the first check may find a pooled connection, the second needs a new one
            status, body, seconds = await get(f"{gw.admin_url}/readyz")
            assert status == 503 and "database not answering" in body
            assert seconds < 2, f"/readyz took {seconds:.1f}s"
    finally:
        own_pg.thaw()
    status, _, _ = await get(f"{gw.public_url}/hello", cookie)
    assert status == 200, "the gateway recovers once the database answers again"


async def test_a_stopped_database_keeps_cached_sessions_for_check_interval(own_pg, gateway_factory, caplog):
    gw = await gateway_factory(database=own_pg.dsn, session={"check_interval": "2s"})
    store = gw.public_app[keys.SESSIONS]
    alice = await session_cookie(gw, "alice", 10)
    bob = await session_cookie(gw, "bob", 11)
    assert (await get(f"{gw.public_url}/hello", alice))[0] == 200
    await asyncio.to_thread(own_pg.stop)
    await until(lambda: not store.listening)
    lost = time.monotonic()
    caplog.clear()

    status, body, _ = await get(f"{gw.public_url}/hello", alice)
    assert status == 200, f"a signed-in user got {status} as soon as PostgreSQL stopped: {body[:200]}"
    # Sign-out cannot revoke the row now, but the browser's cookie is cleared all the same.
    async with aiohttp.ClientSession() as http:
        r = await http.get(f"{gw.public_url}/oauth2/sign_out", headers={"Cookie": f"_gateway={bob}",
                                                                         "Sec-Fetch-Site": "same-origin"},
                           allow_redirects=False)
        assert r.status == 302, await r.text()
        cleared = r.cookies.get("_gateway")
        assert cleared is not None and cleared.value == "" and cleared["max-age"] == "0"
    # A new sign-in cannot be recorded: one clear line says why, with no traceback.
    gw.fake.add_user(12, "carol", name="Carol", email="carol@example.com")
    async with gw.browser() as b:
        r = await b.sign_in("carol", expect_status=503)
        assert_no_internals(await r.text())

    await until(lambda: time.monotonic() - lost > 2.2)  # check_interval since the loss
    status, body, _ = await get(f"{gw.public_url}/hello", alice, Accept="text/html")
    assert status == 503, "cached sessions are served beyond check_interval"
    assert_no_internals(body)

    ours = [r for r in caplog.records if r.name.startswith("gateway")]
    assert not [r for r in ours if r.exc_info], "an outage logs tracebacks"
    failed = [r for r in ours if r.getMessage() == "request failed" and r.path == "/oauth2/callback"]
    assert len(failed) == 1 and failed[0].status == 503 and failed[0].cause, failed
    assert not [r for r in ours if r.getMessage() == "sign-in failed"], "the failed sign-in is logged twice"

    await asyncio.to_thread(own_pg.restart)
    await until(lambda: store.listening)
    assert (await get(f"{gw.public_url}/hello", alice))[0] == 200


async def test_after_a_restart_a_deactivation_is_enforced_within_a_second(own_pg, gateway_factory):
    gw = await gateway_factory(database=own_pg.dsn)
    store = gw.public_app[keys.SESSIONS]
    alice = await session_cookie(gw)
    await asyncio.to_thread(own_pg.stop)
    await until(lambda: not store.listening)
    await asyncio.sleep(4)  # long enough for a doubling reconnect back-off to reach seconds
    await asyncio.to_thread(own_pg.restart)
    assert (await get(f"{gw.public_url}/hello", alice))[0] == 200  # cached, or re-read from the database
    async with gw.admin() as admin:
        r = await admin.patch("/api/v1/users/alice", json={"active": False})
        assert r.status == 200, await r.text()
    deactivated = time.monotonic()
    while (await get(f"{gw.public_url}/hello", alice, Accept="application/json"))[0] == 200:
        assert time.monotonic() - deactivated < 1.0, "a deactivation after a restart took over a second"
        await asyncio.sleep(0.05)
    logging.getLogger(__name__).info("deactivation enforced after %.2fs", time.monotonic() - deactivated)


def test_asyncpg_reconnect_tracebacks_stay_out_of_the_log():
    from test_ops import json_log_capture

    with json_log_capture("info") as buffer:
        try:
            raise ConnectionRefusedError(111, "Connect call failed")
        except ConnectionRefusedError:
            # What asyncpg's pool logs on every failed reconnect during an outage.
            logging.getLogger("asyncpg.pool").warning("Failed to restore the pool connection floor; retrying",
                                                      exc_info=True)
        logging.getLogger("gateway.sessions").warning("notification listener lost; retrying")
    lines = buffer.getvalue().splitlines()
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
