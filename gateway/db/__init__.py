"""PostgreSQL access: the server (embedded or configured), migrations, and one SQL module per aggregate."""

from __future__ import annotations

import asyncio

import asyncpg
from asyncpg import exceptions as pg

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
