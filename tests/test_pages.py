"""{prefix}/me and the administration pages (SPEC §15) over HTTP: who may see them, CSRF (Origin + single-use
form token bound to the session), escaping, and every change audited under the administrator's name."""

from __future__ import annotations

import asyncio
import html
import re
from typing import Any

import aiohttp

from tests.conftest import ADMIN_TOKEN, audit_actions, session_cookie

CSRF = re.compile(r'name="csrf" value="([^"]+)"')
ON = {"enabled": True}


class Page:
    """A signed-in browser as plain HTTP: its cookie, and the forms of the last page it fetched."""

    def __init__(self, gw: Any, cookie: str, origin: str | None = None) -> None:
        self.gw = gw
        self.headers = {"Cookie": f"{gw.config.session.cookie_name}={cookie}", "Accept": "text/html"}
        self.origin = origin or gw.public_url
        self.text = ""

    async def get(self, path: str, base: str | None = None) -> aiohttp.ClientResponse:
        async with aiohttp.ClientSession() as http:
            r = await http.get((base or self.gw.public_url) + path, headers=self.headers, allow_redirects=False)
            self.text = await r.text()
            return r

    def csrf(self) -> str:
        found = CSRF.search(self.text)
        assert found, self.text[:500]
        return html.unescape(found.group(1))

    async def post(self, path: str, data: dict[str, str], *, origin: str | None = "same", csrf: str | None = "fresh",
                   base: str | None = None) -> aiohttp.ClientResponse:
        headers = dict(self.headers)
        if origin is not None:
            headers["Origin"] = self.origin if origin == "same" else origin
        if csrf is not None:
            data = {**data, "csrf": self.csrf() if csrf == "fresh" else csrf}
        async with aiohttp.ClientSession() as http:
            r = await http.post((base or self.gw.public_url) + path, data=data, headers=headers,
                                allow_redirects=False)
            self.text = await r.text()
            return r


async def _admin_group(gw: Any, name: str = "admins", *members: str) -> int:
    async with gw.admin() as admin:
        r = await admin.post("/api/v1/groups", json={"name": name})
        group_id = int((await r.json())["id"])
        for login in members:
            assert (await admin.post(f"/api/v1/groups/{group_id}/members", json={"login": login})).status == 201
    return group_id


async def _until_admin(page: Page) -> None:
    """The membership change reaches the session cache by NOTIFY: on a busy machine, give it ten seconds."""
    for _ in range(500):
        if (await page.get("/oauth2/admin/users")).status == 200:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the new admin membership never reached the session")


# ---- /me --------------------------------------------------------------------------------------------------

async def test_me_needs_a_browser_session(gateway_factory):
    gw = await gateway_factory(tokens=ON)
    async with aiohttp.ClientSession() as http:
        r = await http.get(gw.public_url + "/oauth2/me", headers={"Accept": "text/html"}, allow_redirects=False)
        assert r.status == 302 and r.headers["Location"].startswith("/oauth2/start?rd=")
        r = await http.get(gw.public_url + "/oauth2/me", allow_redirects=False)
        assert r.status == 401


async def test_me_shows_identity_groups_sessions_and_escapes_everything(gateway_factory):
    gw = await gateway_factory(tokens=ON)
    cookie = await session_cookie(gw, "alice")
    await _admin_group(gw, "<script>alert(1)", "alice")  # a local-only name ("/" would make it a GitLab path)
    page = Page(gw, cookie)
    r = await page.get("/oauth2/me")
    assert r.status == 200 and r.headers["Cache-Control"] == "no-store"
    assert "frame-ancestors 'none'" in r.headers["Content-Security-Policy"]
    assert '<dd id="login">alice</dd>' in page.text
    assert "<script>" not in page.text and "&lt;script&gt;alert(1)" in page.text
    assert "gateway-users" in page.text and "added by an administrator" in page.text
    assert "this browser" in page.text and 'id="sign-out"' in page.text
    assert 'id="create-token"' in page.text


