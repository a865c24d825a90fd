"""PostgreSQL access: the server (embedded or configured), migrations, and one SQL module per aggregate."""

from __future__ import annotations

import asyncio

import asyncpg
from asyncpg import exceptions as pg

from gateway.errors import DatabaseUnavailable

# What "the database is unavailable" means (503, nothing half-applied): the server cannot be reached, went
# away, is shutting down, is out of connections, refuses connections, or is a read-only standby (failover).
# Anything else (a constraint, a bad argument) is a bug or a rule and must not be disguised as an outage.
DB_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    pg.OperatorInterventionError,
    pg.InsufficientResourcesError,
    pg.ReadOnlySQLTransactionError,
    pg.InvalidCatalogNameError,  # the database itself is gone
    pg.ObjectNotInPrerequisiteStateError,  # "database is not currently accepting connections"
    asyncpg.InterfaceError,  # the connection closed under us
)


def describe_error(exc: BaseException) -> str:
    """What went wrong, for a log line: the exception's kind and its message (asyncpg's and the OS's name no
    secret; a DSN's password never appears in them)."""
    text = str(exc).strip()
    name = type(exc).__name__
    if isinstance(exc, TimeoutError) and not text:
        return "no answer in time (TimeoutError)"
    return f"{text[:200]} ({name})" if text else name


def unavailable(what: str, exc: BaseException) -> DatabaseUnavailable:
    """The 503 for a failed `what`: the page says the database is unavailable; the cause goes to the log only."""
    err = DatabaseUnavailable()
    err.cause = f"{what}: {describe_error(exc)}"
    return err
