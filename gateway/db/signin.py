"""The sign-in transaction's statements, batched (SPEC §5 rules 3-8 and §11's kept grant).

A sign-in touches users, groups, memberships, audit events, sessions and grants. Written one statement per
row it took 19 round trips to PostgreSQL when nothing changed and over 60 for a first sign-in with 50
groups, each costing the gateway and the database more CPU than the rules themselves (bench/README.md).
Here a repeat sign-in is four: BEGIN with the user's lock, one read of everything rules 3-7 need, the end of
the sign-in (sign-in times, the audit event, the session, the grant and the resulting group names), COMMIT.
A new user (with its audit event) and the membership changes, when there are any, are one more each. The
rare steps (binding a group, following a rename, a case mismatch) keep the per-row statements of
db/groups.py and sync/renames.py.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from gateway.db import users as db_users
from gateway.db.notify import CHANNEL

# BEGIN and the person's advisory lock (db/locks.py step 1: sign-ins and re-checks of one GitLab user run one at
# a time) in one round trip: a simple query, which carries no parameters, so the id is written into it (an int,
# formatted by int.__format__). The key is db/locks.py's PERSON: the same text, hashed the same way.
BEGIN_LOCKED = "BEGIN; SELECT pg_advisory_xact_lock(hashtextextended('gateway-user:{gitlab_id:d}', 0))"

# Rules 6-7 and the identity: the default group, local groups bound to the GitLab ids ($2), local groups named
# like the paths ($3), local groups named like a path but for case ($4: the paths lower-cased), and the user's
# memberships ({user}: an expression giving the user's id).
_GROUP_STATE_COLUMNS = """
  (SELECT json_build_array(g.id, g.name) FROM groups g WHERE g.builtin ORDER BY g.id LIMIT 1)::text AS default_group,
  (SELECT coalesce(json_agg(json_build_array(g.id, g.name, g.builtin, g.gitlab_group_id) ORDER BY g.id), '[]')
   FROM groups g WHERE g.gitlab_group_id = ANY($2::bigint[]))::text AS bound,
  (SELECT coalesce(json_agg(json_build_array(g.id, g.name, g.gitlab_group_id) ORDER BY g.id), '[]')
   FROM groups g WHERE g.name = ANY($3::text[]))::text AS named,
  (SELECT coalesce(json_agg(json_build_array(g.id, g.name) ORDER BY g.id), '[]')
   FROM groups g WHERE lower(g.name) = ANY($4::text[]) AND NOT (g.name = ANY($3::text[])))::text AS case_mismatches,
  (SELECT coalesce(json_agg(json_build_array(m.group_id, g.name, m.source) ORDER BY g.id), '[]')
   FROM memberships m JOIN groups g ON g.id = m.group_id WHERE m.user_id = {user})::text AS memberships"""
GROUP_STATE = "SELECT" + _GROUP_STATE_COLUMNS.format(user="$1")

# A sign-in's one read: rule 3's candidates (the user linked to GitLab id $1 and the user holding username $5:
# the same row, two rows or none), locked in id order, and the group state of the one it will be (linked, else
# the unlinked holder; a new user has no memberships).
SIGN_IN_STATE = f"""
WITH c AS (
  SELECT {db_users.SELECT_COLUMNS}, gitlab_id = $1 AS by_gitlab_id, lower(login) = lower($5) AS by_login
  FROM users WHERE gitlab_id = $1 OR lower(login) = lower($5)
  ORDER BY id FOR UPDATE)
SELECT (SELECT coalesce(json_agg(c ORDER BY c.id), '[]') FROM c)::text AS candidates,""" + \
    _GROUP_STATE_COLUMNS.format(user="(SELECT id FROM c WHERE by_gitlab_id OR (by_login AND gitlab_id IS NULL) "
                                     "ORDER BY by_gitlab_id DESC LIMIT 1)")

# Rule 6 in one statement: memberships added ($2 with their sources $3; an existing one is left as it is) and
# removed ($4). Returns the group ids actually added.
CHANGE_MEMBERSHIPS = """
WITH removed AS (DELETE FROM memberships WHERE user_id = $1 AND group_id = ANY($4::bigint[])),
added AS (
  INSERT INTO memberships (user_id, group_id, source)
  SELECT $1, a.group_id, a.source FROM unnest($2::bigint[], $3::text[]) AS a (group_id, source)
  ON CONFLICT (user_id, group_id) DO NOTHING
  RETURNING group_id)