async def test_me_creates_a_token_once_and_refuses_forged_or_replayed_forms(gateway_factory, db):
    gw = await gateway_factory(tokens=ON)
    page = Page(gw, await session_cookie(gw, "alice"))
    await page.get("/oauth2/me")
    token = page.csrf()
    # Cross-site, no Origin, no form token, a forged one: 403 and nothing created.
    assert (await page.post("/oauth2/me/tokens", {"name": "x"}, origin="https://evil.example")).status == 403
    assert (await page.post("/oauth2/me/tokens", {"name": "x"}, origin=None, csrf=token)).status == 403
    assert (await page.post("/oauth2/me/tokens", {"name": "x"}, csrf=None)).status == 403
    assert (await page.post("/oauth2/me/tokens", {"name": "x"}, csrf=token[:-2] + "00")).status == 403
    assert await db.fetchval("SELECT count(*) FROM tokens") == 0
    r = await page.post("/oauth2/me/tokens", {"name": "laptop", "days": "5"}, csrf=token)
    assert r.status == 200
    secret = re.search(r'id="new-token-value">(gwp_[0-9A-Za-z]{40})<', page.text)
    assert secret is not None
    # The same form token again: a replay, refused, nothing created.
    r = await page.post("/oauth2/me/tokens", {"name": "again"}, csrf=token)
    assert r.status == 403 and "already submitted" in page.text
    assert await db.fetchval("SELECT count(*) FROM tokens") == 1
    # Another user's session cannot use alice's form token.
    bob = Page(gw, await session_cookie(gw, "bob", uid=11))
    await page.get("/oauth2/me")
    assert (await bob.post("/oauth2/me/tokens", {"name": "x"}, csrf=page.csrf())).status == 403
    # The secret is never shown again.
    await page.get("/oauth2/me")
    assert secret.group(1) not in page.text and "laptop" in page.text


async def test_me_revokes_own_session_and_token(gateway_factory, db):
    gw = await gateway_factory(tokens=ON)
    other = await session_cookie(gw, "alice")
    async with gw.browser() as b:  # alice again, in another browser
        await b.sign_in("alice")
        page = Page(gw, b.cookie("_gateway"))
    await page.get("/oauth2/me")
    refs = re.findall(r'name="ref" value="([^"]+)"', page.text)
    assert len(refs) == 2
    async with aiohttp.ClientSession() as http:
        r = await http.get(gw.public_url + "/tool", headers={"Cookie": f"_gateway={other}"})
        assert r.status == 200
    # Revoke the one that is not this browser.
    current = re.search(r'this browser.*?name="ref" value="([^"]+)"', page.text, re.S)
    assert current is not None
    target = next(ref for ref in refs if ref != current.group(1))
    r = await page.post("/oauth2/me/sessions/revoke", {"ref": target})
    assert r.status == 302 and r.headers["Location"] == "/oauth2/me?done=session"
    async with aiohttp.ClientSession() as http:
        r = await http.get(gw.public_url + "/tool", headers={"Cookie": f"_gateway={other}"}, allow_redirects=False)
        assert r.status == 401
    assert (await page.get("/oauth2/me")).status == 200
    assert ("session.revoked", "alice") in [(a, s) for a, s, _ in await audit_actions(db)]


# ---- administration pages ----------------------------------------------------------------------------------

async def test_admin_pages_are_off_without_admin_groups(gateway_factory):
    gw = await gateway_factory()
    page = Page(gw, await session_cookie(gw, "alice"))
    assert (await page.get("/oauth2/admin/users")).status == 404


