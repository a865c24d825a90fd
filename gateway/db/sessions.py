"""SQL for server-side sessions."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg

COLUMNS = "s.id, u.login, s.user_id, s.created_at, s.expires_at, s.last_seen_at"
INSERT = """
INSERT INTO sessions (id, user_id, expires_at, user_agent, client_ip)
VALUES ($1, $2, now() + make_interval(secs => $3), $4, $5)
RETURNING EXTRACT(EPOCH FROM expires_at)::float8"""
REVOKE = "UPDATE sessions SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL RETURNING user_id"
REVOKE_USER = "UPDATE sessions SET revoked_at = now() WHERE user_id = $1 AND revoked_at IS NULL RETURNING id"
ACTIVE = f"""
SELECT {COLUMNS} FROM sessions s JOIN users u ON u.id = s.user_id
WHERE s.revoked_at IS NULL AND s.expires_at > now()
  AND ($1::text IS NULL OR lower(u.login) = lower($1))
  AND ($2::timestamptz IS NULL OR s.created_at < $2)
ORDER BY s.created_at DESC, s.id LIMIT $3"""
BY_ID = f"""SELECT {COLUMNS} FROM sessions s JOIN users u ON u.id = s.user_id
WHERE s.id = $1 AND s.revoked_at IS NULL AND s.expires_at > now()"""
COUNT_ACTIVE = "SELECT count(*) FROM sessions WHERE revoked_at IS NULL AND expires_at > now()"
# Keyset pages of active sessions, newest first; (created_at, id) is unique, so no row is skipped or repeated.
ACTIVE_PAGE = f"""
SELECT {COLUMNS} FROM sessions s JOIN users u ON u.id = s.user_id
WHERE s.revoked_at IS NULL AND s.expires_at > now()
  AND ($1::bigint IS NULL OR s.user_id = $1)
  AND ($2::timestamptz IS NULL OR (s.created_at, s.id) < ($2, $3::text))
ORDER BY s.created_at DESC, s.id DESC LIMIT $4"""


@dataclass(frozen=True, slots=True)
class SessionRow:
    id: str
    login: str
    user_id: int
    created_at: datetime
    expires_at: datetime
    last_seen_at: datetime

    @classmethod
    def from_record(cls, r: asyncpg.Record) -> SessionRow:
        return cls(r["id"], r["login"], r["user_id"], r["created_at"], r["expires_at"], r["last_seen_at"])


async def insert(conn: asyncpg.Connection, sid: str, user_id: int, *, lifetime: float, user_agent: str,
                 client_ip: str) -> float:
    """Create a session; return its expiry as a Unix time."""
    expires: float = await conn.fetchval(INSERT, sid, user_id, lifetime, user_agent[:512], client_ip)
    return expires


async def revoke(conn: asyncpg.Connection, sid: str) -> int | None:
    """Revoke one session; the owner's user id, or None when it was not active."""
    uid: int | None = await conn.fetchval(REVOKE, sid)
    return uid


async def revoke_user(conn: asyncpg.Connection, user_id: int) -> list[str]:
    return [r["id"] for r in await conn.fetch(REVOKE_USER, user_id)]


async def active(conn: asyncpg.Connection, *, login: str | None, before: datetime | None, limit: int
                 ) -> list[SessionRow]:
    return [SessionRow.from_record(r) for r in await conn.fetch(ACTIVE, login, before, limit)]


async def by_id(conn: asyncpg.Connection, sid: str) -> SessionRow | None:
    r = await conn.fetchrow(BY_ID, sid)
    return SessionRow.from_record(r) if r else None


async def count_active(conn: asyncpg.Connection) -> int:
    n: int = await conn.fetchval(COUNT_ACTIVE)
    return n


async def active_page(conn: asyncpg.Connection, *, user_id: int | None, before: tuple[datetime, str] | None,
                      limit: int) -> list[SessionRow]:
    """Active sessions (of one user, or everyone's), newest first, strictly after the `before` key."""
    at, sid = before if before is not None else (None, None)
    return [SessionRow.from_record(r) for r in await conn.fetch(ACTIVE_PAGE, user_id, at, sid, limit)]
