"""{prefix}/me (SPEC §15): who the signed-in user is, their groups with source and last sync, their sessions
(each can be ended), their access tokens (SPEC §14: create, revoke), and a sign-out button.

Only a browser session counts here (a bearer token does not open these pages). Other sessions are named by a
hash of their id, never the id itself (a session id is a bearer secret). Every form is checked by web/forms.py
(Origin + a single-use token bound to this session).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from aiohttp import web

from gateway import keys
from gateway.access.assertion import session_hash
from gateway.errors import NotFound, Unauthenticated, Unprocessable
from gateway.identity import Identity
from gateway.services import accounts, sessions, tokens
from gateway.web.forms import FORMS, checked_form, origin_of
from gateway.web.html import render
from gateway.web.login import start_url
from gateway.web.pages import FORM_POST, redirect, wants_html
from gateway.web.tokens import signed_in

SOURCES = {"sync": "from GitLab", "manual": "added by an administrator", "default": "every user"}
NOTICES = {"session": "The session was signed out everywhere.", "revoked": "The token was revoked everywhere."}


@dataclass(frozen=True, slots=True)
class SessionView:
    ref: str
    created_at: datetime
    last_seen_at: datetime
    expires_at: datetime


def is_admin(request: web.Request, identity: Identity) -> bool:
    """SPEC §15: a member of one of admin.groups (none configured: nobody, the pages are off)."""
    return bool(set(request.app[keys.CONFIG].admin.groups) & set(identity.groups))


async def _own_sessions(request: web.Request, login: str) -> list[SessionView]:
    page = await sessions.list_sessions(request.app[keys.POOL], login=login, limit=100)
    return [SessionView(session_hash(s.id), s.created_at, s.last_seen_at, s.expires_at) for s in page.items]


async def _page(request: web.Request, identity: Identity, **extra: Any) -> web.Response:
    cfg = request.app[keys.CONFIG]
    pool = request.app[keys.POOL]
    details = await accounts.get_user(pool, identity.login)
    own_tokens = (await tokens.list_tokens(pool, login=identity.login, limit=100)).items \
        if cfg.tokens.enabled else ()
    context = {
        "title": "Your account", "prefix": cfg.server.prefix, "user": details.user, "groups": details.groups,
        "sources": SOURCES, "sessions": await _own_sessions(request, identity.login),
        "current_ref": identity.sid_hash, "tokens_enabled": cfg.tokens.enabled, "tokens": own_tokens,
        "max_days": max(1, int(cfg.tokens.max_lifetime // tokens.DAY)), "is_admin": is_admin(request, identity),
        "new_secret": None, "new_name": None, "notice": NOTICES.get(request.query.get("done", "")), **extra,
    }
    forms = request.app[FORMS]
    return render(request, "me.html", context, csrf=lambda: forms.issue(identity.sid_hash))


async def me(request: web.Request) -> web.StreamResponse:
    """GET {prefix}/me."""
    try:
        identity = await signed_in(request)
    except Unauthenticated:
        if wants_html(request):
            prefix = request.app[keys.CONFIG].server.prefix
            return redirect(start_url(prefix, f"{prefix}/me"))
        raise
    return await _page(request, identity)


async def tokens_page(request: web.Request) -> web.StreamResponse:
    """GET {prefix}/tokens: the tokens are a section of {prefix}/me."""
    return redirect(f"{request.app[keys.CONFIG].server.prefix}/me#tokens")


async def _form(request: web.Request) -> tuple[Identity, dict[str, str]]:
    request[FORM_POST] = True
    identity = await signed_in(request)
    cfg = request.app[keys.CONFIG]
    fields = await checked_form(request, request.app[FORMS], request.app[keys.POOL], identity.sid_hash,
                                origin_of(cfg.server.public_url))
    return identity, fields


async def revoke_session(request: web.Request) -> web.StreamResponse:
    """POST {prefix}/me/sessions/revoke (ref): end one of one's own sessions, on every replica."""
    identity, fields = await _form(request)
    ref = fields.get("ref", "")
    pool = request.app[keys.POOL]
    page = await sessions.list_sessions(pool, login=identity.login, limit=500)
    match = next((s for s in page.items if session_hash(s.id) == ref), None)
    if match is None:
        raise NotFound("This session has already ended")
    await sessions.revoke_session(pool, match.id, actor=identity.login)
    request.app[keys.SESSIONS].invalidate_session(match.id)
    return redirect(f"{request.app[keys.CONFIG].server.prefix}/me?done=session")


async def create_token(request: web.Request) -> web.StreamResponse:
    """POST {prefix}/me/tokens (name, days): the page again, with the new token shown this once."""
    identity, fields = await _form(request)
    cfg = request.app[keys.CONFIG]
    if not cfg.tokens.enabled:
        raise NotFound("Access tokens are not enabled on this gateway (tokens.enabled)")
    raw_days = fields.get("days", "").strip()
    if raw_days and not (raw_days.isdigit() and len(raw_days) < 6):
        raise Unprocessable("The lifetime must be a whole number of days")
    new = await tokens.create_token(request.app[keys.POOL], login=identity.login, name=fields.get("name", ""),
                                    days=int(raw_days) if raw_days else None,
                                    max_lifetime=cfg.tokens.max_lifetime, actor=identity.login)
    return await _page(request, identity, new_secret=new.secret, new_name=new.token.name,
                       notice="Token created.")


async def revoke_token(request: web.Request) -> web.StreamResponse:
    """POST {prefix}/me/tokens/revoke (id): revoke one of one's own tokens."""
    identity, fields = await _form(request)
    raw = fields.get("id", "")
    if not raw.isdigit() or len(raw) > 18:
        raise NotFound("No such token")
    await tokens.revoke_token(request.app[keys.POOL], int(raw), actor=identity.login, owner_id=identity.user_id)
    return redirect(f"{request.app[keys.CONFIG].server.prefix}/me?done=revoked")


def add_routes(app: web.Application, prefix: str) -> None:
    app.router.add_get(f"{prefix}/me", me)
    app.router.add_get(f"{prefix}/tokens", tokens_page)
    app.router.add_post(f"{prefix}/me/sessions/revoke", revoke_session)
    app.router.add_post(f"{prefix}/me/tokens", create_token)
    app.router.add_post(f"{prefix}/me/tokens/revoke", revoke_token)
