"""Groups and memberships: list, create, rename, delete, add and remove members.

Group names. A local group is matched to a GitLab group when its name equals the GitLab full path exactly
(SPEC §5 rule 6), so a name that looks like a path must be one GitLab could have; anything else is a
local-only group that sync never touches. The rule (`check_name`):

- 1 to 255 characters, no leading or trailing whitespace, no control characters, no "," (the groups
  header joins names with ",": a group "admins,other" would read as two groups upstream, SPEC §16);
- a name that contains "/" or is made only of GitLab path characters [A-Za-z0-9_.-] is a GitLab full path and
  must be a valid one: 1 to 21 segments (a group and at most 20 ancestors) separated by single "/", each
  segment starting and ending with a letter or digit, with no two special characters (_ . -) in a row, and
  not ending in ".git" or ".atom";
- any other name (with a space, say: "Release managers") is local-only: members are added by administrators.

Changes NOTIFY the processes' session caches: `user:<id>` for a membership, `all` when a group is renamed or
deleted (every member's identity carries its name).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from gateway.db import audit as db_audit
from gateway.db import groups as db_groups
from gateway.db import notify as db_notify
from gateway.db import users as db_users
from gateway.db.groups import Group
from gateway.errors import Conflict, NotFound, Unprocessable
from gateway.services import paging
from gateway.services._db import transaction
from gateway.services.accounts import CONTROL_CHARS

MAX_NAME = 255
MAX_DESCRIPTION = 2000
MAX_SEGMENTS = 21
_PATH_CHARS = re.compile(r"[A-Za-z0-9_./-]+")
_SEGMENT = re.compile(r"[A-Za-z0-9](?:[_.-]?[A-Za-z0-9])*")


@dataclass(frozen=True, slots=True)
class Member:
    login: str
    name: str
    email: str
    active: bool
    source: str
    added_at: datetime


def _member(r: asyncpg.Record) -> Member:
    return Member(r["login"], r["name"], r["email"], r["active"], r["source"], r["added_at"])


def header_problem(name: str) -> str | None:
    """Why `name` cannot travel in the comma-joined groups header (SPEC §16), or None when it can."""
    if not name or not name.strip():
        return "A group name must not be empty"
    if name != name.strip():
        return "A group name must not start or end with whitespace"
    if CONTROL_CHARS.search(name):
        return "A group name must not contain control characters"
    if "," in name:
        return ("A group name must not contain ',': the groups header joins names with ',' so the tool would "
                "read it as several groups")
    return None


def check_name(name: str) -> str:
    """The group-name rule of this module's docstring; Unprocessable with the reason when broken."""
    problem = header_problem(name)
    if problem is not None:
        raise Unprocessable(problem)
    if len(name) > MAX_NAME:
        raise Unprocessable(f"A group name must be at most {MAX_NAME} characters long")
    if "/" in name or _PATH_CHARS.fullmatch(name):
        segments = name.split("/")
        if len(segments) > MAX_SEGMENTS:
            raise Unprocessable(f"{name!r} is not a valid GitLab group path: at most {MAX_SEGMENTS} levels")
        for seg in segments:
            if not _SEGMENT.fullmatch(seg) or seg.lower().endswith((".git", ".atom")):
                raise Unprocessable(
                    f"{name!r} is not a valid GitLab group path: each part between slashes must use only letters, "
                    "digits, '_', '.' and '-', start and end with a letter or digit, have no two of '_.-' in a row "
                    "and not end in .git or .atom (names with a space or other characters are local-only groups)")
    return name


def check_description(description: str) -> str:
    if re.search(r"[\x00\ud800-\udfff]", description):  # PostgreSQL text cannot store them (SPEC §16)
        raise Unprocessable("A group description must not contain NUL bytes or invalid Unicode")
    if len(description) > MAX_DESCRIPTION:
        raise Unprocessable(f"A group description must be at most {MAX_DESCRIPTION} characters long")
    return description


async def _group(conn: asyncpg.Connection, group_id: int) -> Group:
    group = await db_groups.by_id(conn, group_id)
    if group is None:
        raise NotFound(f"No group with id {group_id}")
    return group


async def _user(conn: asyncpg.Connection, login: str) -> db_users.User:
    user = await db_users.by_login(conn, login)
    if user is None:
        raise NotFound(f"No user with login {login}")
    return user


async def misnamed_groups(conn: asyncpg.Connection) -> list[tuple[str, str]]:
    """(name, problem) of every existing group whose name breaks the header rule (made before SPEC §16)."""
    return [(name, problem) for name in await db_groups.all_names(conn)
            if (problem := header_problem(name)) is not None]


async def list_groups(pool: asyncpg.Pool, *, cursor: str | None = None, limit: int | None = None
                      ) -> paging.Page[Group]:
    """Groups in id order, with their member counts."""
    n = paging.check_limit(limit)
    key = paging.decode("groups", cursor)
    async with transaction(pool) as conn:
        rows = await db_groups.listing(conn, after=int(key[0]) if key else None, limit=n + 1)
    return paging.page(rows, n, lambda g: paging.encode("groups", g.id))


async def get_group(pool: asyncpg.Pool, group_id: int) -> Group:
    async with transaction(pool) as conn:
        return await _group(conn, group_id)


async def find_group(pool: asyncpg.Pool, name_or_id: str) -> Group:
    """For the CLI: a group by exact name, else by numeric id (a group may well be named "42")."""
    is_id = name_or_id.isascii() and name_or_id.isdigit()  # isdigit() alone accepts "²", which int() refuses
    async with transaction(pool) as conn:
        group = await db_groups.by_name(conn, name_or_id)
        if group is None and is_id and len(name_or_id) < 19:
            group = await db_groups.by_id(conn, int(name_or_id))
    if group is None:
        raise NotFound(f"No group named {name_or_id}" + (" or with that id" if is_id else ""))
    return group


