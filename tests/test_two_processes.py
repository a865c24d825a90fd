"""Scale-out (SPEC §2): two `gateway run` processes on one database. A session made on one is valid on the
other, and a deactivation made through one process's admin API reaches the other within a second (NOTIFY)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import ADMIN_TOKEN, CLIENT_ID, CLIENT_SECRET, Browser

from gateway.config import Config, load_config
from gateway.demo.fake_gitlab import FakeGitLab

ROOT = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT = 30.0


@dataclass
class Process:
    """A `gateway run` subprocess, shaped like conftest's Gateway as far as Browser needs."""

    config: Config
    public_url: str
    admin_url: str
    fake: FakeGitLab
    fake_url: str
    proc: asyncio.subprocess.Process
    log: Path

    def browser(self) -> Browser:
        return Browser(self)  # type: ignore[arg-type]  # Browser only reads the fields above

    def admin(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(self.admin_url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})


async def wait_ready(p: Process) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    async with aiohttp.ClientSession() as http:
        while True:
            if p.proc.returncode is not None:
                pytest.fail(f"gateway exited with {p.proc.returncode}: {p.log.read_text()}")
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(f"{p.admin_url}/readyz") as r:
                    if r.status == 200:
                        return
            if time.monotonic() > deadline:
                pytest.fail(f"gateway not ready after {STARTUP_TIMEOUT}s: {p.log.read_text()}")
            await asyncio.sleep(0.1)


async def stop(p: Process) -> int:
    if p.proc.returncode is None:
        p.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(p.proc.wait(), 15)
        except TimeoutError:
            p.proc.kill()
            await p.proc.wait()
    assert p.proc.returncode is not None
    return p.proc.returncode


@contextlib.asynccontextmanager
async def gateway_processes(gitlab: tuple[FakeGitLab, str], write_config: Any, ports: Any, tmp_path: Path,
                            **sections: dict[str, Any]) -> AsyncIterator[list[Process]]:
    """`gateway run` processes on this test's database, one per (public, admin) port pair; `sections`
    override configuration keys; every process must stop cleanly (exit 0)."""
    fake, fake_url = gitlab
    fake.add_application(CLIENT_ID, CLIENT_SECRET, [f"http://127.0.0.1:{public}/oauth2/callback"
                                                     for public, _ in ports])
    started: list[Process] = []
    try:
        for i, (public, admin) in enumerate(ports):
            path = write_config(
                server={"listen": f"127.0.0.1:{public}", "public_url": f"http://127.0.0.1:{public}"},
                admin={"listen": f"127.0.0.1:{admin}"},
                gitlab={"url": fake_url},
                # a long check interval: only NOTIFY can make a change visible within a second
                session={"check_interval": "5m"},
                **sections,
            )
            log = tmp_path / f"gateway-{i}.log"
            with log.open("wb") as out:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "gateway", "run", "-c", str(path), cwd=ROOT,
                    stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out)
            started.append(Process(load_config(path), f"http://127.0.0.1:{public}", f"http://127.0.0.1:{admin}",
                                   fake, fake_url, proc, log))
        await asyncio.gather(*(wait_ready(p) for p in started))
        yield started
    finally:
        codes = [await stop(p) for p in started]
    assert codes == [0] * len(started), [p.log.read_text() for p in started]


@pytest.fixture
async def two_processes(gitlab, write_config, unused_tcp_port_factory, tmp_path) -> Any:
    ports = [(unused_tcp_port_factory(), unused_tcp_port_factory()) for _ in range(2)]
    async with gateway_processes(gitlab, write_config, ports, tmp_path) as started:
        yield started


async def userinfo(b: Browser, base_url: str) -> int:
    async with b.http.get(f"{base_url}/oauth2/userinfo", headers={"Accept": "application/json"},
                          allow_redirects=False) as r:
        return r.status


async def test_deactivation_on_one_process_reaches_the_other_within_a_second(two_processes):
    a, b = two_processes
    a.fake.add_user(10, "alice", name="Alice", email="alice@example.com")
    async with a.browser() as browser:
        await browser.sign_in("alice")
        assert await userinfo(browser, a.public_url) == 200
        assert await userinfo(browser, b.public_url) == 200  # the cookie is good on every replica
        async with b.admin() as api, api.patch("/api/v1/users/alice", json={"active": False}) as r:
            assert r.status == 200, await r.text()
            assert (await r.json())["active"] is False
        started = time.monotonic()
        while await userinfo(browser, a.public_url) != 401:
            assert time.monotonic() - started < 1.0, "process A still serves a deactivated user"
            await asyncio.sleep(0.05)
        elapsed = time.monotonic() - started
        assert elapsed < 1.0
        assert await userinfo(browser, b.public_url) == 401
        r = await browser.get("/anything")  # the proxy path refuses it too
        assert r.status in (302, 401)


async def test_membership_change_on_one_process_reaches_the_other(two_processes):
    a, b = two_processes
    a.fake.add_user(10, "alice", name="Alice", email="alice@example.com")
    async with a.browser() as browser:
        await browser.sign_in("alice")
        async with browser.http.get(f"{a.public_url}/oauth2/userinfo") as r:
            assert (await r.json())["groups"] == ["gateway-users"]
        async with b.admin() as api:
            async with api.post("/api/v1/groups", json={"name": "Local team"}) as r:
                assert r.status == 201
                gid = (await r.json())["id"]
            async with api.post(f"/api/v1/groups/{gid}/members", json={"login": "alice"}) as r:
                assert r.status == 201
        started = time.monotonic()
        while True:
            async with browser.http.get(f"{a.public_url}/oauth2/userinfo") as r:
                assert r.status == 200
                if (await r.json())["groups"] == ["Local team", "gateway-users"]:
                    break
            assert time.monotonic() - started < 1.0, "process A still shows the old groups"
            await asyncio.sleep(0.05)
