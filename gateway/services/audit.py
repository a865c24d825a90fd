"""Reading the audit trail: newest first, filtered by time, by login (actor or subject) and by action."""

from __future__ import annotations

from datetime import datetime

import asyncpg

from gateway.db import audit as db_audit
from gateway.db.audit import AuditEvent
from gateway.services import paging
from gateway.services._db import transaction


async def list_events(pool: asyncpg.Pool, *, since: datetime | None = None, login: str | None = None,
                      action: str | None = None, cursor: str | None = None, limit: int | None = None
                      ) -> paging.Page[AuditEvent]:
    """Events at or after `since`, whose actor or subject is `login` (case-insensitive), newest first."""
    n = paging.check_limit(limit)
    key = paging.decode("audit", cursor)
    async with transaction(pool) as conn:
        rows = await db_audit.listing(conn, since=since, login=login, before_id=int(key[0]) if key else None,
                                      action=action, limit=n + 1)
    return paging.page(rows, n, lambda e: paging.encode("audit", e.id))
