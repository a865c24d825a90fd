"""Administration pages (SPEC §15): users, groups, sessions, the audit log and automatic provisioning, as
server-rendered HTML over the same services as the admin API and CLI (gateway.services).

They are served twice, with the same handlers:
- on the public listener at `{prefix}/admin/`, for signed-in members of `admin.groups` (empty: the pages are
  off, 404); anyone else signed in gets 403; changes are audited under the administrator's login;
- on the admin listener at `/admin/`, behind an admin token typed once into /admin/sign_in and kept in an
  encrypted, HttpOnly, SameSite=Strict cookie; changes are audited under the token's name.
Who is looking is a `Viewer`, found by the app's VIEWER function. Every form passes web/forms.py: the Origin
must be the listener's own and the single-use form token must belong to the viewer's session.
"""

from __future__ import annotations

import inspect
import json
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from aiohttp import web
from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from gateway import keys
from gateway.access.assertion import session_hash
from gateway.admin import provisioning_page
from gateway.errors import BadRequest, Forbidden, NotFound, Unauthenticated, Unprocessable
from gateway.identity import Identity
from gateway.services import accounts, audit, groups, sessions, shapes
from gateway.services import tokens as svc_tokens
from gateway.sync.resync import RESYNC
from gateway.web.forms import FORMS, check_origin, checked_form, origin_of
from gateway.web.html import render
from gateway.web.login import start_url
from gateway.web.me import is_admin
from gateway.web.pages import FORM_POST, redirect, wants_html

ADMIN_COOKIE = "_gateway_admin"
ADMIN_COOKIE_TTL = 8 * 3600
MAX_ID_DIGITS = 18
PAGE = 100
DONE = {
    "created": "The group was created.", "renamed": "The group was saved.", "deleted": "The group was deleted.",
    "added": "The member was added.", "removed": "The member was removed.",
    "deactivated": "The user was deactivated and every session of theirs ended.",
    "activated": "The user was reactivated.", "revoked": "Revoked everywhere.", "synced": "Synchronized with GitLab.",
    "ran": "The run was applied: it is the newest run below.",
    "running": "The run is still going on (a big GitLab subtree takes minutes): reload this page to see it "
               "below when it has finished.",
}


@dataclass(frozen=True, slots=True)
class Viewer:
    """The administrator looking at a page: audit actor, what form tokens are bound to, where pages live."""

    actor: str
    binding: str
    origin: str
    base: str
    label: str
    me_url: str | None = None


VIEWER: web.AppKey[Callable[[web.Request], Awaitable[Viewer]]] = web.AppKey("admin_viewer")


class NotAdministrator(Forbidden):
    code, title = "not_administrator", "This page is for administrators"
    advice = "Ask an administrator to add you to one of the groups that administer the gateway (admin.groups)."


# ---- who is looking -------------------------------------------------------------------------------------

async def public_viewer(request: web.Request) -> Viewer:
    """{prefix}/admin/ on the public listener: a signed-in (browser) member of admin.groups."""
    cfg = request.app[keys.CONFIG]
    prefix = cfg.server.prefix
    if not cfg.admin.groups:
        raise NotFound("The administration pages are off on this listener (admin.groups is empty)")
    identity = await request.app[keys.SESSIONS].identify(request)
    request[keys.IDENTITY] = identity
    if not isinstance(identity, Identity) or identity.via_token:
        if wants_html(request):
            raise web.HTTPFound(start_url(prefix, request.path if request.path.startswith("/") else "/"))
        raise Unauthenticated()
    if not is_admin(request, identity):
        raise NotAdministrator(f"Only members of {', '.join(cfg.admin.groups)} can use these pages.")
    return Viewer(identity.login, identity.sid_hash, origin_of(cfg.server.public_url), f"{prefix}/admin",
                  identity.login, f"{prefix}/me")


def _cookie_crypto(request: web.Request) -> MultiFernet:
    return MultiFernet([Fernet(k.encode()) for k in request.app[keys.CONFIG].session.secrets])


def _own_origin(request: web.Request) -> str:
    # The admin listener has no configured public URL: its origin is the one the browser connected to.
    return f"{request.scheme}://{request.host}".lower()


