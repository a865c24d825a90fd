"""SQL for automatic provisioning (SPEC §12): what a run reads in one go, its bulk writes, and the run log.

Everything is set-based (unnest of arrays), so a run over 2,000 groups and 20,000 members is a handful of
statements, not one per row.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from gateway.db.server import hold_session_state
from gateway.db.users import SELECT_COLUMNS, User

# One run at a time across every replica: held (session level) by the connection that runs, for the whole run.
RUN_LOCK_KEY = 0x6761746577617932
TRY_LOCK = "SELECT pg_try_advisory_lock($1)"
UNLOCK = "SELECT pg_advisory_unlock($1)"

GROUPS = "SELECT id, name, gitlab_group_id, builtin FROM groups ORDER BY id"
USERS = f"""
SELECT {SELECT_COLUMNS} FROM users WHERE gitlab_id = ANY($1::bigint[]) OR lower(login) = ANY($2::text[])"""
MEMBERSHIPS = """
SELECT m.user_id, m.group_id, m.source, u.login FROM memberships m JOIN users u ON u.id = m.user_id
WHERE m.group_id = ANY($1::bigint[])"""
# Users with a live session whom GitLab's subtree governs: provisioned by a run, or holding a sync membership
# of a subtree group. If the subtree no longer has them as active members, their sessions end.
GOVERNED_WITH_SESSIONS = """
SELECT u.id, u.login, u.gitlab_id, count(s.id) AS sessions
FROM users u JOIN sessions s ON s.user_id = u.id AND s.revoked_at IS NULL AND s.expires_at > now()
WHERE u.provisioned_by = 'gitlab' OR u.gitlab_id = ANY($2::bigint[])
   OR EXISTS (SELECT 1 FROM memberships m WHERE m.user_id = u.id AND m.source = 'sync'
              AND m.group_id = ANY($1::bigint[]))
GROUP BY u.id, u.login, u.gitlab_id"""

INSERT_GROUPS = """
INSERT INTO groups (name, description, gitlab_group_id)
SELECT name, 'GitLab group (automatic provisioning)', gid FROM unnest($1::text[], $2::bigint[]) AS v(name, gid)
RETURNING id, gitlab_group_id"""
BIND_GROUPS = """
UPDATE groups g SET gitlab_group_id = v.gid FROM unnest($1::bigint[], $2::bigint[]) AS v(id, gid)
WHERE g.id = v.id AND g.gitlab_group_id IS NULL"""
RENAME_GROUPS = """
UPDATE groups g SET name = v.name FROM unnest($1::bigint[], $2::text[]) AS v(id, name)
WHERE g.id = v.id AND NOT g.builtin"""
INSERT_USERS = """
INSERT INTO users (gitlab_id, login, name, email, provisioned_by)
SELECT gid, login, name, email, 'gitlab'
FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[]) AS v(gid, login, name, email)
RETURNING id, gitlab_id"""
UPDATE_USERS = """
UPDATE users u SET gitlab_id = v.gid, login = v.login, name = v.name, email = v.email
FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::text[], $5::text[]) AS v(id, gid, login, name, email)
WHERE u.id = v.id"""
ADD_MEMBERSHIPS = """
INSERT INTO memberships (user_id, group_id, source)
SELECT u, g, $3 FROM unnest($1::bigint[], $2::bigint[]) AS v(u, g)
ON CONFLICT (user_id, group_id) DO NOTHING"""
REMOVE_MEMBERSHIPS = """
DELETE FROM memberships m USING unnest($1::bigint[], $2::bigint[]) AS v(u, g)
WHERE m.user_id = v.u AND m.group_id = v.g"""
REVOKE_SESSIONS = """
UPDATE sessions SET revoked_at = now()
WHERE user_id = ANY($1::bigint[]) AND revoked_at IS NULL RETURNING id, user_id"""

RECORD_RUN = """
INSERT INTO automatic_runs (started_at, ok, duration, gitlab_calls, db_seconds, counts, error, actor)
VALUES (to_timestamp($1), $2, $3, $4, $5, $6::jsonb, $7, $8)"""
RECENT_RUNS = """
SELECT started_at, finished_at, ok, duration, gitlab_calls, db_seconds, counts::text AS counts, error, actor,
  EXTRACT(EPOCH FROM finished_at)::float8 AS finished_epoch
