"""{prefix}/me, tokens and the administration pages in a real (headless) Chromium (SPEC §14, §15).

alice (member of the admin group) opens /me, creates a token, uses it with a plain HTTP client through the
proxy, revokes it and sees the next call refused; then creates a group, adds bob, deactivates bob and finds it
in the audit log; a cross-site form post is refused; carol (not an administrator) gets 403. ada opens the
Provisioning page, sees the schedule's run, plans a dry run and sees the plan, runs now and sees her run and
its audit entry. Screenshots of every step, at desktop width and at 360 px, land in test-artifacts/pages/.

The gateway runs in the test's event loop; the browser script runs in a worker thread so that the loop keeps
serving while Selenium blocks.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.test_demo_browser import (  # noqa: F401 (driver: the Chromium fixture)
    CHROMEDRIVER,
    CHROMIUM,
    click_to_page,
    driver,
    page_ready,
    page_wait,
)

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "pages"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
                       reason="needs Debian's chromium and chromedriver (/usr/bin/chromium, /usr/bin/chromedriver)"),
]


def _call(url: str, token: str) -> tuple[int, Any]:
    """A plain HTTP client (urllib), as a script would use the token."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


async def _evil_site(public_url: str) -> TestServer:
    """Another origin whose page posts a form to the gateway's admin pages as soon as it loads."""

    async def page(request: web.Request) -> web.Response:
        csrf = request.query.get("csrf", "")
        body = (f'<!doctype html><body onload="document.forms[0].submit()"><form method="post" '
                f'action="{public_url}/oauth2/admin/groups"><input name="name" value="evil-group">'
                f'<input name="csrf" value="{csrf}"></form></body>')
        return web.Response(text=body, content_type="text/html")

    app = web.Application()
    app.router.add_get("/", page)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return server


class Steps:
    """What a browser script does: find, click and wait for the page it loads, read, and take screenshots
    (desktop, then 360 px, noting pages that would need horizontal scrolling at 360 px)."""

    def __init__(self, drv: Any) -> None:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self.drv = drv
        self.wait = page_wait(drv)
        self.seen: dict[str, Any] = {"too_wide": []}

    def shot(self, name: str, narrow: bool = True) -> None:
        self.drv.save_screenshot(str(ARTIFACTS / f"{name}.png"))
        if narrow:  # the same page at 360 px: nothing may need horizontal scrolling but tables
            self.drv.set_window_size(360, 800)
            width = self.drv.execute_script("return document.documentElement.scrollWidth")
            self.seen["too_wide"].extend([name] if width > 380 else [])
            self.drv.save_screenshot(str(ARTIFACTS / f"{name}-360px.png"))
            self.drv.set_window_size(1100, 900)

    def by_id(self, element_id: str) -> Any:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support import expected_conditions as ec

        return self.wait.until(ec.presence_of_element_located((By.ID, element_id)))

    def submit(self, button: Any) -> None:
        """Click a button that loads a gateway page, and wait until that page has replaced the old one, whole
        (every gateway page, refusals included, has <h1 id="title">)."""
        click_to_page(self.drv, self.wait, button, "title")

    def until_shown(self, url_part: str) -> None:
        """Until the page shown is a whole gateway page whose URL holds `url_part` (after navigations this
        script did not start itself, such as another site's form)."""
        from selenium.webdriver.common.by import By

        self.wait.until(lambda d: url_part in d.current_url and page_ready(d) and d.find_elements(By.ID, "title"))

    def body(self) -> str:
        from selenium.webdriver.common.by import By

        return str(self.drv.find_element(By.TAG_NAME, "body").text)


