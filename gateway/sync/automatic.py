"""Automatic provisioning runs (SPEC §12): list the subtree, plan, apply in ONE transaction, audit, record.

One run at a time across replicas: the connection that runs holds a PostgreSQL advisory lock (session level)
from before the listing to after the commit; another replica (or an API call, or `gateway sync`) starting
meanwhile gets `RunInProgress` (409) and changes nothing. A listing error aborts before any write. The apply
re-reads the database inside its transaction and plans from that, so a dry run's plan is exactly what a real
run with the same GitLab answers does. Every applied run is one `sync.automatic` audit event with its counts
(plus `session.revoked` per user signed out and `group.renamed` per rename, as elsewhere) and one row of
automatic_runs (what /metrics and the scheduler read).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import asyncpg

from gateway.config import Config
from gateway.db import DB_UNAVAILABLE
from gateway.db import audit as db_audit
from gateway.db import automatic as db_auto
from gateway.db import groups as db_groups
from gateway.db import notify as db_notify
from gateway.errors import Conflict, DatabaseUnavailable, GatewayError
from gateway.sync import autoplan
from gateway.sync.gitlab_tree import API_RATE, GROUP_LIST_RATE, Listing, Progress, Rate, TreeReader

log = logging.getLogger("gateway.automatic")

ACTOR = "automatic-provisioning"
RETRIES = 3
NOTIFY_EACH_UP_TO = 100  # more changed users than this: one NOTIFY "all" instead of one per user
AUDIT_SAMPLE = 100  # lists in the run's audit event are cut to this many entries (the counts are whole)
_RACES = (asyncpg.DeadlockDetectedError, asyncpg.SerializationError, asyncpg.UniqueViolationError,
          asyncpg.ForeignKeyViolationError)


class RunInProgress(Conflict):
    code, title = "sync_in_progress", "An automatic provisioning run is already in progress"
    advice = "Another replica (or command) is running it; wait for it to finish."


class NotConfigured(Conflict):
    code, title = "automatic_provisioning_off", "Automatic provisioning is not configured"
    advice = "Set provisioning.automatic (token and groups) in the configuration."


@dataclass(frozen=True, slots=True)
class Pacing:
    """How fast a run may call GitLab (internal settings; GitLab.com's limits by default)."""

    group_rate: Rate | None = GROUP_LIST_RATE
    api_rate: Rate | None = API_RATE


@dataclass
class RunResult:
    dry_run: bool
    roots: tuple[str, ...]
    listing: Listing
    plan: autoplan.Plan | None = None
    duration: float = 0.0
    db_seconds: float = 0.0
    skipped: bool = False  # the scheduler found the run not due after all (another replica just ran it)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        plan = self.plan.to_json() if self.plan is not None else {}
        return {
            "dry_run": self.dry_run, "applied": not self.dry_run and self.plan is not None,
            "roots": list(self.roots),
            "listed": {"groups": len(self.listing.groups), "members": self.listing.member_count,
                       "users": len({m.id for ms in self.listing.members.values() for m in ms})},
            "gitlab": {"calls": self.listing.calls, "throttled": self.listing.throttled,
                       "waited_seconds": round(self.listing.waited, 3)},
            "duration_seconds": round(self.duration, 3), "db_seconds": round(self.db_seconds, 3),
            **plan,
        }


@contextlib.asynccontextmanager
async def _locked(pool: asyncpg.Pool) -> AsyncIterator[asyncpg.Connection]:
    """A connection holding the run lock, or RunInProgress."""
    async with pool.acquire() as conn:
        if not await db_auto.try_lock(conn):
            raise RunInProgress("Another automatic provisioning run is in progress; nothing was changed")
        try:
            yield conn
        finally:
            with contextlib.suppress(*DB_UNAVAILABLE):
                await db_auto.unlock(conn)


async def run(pool: asyncpg.Pool, cfg: Config, session: aiohttp.ClientSession, *, dry_run: bool = False,
              actor: str = ACTOR, pacing: Pacing = Pacing(), progress: Progress | None = None,
              only_if_due: float | None = None, on_request: Any = None) -> RunResult:
    """One run; RunInProgress, NotConfigured, GitLabUnavailable (nothing changed) or DatabaseUnavailable."""
    auto = cfg.provisioning.automatic
    if auto is None:
        raise NotConfigured("provisioning.automatic is not set")
    try:
        async with _locked(pool) as conn:
            if only_if_due is not None:
                last = await db_auto.last_run(conn)
                if last is not None and time.time() - last.finished_epoch < only_if_due:
                    return RunResult(dry_run, auto.groups, Listing(), skipped=True)
            return await _run_locked(conn, cfg, session, dry_run=dry_run, actor=actor, pacing=pacing,
                                     progress=progress, on_request=on_request)
    except DB_UNAVAILABLE as exc:
        raise DatabaseUnavailable(f"The database did not answer ({type(exc).__name__}); nothing was changed"
                                  ) from None


async def _run_locked(conn: asyncpg.Connection, cfg: Config, session: aiohttp.ClientSession, *, dry_run: bool,
                      actor: str, pacing: Pacing, progress: Progress | None, on_request: Any) -> RunResult:
    auto = cfg.provisioning.automatic
    assert auto is not None
    started, clock = time.time(), time.perf_counter()
    log.info("automatic provisioning: run starts", extra={"roots": list(auto.groups), "dry_run": dry_run})
    reader = TreeReader(session, cfg.gitlab.url, auto.token, group_rate=pacing.group_rate,
                        api_rate=pacing.api_rate, progress=progress, on_request=on_request)
    result = RunResult(dry_run, auto.groups, reader.listing)
    try:
        await reader.read(auto.groups)
    except GatewayError as err:
        result.duration = time.perf_counter() - clock
        log.warning("automatic provisioning: run failed, nothing changed",
                    extra={"error": err.message, "gitlab_calls": reader.listing.calls})
        if not dry_run:
            await db_auto.record_run(conn, started=started, ok=False, duration=result.duration,
                                     gitlab_calls=reader.listing.calls, db_seconds=0.0, counts={}, error=err.message,
                                     actor=actor)
        raise
    if progress is not None:
        progress(reader.listing)
    db_clock = time.perf_counter()
    for attempt in range(RETRIES):
        try:
            async with conn.transaction(readonly=dry_run):
                result.plan = await _plan(conn, cfg, reader.listing)
                if not dry_run:
                    await _apply(conn, result.plan, actor=actor, roots=auto.groups, listing=reader.listing)
            break
        except _RACES as exc:
            # A sign-in created the same user or membership meanwhile: everything rolled back; plan afresh.
            log.info("automatic provisioning raced with another change; retrying",
                     extra={"error": type(exc).__name__, "attempt": attempt + 1})
            await asyncio.sleep(0.05 * (attempt + 1))
    else:
        raise DatabaseUnavailable("The automatic provisioning run kept colliding with other changes; "
                                  "nothing was changed")
    result.db_seconds = time.perf_counter() - db_clock
    result.duration = time.perf_counter() - clock
    assert result.plan is not None
    counts = result.plan.counts
    if not dry_run:
        await db_auto.record_run(conn, started=started, ok=True, duration=result.duration,
                                 gitlab_calls=reader.listing.calls, db_seconds=result.db_seconds, counts=counts,
                                 actor=actor)
    log.info("automatic provisioning: run done", extra={
        "dry_run": dry_run, "duration_s": round(result.duration, 3), "db_s": round(result.db_seconds, 3),
        "gitlab_calls": reader.listing.calls, "throttled": reader.listing.throttled,
        "groups": len(reader.listing.groups), "members": reader.listing.member_count, **counts})
    return result


async def _plan(conn: asyncpg.Connection, cfg: Config, listing: Listing) -> autoplan.Plan:
    auto = cfg.provisioning.automatic
    assert auto is not None
    local_groups = await db_auto.groups(conn)
    groups = autoplan.plan_groups(listing, local_groups, create_groups=auto.create_groups)
    members = {m.id: m for ms in listing.members.values() for m in ms}
    gitlab_ids = sorted(members)
    users = await db_auto.users(conn, gitlab_ids, [m.username for m in members.values()])
    current = await db_auto.memberships(conn, groups.existing_ids)
    governed = await db_auto.governed_with_sessions(conn, groups.existing_ids, gitlab_ids)
    return autoplan.plan_members(listing, groups, users, current, governed, local_groups,
                                 keep_manual=cfg.provisioning.keep_manual_memberships)


async def _apply(conn: asyncpg.Connection, plan: autoplan.Plan, *, actor: str, roots: tuple[str, ...],
                 listing: Listing) -> None:
    g = plan.groups
    await db_auto.bind_groups(conn, [lid for lid, _, _ in g.bind], [gid for _, gid, _ in g.bind])
    await db_auto.rename_groups(conn, [lid for lid, _, _, _ in g.rename], [new for _, _, new, _ in g.rename])
    created_groups = await db_auto.insert_groups(conn, [n for n, _ in g.create], [i for _, i in g.create])
    await db_auto.update_users(conn, [(u.id, m.id, ch.get("login", [u.login, u.login])[1], m.name or u.name,
                                       m.email or u.email) for u, m, ch in plan.update_users])
    created_users = await db_auto.insert_users(conn, [(m.id, m.username, m.name, m.email)
                                                      for m in plan.create_users])
    default = await db_groups.default_group(conn)
    await db_auto.add_memberships(conn, [(uid, default.id) for uid in created_users.values()], "default")
    adds = [(luid if luid is not None else created_users[uid], lgid if lgid is not None else created_groups[gid])
            for luid, uid, lgid, gid in plan.add]
    await db_auto.add_memberships(conn, adds, autoplan.SYNC)
    await db_auto.remove_memberships(conn, [(u, grp) for u, grp, _ in plan.remove])
    revoked = await db_auto.revoke_sessions(conn, [u.id for u, _ in plan.revoke])
    by_user: dict[int, int] = {}
    for _, uid in revoked:
        by_user[uid] = by_user.get(uid, 0) + 1
    for user, reason in plan.revoke:
        await db_audit.record(conn, actor, "session.revoked", user.login, login=user.login, reason=reason,
                              sessions=by_user.get(user.id, 0))
    for _, old, new, gid in g.rename:
        await db_audit.record(conn, actor, "group.renamed", new, old=old, new=new, gitlab_group_id=gid)
    report = plan.to_json()
    await db_audit.record(
        conn, actor, "sync.automatic", ",".join(roots), roots=list(roots), counts=plan.counts,
        listed={"groups": len(listing.groups), "members": listing.member_count}, gitlab_calls=listing.calls,
        conflicts=(report["groups"]["conflicts"] + report["users"]["conflicts"])[:AUDIT_SAMPLE],
        groups_created=[c["name"] for c in report["groups"]["created"]][:AUDIT_SAMPLE],
        users_created=[c["login"] for c in report["users"]["created"]][:AUDIT_SAMPLE])
    await _notify(conn, plan, adds, revoked)


async def _notify(conn: asyncpg.Connection, plan: autoplan.Plan, adds: list[tuple[int, int]],
                  revoked: list[tuple[str, int]]) -> None:
    """Caches everywhere drop what changed, at commit (NOTIFY is transactional)."""
    users = {u for u, _ in adds} | {u for u, _, _ in plan.remove} | {u.id for u, _, _ in plan.update_users}
    if plan.groups.rename or len(users) > NOTIFY_EACH_UP_TO:
        await db_notify.notify(conn, "all")
    else:
        for uid in sorted(users):
            await db_notify.notify(conn, "user", uid)
    if len(revoked) > NOTIFY_EACH_UP_TO:
        await db_notify.notify(conn, "all")
        return
    for sid, _ in revoked:
        await db_notify.notify(conn, "session", sid)
