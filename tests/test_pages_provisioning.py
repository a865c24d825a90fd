"""The Provisioning administration page (SPEC §12, §15) over HTTP: the last runs, a dry-run plan that changes
nothing, "run now" audited under the administrator, 409 while another run goes, CSRF, escaping, and the page
saying how to turn the feature on when it is off. Real PostgreSQL, the GitLab stand-in, in-process gateways."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import asyncpg
from test_automatic import seed
from test_automatic_api import AUTOMATIC, wait_for_runs
from test_pages import CSRF, Page, _admin_group, _until_admin

from gateway.admin import provisioning_page
from gateway.demo.fake_gitlab import FakeGitLab
from tests.conftest import ADMIN_TOKEN, session_cookie

ADMINS = {"groups": ["admins"]}


async def _admin(gw: Any) -> Page:
    """ada (not in the GitLab subtree, so no run touches her) administers."""
    ada = Page(gw, await session_cookie(gw, "ada", uid=50))
    await _admin_group(gw, "admins", "ada")
    await _until_admin(ada)
    return ada


async def _state(db: asyncpg.Pool) -> tuple[Any, ...]:
    """Everything a run could change, and the runs recorded."""
    return (await db.fetchval("SELECT count(*) FROM users"), await db.fetchval("SELECT count(*) FROM groups"),
            await db.fetchval("SELECT count(*) FROM memberships"),
            await db.fetchval("SELECT count(*) FROM sessions WHERE revoked_at IS NULL"),
            await db.fetchval("SELECT count(*) FROM automatic_runs"),
            await db.fetchval("SELECT count(*) FROM audit_events WHERE action = 'sync.automatic'"))


async def test_off_the_page_says_how_to_turn_it_on(gateway_factory, db):
    gw = await gateway_factory(admin=ADMINS)
    ada = await _admin(gw)
    r = await ada.get("/oauth2/admin/provisioning")
    assert r.status == 200 and 'id="provisioning-off"' in ada.text and "not configured" in ada.text
    for key in ("provisioning.automatic.token", "provisioning.automatic.groups", "provisioning.automatic.interval"):
        assert key in ada.text
    assert 'id="run-button"' not in ada.text
    # A forged or stale post of the run form is still only a 409 page: nothing to run.
    await ada.get("/oauth2/admin/groups")  # a page with a form: its token
    r = await ada.post("/oauth2/admin/provisioning/run", {})
    assert r.status == 409 and "not configured" in ada.text.lower()
    assert await db.fetchval("SELECT count(*) FROM automatic_runs") == 0


async def test_last_runs_dry_run_plan_and_run_now(gateway_factory, gitlab: tuple[FakeGitLab, str], db):
    fake, _ = gitlab
    seed(fake)
    gw = await gateway_factory(admin=ADMINS, provisioning=AUTOMATIC)
    await wait_for_runs(db, 1)  # the schedule's first run, at start
    ada = await _admin(gw)
    r = await ada.get("/oauth2/admin/provisioning")
    assert r.status == 200
    assert "the schedule" in ada.text and "applied" in ada.text and "3 users created" in ada.text
    assert "acme" in ada.text and 'id="plan-button"' in ada.text and "no run in progress" in ada.text
    assert "glpat-" not in ada.text  # the sync token is never shown

    # GitLab changes: bob leaves sre, a newcomer with a name that is markup joins web.
    fake.remove_member("bob", "acme/platform/sre")
    fake.add_user(70, "newcomer", name="<script>alert(1)</script>")
    fake.add_member("newcomer", "acme/web")
    before = await _state(db)
    r = await ada.post("/oauth2/admin/provisioning/plan", {})
    assert r.status == 200, ada.text[:400]
    assert 'id="plan-title"' in ada.text and "Nothing was changed" in ada.text
    assert "newcomer" in ada.text and "remove member" in ada.text and "create user" in ada.text
    assert "<script>alert(1)" not in ada.text and "&lt;script&gt;alert(1)&lt;/script&gt;" in ada.text
    assert await _state(db) == before  # a dry run changes nothing and is not recorded

    r = await ada.post("/oauth2/admin/provisioning/run", {})
    assert r.status == 302 and r.headers["Location"] == "/oauth2/admin/provisioning?done=ran"
    assert await db.fetchval("SELECT count(*) FROM users WHERE login = 'newcomer'") == 1
    newest = await db.fetchrow("SELECT actor, ok FROM automatic_runs ORDER BY id DESC LIMIT 1")
    assert newest["actor"] == "ada" and newest["ok"] is True
    assert await db.fetchval("SELECT actor FROM audit_events WHERE action = 'sync.automatic' ORDER BY id DESC "
                             "LIMIT 1") == "ada"
    r = await ada.get("/oauth2/admin/provisioning?done=ran")
    runs = ada.text[ada.text.index('id="runs"'):]
    assert "The run was applied" in ada.text and runs.index("ada") < runs.index("the schedule")

    # Cross-site, or a replayed form token: refused, no run.
    before = await _state(db)
    await ada.get("/oauth2/admin/provisioning")
    token = ada.csrf()
    assert (await ada.post("/oauth2/admin/provisioning/run", {}, origin="https://evil.example",
                           csrf=token)).status == 403
    assert (await ada.post("/oauth2/admin/provisioning/run", {}, csrf=None)).status == 403
    assert (await ada.post("/oauth2/admin/provisioning/run", {}, csrf=token)).status == 302
    assert (await ada.post("/oauth2/admin/provisioning/run", {}, csrf=token)).status == 403  # replayed
    assert (await _state(db))[4] == before[4] + 1


async def test_while_a_run_is_going_both_forms_answer_409(gateway_factory, gitlab: tuple[FakeGitLab, str], db):
    fake, _ = gitlab
    seed(fake)
    gw = await gateway_factory(admin=ADMINS, provisioning=AUTOMATIC)
    await wait_for_runs(db, 1)
    ada = await _admin(gw)
    fake.fail("members", 0, delay=0.5, times=None)  # GitLab answers, slowly: the API's run holds the lock
    async with gw.admin() as admin:
        first = asyncio.create_task(admin.post("/api/v1/sync"))
        for _ in range(100):
            await ada.get("/oauth2/admin/provisioning")
            if "a run is in progress" in ada.text:
                break
            await asyncio.sleep(0.02)
        assert "a run is in progress" in ada.text
        before = await _state(db)
        r = await ada.post("/oauth2/admin/provisioning/run", {})
        assert r.status == 409 and "in progress; nothing was changed" in ada.text and 'id="runs"' in ada.text
        await ada.get("/oauth2/admin/provisioning")
        r = await ada.post("/oauth2/admin/provisioning/plan", {})
        assert r.status == 409 and "in progress; nothing was changed" in ada.text
        assert await _state(db) == before
        assert (await first).status == 200
    assert await db.fetchval("SELECT count(*) FROM automatic_runs WHERE actor = 'ada'") == 0


async def test_gitlab_failing_is_said_and_recorded_as_a_failed_run(gateway_factory, gitlab: tuple[FakeGitLab, str],
                                                                  db):
    fake, _ = gitlab
    seed(fake)
    gw = await gateway_factory(admin=ADMINS, provisioning=AUTOMATIC)
    await wait_for_runs(db, 1)
    ada = await _admin(gw)
    fake.fail("members", 500, times=None)
    await ada.get("/oauth2/admin/provisioning")
    r = await ada.post("/oauth2/admin/provisioning/run", {})
    assert r.status == 502 and 'id="problem"' in ada.text
    assert "failed" in ada.text and "nothing changed" in ada.text
    assert await db.fetchval("SELECT actor FROM automatic_runs WHERE NOT ok") == "ada"


async def test_a_long_run_answers_still_running_and_finishes_anyway(gateway_factory, gitlab: tuple[FakeGitLab, str],
                                                                   db, monkeypatch):
    fake, _ = gitlab
    seed(fake)
    gw = await gateway_factory(admin=ADMINS, provisioning=AUTOMATIC)
    await wait_for_runs(db, 1)
    ada = await _admin(gw)
    monkeypatch.setattr(provisioning_page, "RUN_WAIT", 0.1)  # the page waits 0.1 s, GitLab takes longer
    fake.fail("members", 0, delay=0.3, times=None)
    await ada.get("/oauth2/admin/provisioning")
    r = await ada.post("/oauth2/admin/provisioning/run", {})
    assert r.status == 302 and r.headers["Location"].endswith("done=running")
    await ada.get("/oauth2/admin/provisioning?done=running")
    assert "still going on" in ada.text
    await wait_for_runs(db, 2)  # the run outlived its request
    assert await db.fetchval("SELECT actor FROM automatic_runs ORDER BY id DESC LIMIT 1") == "ada"


async def test_a_big_plan_is_shown_bounded_with_whole_counts(gateway_factory, gitlab: tuple[FakeGitLab, str], db):
    fake, _ = gitlab
    seed(fake)
    extra = provisioning_page.PLAN_SHOWN + 7
    for i in range(extra):
        fake.add_user(1000 + i, f"user{i:03d}")
        fake.add_member(f"user{i:03d}", "acme/web")
    gw = await gateway_factory(admin=ADMINS, provisioning=AUTOMATIC)
    await wait_for_runs(db, 1)
    for i in range(extra):
        fake.add_user(3000 + i, f"late{i:03d}")
        fake.add_member(f"late{i:03d}", "acme")
    ada = await _admin(gw)
    await ada.get("/oauth2/admin/provisioning")
    r = await ada.post("/oauth2/admin/provisioning/plan", {})
    assert r.status == 200
    created = ada.text.split(f"create user ({extra})", 1)[1].split("<h3>", 1)[0]
    assert created.count("<tr><td>late0") == provisioning_page.PLAN_SHOWN and "and 7 more" in created
    assert f"add member ({4 * extra})" in ada.text  # acme and its three subgroups each
    assert f"<td>users created</td><td>{extra}</td>" in ada.text


async def test_on_the_admin_listener_run_now_is_the_admin_tokens(gateway_factory, gitlab: tuple[FakeGitLab, str],
                                                                 db):
    fake, _ = gitlab
    seed(fake)
    gw = await gateway_factory(provisioning=AUTOMATIC)
    await wait_for_runs(db, 1)
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        origin = {"Origin": gw.admin_url}
        r = await http.post(gw.admin_url + "/admin/sign_in", data={"token": ADMIN_TOKEN}, headers=origin)
        r = await http.get(gw.admin_url + "/admin/provisioning")
        text = await r.text()
        assert r.status == 200 and "the schedule" in text
        token = CSRF.search(text)
        assert token is not None
        r = await http.post(gw.admin_url + "/admin/provisioning/run", data={"csrf": token.group(1)}, headers=origin,
                            allow_redirects=False)
        assert r.status == 302 and r.headers["Location"] == "/admin/provisioning?done=ran"
    assert await db.fetchval("SELECT actor FROM automatic_runs ORDER BY id DESC LIMIT 1") == "tester"
    assert await db.fetchval("SELECT actor FROM audit_events WHERE action = 'sync.automatic' ORDER BY id DESC "
                             "LIMIT 1") == "tester"