async def admin_listener_viewer(request: web.Request) -> Viewer:
    """/admin/ on the admin listener: the admin token's name, from the cookie set by /admin/sign_in."""
    value = request.cookies.get(ADMIN_COOKIE)
    data: Any = None
    if value:
        try:
            data = json.loads(_cookie_crypto(request).decrypt(value.encode(), ttl=ADMIN_COOKIE_TTL))
        except (InvalidToken, ValueError):
            data = None
    names = {t.name for t in request.app[keys.CONFIG].admin.tokens}
    if not isinstance(data, dict) or data.get("name") not in names or not isinstance(data.get("sid"), str):
        raise web.HTTPFound("/admin/sign_in")
    name = str(data["name"])
    return Viewer(name, session_hash(data["sid"]), _own_origin(request), "/admin", f"admin token {name}")


async def sign_in_page(request: web.Request) -> web.Response:
    return render(request, "admin/sign_in.html", {"title": "Administration: sign in"})


async def sign_in(request: web.Request) -> web.StreamResponse:
    """POST /admin/sign_in (token): the admin token, compared in constant time with every configured one."""
    request[FORM_POST] = True
    check_origin(request, _own_origin(request))
    presented = str((await request.post()).get("token", "")).strip().encode()
    name = None
    for token in request.app[keys.CONFIG].admin.tokens:
        if secrets.compare_digest(token.token.encode(), presented):
            name = token.name
    if name is None:
        return render(request, "admin/sign_in.html", {"title": "Administration: sign in",
                                                      "problem": "That is not one of the admin tokens."}, status=401)
    value = _cookie_crypto(request).encrypt(json.dumps({"name": name, "sid": secrets.token_urlsafe(24)}).encode())
    response = redirect("/admin/users")
    response.set_cookie(ADMIN_COOKIE, value.decode(), max_age=ADMIN_COOKIE_TTL, path="/admin", httponly=True,
                        samesite="Strict", secure=request.secure)
    return response


async def sign_out(request: web.Request) -> web.StreamResponse:
    check_origin(request, _own_origin(request))
    response = redirect("/admin/sign_in")
    response.del_cookie(ADMIN_COOKIE, path="/admin")
    return response


# ---- helpers --------------------------------------------------------------------------------------------

async def _viewer(request: web.Request) -> Viewer:
    return await request.app[VIEWER](request)


def _page(request: web.Request, viewer: Viewer, template: str, title: str, **context: Any) -> web.Response:
    forms = request.app[FORMS]
    context.update(title=title, base=viewer.base, viewer=viewer, me_url=viewer.me_url,
                   notice=DONE.get(request.query.get("done", "")))
    return render(request, template, context, csrf=lambda: forms.issue(viewer.binding))


async def _form(request: web.Request) -> tuple[Viewer, dict[str, str]]:
    request[FORM_POST] = True  # a non-administrator's post is refused with a page too
    viewer = await _viewer(request)
    fields = await checked_form(request, request.app[FORMS], request.app[keys.POOL], viewer.binding, viewer.origin)
    return viewer, fields


def _done(viewer: Viewer, path: str, what: str) -> web.Response:
    return redirect(f"{viewer.base}{path}{'&' if '?' in path else '?'}done={what}")


def _number(raw: str, what: str) -> int:
    if not raw.isdigit() or len(raw) > MAX_ID_DIGITS:
        raise NotFound(f"No {what} with id {raw[:40]}")
    return int(raw)


def _user_path(login: str) -> str:
    return f"/users/{quote(login, safe='')}"


# ---- users ----------------------------------------------------------------------------------------------

async def index(request: web.Request) -> web.StreamResponse:
    viewer = await _viewer(request)
    return redirect(f"{viewer.base}/users")


async def users(request: web.Request) -> web.Response:
    viewer = await _viewer(request)
    q, active = request.query.get("q", ""), request.query.get("active", "")
    state = {"true": True, "false": False}.get(active)
    page = await accounts.list_users(request.app[keys.POOL], q=q or None, active=state,
                                     cursor=request.query.get("cursor"), limit=PAGE)
    return _page(request, viewer, "admin/users.html", "Users", users=page.items, next=page.next, q=q, active=active)


async def user(request: web.Request) -> web.Response:
    viewer = await _viewer(request)
    pool = request.app[keys.POOL]
    cfg = request.app[keys.CONFIG]
    details = await accounts.get_user(pool, request.match_info["login"])
    login = details.user.login
    own_sessions = (await sessions.list_sessions(pool, login=login, limit=PAGE)).items
    own_tokens = (await svc_tokens.list_tokens(pool, login=login, limit=PAGE)).items if cfg.tokens.enabled else ()
    return _page(request, viewer, "admin/user.html", f"User {login}", u=details.user, groups=details.groups,
                 sessions=own_sessions, tokens=own_tokens, tokens_enabled=cfg.tokens.enabled,
                 can_sync=RESYNC in request.app)


