"""Personal access tokens (SPEC §14): create (shown once), list, revoke. Used by {prefix}/api/tokens, the pages,
the admin API and `gateway tokens ...`.

A token is `gwp_` + 40 random base62 characters (about 238 bits); only its SHA-256 is stored, so a leaked
database does not leak usable tokens, and a plain hash is enough (no salt, no slow hash) because the secret is
random, not a password. Revoking NOTIFYs `token:<id>` in the same transaction: every process forgets it at
commit.
"""

from __future__ import annotations

import hashlib
import math
import re
import secrets
import string
from dataclasses import dataclass

import asyncpg

from gateway.db import audit as db_audit
from gateway.db import notify as db_notify
from gateway.db import tokens as db_tokens
from gateway.db import users as db_users
from gateway.db.tokens import Token
from gateway.errors import NotFound, Unprocessable
from gateway.services import accounts, paging
from gateway.services._db import transaction

PREFIX = "gwp_"
RANDOM_CHARS = 40
ALPHABET = string.digits + string.ascii_letters
MAX_NAME = 100
DAY = 86400.0
# On every request with a token: one compiled match (a per-character loop cost ~10 us).
_SHAPE = re.compile(f"{PREFIX}[0-9A-Za-z]{{{RANDOM_CHARS}}}")


@dataclass(frozen=True, slots=True)
class NewToken:
    """A token just created: `secret` is shown to its creator once and never again."""

    token: Token
    secret: str


def generate() -> str:
    return PREFIX + "".join(secrets.choice(ALPHABET) for _ in range(RANDOM_CHARS))


def digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).digest()


def looks_like_ours(text: str) -> bool:
    """The exact shape of a gwp_ token: anything else is refused without a database query."""
    return _SHAPE.fullmatch(text) is not None


def check_name(name: str) -> str:
    if not name.strip() or len(name) > MAX_NAME or accounts.CONTROL_CHARS.search(name):
        raise Unprocessable(f"A token's name must be 1 to {MAX_NAME} printable characters (say what uses it)")
    return name


def check_days(days: int | None, max_lifetime: float) -> float:
    """The lifetime in seconds: `days` (default and at most tokens.max_lifetime)."""
    most = max(1, math.floor(max_lifetime / DAY))
    if days is None:
        return max_lifetime
    if not 1 <= days <= most:
        raise Unprocessable(f"expires_in_days must be from 1 to {most} (tokens.max_lifetime)")
    return days * DAY


async def create_token(pool: asyncpg.Pool, *, login: str, name: str, days: int | None, max_lifetime: float,
                       actor: str) -> NewToken:
    """A new token for an active user; the secret is in the answer only."""
    check_name(name)
    lifetime = check_days(days, max_lifetime)
    secret = generate()
    async with transaction(pool) as conn:
        user = await db_users.by_login(conn, login)
        if user is None:
            raise NotFound(f"No user with login {login}")
        if not user.active:
            raise Unprocessable(f"{user.login} is deactivated: a token of theirs would be refused")
        token = await db_tokens.insert(conn, digest=digest(secret), name=name, user_id=user.id, created_by=actor,
                                       lifetime=lifetime)
        await db_audit.record(conn, actor, "token.created", user.login, token_id=token.id, name=name,
                              login=user.login, expires_at=token.expires_at)
    return NewToken(token, secret)


async def list_tokens(pool: asyncpg.Pool, *, login: str | None = None, include_spent: bool = False,
                      cursor: str | None = None, limit: int | None = None) -> paging.Page[Token]:
    """Tokens newest first (only usable ones unless `include_spent`); of one user when `login` is given."""
    n = paging.check_limit(limit)
    key = paging.decode("tokens", cursor)
    async with transaction(pool) as conn:
        user_id = await accounts.user_id(conn, login)
        rows = await db_tokens.listing(conn, user_id=user_id, include_spent=include_spent,
                                       before_id=int(key[0]) if key else None, limit=n + 1)
    return paging.page(rows, n, lambda t: paging.encode("tokens", t.id))


async def revoke_token(pool: asyncpg.Pool, token_id: int, *, actor: str, owner_id: int | None = None) -> Token:
    """Revoke a token everywhere. With `owner_id`, only that user's (self-service: others' are NotFound)."""
    async with transaction(pool) as conn:
        found = await db_tokens.by_id(conn, token_id)
        if found is None or (owner_id is not None and found.user_id != owner_id) \
                or not await db_tokens.revoke(conn, token_id):
            raise NotFound(f"No usable token with id {token_id}")
        await db_notify.notify(conn, "token", token_id)
        await db_audit.record(conn, actor, "token.revoked", found.login, token_id=found.id, name=found.name,
                              login=found.login)
        revoked = await db_tokens.by_id(conn, token_id)
    assert revoked is not None
    return revoked
