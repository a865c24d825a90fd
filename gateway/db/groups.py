"""SQL for local groups."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

COLUMNS = """g.id, g.name, g.description, g.builtin, g.gitlab_group_id, g.created_at,
  (SELECT count(*) FROM memberships m WHERE m.group_id = g.id) AS member_count"""
# What sign-ins and re-checks read (by_names, default_group, by_gitlab_ids): no member count, which costs
# O(members) per group, and the default group holds every user (member_count reads 0 there).
LEAN_COLUMNS = "g.id, g.name, g.description, g.builtin, g.gitlab_group_id, g.created_at"
BY_NAMES = f"SELECT {LEAN_COLUMNS} FROM groups g WHERE g.name = ANY($1::text[]) ORDER BY g.id"
ALL_NAMES = "SELECT name FROM groups ORDER BY name"
BY_ID = f"SELECT {COLUMNS} FROM groups g WHERE g.id = $1"
BY_NAME = f"SELECT {COLUMNS} FROM groups g WHERE g.name = $1"
DEFAULT = f"SELECT {LEAN_COLUMNS} FROM groups g WHERE g.builtin ORDER BY g.id LIMIT 1"
LIST = f"SELECT {COLUMNS} FROM groups g WHERE ($1::bigint IS NULL OR g.id > $1) ORDER BY g.id LIMIT $2"
# Rule 7: bind only while unbound, so two sign-ins racing to bind the same group cannot both win.
BIND = """
UPDATE groups SET gitlab_group_id = $2
WHERE id = $1 AND gitlab_group_id IS NULL
  AND NOT EXISTS (SELECT 1 FROM groups other WHERE other.gitlab_group_id = $2)
RETURNING id"""
LOCK_FOR_BINDING = "SELECT id FROM groups WHERE id = ANY($1::bigint[]) ORDER BY id FOR UPDATE"
RENAME_DEFAULT = "UPDATE groups SET name = $1 WHERE builtin AND name <> $1"
INSERT = f"""
WITH g AS (INSERT INTO groups (name, description, gitlab_group_id) VALUES ($1, $2, $3) RETURNING *)
SELECT {COLUMNS} FROM g"""
UPDATE = f"""
WITH g AS (UPDATE groups SET name = coalesce($2, name), description = coalesce($3, description)
           WHERE id = $1 RETURNING *)
