"""{prefix}/auth (nginx auth_request) and {prefix}/userinfo (SPEC §4). Neither ever redirects."""

from __future__ import annotations

import json

from aiohttp import web

from gateway import keys
from gateway.errors import Forbidden, Unauthenticated
from gateway.identity import Identity
from gateway.web.pages import NO_STORE


async def _identity(request: web.Request) -> Identity:
    identity = await request.app[keys.SESSIONS].identify(request)
    if not isinstance(identity, Identity):
        raise Unauthenticated()
    return identity


async def auth(request: web.Request) -> web.Response:
    """202 + X-Auth-Request-* when signed in, 401 when not, 403 outside `?allowed_groups=a,b`."""
    identity = await _identity(request)
    wanted = request.query.get("allowed_groups")
    if wanted is not None:
        allowed = {g.strip() for g in wanted.split(",") if g.strip()}
        if not allowed.intersection(identity.groups):
            raise Forbidden("You are not a member of a group allowed here")
    headers = request.app[keys.HEADER_POLICY].auth_response_headers(identity)
    return web.Response(status=202, headers={**headers, **NO_STORE})


async def userinfo(request: web.Request) -> web.Response:
    identity = await _identity(request)
    body = {"user": identity.login, "email": identity.email, "preferred_username": identity.login,
            "groups": list(identity.groups)}
    return web.Response(text=json.dumps(body), content_type="application/json", headers=NO_STORE)
