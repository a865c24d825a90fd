"""`gateway run`: resolve the database, apply migrations, serve the public and admin listeners until
SIGTERM/SIGINT, then stop accepting and let in-flight requests finish (up to SHUTDOWN_GRACE seconds).

With `server.workers` 1 everything runs in this process. With more (0 = one per CPU), this process keeps the
database set-up and the admin listener and runs the public listener in worker processes (workers.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal

import asyncpg
from aiohttp import web

from gateway.app import Readiness, create_admin_app, create_public_app
from gateway.config import Config, Listen
from gateway.db import migrate as db_migrate
from gateway.db.server import describe, resolve_dsn
from gateway.errors import DatabaseUnavailable, GatewayError
from gateway.metrics import Metrics

log = logging.getLogger("gateway.server")

SHUTDOWN_GRACE = 30.0


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
    finally:
        await conn.close()
    return dsn


def public_runner(app: web.Application) -> web.AppRunner:
    """The public listener's runner: a client that goes away cancels its handler (and so the upstream
    request); shutdown waits for in-flight requests up to SHUTDOWN_GRACE."""
    return web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=SHUTDOWN_GRACE,
                         handler_cancellation=True)


async def start_site(runner: web.AppRunner, listen: Listen, *, what: str, reuse_port: bool = False
                     ) -> web.TCPSite:
    """Listen, or a GatewayError naming the address and what to check."""
    site = web.TCPSite(runner, listen.host, listen.port, reuse_port=reuse_port or None)
    try:
        await site.start()
    except OSError as exc:
        raise GatewayError(f"cannot listen on {listen} ({what}): {exc.strerror or exc}; is another process "
                           f"using the port? Check {what}.") from None
    return site


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
    public = public_runner(create_public_app(cfg, dsn, readiness=readiness, metrics=metrics))
    admin = web.AppRunner(create_admin_app(cfg, dsn, readiness=readiness, metrics=metrics),
                          access_log=None, handle_signals=False)
    await public.setup()
    await admin.setup()
    try:
        await start_site(public, cfg.server.listen, what="server.listen")
        await start_site(admin, cfg.admin.listen, what="admin.listen")
        readiness.public_serving = True
        log.info("serving", extra={"public": str(cfg.server.listen), "admin": str(cfg.admin.listen),
                                   "public_url": cfg.server.public_url, "upstream": cfg.upstream.url})
        await stop.wait()
        log.info("shutting down: finishing in-flight requests")
    finally:
        readiness.public_serving = False
        await admin.cleanup()
        await public.cleanup()