async def set_active(request: web.Request) -> web.StreamResponse:
    viewer, fields = await _form(request)
    active = {"true": True, "false": False}.get(fields.get("active", ""))
    if active is None:
        raise BadRequest("active must be true or false")
    changed = await accounts.set_active(request.app[keys.POOL], request.match_info["login"], active,
                                        actor=viewer.actor)
    return _done(viewer, _user_path(changed.login), "activated" if active else "deactivated")


async def sync_now(request: web.Request) -> web.StreamResponse:
    """SPEC §11: re-check one user with GitLab now, as POST /api/v1/users/{login}/sync does (409 without a
    kept grant, 502 when GitLab fails); what it changes is audited by the re-check."""
    viewer, _ = await _form(request)
    login = request.match_info["login"]
    await request.app[RESYNC].check_now(login, actor=viewer.actor)
    return _done(viewer, _user_path(login), "synced")


# ---- groups ---------------------------------------------------------------------------------------------

async def group_list(request: web.Request) -> web.Response:
    viewer = await _viewer(request)
    page = await groups.list_groups(request.app[keys.POOL], cursor=request.query.get("cursor"), limit=PAGE)
    return _page(request, viewer, "admin/groups.html", "Groups", groups=page.items, next=page.next,
                 can_bind=CAN_BIND)


# Binding a new group to a GitLab group id (SPEC §16) needs services.groups.create_group(gitlab_group_id=...).
# Until that lands the form has no such field (and a posted id is refused with 422).
CAN_BIND = "gitlab_group_id" in inspect.signature(groups.create_group).parameters


async def group_create(request: web.Request) -> web.StreamResponse:
    viewer, fields = await _form(request)
    extra: dict[str, Any] = {}
    raw_id = fields.get("gitlab_group_id", "").strip()
    if raw_id:
        if not CAN_BIND or not raw_id.isascii() or not raw_id.isdigit() or len(raw_id) > MAX_ID_DIGITS:
            raise Unprocessable("The GitLab group id must be the numeric id GitLab shows on the group's page")
        extra["gitlab_group_id"] = int(raw_id)
    group = await groups.create_group(request.app[keys.POOL], fields.get("name", ""),
                                      fields.get("description", ""), actor=viewer.actor, **extra)
    return _done(viewer, f"/groups/{group.id}", "created")


async def group(request: web.Request) -> web.Response:
    viewer = await _viewer(request)
    pool = request.app[keys.POOL]
    group_id = _number(request.match_info["id"], "group")
    found = await groups.get_group(pool, group_id)
    members = await groups.list_members(pool, group_id, cursor=request.query.get("cursor"), limit=PAGE)
    return _page(request, viewer, "admin/group.html", f"Group {found.name}", g=found, members=members.items,
                 next=members.next)


async def group_rename(request: web.Request) -> web.StreamResponse:
    viewer, fields = await _form(request)
    group_id = _number(request.match_info["id"], "group")
    await groups.update_group(request.app[keys.POOL], group_id, name=fields.get("name", ""),
                              description=fields.get("description", ""), actor=viewer.actor)
    return _done(viewer, f"/groups/{group_id}", "renamed")


async def group_delete(request: web.Request) -> web.StreamResponse:
    viewer, _ = await _form(request)
    await groups.delete_group(request.app[keys.POOL], _number(request.match_info["id"], "group"), actor=viewer.actor)
    return _done(viewer, "/groups", "deleted")


async def member_add(request: web.Request) -> web.StreamResponse:
    viewer, fields = await _form(request)
    group_id = _number(request.match_info["id"], "group")
    await groups.add_member(request.app[keys.POOL], group_id, fields.get("login", "").strip(), actor=viewer.actor)
    return _done(viewer, f"/groups/{group_id}", "added")


async def member_remove(request: web.Request) -> web.StreamResponse:
    viewer, fields = await _form(request)
    group_id = _number(request.match_info["id"], "group")
    await groups.remove_member(request.app[keys.POOL], group_id, fields.get("login", ""), actor=viewer.actor)
    return _done(viewer, f"/groups/{group_id}", "removed")


# ---- sessions, tokens, audit, provisioning ---------------------------------------------------------------

async def session_list(request: web.Request) -> web.Response:
    viewer = await _viewer(request)
    login = request.query.get("login", "").strip()
    page = await sessions.list_sessions(request.app[keys.POOL], login=login or None,
                                        cursor=request.query.get("cursor"), limit=PAGE)
    return _page(request, viewer, "admin/sessions.html", "Sessions", sessions=page.items, next=page.next, login=login)