async def test_a_non_admin_gets_403_and_cannot_post(gateway_factory, db):
    gw = await gateway_factory(admin={"groups": ["admins"]})
    await session_cookie(gw, "alice")
    await _admin_group(gw, "admins", "alice")
    bob = Page(gw, await session_cookie(gw, "bob", uid=11))
    r = await bob.get("/oauth2/admin/users")
    assert r.status == 403 and "admins" in bob.text
    await bob.get("/oauth2/me")
    r = await bob.post("/oauth2/admin/groups", {"name": "bobs-group"})
    assert r.status == 403
    assert await db.fetchval("SELECT count(*) FROM groups WHERE name = 'bobs-group'") == 0
    async with aiohttp.ClientSession() as http:  # not signed in at all
        r = await http.get(gw.public_url + "/oauth2/admin/users", headers={"Accept": "text/html"},
                           allow_redirects=False)
        assert r.status == 302 and "/oauth2/start" in r.headers["Location"]


async def test_an_admin_manages_groups_users_and_sees_the_audit(gateway_factory, db):
    gw = await gateway_factory(admin={"groups": ["admins"]}, tokens=ON)
    alice = Page(gw, await session_cookie(gw, "alice"))
    await session_cookie(gw, "bob", uid=11)
    await _admin_group(gw, "admins", "alice")
    await _until_admin(alice)
    assert (await alice.get("/oauth2/admin/groups")).status == 200
    r = await alice.post("/oauth2/admin/groups", {"name": "<b>ops", "description": "on call"})
    assert r.status == 302
    group_path = r.headers["Location"].split("?")[0]
    assert (await alice.get(group_path)).status == 200
    assert "&lt;b&gt;ops" in alice.text and "<b>ops" not in alice.text
    gid = group_path.rsplit("/", 1)[1]
    assert (await alice.post(f"/oauth2/admin/groups/{gid}/members", {"login": "bob"})).status == 302
    await alice.get("/oauth2/admin/users/bob")
    assert "&lt;b&gt;ops" in alice.text
    assert (await alice.post("/oauth2/admin/users/bob/active", {"active": "false"})).status == 302
    assert await db.fetchval("SELECT active FROM users WHERE login = 'bob'") is False
    r = await alice.get("/oauth2/admin/audit?action=user.deactivated")
    assert r.status == 200 and "bob" in alice.text
    events = [(a, s) for a, s, _ in await audit_actions(db)]
    assert ("group.created", "<b>ops") in events and ("group.member_added", "bob") in events
    rows = await db.fetch("SELECT actor FROM audit_events WHERE subject IN ('<b>ops', 'bob') AND action IN "
                          "('group.created', 'group.member_added', 'user.deactivated')")
    assert [r["actor"] for r in rows] == ["alice"] * 3
    # Rename, remove the member, delete.
    await alice.get(group_path)
    assert (await alice.post(f"/oauth2/admin/groups/{gid}/rename", {"name": "ops", "description": ""})).status == 302
    await alice.get(group_path)
    assert (await alice.post(f"/oauth2/admin/groups/{gid}/members/remove", {"login": "bob"})).status == 302
    await alice.get(group_path)
    assert (await alice.post(f"/oauth2/admin/groups/{gid}/delete", {})).status == 302
    assert await db.fetchval("SELECT count(*) FROM groups WHERE id = $1", int(gid)) == 0
    for path in ("/oauth2/admin/sessions", "/oauth2/admin/users?q=b", "/oauth2/admin/provisioning"):
        assert (await alice.get(path)).status == 200, path
    # SPEC §11: re-check a user with GitLab now (last: it may undo memberships added by hand).
    await alice.get("/oauth2/admin/users/alice")
    assert 'id="sync-now"' in alice.text
    assert (await alice.post("/oauth2/admin/users/alice/sync", {})).status in (302, 409)


async def test_admin_form_errors_are_pages_not_tracebacks(gateway_factory):
    gw = await gateway_factory(admin={"groups": ["admins"]})
    alice = Page(gw, await session_cookie(gw, "alice"))
    await _admin_group(gw, "admins", "alice")
    await _until_admin(alice)
    await alice.get("/oauth2/admin/groups")
    r = await alice.post("/oauth2/admin/groups", {"name": "admins"})
    assert r.status == 409 and "already exists" in alice.text
    await alice.get("/oauth2/admin/groups")
    assert (await alice.post("/oauth2/admin/groups", {"name": " bad"})).status == 422
    assert (await alice.get("/oauth2/admin/groups/abc")).status == 404
    assert (await alice.get("/oauth2/admin/users/nobody")).status == 404
    assert (await alice.get("/oauth2/admin/audit?since=yesterday")).status == 400


