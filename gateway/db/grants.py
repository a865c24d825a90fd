"""SQL for the GitLab grants kept per user and their re-check schedule (SPEC §11, migration 0002).

A row's `refresh_token` is already encrypted by the caller; this module never sees a usable token.
Claims are leases: `claim_due` takes due rows with `FOR UPDATE SKIP LOCKED` (so replicas never take the same
row) and stamps them with an owner and an expiry; a claimant that dies simply lets its lease run out.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg

COLUMNS = "user_id, refresh_token, next_sync_at, confirmed_at, failures, last_error, lease_owner, lease_until"

# A sign-in keeps the newest grant: the row is created or replaced, its schedule restarted.
PREVIOUS = "SELECT refresh_token FROM gitlab_grants WHERE user_id = $1 FOR UPDATE"
KEEP = """
INSERT INTO gitlab_grants AS g (user_id, refresh_token, next_sync_at, confirmed_at, failures, last_error)
VALUES ($1, $2, now() + make_interval(secs => $3), now(), 0, '')
ON CONFLICT (user_id) DO UPDATE SET
  refresh_token = EXCLUDED.refresh_token, next_sync_at = EXCLUDED.next_sync_at, confirmed_at = now(),
  failures = 0, last_error = '', lease_owner = NULL, lease_until = NULL, updated_at = now()"""
# Due rows not leased by anyone alive, oldest due first. The partial index gitlab_grants_due serves this.
# Whether the user still has an active session comes back with the claim: no extra round trip per re-check.
CLAIM_DUE = f"""
UPDATE gitlab_grants g SET lease_owner = $1, lease_until = now() + make_interval(secs => $2),
  claimed_at = clock_timestamp()
WHERE g.user_id IN (
  SELECT user_id FROM gitlab_grants
  WHERE next_sync_at <= now() AND (lease_until IS NULL OR lease_until < now())
  ORDER BY next_sync_at LIMIT $3
  FOR UPDATE SKIP LOCKED)
RETURNING {COLUMNS}, EXISTS (SELECT 1 FROM sessions s WHERE s.user_id = g.user_id AND s.revoked_at IS NULL
                             AND s.expires_at > now()) AS has_session"""
# Seconds until the next row falls due (NULL: none is scheduled): the scheduler sleeps exactly that long.
# The same partial index answers it with one entry, whatever the size of the table.
NEXT_DUE = """
SELECT EXTRACT(EPOCH FROM min(next_sync_at) - clock_timestamp())::float8 FROM gitlab_grants
WHERE next_sync_at > now()"""
# One user now (a webhook, the admin call): only when nobody else holds a live lease on it.
CLAIM_ONE = f"""
UPDATE gitlab_grants g SET lease_owner = $2, lease_until = now() + make_interval(secs => $3),
  claimed_at = clock_timestamp()
WHERE g.user_id = (SELECT user_id FROM gitlab_grants WHERE user_id = $1
                   AND (lease_until IS NULL OR lease_until < now()) FOR UPDATE SKIP LOCKED)
RETURNING {COLUMNS}"""
# Inside the transaction that applies a re-check: the row, if our lease still holds it.
HELD = f"SELECT {COLUMNS} FROM gitlab_grants WHERE user_id = $1 AND lease_owner = $2 FOR UPDATE"
BY_USER = f"SELECT {COLUMNS} FROM gitlab_grants WHERE user_id = $1"
# A re-check requested while this one ran (a webhook) keeps its earlier due time; otherwise the next one is due
# `interval` after this one STARTED (claimed_at, just before GitLab was asked): GitLab's answer is never older
# than the interval when the next re-check begins, however long this one took to write.
_NEXT = "CASE WHEN next_sync_at > claimed_at THEN next_sync_at ELSE {base} + make_interval(secs => $2) END"
# With the user's last_sync_at (SPEC §5 rule 8): the sync fields of a re-check in one statement.
SUCCEEDED = f"""
WITH synced AS (UPDATE users SET last_sync_at = now() WHERE id = $1)
UPDATE gitlab_grants SET next_sync_at = {_NEXT.format(base="claimed_at")},
  confirmed_at = now(), failures = 0, last_error = '', lease_owner = NULL, lease_until = NULL, updated_at = now()
WHERE user_id = $1"""
# A transient failure: the next attempt is pushed back from now (the refresh token is saved on its own, ROTATED).
FAILED = f"""
UPDATE gitlab_grants SET next_sync_at = {_NEXT.format(base="now()")},
  failures = failures + 1, last_error = $3, lease_owner = NULL, lease_until = NULL, updated_at = now()
WHERE user_id = $1"""
# GitLab rotated the refresh token: the new one replaces exactly the one presented, in a statement of its own
# right after the refresh (before any other work), so a database failure later in the re-check cannot lose it.
# No row: the grant was replaced meanwhile (a new sign-in), and the rotated token belongs to nobody.
ROTATED = """
UPDATE gitlab_grants SET refresh_token = $3, updated_at = now() WHERE user_id = $1 AND refresh_token = $2"""
# The grant is gone (GitLab refused it, or the user was refused): nothing more to re-check until a sign-in.
DROPPED = """
UPDATE gitlab_grants SET refresh_token = NULL, next_sync_at = NULL, confirmed_at = NULL, last_error = $2,
  lease_owner = NULL, lease_until = NULL, updated_at = now()