async def session_revoke(request: web.Request) -> web.StreamResponse:
    viewer, fields = await _form(request)
    revoked = await sessions.revoke_session(request.app[keys.POOL], fields.get("id", ""), actor=viewer.actor)
    if keys.SESSIONS in request.app:
        request.app[keys.SESSIONS].invalidate_session(revoked.id)
    back = _user_path(revoked.login) if fields.get("back") == "user" else "/sessions"
    return _done(viewer, back, "revoked")


async def token_revoke(request: web.Request) -> web.StreamResponse:
    viewer, fields = await _form(request)
    token = await svc_tokens.revoke_token(request.app[keys.POOL], _number(fields.get("id", ""), "token"),
                                          actor=viewer.actor)
    return _done(viewer, _user_path(token.login), "revoked")


async def audit_log(request: web.Request) -> web.Response:
    viewer = await _viewer(request)
    login, action, since = (request.query.get(k, "").strip() for k in ("login", "action", "since"))
    page = await audit.list_events(request.app[keys.POOL], since=shapes.parse_time(since) if since else None,
                                   login=login or None, action=action or None, cursor=request.query.get("cursor"),
                                   limit=PAGE)
    return _page(request, viewer, "admin/audit.html", "Audit log", events=page.items, next=page.next, login=login,
                 action=action, since=since)


async def provisioning(request: web.Request) -> web.Response:
    """SPEC §12: the last runs, and the forms to plan a dry run or run now (admin/provisioning_page.py)."""
    viewer = await _viewer(request)
    return _page(request, viewer, "admin/provisioning.html", "Automatic provisioning",
                 **await provisioning_page.context(request))


async def provisioning_plan(request: web.Request) -> web.Response:
    """A dry run's plan, shown on the page; nothing changes."""
    viewer, _ = await _form(request)
    page, status = await provisioning_page.dry_run(request, viewer.actor)
    response = _page(request, viewer, "admin/provisioning.html", "Automatic provisioning", **page)
    response.set_status(status)
    return response


async def provisioning_run(request: web.Request) -> web.StreamResponse:
    """Run now, audited under the administrator; 409 (and the page saying so) while another run is going."""
    viewer, _ = await _form(request)
    done, err = await provisioning_page.run_now(request, viewer.actor)
    if err is None:
        return _done(viewer, "/provisioning", done or "ran")
    page = await provisioning_page.context(request)
    response = _page(request, viewer, "admin/provisioning.html", "Automatic provisioning",
                     **{**page, "problem": provisioning_page.problem(err)})
    response.set_status(err.status)
    return response


def add_routes(app: web.Application, base: str, viewer: Callable[[web.Request], Awaitable[Viewer]]) -> None:
    """Serve the pages under `base` ({prefix}/admin or /admin), with `viewer` deciding who may look."""
    app[VIEWER] = viewer
    r = app.router
    r.add_get(f"{base}", index)
    r.add_get(f"{base}/", index)
    r.add_get(f"{base}/users", users)
    r.add_get(f"{base}/users/{{login}}", user)
    r.add_post(f"{base}/users/{{login}}/active", set_active)
    r.add_post(f"{base}/users/{{login}}/sync", sync_now)
    r.add_get(f"{base}/groups", group_list)
    r.add_post(f"{base}/groups", group_create)
    r.add_get(f"{base}/groups/{{id}}", group)
    r.add_post(f"{base}/groups/{{id}}/rename", group_rename)
    r.add_post(f"{base}/groups/{{id}}/delete", group_delete)
    r.add_post(f"{base}/groups/{{id}}/members", member_add)
    r.add_post(f"{base}/groups/{{id}}/members/remove", member_remove)
    r.add_get(f"{base}/sessions", session_list)
    r.add_post(f"{base}/sessions/revoke", session_revoke)
    r.add_post(f"{base}/tokens/revoke", token_revoke)
    r.add_get(f"{base}/audit", audit_log)
    r.add_get(f"{base}/provisioning", provisioning)
    r.add_post(f"{base}/provisioning/plan", provisioning_plan)
    r.add_post(f"{base}/provisioning/run", provisioning_run)


def add_admin_listener_routes(app: web.Application) -> None:
    app.router.add_get("/admin/sign_in", sign_in_page)
    app.router.add_post("/admin/sign_in", sign_in)
    app.router.add_post("/admin/sign_out", sign_out)
    add_routes(app, "/admin", admin_listener_viewer)
