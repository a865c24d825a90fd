"""Migrations (SPEC §10): the schema they build, idempotence, the advisory lock, and that they ship in the package."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from importlib import resources
from pathlib import Path

import asyncpg
import pytest

from gateway.db import migrate as db_migrate

ROOT = Path(__file__).resolve().parents[1]

# Every shipped migration, in order (numbers are reserved per feature and may land out of order).
ALL = [m.version for m in db_migrate.available()]


@pytest.fixture
async def migrated(empty_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(empty_dsn)
    assert await db_migrate.migrate(conn) == [m.version for m in db_migrate.available()]
    yield conn
    await conn.close()


async def columns(conn: asyncpg.Connection, table: str) -> set[str]:
    rows = await conn.fetch("SELECT column_name FROM information_schema.columns WHERE table_name = $1", table)
    return {r["column_name"] for r in rows}


async def new_user(conn: asyncpg.Connection, login: str, gitlab_id: int | None = None) -> int:
    user_id: int = await conn.fetchval(
        "INSERT INTO users (login, gitlab_id, provisioned_by) VALUES ($1, $2, 'jit') RETURNING id", login, gitlab_id)
    return user_id


async def new_group(conn: asyncpg.Connection, name: str) -> int:
    group_id: int = await conn.fetchval("INSERT INTO groups (name) VALUES ($1) RETURNING id", name)
    return group_id


# ---- the schema --------------------------------------------------------------------------------------------

async def test_core_tables_and_columns(migrated):
    assert {"id", "gitlab_id", "login", "name", "email", "active", "provisioned_by", "created_at",
            "last_login_at", "last_sync_at"} <= await columns(migrated, "users")
    assert {"id", "name", "description", "gitlab_group_id", "builtin"} <= await columns(migrated, "groups")
    assert {"user_id", "group_id", "source", "added_at"} <= await columns(migrated, "memberships")
    assert {"id", "user_id", "created_at", "expires_at", "last_seen_at", "revoked_at"} <= await columns(
        migrated, "sessions")
    assert {"id", "at", "actor", "action", "subject", "details"} <= await columns(migrated, "audit_events")
    assert await migrated.fetchval(
        "SELECT data_type FROM information_schema.columns WHERE table_name = 'audit_events' AND column_name = 'details'"
    ) == "jsonb"
    versions = [r["version"] for r in await migrated.fetch("SELECT version FROM schema_migrations ORDER BY 1")]
    assert versions == ALL


async def test_gitlab_id_is_unique(migrated):
    await new_user(migrated, "alice", 10)
    await new_user(migrated, "bob", None)
    await new_user(migrated, "carol", None)  # many users may be unlinked
    with pytest.raises(asyncpg.UniqueViolationError):
        await new_user(migrated, "alice2", 10)


async def test_login_is_unique_case_insensitively(migrated):
    await new_user(migrated, "Alice")
    with pytest.raises(asyncpg.UniqueViolationError):
        await new_user(migrated, "alice")
    with pytest.raises(asyncpg.UniqueViolationError):
        await new_user(migrated, "ALICE")
    await new_user(migrated, "alice2")
    with pytest.raises(asyncpg.CheckViolationError):
        await new_user(migrated, "")


async def test_group_name_is_unique_case_sensitively(migrated):
    await new_group(migrated, "acme/platform")
    await new_group(migrated, "Acme/Platform")  # GitLab paths match case-sensitively: a different group
    with pytest.raises(asyncpg.UniqueViolationError):
        await new_group(migrated, "acme/platform")
    bound = await new_group(migrated, "bound")
    await migrated.execute("UPDATE groups SET gitlab_group_id = 7 WHERE id = $1", bound)
    other = await new_group(migrated, "other")
    with pytest.raises(asyncpg.UniqueViolationError):  # one local group per GitLab group
        await migrated.execute("UPDATE groups SET gitlab_group_id = 7 WHERE id = $1", other)


async def test_one_membership_per_user_and_group(migrated):
    user, group = await new_user(migrated, "alice"), await new_group(migrated, "acme")
    await migrated.execute("INSERT INTO memberships (user_id, group_id, source) VALUES ($1, $2, 'sync')", user, group)
    with pytest.raises(asyncpg.UniqueViolationError):
        await migrated.execute("INSERT INTO memberships (user_id, group_id, source) VALUES ($1, $2, 'manual')",
                               user, group)
    with pytest.raises(asyncpg.CheckViolationError):
        await migrated.execute("INSERT INTO memberships (user_id, group_id, source) VALUES ($1, $2, 'magic')",
                               user, await new_group(migrated, "other"))
    # deleting the user or the group takes its memberships along
    await migrated.execute("DELETE FROM groups WHERE id = $1", group)
    assert await migrated.fetchval("SELECT count(*) FROM memberships") == 0


async def test_provisioned_by_is_constrained(migrated):
    with pytest.raises(asyncpg.CheckViolationError):
        await migrated.execute("INSERT INTO users (login, provisioned_by) VALUES ('x', 'sync')")
    # SPEC §12 (0003): users created by automatic provisioning
    await migrated.execute("INSERT INTO users (login, provisioned_by) VALUES ('y', 'gitlab')")


async def test_builtin_default_group_exists(migrated):
    rows = await migrated.fetch("SELECT name, builtin FROM groups")
    assert [tuple(r) for r in rows] == [("gateway-users", True)]


# ---- running migrations --------------------------------------------------------------------------------------

async def test_migrate_twice_is_a_no_op(migrated):
    before = await migrated.fetch("SELECT version, applied_at FROM schema_migrations ORDER BY 1")
    assert await db_migrate.migrate(migrated) == []
    assert await db_migrate.pending(migrated) == []
    assert await migrated.fetch("SELECT version, applied_at FROM schema_migrations ORDER BY 1") == before
    assert await migrated.fetchval("SELECT count(*) FROM groups") == 1  # the seed row was not inserted again


async def test_pending_on_an_empty_database(empty_dsn):
    conn = await asyncpg.connect(empty_dsn)
    try:
        assert await db_migrate.pending(conn) == ALL
    finally:
        await conn.close()


async def test_concurrent_migrations_both_succeed(empty_dsn):
    conns = [await asyncpg.connect(empty_dsn) for _ in range(4)]
    try:
        results = await asyncio.gather(*(db_migrate.migrate(c) for c in conns))
        assert sorted(results) == [[], [], [], ALL]
        assert await conns[0].fetchval("SELECT count(*) FROM schema_migrations") == len(ALL)
        assert await conns[0].fetchval("SELECT count(*) FROM groups WHERE builtin") == 1
        # the advisory lock was released by every runner
        assert await conns[0].fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())") == 0
    finally:
        for c in conns:
            await c.close()


async def test_concurrent_migrate_commands_both_succeed(empty_dsn, tmp_path):
    """Two `gateway migrate` processes started together (replicas starting at once) on a fresh database."""
    from cryptography.fernet import Fernet

    config = tmp_path / "gateway.yaml"
    config.write_text(
        "gitlab: {client_id: a, client_secret: b}\nprovisioning: {allowed_groups: [acme]}\n"
        f"session: {{secrets: ['{Fernet.generate_key().decode()}']}}\n"
        f"database: {{dsn: '{empty_dsn}'}}\n")
    procs = [await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "migrate", "-c", str(config), cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE) for _ in range(2)]
    outs = [await asyncio.wait_for(p.communicate(), 60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    printed = sorted(out.decode().strip() for out, _ in outs)
    assert printed == [f"applied: {', '.join(ALL)}", "database schema is up to date"], outs


# ---- packaging -------------------------------------------------------------------------------------------------

def test_migrations_ship_inside_the_package():
    sql = resources.files("gateway") / "migrations" / "0001_initial.sql"
    assert sql.is_file()
    assert "CREATE TABLE users" in sql.read_text(encoding="utf-8")
    assert "0001_initial" in [m.version for m in db_migrate.available()]
    # The repo-root migrations/ is the same folder (a symlink), so there is one source of truth.
    assert (ROOT / "migrations").resolve() == (ROOT / "gateway" / "migrations").resolve()


def test_migration_names_are_numbered_and_unique():
    # Numbers are reserved per feature (0002 resync, 0003 automatic, 0004 tokens) and may land out of order:
    # unique and increasing, starting at 0001; a gap is a reserved number whose feature has not landed yet.
    versions = [m.version for m in db_migrate.available()]
    numbers = [int(v[:4]) for v in versions]
    assert numbers[0] == 1 and numbers == sorted(set(numbers)), versions


def test_a_built_package_contains_the_migrations_and_the_demo(tmp_path):
    """What `pip install .` copies: setuptools' build_py on a copy of the project (offline, no wheel needed)."""
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(ROOT / "pyproject.toml", project)
    shutil.copy(ROOT / "README.md", project)
    shutil.copytree(ROOT / "gateway", project / "gateway", symlinks=False,
                    ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "build"
    result = subprocess.run([sys.executable, "-c", "from setuptools import setup; setup()", "-q", "build_py",
                             "-d", str(out)], cwd=project, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for shipped in ("migrations/0001_initial.sql", "migrations/0004_tokens.sql", "demo/demo.py", "demo/whoami.py",
                    "demo/fake_gitlab.py", "db/migrate.py", "templates/base.html", "templates/me.html",
                    "templates/admin/layout.html", "templates/admin/audit.html"):
        assert (out / "gateway" / shipped).is_file(), f"{shipped} would not be installed"
