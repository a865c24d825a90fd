"""SPEC §11 webhooks: POST {prefix}/gitlab/webhook with GitLab's system hook and group webhook payloads."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from conftest import audit_actions
from test_resync import alice_sees, header_becomes, local_groups, seed, status, wait_until

SECRET = "webhook-secret-0123456789"
SAMPLES = json.loads((Path(__file__).parent / "data" / "gitlab_hooks.json").read_text())


async def start(gateway_factory: Any, **provisioning: Any) -> Any:
    gw = await gateway_factory(gitlab={"webhook_secret": SECRET},
                               provisioning={"resync_interval": "1h", **provisioning})
    seed(gw)
    return gw


def hook_url(gw: Any) -> str:
    return f"{gw.public_url}/oauth2/gitlab/webhook"


async def post(gw: Any, payload: Any, token: str | None = SECRET) -> int:
    headers = {"X-Gitlab-Event": "System Hook"}
    if token is not None:
        headers["X-Gitlab-Token"] = token
    async with aiohttp.ClientSession() as http, http.post(hook_url(gw), json=payload, headers=headers) as r:
        return r.status


async def test_a_member_removed_in_gitlab_loses_the_group_within_two_seconds(gateway_factory: Any,
                                                                            db: asyncpg.Pool) -> None:
    gw = await start(gateway_factory)
    gw.fake.add_hook(hook_url(gw), SECRET)
    await local_groups(db, "acme")
    async with alice_sees(gw, "acme,gateway-users") as b:
        gw.fake.remove_member("alice", "acme")
        took = await header_becomes(b, "gateway-users", timeout=2.0)
    assert took < 2.0
    await gw.fake.hooks_delivered()
    assert ("user_remove_from_group", 204) in [(e, s) for _, e, s in gw.fake.hook_deliveries]
    received = [a for a in await audit_actions(db) if a[0] == "webhook.received"]
    assert received[0][1] == "alice" and received[0][2]["event"] == "user_remove_from_group"


async def test_a_group_webhook_removal_from_the_allowed_group_revokes(gateway_factory: Any,
                                                                    db: asyncpg.Pool) -> None:
    gw = await start(gateway_factory, allowed_groups=["acme"])
    gw.fake.add_hook(hook_url(gw), SECRET, group="acme")  # a group webhook with member events
    async with gw.browser() as b:
        await b.sign_in("alice")
        gw.fake.remove_member("alice", "acme")
        await wait_until(lambda: _is(status(b), 401), timeout=2.0)


async def _is(awaitable: Any, expected: int) -> bool:
    return bool(await awaitable == expected)


async def test_wrong_or_missing_token_is_401_and_changes_nothing(gateway_factory: Any, db: asyncpg.Pool) -> None:
    gw = await start(gateway_factory)
    payload = {**SAMPLES["user_remove_from_group"], "user_id": 10}
    assert await post(gw, payload, token=None) == 401
    assert await post(gw, payload, token="wrong") == 401
    assert await post(gw, payload, token=SECRET + "x") == 401
    assert [a for a in await audit_actions(db) if a[0] == "webhook.received"] == []


async def test_unknown_events_are_204_and_ignored(gateway_factory: Any, db: asyncpg.Pool) -> None:
    gw = await start(gateway_factory)
    assert await post(gw, {"event_name": "project_create", "project_id": 1}) == 204
    assert await post(gw, {"object_kind": "push"}) == 204
    assert await post(gw, ["not", "an", "object"]) == 400
    assert [a for a in await audit_actions(db) if a[0] == "webhook.received"] == []


async def test_without_a_secret_there_is_no_endpoint(gateway_factory: Any) -> None:
    gw = await gateway_factory()
    async with aiohttp.ClientSession() as http, http.post(hook_url(gw), json={}) as r:
        assert r.status in (302, 401, 404, 405)
        assert r.status != 204


async def test_a_flood_costs_at_most_a_couple_of_rechecks(gateway_factory: Any, db: asyncpg.Pool) -> None:
    gw = await start(gateway_factory)
    async with gw.browser() as b:
        await b.sign_in("alice")
    before = sum(gw.fake.refresh_calls.values())
    payload = {**SAMPLES["user_update_for_group"], "user_id": 10}
    statuses = await asyncio.gather(*(post(gw, payload) for _ in range(50)))
    assert set(statuses) == {204}
    await asyncio.sleep(4.5)  # past the coalescing window: the one deferred re-check has run
    assert 1 <= sum(gw.fake.refresh_calls.values()) - before <= 2


async def test_group_rename_hook_renames_the_bound_local_group(gateway_factory: Any, db: asyncpg.Pool) -> None:
    gw = await start(gateway_factory)
    gw.fake.add_hook(hook_url(gw), SECRET)
    await local_groups(db, "acme", "acme/platform")
    async with gw.browser() as b:
        await b.sign_in("alice")  # binds acme to GitLab id 1
    gw.fake.transfer_group("acme/platform", "other")  # a transfer is announced as group_rename too
    gw.fake.rename_group("acme", "acme-corp")
    await gw.fake.hooks_delivered()
    names = {r["name"] for r in await db.fetch("SELECT name FROM groups")}
    assert "acme-corp" in names and "acme" not in names
    assert "other/platform" in names and "acme/platform" not in names  # bound at sign-in, then moved
    member = await db.fetchval("SELECT count(*) FROM memberships m JOIN groups g ON g.id = m.group_id "
                               "WHERE g.name = 'acme-corp'")
    assert member == 1


async def test_sample_payloads_are_accepted(gateway_factory: Any, db: asyncpg.Pool) -> None:
    gw = await start(gateway_factory)
    for name, payload in SAMPLES.items():
        if not name.startswith("_"):
            assert await post(gw, payload) == 204, name
    events = {a[2]["event"] for a in await audit_actions(db) if a[0] == "webhook.received"}
    assert events == {k for k in SAMPLES if not k.startswith("_")}
