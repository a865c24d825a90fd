"""{prefix}/auth (nginx auth_request) and {prefix}/userinfo (SPEC §4, §13). Neither ever redirects.

/auth applies the same policy as the proxy to the ORIGINAL request, which nginx describes in
X-Forwarded-Method/-Host/-Uri; those are believed only from `server.trusted_proxies`, and what is not known
is assumed to be whatever the strictest rule that could apply covers.
"""

from __future__ import annotations

import json

from aiohttp import web

from gateway import keys
from gateway.access.policy import Decision
from gateway.errors import Forbidden, Unauthenticated
from gateway.identity import Anonymous, Identity, Sender
from gateway.sessions.store import SessionStore
from gateway.web.access import Access, forbidden
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
    found, decision, host, uri = await check(access, request.app[keys.SESSIONS], request)
    identity = found if isinstance(found, Identity) else None
    request[keys.IDENTITY] = found
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
    return web.Response(status=202, headers=granted(request.app, identity, host, uri))


async def check(access: Access, sessions: SessionStore, request: Sender
                ) -> tuple[Identity | Anonymous, Decision, str | None, str | None]:
    """Who sent the check, what the policy says of the original request, and that request's host and URI
    (shared with the proxied path's own server, web/fast_lane.py)."""
    found = await sessions.identify(request)
    method, host, uri = access.forwarded_request(request)
    decision = access.policy.decide(method, host, uri, found if isinstance(found, Identity) else None)
    return found, decision, host, uri


def granted(app: web.Application, identity: Identity | None, host: str | None, uri: str | None) -> dict[str, str]:
    """The headers of a 202: the X-Auth-Request-* of the identity (none for a public rule), never cached."""
    if identity is None:  # a public rule: no identity to report
        return dict(NO_STORE)
    headers = app[keys.HEADER_POLICY].auth_response_headers(identity)
    access = app[keys.ACCESS]
    if access.signer is not None and access.assertion_header is not None:
        target = access.table.select(host, uri or "/")
        audience = target.route.upstream.url if target is not None else app[keys.CONFIG].server.public_url
        headers["X-Auth-Request-Assertion"] = access.signer.token(identity, identity.sid_hash, audience)
    return {**headers, **NO_STORE}


async def userinfo(request: web.Request) -> web.Response:
    identity = await _identity(request)
    body = {"user": identity.login, "email": identity.email, "preferred_username": identity.login,
            "groups": list(identity.groups)}
    return web.Response(text=json.dumps(body), content_type="application/json", headers=NO_STORE)