SELECT coalesce(array_agg(group_id), '{}') FROM added"""

# Rule 8 and the session (and §11's grant when $7 is not NULL), in one statement: the sign-in times, the
# audit event, the session row, the grant (returning the one it replaces, locked first so that a rotation
# committed meanwhile is the one returned), and the names of the user's local groups, in byte order.
FINISH = f"""
WITH u AS (
  UPDATE users SET last_login_at = now(), last_sync_at = CASE WHEN $2 THEN now() ELSE last_sync_at END
  WHERE id = $1 RETURNING {db_users.SELECT_COLUMNS}),
audit AS (INSERT INTO audit_events (actor, action, subject, details) VALUES ($9, 'sign_in', $10, $11::jsonb)),
s AS (
  INSERT INTO sessions (id, user_id, expires_at, user_agent, client_ip)
  VALUES ($3, $1, now() + make_interval(secs => $4), $5, $6)
  RETURNING EXTRACT(EPOCH FROM expires_at)::float8 AS expires_at),
previous AS (SELECT refresh_token FROM gitlab_grants WHERE user_id = $1 AND $7::text IS NOT NULL FOR UPDATE),
kept AS (
  INSERT INTO gitlab_grants AS g (user_id, refresh_token, next_sync_at, confirmed_at, failures, last_error)
  SELECT $1, $7, now() + make_interval(secs => $8), now(), 0, '' WHERE $7::text IS NOT NULL
  ON CONFLICT (user_id) DO UPDATE SET
    refresh_token = EXCLUDED.refresh_token, next_sync_at = EXCLUDED.next_sync_at, confirmed_at = now(),
    failures = 0, last_error = '', lease_owner = NULL, lease_until = NULL, updated_at = now())
SELECT u.*, s.expires_at, (SELECT refresh_token FROM previous) AS replaced,
  ARRAY(SELECT g.name FROM memberships m JOIN groups g ON g.id = m.group_id
        WHERE m.user_id = $1 ORDER BY g.name COLLATE "C") AS group_names,
  -- db/notify.py's `user:<id>` when memberships changed ($12), delivered at commit.
  (SELECT pg_notify($13, 'user:' || $1::bigint::text) WHERE $12) AS notified
FROM u, s"""

# Rule 4: a new user and its `user.created` audit event.
INSERT_USER = f"""
WITH u AS (
  INSERT INTO users (gitlab_id, login, name, email, provisioned_by) VALUES ($1, $2, $3, $4, $5)
  RETURNING {db_users.SELECT_COLUMNS}),
audit AS (INSERT INTO audit_events (actor, action, subject, details) SELECT $6, 'user.created', u.login, $7::jsonb
          FROM u)
