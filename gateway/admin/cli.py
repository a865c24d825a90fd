"""`gateway groups|users|sessions ...`: the admin commands, on the same services as the admin API.

Each command reads the configuration, connects to the database itself (database.dsn, or the embedded server,
started if needed), calls one service function as actor `cli:<os user>` and prints an aligned table, or with
`--json` the admin API's JSON shapes (lists as {"items": [...], "next": null}, every page fetched).
Errors are GatewayErrors, which cli.main turns into one line on stderr and exit 2 (not found, conflict,
invalid) or 1 (database unavailable, runtime failure).
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import re
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import asyncpg

from gateway.config import Config, default_config_path, load_config
from gateway.db import migrate as db_migrate
from gateway.db.server import create_pool, describe, resolve_dsn
from gateway.errors import GatewayError
from gateway.services import accounts, groups, paging, sessions, shapes
from gateway.services import tokens as svc_tokens

T = TypeVar("T")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")  # a newline in a description must not break the table
Command = Callable[[argparse.Namespace], int]
Action = Callable[[asyncpg.Pool, argparse.Namespace], Awaitable[None]]


def actor() -> str:
    """Who runs the command, as the audit trail names them."""
    try:
        return f"cli:{getpass.getuser()}"
    except (OSError, KeyError):  # no login name and no passwd entry (some containers)
        return f"cli:uid-{os.getuid()}"


# ---- running a command ----------------------------------------------------------------------------------

def _config(args: argparse.Namespace) -> Config:
    return load_config(Path(args.config) if args.config else default_config_path())


async def _pool(cfg: Config) -> asyncpg.Pool:
    dsn = await resolve_dsn(cfg.database)
    pool = await create_pool(dsn, size=2)
    try:
        async with pool.acquire() as conn:
            if await db_migrate.pending(conn):
                raise GatewayError(f"the database at {describe(dsn)} is not migrated: run `gateway migrate` first")
    except BaseException:
        await pool.close()
        raise
    return pool


def command(action: Action) -> Command:
    """Wrap an async action(pool, args) into a CLI command returning exit code 0."""

    def run(args: argparse.Namespace) -> int:
        cfg = _config(args)

        async def main() -> None:
            pool = await _pool(cfg)
            try:
                await action(pool, args)
            finally:
                await pool.close()

        asyncio.run(main())
        return 0

    return run


async def _all(fetch: Callable[[str | None], Awaitable[paging.Page[T]]]) -> list[T]:
    """Every item of a paged listing."""
    items: list[T] = []
    cursor: str | None = None
    while True:
        page = await fetch(cursor)
        items.extend(page.items)
        if page.next is None:
            return items
        cursor = page.next


# ---- output ---------------------------------------------------------------------------------------------

def _report(args: argparse.Namespace, shape: object, sentence: str) -> None:
    """The result of a change: its API shape with --json (for scripts), else one sentence (for people)."""
    if args.json:
        _print_json(shape)
    else:
        print(sentence)


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2))


def _when(at: datetime | None) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if at is not None else "-"


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print rows under headers, columns aligned (the last one is not padded)."""
    cells = [list(headers), *[["-" if c is None or c == "" else _CONTROL.sub(" ", str(c)) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r[:-1], widths[:-1], strict=True)) + "  " + r[-1]
              if len(r) > 1 else r[0])


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _listing(args: argparse.Namespace, items: Sequence[T], item: Callable[[T], dict[str, Any]],
             headers: Sequence[str], row: Callable[[T], Sequence[object]]) -> None:
    if args.json:
        _print_json({"items": [item(i) for i in items], "next": None})
    else:
        _table(headers, [row(i) for i in items])


# ---- groups ---------------------------------------------------------------------------------------------

async def groups_list(pool: asyncpg.Pool, args: argparse.Namespace) -> None:
    items = await _all(lambda c: groups.list_groups(pool, cursor=c, limit=paging.MAX_LIMIT))
    _listing(args, items, shapes.group, ["ID", "NAME", "MEMBERS", "BUILTIN", "GITLAB_GROUP_ID", "DESCRIPTION"],
             lambda g: [g.id, g.name, g.member_count, _yes(g.builtin), g.gitlab_group_id, g.description])