SELECT {COLUMNS} FROM g"""
DELETE = "DELETE FROM groups WHERE id = $1 AND NOT builtin RETURNING id"
MEMBERS = """
SELECT u.login, u.name, u.email, u.active, m.source, m.added_at
FROM memberships m JOIN users u ON u.id = m.user_id
WHERE m.group_id = $1 AND ($2::text IS NULL OR lower(u.login) > lower($2))
ORDER BY lower(u.login) LIMIT $3"""
MEMBER_IDS = "SELECT user_id FROM memberships WHERE group_id = $1"
MEMBER_LOGINS = """
SELECT u.login FROM memberships m JOIN users u ON u.id = m.user_id
WHERE m.group_id = $1 ORDER BY lower(u.login)"""
MEMBER = """
SELECT u.login, u.name, u.email, u.active, m.source, m.added_at
FROM memberships m JOIN users u ON u.id = m.user_id
WHERE m.group_id = $1 AND m.user_id = $2"""
BY_ID_FOR_UPDATE = "SELECT id FROM groups WHERE id = $1 FOR UPDATE"


@dataclass(frozen=True, slots=True)
class Group:
    id: int
    name: str
    description: str
    builtin: bool
    gitlab_group_id: int | None
    created_at: datetime
    member_count: int

    @classmethod
    def from_record(cls, r: asyncpg.Record) -> Group:
        return cls(r["id"], r["name"], r["description"], r["builtin"], r["gitlab_group_id"], r["created_at"],
                   r.get("member_count", 0))


async def _one(conn: asyncpg.Connection, sql: str, *args: Any) -> Group | None:
    r = await conn.fetchrow(sql, *args)
    return Group.from_record(r) if r else None


async def by_names(conn: asyncpg.Connection, names: list[str]) -> list[Group]:
    return [Group.from_record(r) for r in await conn.fetch(BY_NAMES, names)]


async def all_names(conn: asyncpg.Connection) -> list[str]:
    return [r["name"] for r in await conn.fetch(ALL_NAMES)]


async def by_id(conn: asyncpg.Connection, group_id: int) -> Group | None:
    return await _one(conn, BY_ID, group_id)


async def by_name(conn: asyncpg.Connection, name: str) -> Group | None:
    return await _one(conn, BY_NAME, name)


async def default_group(conn: asyncpg.Connection) -> Group:
    g = await _one(conn, DEFAULT)
    assert g is not None, "migration 0001 creates the builtin group"
    return g


async def lock_for_binding(conn: asyncpg.Connection, group_ids: list[int]) -> None:
    """Lock groups about to be bound, in id order: concurrent sign-ins then cannot deadlock."""
    if group_ids:
        await conn.execute(LOCK_FOR_BINDING, group_ids)


async def bind(conn: asyncpg.Connection, group_id: int, gitlab_group_id: int) -> bool:
    return await conn.fetchval(BIND, group_id, gitlab_group_id) is not None


async def rename_default(conn: asyncpg.Connection, name: str) -> None:
    await conn.execute(RENAME_DEFAULT, name)


async def listing(conn: asyncpg.Connection, *, after: int | None, limit: int) -> list[Group]:
    return [Group.from_record(r) for r in await conn.fetch(LIST, after, limit)]


async def insert(conn: asyncpg.Connection, name: str, description: str, gitlab_group_id: int | None = None) -> Group:
    r = await conn.fetchrow(INSERT, name, description, gitlab_group_id)
    assert r is not None
    return Group.from_record(r)


async def update(conn: asyncpg.Connection, group_id: int, *, name: str | None, description: str | None
                 ) -> Group | None:
    return await _one(conn, UPDATE, group_id, name, description)


async def delete(conn: asyncpg.Connection, group_id: int) -> bool:
    return await conn.fetchval(DELETE, group_id) is not None


async def members(conn: asyncpg.Connection, group_id: int, *, after: str | None, limit: int
                  ) -> list[asyncpg.Record]:
    return list(await conn.fetch(MEMBERS, group_id, after, limit))


async def member_ids(conn: asyncpg.Connection, group_id: int) -> list[int]:
    return [r["user_id"] for r in await conn.fetch(MEMBER_IDS, group_id)]


async def member_logins(conn: asyncpg.Connection, group_id: int) -> list[str]:
    """Logins of every member, sorted case-insensitively (for audit details)."""
    return [r["login"] for r in await conn.fetch(MEMBER_LOGINS, group_id)]


async def lock(conn: asyncpg.Connection, group_id: int) -> bool:
    """Lock one group row until the end of the transaction; False when it does not exist."""
    return await conn.fetchval(BY_ID_FOR_UPDATE, group_id) is not None


async def member(conn: asyncpg.Connection, group_id: int, user_id: int) -> asyncpg.Record | None:
    """One membership with its user's login, name, email and active flag (the shape of `members`)."""
    return await conn.fetchrow(MEMBER, group_id, user_id)


# ---- SPEC §11: bound groups follow renames; case mismatches are reported once --------------------------------

BY_GITLAB_IDS = f"SELECT {LEAN_COLUMNS} FROM groups g WHERE g.gitlab_group_id = ANY($1::bigint[]) ORDER BY g.id"
RENAME = "UPDATE groups SET name = $2 WHERE id = $1 AND NOT builtin RETURNING id"
# Local groups whose name equals one of the paths except for case (the paths are given lower-cased).
CASE_MISMATCHES = """
SELECT g.id, g.name FROM groups g
WHERE lower(g.name) = ANY($1::text[]) AND NOT (g.name = ANY($2::text[])) ORDER BY g.id"""
REMEMBER_CASE_MISMATCH = """
INSERT INTO group_case_mismatches (group_id, gitlab_path) VALUES ($1, $2)
ON CONFLICT DO NOTHING RETURNING group_id"""


async def by_gitlab_ids(conn: asyncpg.Connection, gitlab_group_ids: list[int]) -> list[Group]:
    return [Group.from_record(r) for r in await conn.fetch(BY_GITLAB_IDS, gitlab_group_ids)]


async def by_gitlab_id(conn: asyncpg.Connection, gitlab_group_id: int) -> Group | None:
    found = await by_gitlab_ids(conn, [gitlab_group_id])
    return found[0] if found else None


async def rename(conn: asyncpg.Connection, group_id: int, name: str) -> bool:
    """Rename a (non-builtin) group; UniqueViolationError when the name is taken."""
    return await conn.fetchval(RENAME, group_id, name) is not None


async def case_mismatches(conn: asyncpg.Connection, paths: list[str]) -> list[tuple[int, str]]:
    rows = await conn.fetch(CASE_MISMATCHES, [p.lower() for p in paths], paths)
    return [(r["id"], r["name"]) for r in rows]


async def remember_case_mismatch(conn: asyncpg.Connection, group_id: int, gitlab_path: str) -> bool:
    """True the first time this (group, GitLab path) pair is seen."""
    return await conn.fetchval(REMEMBER_CASE_MISMATCH, group_id, gitlab_path) is not None
