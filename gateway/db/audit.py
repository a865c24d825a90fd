"""SQL for the audit trail."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

INSERT = "INSERT INTO audit_events (actor, action, subject, details) VALUES ($1, $2, $3, $4::jsonb) RETURNING id"
LIST = """
SELECT id, at, actor, action, subject, details::text AS details FROM audit_events
WHERE ($1::timestamptz IS NULL OR at >= $1)
  AND ($2::text IS NULL OR lower(actor) = lower($2) OR lower(subject) = lower($2))
  AND ($3::bigint IS NULL OR id < $3)
  AND ($4::text IS NULL OR action = $4)
ORDER BY id DESC LIMIT $5"""


@dataclass(frozen=True, slots=True)
class AuditEvent:
    id: int
    at: datetime
    actor: str
    action: str
    subject: str
    details: dict[str, Any]

    @classmethod
    def from_record(cls, r: asyncpg.Record) -> AuditEvent:
        return cls(r["id"], r["at"], r["actor"], r["action"], r["subject"], json.loads(r["details"]))


async def record(conn: asyncpg.Connection | asyncpg.Pool, actor: str, action: str, subject: str = "",
                 **details: Any) -> int:
    """Append one event; `details` must be JSON-serialisable and never hold secrets."""
    event_id: int = await conn.fetchval(INSERT, actor, action, subject, json.dumps(details, default=str))
    return event_id


async def listing(conn: asyncpg.Connection | asyncpg.Pool, *, since: datetime | None, login: str | None,
                  before_id: int | None, action: str | None, limit: int) -> list[AuditEvent]:
    rows = await conn.fetch(LIST, since, login, before_id, action, limit)
    return [AuditEvent.from_record(r) for r in rows]
