"""Automatic provisioning (SPEC §12) over a 2,000-group, 20,000-member GitLab subtree, from the stand-in.

    python bench/autoprov.py [--groups 2000] [--members 20000] [--paced] [--throttle]

Prints figures (it is not a test): for a first run (everything created) and a second run with nothing changed
in GitLab, the duration, the GitLab calls, 429s and waits, the database time and what changed; after the
second run, whether any row of users, groups, memberships or sessions was written (it must not be).

    (default)    no pacing and no throttle: the gateway's own cost
    --paced      the run paced for GitLab.com (about 45 group-list calls a minute, 1,500 other calls a minute)
    --throttle   the stand-in throttles like GitLab.com (50 group-list calls a minute, 2,000 calls a minute)

The subtree: one root, 20 groups under it, 10 under each of those, the rest one level deeper; each member is
a direct member of one group (1 % at level 1, 10 % at level 2, the rest deeper), so a member of a group also
counts for all its descendants (about 60,000 memberships). PostgreSQL: $GATEWAY_TEST_DSN's server, else an
embedded one (see run.py).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import database

from gateway.config import build_config
from gateway.db import migrate as db_migrate
from gateway.demo.fake_gitlab import ACCESS_DEVELOPER, FakeGitLab, FakeGroup, FakeUser, serve
from gateway.sync import automatic
from gateway.sync.automatic import Pacing

TOKEN = "glpat-bench-token"
TABLES = ("users", "groups", "memberships", "sessions")


def subtree(fake: FakeGitLab, groups: int, members: int, seed: int = 12) -> None:
    """Seed the stand-in directly (add_group re-derives every path: quadratic for 2,000 groups)."""
    rng = random.Random(seed)
    fake._groups[1] = FakeGroup(1, "bench", "Bench", None)
    levels: list[list[int]] = [[1], [], [], []]
    next_id = 2
    for depth, per_parent in ((1, 20), (2, 10)):
        for parent in levels[depth - 1]:
            for i in range(per_parent):
                fake._groups[next_id] = FakeGroup(next_id, f"g{depth}-{i}-{parent}", f"G {next_id}", parent)
                levels[depth].append(next_id)
                next_id += 1
    while next_id <= groups:
        parent = levels[2][(next_id - 1) % len(levels[2])]
        fake._groups[next_id] = FakeGroup(next_id, f"g3-{next_id}", f"G {next_id}", parent)
        levels[3].append(next_id)
        next_id += 1
    fake._refresh_paths()
    fake.add_user(1_000_000, "root")
    fake.admins.add(1_000_000)
    fake.add_access_token(TOKEN, "root")
    for uid in range(1, members + 1):
        fake._users[uid] = FakeUser(uid, f"user{uid}", f"User {uid}", f"user{uid}@example.com")
        roll = rng.random()
        level = 1 if roll < 0.01 else 2 if roll < 0.11 else 3
        fake._members[(uid, rng.choice(levels[level]))] = ACCESS_DEVELOPER


async def written(conn: asyncpg.Connection) -> dict[str, tuple[int, int]]:
    """Per table: (rows, newest xmin): any insert or update moves the xmin, any delete the count."""
    out = {}
    for table in TABLES:
        row = await conn.fetchrow(f"SELECT count(*) AS n, coalesce(max(xmin::text::bigint), 0) AS x FROM {table}")
        out[table] = (row["n"], row["x"])
    return out


async def bench(args: argparse.Namespace, dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    await db_migrate.migrate(conn)
    fake = FakeGitLab()
    started = time.perf_counter()
    subtree(fake, args.groups, args.members)
    if args.throttle:
        fake.rate_limit(50, 60.0, endpoints=("group", "descendant_groups"))  # GitLab.com's group-list limit
    print(f"stand-in seeded: {len(fake._groups)} groups, {len(fake._members)} direct members "
          f"({time.perf_counter() - started:.1f} s)")
    runner = await serve(fake, "127.0.0.1", 0)
    port = runner.addresses[0][1]
    cfg = build_config({"gitlab": {"url": f"http://127.0.0.1:{port}", "client_id": "b", "client_secret": "b",
                                   "timeout": "30s"},
                        "session": {"secrets": ["A" * 43 + "="]},
                        "provisioning": {"automatic": {"token": TOKEN, "groups": ["bench"]}}}, env={})
    pacing = Pacing() if args.paced else Pacing(group_rate=None, api_rate=None)
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
            for label in ("first run", "second run (no change)"):
                before = await written(conn)
                result = await automatic.run(pool, cfg, http, pacing=pacing)
                report = result.to_json()
                after = await written(conn)
                _print(label, report)
                if label.startswith("second"):
                    same = "nothing" if before == after else f"CHANGED {before} -> {after}"
                    print(f"  rows written to {', '.join(TABLES)}: {same}")
            effective = await conn.fetchval("SELECT count(*) FROM memberships WHERE source = 'sync'")
            print(f"memberships in the database: {effective} (source sync)")
    finally:
        await pool.close()
        await conn.close()
        await runner.cleanup()


def _print(label: str, r: dict[str, Any]) -> None:
    g, c = r["gitlab"], r["counts"]
    print(f"{label}: {r['duration_seconds']:.1f} s, {g['calls']} GitLab calls ({g['throttled']} answered 429, "
          f"{g['waited_seconds']:.0f} s waited), database {r['db_seconds']:.2f} s; listed {r['listed']['groups']} "
          f"groups, {r['listed']['members']} memberships")
    print("  changes: " + ", ".join(f"{k} {v}" for k, v in c.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=2000)
    parser.add_argument("--members", type=int, default=20000)
    parser.add_argument("--paced", action="store_true", help="pace for GitLab.com's limits")
    parser.add_argument("--throttle", action="store_true", help="the stand-in throttles like GitLab.com")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="autoprov-bench-") as tmp, database(Path(tmp)) as dsn:
        asyncio.run(bench(args, dsn))


if __name__ == "__main__":
    main()
