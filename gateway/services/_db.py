"""One transaction per service call, with a lost database reported as DatabaseUnavailable (503 / exit 1)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import asyncpg

from gateway.db import DB_UNAVAILABLE, unavailable


@contextlib.asynccontextmanager
async def transaction(pool: asyncpg.Pool) -> AsyncIterator[asyncpg.Connection]:
    """A connection inside a transaction: committed when the block ends, rolled back when it raises."""
    try:
        async with pool.acquire() as conn, conn.transaction():
            yield conn
    except DB_UNAVAILABLE as exc:
        raise unavailable("transaction", exc) from None
