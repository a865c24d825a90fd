"""Cross-process invalidation over PostgreSQL LISTEN/NOTIFY.

Writers call `notify(conn, ...)` inside the transaction that makes the change: PostgreSQL delivers the
notification only at commit, so a listener never drops its cache for a change that was rolled back.
Payloads: `session:<id>`, `user:<id>`, `group:<id>` (its members changed), `all`.
"""

from __future__ import annotations

import asyncpg

CHANNEL = "gateway_invalidate"


async def notify(conn: asyncpg.Connection, kind: str, key: object = "") -> None:
    await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, f"{kind}:{key}" if key != "" else kind)
