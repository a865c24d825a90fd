"""The stand-in's group endpoints for automatic provisioning (SPEC §12), and GitLab.com's throttle.

As GitLab answers them (doc/api/groups.md, doc/api/members.md, lib/api/groups.rb, lib/api/members.rb):
- `GET /api/v4/groups/:id`: one group; `:id` is the numeric id or the URL-encoded full path. A group that does
  not exist, or that the caller cannot read (private, not a member), is `404 {"message": "404 Group Not Found"}`.
- `GET /api/v4/groups/:id/descendant_groups`: every subgroup at any depth that the caller can read, with the
  group list's offset pagination (`page`, `per_page` <= 100, X-Page, X-Next-Page, X-Total, Link).
- `GET /api/v4/groups/:id/members`: DIRECT members only (not inherited, not shared groups), with the user's
  `state` and the membership's `access_level` (Minimal Access 5 included: callers filter), offset pagination.
  `email` is only shown to administrators (GitLab hides it from everyone else).
GitLab uses keyset pagination only for unauthenticated group lists and some project endpoints, not for these
three, so the stand-in offers offset pagination here, as GitLab does.
Tokens: OAuth access tokens as before, and personal/group access tokens (`add_access_token`) sent as
`PRIVATE-TOKEN: <token>` or `Authorization: Bearer <token>`.

The throttle (`FakeGitLab.rate_limit`) imitates GitLab.com's Rack::Attack throttles: a fixed window per token,
every request counted (throttled ones too), and beyond the limit `429 Retry later` (text/plain) with
`Retry-After` (seconds to the end of the window) and the RateLimit-* headers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import unquote

from aiohttp import web
from aiohttp.typedefs import Handler

if TYPE_CHECKING:
    from gateway.demo.fake_gitlab import FakeGitLab, FakeGroup, FakeUser

GROUP_NOT_FOUND = {"message": "404 Group Not Found"}
THROTTLED_ENDPOINTS = frozenset({"groups", "group", "descendant_groups", "members"})


@dataclass(frozen=True)
class AccessToken:
    """A personal or group access token: it acts as its user (a group token's bot user is a group member)."""

    user_id: int
    scopes: tuple[str, ...]


@dataclass
class Throttle:
    """GitLab.com's fixed-window throttle: `limit` requests per `period` seconds per token."""

    limit: int
    period: float
    endpoints: frozenset[str]
    throttled: int = 0  # how many 429s it answered (tests read it)
    _windows: dict[tuple[str, int], int] = field(default_factory=dict)

    def check(self, request: web.Request, endpoint: str, now: float) -> web.Response | None:
        """Count this request; a 429 answer when it is over the limit, else None."""
        if endpoint not in self.endpoints:
            return None
        window = int(now // self.period)
        key = (_presented_token(request) or request.remote or "", window)
        count = self._windows.get(key, 0) + 1
        self._windows = {k: v for k, v in self._windows.items() if k[1] == window}
        self._windows[key] = count
        reset = (window + 1) * self.period - now
        headers = {
            "RateLimit-Name": "throttle_authenticated_api",
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Observed": str(count),
            "RateLimit-Remaining": str(max(0, self.limit - count)),
            "RateLimit-Reset": str(math.ceil(reset)),
        }
        if count <= self.limit:
            return None
        self.throttled += 1
        headers["Retry-After"] = str(max(1, math.ceil(reset)))
        return web.Response(status=429, text="Retry later\n", content_type="text/plain", headers=headers)


def _presented_token(request: web.Request) -> str:
    private = request.headers.get("PRIVATE-TOKEN", "").strip()
    if private:
        return private
    header = request.headers.get("Authorization", "")
    if header[:7].lower() == "bearer ":
        return header[7:].strip()
    return request.query.get("private_token", "") or request.query.get("access_token", "")


def caller(fake: FakeGitLab, request: web.Request) -> FakeUser:
    """Who the request acts as: an access token (PRIVATE-TOKEN or Bearer) or an OAuth token; _ApiError else."""
    from gateway.demo.fake_gitlab import GROUPS_API_SCOPES, INSUFFICIENT_SCOPE, _ApiError, _www_authenticate

    value = _presented_token(request)
    token = fake._access_tokens.get(value)
    if token is None:
        return fake._api_user(value, GROUPS_API_SCOPES)
    if not set(token.scopes) & set(GROUPS_API_SCOPES):
        header = _www_authenticate("Protected by OAuth 2.0", "insufficient_scope", INSUFFICIENT_SCOPE)
        body = {"error": "insufficient_scope", "error_description": INSUFFICIENT_SCOPE,
                "scope": " ".join(GROUPS_API_SCOPES)}
        raise _ApiError(403, body, {"WWW-Authenticate": header})
    user = fake._users[token.user_id]
    if user.state != "active":
        raise _ApiError(401, {"message": "401 Unauthorized"})
    return user


def _readable(fake: FakeGitLab, user: FakeUser) -> set[int] | None:
    """Ids of the groups the user can read; None = every group (an administrator)."""
    if user.id in fake.admins:
        return None
    return fake._visible_ids(user.id)


def _find(fake: FakeGitLab, request: web.Request, user: FakeUser) -> FakeGroup:
    """The group named by `:id` (a numeric id or a URL-encoded full path), or 404 when absent or unreadable."""
    from gateway.demo.fake_gitlab import _ApiError

    ref = unquote(request.match_info["id"])
    try:
        group = fake.group(int(ref)) if ref.isdigit() else fake.group(ref)
    except KeyError:
        raise _ApiError(404, GROUP_NOT_FOUND) from None
    readable = _readable(fake, user)
    if readable is not None and group.id not in readable:
        raise _ApiError(404, GROUP_NOT_FOUND)
    return group


def _paged(fake: FakeGitLab, request: web.Request, items: list[dict[str, object]]) -> web.Response:
    from gateway.demo.fake_gitlab import _GroupQuery, _pagination_headers

    query = _GroupQuery.parse(request.query)
    start = (query.page - 1) * query.per_page
    page = items[start : start + query.per_page]
    return web.json_response(page, headers=_pagination_headers(fake, request, query, len(items)))


async def group(request: web.Request) -> web.Response:
    """GET /api/v4/groups/:id"""
    from gateway.demo.fake_gitlab import _ApiError, _fake

    fake = _fake(request)
    try:
        found = _find(fake, request, caller(fake, request))
    except _ApiError as error:
        return error.response()
    return web.json_response(fake._group_entity(fake._base_url(request), found))


async def descendant_groups(request: web.Request) -> web.Response:
    """GET /api/v4/groups/:id/descendant_groups (order_by name by default, like the group list)."""
    from gateway.demo.fake_gitlab import _ApiError, _fake, _GroupQuery

    fake = _fake(request)
    try:
        user = caller(fake, request)
        root = _find(fake, request, user)
        query = _GroupQuery.parse(request.query)
    except _ApiError as error:
        return error.response()
    readable = _readable(fake, user)
    found = [fake._groups[g] for g in fake._descendants(root.id) if readable is None or g in readable]
    keys = {"name": lambda g: (g.name.casefold(), g.id), "path": lambda g: (g.path.casefold(), g.id),
            "id": lambda g: (g.id, g.id)}
    found.sort(key=keys[query.order_by], reverse=query.descending)
    base = fake._base_url(request)
    return _paged(fake, request, [fake._group_entity(base, g) for g in found])


async def members(request: web.Request) -> web.Response:
    """GET /api/v4/groups/:id/members: direct members, ordered by id as GitLab's members finder does."""
    from gateway.demo.fake_gitlab import _ApiError, _fake, _seed_time

    fake = _fake(request)
    try:
        user = caller(fake, request)
        target = _find(fake, request, user)
    except _ApiError as error:
        return error.response()
    base = fake._base_url(request)
    rows = sorted((uid, level) for (uid, gid), level in fake._members.items() if gid == target.id)
    items = [_member(fake, base, fake._users[uid], level, show_email=user.id in fake.admins,
                     created=_seed_time(uid)) for uid, level in rows]
    return _paged(fake, request, items)


def _member(fake: FakeGitLab, base: str, member: FakeUser, level: int, *, show_email: bool,
            created: str) -> dict[str, object]:
    from gateway.demo.fake_gitlab import _avatar_url

    entity: dict[str, object] = {
        "id": member.id,
        "username": member.username,
        "name": member.name,
        "state": member.state,
        "locked": False,
        "avatar_url": _avatar_url(member),
        "web_url": f"{base}/{member.username}",
        "access_level": level,
        "created_at": created,
        "created_by": None,
        "expires_at": None,
        "membership_state": "active",
    }
    if show_email:
        entity["email"] = member.email
    return entity


def routes(base_path: str) -> list[tuple[str, str, dict[str, Handler]]]:
    """The routes above, for fake_gitlab.create_app (names are the failure-injection endpoint names)."""
    return [
        (f"{base_path}/api/v4/groups/{{id:[^/]+}}", "group", {"GET": group}),
        (f"{base_path}/api/v4/groups/{{id:[^/]+}}/descendant_groups", "descendant_groups",
         {"GET": descendant_groups}),
        (f"{base_path}/api/v4/groups/{{id:[^/]+}}/members", "members", {"GET": members}),
    ]
