"""`gateway groups|users|sessions ...` (SPEC §8), run in-process through gateway.cli.main on a real database:
table and --json output, exit codes 0/1/2 and one-line errors on stderr."""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import io
import json
import re
from pathlib import Path
from typing import Any

import pytest

from gateway import cli

GROUP_KEYS = {"id", "name", "description", "builtin", "gitlab_group_id", "member_count"}
USER_KEYS = {"login", "name", "email", "active", "gitlab_id", "provisioned_by", "created_at", "last_login_at",
             "last_sync_at", "next_sync_at", "sync_state", "last_sync_error", "groups"}
SESSION_KEYS = {"id", "login", "created_at", "expires_at", "last_seen_at"}


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code: Any = None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli.main(argv)
        except SystemExit as exc:
            code = exc.code
    assert isinstance(code, int), f"main() must exit with a code, got {code!r}"
    return code, out.getvalue(), err.getvalue()


class Cli:
    """`gateway -c <config> ...` in a worker thread (main() runs its own event loop)."""

    def __init__(self, config: Path) -> None:
        self.config = config

    async def __call__(self, *argv: str, expect: int = 0) -> tuple[str, str]:
        code, out, err = await asyncio.to_thread(_run, ["-c", str(self.config), *argv])
        assert code == expect, f"gateway {' '.join(argv)}: exit {code}\nstdout: {out}\nstderr: {err}"
        if code == 0:
            assert err == ""
        else:
            assert out == "" and err.count("\n") <= 1 and err.startswith("gateway: "), err
        return out, err

    async def json(self, *argv: str) -> Any:
        out, _ = await self(*argv, "--json")
        return json.loads(out)


@pytest.fixture
def gateway(write_config: Any) -> Cli:
    return Cli(write_config())


def table(out: str) -> list[list[str]]:
    """Split an aligned table into cells, checking that every column starts at the same offset on every line."""
    lines = out.rstrip("\n").split("\n")
    starts = [m.start() for m in re.finditer(r"(?:^|(?<=  ))\S", lines[0])]
    rows = []
    for line in lines:
        cells = []
        for i, start in enumerate(starts):
            end = starts[i + 1] if i + 1 < len(starts) else len(line)
            assert start == 0 or line[start - 2:start] == "  ", f"column {i} is not aligned in {line!r}"
            cells.append(line[start:end].strip())
        rows.append(cells)
    return rows


ACTOR = f"cli:{getpass.getuser()}"


# ---- groups ---------------------------------------------------------------------------------------------

async def test_groups(gateway, db):
    out, _ = await gateway("groups", "create", "acme/dev-team", "--description", "the developers")
    gid = await db.fetchval("SELECT id FROM groups WHERE name = 'acme/dev-team'")
    assert out == f"created group acme/dev-team (id {gid})\n"
    created = await gateway.json("groups", "create", "Release managers")
    assert set(created) == GROUP_KEYS and created["name"] == "Release managers" and created["member_count"] == 0

    out, _ = await gateway("groups", "list")
    rows = table(out)
    assert rows[0] == ["ID", "NAME", "MEMBERS", "BUILTIN", "GITLAB_GROUP_ID", "DESCRIPTION"]
    assert [r[1:4] for r in rows[1:]] == [["gateway-users", "0", "yes"], ["acme/dev-team", "0", "no"],
                                          ["Release managers", "0", "no"]]
    assert rows[2][5] == "the developers" and rows[3][4:] == ["-", "-"]
    listing = await gateway.json("groups", "list")
    assert listing["next"] is None and [g["name"] for g in listing["items"]] == [r[1] for r in rows[1:]]
    assert all(set(g) == GROUP_KEYS for g in listing["items"])

    _, err = await gateway("groups", "create", "acme/dev-team", expect=2)
    assert err == "gateway: A group named acme/dev-team already exists\n"
    _, err = await gateway("groups", "create", "acme//x", expect=2)
    assert "not a valid GitLab group path" in err

    out, _ = await gateway("groups", "delete", "acme/dev-team")
    assert out == f"deleted group acme/dev-team (id {gid}, 0 members)\n"
    deleted = await gateway.json("groups", "delete", str(created["id"]))  # by id
    assert deleted["name"] == "Release managers"
    _, err = await gateway("groups", "delete", "acme/dev-team", expect=2)
    assert err == "gateway: No group named acme/dev-team\n"
    _, err = await gateway("groups", "delete", "gateway-users", expect=2)
    assert "default group" in err
    assert await db.fetchval("SELECT count(*) FROM groups") == 1
    actions = [tuple(r) for r in await db.fetch("SELECT actor, action, subject FROM audit_events ORDER BY id")]
    assert actions == [(ACTOR, "group.created", "acme/dev-team"), (ACTOR, "group.created", "Release managers"),
                       (ACTOR, "group.deleted", "acme/dev-team"), (ACTOR, "group.deleted", "Release managers")]