async def groups_create(pool: asyncpg.Pool, args: argparse.Namespace) -> None:
    group = await groups.create_group(pool, args.name, args.description, actor=actor(),
                                      gitlab_group_id=args.gitlab_group_id)
    _report(args, shapes.group(group), f"created group {group.name} (id {group.id})")


async def groups_delete(pool: asyncpg.Pool, args: argparse.Namespace) -> None:
    group = await groups.find_group(pool, args.group)
    deleted = await groups.delete_group(pool, group.id, actor=actor())
    _report(args, shapes.group(deleted),
            f"deleted group {deleted.name} (id {deleted.id}, {deleted.member_count} members)")


async def groups_members(pool: asyncpg.Pool, args: argparse.Namespace) -> None:
    group = await groups.find_group(pool, args.group)
    items = await _all(lambda c: groups.list_members(pool, group.id, cursor=c, limit=paging.MAX_LIMIT))
    _listing(args, items, shapes.member, ["LOGIN", "NAME", "EMAIL", "ACTIVE", "SOURCE", "ADDED"],
             lambda m: [m.login, m.name, m.email, _yes(m.active), m.source, _when(m.added_at)])


async def groups_add_member(pool: asyncpg.Pool, args: argparse.Namespace) -> None:
    group = await groups.find_group(pool, args.group)
    member = await groups.add_member(pool, group.id, args.login, actor=actor())
    _report(args, shapes.member(member), f"added {member.login} to {group.name} ({member.source})")


async def groups_remove_member(pool: asyncpg.Pool, args: argparse.Namespace) -> None:
    group = await groups.find_group(pool, args.group)
    member = await groups.remove_member(pool, group.id, args.login, actor=actor())
    _report(args, shapes.member(member), f"removed {member.login} from {group.name}")


# ---- users ----------------------------------------------------------------------------------------------

def _groups_cell(d: accounts.UserDetails) -> str:
    return ",".join(name for name, _source in d.groups)


async def users_list(pool: asyncpg.Pool, args: argparse.Namespace) -> None:
    items = await _all(lambda c: accounts.list_users(pool, q=args.q, active=args.active, cursor=c,
                                                     limit=paging.MAX_LIMIT))
    _listing(args, items, shapes.user,
             ["LOGIN", "NAME", "EMAIL", "ACTIVE", "GITLAB_ID", "PROVISIONED_BY", "LAST_LOGIN", "GROUPS"],
             lambda d: [d.user.login, d.user.name, d.user.email, _yes(d.user.active), d.user.gitlab_id,
                        d.user.provisioned_by, _when(d.user.last_login_at), _groups_cell(d)])


def _show_user(args: argparse.Namespace, d: accounts.UserDetails) -> None:
    if args.json:
        _print_json(shapes.user(d))
        return
    u = d.user
    fields = [("login", u.login), ("name", u.name), ("email", u.email), ("active", _yes(u.active)),
              ("gitlab_id", u.gitlab_id if u.gitlab_id is not None else "- (linked at first sign-in by login)"),
              ("provisioned_by", u.provisioned_by), ("created_at", _when(u.created_at)),
              ("last_login_at", _when(u.last_login_at)), ("last_sync_at", _when(u.last_sync_at)),
              ("next_sync_at", _when(d.grant.next_sync_at if d.grant else None)),
              ("sync_state", d.grant.state if d.grant else "no_grant")]
    if d.grant is not None and d.grant.last_error:
        fields.append(("last_sync_error", d.grant.last_error))
    width = max(len(k) for k, _ in fields)
    for key, value in fields:
        print(f"{key.ljust(width)}  {value}")
    print()
    _table(["GROUP", "SOURCE"], [[name, source] for name, source in d.groups])


async def users_show(pool: asyncpg.Pool, args: argparse.Namespace) -> None:
    _show_user(args, await accounts.get_user(pool, args.login))


async def users_create(pool: asyncpg.Pool, args: argparse.Namespace) -> None:
    d = await accounts.create_user(pool, login=args.login, email=args.email, name=args.name,
                                   gitlab_id=args.gitlab_id, actor=actor())
    if args.json:
        _print_json(shapes.user(d))
    else:
        link = f"gitlab_id {d.user.gitlab_id}" if d.user.gitlab_id is not None else "username"
        print(f"created user {d.user.login}: linked to GitLab at first sign-in by {link}")