def _script(drv: Any, gw: Any, evil_url: str) -> dict[str, Any]:
    from selenium.webdriver.common.by import By

    steps = Steps(drv)
    shot, by_id, submit, body = steps.shot, steps.by_id, steps.submit, steps.body
    base = gw.public_url
    seen = steps.seen

    # 1. /me asks for sign-in, then shows alice's account.
    drv.get(f"{base}/oauth2/me")
    submit(by_id("sign-in-alice"))
    assert by_id("login").text == "alice"
    assert "admins" in by_id("groups").text and "gateway-users" in by_id("groups").text
    shot("01-me")

    # 2. A token, shown once; used by a plain HTTP client through the proxy.
    by_id("token-name").send_keys("ci deploy job")
    days = by_id("token-days")
    days.clear()
    days.send_keys("30")
    submit(by_id("create-token-button"))
    secret = by_id("new-token-value").text
    assert secret.startswith("gwp_") and len(secret) == 44
    drv.execute_script("arguments[0].scrollIntoView()", by_id("new-token"))
    shot("02-token-created", narrow=False)
    status, payload = _call(f"{base}/tool", secret)
    assert status == 200, payload
    headers = {k.lower(): v for k, v in payload["headers"]}
    assert headers["x-forwarded-user"] == "alice" and "authorization" not in headers

    # 3. Revoked on the page: the next call is refused (within a second).
    submit(drv.find_element(By.CSS_SELECTOR, "#token-list button[id^='revoke-token-']"))
    assert "revoked everywhere" in by_id("notice").text
    shot("03-token-revoked", narrow=False)
    deadline = time.monotonic() + 1.0
    while (answer := _call(f"{base}/tool", secret))[0] != 401 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert answer[0] == 401 and answer[1]["error"] == "invalid_token", answer

    # 4. Administration: a group, a member, a deactivation, the audit entry.
    drv.get(f"{base}/oauth2/admin/groups")
    by_id("group-name").send_keys("release-managers")
    by_id("group-description").send_keys("<script>alert('x')</script> ship it")
    submit(by_id("create-group-button"))
    assert by_id("group-name").text == "release-managers"
    by_id("member-login").send_keys("bob")
    submit(by_id("add-member-button"))
    assert "bob" in by_id("members").text
    assert "<script>alert('x')</script> ship it" in body()  # shown as text, never run
    shot("04-admin-group")
    drv.get(f"{base}/oauth2/admin/users")
    shot("05-admin-users")
    drv.get(f"{base}/oauth2/admin/users/bob")
    submit(by_id("deactivate"))
    assert by_id("state").text == "deactivated"
    shot("06-admin-user-deactivated")
    drv.get(f"{base}/oauth2/admin/sessions")
    shot("07-admin-sessions")
    drv.get(f"{base}/oauth2/admin/audit")
    by_id("audit-action").send_keys("user.deactivated")
    submit(by_id("audit-filter-button"))
    rows = by_id("audit").text
    assert "user.deactivated" in rows and "bob" in rows and "alice" in rows
    shot("08-admin-audit")

    # 5. A cross-site form post (even carrying a real form token of alice's) is refused: nothing is created.
    drv.get(f"{base}/oauth2/admin/groups")
    stolen = drv.find_element(By.NAME, "csrf").get_attribute("value")
    drv.get(f"{evil_url}/?csrf={stolen}")
    steps.until_shown("/oauth2/admin/groups")
    page = body()
    assert "Error 403" in page and "did not come from this site" in page, page
    shot("09-cross-site-refused", narrow=False)

    # 6. carol is signed in but not an administrator: 403.
    drv.delete_all_cookies()  # the gateway's and the stand-in's: both live on 127.0.0.1
    drv.get(f"{base}/oauth2/admin/users")
    submit(by_id("sign-in-carol"))
    by_id("title")
    page = body()
    assert "Error 403" in page and "This page is for administrators" in page, page
    shot("10-non-admin-403", narrow=False)
    return seen


async def test_pages_in_a_browser(driver, gateway_factory, db):  # noqa: F811 (the imported fixture)
    gw = await gateway_factory(tokens={"enabled": True}, admin={"groups": ["admins"]},
                               provisioning={"keep_manual_memberships": True})
    for uid, login in ((10, "alice"), (11, "bob"), (12, "carol")):
        gw.fake.add_user(uid, login, name=login.title(), email=f"{login}@example.com")
    async with gw.admin() as admin:
        for uid, login in ((10, "alice"), (11, "bob")):
            r = await admin.post("/api/v1/users", json={"login": login, "name": login.title(),
                                                         "email": f"{login}@example.com", "gitlab_id": uid})
            assert r.status == 201
        r = await admin.post("/api/v1/groups", json={"name": "admins"})
        group = await r.json()
        assert (await admin.post(f"/api/v1/groups/{group['id']}/members", json={"login": "alice"})).status == 201
    evil = await _evil_site(gw.public_url)
    try:
        script: Callable[[], dict[str, Any]] = lambda: _script(driver, gw, str(evil.make_url("")).rstrip("/"))  # noqa: E731
        seen = await asyncio.to_thread(script)
    finally:
        await evil.close()
    assert seen.get("too_wide") == [], f"pages wider than 360 px: {seen.get('too_wide')}"
    assert await db.fetchval("SELECT count(*) FROM groups WHERE name = 'evil-group'") == 0
    actors = {r["action"]: r["actor"] for r in await db.fetch("SELECT action, actor FROM audit_events")}
    assert actors["group.created"] == "alice" and actors["user.deactivated"] == "alice"
    assert actors["token.created"] == "alice" and actors["token.revoked"] == "alice"


