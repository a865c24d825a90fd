"""Automatic provisioning through the gateway (SPEC §12): the schedule on one replica at a time,
POST /api/v1/sync, `gateway sync`, the metrics of the last run, and revocations reaching signed-in browsers."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from conftest import make_config
from test_automatic import TOKEN, seed

from gateway.demo.fake_gitlab import FakeGitLab
from gateway.metrics import Metrics
from gateway.sync import schedule

ROOT = Path(__file__).resolve().parents[1]
AUTOMATIC = {"automatic": {"token": TOKEN, "groups": ["acme"]}}


async def runs(db: asyncpg.Pool) -> list[asyncpg.Record]:
    return list(await db.fetch("SELECT ok, counts::text AS counts FROM automatic_runs ORDER BY id"))


async def wait_for_runs(db: asyncpg.Pool, n: int) -> None:
    for _ in range(200):
        if len(await runs(db)) >= n:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"expected {n} runs, saw {len(await runs(db))}")


async def test_the_schedule_runs_at_start_and_the_api_plans_and_applies(
        gateway_factory: Any, gitlab: tuple[FakeGitLab, str], db: asyncpg.Pool) -> None:
    fake, _ = gitlab
    seed(fake)
    gw = await gateway_factory(provisioning=AUTOMATIC)
    await wait_for_runs(db, 1)  # the first run is due at once
    assert await db.fetchval("SELECT count(*) FROM users WHERE provisioned_by = 'gitlab'") == 3
    async with gw.browser() as browser:
        await browser.sign_in("bob")
        assert (await browser.get("/", headers={"Accept": "application/json"})).status == 200
        fake.remove_member("bob", "acme/platform/sre")
        async with gw.admin() as admin:
            r = await admin.post("/api/v1/sync", json={"dry_run": True})
            plan = await r.json()
            assert r.status == 200 and plan["dry_run"] is True
            assert plan["sessions"]["revoked"][0]["login"] == "bob"
            assert (await browser.get("/", headers={"Accept": "application/json"})).status == 200  # dry run
            r = await admin.post("/api/v1/sync")
            applied = await r.json()
            assert r.status == 200 and applied["applied"] is True
            assert applied["counts"] == plan["counts"]
            # Revoked everywhere at once (NOTIFY): bob's next request is signed out.
            for _ in range(50):
                if (await browser.get("/", headers={"Accept": "application/json"})).status == 401:
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("bob's session survived the run")
            metrics = await (await admin.get("/metrics")).text()
            assert "gateway_autoprov_last_run_success 1" in metrics
            assert 'gateway_autoprov_last_run_changes{kind="memberships_removed"} 1' in metrics
            assert "gateway_autoprov_last_run_gitlab_calls 6" in metrics
            assert 'gateway_gitlab_requests_total{code="200",endpoint="automatic_members"}' in metrics
            events = await (await admin.get("/api/v1/audit", params={"login": "tester"})).json()
            assert [e["action"] for e in events["items"]][:2] == ["sync.automatic", "session.revoked"]


async def test_a_second_request_while_a_run_is_going_is_409(
        gateway_factory: Any, gitlab: tuple[FakeGitLab, str], db: asyncpg.Pool) -> None:
    fake, _ = gitlab
    seed(fake)
    gw = await gateway_factory(provisioning=AUTOMATIC)
    await wait_for_runs(db, 1)
    fake.fail("members", 0, delay=0.4, times=None)
    async with gw.admin() as admin:
        first = asyncio.create_task(admin.post("/api/v1/sync"))
        await asyncio.sleep(0.2)
        r = await admin.post("/api/v1/sync", json={"dry_run": True})
        assert r.status == 409 and (await r.json())["error"] == "sync_in_progress"
        assert (await first).status == 200
        r = await admin.post("/api/v1/sync", json={"dry_run": "yes"})
        assert r.status == 422


async def test_without_the_key_the_api_says_it_is_off(gateway_factory: Any) -> None:
    gw = await gateway_factory()
    async with gw.admin() as admin:
        r = await admin.post("/api/v1/sync")
        assert r.status == 409 and (await r.json())["error"] == "automatic_provisioning_off"


async def test_two_replicas_at_once_one_runs_the_other_says_so(
        gitlab: tuple[FakeGitLab, str], db: asyncpg.Pool, caplog: pytest.LogCaptureFixture) -> None:
    fake, url = gitlab
    seed(fake)
    fake.fail("members", 0, delay=0.3, times=None)
    cfg = make_config(public_port=1, admin_port=2, gitlab_url=url, upstream_url="http://127.0.0.1:3",
                      provisioning=AUTOMATIC)
    caplog.set_level(logging.INFO, "gateway.automatic")
    async with aiohttp.ClientSession() as http:
        replicas = [asyncio.create_task(schedule.scheduler(db, cfg, http, Metrics())) for _ in range(2)]
        await wait_for_runs(db, 1)
        await asyncio.sleep(0.3)
        for task in replicas:
            task.cancel()
        await asyncio.gather(*replicas, return_exceptions=True)
    assert len(await runs(db)) == 1
    said = [r.getMessage() for r in caplog.records if "another replica" in r.getMessage()]
    assert said, [r.getMessage() for r in caplog.records]


async def test_the_sync_command_prints_progress_and_the_plan(gitlab: tuple[FakeGitLab, str],
                                                            write_config: Any) -> None:
    fake, url = gitlab
    seed(fake)
    path = write_config(gitlab={"url": url}, provisioning=AUTOMATIC)

    def sync(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "gateway", "sync", "-c", str(path), *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)

    # The stand-in serves from this test's event loop: each command runs in a thread meanwhile.
    dry = await asyncio.to_thread(sync, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "listing GitLab: 4 groups, members of 4 read, 4 members, 6 calls" in dry.stderr
    assert "planned (dry run): 4 GitLab groups" in dry.stderr and "users +3" in dry.stderr
    assert "create group  acme/platform/sre" in dry.stdout and "add member" in dry.stdout
    applied = await asyncio.to_thread(sync, "--json")
    assert applied.returncode == 0, applied.stderr
    assert json.loads(applied.stdout)["counts"]["users_created"] == 3
    again = await asyncio.to_thread(sync)
    assert again.returncode == 0 and again.stdout.strip() == "no changes"
    assert TOKEN not in dry.stderr + applied.stderr + again.stderr + dry.stdout
