"""`gateway run`: resolve the database, apply migrations, serve the public and admin listeners until
SIGTERM/SIGINT, then stop accepting and let in-flight requests finish (up to `server.shutdown_grace`).

With `server.workers` 1 everything runs in this process. With more (0 = one per CPU), this process keeps the
database set-up and the admin listener and runs the public listener in worker processes (workers.py).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal

import asyncpg
from aiohttp import web

from gateway.app import Readiness, create_admin_app, create_public_app
from gateway.config import Config, Listen
from gateway.db import migrate as db_migrate
from gateway.db.server import describe, resolve_dsn
from gateway.errors import DatabaseUnavailable
from gateway.listener import CANCEL_WAIT, Limits, Listener
from gateway.metrics import Metrics
from gateway.services import groups
from gateway.web.fast_lane import Lane

log = logging.getLogger("gateway.server")

# After the grace: what cancelling the requests left and closing the app's resources may take at most (the
# pool and the LISTEN connection close with their own bounds, see app.py and sessions/store.py). A service
# manager's stop timeout must exceed shutdown_grace + STOP_MARGIN (deploy/systemd, deploy/kubernetes).
STOP_MARGIN = 10.0


async def connect(dsn: str) -> asyncpg.Connection:
    try:
        return await asyncpg.connect(dsn, timeout=10)
    # ValueError/OverflowError: a DSN asyncpg cannot use (a port out of range)
    except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError, ValueError, OverflowError) as exc:
        raise DatabaseUnavailable(
            f"cannot connect to PostgreSQL at {describe(dsn)} ({type(exc).__name__}); check that the server is "
            "running and reachable, and the user, password and database name in database.dsn") from None


async def prepare_database(cfg: Config, *, apply_migrations: bool) -> str:
    """The DSN to serve from, with migrations applied (unless told not to)."""
    dsn = await resolve_dsn(cfg.database)
    conn = await connect(dsn)
    try:
        if apply_migrations:
            applied = await db_migrate.migrate(conn)
            if applied:
                log.info("migrations applied", extra={"versions": applied})
        if not await db_migrate.pending(conn):
            await report_misnamed_groups(conn)
    finally:
        await conn.close()
    return dsn


async def report_misnamed_groups(conn: asyncpg.Connection) -> list[tuple[str, str]]:
    """Warn about groups named before SPEC §16 in a way the groups header cannot carry (rename them)."""
    misnamed = await groups.misnamed_groups(conn)
    for name, problem in misnamed:
        log.warning("a group name breaks the groups header: rename it (PATCH /api/v1/groups/{id})",
                    extra={"group": name, "problem": problem})
    return misnamed


def public_runner(app: web.Application, cfg: Config) -> web.AppRunner:
    """The public listener's runner: a client that goes away cancels its handler (and so the upstream
    request); shutdown lets in-flight requests finish within `server.shutdown_grace` (see listener.py)."""
    return web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=cfg.server.shutdown_grace,
                         handler_cancellation=True)


def limits(cfg: Config) -> Limits:
    return Limits(header_timeout=cfg.server.header_timeout, idle_timeout=cfg.server.idle_timeout,
                  max_connections=cfg.server.max_connections)


async def start_site(runner: web.AppRunner, listen: Listen, cfg: Config, *, what: str,
                     reuse_port: bool = False, fast_lane: bool = False) -> Listener:
    """Listen (with the `server` connection limits), or a GatewayError naming the address and what to check.
    `fast_lane`: the public app's proxied path is served by web/fast_lane.py (aiohttp serves the rest)."""
    lane = Lane(runner, cancel_wait=CANCEL_WAIT) if fast_lane else None
    listener = Listener(runner, listen, limits(cfg), what=what, reuse_port=reuse_port, lane=lane)
    await listener.start()
    return listener


async def stop_site(runner: web.AppRunner, listener: Listener | None) -> None:
    """Stop accepting, let in-flight requests finish within the runner's grace, then close the app."""
    if listener is not None:
        listener.close()
    await runner.cleanup()


def settle_heap() -> None:
    """Once the apps are set up: everything allocated so far (modules, config, templates, pools) lives as long as
    the process, so it leaves the garbage collector's view. A full collection otherwise walks those hundreds of
    thousands of objects every so often in the middle of a request: the proxied path's p99 (bench/README.md)."""
    gc.collect()
    gc.freeze()


def worker_count(cfg: Config) -> int:
    """`server.workers`, with 0 meaning one per CPU."""
    return cfg.server.workers or os.cpu_count() or 1


async def serve(cfg: Config, *, apply_migrations: bool = True, stop: asyncio.Event | None = None) -> None:
    """Run until `stop` is set or SIGTERM/SIGINT arrives."""
    dsn = await prepare_database(cfg, apply_migrations=apply_migrations)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        count = worker_count(cfg)
        if count > 1:
            from gateway.workers import serve_workers

            await serve_workers(cfg, dsn, count, stop)
        else:
            await _serve_one_process(cfg, dsn, stop)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


async def _serve_one_process(cfg: Config, dsn: str, stop: asyncio.Event) -> None:
    readiness, metrics = Readiness(), Metrics()
    public = public_runner(create_public_app(cfg, dsn, readiness=readiness, metrics=metrics), cfg)
    admin = web.AppRunner(create_admin_app(cfg, dsn, readiness=readiness, metrics=metrics),
                          access_log=None, handle_signals=False, shutdown_timeout=cfg.server.shutdown_grace)
    await public.setup()
    await admin.setup()
    settle_heap()
    public_site = admin_site = None
    try:
        public_site = await start_site(public, cfg.server.listen, cfg, what="server.listen", fast_lane=True)
        admin_site = await start_site(admin, cfg.admin.listen, cfg, what="admin.listen")
        readiness.public_serving = True
        log.info("serving", extra={"public": str(cfg.server.listen), "admin": str(cfg.admin.listen),
                                   "public_url": cfg.server.public_url, "upstream": cfg.upstream.url})
        await stop.wait()
        log.info("shutting down: finishing in-flight requests", extra={"grace_s": cfg.server.shutdown_grace})
    finally:
        readiness.public_serving = False
        if admin_site is not None:
            admin_site.close()
        await stop_site(public, public_site)
        await stop_site(admin, None)
