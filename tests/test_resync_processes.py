"""SPEC §11 on two `gateway run` processes sharing one database: a user blocked in GitLab loses access on both
within resync_interval (2 s here), and no refresh token is ever presented twice (counted at the stand-in)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from test_two_processes import gateway_processes, userinfo


@pytest.fixture
async def resync_processes(gitlab, write_config, unused_tcp_port_factory, tmp_path) -> Any:
    ports = [(unused_tcp_port_factory(), unused_tcp_port_factory()) for _ in range(2)]
    async with gateway_processes(gitlab, write_config, ports, tmp_path,
                                 provisioning={"resync_interval": "2s", "resync_grace": "1h"}) as started:
        yield started


async def test_blocked_in_gitlab_loses_access_on_both_processes(resync_processes) -> None:
    a, b = resync_processes
    a.fake.add_user(10, "alice")
    for i in range(6):
        a.fake.add_user(20 + i, f"user{i}")
    async with a.browser() as browser:
        await browser.sign_in("alice")
        for i in range(6):  # more users, signed in on either process: both schedulers have work
            async with (a if i % 2 else b).browser() as other:
                await other.sign_in(f"user{i}")
        assert await userinfo(browser, a.public_url) == 200
        assert await userinfo(browser, b.public_url) == 200
        await asyncio.sleep(3)  # a round of re-checks on both processes
        a.fake.set_user_state("alice", "blocked")
        started = time.monotonic()
        while await userinfo(browser, a.public_url) != 401 or await userinfo(browser, b.public_url) != 401:
            # due within 2 s of the last re-check, plus the scheduler's poll and a GitLab round trip
            assert time.monotonic() - started < 4.0, "a blocked user still gets in"
            await asyncio.sleep(0.05)
        await asyncio.sleep(3)
    calls = a.fake.refresh_calls
    assert len(calls) >= 14, calls  # at least two rounds over seven users happened
    assert max(calls.values()) == 1, "two processes presented the same refresh token"
