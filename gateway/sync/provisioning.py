"""The sign-in rules of SPEC §5 (2-8; rule 1, the fetch, is gitlab.py), applied in ONE transaction.

Concurrency: locks are taken in the one order db/locks.py defines (the person's advisory lock, their users
row, their grant row, groups in id order). The advisory lock per GitLab user id serializes sign-ins and
re-checks of the same person (20 tabs at once make one row), different people run in parallel; the unique
indexes on users.gitlab_id and lower(login) and the primary key of memberships are the last line of defence.
A deadlock or serialization failure PostgreSQL still reports is retried from the start, with nothing
half-applied.
A refusal rolls the transaction back and is audited in a transaction of its own.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import asyncpg

from gateway.config import ProvisioningConfig
from gateway.db import DB_UNAVAILABLE, unavailable
from gateway.db import audit as db_audit
from gateway.db import grants as db_grants
from gateway.db import groups as db_groups
from gateway.db import locks as db_locks
from gateway.db import notify as db_notify
from gateway.db import signin as db_signin
from gateway.db import users as db_users
from gateway.errors import DatabaseUnavailable, SignInRefused
from gateway.identity import Identity
from gateway.services.accounts import CONTROL_CHARS
from gateway.sessions.store import new_session_id
from gateway.sync import renames
from gateway.sync.gitlab import GitLabGroup, GitLabUser

log = logging.getLogger("gateway.provisioning")

ACTOR = "gitlab-sign-in"
RETRIES = 4
RACES = (asyncpg.DeadlockDetectedError, asyncpg.SerializationError, asyncpg.UniqueViolationError,
          asyncpg.ForeignKeyViolationError)


@dataclass(frozen=True, slots=True)
class NewSession:
    """What the server-side session row of this sign-in records (it is created in the same transaction)."""

    lifetime: float
    user_agent: str
    client_ip: str
    # SPEC §11: the encrypted GitLab refresh token to keep (replacing the user's older one), or None.
    grant: str | None = field(default=None, repr=False)
    resync_interval: float = 0.0


@dataclass(frozen=True, slots=True)
class SignInResult:
    user: db_users.User
    identity: Identity
    created: bool
    session_id: str
    expires_at: float
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    binding_mismatches: tuple[str, ...] = field(default=())
    replaced_grant: str | None = field(default=None, repr=False)  # encrypted; to be revoked at GitLab


@dataclass(frozen=True, slots=True)
class RecheckResult:
    """What a re-check (SPEC §11) did; `refusal` names the §5 rule the user no longer passes, if any."""

    user: db_users.User
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: bool = False  # memberships, login, name or email changed: caches must refresh
    refusal: str | None = None
    message: str = ""


class _Refusal(Exception):
    """Raised inside the transaction to roll it back; turned into SignInRefused after the audit."""

    def __init__(self, code: str, message: str, advice: str, details: dict[str, object]) -> None:
        super().__init__(message)
        self.code, self.message, self.advice, self.details = code, message, advice, details


def unusable_profile_field(user: GitLabUser) -> str | None:
    """The first of username, name, email that holds a control character (or invalid Unicode), else None."""
    for label, value in (("username", user.username), ("name", user.name), ("email", user.email)):
        if CONTROL_CHARS.search(value):
            return label
    return None


def printable(text: str) -> str:
    """`text` with control characters and lone surrogates written as escapes (for audit rows and logs)."""
    return CONTROL_CHARS.sub(lambda m: m.group().encode("unicode_escape", "backslashreplace").decode(), text)


def in_allowed_groups(groups: tuple[GitLabGroup, ...], allowed: tuple[str, ...]) -> bool:
    """Rule 2: some group equals an allowed path or lies below it (case-sensitive; `acme-corp` is not in `acme`)."""
    return any(g.full_path == a or g.full_path.startswith(a + "/") for g in groups for a in allowed)


async def sign_in(pool: asyncpg.Pool, cfg: ProvisioningConfig, user: GitLabUser,
                  groups: tuple[GitLabGroup, ...] | None, *, bind_groups: bool, session: NewSession
                  ) -> SignInResult:
    """Apply rules 2-8 for a GitLab user already fetched and open their session; SignInRefused on a refusal.

    The session row is written in the same transaction, under the user row's lock: an administrator's
    deactivation either comes first (and this sign-in is refused) or waits and then revokes this session too.
    """
    try:
        _check_gitlab(cfg, user, groups)
        for attempt in range(RETRIES):
            try:
                async with pool.acquire() as conn, db_signin.user_transaction(conn, user.id):
                    return await _apply(conn, cfg, user, groups, bind_groups=bind_groups, session=session)
            except RACES as exc:
                # Another transaction changed what we read (a login taken, a group deleted, the same GitLab
                # id pre-provisioned, a deadlock): everything was rolled back, so start again from a fresh read.
                log.info("sign-in raced with another change; retrying",
                         extra={"error": type(exc).__name__, "attempt": attempt + 1})
                await asyncio.sleep(0.01 * (attempt + 1))
        raise DatabaseUnavailable("Your sign-in kept colliding with other changes to your account",
                                  advice="Nothing was changed. Sign in again in a moment.")
    except _Refusal as refusal:
        await _audit_refusal(pool, user, refusal)
        raise SignInRefused(refusal.message, code=refusal.code, advice=refusal.advice, login=user.username,
                            gitlab_id=user.id) from None
    except DB_UNAVAILABLE as exc:
        raise unavailable("sign-in", exc) from None  # logged once, with the request (app.errors_middleware)


def _check_gitlab(cfg: ProvisioningConfig, user: GitLabUser, groups: tuple[GitLabGroup, ...] | None) -> None:
    """Rules 1 and 2 on what GitLab said: an active account inside the allowed groups, else a _Refusal."""
    if user.state != "active":
        raise _Refusal("blocked", "Your GitLab account is not active",
                       "Ask a GitLab administrator to unblock your account.", {"state": user.state})
    unusable = unusable_profile_field(user)
    if unusable is not None:
        # A CR/LF would break every identity header sent upstream, a NUL cannot be stored (SPEC §16).
        raise _Refusal(
            "invalid_profile", f"Your GitLab {unusable} contains control characters (such as a line break)",
            f"Edit your {unusable} in GitLab (Edit profile), remove them, then sign in again.",
            {"field": unusable})
    if cfg.allowed_groups and (groups is None or not in_allowed_groups(groups, cfg.allowed_groups)):
        raise _Refusal(
            "not_allowed",
            "You are not allowed to sign in: you are not a member of an allowed GitLab group",
            "Ask to be added to one of the allowed GitLab groups, then sign in again.",
            {"allowed_groups": list(cfg.allowed_groups)})


async def _audit_refusal(pool: asyncpg.Pool, user: GitLabUser, refusal: _Refusal) -> None:
    await audit_refusal(pool, printable(user.username), refusal.code, gitlab_id=user.id, **refusal.details)


async def audit_gitlab_refusal(pool: asyncpg.Pool, refusal: SignInRefused) -> str:
    """Audit a sign-in that GitLab itself refused (SPEC §16) and return who it was, as the audit names them.

    GitLab does not say who a refused token belongs to beyond its user id, so the subject is the local login
    of that GitLab user when there is one, else `gitlab-user:<id>`, else the username GitLab gave.
    """
    subject = refusal.login or ""
    if refusal.gitlab_id is not None:
        try:
            async with pool.acquire() as conn:
                known = await db_users.by_gitlab_id(conn, refusal.gitlab_id)
        except DB_UNAVAILABLE:
            known = None
        subject = known.login if known is not None else subject or f"gitlab-user:{refusal.gitlab_id}"
    subject = subject or "unknown GitLab user"
    details: dict[str, object] = {"message": refusal.message}
    if refusal.gitlab_id is not None:
        details["gitlab_id"] = refusal.gitlab_id
    await audit_refusal(pool, subject, refusal.code, **details)
    return subject


async def audit_refusal(pool: asyncpg.Pool, subject: str, reason: str, **details: object) -> None:
    """Record a refused sign-in (best effort: the refusal page is shown even if this cannot be written)."""
    try:
        await db_audit.record(pool, ACTOR, "sign_in.refused", subject, reason=reason, **details)
    except DB_UNAVAILABLE:
        log.error("could not audit a refused sign-in", extra={"reason": reason})


async def _apply(conn: asyncpg.Connection, cfg: ProvisioningConfig, gl: GitLabUser,
                 groups: tuple[GitLabGroup, ...] | None, *, bind_groups: bool, session: NewSession
                 ) -> SignInResult:
    # Rule 3: find by GitLab id, else a pre-provisioned unlinked row by username; with everything rules 6-7 need.
    synced = cfg.sync_groups and groups is not None
    matchable = _matchable(cfg, groups if synced else None, bind_groups=bind_groups)
    user, holder, state = await db_signin.sign_in_state(conn, gl.id, gl.username, matchable.gitlab_ids,
                                                        matchable.paths)
    created = False
    if user is None and holder is not None and holder.gitlab_id is None:
        user = holder  # link it below by writing gitlab_id
    if user is None:
        # Rule 4: a new user.
        if not cfg.allow_signup:
            raise _Refusal("signup_disabled", "Sign-up is disabled: ask an administrator to create your account",
                           "An administrator must create your account before you can sign in.", {})
        if holder is not None:
            raise _username_taken(gl, holder)
        user = await db_signin.insert_user(conn, gitlab_id=gl.id, login=gl.username, name=gl.name, email=gl.email,
                                           actor=ACTOR)
        created = True
    else:
        user = await _refresh_existing(conn, user, gl, holder, actor=ACTOR)
    # Lock order (db/locks.py): the grant row (step 3) before any group row (step 4). Group rows are locked
    # only to bind a group or to follow a rename (rare): then the grant is written first, else at the end.
    grant, replaced = session.grant, None
    if grant is not None and _locks_groups(state, matchable, bind_groups=bind_groups):
        replaced = await db_grants.keep(conn, user.id, grant, interval=session.resync_interval)
        grant = None
    added, removed, mismatches = await _memberships(conn, cfg, user.id, matchable, bind_groups=bind_groups,
                                                    actor=ACTOR, state=state)
    sid = new_session_id()
    done = await db_signin.finish(
        conn, user.id, synced=synced, sid=sid, lifetime=session.lifetime, user_agent=session.user_agent,
        client_ip=session.client_ip, grant=grant, grant_interval=session.resync_interval, actor=ACTOR,
        login=user.login, details={"gitlab_id": gl.id, "added": added, "removed": removed,
                                   "synced": cfg.sync_groups}, notify=bool(added or removed))
    user = done.user
    identity = Identity(user_id=user.id, login=user.login, email=user.email, groups=done.group_names,
                        gitlab_id=user.gitlab_id)
    return SignInResult(user, identity, created, sid, done.expires_at, tuple(added), tuple(removed),
                        tuple(mismatches), replaced_grant=done.replaced_grant if grant is not None else replaced)


def _locks_groups(state: db_signin.GroupState, matchable: _Matchable, *, bind_groups: bool) -> bool:
    """Whether rules 6-7 will lock group rows (see _targets): a group to bind, or a bound group to rename."""
    if not bind_groups or matchable.groups is None:
        return False
    default_id = state.default[0]
    if any(gitlab_group_id is None for gid, _name, gitlab_group_id in state.named if gid != default_id):
        return True
    paths = {g.id: g.full_path for g in matchable.groups if g.id is not None}
    return any(gid != default_id and not builtin and name != paths[gitlab_group_id]
               for gid, name, builtin, gitlab_group_id in state.bound)


async def _refresh_existing(conn: asyncpg.Connection, user: db_users.User, gl: GitLabUser,
                            holder: db_users.User | None, *, actor: str) -> db_users.User:
    """Rule 5: an existing user; refresh login, name and email from GitLab (or a _Refusal)."""
    if not user.active:
        raise _Refusal("deactivated", "Your account is deactivated",
                       "Only an administrator can reactivate it.", {"login": user.login})
    if holder is not None and holder.id != user.id:
        raise _username_taken(gl, holder)
    linked = user.gitlab_id is None
    if linked or (user.login, user.name, user.email) != (gl.username, gl.name, gl.email):
        before = user
        user = await db_users.refresh_profile(conn, user.id, gitlab_id=gl.id, login=gl.username,
                                              name=gl.name, email=gl.email)
        changes = {k: [getattr(before, k), getattr(user, k)] for k in ("login", "name", "email")
                   if getattr(before, k) != getattr(user, k)}
        await db_audit.record(conn, actor, "user.linked" if linked else "user.updated", user.login,
                              gitlab_id=gl.id, **changes)
    return user


async def lock_person(conn: asyncpg.Connection, gitlab_id: int) -> db_users.User | None:
    """Lock order steps 1 and 2 (db/locks.py): the person's advisory lock, then the users row linked to this
    GitLab id (None when no row is linked to it yet)."""
    await db_locks.person(conn, gitlab_id)
    return await db_users.by_gitlab_id_for_update(conn, gitlab_id)


async def recheck(conn: asyncpg.Connection, cfg: ProvisioningConfig, user_id: int, linked: db_users.User | None,
                  gl: GitLabUser, groups: tuple[GitLabGroup, ...] | None, *, bind_groups: bool, actor: str,
                  audit_unchanged: bool = False) -> RecheckResult:
    """SPEC §11: rules 1, 2, 5-8 for a user whose session lives, inside the caller's transaction.

    `sync.resync` is audited when memberships changed, or always with audit_unchanged (an administrator's
    "sync now": they asked, the answer is on record). Background re-checks that change nothing write only the
    sync fields: one audit row per user per resync_interval would bury the log (10,000 users: ~1M rows a day).

    The same code as a sign-in; a refusal is returned (the caller revokes the sessions) instead of raised,
    and nothing of the refused user is changed. Rule 8's last_sync_at is the caller's to record, in the same
    transaction (db/grants.py SUCCEEDED writes it with the schedule, in one statement).

    `linked` is what `lock_person(conn, gl.id)` returned: the caller takes the person's locks first, then its
    grant row, in the order db/locks.py defines.
    """
    user = linked
    if user is None or user.id != user_id:
        current = await db_users.by_id(conn, user_id)
        assert current is not None, "the grant row references the user"
        return RecheckResult(current, refusal="unlinked",
                             message="the GitLab account of the kept grant is no longer linked to this user")
    # Rule 5's "username taken" can only happen when GitLab reports another username than the login (the
    # unique index on lower(login) makes the user the only holder of its own login).
    holder = user if gl.username == user.login else await db_users.by_login(conn, gl.username, for_update=True)
    try:
        _check_gitlab(cfg, gl, groups)
        before = user
        user = await _refresh_existing(conn, user, gl, holder, actor=actor)
    except _Refusal as refusal:
        return RecheckResult(user, refusal=refusal.code, message=refusal.message)
    added, removed, _ = await _memberships(conn, cfg, user.id,
                                           _matchable(cfg, groups if cfg.sync_groups else None,
                                                      bind_groups=bind_groups),
                                           bind_groups=bind_groups, actor=actor)
    if added or removed or audit_unchanged:  # (a profile change is audited as `user.updated`)
        await db_audit.record(conn, actor, "sync.resync", user.login, gitlab_id=gl.id, added=added, removed=removed)
    changed = bool(added or removed) or (before.login, before.email) != (user.login, user.email)
    if changed:
        await db_notify.notify(conn, "user", user.id)
    return RecheckResult(user, tuple(added), tuple(removed), changed)


def _username_taken(gl: GitLabUser, holder: db_users.User) -> _Refusal:
    return _Refusal(
        "username_taken",
        f"The username {gl.username} is already used by another account here",
        "Ask an administrator to rename or remove the other account, then sign in again.",
        {"login": gl.username, "held_by_gitlab_id": holder.gitlab_id})


@dataclass(frozen=True, slots=True)
class _Matchable:
    """The GitLab groups rules 6-7 consider (None: sync off), and what to look them up by."""

    groups: tuple[GitLabGroup, ...] | None
    gitlab_ids: list[int]
    paths: list[str]


def _matchable(cfg: ProvisioningConfig, groups: tuple[GitLabGroup, ...] | None, *, bind_groups: bool) -> _Matchable:
    if groups is not None and cfg.allowed_groups:
        # SPEC §16: only groups inside the allowed subtrees are matched and bound. Elsewhere on gitlab.com a
        # stranger may own a top-level group named like a local group ("ops") and would be synced into it.
        groups = tuple(g for g in groups if in_allowed_groups((g,), cfg.allowed_groups))
    return _Matchable(groups, [g.id for g in groups or () if g.id is not None] if bind_groups else [],
                      list(dict.fromkeys(g.full_path for g in groups or ())))


async def _memberships(conn: asyncpg.Connection, cfg: ProvisioningConfig, user_id: int, matchable: _Matchable,
                       *, bind_groups: bool, actor: str, state: db_signin.GroupState | None = None
                       ) -> tuple[list[str], list[str], list[str]]:
    """The default group (rule 4) and, with groups to match (sync on), rules 6 and 7: one read of everything
    they need (unless the caller read it), one write of the memberships that change (none when nothing does).
    (added, removed, mismatches)."""
    groups = matchable.groups
    if state is None:
        state = await db_signin.group_state(conn, user_id, matchable.gitlab_ids, matchable.paths)
    default_id = state.default[0]
    have = {group_id: (name, source) for group_id, name, source in state.memberships}
    add: list[tuple[int, str]] = [] if default_id in have else [(default_id, "default")]
    target: dict[int, str] = {}
    mismatches: list[str] = []
    if groups is not None:
        target, mismatches = await _targets(conn, groups, state, bind_groups=bind_groups, actor=actor)
    add += [(gid, "sync") for gid in sorted(set(target) - set(have))]
    # With sync_groups off (groups None), memberships stay exactly as they are (rule 6).
    drop = [gid for gid, (_name, source) in have.items() if groups is not None and gid not in target
            and gid != default_id and (source == "sync" or not cfg.keep_manual_memberships)]
    inserted = await db_signin.change_memberships(conn, user_id, add, drop) if add or drop else set()
    added = sorted(target[gid] for gid in inserted if gid != default_id)
    return added, sorted(have[gid][0] for gid in drop), mismatches


async def _targets(conn: asyncpg.Connection, groups: tuple[GitLabGroup, ...], state: db_signin.GroupState, *,
                   bind_groups: bool, actor: str) -> tuple[dict[int, str], list[str]]:
    """Rules 6 and 7: the local groups (id -> name) the user belongs in, and the groups not bound for a
    mismatch. Binding, renames and case mismatches (rare) write here, one statement per row."""
    default_id = state.default[0]
    by_path = {g.full_path: g for g in groups}
    target: dict[int, str] = {}
    if bind_groups:
        # SPEC §11: a bound group matches its GitLab id whatever its path is now, and follows renames.
        by_id = {g.id: g for g in groups if g.id is not None}
        for gid, name, builtin, gitlab_group_id in state.bound:
            if gid == default_id:
                continue
            new_path = by_id[gitlab_group_id].full_path
            if name == new_path or builtin:
                target[gid] = name
            else:
                bound = await db_groups.by_id(conn, gid)
                if bound is not None:
                    target[gid] = await renames.follow(conn, bound, new_path, actor=actor)
    await renames.report_case_mismatches(conn, list(by_path), actor=actor, found=state.case_mismatches)
    candidates = [(gid, name, gitlab_group_id) for gid, name, gitlab_group_id in state.named if gid != default_id]
    unbound = [gid for gid, _name, gitlab_group_id in candidates if gitlab_group_id is None]
    if bind_groups and unbound:
        # Lock the groups about to be bound, in id order, and read them again: a concurrent sign-in may have
        # bound them meanwhile (the lock order keeps two sign-ins from deadlocking).
        await db_groups.lock_for_binding(conn, unbound)
        candidates = [(g.id, g.name, g.gitlab_group_id) for g in await db_groups.by_names(conn, list(by_path))
                      if g.id != default_id]
    mismatches: list[str] = []
    for gid, name, local_gitlab_id in candidates:
        if gid in target:
            continue
        gitlab_id = by_path[name].id
        if not bind_groups or gitlab_id is None:
            target[gid] = name
        elif local_gitlab_id is None:
            if await db_groups.bind(conn, gid, gitlab_id):
                await db_audit.record(conn, actor, "group.bound", name, gitlab_group_id=gitlab_id)
                target[gid] = name
            else:
                # Another local group is bound to this GitLab group (it was renamed at GitLab and a group
                # with the new name was created here): bind neither, say so, and let an administrator merge.
                mismatches.append(name)
                await db_audit.record(conn, actor, "group.binding_mismatch", name,
                                      seen_gitlab_group_id=gitlab_id,
                                      message="this GitLab group is already bound to another local group "
                                              "(renamed at GitLab?); rename or delete one of the two")
        elif local_gitlab_id == gitlab_id:
            target[gid] = name
        else:
            mismatches.append(name)
            await db_audit.record(conn, actor, "group.binding_mismatch", name,
                                  bound_gitlab_group_id=local_gitlab_id, seen_gitlab_group_id=gitlab_id,
                                  message="a GitLab group with this path but another id was ignored")
    return target, mismatches