async def test_admin_listener_pages_behind_an_admin_token(gateway_factory, db):
    gw = await gateway_factory()
    await session_cookie(gw, "alice")
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        r = await http.get(gw.admin_url + "/admin/users", allow_redirects=False)
        assert r.status == 302 and r.headers["Location"] == "/admin/sign_in"
        origin = {"Origin": gw.admin_url}
        r = await http.post(gw.admin_url + "/admin/sign_in", data={"token": "wrong" * 5}, headers=origin,
                            allow_redirects=False)
        assert r.status == 401
        r = await http.post(gw.admin_url + "/admin/sign_in", data={"token": ADMIN_TOKEN},
                            headers={"Origin": "https://evil.example"}, allow_redirects=False)
        assert r.status == 403
        r = await http.post(gw.admin_url + "/admin/sign_in", data={"token": ADMIN_TOKEN}, headers=origin,
                            allow_redirects=False)
        assert r.status == 302
        r = await http.get(gw.admin_url + "/admin/groups")
        assert r.status == 200
        token = CSRF.search(await r.text())
        assert token is not None
        r = await http.post(gw.admin_url + "/admin/groups", data={"name": "x", "csrf": html.unescape(token.group(1))},
                            headers={"Origin": "https://evil.example"}, allow_redirects=False)
        assert r.status == 403
        r = await http.post(gw.admin_url + "/admin/groups", data={"name": "sre", "csrf": html.unescape(token.group(1))},
                            headers=origin, allow_redirects=False)
        assert r.status == 302
        r = await http.get(gw.admin_url + "/admin/groups/999", headers={"Accept": "text/html"})
        assert r.status == 404 and r.content_type == "text/html"
        r = await http.get(gw.admin_url + "/api/v1/groups/999", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        assert r.status == 404 and r.content_type == "application/json"
    assert await db.fetchval("SELECT actor FROM audit_events WHERE action = 'group.created'") == "tester"
    assert await db.fetchval("SELECT count(*) FROM groups WHERE name = 'x'") == 0


async def test_sync_now_is_audited_under_the_administrator(gateway_factory, db):
    """SPEC §11 + §15: the "Sync with GitLab now" button's re-check (its group changes, or the sessions it ends)
    is audited with the administrator's login as actor, not as the background re-check's."""
    gw = await gateway_factory(admin={"groups": ["admins"]})
    alice = Page(gw, await session_cookie(gw, "alice"))
    await session_cookie(gw, "bob", uid=11)
    await _admin_group(gw, "admins", "alice")
    await _admin_group(gw, "ops")
    gw.fake.add_group(50, "ops")
    gw.fake.add_member("bob", "ops")
    await _until_admin(alice)
    await alice.get("/oauth2/admin/users/bob")
    r = await alice.post("/oauth2/admin/users/bob/sync", {})
    assert r.status == 302 and r.headers["Location"].endswith("done=synced"), alice.text[:300]
    row = await db.fetchrow("SELECT actor, details::text AS d FROM audit_events WHERE action = 'sync.resync' "
                            "AND subject = 'bob' ORDER BY id DESC LIMIT 1")
    assert row is not None and row["actor"] == "alice" and "ops" in row["d"]
    # A re-check that ends the sessions (blocked in GitLab): the revocation is alice's too.
    gw.fake.set_user_state("bob", "blocked")
    await alice.get("/oauth2/admin/users/bob")
    assert (await alice.post("/oauth2/admin/users/bob/sync", {})).status == 302
    assert await db.fetchval("SELECT actor FROM audit_events WHERE action = 'session.revoked' AND subject = 'bob'"
                             ) == "alice"
