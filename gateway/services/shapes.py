"""The JSON shapes of SPEC §4, shared by the admin API and `gateway ... --json`. Times are ISO 8601 UTC.

SPEC §4 names every shape but a group member's, which is the user's public fields plus the membership:
`{"login","name","email","active","source","added_at"}`.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

from gateway.db.audit import AuditEvent
from gateway.db.groups import Group
from gateway.db.sessions import SessionRow
from gateway.db.tokens import Token
from gateway.errors import BadRequest
from gateway.services.accounts import UserDetails
from gateway.services.groups import Member
from gateway.services.paging import Page

T = TypeVar("T")
Json = dict[str, Any]


def time(at: datetime | None) -> str | None:
    """ISO 8601 in UTC with millisecond precision: 2026-01-31T12:00:00.123Z."""
    if at is None:
        return None
    return at.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_time(text: str, what: str = "since") -> datetime:
    """An ISO 8601 date or time (UTC when it names no offset); BadRequest saying what is expected."""
    try:
        at = datetime.fromisoformat(text.strip())
        # In UTC, 0001-01-01T00:00:00+14:00 is before year 1 and 9999-12-31T23:59-14:00 after 9999: Python
        # raises OverflowError there, and the database driver would too (a 500), so check it here (SPEC §16).
        return at.astimezone(UTC) if at.tzinfo is not None else at.replace(tzinfo=UTC)
    except (ValueError, OverflowError):
        raise BadRequest(f"{what} must be an ISO 8601 time between years 1 and 9999, "
                         "such as 2026-01-31T12:00:00Z") from None


def group(g: Group) -> Json:
    return {"id": g.id, "name": g.name, "description": g.description, "builtin": g.builtin,
            "gitlab_group_id": g.gitlab_group_id, "member_count": g.member_count}


def member(m: Member) -> Json:
    return {"login": m.login, "name": m.name, "email": m.email, "active": m.active, "source": m.source,
            "added_at": time(m.added_at)}


def user(d: UserDetails) -> Json:
    u = d.user
    return {"login": u.login, "name": u.name, "email": u.email, "active": u.active, "gitlab_id": u.gitlab_id,
            "provisioned_by": u.provisioned_by, "created_at": time(u.created_at),
            "last_login_at": time(u.last_login_at), "last_sync_at": time(u.last_sync_at),
            "next_sync_at": time(d.grant.next_sync_at) if d.grant else None,
            "sync_state": d.grant.state if d.grant else "no_grant",
            "last_sync_error": (d.grant.last_error or None) if d.grant else None,
            "groups": [{"name": name, "source": source} for name, source in d.groups]}


def session(s: SessionRow) -> Json:
    return {"id": s.id, "login": s.login, "created_at": time(s.created_at), "expires_at": time(s.expires_at),
            "last_seen_at": time(s.last_seen_at)}


def event(e: AuditEvent) -> Json:
    return {"id": e.id, "at": time(e.at), "actor": e.actor, "action": e.action, "subject": e.subject,
            "details": e.details}


def page(p: Page[T], item: Callable[[T], Json]) -> Json:
    return {"items": [item(i) for i in p.items], "next": p.next}


def token(t: Token) -> Json:
    """SPEC §14: a token as listed (never its secret, which only the answer to its creation carries)."""
    return {"id": t.id, "name": t.name, "login": t.login, "created_by": t.created_by,
            "created_at": time(t.created_at), "expires_at": time(t.expires_at),
            "last_used_at": time(t.last_used_at), "revoked_at": time(t.revoked_at)}