async def test_members(gateway, db):
    await gateway("groups", "create", "acme")
    await gateway("users", "create", "alice", "--email", "alice@example.com", "--name", "Alice")
    await gateway("users", "create", "bob", "--email", "bob@example.com", "--name", "Bob")
    out, _ = await gateway("groups", "add-member", "acme", "ALICE")
    assert out == "added alice to acme (manual)\n"
    member = await gateway.json("groups", "add-member", "acme", "bob")
    assert member["login"] == "bob" and member["source"] == "manual"
    _, err = await gateway("groups", "add-member", "acme", "bob", expect=2)
    assert err == "gateway: bob is already a member of acme (source manual)\n"
    _, err = await gateway("groups", "add-member", "acme", "carol", expect=2)
    assert err == "gateway: No user with login carol\n"
    _, err = await gateway("groups", "add-member", "nope", "bob", expect=2)
    assert err == "gateway: No group named nope\n"

    rows = table((await gateway("groups", "members", "acme"))[0])
    assert rows[0] == ["LOGIN", "NAME", "EMAIL", "ACTIVE", "SOURCE", "ADDED"]
    assert [r[:5] for r in rows[1:]] == [["alice", "Alice", "alice@example.com", "yes", "manual"],
                                         ["bob", "Bob", "bob@example.com", "yes", "manual"]]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", rows[1][5])

    out, _ = await gateway("groups", "remove-member", "acme", "alice")
    assert out == "removed alice from acme\n"
    _, err = await gateway("groups", "remove-member", "acme", "alice", expect=2)
    assert err == "gateway: alice is not a member of acme\n"
    _, err = await gateway("groups", "remove-member", "gateway-users", "bob", expect=2)
    assert "default group" in err
    assert [m["login"] for m in (await gateway.json("groups", "members", "acme"))["items"]] == ["bob"]
    assert [g["member_count"] for g in (await gateway.json("groups", "list"))["items"]] == [2, 1]


# ---- users ----------------------------------------------------------------------------------------------

async def test_users(gateway, db):
    out, _ = await gateway("users", "create", "alice", "--email", "alice@example.com", "--name", "Alice Smith",
                           "--gitlab-id", "10")
    assert out == "created user alice: linked to GitLab at first sign-in by gitlab_id 10\n"
    bob = await gateway.json("users", "create", "bob", "--email", "bob@example.com", "--name", "Bob")
    assert set(bob) == USER_KEYS and bob["gitlab_id"] is None and bob["provisioned_by"] == "admin"
    assert bob["groups"] == [{"name": "gateway-users", "source": "default"}]

    _, err = await gateway("users", "create", "Alice", "--email", "x@example.com", "--name", "X", expect=2)
    assert err == "gateway: A user with login alice already exists\n"
    _, err = await gateway("users", "create", "carol", "--email", "nope", "--name", "C", expect=2)
    assert err == "gateway: 'nope' is not an email address\n"
    _, err = await gateway("users", "create", "carol", "--email", "c@x.org", "--name", "C", "--gitlab-id", "10",
                           expect=2)
    assert "gitlab_id 10" in err

    out, _ = await gateway("users", "show", "ALICE")
    head, groups = out.split("\n\n")
    fields = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in head.split("\n"))
    assert fields["login"] == "alice" and fields["name"] == "Alice Smith" and fields["active"] == "yes"
    assert fields["gitlab_id"] == "10" and fields["last_login_at"] == "-"
    assert table(groups) == [["GROUP", "SOURCE"], ["gateway-users", "default"]]
    shown = await gateway.json("users", "show", "alice")
    assert set(shown) == USER_KEYS and shown["email"] == "alice@example.com"
    _, err = await gateway("users", "show", "nobody", expect=2)
    assert err == "gateway: No user with login nobody\n"

    out, _ = await gateway("users", "deactivate", "bob")
    assert out == "deactivated bob: every session revoked\n"
    _, err = await gateway("users", "deactivate", "nobody", expect=2)
    assert err == "gateway: No user with login nobody\n"
    rows = table((await gateway("users", "list"))[0])
    assert rows[0] == ["LOGIN", "NAME", "EMAIL", "ACTIVE", "GITLAB_ID", "PROVISIONED_BY", "LAST_LOGIN", "GROUPS"]
    assert rows[1:] == [["alice", "Alice Smith", "alice@example.com", "yes", "10", "admin", "-", "gateway-users"],
                        ["bob", "Bob", "bob@example.com", "no", "-", "admin", "-", "gateway-users"]]
    assert [u["login"] for u in (await gateway.json("users", "list", "--inactive"))["items"]] == ["bob"]
    assert [u["login"] for u in (await gateway.json("users", "list", "--active"))["items"]] == ["alice"]
    assert [u["login"] for u in (await gateway.json("users", "list", "--q", "SMITH"))["items"]] == ["alice"]
    activated = await gateway.json("users", "activate", "bob")
    assert activated["active"] is True and activated["login"] == "bob"
    actions = [tuple(r) for r in await db.fetch("SELECT actor, action, subject FROM audit_events ORDER BY id")]
    assert actions == [(ACTOR, "user.created", "alice"), (ACTOR, "user.created", "bob"),
                       (ACTOR, "user.deactivated", "bob"), (ACTOR, "user.activated", "bob")]


