"""`gateway sync [--dry-run] [--json]`: one automatic provisioning run now (SPEC §12), like POST /api/v1/sync.

Progress goes to stderr (a line every few seconds while GitLab is listed, then one line with the counts);
the plan goes to stdout, as a table or, with --json, as the API's JSON. Exit 0 when the run applied (or the
dry run planned), 2 when another run is in progress or automatic provisioning is not configured, 1 when
GitLab or the database failed (nothing was changed).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from typing import Any

from gateway.admin.cli import _config, _pool, _print_json, _table, actor
from gateway.sync import automatic, autoplan
from gateway.sync.gitlab import GitLabClient
from gateway.sync.gitlab_tree import Listing


def _progress(listing: Listing) -> None:
    print(f"listing GitLab: {len(listing.groups)} groups, members of {len(listing.members)} read, "
          f"{listing.member_count} members, {listing.calls} calls ({listing.throttled} throttled)",
          file=sys.stderr, flush=True)


def cmd_sync(args: argparse.Namespace) -> int:
    cfg = _config(args)
    if cfg.provisioning.automatic is None:
        raise automatic.NotConfigured("provisioning.automatic is not set in the configuration")

    async def main() -> dict[str, Any]:
        pool = await _pool(cfg)
        session = GitLabClient.make_session(cfg.gitlab)
        try:
            result = await automatic.run(pool, cfg, session, dry_run=args.dry_run, actor=actor(),
                                         progress=_progress)
            return result.to_json()
        finally:
            await session.close()
            await pool.close()

    report = asyncio.run(main())
    c = report["counts"]
    print(f"{'planned (dry run)' if report['dry_run'] else 'applied'}: {report['listed']['groups']} GitLab groups, "
          f"{report['listed']['members']} memberships listed in {report['gitlab']['calls']} GitLab calls "
          f"({report['gitlab']['throttled']} throttled) in {report['duration_seconds']:.1f} s; "
          f"groups +{c['groups_created']} bound {c['groups_bound']} renamed {c['groups_renamed']}, "
          f"users +{c['users_created']} updated {c['users_updated']}, "
          f"memberships +{c['memberships_added']} -{c['memberships_removed']}, "
          f"sessions revoked {c['sessions_revoked']}, conflicts {c['conflicts']}", file=sys.stderr)
    if args.json:
        _print_json(report)
    else:
        _print_plan(report)
    return 0


def _print_plan(report: dict[str, Any]) -> None:
    rows = autoplan.report_rows(report)
    if rows:
        _table(["CHANGE", "WHAT", "DETAIL"], rows)
    else:
        print("no changes")


def add_command(add: Callable[..., argparse.ArgumentParser]) -> None:
    """Register `gateway sync`."""
    p = add("sync", cmd_sync, "run automatic provisioning now (users and groups from GitLab, SPEC §12)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and change nothing")
    p.add_argument("--json", action="store_true", help="print the plan as JSON (the API's shape)")
