"""Continuous synchronization (SPEC §11): re-check users with GitLab while their sessions live.

Every process runs one `Resyncer.run` loop. Due users are claimed in PostgreSQL with a lease
(db/grants.py: `FOR UPDATE SKIP LOCKED`, an owner and an expiry), so N replicas re-check each user once and a
refresh token is only ever presented by the one claimant; a claimant that dies lets its lease run out and
another process picks the user up. GitLab is called with no database connection held; the outcome (the
rotated refresh token included) is then written in ONE transaction that first checks the lease still holds.

Outcomes: GitLab refuses the grant, the account is no longer active, or the user left the allowed groups ->
every session revoked everywhere (NOTIFY), audited `session.revoked` with the reason, the grant dropped
(sync_state no_grant); the user row is not deactivated. Transient GitLab trouble (unreachable, 5xx, timeout,
429) -> nothing changes but the schedule: exponential backoff honouring Retry-After. Requests of a user whom
GitLab has not confirmed for resync_interval + resync_grace get a 503 (sessions/store.py decides that from the
cached identity; the proxied path never waits for a re-check). A refresh made just before the database failed
leaves GitLab with a rotated token we could not save: the next attempt gets invalid_grant and ends in no_grant,
never in a loop.
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
from dataclasses import dataclass
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
BATCH: Final = 64  # users claimed per query
CONCURRENCY: Final = 8  # re-checks in flight per process
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
        self._requested: dict[int, float] = {}
        self._deferred: set[int] = set()
        self._limit = asyncio.Semaphore(CONCURRENCY)

    def _lease_owner(self) -> str:
        # One per re-check: two re-checks of this process never mistake each other's lease for their own.
        return f"{self._owner}:{secrets.token_hex(4)}"

    # ---- the scheduler ---------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Claim and re-check due users until `stop` is set."""
        while not stop.is_set():
            claimed = 0
            if time.monotonic() >= self._paused_until:
                try:
                    claimed = await self.tick()
                except DB_UNAVAILABLE as exc:
                    log.warning("re-check scheduler cannot reach the database", extra={"error": type(exc).__name__})
                except Exception:
                    log.exception("re-check scheduler failed")
            if claimed < BATCH:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.poll):
                        waiters = {asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._wake.wait())}
                        try:
                            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                        finally:
                            for w in waiters:
                                w.cancel()

    async def tick(self) -> int:
        """Claim one batch of due users and re-check them; how many were claimed."""
        owner = self._lease_owner()
        async with self.pool.acquire() as conn:
            claimed = await db_grants.claim_due(conn, owner, lease=self.lease, limit=BATCH)
        if claimed:
            await asyncio.gather(*(self._bounded(g, owner) for g in claimed))
        return len(claimed)

    async def _bounded(self, grant: db_grants.Grant, owner: str) -> Outcome:
        async with self._limit:
            return await self.process(grant, owner, require_session=True)

    def wake(self) -> None:
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
        if outcome.result == "failed":
            raise GitLabUnavailable(f"GitLab could not confirm {user.login}: {outcome.error}")
        if outcome.result in ("lost", "no_grant") and outcome.error:
            raise Conflict(f"No GitLab grant is kept for {user.login}: {outcome.error}")
        return outcome

    # ---- one re-check -----------------------------------------------------------------------------------

    async def process(self, grant: db_grants.Grant, owner: str, *, require_session: bool,
                      actor: str = ACTOR) -> Outcome:
        """Re-check one claimed user; never raises (the lease runs out if the database is gone)."""
        newest = [grant.refresh_token]  # the newest sealed token: GitLab may have rotated it before a failure
        try:
            outcome = await self._process(grant, owner, newest, require_session=require_session, actor=actor)
        except DB_UNAVAILABLE as exc:
            # Nothing was half-applied (one transaction); the lease expires and the user is retried.
            log.warning("re-check could not reach the database", extra={"error": type(exc).__name__})
            outcome = Outcome("failed", "the database is unavailable")
        except Exception:
            log.exception("re-check failed")
            with contextlib.suppress(*DB_UNAVAILABLE):
                await self._fail(grant.user_id, owner, newest[0], "internal error", None)
            outcome = Outcome("failed", "internal error")
        if outcome.result in ("changed", "unchanged", "revoked", "failed"):
            self.metrics.inc("gateway_resync_total", result=outcome.result)
        return outcome

    async def _process(self, grant: db_grants.Grant, owner: str, newest: list[str | None], *,
                       require_session: bool, actor: str) -> Outcome:
        uid = grant.user_id
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
        if require_session:
            async with self.pool.acquire() as conn:
                if not await db_grants.has_active_session(conn, uid):
                    await db_grants.dormant(conn, uid)
                    return Outcome("dormant")
        try:
            fresh = await self.gitlab.refresh(token)
        except GrantRefused:
            return await self._revoke(uid, owner, "invalid_grant", "GitLab refused the kept grant", None, actor)
        except GitLabUnavailable as err:
            return await self._fail(uid, owner, grant.refresh_token, err.message, err.retry_after)
        sealed = newest[0] = seal(self.fernet, fresh.refresh_token)
        need_groups = self.cfg.provisioning.sync_groups or bool(self.cfg.provisioning.allowed_groups)
        try:
            fetched = await self.gitlab.sign_in_data(fresh.access_token, need_groups=need_groups)
        except SignInRefused as err:
            return await self._revoke(uid, owner, err.code, err.message, fresh.refresh_token, actor)
        except GitLabUnavailable as err:
            return await self._fail(uid, owner, sealed, err.message, err.retry_after)
        for attempt in range(provisioning.RETRIES):
            try:
                result = await self._apply(uid, owner, grant, sealed, fetched, actor)
                break
            except provisioning.RACES:
                # A sign-in or an administrator changed the same rows: everything rolled back; read again.
                await asyncio.sleep(0.01 * (attempt + 1))
        else:
            return await self._fail(uid, owner, sealed, "kept colliding with other changes", None)
        if result is None:
            log.warning("re-check lease lost before its result was saved", extra={"user_id": uid})
            await self.gitlab.revoke(fresh.refresh_token or "")  # nobody holds this new grant: let it die
            return Outcome("lost", "the re-check took longer than its lease")
        if result.refusal is not None:
            await self.gitlab.revoke(fresh.refresh_token or "")
            return Outcome("revoked", result.refusal)
        self.metrics.group_changes(len(result.added), len(result.removed))
        return Outcome("changed" if result.changed else "unchanged")

    async def _apply(self, uid: int, owner: str, grant: db_grants.Grant, sealed: str, fetched: SignInData,
                     actor: str) -> provisioning.RecheckResult | None:
        """§5 rules 1, 2, 5-8 and the rotated token in ONE transaction; None when our lease was lost."""
        async with self.pool.acquire() as conn, conn.transaction():
            if await db_grants.held(conn, uid, owner) is None:
                return None
            result = await provisioning.recheck(
                conn, self.cfg.provisioning, uid, fetched.user, fetched.groups,
                bind_groups=self.cfg.gitlab.groups_source == "api", actor=actor)
            if result.refusal is not None:
                await self._revoke_in(conn, uid, result.user.login, result.refusal, result.message, actor)
            else:
                await db_grants.succeeded(conn, uid, sealed, interval=self.interval)
                if grant.failures:
                    # The user's 503 deadline moved: every process must drop its cached one.
                    await db_notify.notify(conn, "user", uid)
            return result

    async def _login(self, conn: asyncpg.Connection, user_id: int) -> str:
        user = await db_users.by_id(conn, user_id)
        return user.login if user is not None else str(user_id)

    async def _revoke(self, uid: int, owner: str, reason: str, message: str, live_token: str | None,
                      actor: str) -> Outcome:
        async with self.pool.acquire() as conn, conn.transaction():
            if await db_grants.held(conn, uid, owner) is None:
                return Outcome("lost", "the re-check took longer than its lease")
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

    async def _fail(self, uid: int, owner: str, sealed: str | None, error: str, retry_after: float | None
                    ) -> Outcome:
        """Transient trouble: keep the (possibly rotated) token, back off; nothing else changes."""
        if retry_after:
            self._paused_until = max(self._paused_until, time.monotonic() + retry_after)
        async with self.pool.acquire() as conn, conn.transaction():
            held = await db_grants.held(conn, uid, owner)
            if held is None:
                return Outcome("lost", "the re-check took longer than its lease")
            delay = backoff(held.failures + 1, self.interval, retry_after)
            await db_grants.failed(conn, uid, sealed or "", retry_in=delay, error=error)
        log.info("re-check failed; retrying later", extra={"user_id": uid, "error": error})
        return Outcome("failed", error)


# ---- wiring ------------------------------------------------------------------------------------------------

RESYNC = web.AppKey("resync", Resyncer)


async def resync_ctx(app: web.Application) -> AsyncIterator[None]:
    """The process's Resyncer, and its scheduler loop when re-checks are on (provisioning.resync_interval)."""
    cfg = app[keys.CONFIG]
    resyncer = Resyncer(cfg, app[keys.POOL], app[keys.GITLAB], app[keys.METRICS])
    app[RESYNC] = resyncer
    stop = asyncio.Event()
    task = asyncio.create_task(resyncer.run(stop)) if cfg.provisioning.resync_interval and app.get(
        RUN_SCHEDULER, True) else None
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
