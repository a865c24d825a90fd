"""What a newcomer trips over (issue 9, items 20-21): the admin API and CLI address groups the same way,
`--json` on either side of the sub-command, `gateway demo -c FILE`, placeholders left from the examples,
the stand-in's pages styled like the gateway's, and the README documenting what exists."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from test_admin_api import call
from test_admin_cli import _run as run_cli
from yarl import URL

ROOT = Path(__file__).resolve().parents[1]


async def test_json_before_the_sub_command(write_config: Any) -> None:
    config = str(write_config())
    code, out, err = await asyncio.to_thread(run_cli, ["-c", config, "--json", "groups", "create", "acme/platform"])
    assert code == 0, err
    assert json.loads(out)["name"] == "acme/platform"
    for argv in (["-c", config, "--json", "groups", "list"], ["-c", config, "groups", "list", "--json"]):
        code, out, err = await asyncio.to_thread(run_cli, argv)
        assert code == 0, err
        assert {g["name"] for g in json.loads(out)["items"]} == {"acme/platform", "gateway-users"}
    code, out, _ = await asyncio.to_thread(run_cli, ["-c", config, "groups", "list"])
    assert code == 0 and not out.startswith("{")  # without --json anywhere: the table


async def test_admin_api_addresses_groups_by_id_or_url_encoded_name(gateway_factory: Any) -> None:
    gw = await gateway_factory()
    gw.fake.add_user(10, "bob")
    async with gw.browser() as b:
        await b.sign_in("bob")
    async with gw.admin() as api:
        created = await call(api, "POST", "/api/v1/groups", 201, json={"name": "acme/platform"})

        def by_name(tail: str = "") -> URL:
            return URL(f"{gw.admin_url}/api/v1/groups/acme%2Fplatform{tail}", encoded=True)

        assert await call(api, "GET", by_name(), 200) == created
        assert (await call(api, "PATCH", by_name(), 200, json={"description": "d"}))["description"] == "d"
        await call(api, "POST", by_name("/members"), 201, json={"login": "bob"})
        assert [m["login"] for m in (await call(api, "GET", by_name("/members"), 200))["items"]] == ["bob"]
        await call(api, "DELETE", by_name("/members/bob"), 204)
        spaced = await call(api, "POST", "/api/v1/groups", 201, json={"name": "Release managers"})
        got = await call(api, "GET", URL(f"{gw.admin_url}/api/v1/groups/Release%20managers", encoded=True), 200)
        assert got["id"] == spaced["id"]
        for missing in ("no%2Fsuch", "%00", "%ED%A0%80", "a%09b"):
            body = await call(api, "GET", URL(f"{gw.admin_url}/api/v1/groups/{missing}", encoded=True), 404)
            assert body["error"] == "not_found"
        await call(api, "DELETE", by_name(), 204)
        await call(api, "GET", f"/api/v1/groups/{created['id']}", 404)


def test_demo_with_a_config_file_is_an_error(tmp_path: Path) -> None:
    # A subprocess with a time limit: were -c accepted, the demo would start and run until stopped.
    def demo(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "gateway", *argv], capture_output=True, text=True, timeout=60,
                              cwd=tmp_path)

    for given in (tmp_path / "missing.yaml", ROOT / "gateway.example.yaml"):
        done = demo("demo", "--port", "1", "-c", str(given))
        assert done.returncode == 2 and done.stdout == ""
        assert str(given) in done.stderr and done.stderr.startswith("gateway: ") and done.stderr.count("\n") == 1
    done = demo("-c", "missing.yaml", "demo", "--port", "1")
    assert done.returncode == 2 and "missing.yaml does not exist" in done.stderr


@pytest.fixture
def example_env(tmp_path: Path) -> dict[str, str]:
    from cryptography.fernet import Fernet

    return {"GITLAB_CLIENT_SECRET": "s3cret-value", "GATEWAY_SESSION_SECRET": Fernet.generate_key().decode(),
            "GATEWAY_ADMIN_TOKEN": "an-admin-token-0123456789"}


def check_config(path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", "check-config", "-c", str(path)], env=env,
                          capture_output=True, text=True, timeout=60)


def test_check_config_warns_about_the_examples_placeholders(tmp_path: Path, example_env: dict[str, str]) -> None:
    env = {"PATH": "/usr/bin:/bin", **example_env}
    done = check_config(ROOT / "gateway.example.yaml", env)
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning: ")]
    assert any(w.startswith("warning: gitlab.client_id: still holds a placeholder") for w in warnings), warnings
    assert any(w.startswith("warning: server.public_url: tool.example.com is an example host") for w in warnings)
    own = (ROOT / "gateway.example.yaml").read_text().replace("your-application-id", "4f1c9e") \
        .replace("https://tool.example.com", "https://tool.acme.test")
    mine = tmp_path / "gateway.yaml"
    mine.write_text(own)
    done = check_config(mine, env)
    assert done.returncode == 0, done.stderr
    assert "gitlab.client_id" not in done.stderr and "server.public_url" not in done.stderr, done.stderr


def test_placeholder_secrets_are_named_never_echoed() -> None:
    from conftest import SESSION_KEY

    from gateway.config import build_config, placeholder_warnings

    cfg = build_config({"gitlab": {"client_id": "x", "client_secret": "REPLACE-with-the-secret"},
                        "session": {"secrets": [SESSION_KEY]},
                        "admin": {"tokens": ["REPLACE-with-a-long-admin-token"]},
                        "database": {"dsn": "postgresql://gw:REPLACE-password@db.internal/gw"},
                        "provisioning": {"allowed_groups": ["acme"]}}, env={})
    warnings = placeholder_warnings(cfg)
    assert [w.split(":")[0] for w in warnings] == ["admin.tokens", "gitlab.client_secret", "database.dsn"]
    assert "REPLACE" not in "\n".join(warnings)


async def test_the_stand_ins_sign_in_page_is_styled_like_the_gateways(gateway_factory: Any) -> None:
    gw = await gateway_factory()
    async with gw.browser() as b:
        r = await b.http.get(f"{gw.fake_url}/users/sign_in")
        page = await r.text()
    assert "<style>" in page and "system-ui" in page and "#554488" in page  # the gateway's font and colour
    assert 'name="viewport"' in page


def test_readme_documents_the_audit_path_and_group_members() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "/api/v1/audit" in readme
    assert re.search(r"groups .*members GROUP", readme)
    assert "--json" in readme and "gateway -c gateway.yaml --json" in readme
    assert "acme%2Fplatform" in readme
