"""Full sign-ins per second (first and repeat), for bench/run.py's `signin-first` and `signin-repeat` rows.

    python bench/run.py --only signin-first,signin-repeat [--signin-users 300]

The GitLab stand-in runs in its own process, answering from memory (no latency), with `--signin-users` users
who are each members of the same 50 groups, and the database has a local group for each of them. The gateway
(`python -m gateway run`, sign-up and group sync on, workers 1 for signin-first/-repeat, 2 for the -2 rows, each
with its own users) signs each of them in once (first sign-ins: a user row and 51 memberships to write), then each
again (repeat sign-ins: nothing changed). Each sign-in is the whole browser flow, from a fresh cookie jar: start ->
GitLab authorize -> GitLab's sign-in form -> authorize -> callback (code exchange, user, groups, provisioning,
session) -> the cookie. The load comes from this process, 16 sign-ins at a time. Sign-ins/s moves with whatever
shares the cores (the stand-in, PostgreSQL and this client use them too); the gateway's CPU per sign-in does not.
Each row also prints the CPU per sign-in of the gateway, of PostgreSQL's server processes for this database, of
the stand-in and of the client, and the rate the gateway and PostgreSQL alone would sustain on 2 cores.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

if TYPE_CHECKING:
    from run import Processes, Result

CLIENT_ID, CLIENT_SECRET = "bench", "bench-secret"
GROUPS = 50
CONCURRENCY = 16
NAMES = ("signin-first", "signin-repeat", "signin-first-2", "signin-repeat-2")
SUFFIX = {1: "", 2: "-2"}  # row name suffix per server.workers


def standin_main(port: int, users: int, ready: Path) -> None:
    """The stand-in: `users` users, each a member of the same GROUPS groups."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from resync import serve_standin

    from gateway.demo.fake_gitlab import FakeGitLab

    fake = FakeGitLab()
    fake.add_application(CLIENT_ID, CLIENT_SECRET, ["http://127.0.0.1/oauth2/callback"])
    for gid in range(1, GROUPS + 1):
        fake.add_group(gid, f"team-{gid}")
    for uid in range(1, users + 1):
        fake.add_user(uid, f"u{uid}")
        for gid in range(1, GROUPS + 1):
            fake.add_member(uid, gid)
    serve_standin(fake, port, lambda: ready.write_text("ready"))


async def sign_in(gateway: str, gitlab: str, login: str) -> float:
    """One whole browser sign-in from a fresh cookie jar; its duration in seconds."""
    import aiohttp

    started = time.perf_counter()
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        r = await http.get(f"{gateway}/oauth2/start", params={"rd": "/"}, allow_redirects=False)
        assert r.status == 302, r.status
        r = await http.get(r.headers["Location"], allow_redirects=False)
        location = r.headers["Location"]
        if "/users/sign_in" in location:
            url = location if location.startswith("http") else gitlab + location
            redirect_to = parse_qs(urlsplit(url).query).get("redirect_to", [""])[0]
            r = await http.post(url.split("?")[0], data={"username": login, "redirect_to": redirect_to},
                                allow_redirects=False)
            nxt = r.headers["Location"]
            r = await http.get(nxt if nxt.startswith("http") else gitlab + nxt, allow_redirects=False)
        callback = r.headers["Location"]
        assert callback.startswith(gateway), callback
        r = await http.get(callback, allow_redirects=False)
        if r.status != 302:
            raise RuntimeError(f"sign-in of {login} failed: {r.status} {(await r.text())[:300]}")
    return time.perf_counter() - started


async def sign_in_all(gateway: str, gitlab: str, logins: list[str]) -> tuple[float, list[float]]:
    """Every login signed in, CONCURRENCY at a time: (wall seconds, each sign-in's seconds)."""
    queue = list(reversed(logins))
    durations: list[float] = []

    async def worker() -> None:
        while queue:
            durations.append(await sign_in(gateway, gitlab, queue.pop()))

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return time.perf_counter() - started, durations


