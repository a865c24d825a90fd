"""{prefix}/api/tokens (SPEC §14): a signed-in user lists, creates and revokes their own tokens as JSON.

Same-origin only: every change needs the gateway's own Origin (web/forms.py), and the caller must be signed in
with the session cookie; a token cannot mint or revoke tokens. The secret of a new token is in the answer to
its creation and nowhere else.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from gateway import keys
from gateway.errors import BadRequest, NotFound, Unauthenticated, Unprocessable
from gateway.identity import Identity
from gateway.services import shapes
from gateway.services import tokens as svc_tokens
from gateway.web.forms import check_origin, origin_of
from gateway.web.pages import NO_STORE

MAX_ID_DIGITS = 18


class NotSignedIn(Unauthenticated):
    json_only = True


async def signed_in(request: web.Request) -> Identity:
    """The user behind the session cookie (not a bearer token), or 401 JSON."""
    identity = await request.app[keys.SESSIONS].identify(request)
    request[keys.IDENTITY] = identity
    if not isinstance(identity, Identity) or identity.via_token:
        raise NotSignedIn("Sign in with your browser to use your account page and tokens")
    return identity


def _enabled(request: web.Request) -> None:
    if not request.app[keys.CONFIG].tokens.enabled:
        raise NotFound("Access tokens are not enabled on this gateway (tokens.enabled)")


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, text=json.dumps(data), content_type="application/json", headers=NO_STORE)


async def list_own(request: web.Request) -> web.Response:
    _enabled(request)
    identity = await signed_in(request)
    page = await svc_tokens.list_tokens(request.app[keys.POOL], login=identity.login,
                                        cursor=request.query.get("cursor"))
    return _json(shapes.page(page, shapes.token))


async def create_own(request: web.Request) -> web.Response:
    _enabled(request)
    identity = await signed_in(request)
    check_origin(request, origin_of(request.app[keys.CONFIG].server.public_url))
    try:
        body = json.loads(await request.read() or b"null")
    except (ValueError, RecursionError):
        raise BadRequest("The request body is not valid JSON") from None
    if not isinstance(body, dict) or not isinstance(body.get("name"), str):
        raise Unprocessable("Send a JSON object {\"name\": \"what uses it\", \"expires_in_days\": 30}")
    days = body.get("expires_in_days")
    if days is not None and (not isinstance(days, int) or isinstance(days, bool)):
        raise Unprocessable("'expires_in_days' must be an integer")
    cfg = request.app[keys.CONFIG]
    new = await svc_tokens.create_token(request.app[keys.POOL], login=identity.login, name=body["name"],
                                        days=days, max_lifetime=cfg.tokens.max_lifetime, actor=identity.login)
    return _json({**shapes.token(new.token), "token": new.secret}, 201)


def token_id(raw: str) -> int:
    if not raw.isdigit() or len(raw) > MAX_ID_DIGITS:
        raise NotFound(f"No usable token with id {raw[:40]}")
    return int(raw)


async def revoke_own(request: web.Request) -> web.Response:
    _enabled(request)
    identity = await signed_in(request)
    check_origin(request, origin_of(request.app[keys.CONFIG].server.public_url))
    await svc_tokens.revoke_token(request.app[keys.POOL], token_id(request.match_info["id"]),
                                  actor=identity.login, owner_id=identity.user_id)
    return web.Response(status=204, headers=NO_STORE)


def add_routes(app: web.Application, prefix: str) -> None:
    app.router.add_get(f"{prefix}/api/tokens", list_own)
    app.router.add_post(f"{prefix}/api/tokens", create_own)
    app.router.add_delete(f"{prefix}/api/tokens/{{id}}", revoke_own)
