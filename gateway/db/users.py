"""SQL for users and their memberships (the user aggregate)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

SELECT_COLUMNS = ("id, gitlab_id, login, name, email, active, provisioned_by, created_at, last_login_at, "
                  "last_sync_at")
BY_GITLAB_ID = f"SELECT {SELECT_COLUMNS} FROM users WHERE gitlab_id = $1 FOR UPDATE"
BY_LOGIN = f"SELECT {SELECT_COLUMNS} FROM users WHERE lower(login) = lower($1)"
BY_LOGIN_FOR_UPDATE = BY_LOGIN + " FOR UPDATE"
BY_ID = f"SELECT {SELECT_COLUMNS} FROM users WHERE id = $1"
INSERT = f"""
INSERT INTO users (gitlab_id, login, name, email, provisioned_by)
VALUES ($1, $2, $3, $4, $5)
RETURNING {SELECT_COLUMNS}"""
REFRESH_PROFILE = f"""
UPDATE users SET gitlab_id = $2, login = $3, name = $4, email = $5
WHERE id = $1
RETURNING {SELECT_COLUMNS}"""
MARK_SIGNED_IN = f"""
UPDATE users SET last_login_at = now(), last_sync_at = CASE WHEN $2 THEN now() ELSE last_sync_at END
WHERE id = $1
RETURNING {SELECT_COLUMNS}"""
SET_ACTIVE = f"UPDATE users SET active = $2 WHERE lower(login) = lower($1) RETURNING {SELECT_COLUMNS}"
LIST = f"""
SELECT {SELECT_COLUMNS} FROM users
WHERE ($1::text IS NULL OR login ILIKE '%' || $1 || '%' OR name ILIKE '%' || $1 || '%'
       OR email ILIKE '%' || $1 || '%')
  AND ($2::boolean IS NULL OR active = $2)
  AND ($3::text IS NULL OR lower(login) > lower($3))
