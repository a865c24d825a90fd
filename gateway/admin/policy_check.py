"""`gateway check-config`'s review of the access policy (SPEC §13): rules that can never decide, rules that
overlap, and group names no local group has (a warning: an administrator may create the group later).

Warnings, not errors: the gateway runs with them, but the author most likely meant something else.
"""

from __future__ import annotations

import asyncio

import asyncpg

from gateway.access.policy import compile_rules, review
from gateway.config import Config
from gateway.db import groups as db_groups

CONNECT_TIMEOUT = 5.0


async def _existing(dsn: str, names: list[str]) -> set[str]:
    conn = await asyncpg.connect(dsn, timeout=CONNECT_TIMEOUT)
    try:
        return {g.name for g in await db_groups.by_names(conn, names)}
    finally:
        await conn.close()


def policy_warnings(cfg: Config) -> list[str]:
    """Every warning about `routes.*` and `policy:`, each starting with the key path of the rule."""
    rules = compile_rules(cfg.routes.public, cfg.routes.api, cfg.policy)
    named = sorted({g for r in cfg.policy for g in r.allowed_groups or ()})
    known: set[str] | None = None
    notes: list[str] = []
    if named and cfg.database.dsn:
        try:
            known = asyncio.run(_existing(cfg.database.dsn, named))
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            notes.append(f"policy: group names not checked: the database did not answer ({type(exc).__name__})")
    elif named:
        notes.append("policy: group names not checked: database.dsn is not set (check-config does not start "
                     "the embedded database)")
    return review(rules, known) + notes
