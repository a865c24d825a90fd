"""Server-side sessions as administrators see them: list the active ones, revoke one.

Revoking NOTIFYs `session:<id>` in the same transaction, so every process drops its cached identity for it
at commit; the next request carrying that cookie counts as signed out everywhere.
"""

from __future__ import annotations

from datetime import datetime

import asyncpg

from gateway.db import audit as db_audit
from gateway.db import notify as db_notify
from gateway.db import sessions as db_sessions
from gateway.db.sessions import SessionRow
from gateway.errors import NotFound
from gateway.services import accounts, paging
from gateway.services._db import transaction

# Session ids are long random strings; audit details keep only a prefix, enough to tell sessions apart.
AUDIT_ID_CHARS = 8


async def list_sessions(pool: asyncpg.Pool, *, login: str | None = None, cursor: str | None = None,
                        limit: int | None = None) -> paging.Page[SessionRow]:
    """Active (not revoked, not expired) sessions, newest first; of one user when `login` is given."""
    n = paging.check_limit(limit)
    key = paging.decode("sessions", cursor, str, str)
    before = None
    if key is not None:
        try:
            before = (datetime.fromisoformat(key[0]), str(key[1]))
        except ValueError:
            raise paging.invalid_cursor() from None
    async with transaction(pool) as conn:
        user_id = await accounts.user_id(conn, login)
        rows = await db_sessions.active_page(conn, user_id=user_id, before=before, limit=n + 1)
    return paging.page(rows, n, lambda s: paging.encode("sessions", s.created_at.isoformat(), s.id))


async def revoke_session(pool: asyncpg.Pool, sid: str, *, actor: str) -> SessionRow:
    """Revoke one active session everywhere; NotFound when no active session has this id."""
    async with transaction(pool) as conn:
        session = await db_sessions.by_id(conn, sid)
        if session is None or await db_sessions.revoke(conn, sid) is None:
            raise NotFound("No active session with this id")
        await db_notify.notify(conn, "session", sid)
        await db_audit.record(conn, actor, "session.revoked", session.login, login=session.login,
                              session=session.id[:AUDIT_ID_CHARS])
    return session
