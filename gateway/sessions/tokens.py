"""Bearer tokens on the request path (SPEC §14): `Authorization: Bearer gwp_...` is its owner.

Like sessions (store.py), a token costs one indexed query the first time a process sees it and then nothing
until `session.check_interval` has passed or a NOTIFY (`token:<id>`, `user:<id>`, `all`) drops it. Refusals
are remembered too, by hash, in a bounded cache: a client repeating a bad token costs no query after the first
(a malformed one never costs one). Only hashes are kept; the token itself is never stored or logged.

`last_used_at` and "first use from a new address" are collected in memory and written by a background task
(`flush`), never on the request path; a token's `last_used_at` moves at most once a minute.

With `tokens.accept_gitlab_tokens`, any other bearer token is shown once to GitLab (`GET /api/v4/user`) and the
answer, mapped to an existing active user by GitLab id, is cached by the token's hash for `check_interval`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import asyncpg

from gateway.access.assertion import session_hash
from gateway.config import Config
from gateway.db import DB_UNAVAILABLE
from gateway.db import audit as db_audit
from gateway.db import tokens as db_tokens
from gateway.errors import DatabaseUnavailable, Unauthenticated
from gateway.identity import Identity
from gateway.services.tokens import digest, looks_like_ours

if TYPE_CHECKING:
    from gateway.sync.gitlab import GitLabClient

log = logging.getLogger("gateway.tokens")

CACHE_SIZE = 50_000
NEGATIVE_SIZE = 10_000  # refused hashes remembered (oldest forgotten first)
ADDRESSES_SEEN = 100_000  # (token, address) pairs this process already reported
FLUSH_INTERVAL = 5.0
TOUCH_EVERY = 60.0  # SPEC §14: last_used_at at most once a minute per token
MAX_HEADER = 4096  # a longer Authorization header is no token of ours or GitLab's


class BadToken(Unauthenticated):
    """401 JSON whatever the client accepts: a program sent it, and a redirect would not help it."""

    code, title = "invalid_token", "The access token is invalid, expired or revoked"
    advice = "Create a new token on your account page ({prefix}/me) and send it as Authorization: Bearer <token>."
    json_only = True


@dataclass(slots=True)
class _Entry:
    identity: Identity | None  # None: refused
    user_id: int | None  # the owner, when known (a refused token of a deactivated user becomes usable again)
    row_id: int | None  # the tokens row (gwp_ tokens only)
    fetched: float  # monotonic
    expires: float  # wall clock; +inf for GitLab tokens


def bearer(header: str) -> str | None:
    """The credentials of `Bearer <token>` (any case of the scheme), else None."""
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return value.strip() or None


class TokenStore:
    """The per-process token cache, its refusals, and the usage waiting to be written. Owned by SessionStore."""

    def __init__(self, cfg: Config, pool: asyncpg.Pool, gitlab: GitLabClient | None = None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.pool = pool
        self.gitlab = gitlab if cfg.tokens.accept_gitlab_tokens else None
        self.check_interval = cfg.session.check_interval
        self.advice = BadToken.advice.format(prefix=cfg.server.prefix)
        self._clock = clock
        self._cache: OrderedDict[bytes, _Entry] = OrderedDict()
        self._refused: OrderedDict[bytes, None] = OrderedDict()  # unknown hashes: can never become valid
        self._generation = 0
        self.queries = 0  # database look-ups (for tests: the request path's only possible queries)
        self._used: dict[int, float] = {}  # token id -> last use not yet written (monotonic)
        self._touched: dict[int, float] = {}  # token id -> when last_used_at was last written (monotonic)
        self._new_addresses: dict[tuple[int, str], str] = {}  # (token id, address) -> owner login
        self._seen_addresses: OrderedDict[tuple[int, str], None] = OrderedDict()

    def claims(self, header: str) -> str | None:
        """The token this store must judge, or None when the Authorization header is not for the gateway."""
        token = bearer(header)
        if token is None:
            return None
        if token.startswith("gwp_") or self.gitlab is not None:
            return token
        return None

    async def identify(self, token: str, remote: str | None) -> Identity:
        """The owner of a token, or BadToken."""
        ours = looks_like_ours(token)
        if len(token) > MAX_HEADER or (self.gitlab is None and not ours):
            raise self._bad()
        key = digest(token)
        now = self._clock()
        entry = self._cache.get(key)
        if entry is None or now - entry.fetched >= self.check_interval or time.time() >= entry.expires:
            if key in self._refused:
                self._refused.move_to_end(key)
                raise self._bad()
            if ours:
                entry = await self._lookup(key, now)
            else:
                entry = await self._ask_gitlab(key, token, now)
        if entry is None or entry.identity is None:
            raise self._bad()
        if entry.row_id is not None:
            self._note_use(entry.row_id, entry.identity.login, remote or "", now)
        return entry.identity

    def _bad(self) -> BadToken:
        return BadToken(advice=self.advice)

    async def _lookup(self, key: bytes, now: float) -> _Entry | None:
        generation = self._generation
        try:
            self.queries += 1
            row = await self.pool.fetchrow(db_tokens.IDENTITY_FOR_TOKEN, key)
        except DB_UNAVAILABLE as exc:
            raise DatabaseUnavailable(f"token look-up failed: {type(exc).__name__}") from None
        if row is None or not row["live"]:
            # Unknown, revoked or expired: nothing can make it valid again, so never ask again.
            self._refuse(key)
            return None
        identity = None  # a deactivated owner: remembered until the user's NOTIFY (reactivation) or check_interval
        if row["active"]:
            identity = Identity(user_id=row["id"], login=row["login"], email=row["email"],
                                groups=tuple(row["groups"]), gitlab_id=row["gitlab_id"],
                                sid_hash=session_hash(f"token:{row['token_id']}"), via_token=True)
        entry = _Entry(identity, row["id"], row["token_id"], now, row["expires_at"])
        if generation == self._generation:
            self._store(key, entry)
        return entry

    async def _ask_gitlab(self, key: bytes, token: str, now: float) -> _Entry | None:
        assert self.gitlab is not None
        generation = self._generation
        user = await self.gitlab.access_token_user(token)  # GitLab unavailable: 502, and nothing remembered
        if user is None:
            entry = _Entry(None, None, None, now, float("inf"))  # refused by GitLab: remembered for check_interval
            if generation == self._generation:
                self._store(key, entry)
            return entry
        try:
            self.queries += 1
            row = await self.pool.fetchrow(db_tokens.IDENTITY_FOR_GITLAB_ID, user.id)
        except DB_UNAVAILABLE as exc:
            raise DatabaseUnavailable(f"token look-up failed: {type(exc).__name__}") from None
        identity = None
        if row is not None and row["active"]:
            identity = Identity(user_id=row["id"], login=row["login"], email=row["email"],
                                groups=tuple(row["groups"]), gitlab_id=row["gitlab_id"],
                                sid_hash=session_hash(f"gitlab-token:{key.hex()}"), via_token=True)
        entry = _Entry(identity, row["id"] if row else None, None, now, float("inf"))
        if generation == self._generation:
            self._store(key, entry)
        return entry

    def _refuse(self, key: bytes) -> None:
        self._refused[key] = None
        while len(self._refused) > NEGATIVE_SIZE:
            self._refused.popitem(last=False)

    def _store(self, key: bytes, entry: _Entry) -> None:
        self._cache.pop(key, None)
        self._cache[key] = entry
        while len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)

    # ---- invalidation (called by SessionStore.on_notification) --------------------------------------

    def invalidate_token(self, row_id: int) -> None:
        self._generation += 1
        for key in [k for k, e in self._cache.items() if e.row_id == row_id]:
            del self._cache[key]

    def invalidate_user(self, user_id: int) -> None:
        self._generation += 1
        for key in [k for k, e in self._cache.items() if e.user_id == user_id]:
            del self._cache[key]

    def invalidate_all(self) -> None:
        # Unknown hashes stay refused: no change anywhere can make them valid.
        self._generation += 1
        self._cache.clear()

    # ---- usage, written off the request path ----------------------------------------------------------

    def _note_use(self, token_id: int, login: str, address: str, now: float) -> None:
        if now - self._touched.get(token_id, -TOUCH_EVERY) >= TOUCH_EVERY:
            self._used[token_id] = now
        pair = (token_id, address)
        if pair not in self._seen_addresses:
            self._seen_addresses[pair] = None
            if len(self._seen_addresses) > ADDRESSES_SEEN:
                self._seen_addresses.popitem(last=False)
            self._new_addresses[pair] = login

    async def flush(self) -> None:
        """Write what was used since the last flush: last_used_at, and audit events for new addresses."""
        used, self._used = list(self._used.items()), {}
        addresses, self._new_addresses = self._new_addresses, {}
        if not used and not addresses:
            return
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                if used:
                    await db_tokens.touch(conn, [token_id for token_id, _ in used])
                for (token_id, address), login in addresses.items():
                    if await db_tokens.new_address(conn, token_id, address):
                        await db_audit.record(conn, login, "token.used_from_new_address", login,
                                              token_id=token_id, address=address)
        except DB_UNAVAILABLE as exc:
            # Put it back: the next flush tries again.
            log.warning("token usage not written", extra={"error": type(exc).__name__})
            for token_id, at in used:
                self._used.setdefault(token_id, at)
            for pair, login in addresses.items():
                self._new_addresses.setdefault(pair, login)
            return
        for token_id, at in used:
            self._touched[token_id] = at
        if len(self._touched) > CACHE_SIZE:
            self._touched.clear()  # at worst one extra write per token


@contextlib.asynccontextmanager
async def flushing(store: TokenStore, interval: float = FLUSH_INTERVAL) -> AsyncIterator[None]:
    """Run `store.flush` every `interval` seconds, and once more at the end."""

    async def loop() -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await store.flush()
            except Exception:
                log.exception("token usage flush failed")

    task = asyncio.create_task(loop())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        with contextlib.suppress(Exception):
            await asyncio.wait_for(store.flush(), 5)
