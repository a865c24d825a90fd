"""Account services shared by the admin API and the CLI: every change is one transaction, audited, and
announced to every process (NOTIFY) so their session caches drop what changed at once.

Users are created here only by pre-provisioning (`provisioned_by = admin`); provisioning.py creates the others
at their first sign-in. A pre-provisioned user is linked at first sign-in by `gitlab_id`, or by login when it
has none (SPEC §5 rule 3), and is a member of the default group from the start.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import asyncpg

from gateway.db import audit as db_audit
from gateway.db import grants as db_grants
from gateway.db import groups as db_groups
from gateway.db import notify as db_notify
from gateway.db import sessions as db_sessions
from gateway.db import users as db_users
from gateway.errors import Conflict, NotFound, Unprocessable
from gateway.services import paging
from gateway.services._db import transaction

MAX_FIELD = 255
# GitLab usernames: letters, digits, '_', '.', '-'; not starting with '-' or '.', not ending with '.'.
_LOGIN = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_-])?")
_EMAIL = re.compile(r"[^@\s]+@[^@\s]+")
# Control characters (C0, DEL, C1, the Unicode line separators) have no place in names shown in tables, logs
# and headers; nor have lone surrogates, which no database or header can carry (also used by services.groups).
CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


@dataclass(frozen=True, slots=True)
class UserDetails:
    """A user with the names and sources of their group memberships (sorted by name)."""

    user: db_users.User
    groups: tuple[tuple[str, str], ...]
    grant: db_grants.Grant | None = None  # SPEC §11 re-check state; None when no grant was ever kept


def check_login(login: str) -> str:
    if not _LOGIN.fullmatch(login) or len(login) > MAX_FIELD or login.lower().endswith((".git", ".atom")):
        raise Unprocessable(f"{login!r} is not a valid GitLab username: use letters, digits, '_', '.' and '-', "
                            "start with a letter, digit or '_', do not end with '.', '.git' or '.atom'")
    return login


def check_email(email: str) -> str:
    if not _EMAIL.fullmatch(email) or len(email) > MAX_FIELD:
        raise Unprocessable(f"{email!r} is not an email address")
    return email


def check_name(name: str) -> str:
    if not name.strip() or len(name) > MAX_FIELD or CONTROL_CHARS.search(name):
        raise Unprocessable(f"A user's name must be 1 to {MAX_FIELD} printable characters")
    return name


def check_gitlab_id(gitlab_id: int) -> int:
    if not 0 < gitlab_id < 2**63:
        raise Unprocessable("gitlab_id must be a positive integer (the numeric id of the GitLab user)")
    return gitlab_id


async def user_id(conn: asyncpg.Connection, login: str | None) -> int | None:
    """The id of the user with this login (None for no login); NotFound when there is no such user."""
    if login is None:
        return None
    user = await db_users.by_login(conn, login)
    if user is None:
        raise NotFound(f"No user with login {login}")
    return user.id


async def _details(conn: asyncpg.Connection, user: db_users.User) -> UserDetails:
    groups = await db_users.groups_of(conn, [user.id])
    return UserDetails(user, tuple(groups[user.id]), await db_grants.by_user(conn, user.id))


async def list_users(pool: asyncpg.Pool, *, q: str | None = None, active: bool | None = None,
                     cursor: str | None = None, limit: int | None = None) -> paging.Page[UserDetails]:
    """Users by login (case-insensitive order); `q` is a substring of login, name or email."""
    n = paging.check_limit(limit)
    key = paging.decode("users", cursor, str)
    pattern = None
    if q:
        # A literal substring: LIKE's own wildcards in q match only themselves.
        pattern = q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    async with transaction(pool) as conn:
        users = await db_users.search(conn, q=pattern, active=active, after=key[0] if key else None, limit=n + 1)
        groups = await db_users.groups_of(conn, [u.id for u in users[:n]])
        grants = await db_grants.by_users(conn, [u.id for u in users[:n]])
    items = [UserDetails(u, tuple(groups.get(u.id, ())), grants.get(u.id)) for u in users]
    return paging.page(items, n, lambda d: paging.encode("users", d.user.login))


async def get_user(pool: asyncpg.Pool, login: str) -> UserDetails:
    """One user by login (case-insensitive), with their groups."""
    async with transaction(pool) as conn:
        user = await db_users.by_login(conn, login)
        if user is None:
            raise NotFound(f"No user with login {login}")
        return await _details(conn, user)


async def create_user(pool: asyncpg.Pool, *, login: str, email: str, name: str, gitlab_id: int | None = None,
                      actor: str) -> UserDetails:
    """Pre-provision a user (member of the default group); Conflict when the login or gitlab_id is taken."""
    check_login(login)
    check_email(email)
    check_name(name)
    if gitlab_id is not None:
        check_gitlab_id(gitlab_id)
    try:
        async with transaction(pool) as conn:
            holder = await db_users.by_login(conn, login)
            if holder is not None:
                raise Conflict(f"A user with login {holder.login} already exists")
            if gitlab_id is not None and await db_users.by_gitlab_id(conn, gitlab_id) is not None:
                raise Conflict(f"A user with gitlab_id {gitlab_id} already exists")
            user = await db_users.insert(conn, gitlab_id=gitlab_id, login=login, name=name, email=email,
                                         provisioned_by="admin")
            default = await db_groups.default_group(conn)
            await db_users.add_membership(conn, user.id, default.id, "default")
            await db_audit.record(conn, actor, "user.created", user.login, login=user.login, email=email,
                                  name=name, gitlab_id=gitlab_id, provisioned_by="admin", groups=[default.name])
            return await _details(conn, user)
    except asyncpg.UniqueViolationError:
        # Another request created the same login or gitlab_id between our checks and our insert.
        raise Conflict(f"A user with login {login} or gitlab_id {gitlab_id} already exists") from None


async def set_active(pool: asyncpg.Pool, login: str, active: bool, *, actor: str) -> db_users.User:
    """Deactivate (revoking every session, everywhere) or reactivate a user; a no-op when already so."""
    async with transaction(pool) as conn:
        current = await db_users.by_login(conn, login, for_update=True)
        if current is None:
            raise NotFound(f"No user with login {login}")
        if current.active == active:
            return current  # nothing changes: no audit event, no cache flush
        user = await db_users.set_active(conn, login, active)
        assert user is not None  # the row is locked above
        revoked: list[str] = []
        if not active:
            revoked = await db_sessions.revoke_user(conn, user.id)
        await db_notify.notify(conn, "user", user.id)
        await db_audit.record(conn, actor, "user.deactivated" if not active else "user.activated", user.login,
                              sessions_revoked=len(revoked))
    return user