WHERE user_id = $1"""
# No active session left: stop re-checking (the grant stays; the next sign-in replaces it).
DORMANT = """
UPDATE gitlab_grants SET next_sync_at = NULL, lease_owner = NULL, lease_until = NULL, updated_at = now()
WHERE user_id = $1"""
RELEASE = "UPDATE gitlab_grants SET lease_owner = NULL, lease_until = NULL WHERE user_id = $1 AND lease_owner = $2"
DUE_IN = """
UPDATE gitlab_grants SET next_sync_at = LEAST(coalesce(next_sync_at, 'infinity'), clock_timestamp()
                                              + make_interval(secs => $2))
WHERE user_id = $1 AND refresh_token IS NOT NULL"""
HAS_ACTIVE_SESSION = """
SELECT EXISTS (SELECT 1 FROM sessions WHERE user_id = $1 AND revoked_at IS NULL AND expires_at > now())"""
LAG = """
SELECT coalesce(EXTRACT(EPOCH FROM now() - min(next_sync_at)), 0)::float8 FROM gitlab_grants
WHERE next_sync_at <= now()"""


@dataclass(frozen=True, slots=True)
class Grant:
    user_id: int
    refresh_token: str | None  # encrypted
    next_sync_at: datetime | None
    confirmed_at: datetime | None
    failures: int
    last_error: str
    lease_owner: str | None
    lease_until: datetime | None
    has_session: bool = True  # only read by a claim: the user still has an active session

    @classmethod
    def from_record(cls, r: asyncpg.Record) -> Grant:
        return cls(r["user_id"], r["refresh_token"], r["next_sync_at"], r["confirmed_at"], r["failures"],
                   r["last_error"], r["lease_owner"], r["lease_until"], r.get("has_session", True))

    @property
    def state(self) -> str:
        """SPEC §11 sync_state: ok, retrying or no_grant."""
        if self.refresh_token is None:
            return "no_grant"
        return "retrying" if self.failures else "ok"


BY_USERS = f"SELECT {COLUMNS} FROM gitlab_grants WHERE user_id = ANY($1::bigint[])"


async def by_users(conn: asyncpg.Connection, user_ids: list[int]) -> dict[int, Grant]:
    return {r["user_id"]: Grant.from_record(r) for r in await conn.fetch(BY_USERS, user_ids)} if user_ids else {}


async def keep(conn: asyncpg.Connection, user_id: int, encrypted: str, *, interval: float) -> str | None:
    """Keep the newest grant of a user; the previous (encrypted) refresh token, to be revoked at GitLab."""
    previous: str | None = await conn.fetchval(PREVIOUS, user_id)
    await conn.execute(KEEP, user_id, encrypted, interval)
    return previous


async def claim_due(conn: asyncpg.Connection, owner: str, *, lease: float, limit: int) -> list[Grant]:
    return [Grant.from_record(r) for r in await conn.fetch(CLAIM_DUE, owner, lease, limit)]


async def claim_one(conn: asyncpg.Connection, user_id: int, owner: str, *, lease: float) -> Grant | None:
    r = await conn.fetchrow(CLAIM_ONE, user_id, owner, lease)
    return Grant.from_record(r) if r else None


async def held(conn: asyncpg.Connection, user_id: int, owner: str) -> Grant | None:
    r = await conn.fetchrow(HELD, user_id, owner)
    return Grant.from_record(r) if r else None


async def by_user(conn: asyncpg.Connection | asyncpg.Pool, user_id: int) -> Grant | None:
    r = await conn.fetchrow(BY_USER, user_id)
    return Grant.from_record(r) if r else None


async def succeeded(conn: asyncpg.Connection, user_id: int, *, interval: float) -> None:
    await conn.execute(SUCCEEDED, user_id, interval)


async def failed(conn: asyncpg.Connection, user_id: int, *, retry_in: float, error: str) -> None:
    await conn.execute(FAILED, user_id, retry_in, error[:500])


async def rotated(conn: asyncpg.Connection | asyncpg.Pool, user_id: int, presented: str, encrypted: str) -> bool:
    """Replace the refresh token `presented` (encrypted) by its successor; False when it was replaced meanwhile."""
    return str(await conn.execute(ROTATED, user_id, presented, encrypted)).endswith(" 1")


async def next_due(conn: asyncpg.Connection) -> float | None:
    """Seconds until the next scheduled re-check of any user (None: none is scheduled)."""
    seconds: float | None = await conn.fetchval(NEXT_DUE)
    return seconds


async def dropped(conn: asyncpg.Connection, user_id: int, reason: str) -> None:
    await conn.execute(DROPPED, user_id, reason[:500])


async def dormant(conn: asyncpg.Connection, user_id: int) -> None:
    await conn.execute(DORMANT, user_id)


async def release(conn: asyncpg.Connection | asyncpg.Pool, user_id: int, owner: str) -> None:
    await conn.execute(RELEASE, user_id, owner)


async def due_in(conn: asyncpg.Connection | asyncpg.Pool, user_id: int, seconds: float = 0.0) -> bool:
    """Make a user's re-check due within `seconds` (sooner if it already is); False when no grant is kept."""
    return str(await conn.execute(DUE_IN, user_id, seconds)).endswith(" 1")


async def has_active_session(conn: asyncpg.Connection, user_id: int) -> bool:
    return bool(await conn.fetchval(HAS_ACTIVE_SESSION, user_id))


async def lag(conn: asyncpg.Connection | asyncpg.Pool) -> float:
    """Seconds the oldest due re-check is overdue (0 when none is)."""
    seconds: float = await conn.fetchval(LAG)
    return seconds
