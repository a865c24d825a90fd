"""SPEC §16 on the admin side: group names that the comma-joined groups header could not carry, and input the
database cannot store (NUL bytes, lone surrogates, dates out of range) answered 400/404/422, never 500."""

from __future__ import annotations

import logging
from typing import Any

import asyncpg
import pytest
from test_admin_api import call
from test_admin_cli import Cli
from test_admin_cli import _run as run_cli
from yarl import URL

from gateway.config import build_config
from gateway.server import prepare_database

BAD_NAMES = ["admins,other", "Release managers, QA", " ops", "ops ", "ops\n", "a\x00b", "tab\there", "c1\x85",
             "sep\u2028x", "lone\ud800"]


@pytest.mark.parametrize("name", BAD_NAMES)
async def test_group_names_that_break_the_groups_header_are_422(gateway_factory: Any, name: str) -> None:
    gw = await gateway_factory()
    async with gw.admin() as api:
        body = await call(api, "POST", "/api/v1/groups", 422, data=_json_text({"name": name}),
                          headers={"Content-Type": "application/json"})
        assert body["error"] == "invalid"
        group = await call(api, "POST", "/api/v1/groups", 201, json={"name": "Release managers"})
        await call(api, "PATCH", f"/api/v1/groups/{group['id']}", 422, data=_json_text({"name": name}),
                   headers={"Content-Type": "application/json"})


def _json_text(data: dict[str, str]) -> bytes:
    """JSON with every non-ASCII character escaped, so a lone surrogate travels as "\\ud800" (as clients send it)."""
    import json

    return json.dumps(data, ensure_ascii=True).encode()


async def test_cli_refuses_a_comma_in_a_group_name(write_config: Any) -> None:
    gateway = Cli(write_config())
    _out, err = await gateway("groups", "create", "admins,other", expect=2)
    assert "must not contain ','" in err


async def test_existing_bad_group_names_are_reported_at_start_up(dsn: str, db: asyncpg.Pool,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    await db.execute("INSERT INTO groups (name, description) VALUES ('admins,other', ''), ('fine', '')")
    cfg = build_config({"gitlab": {"url": "http://127.0.0.1:9", "client_id": "x", "client_secret": "y"},
                        "session": {"secrets": [_key()]}, "database": {"dsn": dsn}}, env={})
    with caplog.at_level(logging.WARNING, logger="gateway.server"):
        await prepare_database(cfg, apply_migrations=True)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "gateway.server"]
    assert len(warnings) == 1 and getattr(warnings[0], "group", None) == "admins,other"
    assert "','" in getattr(warnings[0], "problem", "")


async def test_check_config_reports_existing_bad_group_names(write_config: Any, db: asyncpg.Pool) -> None:
    await db.execute("INSERT INTO groups (name, description) VALUES ('Release managers, QA', '')")
    import asyncio

    code, out, err = await asyncio.to_thread(run_cli, ["check-config", "-c", str(write_config())])
    assert code == 0 and "ok" in out
    assert "warning: group 'Release managers, QA'" in out and "','" in out and err == ""


def _key() -> str:
    from conftest import SESSION_KEY

    return SESSION_KEY


# ---- unstorable input -----------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/api/v1/users?q=%00", 400),
        # Invalid UTF-8 is read as U+FFFD by aiohttp: a harmless search, not an error.
        ("GET", "/api/v1/users?q=a%ED%A0%80", 200),
        ("GET", "/api/v1/users/%00", 404),
        ("PATCH", "/api/v1/users/%00", 404),
        ("GET", "/api/v1/sessions?login=%00", 400),
        ("DELETE", "/api/v1/sessions/%00", 404),
        ("GET", "/api/v1/audit?login=%00", 400),
        ("GET", "/api/v1/audit?action=%00", 400),
        ("GET", "/api/v1/audit?since=0001-01-01T00:00:00%2B14:00", 400),
        ("GET", "/api/v1/audit?since=9999-12-31T23:59:59-14:00", 400),
        ("GET", "/api/v1/audit?since=%00", 400),
        ("GET", "/api/v1/users?limit=%C2%B2", 400),
        ("GET", "/api/v1/groups/%C2%B2", 404),
        ("GET", "/api/v1/groups?cursor=%00", 400),
    ],
)
async def test_unstorable_query_and_path_values_are_4xx(gateway_factory: Any, method: str, path: str,
                                                        status: int) -> None:
    gw = await gateway_factory()
    async with gw.admin() as api:
        await call(api, method, URL(path, encoded=True), status,
                   **({"json": {"active": False}} if method == "PATCH" else {}))


@pytest.mark.parametrize("field", ["login", "email", "name"])
async def test_unstorable_body_strings_are_422(gateway_factory: Any, field: str) -> None:
    gw = await gateway_factory()
    user = {"login": "zed", "email": "zed@example.com", "name": "Zed"}
    async with gw.admin() as api:
        for bad in ("a\x00b", "a\ud800b"):
            await call(api, "POST", "/api/v1/users", 422, data=_json_text({**user, field: bad}),
                       headers={"Content-Type": "application/json"})
        group = await call(api, "POST", "/api/v1/groups", 201, json={"name": "ops"})
        await call(api, "POST", f"/api/v1/groups/{group['id']}/members", 422,
                   data=_json_text({"login": "a\ud800"}), headers={"Content-Type": "application/json"})


async def test_audit_since_at_the_edges_of_the_calendar_still_works(gateway_factory: Any) -> None:
    gw = await gateway_factory()
    async with gw.admin() as api:
        page = await call(api, "GET", URL("/api/v1/audit?since=0001-01-01T00:00:00-14:00", encoded=True), 200)
        assert page["next"] is None


async def test_a_description_with_a_nul_byte_is_422_from_every_caller(db: asyncpg.Pool) -> None:
    """The service refuses it too, so the pages' form (which bypasses the API's body check) cannot 500."""
    from gateway.errors import Unprocessable
    from gateway.services import groups

    for bad in ("a\x00b", "a\ud800b"):
        with pytest.raises(Unprocessable):
            await groups.create_group(db, "ops", bad, actor="test")
    assert await db.fetchval("SELECT count(*) FROM groups WHERE name = 'ops'") == 0