def rows(procs: Processes, workdir: Path, dsn: str, upstream: str, users: int,
         profile: str = "", names: frozenset[str] = frozenset(NAMES)) -> tuple[dict[str, Result], str]:
    """The rows as run.Result objects (rps = sign-ins/s, latency of a whole sign-in, CPU = the gateway's), and
    the py-spy summary of the gateway during the row named `profile` (if one is). Each workers setting signs in
    its own `users` users (so that its first sign-ins are first)."""
    from run import LABELS, Result, cpu_seconds, free_port, gateway_config, summarize_profile, wait_port, wait_ready

    settings = [w for w in (1, 2) if {f"signin-first{SUFFIX[w]}", f"signin-repeat{SUFFIX[w]}"} & names]
    port = free_port()
    ready = workdir / f"standin-{port}.ready"
    standin = procs.start([sys.executable, __file__, "--standin", str(port), str(users * len(settings)), str(ready)],
                          f"signin-standin-{port}")
    deadline = time.monotonic() + 180
    while not ready.exists():
        if standin.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("the sign-in stand-in did not start")
        time.sleep(0.1)
    wait_port(port, standin, "stand-in")
    asyncio.run(local_groups(dsn))
    gitlab = f"http://127.0.0.1:{port}"
    out: dict[str, Result] = {}
    summary = ""
    repo = Path(__file__).resolve().parents[1]
    for i, workers in enumerate(settings):
        path, public, admin = gateway_config(
            workdir, f"gateway-signin-{workers}", dsn=dsn, upstream=upstream, workers=workers,
            extra={"gitlab": {"url": gitlab, "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}})
        gw = procs.start([sys.executable, "-m", "gateway", "run", "--no-migrate", "-c", str(path)],
                         f"gateway-signin-{workers}", cwd=repo)
        wait_ready(admin, gw)
        gateway = f"http://127.0.0.1:{public}"
        logins = [f"u{uid}" for uid in range(i * users + 1, (i + 1) * users + 1)]
        asyncio.run(sign_in(gateway, gitlab, logins[0]))  # warm-up (a first sign-in, repeated below)
        for kind in ("signin-first", "signin-repeat"):
            name = kind + SUFFIX[workers]
            if name not in names:
                continue
            spy = None
            if name == profile:
                spy = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(gw.pid),
                                        "--rate", "250", "--format", "raw", "--nonblocking", "--output",
                                        str(workdir / f"{name}.profile")],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(1)  # py-spy attached
            backends = asyncio.run(database_backends(dsn))
            before = cpu_seconds([gw]), cpu_seconds([standin]), backend_seconds(backends), time.process_time()
            wall, durations = asyncio.run(sign_in_all(gateway, gitlab,
                                                      logins[1:] if kind == "signin-first" else logins))
            backends |= asyncio.run(database_backends(dsn))
            after = cpu_seconds([gw]), cpu_seconds([standin]), backend_seconds(backends), time.process_time()
            cpu, standin_cpu, db_cpu, client_cpu = (b - a for a, b in zip(before, after, strict=True))
            if spy is not None:
                spy.send_signal(signal.SIGINT)  # py-spy writes what it recorded and exits
                spy.wait(timeout=30)
                summary = f"py-spy, {LABELS[name]}, the gateway:\n" + summarize_profile(workdir / f"{name}.profile")
            ms = sorted(d * 1000 for d in durations)
            n = len(durations)
            r = out[name] = Result(rps=n / wall, p50_ms=statistics.median(ms),
                                   p99_ms=ms[min(n - 1, int(n * 0.99))], errors=0, requests=n,
                                   cpu_us=cpu / n * 1e6)
            print(f"  {name:<36} {r.rps:9.1f} sign-ins/s  p50 {r.p50_ms:6.1f} ms  CPU per sign-in: gateway "
                  f"{cpu / n * 1e3:5.2f} ms, PostgreSQL {db_cpu / n * 1e3:5.2f} ms, GitLab stand-in "
                  f"{standin_cpu / n * 1e3:5.2f} ms, client {client_cpu / n * 1e3:5.2f} ms; gateway + PostgreSQL on "
                  f"2 cores: {2 / ((cpu + db_cpu) / n):.0f}/s", file=sys.stderr, flush=True)
        procs.stop(gw)
    procs.stop(standin)
    return out, summary


async def local_groups(dsn: str) -> None:
    """Local groups named like the stand-in's GitLab groups, so that sign-ins sync GROUPS memberships each."""
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("INSERT INTO groups (name, description) SELECT 'team-' || i, '' "
                           "FROM generate_series(1, $1::int) i ON CONFLICT DO NOTHING", GROUPS)
    finally:
        await conn.close()


async def database_backends(dsn: str) -> set[int]:
    """PostgreSQL's server processes of this database (the gateway's pool, among others)."""
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                                "AND pid <> pg_backend_pid()")
    finally:
        await conn.close()
    return {r["pid"] for r in rows}


def backend_seconds(pids: set[int]) -> float:
    import psutil

    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
    return total


if __name__ == "__main__":
    if sys.argv[1:2] == ["--standin"]:
        standin_main(int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
    else:
        # Otherwise: run.py's two sign-in rows, with any further run.py options.
        sys.exit(subprocess.call([sys.executable, str(Path(__file__).with_name("run.py")),
                                  "--only", ",".join(NAMES), *sys.argv[1:]]))
