"""SQL for personal access tokens (SPEC §14) and the single-use nonces of the pages' forms (SPEC §15)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg

COLUMNS = ("t.id, t.name, u.login, t.user_id, t.created_by, t.created_at, t.expires_at, t.last_used_at, "
           "t.revoked_at")
INSERT = """
INSERT INTO tokens (hash, name, user_id, created_by, expires_at)
VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5))
RETURNING id"""
BY_ID = f"SELECT {COLUMNS} FROM tokens t JOIN users u ON u.id = t.user_id WHERE t.id = $1"
# Tokens still usable or not, newest first; of one user when $1 is set.
LIST = f"""
SELECT {COLUMNS} FROM tokens t JOIN users u ON u.id = t.user_id
WHERE ($1::bigint IS NULL OR t.user_id = $1)
  AND ($2::boolean OR (t.revoked_at IS NULL AND t.expires_at > now()))
  AND ($3::bigint IS NULL OR t.id < $3)
ORDER BY t.id DESC LIMIT $4"""
REVOKE = "UPDATE tokens SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL RETURNING id"
# The one query of a token cache miss: the owner's identity, whether or not the token is still usable (the
# caller tells "unknown" from "revoked/expired/deactivated" so that it can forget the right cache entries).
IDENTITY_FOR_TOKEN = """
SELECT t.id AS token_id, t.revoked_at IS NULL AND t.expires_at > now() AS live, u.active,
  EXTRACT(EPOCH FROM t.expires_at)::float8 AS expires_at,
  u.id, u.gitlab_id, u.login, u.email,
  ARRAY(SELECT g.name FROM memberships m JOIN groups g ON g.id = m.group_id
        WHERE m.user_id = u.id ORDER BY g.name COLLATE "C") AS groups
FROM tokens t JOIN users u ON u.id = t.user_id
WHERE t.hash = $1"""
# The same identity for a user found by GitLab id (SPEC §14: GitLab access tokens).
IDENTITY_FOR_GITLAB_ID = """
SELECT u.id, u.gitlab_id, u.login, u.email, u.active,
  ARRAY(SELECT g.name FROM memberships m JOIN groups g ON g.id = m.group_id
        WHERE m.user_id = u.id ORDER BY g.name COLLATE "C") AS groups
FROM users u WHERE u.gitlab_id = $1"""
# last_used_at moves at most once a minute per token, whichever replica saw the use.
TOUCH = """
UPDATE tokens SET last_used_at = now()
WHERE id = ANY($1::bigint[]) AND (last_used_at IS NULL OR last_used_at < now() - interval '1 minute')"""
NEW_ADDRESS = """
INSERT INTO token_addresses (token_id, address) SELECT $1, $2 WHERE EXISTS (SELECT 1 FROM tokens WHERE id = $1)
ON CONFLICT DO NOTHING RETURNING token_id"""
USE_NONCE = "INSERT INTO form_nonces (nonce) VALUES ($1) ON CONFLICT DO NOTHING RETURNING nonce"
FORGET_NONCES = "DELETE FROM form_nonces WHERE used_at < now() - make_interval(secs => $1)"


@dataclass(frozen=True, slots=True)
class Token:
    id: int
    name: str
    login: str
    user_id: int
    created_by: str
    created_at: datetime
    expires_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None

    @classmethod
    def from_record(cls, r: asyncpg.Record) -> Token:
        return cls(r["id"], r["name"], r["login"], r["user_id"], r["created_by"], r["created_at"], r["expires_at"],
                   r["last_used_at"], r["revoked_at"])


async def insert(conn: asyncpg.Connection, *, digest: bytes, name: str, user_id: int, created_by: str,
                 lifetime: float) -> Token:
    token_id: int = await conn.fetchval(INSERT, digest, name, user_id, created_by, lifetime)
    token = await by_id(conn, token_id)
    assert token is not None
    return token


async def by_id(conn: asyncpg.Connection, token_id: int) -> Token | None:
    r = await conn.fetchrow(BY_ID, token_id)
    return Token.from_record(r) if r else None


async def listing(conn: asyncpg.Connection, *, user_id: int | None, include_spent: bool, before_id: int | None,
                  limit: int) -> list[Token]:
    return [Token.from_record(r) for r in await conn.fetch(LIST, user_id, include_spent, before_id, limit)]


async def revoke(conn: asyncpg.Connection, token_id: int) -> bool:
    return await conn.fetchval(REVOKE, token_id) is not None


async def touch(conn: asyncpg.Connection | asyncpg.Pool, token_ids: list[int]) -> None:
    await conn.execute(TOUCH, token_ids)


async def new_address(conn: asyncpg.Connection, token_id: int, address: str) -> bool:
    """Record that a token was used from `address`; True the first time (for any replica)."""
    return await conn.fetchval(NEW_ADDRESS, token_id, address) is not None


async def use_nonce(conn: asyncpg.Connection, nonce: str, *, keep: float) -> bool:
    """Spend a form nonce; False when it was already spent. Nonces older than `keep` seconds are dropped."""
    await conn.execute(FORGET_NONCES, keep)
    return await conn.fetchval(USE_NONCE, nonce) is not None