async def users_sync(pool: asyncpg.Pool, args: argparse.Namespace) -> None:
    """SPEC §11: re-check one user with GitLab now, through the kept grant (as the admin API's sync call)."""
    from gateway.metrics import Metrics
    from gateway.sync.gitlab import GitLabClient
    from gateway.sync.resync import Resyncer

    cfg = _config(args)
    session = GitLabClient.make_session(cfg.gitlab)
    try:
        resyncer = Resyncer(cfg, pool, GitLabClient(cfg.gitlab, session), Metrics())
        outcome = await resyncer.check_now(args.login, actor=actor())
    finally:
        await session.close()
    d = await accounts.get_user(pool, args.login)
    _report(args, shapes.user(d), f"re-checked {d.user.login} with GitLab: {outcome.result}"
            + (f" ({outcome.error})" if outcome.error else ""))


def _set_active(active: bool) -> Action:
    async def action(pool: asyncpg.Pool, args: argparse.Namespace) -> None:
        user = await accounts.set_active(pool, args.login, active, actor=actor())
        if args.json:
            _print_json(shapes.user(await accounts.get_user(pool, user.login)))
        elif active:
            print(f"activated {user.login}")
        else:
            print(f"deactivated {user.login}: every session revoked")

    return action


# ---- sessions -------------------------------------------------------------------------------------------

async def sessions_list(pool: asyncpg.Pool, args: argparse.Namespace) -> None:
    items = await _all(lambda c: sessions.list_sessions(pool, login=args.login, cursor=c, limit=paging.MAX_LIMIT))
    _listing(args, items, shapes.session, ["ID", "LOGIN", "CREATED", "EXPIRES", "LAST_SEEN"],
             lambda s: [s.id, s.login, _when(s.created_at), _when(s.expires_at), _when(s.last_seen_at)])


async def sessions_revoke(pool: asyncpg.Pool, args: argparse.Namespace) -> None:
    session = await sessions.revoke_session(pool, args.id, actor=actor())
    _report(args, shapes.session(session), f"revoked session of {session.login}")


# ---- tokens (SPEC §14) ----------------------------------------------------------------------------------

async def tokens_list(pool: asyncpg.Pool, args: argparse.Namespace) -> None:
    items = await _all(lambda c: svc_tokens.list_tokens(pool, login=args.login, include_spent=args.all, cursor=c,
                                                        limit=paging.MAX_LIMIT))
    _listing(args, items, shapes.token, ["ID", "LOGIN", "NAME", "CREATED_BY", "EXPIRES", "LAST_USED", "REVOKED"],
             lambda t: [t.id, t.login, t.name, t.created_by, _when(t.expires_at), _when(t.last_used_at),
                        _when(t.revoked_at)])


async def tokens_create(pool: asyncpg.Pool, args: argparse.Namespace) -> None:
    cfg = _config(args)
    new = await svc_tokens.create_token(pool, login=args.login, name=args.name, days=args.days,
                                        max_lifetime=cfg.tokens.max_lifetime, actor=actor())
    if args.json:
        _print_json({**shapes.token(new.token), "token": new.secret})
    else:
        print(f"created token {new.token.id} ({new.token.name}) for {new.token.login}, expires "
              f"{_when(new.token.expires_at)}; it is shown only now:")
        print(new.secret)


async def tokens_revoke(pool: asyncpg.Pool, args: argparse.Namespace) -> None:
    token = await svc_tokens.revoke_token(pool, args.id, actor=actor())
    _report(args, shapes.token(token), f"revoked token {token.id} ({token.name}) of {token.login}")


# ---- argparse -------------------------------------------------------------------------------------------