FROM automatic_runs ORDER BY finished_at DESC, id DESC LIMIT $1"""
# Is the run lock held right now (by any session of this database)? A bigint advisory key shows in pg_locks
# as classid = its high 32 bits, objid = its low 32 bits, objsubid = 1.
LOCK_HELD = """
SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 1
  AND classid = $1::bigint::oid AND objid = $2::bigint::oid
  AND database = (SELECT oid FROM pg_database WHERE datname = current_database()))"""


@dataclass(frozen=True, slots=True)
class LocalGroup:
    id: int
    name: str
    gitlab_group_id: int | None
    builtin: bool


@dataclass(frozen=True, slots=True)
class Governed:
    id: int
    login: str
    gitlab_id: int | None
    sessions: int


@dataclass(frozen=True, slots=True)
class Run:
    started_at: datetime
    finished_at: datetime
    finished_epoch: float
    ok: bool
    duration: float
    gitlab_calls: int
    db_seconds: float
    counts: dict[str, int]
    error: str
    actor: str


async def try_lock(conn: asyncpg.Connection) -> bool:
    hold_session_state(conn)  # a session lock: the pool's release must clear it if `unlock` never runs
    return bool(await conn.fetchval(TRY_LOCK, RUN_LOCK_KEY))


async def unlock(conn: asyncpg.Connection) -> None:
    await conn.fetchval(UNLOCK, RUN_LOCK_KEY)


async def groups(conn: asyncpg.Connection) -> list[LocalGroup]:
    return [LocalGroup(r["id"], r["name"], r["gitlab_group_id"], r["builtin"]) for r in await conn.fetch(GROUPS)]


async def users(conn: asyncpg.Connection, gitlab_ids: list[int], logins: list[str]) -> list[User]:
    """The users a listing may concern: by GitLab id, or by login (case-insensitive)."""
    return [User.from_record(r) for r in await conn.fetch(USERS, gitlab_ids, [login.lower() for login in logins])]


@dataclass(frozen=True, slots=True)
class Member:
    user_id: int
    group_id: int
    source: str
    login: str


async def memberships(conn: asyncpg.Connection, group_ids: list[int]) -> list[Member]:
    rows = await conn.fetch(MEMBERSHIPS, group_ids)
    return [Member(r["user_id"], r["group_id"], r["source"], r["login"]) for r in rows]


async def governed_with_sessions(conn: asyncpg.Connection, group_ids: list[int], gitlab_ids: list[int]
                                 ) -> list[Governed]:
    rows = await conn.fetch(GOVERNED_WITH_SESSIONS, group_ids, gitlab_ids)
    return [Governed(r["id"], r["login"], r["gitlab_id"], r["sessions"]) for r in rows]


async def insert_groups(conn: asyncpg.Connection, names: list[str], gitlab_ids: list[int]) -> dict[int, int]:
    """gitlab group id -> new local group id."""
    if not names:
        return {}
    return {r["gitlab_group_id"]: r["id"] for r in await conn.fetch(INSERT_GROUPS, names, gitlab_ids)}


async def bind_groups(conn: asyncpg.Connection, ids: list[int], gitlab_ids: list[int]) -> None:
    if ids:
        await conn.execute(BIND_GROUPS, ids, gitlab_ids)


async def rename_groups(conn: asyncpg.Connection, ids: list[int], names: list[str]) -> None:
    if ids:
        await conn.execute(RENAME_GROUPS, ids, names)


async def insert_users(conn: asyncpg.Connection, rows: list[tuple[int, str, str, str]]) -> dict[int, int]:
    """(gitlab id, login, name, email) rows -> {gitlab id: new local user id}."""
    if not rows:
        return {}
    cols = [list(c) for c in zip(*rows, strict=True)]
    return {r["gitlab_id"]: r["id"] for r in await conn.fetch(INSERT_USERS, *cols)}


async def update_users(conn: asyncpg.Connection, rows: list[tuple[int, int, str, str, str]]) -> None:
    """(local id, gitlab id, login, name, email) rows."""
    if rows:
        await conn.execute(UPDATE_USERS, *[list(c) for c in zip(*rows, strict=True)])


async def add_memberships(conn: asyncpg.Connection, pairs: list[tuple[int, int]], source: str) -> None:
    """(user id, group id) pairs; existing memberships are left as they are."""
    if pairs:
        await conn.execute(ADD_MEMBERSHIPS, [p[0] for p in pairs], [p[1] for p in pairs], source)


async def remove_memberships(conn: asyncpg.Connection, pairs: list[tuple[int, int]]) -> None:
    if pairs:
        await conn.execute(REMOVE_MEMBERSHIPS, [p[0] for p in pairs], [p[1] for p in pairs])


async def revoke_sessions(conn: asyncpg.Connection, user_ids: list[int]) -> list[tuple[str, int]]:
    """Revoke every live session of these users; (session id, user id) of each."""
    if not user_ids:
        return []
    return [(r["id"], r["user_id"]) for r in await conn.fetch(REVOKE_SESSIONS, user_ids)]


async def record_run(conn: asyncpg.Connection | asyncpg.Pool, *, started: float, ok: bool, duration: float,
                     gitlab_calls: int, db_seconds: float, counts: dict[str, int], error: str = "",
                     actor: str = "") -> None:
    await conn.execute(RECORD_RUN, started, ok, duration, gitlab_calls, db_seconds, json.dumps(counts), error,
                       actor)


async def recent_runs(conn: asyncpg.Connection | asyncpg.Pool, limit: int) -> list[Run]:
    """The newest `limit` recorded runs, newest first."""
    rows: Any = await conn.fetch(RECENT_RUNS, limit)
    return [Run(r["started_at"], r["finished_at"], r["finished_epoch"], r["ok"], r["duration"], r["gitlab_calls"],
                r["db_seconds"], json.loads(r["counts"]), r["error"], r["actor"]) for r in rows]


async def last_run(conn: asyncpg.Connection | asyncpg.Pool) -> Run | None:
    runs = await recent_runs(conn, 1)
    return runs[0] if runs else None


async def run_in_progress(conn: asyncpg.Connection | asyncpg.Pool) -> bool:
    """Whether some connection (any replica's) holds the run lock now."""
    return bool(await conn.fetchval(LOCK_HELD, RUN_LOCK_KEY >> 32, RUN_LOCK_KEY & 0xFFFFFFFF))
