"""`server.workers`: `gateway run` as a real subprocess with two worker processes sharing the public port."""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest
import yaml
from conftest import ADMIN_TOKEN, CLIENT_ID, CLIENT_SECRET, SESSION_KEY, Gateway
from conftest import session_cookie as _sign_in

from gateway.config import build_config
from gateway.services import accounts

REPO = Path(__file__).resolve().parents[1]
COOKIE = "_gateway"
CONNECTIONS = 16  # new connections are spread by the kernel; all 16 on one worker has odds of 2 in 65,536


class Running:
    def __init__(self, proc: asyncio.subprocess.Process, gw: Gateway, port: int) -> None:
        self.proc = proc
        self.gw = gw
        self.port = port

    def workers(self) -> list[psutil.Process]:
        """The worker processes (not multiprocessing's resource tracker, the other child)."""
        return [p for p in psutil.Process(self.proc.pid).children() if "spawn_main" in " ".join(p.cmdline())]


def _config_data(*, public_port: int, admin_port: int, gitlab_url: str, upstream_url: str, dsn: str,
                 workers: int) -> dict[str, Any]:
    return {
        "server": {"listen": f"127.0.0.1:{public_port}", "public_url": f"http://127.0.0.1:{public_port}",
                   "workers": workers},
        "admin": {"listen": f"127.0.0.1:{admin_port}", "tokens": [ADMIN_TOKEN]},
        "upstream": {"url": upstream_url, "timeout": "5s"},
        "gitlab": {"url": gitlab_url, "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET, "timeout": "3s"},
        "session": {"secrets": [SESSION_KEY]},
        "database": {"dsn": dsn},
        "log": {"level": "warning"},
    }


async def _wait_ready(admin_url: str, proc: asyncio.subprocess.Process, within: float) -> None:
    deadline = time.monotonic() + within
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            assert proc.returncode is None, "gateway run exited during start-up"
            try:
                async with http.get(admin_url + "/readyz") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError("/readyz never answered 200")


@pytest.fixture
async def running(tmp_path, dsn, gitlab, upstream, unused_tcp_port_factory) -> AsyncIterator[Running]:
    fake, gitlab_url = gitlab
    public_port, admin_port = unused_tcp_port_factory(), unused_tcp_port_factory()
    data = _config_data(public_port=public_port, admin_port=admin_port, gitlab_url=gitlab_url,
                        upstream_url=upstream, dsn=dsn, workers=2)
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(data))
    cfg = build_config(data, env={})
    fake.add_application(CLIENT_ID, CLIENT_SECRET, [cfg.server.callback_url])
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "gateway", "run", "-c", str(path), cwd=REPO)
    gw = Gateway(cfg, f"http://127.0.0.1:{public_port}", f"http://127.0.0.1:{admin_port}", None, None,  # type: ignore[arg-type]
                 fake, gitlab_url)
    children: list[psutil.Process] = []
    try:
        await _wait_ready(gw.admin_url, proc, 30)
        children = psutil.Process(proc.pid).children()
        yield Running(proc, gw, public_port)
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        for child in children:  # never leave a worker behind, whatever happened
            if child.is_running():
                child.kill()




def _metric(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")
               or line.startswith(name + "{"))


async def test_two_workers_serve_share_metrics_and_honour_revocation(running: Running, db):
    gw = running.gw
    workers = running.workers()
    assert len(workers) == 2
    cookie = await _sign_in(gw)
    # One client session per connection: each keeps its single keep-alive connection, so each talks to
    # the one worker the kernel gave that connection to.
    sessions = [aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1), cookie_jar=aiohttp.DummyCookieJar(),
                                      headers={"Cookie": f"{COOKIE}={cookie}"}) for _ in range(CONNECTIONS)]
    try:
        async def status_of(http: aiohttp.ClientSession) -> int:
            async with http.get(gw.public_url + "/page") as r:
                if r.status == 200:
                    assert (await r.json())["headers"]
                return r.status

        assert await asyncio.gather(*(status_of(h) for h in sessions)) == [200] * CONNECTIONS

        # Both workers hold some of the connections: both serve.
        owners = {w.pid: 0 for w in workers}
        for w in workers:
            for c in w.net_connections(kind="tcp"):
                if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == running.port:
                    owners[w.pid] += 1
        assert sum(owners.values()) == CONNECTIONS and all(owners.values()), owners

        # The admin listener adds up what every worker counted (snapshots arrive every second).
        async with aiohttp.ClientSession() as http:
            for _ in range(30):
                async with http.get(gw.admin_url + "/metrics") as r:
                    text = await r.text()
                if _metric(text, "gateway_upstream_duration_seconds_count") == CONNECTIONS:
                    break
                await asyncio.sleep(0.1)
        assert _metric(text, "gateway_upstream_duration_seconds_count") == CONNECTIONS
        assert _metric(text, 'gateway_requests_total{code="200"}') >= CONNECTIONS

        # A deactivation (SQL + NOTIFY, no admin API involved) reaches both workers' caches within 1 s.
        await accounts.set_active(db, "alice", False, actor="test")
        started = time.monotonic()
        statuses: list[int] = []
        while time.monotonic() - started < 1.0:
            statuses = await asyncio.gather(*(status_of(h) for h in sessions))
            if statuses == [401] * CONNECTIONS:
                break
            await asyncio.sleep(0.05)
        assert statuses == [401] * CONNECTIONS
    finally:
        for http in sessions:
            await http.close()


async def test_sigterm_finishes_in_flight_requests_and_exits_0(running: Running):
    gw = running.gw
    cookie = await _sign_in(gw)
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        slow = asyncio.ensure_future(http.get(gw.public_url + "/_upstream/slow?s=1",
                                              headers={"Cookie": f"{COOKIE}={cookie}"}))
        await asyncio.sleep(0.3)  # the request is in a worker, waiting for the upstream
        sent = time.monotonic()
        running.proc.send_signal(signal.SIGTERM)
        response = await slow
        assert response.status == 200  # finished, not cut
        assert (await response.json())["path"] == "/_upstream/slow?s=1"
        response.release()
    assert await asyncio.wait_for(running.proc.wait(), 15) == 0
    assert time.monotonic() - sent < 10
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", running.port), timeout=1):
        pass


async def test_a_taken_port_is_a_clear_start_up_failure(tmp_path, dsn, gitlab, upstream, unused_tcp_port_factory):
    _, gitlab_url = gitlab
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        data = _config_data(public_port=port, admin_port=unused_tcp_port_factory(), gitlab_url=gitlab_url,
                            upstream_url=upstream, dsn=dsn, workers=2)
        path = tmp_path / "gateway.yaml"
        path.write_text(yaml.safe_dump(data))
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "gateway", "run", "-c", str(path),
                                                    cwd=REPO, stderr=asyncio.subprocess.PIPE)
        _, stderr = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in stderr.decode()
