"""`POST {prefix}/gitlab/webhook` (SPEC §11): GitLab system hooks and group webhooks.

The `X-Gitlab-Token` header is compared in constant time before anything of the body is read; a wrong or
missing token is a 401 and changes nothing. Member and user events make the named user due for a re-check
(coalesced per user, see Resyncer.request); group renames, transfers and deletions update the bound local
group. Unknown events are answered 204 and ignored; each accepted event is audited. Payload shapes: GitLab's
doc/administration/system_hooks.md and doc/user/project/integrations/webhook_events.md (samples in
tests/data/gitlab_hooks/).
"""

from __future__ import annotations

import hmac
import json
import logging
from typing import Any, Final

from aiohttp import web

from gateway import keys
from gateway.db import DB_UNAVAILABLE
from gateway.db import audit as db_audit
from gateway.db import groups as db_groups
from gateway.db import users as db_users
from gateway.errors import BadRequest, DatabaseUnavailable, Unauthenticated
from gateway.services._db import transaction
from gateway.sync import renames
from gateway.sync.resync import RESYNC

log = logging.getLogger("gateway.webhook")

ACTOR: Final = "gitlab-webhook"
MAX_BODY: Final = 256 * 1024
USER_EVENTS: Final = frozenset({
    "user_add_to_group", "user_remove_from_group", "user_update_for_group", "user_destroy", "user_rename",
    "user_block", "user_unblock",
})
GROUP_EVENTS: Final = frozenset({"group_rename", "group_transfer", "group_destroy"})


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


async def receive(request: web.Request) -> web.Response:
    """Check the token, then act on the event; 204 for every accepted or ignored event."""
    secret = request.app[keys.CONFIG].gitlab.webhook_secret
    assert secret is not None  # the route exists only when it is set
    presented = request.headers.get("X-Gitlab-Token", "")
    if not hmac.compare_digest(presented.encode("utf-8", "surrogateescape"), secret.encode()):
        raise Unauthenticated("The webhook token is missing or wrong",
                              advice="Set the same secret token in GitLab's hook and gitlab.webhook_secret.")
    if (request.content_length or 0) > MAX_BODY:
        raise BadRequest("The webhook payload is too large")
    body = await request.read()  # bounded by the app's client_max_size too (a chunked body has no length)
    if len(body) > MAX_BODY:
        raise BadRequest("The webhook payload is too large")
    try:
        payload = json.loads(body)
    except ValueError:
        raise BadRequest("The webhook payload is not JSON") from None
    if not isinstance(payload, dict):
        raise BadRequest("The webhook payload is not a JSON object")
    event = payload.get("event_name")
    if event in USER_EVENTS:
        await _user_event(request, str(event), payload)
    elif event in GROUP_EVENTS:
        await _group_event(request, str(event), payload)
    return web.Response(status=204)


async def _user_event(request: web.Request, event: str, payload: dict[str, Any]) -> None:
    gitlab_id = _int(payload.get("user_id"))
    if gitlab_id is None:
        raise BadRequest(f"The {event} payload carries no user_id")
    pool = request.app[keys.POOL]
    try:
        user = await db_users.by_gitlab_id(pool, gitlab_id)
        queued = False
        if user is not None:
            queued = await request.app[RESYNC].request(user.id)
        await db_audit.record(pool, ACTOR, "webhook.received", user.login if user else "", event=event,
                              gitlab_user_id=gitlab_id, recheck="queued" if queued else
                              ("coalesced" if user else "unknown user"))
    except DB_UNAVAILABLE as exc:
        raise DatabaseUnavailable(f"webhook: {type(exc).__name__}") from None


async def _group_event(request: web.Request, event: str, payload: dict[str, Any]) -> None:
    gitlab_group_id = _int(payload.get("group_id"))
    if gitlab_group_id is None:
        raise BadRequest(f"The {event} payload carries no group_id")
    full_path = payload.get("full_path")
    pool = request.app[keys.POOL]
    members: list[int] = []
    try:
        async with transaction(pool) as conn:
            local = await db_groups.by_gitlab_id(conn, gitlab_group_id)
            if local is not None and event != "group_destroy" and isinstance(full_path, str) and full_path:
                await renames.follow(conn, local, full_path, actor=ACTOR)
            elif local is not None and event == "group_destroy":
                members = await db_groups.member_ids(conn, local.id)
            await db_audit.record(conn, ACTOR, "webhook.received", local.name if local else "", event=event,
                                  gitlab_group_id=gitlab_group_id, full_path=full_path)
        # A deleted GitLab group: its members' memberships follow at their re-check (rule 6 drops it).
        for uid in members:
            await request.app[RESYNC].request(uid)
    except DB_UNAVAILABLE as exc:
        raise DatabaseUnavailable(f"webhook: {type(exc).__name__}") from None
