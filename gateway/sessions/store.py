"""Sessions (SPEC §6): the encrypted cookie, the server-side row, and the per-process identity cache.

The cookie is aiohttp-session's EncryptedCookieStorage format (Fernet over JSON {"created", "session"}),
written at sign-in through aiohttp-session with a MultiFernet so that every configured secret decrypts and the
first encrypts. Reading is on the hot path of every proxied request, so it is done here without
aiohttp-session: the one cookie is cut straight out of the Cookie header and its decryption remembered per
cookie string; the identity behind the session id comes from a bounded cache that is refreshed at most every
`check_interval` and dropped at once by LISTEN/NOTIFY (see `listen`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import asyncpg
from aiohttp_session.cookie_storage import EncryptedCookieStorage
from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from gateway.access.assertion import session_hash
from gateway.config import Config
from gateway.db import DB_UNAVAILABLE, describe_error, unavailable
from gateway.db import notify as db_notify
from gateway.db import sessions as db_sessions
from gateway.db import users as db_users
from gateway.errors import AccessUnconfirmed
from gateway.identity import ANONYMOUS, Anonymous, Identity, Sender
from gateway.sessions.tokens import TokenStore

log = logging.getLogger("gateway.sessions")

DECODE_MEMO_SIZE = 20_000
# Our cookie is about 200 characters; browsers cap a cookie at 4 KB. Anything longer is not ours: ignored
# without spending a decryption on it.
MAX_COOKIE_VALUE = 4096
CACHE_SIZE = 50_000
# A session id unknown to the database is remembered as "nobody" only briefly: it cannot become valid later
# (ids are random and new at every sign-in), the short time only bounds memory churn under cookie spraying.
NEGATIVE_TTL = 5.0
# The proxy path's one possible query: a hung database turns into a 503 after this, not a queue of requests.
LOOKUP_TIMEOUT = 2.0
# The LISTEN connection is re-opened this fast after a loss (first retry after RECONNECT_FIRST, doubling up
# to RECONNECT_MAX): until it is back, a change committed right after a PostgreSQL restart reaches no cache,
# so SPEC §2's "within a second" depends on it. An attempt against a server that is down costs one refused
# connection.
RECONNECT_FIRST = 0.05
RECONNECT_MAX = 0.4
LISTEN_CONNECT_TIMEOUT = 5.0


def new_session_id() -> str:
    return secrets.token_urlsafe(32)


@dataclass(frozen=True, slots=True)
class CookieRef:
    """What the cookie carries: the session id, the user id and when it was issued (Unix time)."""

    sid: str
    uid: int
    issued: float


@dataclass(slots=True)
class _Entry:
    identity: Identity | None
    fetched: float  # monotonic
    expires: float  # wall clock (Unix time) of the session's end


def cookie_value(header: str | None, name: str) -> str | None:
    """The value of cookie `name` in a Cookie header, without parsing every other cookie."""
    if not header or name not in header:
        return None
    for part in header.split(";"):
        key, sep, value = part.partition("=")
        # RFC 6265 §5.2: spaces around the name are not part of it (found by the hypothesis property).
        if sep and key.strip() == name:
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            return value or None
    return None


class SessionStore:
    """Cookie codec + identity cache of one process. Created once per app in a cleanup_ctx."""

    def __init__(self, cfg: Config, pool: asyncpg.Pool, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.pool = pool
        self.cookie_name = cfg.session.cookie_name
        self.lifetime = cfg.session.lifetime
        self.check_interval = cfg.session.check_interval
        # SPEC §11: how long after GitLab last confirmed a user their requests are still served.
        self.confirmation_ttl = (cfg.provisioning.resync_interval + cfg.provisioning.resync_grace
                                 if cfg.provisioning.resync_interval else None)
        self.fernet = MultiFernet([Fernet(k.encode()) for k in cfg.session.secrets])
        self._clock = clock
        self._decoded: OrderedDict[str, CookieRef] = OrderedDict()
        self._cache: OrderedDict[str, _Entry] = OrderedDict()
        self._by_user: dict[int, set[str]] = {}
        self.queries = 0  # database look-ups made by this store: the proxy path's only possible queries
        # Bumped by every invalidation: a look-up that raced with one must not cache what it read before it.
        self._generation = 0
        self.listening = False
        # When the LISTEN connection was lost (our clock), None while it is up: see `lookup`.
        self._lost_at: float | None = None
        self._storage = self._make_storage()
        # SPEC §14: bearer tokens, when tokens.enabled (set by the app's tokens_ctx); invalidated with sessions.
        self.tokens: TokenStore | None = None

    # ---- cookies ------------------------------------------------------------------------------------

    def storage(self) -> EncryptedCookieStorage:
        """The aiohttp-session storage used by the sign-in handlers to write the cookie."""
        return self._storage

    def _make_storage(self) -> EncryptedCookieStorage:
        storage = EncryptedCookieStorage(
            self.cfg.session.secrets[0],
            cookie_name=self.cookie_name,
            max_age=int(self.lifetime),
            secure=self.cfg.cookie_secure,
            httponly=True,
            samesite=self.cfg.session.samesite,
            path="/",
        )
        # aiohttp-session accepts only a single Fernet; a MultiFernet has the same encrypt/decrypt(ttl=) it
        # calls, and gives key rotation (first key encrypts, all decrypt).
        storage._fernet = self.fernet  # type: ignore[assignment]
        return storage

    def decode(self, value: str) -> CookieRef | None:
        """Decrypt a cookie value (successes memoized); None when tampered, expired, from an unknown key, or
        longer than any cookie we write (SPEC §16)."""
        if len(value) > MAX_COOKIE_VALUE:
            return None
        ref = self._decoded.get(value)
        if ref is not None:
            self._decoded.move_to_end(value)
        else:
            ref = self._decrypt(value)
            if ref is None:
                # Failures are not remembered: anyone can send endless distinct garbage, and the memo would hold
                # each value (up to 4 KB) for good. Only cookies we issued, which are few, are worth keeping.
                return None
            self._decoded[value] = ref
            if len(self._decoded) > DECODE_MEMO_SIZE:
                self._decoded.popitem(last=False)
        if time.time() - ref.issued > self.lifetime:
            return None
        return ref

    def _decrypt(self, value: str) -> CookieRef | None:
        try:
            data = json.loads(self.fernet.decrypt(value.encode(), ttl=int(self.lifetime)))
            inner = data["session"]
            return CookieRef(str(inner["sid"]), int(inner["uid"]), float(data["created"]))
        except (InvalidToken, ValueError, KeyError, TypeError):
            return None

    def request_ref(self, request: Sender) -> CookieRef | None:
        value = cookie_value(request.headers.get("Cookie"), self.cookie_name)
        return self.decode(value) if value else None

    # ---- identity -----------------------------------------------------------------------------------

    async def identify(self, request: Sender) -> Identity | Anonymous:
        """Who sent this request: from the cache when fresh, else one indexed query. A bearer token for the
        gateway (SPEC §14) takes precedence over the cookie; a bad one is BadToken (401 JSON)."""
        if self.tokens is not None and "Authorization" in request.headers:
            token = self.tokens.claims(request.headers["Authorization"])
            if token is not None:
                return await self.tokens.identify(token, request.remote)
        ref = self.request_ref(request)
        if ref is None:
            return ANONYMOUS
        identity = await self.lookup(ref.sid)
        if identity is None or identity.user_id != ref.uid:
            return ANONYMOUS
        if identity.sync_deadline is not None and time.time() > identity.sync_deadline:
            raise AccessUnconfirmed()
        return identity

    async def lookup(self, sid: str) -> Identity | None:
        now = self._clock()
        entry = self._cache.get(sid)
        # Without LISTEN a change may be missed: ask the database (and fall back on the cache only if it is down).
        if entry is not None and self.listening:
            ttl = self.check_interval if entry.identity is not None else min(NEGATIVE_TTL, self.check_interval)
            if now - entry.fetched < ttl and time.time() < entry.expires:
                return entry.identity
        generation = self._generation
        try:
            self.queries += 1
            async with self.pool.acquire(timeout=LOOKUP_TIMEOUT) as conn:
                row = await conn.fetchrow(db_users.IDENTITY_FOR_SESSION, sid, timeout=LOOKUP_TIMEOUT)
        except DB_UNAVAILABLE as exc:
            if entry is not None and entry.identity is not None and self._servable_in_outage(entry, now):
                return entry.identity
            raise unavailable("session look-up", exc) from None
        identity = None if row is None else Identity(
            user_id=row["id"], login=row["login"], email=row["email"], groups=tuple(row["groups"]),
            gitlab_id=row["gitlab_id"], sid_hash=session_hash(sid),
            sync_deadline=self._deadline(row["confirmed_at"]))
        if generation == self._generation:
            self._store(sid, identity, now, row["expires_at"] if row else time.time() + NEGATIVE_TTL)
        return identity

    def _deadline(self, confirmed_at: float | None) -> float | None:
        if self.confirmation_ttl is None or confirmed_at is None:
            return None
        return confirmed_at + self.confirmation_ttl

    def _servable_in_outage(self, entry: _Entry, now: float) -> bool:
        """While PostgreSQL is down, a cached identity stays good for `check_interval` after the last moment
        its invalidation was still heard (the LISTEN connection's loss): no revocation can be committed while
        the database is down, and that much staleness is what SPEC §6 accepts anyway. (While only the LISTEN
        connection is down, look-ups reach the database and this is never used.)"""
        if self._lost_at is None or time.time() >= entry.expires:
            return False
        return now - max(entry.fetched, self._lost_at) < self.check_interval

    @property
    def in_outage(self) -> bool:
        """True from the LISTEN connection's loss until it is back."""
        return self._lost_at is not None

    def listener_lost(self) -> None:
        """The LISTEN connection is gone: keep the caches (see `_servable_in_outage`), note since when."""
        self.listening = False
        if self._lost_at is None:
            self._lost_at = self._clock()

    def listener_up(self) -> None:
        """LISTEN is in effect (again): whatever was cached may have missed a notification; start afresh."""
        self.invalidate_all()
        self._lost_at = None
        self.listening = True

    @property
    def generation(self) -> int:
        """Changes with every invalidation; compare before and after reading something to cache."""
        return self._generation

    def remember(self, sid: str, identity: Identity, expires_at: float, *, generation: int | None = None,
                 confirmed_at: float | None = None) -> None:
        """Prime the cache at sign-in: the first proxied request then needs no query.

        `generation` is `self.generation` from before the identity was read: if an invalidation (a
        deactivation, a membership change) arrived since, the identity may be stale and is not cached.
        """
        if generation is not None and generation != self._generation:
            return
        if confirmed_at is not None:  # GitLab just confirmed the user (SPEC §11): the 503 deadline starts now
            identity = dataclasses.replace(identity, sync_deadline=self._deadline(confirmed_at))
        self._store(sid, identity, self._clock(), expires_at)

    def _store(self, sid: str, identity: Identity | None, fetched: float, expires: float) -> None:
        if identity is not None and not identity.sid_hash:  # primed at sign-in (remember)
            identity = dataclasses.replace(identity, sid_hash=session_hash(sid))
        old = self._cache.pop(sid, None)
        if old is not None and old.identity is not None:
            self._by_user.get(old.identity.user_id, set()).discard(sid)
        self._cache[sid] = _Entry(identity, fetched, expires)
        if identity is not None:
            self._by_user.setdefault(identity.user_id, set()).add(sid)
        while len(self._cache) > CACHE_SIZE:
            evicted_sid, evicted = self._cache.popitem(last=False)
            if evicted.identity is not None:
                self._by_user.get(evicted.identity.user_id, set()).discard(evicted_sid)

    # ---- invalidation -------------------------------------------------------------------------------

    def invalidate_session(self, sid: str) -> None:
        self._generation += 1
        entry = self._cache.pop(sid, None)
        if entry is not None and entry.identity is not None:
            self._by_user.get(entry.identity.user_id, set()).discard(sid)

    def invalidate_user(self, user_id: int) -> None:
        self._generation += 1
        if self.tokens is not None:
            self.tokens.invalidate_user(user_id)
        for sid in self._by_user.pop(user_id, set()):
            self._cache.pop(sid, None)

    def invalidate_all(self) -> None:
        self._generation += 1
        if self.tokens is not None:
            self.tokens.invalidate_all()
        self._cache.clear()
        self._by_user.clear()

    def on_notification(self, payload: str) -> None:
        kind, _, key = payload.partition(":")
        if kind == "session":
            self.invalidate_session(key)
        elif kind == "user" and key.isascii() and key.isdigit():
            self.invalidate_user(int(key))
        elif kind == "token" and key.isdigit():
            if self.tokens is not None:
                self.tokens.invalidate_token(int(key))
        else:  # "all", or a group whose members changed: cheap enough to start afresh
            self.invalidate_all()

    # ---- server-side rows ---------------------------------------------------------------------------


    async def revoke(self, sid: str) -> int | None:
        """Revoke one session everywhere; the owner's id, or None when it was not active."""
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                uid = await db_sessions.revoke(conn, sid)
                await db_notify.notify(conn, "session", sid)
        except DB_UNAVAILABLE as exc:
            raise unavailable("session revocation", exc) from None
        self.invalidate_session(sid)
        return uid


async def listen(store: SessionStore, dsn: str, *, stop: asyncio.Event) -> None:
    """Keep a LISTEN connection open; on loss, retry fast, and start the caches afresh once it is back (we
    may have missed a NOTIFY meanwhile)."""
    delay = RECONNECT_FIRST
    while not stop.is_set():
        conn: asyncpg.Connection | None = None
        error = "stopped"
        try:
            conn = await asyncpg.connect(dsn, timeout=LISTEN_CONNECT_TIMEOUT)
            lost = asyncio.Event()
            conn.add_termination_listener(lambda _c, lost=lost: lost.set())
            await conn.add_listener(db_notify.CHANNEL, lambda _c, _pid, _ch, payload: store.on_notification(payload))
            if store.in_outage:
                log.warning("notification listener back: session caches dropped")
            store.listener_up()
            delay = RECONNECT_FIRST
            stopped = asyncio.ensure_future(stop.wait())
            died = asyncio.ensure_future(lost.wait())
            await asyncio.wait({stopped, died}, return_when=asyncio.FIRST_COMPLETED)
            for t in (stopped, died):
                t.cancel()
        except DB_UNAVAILABLE as exc:
            error = describe_error(exc)
        else:
            error = "connection closed"
        finally:
            if not store.in_outage and not stop.is_set():  # one line per outage, not one per retry
                log.warning("notification listener lost; retrying", extra={"error": error})
            store.listener_lost()
            if conn is not None and not conn.is_closed():
                with contextlib.suppress(Exception):
                    await conn.close(timeout=2)
        if not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            delay = min(delay * 2, RECONNECT_MAX)


@contextlib.asynccontextmanager
async def running_listener(store: SessionStore, dsn: str) -> AsyncIterator[None]:
    stop = asyncio.Event()
    task = asyncio.create_task(listen(store, dsn, stop=stop))
    # Wait briefly for LISTEN so that a process is not serving from a cache nobody can invalidate.
    for _ in range(100):
        if store.listening or task.done():
            break
        await asyncio.sleep(0.02)
    try:
        yield
    finally:
        stop.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 5)
