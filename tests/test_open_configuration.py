"""SPEC §16 "Open configurations": an open configuration on gitlab.com is refused unless asked for, sync and
binding look only inside the allowed subtrees, and a local group can be bound to a GitLab group id explicitly."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import asyncpg
import pytest
from cryptography.fernet import Fernet
from test_admin_api import call
from test_admin_cli import Cli
from test_admin_cli import _run as run_cli

from gateway.config import ConfigError, build_config

BASE: dict[str, Any] = {
    "gitlab": {"url": "https://gitlab.com", "client_id": "app", "client_secret": "secret"},
    "session": {"secrets": [Fernet.generate_key().decode()]},
}
OPEN = "provisioning.allowed_groups: is empty while gitlab.url is gitlab.com and allow_signup is true"


def build(**sections: dict[str, Any]) -> Any:
    data = copy.deepcopy(BASE)
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return build_config(data, env={})


@pytest.mark.parametrize("url", ["https://gitlab.com", "https://GitLab.com/", "https://www.gitlab.com"])
def test_an_open_configuration_on_gitlab_com_is_refused_with_its_key_path(url: str) -> None:
    with pytest.raises(ConfigError) as info:
        build(gitlab={"url": url})
    assert len(info.value.problems) == 1 and info.value.problems[0].startswith(OPEN)
    assert "allow_any_gitlab_user: true" in info.value.problems[0]


@pytest.mark.parametrize("sections", [
    {"provisioning": {"allow_any_gitlab_user": True}},
    {"provisioning": {"allowed_groups": ["acme"]}},
    {"provisioning": {"allow_signup": False}},
    {"gitlab": {"url": "https://gitlab.example.com"}},
    {"gitlab": {"url": "https://gitlab.com.evil.example"}},
])
def test_closed_or_explicitly_open_configurations_are_accepted(sections: dict[str, Any]) -> None:
    build(**sections)


async def test_check_config_and_run_exit_2_on_an_open_configuration(tmp_path: Any) -> None:
    import yaml

    path = tmp_path / "open.yaml"
    path.write_text(yaml.safe_dump(BASE))
    for command in ("check-config", "run"):
        code, _out, err = await asyncio.to_thread(run_cli, [command, "-c", str(path)])
        assert code == 2 and OPEN in err, (command, err)


# ---- sync and binding inside the allowed subtrees -------------------------------------------------------------

async def test_sync_and_binding_consider_only_groups_inside_the_allowed_subtrees(gateway_factory: Any,
                                                                                 db: asyncpg.Pool) -> None:
    gw = await gateway_factory(provisioning={"allowed_groups": ["acme"]})
    fake = gw.fake
    fake.add_group(1, "acme")
    fake.add_group(2, "platform", parent="acme")
    fake.add_group(3, "ops")  # a stranger's top-level group, named like a local group
    fake.add_user(10, "alice")
    fake.add_member("alice", "acme/platform")
    fake.add_member("alice", "ops")
    async with gw.admin() as api:
        for name in ("acme/platform", "ops"):
            await call(api, "POST", "/api/v1/groups", 201, json={"name": name})
    async with gw.browser() as b:
        await b.sign_in("alice")
        r = await b.get("/oauth2/userinfo")
        assert (await r.json())["groups"] == ["acme/platform", "gateway-users"]
    bound = dict(await db.fetch("SELECT name, gitlab_group_id FROM groups WHERE NOT builtin"))
    assert bound == {"acme/platform": 2, "ops": None}


async def test_a_group_bound_explicitly_matches_only_that_gitlab_group(gateway_factory: Any,
                                                                       db: asyncpg.Pool) -> None:
    gw = await gateway_factory()
    fake = gw.fake
    fake.add_group(7, "ops")
    fake.add_user(10, "alice")
    fake.add_member("alice", "ops")
    async with gw.admin() as api:
        group = await call(api, "POST", "/api/v1/groups", 201, json={"name": "ops", "gitlab_group_id": 42})
        assert group["gitlab_group_id"] == 42
        await call(api, "POST", "/api/v1/groups", 409, json={"name": "ops2", "gitlab_group_id": 42})
        await call(api, "POST", "/api/v1/groups", 422, json={"name": "ops3", "gitlab_group_id": 0})
        await call(api, "POST", "/api/v1/groups", 422, json={"name": "ops4", "gitlab_group_id": "42"})
    async with gw.browser() as b:
        await b.sign_in("alice")
        assert (await (await b.get("/oauth2/userinfo")).json())["groups"] == ["gateway-users"]
    actions = [r["action"] for r in await db.fetch("SELECT action FROM audit_events ORDER BY id")]
    assert "group.binding_mismatch" in actions


async def test_cli_creates_a_bound_group(write_config: Any) -> None:
    gateway = Cli(write_config())
    group = await gateway.json("groups", "create", "acme/platform", "--gitlab-group-id", "2")
    assert group["gitlab_group_id"] == 2 and group["name"] == "acme/platform"