ORDER BY lower(login)
LIMIT $4"""

MEMBERSHIPS = """
SELECT g.id AS group_id, g.name, g.builtin, g.gitlab_group_id, m.source, m.added_at
FROM memberships m JOIN groups g ON g.id = m.group_id
WHERE m.user_id = $1
ORDER BY g.id"""
ADD_MEMBERSHIP = """
INSERT INTO memberships (user_id, group_id, source) VALUES ($1, $2, $3)
ON CONFLICT (user_id, group_id) DO NOTHING
RETURNING group_id"""
REMOVE_MEMBERSHIPS = "DELETE FROM memberships WHERE user_id = $1 AND group_id = ANY($2::bigint[])"
BY_GITLAB_ID_PLAIN = f"SELECT {SELECT_COLUMNS} FROM users WHERE gitlab_id = $1"
MEMBERSHIP_SOURCE = "SELECT source FROM memberships WHERE user_id = $1 AND group_id = $2"
REMOVE_MEMBERSHIP = "DELETE FROM memberships WHERE user_id = $1 AND group_id = $2 RETURNING source"
# Group names and sources of several users at once (a page of the admin user list), names in byte order.
GROUPS_OF_USERS = """
SELECT m.user_id, g.name, m.source
FROM memberships m JOIN groups g ON g.id = m.group_id
WHERE m.user_id = ANY($1::bigint[])
ORDER BY m.user_id, g.name COLLATE "C"
"""

# The identity the proxy needs for one session, in one indexed query (the only query of a cache miss).
IDENTITY_FOR_SESSION = """
UPDATE sessions s SET last_seen_at = now()
FROM users u
WHERE s.id = $1 AND u.id = s.user_id AND s.revoked_at IS NULL AND s.expires_at > now() AND u.active
RETURNING u.id, u.gitlab_id, u.login, u.email, EXTRACT(EPOCH FROM s.expires_at)::float8 AS expires_at,
  (SELECT EXTRACT(EPOCH FROM gg.confirmed_at)::float8 FROM gitlab_grants gg
   WHERE gg.user_id = u.id AND gg.refresh_token IS NOT NULL) AS confirmed_at,
  ARRAY(SELECT g.name FROM memberships m JOIN groups g ON g.id = m.group_id
        WHERE m.user_id = u.id ORDER BY g.name COLLATE "C") AS groups"""


@dataclass(frozen=True, slots=True)
class User:
    id: int
    gitlab_id: int | None
    login: str
    name: str
    email: str
    active: bool
    provisioned_by: str
    created_at: datetime
    last_login_at: datetime | None
    last_sync_at: datetime | None

    @classmethod
    def from_record(cls, r: asyncpg.Record) -> User:
        return cls(r["id"], r["gitlab_id"], r["login"], r["name"], r["email"], r["active"], r["provisioned_by"],
                   r["created_at"], r["last_login_at"], r["last_sync_at"])


@dataclass(frozen=True, slots=True)
class Membership:
    group_id: int
    name: str
    builtin: bool
    gitlab_group_id: int | None
    source: str
    added_at: datetime

    @classmethod
    def from_record(cls, r: asyncpg.Record) -> Membership:
        return cls(r["group_id"], r["name"], r["builtin"], r["gitlab_group_id"], r["source"], r["added_at"])


async def _one(conn: asyncpg.Connection, sql: str, *args: Any) -> User | None:
    r = await conn.fetchrow(sql, *args)
    return User.from_record(r) if r else None


async def by_gitlab_id_for_update(conn: asyncpg.Connection, gitlab_id: int) -> User | None:
    return await _one(conn, BY_GITLAB_ID, gitlab_id)


async def by_login(conn: asyncpg.Connection, login: str, *, for_update: bool = False) -> User | None:
    return await _one(conn, BY_LOGIN_FOR_UPDATE if for_update else BY_LOGIN, login)


async def by_id(conn: asyncpg.Connection, user_id: int) -> User | None:
    return await _one(conn, BY_ID, user_id)


async def insert(conn: asyncpg.Connection, *, gitlab_id: int | None, login: str, name: str, email: str,
                 provisioned_by: str) -> User:
    r = await conn.fetchrow(INSERT, gitlab_id, login, name, email, provisioned_by)
    assert r is not None
    return User.from_record(r)


async def refresh_profile(conn: asyncpg.Connection, user_id: int, *, gitlab_id: int, login: str, name: str,
                          email: str) -> User:
    r = await conn.fetchrow(REFRESH_PROFILE, user_id, gitlab_id, login, name, email)
    assert r is not None
    return User.from_record(r)


async def mark_signed_in(conn: asyncpg.Connection, user_id: int, *, synced: bool) -> User:
    r = await conn.fetchrow(MARK_SIGNED_IN, user_id, synced)
    assert r is not None
    return User.from_record(r)


async def set_active(conn: asyncpg.Connection, login: str, active: bool) -> User | None:
    return await _one(conn, SET_ACTIVE, login, active)


async def search(conn: asyncpg.Connection, *, q: str | None, active: bool | None, after: str | None,
                 limit: int) -> list[User]:
    return [User.from_record(r) for r in await conn.fetch(LIST, q, active, after, limit)]


async def memberships(conn: asyncpg.Connection, user_id: int) -> list[Membership]:
    return [Membership.from_record(r) for r in await conn.fetch(MEMBERSHIPS, user_id)]


async def add_membership(conn: asyncpg.Connection, user_id: int, group_id: int, source: str) -> bool:
    """True when the membership was created (False: it existed)."""
    return await conn.fetchval(ADD_MEMBERSHIP, user_id, group_id, source) is not None


async def remove_memberships(conn: asyncpg.Connection, user_id: int, group_ids: list[int]) -> None:
    if group_ids:
        await conn.execute(REMOVE_MEMBERSHIPS, user_id, group_ids)


async def by_gitlab_id(conn: asyncpg.Connection, gitlab_id: int) -> User | None:
    """The user linked to a GitLab id, without locking it."""
    return await _one(conn, BY_GITLAB_ID_PLAIN, gitlab_id)


async def membership_source(conn: asyncpg.Connection, user_id: int, group_id: int) -> str | None:
    """The source of one membership (sync, manual, default), or None when there is none."""
    source: str | None = await conn.fetchval(MEMBERSHIP_SOURCE, user_id, group_id)
    return source


async def remove_membership(conn: asyncpg.Connection, user_id: int, group_id: int) -> str | None:
    """Delete one membership; its source, or None when there was none."""
    source: str | None = await conn.fetchval(REMOVE_MEMBERSHIP, user_id, group_id)
    return source


async def groups_of(conn: asyncpg.Connection, user_ids: list[int]) -> dict[int, list[tuple[str, str]]]:
    """user id -> [(group name, source)] sorted by name, for every given id (empty list when none)."""
    out: dict[int, list[tuple[str, str]]] = {uid: [] for uid in user_ids}
    if user_ids:
        for r in await conn.fetch(GROUPS_OF_USERS, user_ids):
            out[r["user_id"]].append((r["name"], r["source"]))
    return out