def add_commands(sub: Any, add: Callable[..., argparse.ArgumentParser]) -> None:
    """Register the admin subcommands."""

    def nested(name: str, help_text: str) -> Any:
        parent = add(name, _needs_action, help_text)
        actions = parent.add_subparsers(dest="action", metavar="ACTION")
        actions.required = True
        return actions

    def leaf(actions: Any, name: str, action: Action, help_text: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = actions.add_parser(name, help=help_text, description=help_text)
        p.add_argument("-c", "--config", dest="config", default=argparse.SUPPRESS, help="configuration file")
        p.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                       help="print JSON (the admin API's shapes) instead of text")
        p.set_defaults(func=command(action))
        return p

    g = nested("groups", "manage local groups and their members")
    leaf(g, "list", groups_list, "list groups with their member counts")
    p = leaf(g, "create", groups_create, "create a local group (a GitLab full path, or a local-only name)")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--description", default="", help="what the group is for")
    p.add_argument("--gitlab-group-id", type=int, default=None,
                   help="bind to this GitLab group id now (only that group, whatever its path, then matches)")
    p = leaf(g, "delete", groups_delete, "delete a group and its memberships")
    p.add_argument("group", metavar="NAME_OR_ID")
    p = leaf(g, "members", groups_members, "list the members of a group")
    p.add_argument("group", metavar="NAME_OR_ID")
    p = leaf(g, "add-member", groups_add_member, "add a user to a group (source manual)")
    p.add_argument("group", metavar="GROUP", help="group name or id")
    p.add_argument("login", metavar="LOGIN")
    p = leaf(g, "remove-member", groups_remove_member, "remove a user from a group")
    p.add_argument("group", metavar="GROUP", help="group name or id")
    p.add_argument("login", metavar="LOGIN")

    u = nested("users", "list, show, pre-provision, deactivate, reactivate and re-check users")
    p = leaf(u, "list", users_list, "list users (all pages)")
    p.add_argument("--q", default=None, help="only users whose login, name or email contains this text")
    state = p.add_mutually_exclusive_group()
    state.add_argument("--active", dest="active", action="store_const", const=True, default=None,
                       help="only active users")
    state.add_argument("--inactive", dest="active", action="store_const", const=False, help="only deactivated users")
    p = leaf(u, "show", users_show, "show a user with their groups")
    p.add_argument("login", metavar="LOGIN")
    p = leaf(u, "create", users_create, "pre-provision a user (linked at first sign-in)")
    p.add_argument("login", metavar="LOGIN", help="the GitLab username")
    p.add_argument("--email", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--gitlab-id", type=int, default=None, help="the GitLab user id (links by id instead of username)")
    p = leaf(u, "deactivate", _set_active(False), "deactivate a user and revoke all their sessions")
    p.add_argument("login", metavar="LOGIN")
    p = leaf(u, "activate", _set_active(True), "reactivate a user")
    p.add_argument("login", metavar="LOGIN")
    p = leaf(u, "sync", users_sync, "re-check a user with GitLab now (needs a kept grant: resync_interval on)")
    p.add_argument("login", metavar="LOGIN")

    s = nested("sessions", "list and revoke server-side sessions")
    p = leaf(s, "list", sessions_list, "list active sessions, newest first")
    p.add_argument("--login", default=None, help="only this user's sessions")
    p = leaf(s, "revoke", sessions_revoke, "revoke one session everywhere")
    p.add_argument("id", metavar="ID")

    t = nested("tokens", "list, create and revoke personal access tokens")
    p = leaf(t, "list", tokens_list, "list usable tokens, newest first")
    p.add_argument("--login", default=None, help="only this user's tokens")
    p.add_argument("--all", action="store_true", help="include revoked and expired tokens")
    p = leaf(t, "create", tokens_create, "create a token for a user and print it (shown only once)")
    p.add_argument("login", metavar="LOGIN", help="the owner: the token acts as this user")
    p.add_argument("--name", required=True, help="what uses the token (a CI job, a script)")
    p.add_argument("--days", type=int, default=None, help="lifetime in days (default and most: tokens.max_lifetime)")
    p = leaf(t, "revoke", tokens_revoke, "revoke a token everywhere")
    p.add_argument("id", metavar="ID", type=int)

    from gateway.admin import sync_cli  # it imports this module's helpers

    sync_cli.add_command(add)


def _needs_action(args: argparse.Namespace) -> int:
    # argparse requires an action, so this only runs if that ever changes.
    from gateway.cli import UsageError

    raise UsageError(f"{args.command}: choose an action (see --help)")
