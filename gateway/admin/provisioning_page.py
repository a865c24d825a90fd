"""The Provisioning administration page (SPEC §12, §15): the last automatic provisioning runs, a dry-run plan
computed on demand, and "run now".

- The page itself only reads the database: the recorded runs (who started each: an administrator, the CLI or
  the schedule), whether a run holds the run lock right now, and when the schedule runs next.
- "Plan a dry run" (a form: it costs GitLab calls) lists GitLab and plans with the run lock held, like
  `gateway sync --dry-run`, and shows the plan: every count, and at most PLAN_SHOWN rows of each kind of
  change. It changes nothing and is not recorded.
- "Run now" starts a real run in the app's background tasks and waits up to RUN_WAIT for it: a run of a big
  subtree on gitlab.com takes minutes, longer than a browser or a proxy in front waits, and it must not be
  cut short (then rolled back) because the page was closed. The run is audited (`sync.automatic`) and
  recorded under the administrator's login.
- Another run in progress (any replica, the schedule, the CLI, the API): 409 and the page says so; nothing
  is started. GitLab failing: the page says why (the failed run is recorded; nothing was changed).
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from gateway import keys
from gateway.db import automatic as db_auto
from gateway.errors import GatewayError
from gateway.sync import automatic, autoplan, schedule

RUNS_SHOWN = 10
PLAN_SHOWN = 50  # rows per kind of change; the counts are always whole
RUN_WAIT = 20.0  # seconds "run now" waits for the run before answering "still running"

COUNT_LABELS = {
    "groups_created": "groups created", "groups_bound": "groups bound", "groups_renamed": "groups renamed",
    "users_created": "users created", "users_updated": "users updated", "memberships_added": "memberships added",
    "memberships_removed": "memberships removed", "sessions_revoked": "sessions revoked",
    "users_signed_out": "users signed out", "conflicts": "conflicts",
}
# The configuration keys the "not configured" page names (SPEC §12).
KEYS = (
    ("provisioning.automatic.token", "a GitLab group access token or personal access token with read_api "
                                     "(or token_file); never logged"),
    ("provisioning.automatic.groups", "the root GitLab groups whose subtree is provisioned, inside "
                                      "provisioning.allowed_groups when that is set"),
    ("provisioning.automatic.interval", "how often the schedule runs (default 1h)"),
    ("provisioning.automatic.create_groups", "create and bind a local group per GitLab group (default true)"),
)


def started_by(actor: str) -> str:
    """Who started a recorded run, as the page says it."""
    if actor == automatic.ACTOR:
        return "the schedule"
    return actor or "unknown (recorded before this was kept)"


def changes(counts: dict[str, int]) -> str:
    """The non-zero counts of a run, in words."""
    said = [f"{n} {COUNT_LABELS.get(k, k)}" for k, n in counts.items() if n]
    return ", ".join(said) or "no changes"


def bounded_plan(report: dict[str, Any]) -> dict[str, Any]:
    """What the page shows of a plan: the counts, and per kind of change its first PLAN_SHOWN rows and how
    many more there are."""
    kinds: dict[str, list[tuple[str, str, str]]] = {}
    for row in autoplan.report_rows(report):
        kinds.setdefault(row[0], []).append(row)
    return {
        "counts": [(COUNT_LABELS.get(k, k), n) for k, n in report["counts"].items()],
        "sections": [{"kind": kind, "total": len(rows), "rows": rows[:PLAN_SHOWN],
                      "more": max(0, len(rows) - PLAN_SHOWN)} for kind, rows in kinds.items()],
        "listed": report["listed"], "gitlab": report["gitlab"], "duration": report["duration_seconds"],
        "roots": report["roots"],
    }


async def context(request: web.Request) -> dict[str, Any]:
    """What every rendering of the page shows: the settings, the recorded runs, in progress, next run."""
    cfg = request.app[keys.CONFIG]
    auto = cfg.provisioning.automatic
    if auto is None:
        return {"configured": False, "keys": KEYS, "runs": [], "in_progress": False, "next_run": None,
                "settings": None, "plan": None}
    pool = request.app[keys.POOL]
    runs = await db_auto.recent_runs(pool, RUNS_SHOWN)
    wait = await schedule.due_in(pool, auto.interval)
    return {
        "configured": True, "keys": KEYS, "plan": None,
        "settings": {"groups": auto.groups, "interval": _duration(auto.interval), "create_groups": auto.create_groups},
        "runs": [{"run": r, "by": started_by(r.actor), "changes": changes(r.counts)} for r in runs],
        "in_progress": await db_auto.run_in_progress(pool),
        "next_run": datetime.fromtimestamp(time.time() + max(0.0, wait), UTC),
    }


def _duration(seconds: float) -> str:
    for unit, size in (("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


async def _attempt(app: web.Application, *, dry_run: bool, actor: str) -> automatic.RunResult | GatewayError:
    """One run; a domain error (in progress, not configured, GitLab or the database failing) is the answer."""
    try:
        return await automatic.run(app[keys.POOL], app[keys.CONFIG], app[keys.GITLAB].session, dry_run=dry_run,
                                   actor=actor, on_request=app[keys.METRICS].gitlab_request)
    except GatewayError as err:
        return err


def problem(err: GatewayError) -> str:
    return f"{err.message}. {err.advice}" if err.advice else err.message


async def dry_run(request: web.Request, actor: str) -> tuple[dict[str, Any], int]:
    """The page's context with the plan (or the problem), and the status to answer with."""
    outcome = await _attempt(request.app, dry_run=True, actor=actor)
    page = await context(request)
    if isinstance(outcome, GatewayError):
        return {**page, "problem": problem(outcome)}, outcome.status
    return {**page, "plan": bounded_plan(outcome.to_json())}, 200


async def run_now(request: web.Request, actor: str) -> tuple[str | None, GatewayError | None]:
    """Start a real run: ("ran" | "running", None), or (None, why nothing was started or applied)."""
    task = request.app[keys.BACKGROUND].spawn(_attempt(request.app, dry_run=False, actor=actor),
                                              name="automatic-provisioning-run")
    done, _ = await asyncio.wait({task}, timeout=RUN_WAIT)
    if not done:
        return "running", None
    outcome = task.result()
    if isinstance(outcome, GatewayError):
        return None, outcome
    return "ran", None
