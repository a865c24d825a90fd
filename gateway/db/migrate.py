"""Apply migrations/NNNN_*.sql in order: one transaction per file, recorded in schema_migrations, under an
advisory lock so that replicas starting together neither race nor fail."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from importlib import resources

import asyncpg

log = logging.getLogger("gateway.migrate")

# An arbitrary constant: the advisory lock key that serializes migration runs across processes.
LOCK_KEY = 0x6761746577617931
_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")

CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     text PRIMARY KEY,
    applied_at  timestamptz NOT NULL DEFAULT now()
)"""


@dataclass(frozen=True, slots=True)
class Migration:
    version: str
    sql: str


def available() -> list[Migration]:
    """The migrations shipped inside the package, in order."""
    folder = resources.files("gateway") / "migrations"
    found = []
    for entry in folder.iterdir():
        if _NAME.match(entry.name):
            found.append(Migration(entry.name.removesuffix(".sql"), entry.read_text(encoding="utf-8")))
    return sorted(found, key=lambda m: m.version)


async def pending(conn: asyncpg.Connection) -> list[str]:
    """Versions not applied yet (all of them when schema_migrations does not exist)."""
    exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")} if exists else set()
    return [m.version for m in available() if m.version not in done]


async def migrate(conn: asyncpg.Connection) -> list[str]:
    """Apply every pending migration; return the versions applied (empty when up to date)."""
    applied = []
    await conn.execute("SELECT pg_advisory_lock($1)", LOCK_KEY)
    try:
        await conn.execute(CREATE_TABLE)
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        for m in available():
            if m.version in done:
                continue
            async with conn.transaction():
                await conn.execute(m.sql)
                await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", m.version)
            log.info("migration applied", extra={"version": m.version})
            applied.append(m.version)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", LOCK_KEY)
    return applied