SELECT * FROM u"""


@dataclass(frozen=True, slots=True)
class GroupState:
    """What GROUP_STATE read, as plain tuples."""

    default: tuple[int, str]
    bound: tuple[tuple[int, str, bool, int], ...]  # id, name, builtin, gitlab_group_id
    named: tuple[tuple[int, str, int | None], ...]  # id, name, gitlab_group_id
    case_mismatches: tuple[tuple[int, str], ...]  # id, name
    memberships: tuple[tuple[int, str, str], ...]  # group id, name, source


@dataclass(frozen=True, slots=True)
class Finished:
    user: db_users.User
    expires_at: float
    replaced_grant: str | None
    group_names: tuple[str, ...]


def _tuples(text: str) -> tuple[Any, ...]:
    return tuple(tuple(item) for item in json.loads(text))


@contextlib.asynccontextmanager
async def user_transaction(conn: asyncpg.Connection, gitlab_id: int) -> AsyncIterator[None]:
    """A transaction holding the advisory lock of one GitLab user; committed on success, else rolled back."""
    await conn.execute(BEGIN_LOCKED.format(gitlab_id=int(gitlab_id)))
    try:
        yield
    except BaseException:
        if not conn.is_closed():
            # The first error is the one to report; a connection that cannot even roll back is dropped by the
            # pool's release (which also rolls back whatever a cancellation left open).
            with contextlib.suppress(Exception):
                await conn.execute("ROLLBACK")
        raise
    await conn.execute("COMMIT")


def _state(r: asyncpg.Record) -> GroupState:
    assert r["default_group"] is not None, "migration 0001 creates the builtin group"
    default = json.loads(r["default_group"])
    return GroupState((default[0], default[1]), _tuples(r["bound"]), _tuples(r["named"]),
                      _tuples(r["case_mismatches"]), _tuples(r["memberships"]))


def _user(row: dict[str, Any]) -> db_users.User:
    """A users row read as JSON (timestamps as ISO 8601 text)."""
    def when(key: str) -> datetime | None:
        return None if row[key] is None else datetime.fromisoformat(row[key])

    created_at = when("created_at")
    assert created_at is not None
    return db_users.User(row["id"], row["gitlab_id"], row["login"], row["name"], row["email"], row["active"],
                         row["provisioned_by"], created_at, when("last_login_at"), when("last_sync_at"))


async def sign_in_state(conn: asyncpg.Connection, gitlab_id: int, username: str, gitlab_ids: list[int],
                        paths: list[str]) -> tuple[db_users.User | None, db_users.User | None, GroupState]:
    """(the user linked to `gitlab_id`, the user whose login is `username`, both locked and either None, and
    the group state of the one the sign-in is for)."""
    r = await conn.fetchrow(SIGN_IN_STATE, gitlab_id, gitlab_ids, paths, [p.lower() for p in paths], username)
    assert r is not None
    linked = holder = None
    for row in json.loads(r["candidates"]):
        user = _user(row)
        if row["by_gitlab_id"]:
            linked = user
        if row["by_login"]:
            holder = user
    return linked, holder, _state(r)


async def group_state(conn: asyncpg.Connection, user_id: int, gitlab_ids: list[int], paths: list[str]) -> GroupState:
    r = await conn.fetchrow(GROUP_STATE, user_id, gitlab_ids, paths, [p.lower() for p in paths])
    assert r is not None
    return _state(r)


async def change_memberships(conn: asyncpg.Connection, user_id: int, add: list[tuple[int, str]],
                             remove: list[int]) -> set[int]:
    """Add (group id, source) memberships that do not exist yet and remove `remove`; the ids added."""
    added: list[int] = await conn.fetchval(CHANGE_MEMBERSHIPS, user_id, [g for g, _ in add], [s for _, s in add],
                                           remove)
    return set(added)


async def insert_user(conn: asyncpg.Connection, *, gitlab_id: int, login: str, name: str, email: str,
                      actor: str) -> db_users.User:
    """Create a JIT user (provisioned_by jit) and audit it."""
    r = await conn.fetchrow(INSERT_USER, gitlab_id, login, name, email, "jit", actor,
                            json.dumps({"gitlab_id": gitlab_id, "provisioned_by": "jit"}))
    assert r is not None
    return db_users.User.from_record(r)


async def finish(conn: asyncpg.Connection, user_id: int, *, synced: bool, sid: str, lifetime: float,
                 user_agent: str, client_ip: str, grant: str | None, grant_interval: float, actor: str,
                 login: str, details: dict[str, object], notify: bool) -> Finished:
    r = await conn.fetchrow(FINISH, user_id, synced, sid, lifetime, user_agent[:512], client_ip, grant,
                            grant_interval, actor, login, json.dumps(details, default=str), notify, CHANNEL)
    assert r is not None
    return Finished(db_users.User.from_record(r), r["expires_at"], r["replaced"], tuple(r["group_names"]))