def _provisioning_script(drv: Any, gw: Any) -> dict[str, Any]:
    """ada opens the Provisioning page, sees the schedule's run, plans a dry run, runs now, finds her run and
    its audit entry."""
    from selenium.webdriver.common.by import By

    steps = Steps(drv)
    base = gw.public_url
    drv.get(f"{base}/oauth2/admin/provisioning")
    steps.submit(steps.by_id("sign-in-ada"))
    runs = steps.by_id("runs").text
    assert "the schedule" in runs and "applied" in runs and "3 users created" in runs, runs
    assert steps.by_id("run-state").text == "no run in progress"
    steps.shot("11-admin-provisioning")

    steps.submit(steps.by_id("plan-button"))
    assert "Nothing was changed" in steps.by_id("plan-listed").text
    plan = steps.body()
    assert "create user (1)" in plan and "newcomer" in plan and "<b>New</b> Comer (GitLab user 70)" in plan
    assert "remove member (1)" in plan and "acme/platform/sre" in plan
    drv.execute_script("arguments[0].scrollIntoView()", steps.by_id("plan-title"))
    steps.shot("12-admin-provisioning-plan")

    steps.submit(steps.by_id("run-button"))
    assert "The run was applied" in steps.by_id("notice").text
    newest = drv.find_elements(By.CSS_SELECTOR, "#runs tr")[1].text
    assert "ada" in newest and "applied" in newest and "1 users created" in newest, newest
    steps.shot("13-admin-provisioning-ran")

    drv.get(f"{base}/oauth2/admin/audit")
    steps.by_id("audit-action").send_keys("sync.automatic")
    steps.submit(steps.by_id("audit-filter-button"))
    first = drv.find_elements(By.CSS_SELECTOR, "#audit tr")[1].text
    assert "sync.automatic" in first and "ada" in first and "acme" in first, first
    steps.shot("14-admin-provisioning-audit", narrow=False)
    return steps.seen


async def test_provisioning_page_in_a_browser(driver, gateway_factory, gitlab, db):  # noqa: F811 (the fixture)
    from tests.test_automatic import seed
    from tests.test_automatic_api import AUTOMATIC, wait_for_runs

    fake, _ = gitlab
    seed(fake)
    fake.add_user(50, "ada", name="Ada", email="ada@example.com")
    gw = await gateway_factory(admin={"groups": ["admins"]},
                               provisioning={**AUTOMATIC, "keep_manual_memberships": True})
    await wait_for_runs(db, 1)  # the schedule's first run, at start
    async with gw.admin() as admin:
        r = await admin.post("/api/v1/users", json={"login": "ada", "name": "Ada", "email": "ada@example.com",
                                                     "gitlab_id": 50})
        assert r.status == 201
        group = await (await admin.post("/api/v1/groups", json={"name": "admins"})).json()
        assert (await admin.post(f"/api/v1/groups/{group['id']}/members", json={"login": "ada"})).status == 201
    # GitLab moves on: bob leaves sre, a newcomer (whose name is markup) joins web.
    fake.remove_member("bob", "acme/platform/sre")
    fake.add_user(70, "newcomer", name="<b>New</b> Comer")
    fake.add_member("newcomer", "acme/web")
    script: Callable[[], dict[str, Any]] = lambda: _provisioning_script(driver, gw)  # noqa: E731
    seen = await asyncio.to_thread(script)
    assert seen["too_wide"] == [], f"pages wider than 360 px: {seen['too_wide']}"
    run = await db.fetchrow("SELECT actor, ok FROM automatic_runs ORDER BY id DESC LIMIT 1")
    assert run["actor"] == "ada" and run["ok"] is True
    assert await db.fetchval("SELECT count(*) FROM users WHERE login = 'newcomer'") == 1
