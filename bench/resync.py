"""SPEC §11 re-checks at scale: prints figures (not a test).

    python bench/resync.py [--users 10000] [--drain 2000] [--seconds 4] [--rounds 6] [--profile]

Everything runs on 127.0.0.1: a PostgreSQL ($GATEWAY_TEST_DSN's server, else an embedded one), the GitLab
stand-in in its own process (zero latency: it answers from memory; its users have no group memberships, so
the group listing is one short page), nginx serving a 200-byte page as the upstream, and ONE gateway process
(`python -m gateway run`, workers 1, resync_interval 15m). Users, sessions and kept grants are written
straight into the database (each grant a real refresh token issued by the stand-in, Fernet-sealed).

Figures:
1. Proxied req/s and the gateway's CPU per request (wrk, one signed-in cookie) with the scheduler idle (no user
   due) and with it re-checking at the steady rate of `--users` users per 15 minutes (due times spread over the
   interval): the same process throughout, `--rounds` pairs of rounds in ABBA order, the gateway pinned to one
   CPU and the load generator, upstream and stand-in to the other; medians and the per-round ratios.
2. Re-checks per second sustained when `--drain` users are all due at once (the scheduler's ceiling on this
   machine), the gateway's CPU per re-check, and from it the CPU share at the steady rate (`--profile`: where
   the gateway's time goes during that drain, by py-spy).
3. Database work per re-check with a users table of 1,000 and of 100,000 rows (the same 1,000 users with an
   active session and a due grant; the others with a dormant grant and only revoked sessions): shared
   buffers touched per re-check (pg_stat_database) and the claim query's plan.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import asyncpg
from cryptography.fernet import Fernet

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import (  # bench/ is not a package: run.py is imported from its folder
    PAGE,
    REPO,
    SESSION_KEY,
    Processes,
    cpu_seconds,
    database,
    free_port,
    gateway_config,
    pinned,
    py_spy,
    summarize_profile,
    wait_port,
    wait_ready,
    wrk,
)

if TYPE_CHECKING:
    from gateway.demo.fake_gitlab import FakeGitLab

INTERVAL = 900.0  # resync_interval 15m
CLIENT_ID, CLIENT_SECRET = "bench", "bench-secret"


# ---- the stand-in, in its own process ----------------------------------------------------------------------

def standin_main(port: int, users: int, tokens_file: Path) -> None:
    """Serve a stand-in with `users` users, each holding one grant whose refresh token goes to tokens_file."""
    sys.path.insert(0, str(REPO))
    from gateway.demo.fake_gitlab import FakeGitLab

    fake = FakeGitLab()
    fake.add_application(CLIENT_ID, CLIENT_SECRET, ["http://127.0.0.1/oauth2/callback"])
    tokens = []
    for uid in range(1, users + 1):
        fake.add_user(uid, f"u{uid}")
        tokens.append(fake.grant(CLIENT_ID, uid).refresh_token)
    partial = tokens_file.with_suffix(".partial")
    partial.write_text(json.dumps(tokens))  # renamed once listening: the reader never sees half a file
    serve_standin(fake, port, lambda: partial.rename(tokens_file))


def serve_standin(fake: FakeGitLab, port: int, ready: Callable[[], object]) -> None:
    """Serve `fake` on 127.0.0.1:`port` until interrupted, calling `ready()` once it listens."""
    from gateway.demo.fake_gitlab import serve

    fake.requests = _Discard()  # type: ignore[assignment]  # a long run must not grow its request log

    async def run() -> None:
        runner = await serve(fake, "127.0.0.1", port)
        ready()
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())


class _Discard(list):  # type: ignore[type-arg]
    def append(self, item: object) -> None:
        pass


def start_standin(procs: Processes, workdir: Path, users: int) -> tuple[str, list[str], subprocess.Popen[bytes]]:
    port = free_port()
    tokens_file = workdir / f"tokens-{port}.json"
    proc = procs.start([sys.executable, __file__, "--standin", str(port), str(users), str(tokens_file)],
                       f"standin-{port}")
    deadline = time.monotonic() + 120
    while not tokens_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("the stand-in did not start")
        time.sleep(0.1)
    wait_port(port, proc, "stand-in")
    return f"http://127.0.0.1:{port}", json.loads(tokens_file.read_text()), proc


# ---- the database ---------------------------------------------------------------------------------------------

async def seed(dsn: str, tokens: list[str], *, total: int, spread: float | None) -> str:
    """Users 1..total; the first len(tokens) have an active session and a kept grant, due over `spread`
    seconds from now (None: not due); the rest a dormant grant and a revoked session. The cookie of user 1."""
    sys.path.insert(0, str(REPO))
    from gateway.db import migrate

    fernet = Fernet(SESSION_KEY.encode())
    active = len(tokens)
    conn = await asyncpg.connect(dsn)
    try:
        await migrate.migrate(conn)
        await conn.copy_records_to_table(
            "users", columns=["id", "gitlab_id", "login", "name", "email", "provisioned_by"],
            records=[(i, i, f"u{i}", f"User {i}", f"u{i}@example.com", "jit") for i in range(1, total + 1)])
        await conn.execute("SELECT setval('users_id_seq', $1)", total)
        await conn.execute("INSERT INTO memberships (user_id, group_id, source) "
                           "SELECT u.id, g.id, 'default' FROM users u, groups g WHERE g.builtin")
        await conn.copy_records_to_table(
            "sessions", columns=["id", "user_id", "expires_at", "revoked_at"],
            records=[(f"s{i}", i, _at(8 * 3600), None if i <= active else _at(-60)) for i in range(1, total + 1)])
        await conn.copy_records_to_table(
            "gitlab_grants", columns=["user_id", "refresh_token", "next_sync_at", "confirmed_at"],
            records=[(i, fernet.encrypt((tokens[i - 1] if i <= active else f"dormant-{i}").encode()).decode(),
                      _at((i - 1) / active * spread) if i <= active and spread is not None else None, _at(0))
                     for i in range(1, total + 1)])
    finally:
        await conn.close()
    # Nothing left for autovacuum to do during the measurements (its buffer reads would count against them).
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("VACUUM ANALYZE")
    finally:
        await conn.close()
    data = {"created": int(time.time()), "session": {"sid": "s1", "uid": 1}}
    return "_gateway=" + fernet.encrypt(json.dumps(data).encode()).decode()


def _at(seconds_from_now: float) -> object:
    from datetime import UTC, datetime, timedelta

    return datetime.now(UTC) + timedelta(seconds=seconds_from_now)


async def sql(dsn: str, query: str, *args: object) -> object:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(query, *args)
    finally:
        await conn.close()


async def due_over(dsn: str, seconds: float | None, users: int = 0) -> None:
    """Make users 1..`users` (those with an active session) due, spread over `seconds` from now; None: nobody
    due. Touches only those rows, so the measurements that follow are not charged for the rest of the table."""
    if seconds is None:
        await sql(dsn, "UPDATE gitlab_grants SET next_sync_at = NULL WHERE next_sync_at IS NOT NULL")
        return
    await sql(dsn, "UPDATE gitlab_grants SET next_sync_at = now() + make_interval(secs => $1 * (user_id - 1) / $2)"
                   " WHERE user_id <= $2", seconds, users)


async def stat_blocks(dsn: str) -> int:
    got = await sql(dsn, "SELECT blks_hit + blks_read FROM pg_stat_database WHERE datname = current_database()")
    assert isinstance(got, int)
    return got


async def claim_plan(dsn: str) -> str:
    """EXPLAIN (ANALYZE, BUFFERS) of one claim of 8 due users (a scheduler's slots), rolled back."""
    sys.path.insert(0, str(REPO))
    from gateway.db import grants

    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            rows = await conn.fetch("EXPLAIN (ANALYZE, BUFFERS, COSTS OFF, TIMING OFF) " + grants.CLAIM_DUE,
                                    "bench", 60.0, 8)
            raise _Rollback([r[0] for r in rows])
    except _Rollback as done:
        return "\n".join(done.lines)
    finally:
        await conn.close()


class _Rollback(Exception):
    def __init__(self, lines: list[str]) -> None:
        super().__init__()
        self.lines = lines


# ---- phases ---------------------------------------------------------------------------------------------------

def start_gateway(procs: Processes, workdir: Path, dsn: str, upstream: str, gitlab: str
                  ) -> tuple[str, subprocess.Popen[bytes]]:
    path, public, admin = gateway_config(
        workdir, f"gateway-{free_port()}", dsn=dsn, upstream=upstream, workers=1,
        extra={"provisioning": {"resync_interval": "15m", "resync_grace": "1h"},
               "gitlab": {"url": gitlab, "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}})
    proc = procs.start([sys.executable, "-m", "gateway", "run", "-c", str(path)], path.stem, cwd=REPO)
    wait_ready(admin, proc)
    return f"http://127.0.0.1:{public}", proc


def drain(dsn: str, count: int, gateway: subprocess.Popen[bytes], standin: subprocess.Popen[bytes], *,
          profile: Path | None = None) -> dict[str, float]:
    """Make `count` users due now and time the scheduler until every one is re-checked (with `profile`, py-spy
    records the gateway for the first 15 s of it)."""
    asyncio.run(due_over(dsn, None))
    started = time.monotonic()
    asyncio.run(due_over(dsn, 0.0, count))
    blocks0, cpu0, cpu_s0 = asyncio.run(stat_blocks(dsn)), cpu_seconds([gateway]), cpu_seconds([standin])
    with py_spy(gateway, profile or Path("/dev/null"), 15, wanted=profile is not None):
        while asyncio.run(sql(dsn, "SELECT count(*) FROM gitlab_grants WHERE next_sync_at <= now()")):
            if time.monotonic() - started > 600:
                raise SystemExit("the drain did not finish in 10 minutes")
            time.sleep(0.2)
        elapsed = time.monotonic() - started
        cpu, cpu_s, blocks = cpu_seconds([gateway]) - cpu0, cpu_seconds([standin]) - cpu_s0, asyncio.run(
            stat_blocks(dsn)) - blocks0
    failed = asyncio.run(sql(dsn, "SELECT count(*) FROM gitlab_grants WHERE failures > 0 OR refresh_token IS NULL"))
    return {"elapsed": elapsed, "rate": count / elapsed, "cpu_per": cpu / count, "standin_cpu_per": cpu_s / count,
            "blocks_per": blocks / count, "failed": float(failed)}  # type: ignore[arg-type]


# Where a re-check's time goes in the gateway, by the innermost frame's file (first match wins).
RECHECK_AREAS = (("asyncpg (statements, protocol)", ("asyncpg/",)),
                 ("aiohttp client (GitLab calls)", ("aiohttp/client", "aiohttp/connector.py", "aiohttp/streams.py",
                                                    "aiohttp/http_", "aiohttp/_http", "aiohttp/helpers.py",
                                                    "multidict/", "yarl/")),
                 ("Fernet (seal, unseal)", ("cryptography/",)),
                 ("json", ("json/",)),
                 ("logging", ("logging/", "gateway/logs.py")),
                 ("gateway code", ("gateway/",)),
                 ("event loop, sockets", ("asyncio/", "uvloop/", "selectors.py", "socket.py")))


@dataclass
class Rounds:
    """Interleaved wrk rounds: req/s and the gateway's CPU per request, scheduler idle and at the steady rate."""

    idle: list[tuple[float, float]] = field(default_factory=list)
    steady: list[tuple[float, float]] = field(default_factory=list)
    rechecked: int = 0
    seconds: float = 0.0


def interleaved(dsn: str, gateway: subprocess.Popen[bytes], others: list[subprocess.Popen[bytes]], target: str,
                cookie: str, *, users: int, rounds: int, seconds: int, profiles: Path | None = None) -> Rounds:
    """`rounds` pairs of wrk rounds in ABBA order, the same process throughout: scheduler idle (nobody due) and
    re-checking at the steady rate (`users` per resync_interval, due times spread over it). The gateway is
    pinned to CPU 1; wrk, nginx, the stand-in and PostgreSQL (its server, so every backend it forks) to CPU 0:
    the gateway's one CPU is what the proxied requests and the re-checks share (a process saturated by proxied
    traffic), and the work re-checks cause elsewhere (database, GitLab) does not land on it."""
    out = Rounds()
    with pinned([gateway], [*others, *postgres_of(dsn)], wrk):
        for i in range(rounds):
            for phase in ("idle", "steady") if i % 2 == 0 else ("steady", "idle"):
                if phase == "idle":
                    asyncio.run(due_over(dsn, None))
                else:
                    asyncio.run(due_over(dsn, INTERVAL, users))
                began = asyncio.run(sql(dsn, "SELECT now()"))
                before = cpu_seconds([gateway])
                out_file = profiles / f"{phase}.profile" if profiles is not None else Path("/dev/null")
                with py_spy(gateway, out_file, seconds, wanted=profiles is not None and i == 0):
                    r = wrk(target, cookie, duration=seconds, connections=32)
                result = (r.rps, (cpu_seconds([gateway]) - before) / max(r.requests, 1) * 1e6)
                if phase == "idle":
                    out.idle.append(result)
                else:
                    out.steady.append(result)
                    out.rechecked += int(asyncio.run(sql(  # type: ignore[call-overload]
                        dsn, "SELECT count(*) FROM gitlab_grants WHERE confirmed_at > $1", began)))
                    out.seconds += seconds
    return out


@dataclass
class _Pid:
    """What run.pinned needs of a process: its pid."""

    pid: int


def postgres_of(dsn: str) -> list[subprocess.Popen[bytes]]:
    """The PostgreSQL server behind `dsn` when it runs here (its socket directory is its data directory)."""
    import psutil

    socket_dir = dsn.partition("host=")[2].partition("&")[0]
    found = [p for p in psutil.process_iter(["name", "cmdline"])
             if socket_dir and p.info["name"] == "postgres" and socket_dir in " ".join(p.info["cmdline"] or [])]
    return [_Pid(p.pid) for p in found]  # type: ignore[misc]


def rounds_table(r: Rounds, users: int) -> list[str]:
    med = statistics.median
    rps_ratio = [s[0] / i[0] for i, s in zip(r.idle, r.steady, strict=True)]
    cpu_ratio = [s[1] / i[1] for i, s in zip(r.idle, r.steady, strict=True)]
    return [
        f"| proxied req/s, scheduler idle / re-checking {users:,} users per 15 min (medians of {len(r.idle)} "
        f"interleaved rounds) | {med(x[0] for x in r.idle):.0f} / {med(x[0] for x in r.steady):.0f}; "
        f"per-round ratio median {med(rps_ratio):.1%} [{' '.join(f'{x:.2f}' for x in rps_ratio)}] |",
        f"| gateway CPU per proxied request, idle / re-checking (re-checks' CPU included) | "
        f"{med(x[1] for x in r.idle):.0f} us / {med(x[1] for x in r.steady):.0f} us; per-round ratio median "
        f"{med(cpu_ratio):.1%} [{' '.join(f'{x:.2f}' for x in cpu_ratio)}] |",
        f"| re-checks during the re-checking rounds | {r.rechecked} in {r.seconds:.0f} s "
        f"({r.rechecked / max(r.seconds, 1):.1f}/s; the steady rate is {users / INTERVAL:.1f}/s) |",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--drain", type=int, default=2_000, help="users made due at once for the ceiling")
    parser.add_argument("--seconds", type=int, default=4, help="each wrk round")
    parser.add_argument("--rounds", type=int, default=6, help="interleaved idle/re-checking round pairs")
    parser.add_argument("--small", type=int, default=1_000)
    parser.add_argument("--large", type=int, default=100_000)
    parser.add_argument("--profile", action="store_true", help="py-spy the gateway during the drain")
    parser.add_argument("--standin", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.standin:
        standin_main(int(args.standin[0]), int(args.standin[1]), Path(args.standin[2]))
        return 0
    workdir = Path(tempfile.mkdtemp(prefix="gwbench-resync-"))
    workdir.chmod(0o755)
    procs = Processes(workdir)
    out: list[str] = []
    try:
        (workdir / "www").mkdir()
        (workdir / "www" / "index.html").write_bytes(PAGE)
        up, upstream_proc = procs.nginx("upstream", f"server {{ LISTEN location / {{ root {workdir / 'www'}; }} }}")
        upstream = f"http://127.0.0.1:{up}"

        # 1 and 2: --users users with active sessions, one gateway process.
        gitlab, tokens, standin = start_standin(procs, workdir, args.users)
        with database(workdir) as dsn:
            cookie = asyncio.run(seed(dsn, tokens, total=args.users, spread=None))
            public, gateway = start_gateway(procs, workdir, dsn, upstream, gitlab)
            target = f"{public}/index.html"
            wrk(target, cookie, duration=1, connections=32)  # warm-up
            rounds = interleaved(dsn, gateway, [upstream_proc, standin], target, cookie, users=args.users,
                                 rounds=args.rounds, seconds=args.seconds,
                                 profiles=workdir if args.profile else None)
            profile = workdir / "drain.profile" if args.profile else None
            ceiling = drain(dsn, min(args.drain, args.users), gateway, standin, profile=profile)
            procs.stop(gateway)
        procs.stop(standin)
        steady_rate = args.users / INTERVAL
        out.append(f"users with an active session: {args.users}, resync_interval 15m (steady rate "
                   f"{steady_rate:.1f} re-checks/s), one gateway process, stand-in answering from memory")
        out.append("")
        out.append("| figure | value |")
        out.append("|---|---|")
        out.extend(rounds_table(rounds, args.users))
        out.append(f"| re-checks/s sustained, {min(args.drain, args.users)} due at once (gateway unpinned) | "
                   f"{ceiling['rate']:.0f} ({ceiling['failed']:.0f} failed) |")
        out.append(f"| gateway CPU per re-check | {ceiling['cpu_per'] * 1000:.2f} ms (stand-in: "
                   f"{ceiling['standin_cpu_per'] * 1000:.2f} ms) |")
        out.append(f"| gateway CPU share at the steady rate | {ceiling['cpu_per'] * steady_rate:.1%} of one core |")

        # 3: the same 1,000 active users in a small and a large users table.
        plans = {}
        for total in (args.small, args.large):
            gitlab, tokens, standin = start_standin(procs, workdir, min(1000, args.small))
            with database(workdir) as dsn:
                asyncio.run(seed(dsn, tokens, total=total, spread=None))
                plans[total] = asyncio.run(claim_plan_due(dsn))
                _, gateway = start_gateway(procs, workdir, dsn, upstream, gitlab)
                got = drain(dsn, len(tokens), gateway, standin)
                procs.stop(gateway)
            procs.stop(standin)
            out.append(f"| users table {total:,} rows, {len(tokens):,} due: buffers touched per re-check | "
                       f"{got['blocks_per']:.0f} ({got['rate']:.0f} re-checks/s, "
                       f"{got['cpu_per'] * 1000:.2f} ms CPU each) |")
        for total, plan in plans.items():
            out.append("")
            out.append(f"Claim query (8 of 1,000 due) with {total:,} users:")
            out.extend(f"    {line}" for line in plan.splitlines())
        if profile is not None:
            out.append("")
            out.append("py-spy, the gateway during the drain (innermost frame):")
            out.append(summarize_profile(profile, RECHECK_AREAS))
            for phase in ("idle", "steady"):
                out.append("")
                out.append(f"py-spy, the gateway during the first {phase} wrk round:")
                out.append(summarize_profile(workdir / f"{phase}.profile"))
    finally:
        procs.stop_all()
    print("\n".join(out))
    return 0


async def claim_plan_due(dsn: str) -> str:
    await due_over(dsn, 0.0, 1000)
    try:
        return await claim_plan(dsn)
    finally:
        await due_over(dsn, None)


if __name__ == "__main__":
    sys.exit(main())
