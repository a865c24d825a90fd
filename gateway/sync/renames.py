"""Bound groups follow GitLab renames and transfers (SPEC §11 "Renames" and "Case").

A local group bound to a GitLab group id matches that id whatever its path is now. When GitLab reports another
full path for the id (at sign-in, re-check or webhook) the local group takes the new name, audited
`group.renamed`; when another local group already holds that name, the name stays (the id still matches) and
`group.rename_conflict` is audited. Memberships never drop because of a rename.
"""

from __future__ import annotations

from collections.abc import Iterable

import asyncpg

from gateway.db import audit as db_audit
from gateway.db import groups as db_groups
from gateway.db import notify as db_notify


async def follow(conn: asyncpg.Connection, local: db_groups.Group, full_path: str, *, actor: str) -> str:
    """Rename `local` to GitLab's `full_path` when they differ; the name it has afterwards."""
    if local.name == full_path or local.builtin:
        return local.name
    holder = await db_groups.by_name(conn, full_path)
    if holder is not None and holder.id != local.id:
        await db_audit.record(conn, actor, "group.rename_conflict", local.name, new_name=full_path,
                              gitlab_group_id=local.gitlab_group_id, held_by_group_id=holder.id,
                              message="another local group holds the new GitLab path; the name stays")
        return local.name
    # A savepoint: a rename racing with a group created under the same name must not abort the caller.
    try:
        async with conn.transaction():
            renamed = await db_groups.rename(conn, local.id, full_path)
    except asyncpg.UniqueViolationError:
        await db_audit.record(conn, actor, "group.rename_conflict", local.name, new_name=full_path,
                              gitlab_group_id=local.gitlab_group_id)
        return local.name
    if not renamed:
        return local.name
    await db_audit.record(conn, actor, "group.renamed", full_path, old=local.name, new=full_path,
                          gitlab_group_id=local.gitlab_group_id)
    # Every member's groups header changes: caches refresh everywhere.
    await db_notify.notify(conn, "group", local.id)
    return full_path


async def report_case_mismatches(conn: asyncpg.Connection, paths: list[str], *, actor: str,
                                 found: Iterable[tuple[int, str]] | None = None) -> None:
    """Audit `group.case_mismatch` once per (local group, GitLab path) pair that differ only in case.
    `found`: the (group id, name) pairs of db_groups.case_mismatches(paths), when the caller read them already."""
    if not paths:
        return
    by_lower: dict[str, list[str]] = {}
    for p in paths:
        by_lower.setdefault(p.lower(), []).append(p)
    for group_id, name in await db_groups.case_mismatches(conn, paths) if found is None else found:
        for path in by_lower.get(name.lower(), []):
            if path != name and await db_groups.remember_case_mismatch(conn, group_id, path):
                await db_audit.record(conn, actor, "group.case_mismatch", name, gitlab_path=path,
                                      message="matching is case-sensitive: rename the local group to match")
