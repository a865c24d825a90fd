"""Continuous synchronization (SPEC §11): re-check users with GitLab while their sessions live.

Every process runs one `Resyncer.run` loop. Due users are claimed in PostgreSQL with a lease
(db/grants.py: `FOR UPDATE SKIP LOCKED`, an owner and an expiry), so N replicas re-check each user once and a
refresh token is only ever presented by the one claimant; a claimant that dies lets its lease run out and
another process picks the user up. A user is claimed only when one of the process's CONCURRENCY slots is free,
and the next re-check is due `resync_interval` after the previous one began; the loop sleeps until exactly then.
GitLab is called with no database connection held. GitLab rotates the refresh token at each refresh: the new
one is saved at once, in a statement of its own; the rules are then applied in ONE transaction that first
checks the lease still holds.

Outcomes: GitLab refuses the grant, the account is no longer active, or the user left the allowed groups ->
every session revoked everywhere (NOTIFY), audited `session.revoked` with the reason, the grant dropped
(sync_state no_grant); the user row is not deactivated. Transient GitLab trouble (unreachable, 5xx, timeout,
429) -> nothing changes but the schedule: exponential backoff honouring Retry-After. Requests of a user whom
GitLab has not confirmed for resync_interval + resync_grace get a 503 (sessions/store.py decides that from the
cached identity; the proxied path never waits for a re-check).

The database failing during a re-check: nothing is half-applied, and the re-check is remembered in memory
(`Unsettled`) with GitLab's rotated token if it could not be saved; once the database answers, the loop's next
turn saves that token and ends the lease, and the user is re-checked soon with the newest token. (Only a
process that dies holding an unsaved token loses it: the next attempt gets invalid_grant, as when the user
revokes the application.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import secrets
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Final

import asyncpg
from aiohttp import web
from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from gateway import keys
from gateway.config import Config
from gateway.db import DB_UNAVAILABLE
from gateway.db import audit as db_audit
from gateway.db import grants as db_grants
from gateway.db import notify as db_notify
from gateway.db import sessions as db_sessions
from gateway.db import users as db_users
from gateway.errors import Conflict, DatabaseUnavailable, GitLabUnavailable, NotFound, SignInRefused
from gateway.metrics import Metrics
from gateway.sync import provisioning
from gateway.sync.gitlab import GitLabClient, GrantRefused, SignInData

log = logging.getLogger("gateway.resync")

ACTOR: Final = "gitlab-resync"
CONCURRENCY: Final = 8  # re-checks in flight per process (each claimed only when a slot is free)
COALESCE: Final = 3.0  # seconds: at most one webhook-triggered re-check per user in this window
_COALESCE_MEMORY: Final = 10_000


def fernet_of(cfg: Config) -> MultiFernet:
    """session.secrets as a MultiFernet: the first key encrypts, every key decrypts."""
    return MultiFernet([Fernet(k.encode()) for k in cfg.session.secrets])


def seal(fernet: MultiFernet, token: str | None) -> str:
    """Encrypt a refresh token for the database."""
    assert token
    return fernet.encrypt(token.encode()).decode("ascii")


def unseal(fernet: MultiFernet, sealed: str | None) -> str | None:
    """The refresh token, or None when none is kept or no configured key opens it any more."""
    if not sealed:
        return None
    try:
        return fernet.decrypt(sealed.encode("ascii")).decode()
    except (InvalidToken, ValueError):
        return None


async def revoke_sealed(gitlab: GitLabClient, fernet: MultiFernet, sealed: str | None) -> None:
    """Revoke a kept grant at GitLab (best effort: GitLab.revoke never raises)."""
    token = unseal(fernet, sealed)
    if token is not None:
        await gitlab.revoke(token)


def backoff(failures: int, interval: float, retry_after: float | None) -> float:
    """Seconds before the next attempt after `failures` consecutive transient failures."""
    base, cap = min(5.0, interval / 4), min(interval, 300.0)
    delay = min(cap, base * 2.0 ** max(failures - 1, 0)) * random.uniform(0.8, 1.0)  # noqa: S311 (jitter)
    return float(max(delay, retry_after or 0.0))


@dataclass(slots=True)
class Unsettled:
    """A re-check the database failed under: its lease, the (encrypted) refresh token it presented to GitLab
    and, when GitLab rotated it before the token could be saved, the newest one (else None)."""

    owner: str
    presented: str | None
    newest: str | None = field(default=None, repr=False)
    error: str = "the database was unavailable"


@dataclass(frozen=True, slots=True)
class Outcome:
    """One re-check: result is changed, unchanged, revoked, failed, dormant, lost or no_grant."""

    result: str
    error: str = ""


class Resyncer:
    """The re-check of one process: the scheduler loop, webhook requests and the admin call share it."""

    def __init__(self, cfg: Config, pool: asyncpg.Pool, gitlab: GitLabClient, metrics: Metrics) -> None:
        self.cfg = cfg
        self.pool = pool
        self.gitlab = gitlab
        self.metrics = metrics
        self.fernet = fernet_of(cfg)
        self.interval = cfg.provisioning.resync_interval
        # Long enough for a refresh plus two API calls at gitlab.timeout each; a dead claimant's lease ends.
        self.lease = 4 * cfg.gitlab.timeout + 30
        self.poll = min(1.0, max(self.interval / 4, 0.05))
        self._owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._wake = asyncio.Event()
        self._paused_until = 0.0  # monotonic: GitLab's 429 Retry-After holds the whole scheduler
        # monotonic: the soonest next due time a re-check of this process has just written, and until when the
        # loop is asleep; a sooner one wakes it (no look-up needed to meet it to the poll's granularity)
        self._soonest = float("inf")
        self._asleep_until = float("inf")
        self._requested: dict[int, float] = {}
        self._deferred: set[int] = set()
        # Re-checks the database failed under, by user id, until `settle` writes them (memory only: GitLab's
        # rotated refresh token must survive a database blip, or the next attempt would sign the user out).
        self._unsettled: dict[int, Unsettled] = {}

    def _lease_owner(self) -> str:
        # One per re-check: two re-checks of this process never mistake each other's lease for their own.
        return f"{self._owner}:{secrets.token_hex(4)}"

    # ---- the scheduler ---------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event, *, claim: bool = True) -> None:
        """Claim and re-check due users until `stop` is set (claim=False: only settle interrupted re-checks,
        for the admin listener, whose calls re-check one user at a time).

        At most CONCURRENCY re-checks run at once, and a user is claimed only when a slot is free for them (a
        claim never sits waiting behind a slow GitLab call while its lease runs down). With nothing to claim,
        the loop sleeps until the next due time (one indexed look-up), a slot frees, a webhook wakes it, or
        `poll` passes (what other replicas scheduled meanwhile). Each re-check is its own task: its awaits
        hand the event loop back, so proxied requests are served between a re-check's steps.
        """
        running: set[asyncio.Task[Outcome]] = set()
        while not stop.is_set():
            wait = self.poll
            paused = self._paused_until - time.monotonic()
            if paused > 0:
                wait = min(paused, self.poll)
            elif not claim:
                with contextlib.suppress(*DB_UNAVAILABLE):
                    await self.settle()
            elif len(running) < CONCURRENCY:
                try:
                    await self.settle()
                    claimed, due_in = await self.tick(CONCURRENCY - len(running))
                    for grant, owner in claimed:
                        task = asyncio.create_task(self.process(grant, owner, require_session=True))
                        running.add(task)
                        task.add_done_callback(running.discard)
                    if due_in is not None:
                        wait = min(wait, max(due_in, 0.0))
                except DB_UNAVAILABLE as exc:
                    log.warning("re-check scheduler cannot reach the database", extra={"error": type(exc).__name__})
                except Exception:
                    log.exception("re-check scheduler failed")
            wait = min(wait, max(self._soonest - time.monotonic(), 0.0))
            self._soonest = float("inf")
            if wait > 0 or len(running) >= CONCURRENCY:
                self._asleep_until = time.monotonic() + wait
                await self._sleep(stop, running, wait)
                self._asleep_until = float("inf")
        if running:  # a re-check never raises; those still running finish or are cancelled by resync_ctx
            await asyncio.gather(*running, return_exceptions=True)

    async def _sleep(self, stop: asyncio.Event, running: set[asyncio.Task[Outcome]], seconds: float) -> None:
        """Until `seconds` pass, `stop` or a wake-up is set, or (all slots busy) a re-check finishes."""
        self._wake.clear()
        waiters = {asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._wake.wait())}
        busy = set(running) if len(running) >= CONCURRENCY else set()
        try:
            await asyncio.wait(waiters | busy, timeout=seconds if seconds > 0 else None,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()

    async def tick(self, slots: int) -> tuple[list[tuple[db_grants.Grant, str]], float | None]:
        """Claim up to `slots` due users; with fewer due than that, also the seconds until the next one is due
        (None: nothing is scheduled). The claim's lease owner is its own (a user appears once per claim)."""
        owner = self._lease_owner()
        async with self.pool.acquire() as conn:
            claimed = await db_grants.claim_due(conn, owner, lease=self.lease, limit=slots)
            due_in = await db_grants.next_due(conn) if len(claimed) < slots else 0.0
        return [(g, owner) for g in claimed], due_in

    async def settle(self) -> None:
        """Write what re-checks could not write while the database was away (see `process`): the rotated
        refresh token kept in memory, and the end of their lease, so they are retried soon."""
        for uid, left in list(self._unsettled.items()):
            orphan = None
            async with self.pool.acquire() as conn, conn.transaction():
                if left.newest is not None and not await db_grants.rotated(conn, uid, left.presented or "",
                                                                          left.newest):
                    orphan = left.newest  # the grant was replaced meanwhile (a new sign-in)
                held = await db_grants.held(conn, uid, left.owner)
                if held is not None:
                    await db_grants.failed(conn, uid, retry_in=backoff(held.failures + 1, self.interval, None),
                                           error=left.error)
            del self._unsettled[uid]
            log.info("an interrupted re-check settled; retrying soon", extra={"user_id": uid, "error": left.error})
            if orphan is not None:
                await revoke_sealed(self.gitlab, self.fernet, orphan)

    def wake(self) -> None:
        self._wake.set()

    def _due_at(self, when: float) -> None:
        """A re-check of this process made its user due again at `when` (monotonic)."""
        self._soonest = min(self._soonest, when)
        if when < self._asleep_until:
            self._wake.set()

    async def request(self, user_id: int) -> bool:
        """A webhook named this user: re-check at once, or (coalesced: False) once more when COALESCE seconds
        have passed since the last request, however many arrive meanwhile."""
        now = time.monotonic()
        since = now - self._requested.get(user_id, -COALESCE)
        if since < COALESCE:
            if user_id not in self._deferred:
                self._deferred.add(user_id)  # one deferred re-check covers every request of the window
                await db_grants.due_in(self.pool, user_id, COALESCE - since)
            return False
        if len(self._requested) > _COALESCE_MEMORY:
            self._requested = {u: t for u, t in self._requested.items() if now - t < COALESCE}
            self._deferred &= self._requested.keys()
        self._requested[user_id] = now
        self._deferred.discard(user_id)
        if await db_grants.due_in(self.pool, user_id):
            self.wake()
        return True

    # ---- the admin call ---------------------------------------------------------------------------------

    async def check_now(self, login: str, *, actor: str = ACTOR) -> Outcome:
        """Re-check one user at once (admin API, CLI, page): Conflict without a kept grant, GitLabUnavailable on
        failure; what it changes is audited under `actor` (the administrator who asked)."""
        try:
            await self.settle()  # a re-check of this process the database interrupted goes first
            async with self.pool.acquire() as conn:
                user = await db_users.by_login(conn, login)
                if user is None:
                    raise NotFound(f"No user with login {login}")
                owner = self._lease_owner()
                deadline = time.monotonic() + self.lease
                while (grant := await db_grants.claim_one(conn, user.id, owner, lease=self.lease)) is None:
                    current = await db_grants.by_user(conn, user.id)
                    if current is None or current.refresh_token is None:
                        raise Conflict(f"No GitLab grant is kept for {user.login}",
                                       advice="The user must sign in (with provisioning.resync_interval on) first.")
                    if time.monotonic() > deadline:
                        raise GitLabUnavailable("Another re-check of this user is still running")
                    await asyncio.sleep(0.2)  # another process is re-checking this user right now
        except DB_UNAVAILABLE as exc:
            raise DatabaseUnavailable(f"re-check failed: {type(exc).__name__}") from None
        if grant.refresh_token is None:
            await db_grants.release(self.pool, user.id, owner)
            raise Conflict(f"No GitLab grant is kept for {user.login}",
                           advice="The user must sign in (with provisioning.resync_interval on) first.")
        outcome = await self.process(grant, owner, require_session=False, actor=actor)
        if user.id in self._unsettled:
            raise DatabaseUnavailable("re-check interrupted: the database is unavailable")
        if outcome.result == "failed":
            raise GitLabUnavailable(f"GitLab could not confirm {user.login}: {outcome.error}")
        if outcome.result in ("lost", "no_grant") and outcome.error:
            raise Conflict(f"No GitLab grant is kept for {user.login}: {outcome.error}")
        return outcome

    # ---- one re-check -----------------------------------------------------------------------------------

    async def process(self, grant: db_grants.Grant, owner: str, *, require_session: bool,
                      actor: str = ACTOR) -> Outcome:
        """Re-check one claimed user; never raises.

        The database failing anywhere leaves nothing half-applied (each write is one statement or one
        transaction) and the re-check in `_unsettled`, with GitLab's rotated refresh token if it could not be
        saved: the scheduler's next turn (`settle`) writes both once the database answers, and the user is
        re-checked soon after with the newest token. A database blip never costs a user their sessions.
        """
        left = Unsettled(owner, grant.refresh_token)
        try:
            outcome = await self._process(grant, owner, left, require_session=require_session, actor=actor)
        except DB_UNAVAILABLE as exc:
            log.warning("re-check could not reach the database; settled when it answers",
                        extra={"error": type(exc).__name__, "user_id": grant.user_id})
            self._unsettled[grant.user_id] = left
            outcome = Outcome("failed", "the database is unavailable")
        except Exception:
            log.exception("re-check failed")
            left.error = "internal error"
            self._unsettled[grant.user_id] = left
            outcome = Outcome("failed", "internal error")
        if outcome.result in ("changed", "unchanged", "revoked", "failed"):
            self.metrics.inc("gateway_resync_total", result=outcome.result)
        return outcome

    async def _process(self, grant: db_grants.Grant, owner: str, left: Unsettled, *,
                       require_session: bool, actor: str) -> Outcome:
        uid = grant.user_id
        began = time.monotonic()  # about when the claim stamped claimed_at: the next due is `interval` after
        token = unseal(self.fernet, grant.refresh_token)
        if token is None:
            reason = "the kept grant cannot be decrypted with session.secrets" if grant.refresh_token else ""
            async with self.pool.acquire() as conn, conn.transaction():
                if await db_grants.held(conn, uid, owner) is not None:
                    await db_grants.dropped(conn, uid, reason)
                    if reason:
                        await db_audit.record(conn, actor, "sync.no_grant", await self._login(conn, uid),
                                              reason=reason)
            return Outcome("no_grant", reason)
        if require_session and not grant.has_session:
            async with self.pool.acquire() as conn:
                await db_grants.dormant(conn, uid)
            return Outcome("dormant")
        try:
            fresh = await self.gitlab.refresh(token)
        except GrantRefused:
            return await self._revoke(uid, owner, "invalid_grant", "GitLab refused the kept grant", None, actor,
                                      presented=grant.refresh_token)
        except GitLabUnavailable as err:
            return await self._fail(uid, owner, err.message, err.retry_after)
        # GitLab has rotated the token: the one presented is dead. The new one is saved before anything else.
        sealed = left.newest = seal(self.fernet, fresh.refresh_token)
        if not await db_grants.rotated(self.pool, uid, grant.refresh_token or "", sealed):
            await self.gitlab.revoke(fresh.refresh_token or "")  # a new sign-in replaced the grant meanwhile
            return await self._release(uid, owner, Outcome("lost", "the grant was replaced during the re-check"))
        left.presented, left.newest = sealed, None
        need_groups = self.cfg.provisioning.sync_groups or bool(self.cfg.provisioning.allowed_groups)
        try:
            fetched = await self.gitlab.sign_in_data(fresh.access_token, need_groups=need_groups)
        except SignInRefused as err:
            return await self._revoke(uid, owner, err.code, err.message, fresh.refresh_token, actor)
        except GitLabUnavailable as err:
            return await self._fail(uid, owner, err.message, err.retry_after)
        for attempt in range(provisioning.RETRIES):
            try:
                result = await self._apply(uid, owner, grant, fetched, actor)
                break
            except provisioning.RACES as exc:
                # An administrator changed the same rows: everything rolled back; read again.
                log.info("re-check raced with another change; retrying",
                         extra={"error": type(exc).__name__, "attempt": attempt + 1, "user_id": uid})
                await asyncio.sleep(0.01 * (attempt + 1))
        else:
            return await self._fail(uid, owner, "kept colliding with other changes", None)
        if isinstance(result, Outcome):
            return result
        if result.refusal is not None:
            await self.gitlab.revoke(fresh.refresh_token or "")
            return Outcome("revoked", result.refusal)
        self.metrics.group_changes(len(result.added), len(result.removed))
        self._due_at(began + self.interval)
        return Outcome("changed" if result.changed else "unchanged")

    async def _apply(self, uid: int, owner: str, grant: db_grants.Grant, fetched: SignInData, actor: str
                     ) -> provisioning.RecheckResult | Outcome:
        """§5 rules 1, 2, 5-8 in ONE transaction; a `lost` Outcome when our lease was lost."""
        async with self.pool.acquire() as conn, conn.transaction():
            # The lock order of db/locks.py: the person (as a sign-in takes it), then the grant row.
            linked = await provisioning.lock_person(conn, fetched.user.id)
            if await db_grants.held(conn, uid, owner) is None:
                return await self._lost(conn, uid)
            result = await provisioning.recheck(
                conn, self.cfg.provisioning, uid, linked, fetched.user, fetched.groups,
                bind_groups=self.cfg.gitlab.groups_source == "api", actor=actor, audit_unchanged=actor != ACTOR)
            if result.refusal is not None:
                await self._revoke_in(conn, uid, result.user.login, result.refusal, result.message, actor)
            else:
                await db_grants.succeeded(conn, uid, interval=self.interval)
                if grant.failures:
                    # The user's 503 deadline moved: every process must drop its cached one.
                    await db_notify.notify(conn, "user", uid)
            return result

    async def _lost(self, conn: asyncpg.Connection, uid: int) -> Outcome:
        """Our lease is gone before the result was saved: a sign-in kept a newer grant (and applied the rules
        itself, with fresher answers), or another claimant took over after our lease ran out (the token we
        saved is theirs to use now)."""
        current = await db_grants.by_user(conn, uid)
        if current is not None and current.lease_owner is None:
            log.info("re-check superseded by a sign-in", extra={"user_id": uid})
            return Outcome("lost", "a sign-in replaced the grant during the re-check")
        log.warning("re-check lease lost before its result was saved", extra={"user_id": uid})
        return Outcome("lost", "the re-check took longer than its lease")

    async def _login(self, conn: asyncpg.Connection, user_id: int) -> str:
        user = await db_users.by_id(conn, user_id)
        return user.login if user is not None else str(user_id)

    async def _revoke(self, uid: int, owner: str, reason: str, message: str, live_token: str | None,
                      actor: str, *, presented: str | None = None) -> Outcome:
        async with self.pool.acquire() as conn, conn.transaction():
            held = await db_grants.held(conn, uid, owner)
            if held is None:
                return Outcome("lost", "the re-check took longer than its lease")
            if presented is not None and not secrets.compare_digest((held.refresh_token or "").encode(),
                                                                    presented.encode()):
                # GitLab refused a token that is no longer the kept one: a claimant whose lease ran out during
                # a database outage saved its successor meanwhile. The grant lives: try again with that one.
                await db_grants.failed(conn, uid, retry_in=0.0, error="the kept grant moved on during the re-check")
                return Outcome("lost", "the kept grant moved on during the re-check")
            await self._revoke_in(conn, uid, await self._login(conn, uid), reason, message, actor)
        if live_token:
            await self.gitlab.revoke(live_token)
        return Outcome("revoked", reason)

    async def _revoke_in(self, conn: asyncpg.Connection, uid: int, login: str, reason: str, message: str,
                         actor: str) -> None:
        """Every session of the user, on every replica (NOTIFY at commit); the grant is dropped."""
        revoked = await db_sessions.revoke_user(conn, uid)
        await db_grants.dropped(conn, uid, f"{reason}: {message}")
        await db_notify.notify(conn, "user", uid)
        await db_audit.record(conn, actor, "session.revoked", login, reason=reason, message=message,
                              sessions_revoked=len(revoked))
        log.info("sessions revoked by a re-check", extra={"user": login, "reason": reason})

    async def _fail(self, uid: int, owner: str, error: str, retry_after: float | None) -> Outcome:
        """Transient trouble: back off; nothing else changes (a rotated token is already saved)."""
        if retry_after:
            self._paused_until = max(self._paused_until, time.monotonic() + retry_after)
        async with self.pool.acquire() as conn, conn.transaction():
            held = await db_grants.held(conn, uid, owner)
            if held is None:
                return Outcome("lost", "the re-check took longer than its lease")
            delay = backoff(held.failures + 1, self.interval, retry_after)
            await db_grants.failed(conn, uid, retry_in=delay, error=error)
        self._due_at(time.monotonic() + delay)
        log.info("re-check failed; retrying later", extra={"user_id": uid, "error": error})
        return Outcome("failed", error)

    async def _release(self, uid: int, owner: str, outcome: Outcome) -> Outcome:
        await db_grants.release(self.pool, uid, owner)
        return outcome


# ---- wiring ------------------------------------------------------------------------------------------------

RESYNC = web.AppKey("resync", Resyncer)


async def resync_ctx(app: web.Application) -> AsyncIterator[None]:
    """The process's Resyncer, and its scheduler loop when re-checks are on (provisioning.resync_interval)."""
    cfg = app[keys.CONFIG]
    resyncer = Resyncer(cfg, app[keys.POOL], app[keys.GITLAB], app[keys.METRICS])
    app[RESYNC] = resyncer
    stop = asyncio.Event()
    task = asyncio.create_task(resyncer.run(stop, claim=app.get(RUN_SCHEDULER, True))) \
        if cfg.provisioning.resync_interval else None
    yield
    stop.set()
    if task is not None:
        try:
            await asyncio.wait_for(task, 5)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


# The admin listener shares the process with a public app that already runs the loop: it only needs the calls.
RUN_SCHEDULER = web.AppKey("run_scheduler", bool)
