"""List a GitLab subtree for automatic provisioning (SPEC §12): root groups, every descendant, direct members.

All of it or an error: every page is read (X-Next-Page must be page + 1, X-Total must match what was read),
and any GitLab error, timeout or malformed answer raises `GitLabUnavailable`, so a run never plans from a
partial listing. A root group that does not exist or that the token cannot read fails naming it.

Pacing: GitLab.com allows about 50 group-list calls a minute (and 2,000 API calls a minute in all), so calls
pass through a `Pacer` per kind (token buckets). A 429 is waited out (its Retry-After, the whole kind
pausing meanwhile) and the call repeated, not failed. The token goes only to GitLab, in PRIVATE-TOKEN, and is
never logged; messages name endpoints and groups, never bodies.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import quote

import aiohttp

from gateway.errors import GitLabUnavailable

log = logging.getLogger("gateway.automatic")

PER_PAGE: Final = 100
MAX_PAGES: Final = 10_000
GUEST: Final = 10  # SPEC §12: direct members with access level >= Guest
MEMBER_CONCURRENCY: Final = 4
MAX_RETRY_AFTER: Final = 600.0  # a Retry-After beyond this is a GitLab misconfiguration, not a wait
MAX_THROTTLED: Final = 50  # 429s in a row for one call before the run gives up
_ADVICE = "Nothing was changed; the next run tries again."


@dataclass(frozen=True, slots=True)
class Rate:
    """`calls` per `period` seconds, in bursts of at most `burst`."""

    calls: float
    period: float = 60.0
    burst: int = 5


# GitLab.com's limits with a margin (internal settings, not configuration keys): group-list calls (one group,
# descendant groups) about 50 a minute, everything else well under 2,000 a minute.
GROUP_LIST_RATE: Final = Rate(45, 60.0, 5)
API_RATE: Final = Rate(1500, 60.0, 10)


class Pacer:
    """A token bucket shared by concurrent callers; `hold` pauses it (a 429's Retry-After)."""

    def __init__(self, rate: Rate | None, clock: Callable[[], float] = time.monotonic) -> None:
        self._rate = rate
        self._clock = clock
        self._tokens = float(rate.burst) if rate else 0.0
        self._at = clock()
        self._paused_until = 0.0
        self._lock = asyncio.Lock()

    async def wait(self) -> None:
        """Return when one more call may start."""
        async with self._lock:
            while True:
                now = self._clock()
                if now < self._paused_until:
                    await asyncio.sleep(self._paused_until - now)
                    continue
                if self._rate is None:
                    return
                per_second = self._rate.calls / self._rate.period
                self._tokens = min(float(self._rate.burst), self._tokens + (now - self._at) * per_second)
                self._at = now
                if self._tokens >= 1.0:
                    self._tokens -= 1.0
                    return
                await asyncio.sleep((1.0 - self._tokens) / per_second)

    def hold(self, seconds: float) -> None:
        """No call starts for `seconds` (GitLab said Retry-After)."""
        self._paused_until = max(self._paused_until, self._clock() + seconds)
        self._tokens = 0.0


@dataclass(frozen=True, slots=True)
class TreeGroup:
    id: int
    full_path: str
    parent_id: int | None


@dataclass(frozen=True, slots=True)
class TreeMember:
    id: int
    username: str
    name: str
    state: str
    email: str  # "" when GitLab does not show it to the token (only administrators see members' emails)
    access_level: int


@dataclass
class Listing:
    """What a run read from GitLab: the subtree's groups (roots first) and each group's direct members."""

    groups: list[TreeGroup] = field(default_factory=list)
    members: dict[int, list[TreeMember]] = field(default_factory=dict)
    calls: int = 0
    throttled: int = 0
    waited: float = 0.0

    @property
    def member_count(self) -> int:
        return sum(len(m) for m in self.members.values())


Progress = Callable[[Listing], None]


class TreeReader:
    """Reads one subtree listing over a shared ClientSession; one instance per run."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str, token: str, *,
                 group_rate: Rate | None = GROUP_LIST_RATE, api_rate: Rate | None = API_RATE,
                 progress: Progress | None = None, progress_every: float = 5.0,
                 on_request: Callable[[str, int], None] | None = None) -> None:
        self._session = session
        self._base = base_url.rstrip("/")
        self._token = token
        self._group_pacer = Pacer(group_rate)
        self._api_pacer = Pacer(api_rate)
        self._progress = progress
        self._progress_every = progress_every
        self._last_progress = time.monotonic()
        self._on_request = on_request
        self.listing = Listing()

    async def read(self, roots: tuple[str, ...]) -> Listing:
        """Every group of the subtrees of `roots` and their direct members (>= Guest), or GitLabUnavailable."""
        seen: dict[int, TreeGroup] = {}
        for root_path in roots:
            root = await self._root(root_path)
            for group in [root, *await self._descendants(root)]:
                seen.setdefault(group.id, group)
        self.listing.groups = list(seen.values())
        semaphore = asyncio.Semaphore(MEMBER_CONCURRENCY)

        async def one(group: TreeGroup) -> None:
            async with semaphore:
                self.listing.members[group.id] = await self._members(group)
                self._report()

        try:
            async with asyncio.TaskGroup() as tasks:  # the first failure cancels the rest
                for group in self.listing.groups:
                    tasks.create_task(one(group))
        except BaseExceptionGroup as group_error:
            # One failure is the reason; the others are the same outage or cancellations it caused.
            raise group_error.exceptions[0] from None
        return self.listing

    # ---- the three endpoints ---------------------------------------------------------------------------

    async def _root(self, path: str) -> TreeGroup:
        status, _, body = await self._get("group", f"/api/v4/groups/{quote(path, safe='')}", {},
                                          self._group_pacer, subject=path)
        if status == 404:
            raise GitLabUnavailable(
                f"GitLab group {path!r} (provisioning.automatic.groups) does not exist or the token cannot see "
                "it", code="gitlab_group_not_found",
                advice="Check the path, and give the token's user (or the group access token) access to it. "
                       + _ADVICE)
        group = _tree_group(_decode(body, "group"), "group")
        if group.full_path != path:
            # GitLab answers an old path of a renamed group only while nobody claimed it; the case may differ.
            log.info("root group answered under another path",
                     extra={"configured": path, "full_path": group.full_path})
        return group

    async def _descendants(self, root: TreeGroup) -> list[TreeGroup]:
        items = await self._pages("descendant_groups", f"/api/v4/groups/{root.id}/descendant_groups",
                                  self._group_pacer, subject=root.full_path)
        return [_tree_group(item, "descendant_groups") for item in items]

    async def _members(self, group: TreeGroup) -> list[TreeMember]:
        items = await self._pages("members", f"/api/v4/groups/{group.id}/members", self._api_pacer,
                                  subject=group.full_path)
        members = [_tree_member(item) for item in items]
        # Minimal Access (5) is not membership; an invitation still awaiting acceptance is not either.
        return [m for m in members if m.access_level >= GUEST]

    # ---- paging and transport --------------------------------------------------------------------------

    async def _pages(self, endpoint: str, path: str, pacer: Pacer, *, subject: str) -> list[Any]:
        items: list[Any] = []
        ids: set[object] = set()
        page, total = 1, None
        for _ in range(MAX_PAGES):
            status, headers, body = await self._get(
                endpoint, path, {"per_page": str(PER_PAGE), "page": str(page)}, pacer, subject=subject)
            if status == 404:
                raise GitLabUnavailable(f"GitLab group {subject!r} disappeared during the listing ({endpoint})",
                                        advice=_ADVICE)
            batch = _decode(body, endpoint)
            if not isinstance(batch, list):
                raise _shape(endpoint)
            for item in batch:
                key = item.get("id") if isinstance(item, dict) else None
                if key not in ids:  # an offset listing shifting under us repeats an item; X-Total catches a loss
                    ids.add(key)
                    items.append(item)
            total = _header_int(headers, "X-Total", endpoint, total)
            raw = headers.get("X-Next-Page", "").strip()
            if "X-Next-Page" not in headers and len(batch) >= PER_PAGE:
                raise GitLabUnavailable(f"GitLab sent no pagination headers for a full page of {endpoint} of "
                                        f"{subject!r}; refusing a possibly partial listing", advice=_ADVICE)
            if not raw:
                break
            if not raw.isascii() or not raw.isdigit() or int(raw) != page + 1:
                raise GitLabUnavailable(f"GitLab's {endpoint} pagination of {subject!r} is inconsistent "
                                        f"(page {page} points to {raw[:10]!r})", advice=_ADVICE)
            page += 1
        else:
            raise GitLabUnavailable(f"GitLab listed more than {MAX_PAGES} pages of {endpoint} of {subject!r}",
                                    advice=_ADVICE)
        if total is not None and total != len(items):
            raise GitLabUnavailable(f"GitLab's {endpoint} listing of {subject!r} was incomplete ({len(items)} of "
                                    f"{total}); it changed during the run", advice=_ADVICE)
        return items

    async def _get(self, endpoint: str, path: str, params: dict[str, str], pacer: Pacer, *,
                   subject: str) -> tuple[int, Any, bytes]:
        """One GET, repeated after each 429 once its Retry-After has passed; 200 and 404 are returned."""
        for _ in range(MAX_THROTTLED):
            await pacer.wait()
            try:
                async with self._session.get(f"{self._base}{path}", params=params, allow_redirects=False,
                                             headers={"PRIVATE-TOKEN": self._token}) as resp:
                    body = await resp.read()
                    status, headers = resp.status, resp.headers
            except TimeoutError:
                self._record(endpoint, 0)
                raise GitLabUnavailable(f"GitLab did not answer the {endpoint} request for {subject!r} in time",
                                        advice=_ADVICE) from None
            except aiohttp.ClientError as exc:
                self._record(endpoint, 0)
                raise GitLabUnavailable(f"Cannot reach GitLab for the {endpoint} request ({type(exc).__name__}): "
                                        "check gitlab.url and the network", advice=_ADVICE) from None
            self._record(endpoint, status)
            if status == 429:
                wait = _retry_after(headers.get("Retry-After", ""))
                self.listing.throttled += 1
                self.listing.waited += wait
                log.info("GitLab asked to slow down; waiting", extra={"endpoint": endpoint, "seconds": wait})
                pacer.hold(wait)
                continue
            if status in (200, 404):
                return status, headers, body
            raise _refusal(endpoint, subject, status, body)
        raise GitLabUnavailable(f"GitLab kept answering 429 to the {endpoint} request for {subject!r}",
                                advice=_ADVICE)

    def _record(self, endpoint: str, status: int) -> None:
        self.listing.calls += 1
        if self._on_request is not None:
            self._on_request(f"automatic_{endpoint}", status)

    def _report(self) -> None:
        now = time.monotonic()
        if now - self._last_progress < self._progress_every:
            return
        self._last_progress = now
        listing = self.listing
        log.info("automatic provisioning: listing", extra={
            "groups": len(listing.groups), "groups_read": len(listing.members), "members": listing.member_count,
            "gitlab_calls": listing.calls, "throttled": listing.throttled})
        if self._progress is not None:
            self._progress(listing)


# ---- reading answers ----------------------------------------------------------------------------------------

def _decode(body: bytes, endpoint: str) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        raise GitLabUnavailable(f"GitLab answered the {endpoint} request with invalid JSON",
                                advice=_ADVICE) from None


def _shape(endpoint: str) -> GitLabUnavailable:
    return GitLabUnavailable(f"GitLab's answer to the {endpoint} request has an unexpected shape", advice=_ADVICE)


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _tree_group(item: Any, endpoint: str) -> TreeGroup:
    if not isinstance(item, dict):
        raise _shape(endpoint)
    gid, full_path, parent = _int(item.get("id")), item.get("full_path"), item.get("parent_id")
    if gid is None or not isinstance(full_path, str) or not full_path or not (parent is None or _int(parent)):
        raise _shape(endpoint)
    return TreeGroup(gid, full_path, parent)


def _tree_member(item: Any) -> TreeMember:
    if not isinstance(item, dict):
        raise _shape("members")
    uid, level = _int(item.get("id")), _int(item.get("access_level"))
    username, name, state = item.get("username"), item.get("name"), item.get("state")
    email = item.get("email") or item.get("public_email") or ""
    if (uid is None or level is None or not isinstance(username, str) or not username
            or not isinstance(name, str | None) or not isinstance(state, str) or not isinstance(email, str)):
        raise _shape("members")
    if item.get("membership_state", "active") != "active":
        level = 0  # an invitation awaiting acceptance grants nothing yet
    return TreeMember(uid, username, name or "", state, email, level)


def _header_int(headers: Any, name: str, endpoint: str, default: int | None) -> int | None:
    value = headers.get(name, "").strip()
    if not value:
        return default
    if not value.isascii() or not value.isdigit():
        raise GitLabUnavailable(f"GitLab sent an invalid {name} header on the {endpoint} request", advice=_ADVICE)
    return int(value)


def _retry_after(raw: str) -> float:
    raw = raw.strip()
    seconds = float(raw) if raw.isascii() and raw.isdigit() else 60.0  # GitLab.com's throttle period
    return min(max(seconds, 1.0), MAX_RETRY_AFTER)


def _refusal(endpoint: str, subject: str, status: int, body: bytes) -> GitLabUnavailable:
    if status == 401:
        return GitLabUnavailable("GitLab refused provisioning.automatic.token (HTTP 401): it is wrong, expired or "
                                 "revoked", code="gitlab_misconfigured",
                                 advice="Create a new token with read_api and update the configuration.")
    if status == 403:
        try:
            error = json.loads(body).get("error")
        except (ValueError, AttributeError):
            error = None
        if error == "insufficient_scope":
            return GitLabUnavailable("provisioning.automatic.token lacks the read_api scope",
                                     code="gitlab_misconfigured", advice="Create a token with read_api.")
        return GitLabUnavailable(f"GitLab refused the {endpoint} request for {subject!r} (HTTP 403)",
                                 advice=_ADVICE)
    return GitLabUnavailable(f"GitLab answered HTTP {status} to the {endpoint} request for {subject!r}",
                             advice=_ADVICE)
