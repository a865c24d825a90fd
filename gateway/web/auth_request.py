"""{prefix}/auth (nginx auth_request) and {prefix}/userinfo (SPEC §4, §13). Neither ever redirects.

/auth applies the same policy as the proxy to the ORIGINAL request, which nginx describes in
X-Forwarded-Method/-Host/-Uri; those are believed only from `server.trusted_proxies`, and what is not known
is assumed to be whatever the strictest rule that could apply covers.
"""

from __future__ import annotations

import json

from aiohttp import web

from gateway import keys
from gateway.errors import Forbidden, Unauthenticated
from gateway.identity import Identity
from gateway.web.access import forbidden
from gateway.web.pages import NO_STORE


async def _identity(request: web.Request) -> Identity:
    identity = await request.app[keys.SESSIONS].identify(request)
    if not isinstance(identity, Identity):
        raise Unauthenticated()
    return identity


async def auth(request: web.Request) -> web.Response:
    """202 (+ X-Auth-Request-* when signed in) when the policy allows, 401 when sign-in is needed, 403 when the
    user fails a rule or is outside `?allowed_groups=a,b`."""
    access = request.app[keys.ACCESS]
    found = await request.app[keys.SESSIONS].identify(request)
    identity = found if isinstance(found, Identity) else None
    request[keys.IDENTITY] = found
    method, host, uri = access.forwarded_request(request)
    decision = access.policy.decide(method, host, uri, identity)
    if decision.outcome == "sign_in":
        raise Unauthenticated()
    if decision.outcome == "forbidden":
        raise forbidden(access, decision, uri or "/")
    # Most checks carry no query: skip building the parsed query for them.
    wanted = request.query.get("allowed_groups") if request.rel_url.raw_query_string else None
    if wanted is not None:
        if identity is None:
            raise Unauthenticated()
        allowed = {g.strip() for g in wanted.split(",") if g.strip()}
        if not allowed.intersection(identity.groups):
            raise Forbidden("You are not a member of a group allowed here")
    if identity is None:  # a public rule: no identity to report
        return web.Response(status=202, headers=NO_STORE)
    headers = request.app[keys.HEADER_POLICY].auth_response_headers(identity)
    if access.signer is not None and access.assertion_header is not None:
        target = access.table.select(host, uri or "/")
        audience = target.route.upstream.url if target is not None else request.app[keys.CONFIG].server.public_url
        headers["X-Auth-Request-Assertion"] = access.signer.token(identity, identity.sid_hash, audience)
    return web.Response(status=202, headers={**headers, **NO_STORE})


async def userinfo(request: web.Request) -> web.Response:
    identity = await _identity(request)
    body = {"user": identity.login, "email": identity.email, "preferred_username": identity.login,
            "groups": list(identity.groups)}
    return web.Response(text=json.dumps(body), content_type="application/json", headers=NO_STORE)
