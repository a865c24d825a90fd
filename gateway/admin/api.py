"""The admin JSON API under /api/v1 (SPEC §4). Thin handlers: read the request, call the service layer that
the CLI calls too (gateway.services), answer with the shapes of services/shapes.py.

Input errors: a body that is not a JSON object, or a bad query parameter, is 400; a JSON object with unknown,
missing or mistyped fields, or values the rules refuse, is 422. Every change is audited under the name of the
admin token that made it (bearer_middleware puts it under ADMIN_ACTOR).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from gateway import keys
from gateway.app import ADMIN_ACTOR
from gateway.errors import BadRequest, NotFound, Unprocessable
from gateway.services import accounts, audit, groups, sessions, shapes
from gateway.services import tokens as svc_tokens
from gateway.sync.resync import RESYNC
from gateway.web.pages import NO_STORE
from gateway.web.tokens import token_id

API = "/api/v1"
MAX_ID_DIGITS = 18  # bigint ids; a longer number cannot name a row
# What PostgreSQL text cannot hold (NUL) and what UTF-8 cannot encode (lone surrogates, e.g. JSON "\ud800" or
# percent-encoded invalid UTF-8): refused at the edge, or the database driver would fail with a 500 (SPEC §16).
_UNSTORABLE = re.compile(r"[\x00\ud800-\udfff]")
Handler = Callable[[web.Request], Awaitable[web.Response]]


def _storable_input(handler: Handler) -> Handler:
    """Refuse unstorable characters in the query (400) and in the path (404: no row can have such a name)."""

    @functools.wraps(handler)
    async def checked(request: web.Request) -> web.Response:
        for name, value in request.query.items():
            if _UNSTORABLE.search(name) or _UNSTORABLE.search(value):
                raise BadRequest(f"The query parameter {_printable(name)!r} holds a NUL byte or invalid text")
        for name, value in request.match_info.items():
            if _UNSTORABLE.search(value):
                raise NotFound(f"No {name} named like that: it holds a NUL byte or invalid text")
        return await handler(request)

    return checked


def _printable(text: str) -> str:
    return _UNSTORABLE.sub("\ufffd", text)[:64]


# ---- request and response helpers ----------------------------------------------------------------------

def _json(data: Any, status: int = 200, location: str | None = None) -> web.Response:
    headers = dict(NO_STORE)
    if location is not None:
        headers["Location"] = location
    return web.Response(status=status, text=json.dumps(data), content_type="application/json", headers=headers)


def _no_content() -> web.Response:
    return web.Response(status=204, headers=NO_STORE)


async def _body(request: web.Request, required: dict[str, type], optional: dict[str, type] | None = None
                ) -> dict[str, Any]:
    """The JSON object of the body, with exactly the given fields (types: str, int, bool; None allowed for
    optional ones)."""
    optional = optional or {}
    try:
        data = json.loads(await request.read() or b"null")
    except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
        raise BadRequest("The request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise BadRequest("The request body must be a JSON object")
    expected = {**required, **optional}
    unknown = sorted(set(data) - set(expected))
    if unknown:
        raise Unprocessable(f"Unknown field {unknown[0]!r}: expected {', '.join(expected)}")
    for name in required:
        if name not in data:
            raise Unprocessable(f"{name!r} is required")
    for name, value in data.items():
        want = expected[name]
        if value is None and name in optional:
            continue
        if not isinstance(value, want) or (want is int and isinstance(value, bool)):
            kind = {str: "a string", int: "an integer", bool: "true or false"}[want]
            raise Unprocessable(f"{name!r} must be {kind}")
        if isinstance(value, str) and _UNSTORABLE.search(value):
            raise Unprocessable(f"{name!r} must not contain NUL bytes or lone surrogates (invalid Unicode)")
    return data


def _query_int(request: web.Request, name: str) -> int | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return None
    # isascii: str.isdigit() also accepts digits int() refuses ("²").
    if not raw.isascii() or not raw.isdigit() or len(raw) > MAX_ID_DIGITS:
        raise BadRequest(f"{name} must be a positive integer")
    return int(raw)


def _query_bool(request: web.Request, name: str) -> bool | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return None
    value = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}.get(raw.lower())
    if value is None:
        raise BadRequest(f"{name} must be true or false")
    return value


async def _group_id(request: web.Request) -> int:
    """The group a path names: its numeric id, or its URL-encoded name (`/groups/acme%2Fplatform`), as the
    CLI takes names. A name made only of digits is read as an id."""
    raw = request.match_info["id"]
    if raw.isascii() and raw.isdigit():  # str.isdigit() alone accepts "²", which int() refuses
        if len(raw) > MAX_ID_DIGITS:
            raise NotFound(f"No group with id {raw}")
        return int(raw)
    if not raw.isprintable() or any("\ud800" <= c <= "\udfff" for c in raw):
        raise NotFound("No group has such a name")  # PostgreSQL text cannot hold them: no group does
    return (await groups.find_group(request.app[keys.POOL], raw)).id


def _page_args(request: web.Request) -> dict[str, Any]:
    return {"cursor": request.query.get("cursor"), "limit": _query_int(request, "limit")}


# ---- groups ---------------------------------------------------------------------------------------------

async def list_groups(request: web.Request) -> web.Response:
    page = await groups.list_groups(request.app[keys.POOL], **_page_args(request))
    return _json(shapes.page(page, shapes.group))


async def create_group(request: web.Request) -> web.Response:
    body = await _body(request, {"name": str}, {"description": str, "gitlab_group_id": int})
    group = await groups.create_group(request.app[keys.POOL], body["name"], body.get("description") or "",
                                      actor=request[ADMIN_ACTOR], gitlab_group_id=body.get("gitlab_group_id"))
    return _json(shapes.group(group), 201, location=f"{API}/groups/{group.id}")


async def get_group(request: web.Request) -> web.Response:
    return _json(shapes.group(await groups.get_group(request.app[keys.POOL], await _group_id(request))))


async def update_group(request: web.Request) -> web.Response:
    group_id = await _group_id(request)
    body = await _body(request, {}, {"name": str, "description": str})
    if body.get("name") is None and body.get("description") is None:
        raise Unprocessable("Nothing to change: send 'name' and/or 'description'")
    group = await groups.update_group(request.app[keys.POOL], group_id, name=body.get("name"),
                                      description=body.get("description"), actor=request[ADMIN_ACTOR])
    return _json(shapes.group(group))


async def delete_group(request: web.Request) -> web.Response:
    await groups.delete_group(request.app[keys.POOL], await _group_id(request), actor=request[ADMIN_ACTOR])
    return _no_content()


async def list_members(request: web.Request) -> web.Response:
    page = await groups.list_members(request.app[keys.POOL], await _group_id(request), **_page_args(request))
    return _json(shapes.page(page, shapes.member))


async def add_member(request: web.Request) -> web.Response:
    group_id = await _group_id(request)
    body = await _body(request, {"login": str})
    member = await groups.add_member(request.app[keys.POOL], group_id, body["login"], actor=request[ADMIN_ACTOR])
    return _json(shapes.member(member), 201, location=f"{API}/groups/{group_id}/members/{member.login}")


async def remove_member(request: web.Request) -> web.Response:
    await groups.remove_member(request.app[keys.POOL], await _group_id(request), request.match_info["login"],
                               actor=request[ADMIN_ACTOR])
    return _no_content()


# ---- users ----------------------------------------------------------------------------------------------

async def list_users(request: web.Request) -> web.Response:
    page = await accounts.list_users(request.app[keys.POOL], q=request.query.get("q") or None,
                                     active=_query_bool(request, "active"), **_page_args(request))
    return _json(shapes.page(page, shapes.user))


async def create_user(request: web.Request) -> web.Response:
    body = await _body(request, {"login": str, "email": str, "name": str}, {"gitlab_id": int})
    details = await accounts.create_user(request.app[keys.POOL], login=body["login"], email=body["email"],
                                         name=body["name"], gitlab_id=body.get("gitlab_id"),
                                         actor=request[ADMIN_ACTOR])
    return _json(shapes.user(details), 201, location=f"{API}/users/{details.user.login}")


async def get_user(request: web.Request) -> web.Response:
    return _json(shapes.user(await accounts.get_user(request.app[keys.POOL], request.match_info["login"])))


async def sync_user(request: web.Request) -> web.Response:
    """SPEC §11: re-check one user with GitLab now; 409 without a kept grant, 502 when GitLab fails."""
    pool = request.app[keys.POOL]
    login = request.match_info["login"]
    await request.app[RESYNC].check_now(login, actor=request[ADMIN_ACTOR])
    return _json(shapes.user(await accounts.get_user(pool, login)))


async def update_user(request: web.Request) -> web.Response:
    body = await _body(request, {"active": bool})
    pool = request.app[keys.POOL]
    user = await accounts.set_active(pool, request.match_info["login"], body["active"], actor=request[ADMIN_ACTOR])
    return _json(shapes.user(await accounts.get_user(pool, user.login)))


# ---- sessions and audit ---------------------------------------------------------------------------------

async def list_sessions(request: web.Request) -> web.Response:
    page = await sessions.list_sessions(request.app[keys.POOL], login=request.query.get("login") or None,
                                        **_page_args(request))
    return _json(shapes.page(page, shapes.session))


async def revoke_session(request: web.Request) -> web.Response:
    await sessions.revoke_session(request.app[keys.POOL], request.match_info["id"], actor=request[ADMIN_ACTOR])
    return _no_content()


async def list_audit(request: web.Request) -> web.Response:
    since = request.query.get("since")
    page = await audit.list_events(request.app[keys.POOL], since=shapes.parse_time(since) if since else None,
                                   login=request.query.get("login") or None,
                                   action=request.query.get("action") or None, **_page_args(request))
    return _json(shapes.page(page, shapes.event))


# ---- tokens (SPEC §14) ----------------------------------------------------------------------------------

async def list_tokens(request: web.Request) -> web.Response:
    page = await svc_tokens.list_tokens(request.app[keys.POOL], login=request.query.get("login") or None,
                                        include_spent=bool(_query_bool(request, "all")), **_page_args(request))
    return _json(shapes.page(page, shapes.token))


async def create_token(request: web.Request) -> web.Response:
    body = await _body(request, {"login": str, "name": str}, {"expires_in_days": int})
    new = await svc_tokens.create_token(request.app[keys.POOL], login=body["login"], name=body["name"],
                                        days=body.get("expires_in_days"),
                                        max_lifetime=request.app[keys.CONFIG].tokens.max_lifetime,
                                        actor=request[ADMIN_ACTOR])
    return _json({**shapes.token(new.token), "token": new.secret}, 201, location=f"{API}/tokens/{new.token.id}")


async def revoke_token(request: web.Request) -> web.Response:
    await svc_tokens.revoke_token(request.app[keys.POOL], token_id(request.match_info["id"]),
                                  actor=request[ADMIN_ACTOR])
    return _no_content()


async def run_sync(request: web.Request) -> web.Response:
    """SPEC §12: run automatic provisioning now (`{"dry_run": true}`: only plan); 409 while a run is going."""
    from gateway.sync import automatic

    body = await _body(request, {}, {"dry_run": bool}) if (await request.read()).strip() else {}
    cfg = request.app[keys.CONFIG]
    if cfg.provisioning.automatic is None:
        raise automatic.NotConfigured("provisioning.automatic is not set")
    result = await automatic.run(request.app[keys.POOL], cfg, request.app[keys.GITLAB].session,
                                 dry_run=bool(body.get("dry_run")),
                                 actor=request[ADMIN_ACTOR], on_request=request.app[keys.METRICS].gitlab_request)
    return _json(result.to_json())


ROUTES: tuple[tuple[str, str, Handler], ...] = (
    ("GET", "/groups", list_groups),
    ("POST", "/groups", create_group),
    ("GET", "/groups/{id}", get_group),
    ("PATCH", "/groups/{id}", update_group),
    ("DELETE", "/groups/{id}", delete_group),
    ("GET", "/groups/{id}/members", list_members),
    ("POST", "/groups/{id}/members", add_member),
    ("DELETE", "/groups/{id}/members/{login}", remove_member),
    ("GET", "/users", list_users),
    ("POST", "/users", create_user),
    ("GET", "/users/{login}", get_user),
    ("PATCH", "/users/{login}", update_user),
    ("POST", "/users/{login}/sync", sync_user),
    ("GET", "/sessions", list_sessions),
    ("DELETE", "/sessions/{id}", revoke_session),
    ("GET", "/audit", list_audit),
    ("GET", "/tokens", list_tokens),
    ("POST", "/tokens", create_token),
    ("DELETE", "/tokens/{id}", revoke_token),
    ("POST", "/sync", run_sync),
)


def add_routes(app: web.Application) -> None:
    """Register the /api/v1 handlers, each behind the unstorable-input check."""
    for method, path, handler in ROUTES:
        app.router.add_route(method, API + path, _storable_input(handler))