async def create_group(pool: asyncpg.Pool, name: str, description: str = "", *, actor: str,
                       gitlab_group_id: int | None = None) -> Group:
    """A new local group (201), bound to `gitlab_group_id` when given (SPEC §16: then only that GitLab group,
    whatever its path, ever matches it); Conflict when the name or the GitLab group is taken."""
    check_name(name)
    check_description(description)
    if gitlab_group_id is not None and not 0 < gitlab_group_id < 2**63:
        raise Unprocessable("gitlab_group_id must be a positive integer (the numeric id of the GitLab group)")
    try:
        async with transaction(pool) as conn:
            group = await db_groups.insert(conn, name, description, gitlab_group_id)
            await db_audit.record(conn, actor, "group.created", group.name, group=group.name, group_id=group.id,
                                  description=description, gitlab_group_id=gitlab_group_id)
    except asyncpg.UniqueViolationError as exc:
        if getattr(exc, "constraint_name", "") and "gitlab_group_id" in str(exc.constraint_name):
            raise Conflict(f"GitLab group {gitlab_group_id} is already bound to another local group") from None
        raise Conflict(f"A group named {name} already exists") from None
    return group


async def update_group(pool: asyncpg.Pool, group_id: int, *, name: str | None = None,
                       description: str | None = None, actor: str) -> Group:
    """Rename and/or describe a group. The default group keeps the name set by provisioning.default_group."""
    if name is not None:
        check_name(name)
    if description is not None:
        check_description(description)
    try:
        async with transaction(pool) as conn:
            await db_groups.lock(conn, group_id)
            before = await _group(conn, group_id)
            if name is not None and name != before.name and before.builtin:
                raise Conflict(f"{before.name} is the default group: its name is set by provisioning.default_group "
                               "in the configuration, not here")
            group = await db_groups.update(conn, group_id, name=name, description=description)
            assert group is not None
            changes = {k: [getattr(before, k), getattr(group, k)] for k in ("name", "description")
                       if getattr(before, k) != getattr(group, k)}
            if changes:
                if "name" in changes:
                    await db_notify.notify(conn, "all")
                await db_audit.record(conn, actor, "group.updated", group.name, group=group.name,
                                      group_id=group.id, **changes)
    except asyncpg.UniqueViolationError:
        raise Conflict(f"A group named {name} already exists") from None
    return group


async def delete_group(pool: asyncpg.Pool, group_id: int, *, actor: str) -> Group:
    """Delete a group and its memberships; the default group cannot be deleted (Conflict)."""
    async with transaction(pool) as conn:
        await db_groups.lock(conn, group_id)
        group = await _group(conn, group_id)
        if group.builtin:
            raise Conflict(f"{group.name} is the default group (provisioning.default_group); it cannot be deleted")
        members = await db_groups.member_logins(conn, group_id)
        await db_groups.delete(conn, group_id)
        await db_notify.notify(conn, "all")
        await db_audit.record(conn, actor, "group.deleted", group.name, group=group.name, group_id=group.id,
                              members=members)
    return group


async def list_members(pool: asyncpg.Pool, group_id: int, *, cursor: str | None = None,
                       limit: int | None = None) -> paging.Page[Member]:
    """Members of a group, by login (case-insensitive order), with the source of each membership."""
    n = paging.check_limit(limit)
    key = paging.decode("members", cursor, str)
    async with transaction(pool) as conn:
        await _group(conn, group_id)
        rows = await db_groups.members(conn, group_id, after=key[0] if key else None, limit=n + 1)
    members = [_member(r) for r in rows]
    return paging.page(members, n, lambda m: paging.encode("members", m.login))


async def add_member(pool: asyncpg.Pool, group_id: int, login: str, *, actor: str) -> Member:
    """Add a user to a group by hand (source `manual`); Conflict when already a member."""
    try:
        async with transaction(pool) as conn:
            group = await _group(conn, group_id)
            user = await _user(conn, login)
            source = "default" if group.builtin else "manual"
            if not await db_users.add_membership(conn, user.id, group.id, source):
                existing = await db_users.membership_source(conn, user.id, group.id)
                raise Conflict(f"{user.login} is already a member of {group.name} (source {existing})")
            await db_notify.notify(conn, "user", user.id)
            await db_audit.record(conn, actor, "group.member_added", user.login, group=group.name,
                                  group_id=group.id, login=user.login, source=source)
            row = await db_groups.member(conn, group.id, user.id)
    except asyncpg.ForeignKeyViolationError:
        raise NotFound(f"No group with id {group_id}") from None  # deleted while we were adding to it
    assert row is not None
    return _member(row)


async def remove_member(pool: asyncpg.Pool, group_id: int, login: str, *, actor: str) -> Member:
    """Remove a user from a group (returning the membership removed); nobody leaves the default group."""
    async with transaction(pool) as conn:
        group = await _group(conn, group_id)
        user = await _user(conn, login)
        if group.builtin:
            raise Conflict(f"{group.name} is the default group: every user is a member; deactivate the user instead")
        row = await db_groups.member(conn, group.id, user.id)
        if row is None or await db_users.remove_membership(conn, user.id, group.id) is None:
            raise NotFound(f"{user.login} is not a member of {group.name}")
        await db_notify.notify(conn, "user", user.id)
        await db_audit.record(conn, actor, "group.member_removed", user.login, group=group.name,
                              group_id=group.id, login=user.login, source=row["source"])
    return _member(row)