# ---- sessions -------------------------------------------------------------------------------------------

async def test_sessions(gateway, db):
    await gateway("users", "create", "alice", "--email", "alice@example.com", "--name", "Alice")
    await gateway("users", "create", "bob", "--email", "bob@example.com", "--name", "Bob")
    for sid, login, age in [("sid-alice-1", "alice", 3), ("sid-bob-1", "bob", 2), ("sid-alice-2", "alice", 1)]:
        await db.execute(
            "INSERT INTO sessions (id, user_id, created_at, expires_at) SELECT $1, id, "
            "now() - make_interval(mins => $3), now() + interval '1 hour' FROM users WHERE login = $2", sid, login, age)
    rows = table((await gateway("sessions", "list"))[0])
    assert rows[0] == ["ID", "LOGIN", "CREATED", "EXPIRES", "LAST_SEEN"]
    assert [r[:2] for r in rows[1:]] == [["sid-alice-2", "alice"], ["sid-bob-1", "bob"], ["sid-alice-1", "alice"]]
    listing = await gateway.json("sessions", "list", "--login", "alice")
    assert [s["id"] for s in listing["items"]] == ["sid-alice-2", "sid-alice-1"] and listing["next"] is None
    assert all(set(s) == SESSION_KEYS for s in listing["items"])
    _, err = await gateway("sessions", "list", "--login", "nobody", expect=2)
    assert err == "gateway: No user with login nobody\n"

    out, _ = await gateway("sessions", "revoke", "sid-alice-1")
    assert out == "revoked session of alice\n"
    _, err = await gateway("sessions", "revoke", "sid-alice-1", expect=2)
    assert err == "gateway: No active session with this id\n"
    assert await db.fetchval("SELECT revoked_at IS NOT NULL FROM sessions WHERE id = 'sid-alice-1'")
    await gateway("users", "deactivate", "alice")
    assert [s["id"] for s in (await gateway.json("sessions", "list"))["items"]] == ["sid-bob-1"]


# ---- the same shapes as the API -------------------------------------------------------------------------

async def test_json_output_is_the_api_shape(gateway, gateway_factory):
    gw = await gateway_factory()
    await gateway("users", "create", "alice", "--email", "alice@example.com", "--name", "Alice")
    await gateway("groups", "create", "acme")
    await gateway("groups", "add-member", "acme", "alice")
    async with gw.admin() as api:
        for argv, path in [(("users", "show", "alice"), "/api/v1/users/alice"),
                           (("users", "list"), "/api/v1/users"),
                           (("groups", "list"), "/api/v1/groups"),
                           (("groups", "members", "acme"), "/api/v1/groups/2/members")]:
            async with api.get(path) as r:
                assert r.status == 200
                assert await gateway.json(*argv) == await r.json(), argv


# ---- failures -------------------------------------------------------------------------------------------

async def test_unreachable_database_is_exit_1(write_config):
    gateway = Cli(write_config(database={"dsn": "postgresql://x@127.0.0.1:1/x"}))
    for argv in [("users", "list"), ("groups", "create", "acme"), ("sessions", "revoke", "x")]:
        _, err = await gateway(*argv, expect=1)
        assert "127.0.0.1:1" in err and err.endswith("\n") and "Traceback" not in err


async def test_unmigrated_database_is_exit_1(write_config, pg_base_dsn):
    gateway = Cli(write_config(database={"dsn": pg_base_dsn}))
    _, err = await gateway("groups", "list", expect=1)
    assert "gateway migrate" in err


async def test_usage_and_config_errors_are_exit_2(gateway, tmp_path):
    for argv in [("users",), ("users", "create", "alice"), ("users", "list", "--active", "--inactive"),
                 ("groups", "frobnicate"), ("users", "create", "a", "--email", "a@x.org", "--name", "A",
                                            "--gitlab-id", "ten")]:
        code, out, err = await asyncio.to_thread(_run, ["-c", str(gateway.config), *argv])
        assert code == 2 and out == "" and "usage:" in err, argv
    code, _, err = await asyncio.to_thread(_run, ["-c", str(tmp_path / "missing.yaml"), "users", "list"])
    assert code == 2 and "missing.yaml" in err
    # -c is accepted after the action too
    code, out, _ = await asyncio.to_thread(_run, ["groups", "list", "--json", "-c", str(gateway.config)])
    assert code == 0 and json.loads(out)["items"][0]["name"] == "gateway-users"
