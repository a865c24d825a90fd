"""`gateway check-config`, `gateway migrate` and `gateway run`, as subprocesses: output and exit codes (SPEC §8)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import aiohttp
import asyncpg
from cryptography.fernet import Fernet

from gateway.db import migrate as db_migrate

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_ENV = {"GATEWAY_ADMIN_TOKEN": "admin-token-0123456789", "GITLAB_CLIENT_SECRET": "secret-from-env",
               "GATEWAY_SESSION_SECRET": Fernet.generate_key().decode()}


async def gateway(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> tuple[int, str, str]:
    """Run `python -m gateway ARGS`; (exit code, stdout, stderr)."""
    full_env = {k: v for k, v in os.environ.items() if k not in EXAMPLE_ENV and k != "GATEWAY_CONFIG"}
    full_env.update(env or {})
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "gateway", *args, cwd=ROOT, env=full_env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


# ---- check-config ------------------------------------------------------------------------------------------

async def test_check_config_prints_every_problem_and_exits_2(tmp_path):
    config = tmp_path / "gateway.yaml"
    config.write_text(
        "server:\n  listen: 0.0.0.0:4180\n  colour: blue\n"
        "gitlab:\n  url: not-a-url\n  client_id: app\n  client_secret: ${GW_TEST_UNSET_SECRET}\n"
        f"session:\n  secrets: ['{Fernet.generate_key().decode()}']\n")
    code, out, err = await gateway("check-config", "-c", str(config))
    assert code == 2
    assert out == ""
    assert "server.colour: unknown key" in err
    assert "gitlab.url: must be an http(s) URL" in err
    assert "gitlab.client_secret: environment variable GW_TEST_UNSET_SECRET is not set" in err
    assert "configuration problems (3)" in err
    assert "Traceback" not in err


async def test_check_config_accepts_the_example_with_its_env():
    code, out, err = await gateway("check-config", "-c", "gateway.example.yaml", env=EXAMPLE_ENV)
    assert code == 0, err
    assert "ok" in out and EXAMPLE_ENV["GITLAB_CLIENT_SECRET"] not in out + err


async def test_check_config_finds_the_file_through_gateway_config():
    code, _out, err = await gateway("check-config", env={**EXAMPLE_ENV, "GATEWAY_CONFIG": "gateway.example.yaml"})
    assert code == 0, err
    code, _, err = await gateway("check-config", env={**EXAMPLE_ENV, "GATEWAY_CONFIG": "/nonexistent/gw.yaml"})
    assert code == 2 and "/nonexistent/gw.yaml: cannot read the configuration file" in err


async def test_bad_usage_exits_2():
    code, _, err = await gateway("no-such-command")
    assert code == 2 and "invalid choice" in err


# ---- migrate -----------------------------------------------------------------------------------------------

async def test_migrate_twice(write_config, empty_dsn):
    config = write_config(database={"dsn": empty_dsn})
    code, out, err = await gateway("migrate", "-c", str(config))
    assert code == 0, err
    assert out.strip() == "applied: " + ", ".join(m.version for m in db_migrate.available())
    conn = await asyncpg.connect(empty_dsn)
    try:
        before = await conn.fetch("SELECT version, applied_at FROM schema_migrations")
        code, out, err = await gateway("migrate", "-c", str(config))
        assert code == 0, err
        assert out.strip() == "database schema is up to date"
        assert await conn.fetch("SELECT version, applied_at FROM schema_migrations") == before
    finally:
        await conn.close()


async def test_migrate_with_an_unreachable_database_exits_1(write_config):
    config = write_config(database={"dsn": "postgresql://gw:pg-password-xyz@127.0.0.1:1/gw"})
    code, _out, err = await gateway("migrate", "-c", str(config))
    assert code == 1
    assert len(err.strip().splitlines()) == 1 and "127.0.0.1:1" in err, err
    assert "pg-password-xyz" not in err


# ---- run ---------------------------------------------------------------------------------------------------

async def test_run_becomes_ready_then_stops_on_sigterm(write_config, unused_tcp_port_factory):
    public, admin = unused_tcp_port_factory(), unused_tcp_port_factory()
    config = write_config(server={"listen": f"127.0.0.1:{public}", "public_url": f"http://127.0.0.1:{public}"},
                          admin={"listen": f"127.0.0.1:{admin}"})
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "gateway", "run", "-c", str(config), cwd=ROOT,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        status = None
        async with aiohttp.ClientSession() as http:
            while time.monotonic() - started < 10 and proc.returncode is None:
                try:
                    r = await http.get(f"http://127.0.0.1:{admin}/readyz")
                    status = r.status
                    if status == 200:
                        break
                except aiohttp.ClientConnectionError:
                    pass
                await asyncio.sleep(0.1)
            assert status == 200, f"not ready after {time.monotonic() - started:.1f} s"
            r = await http.get(f"http://127.0.0.1:{admin}/healthz")
            assert r.status == 200
            r = await http.get(f"http://127.0.0.1:{public}/readyz")  # the admin surface is not on the public port
            assert r.status != 200 or "ready" not in await r.text()
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 15)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()


async def test_run_with_an_unreachable_database_exits_1_naming_the_host(write_config):
    config = write_config(database={"dsn": "postgresql://gw:pg-password-xyz@127.0.0.1:1/gateway"},
                          log={"level": "info"})
    code, _out, err = await gateway("run", "-c", str(config), timeout=30)
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("gateway: ") and "127.0.0.1:1" in lines[0]
    assert "pg-password-xyz" not in err and "Traceback" not in err
