"""Full sign-ins per second (first and repeat), for bench/run.py's `signin-first` and `signin-repeat` rows.

    python bench/run.py --only signin-first,signin-repeat [--signin-users 300]

The GitLab stand-in runs in its own process (uvloop when installed, no access log), answering from memory (no
latency), with `--signin-users` users who are each members of the same 50 groups, and the database has a local
group for each of them. The gateway (`python -m gateway run`, sign-up and group sync on, workers 1 for
signin-first/-repeat, 2 for the -2 rows, each with its own users) signs each of them in once (first sign-ins: a
user row and 51 memberships to write), then each again (repeat sign-ins: nothing changed).

Each sign-in is a browser that is already signed in to GitLab (its GitLab session cookie is made before the rows,
through GitLab's sign-in form) and has no cookie of the gateway: start -> GitLab's authorize (a trusted
application: straight back) -> callback (code exchange, user, groups, provisioning, session, and the revocation
of the replaced grant) -> the session cookie; a new connection to each server per sign-in, as many browsers make.
The load comes from this process, 16 sign-ins at a time, through a lean HTTP/1.1 client (raw asyncio on uvloop,
llhttp through httptools): the harness shares the 2 cores with the gateway, so it should spend as little as it can.
Sign-ins/s moves with whatever shares the cores; the gateway's CPU per sign-in does not. Each row prints next to
the rate the CPU per sign-in of the gateway, of PostgreSQL's server processes for this database, of the stand-in
and of the client, and the rate the gateway and PostgreSQL alone would sustain on 2 cores.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlencode, urlsplit

import httptools

if TYPE_CHECKING:
    from run import Processes, Result

T = TypeVar("T")

CLIENT_ID, CLIENT_SECRET = "bench", "bench-secret"
GROUPS = 50
CONCURRENCY = 16
NAMES = ("signin-first", "signin-repeat", "signin-first-2", "signin-repeat-2")
SUFFIX = {1: "", 2: "-2"}  # row name suffix per server.workers


def run_fast(coro: Coroutine[Any, Any, T]) -> T:
    """asyncio.run, on uvloop when it is installed (the bench's own processes cost less CPU there)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def standin_main(port: int, users: int, ready: Path) -> None:
    """The stand-in: `users` users, each a member of the same GROUPS groups."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from aiohttp import web
    from resync import _Discard

    from gateway.demo.fake_gitlab import FakeGitLab, create_app

    fake = FakeGitLab()
    fake.add_application(CLIENT_ID, CLIENT_SECRET, ["http://127.0.0.1/oauth2/callback"])
    for gid in range(1, GROUPS + 1):
        fake.add_group(gid, f"team-{gid}")
    for uid in range(1, users + 1):
        fake.add_user(uid, f"u{uid}")
        for gid in range(1, GROUPS + 1):
            fake.add_member(uid, gid)
    fake.requests = _Discard()  # type: ignore[assignment]  # a long run must not grow its request log

    async def serve() -> None:
        runner = web.AppRunner(create_app(fake), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        ready.write_text("ready")
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    with contextlib.suppress(KeyboardInterrupt):
        run_fast(serve())


# ---- the lean client ------------------------------------------------------------------------------------------

class Connection(asyncio.Protocol):
    """One HTTP/1.1 connection of the load client: a request written in one piece, its answer parsed by llhttp,
    keeping only the status, Location, the Set-Cookie name=value pairs and the body."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.answered: asyncio.Future[None] | None = None
        self.status, self.location, self.body = 0, "", bytearray()
        self.cookies: list[str] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's TCPTransport is not a subclass

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"location":
            self.location = value.decode()
        elif name == b"set-cookie":
            self.cookies.append(value.split(b";", 1)[0].decode())

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.status = self.parser.get_status_code()
        if self.answered is not None and not self.answered.done():
            self.answered.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.answered is not None and not self.answered.done():
            self.answered.set_exception(ConnectionError("the server closed the connection before answering"))

    async def request(self, method: str, target: str, host: str, cookie: str = "", body: bytes = b"") -> None:
        assert self.transport is not None
        self.parser = httptools.HttpResponseParser(self)
        self.answered = asyncio.get_running_loop().create_future()
        self.status, self.location, self.cookies, self.body = 0, "", [], bytearray()
        head = f"{method} {target} HTTP/1.1\r\nHost: {host}\r\n"
        if cookie:
            head += f"Cookie: {cookie}\r\n"
        if body or method == "POST":
            head += f"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {len(body)}\r\n"
        self.transport.write(head.encode() + b"\r\n" + body)
        await self.answered

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def connect(base: str) -> tuple[Connection, str]:
    """A new connection to `base` (http://host:port) and the Host header to send."""
    host = urlsplit(base).netloc
    name, _, port = host.rpartition(":")
    _transport, conn = await asyncio.get_running_loop().create_connection(Connection, name, int(port))
    return conn, host


def target_of(url: str) -> str:
    parts = urlsplit(url)
    return parts.path + (f"?{parts.query}" if parts.query else "")


async def gitlab_sign_in(gitlab: str, login: str) -> str:
    """Sign in to GitLab through its sign-in form, as the browser did some time before: its session cookie."""
    conn, host = await connect(gitlab)
    try:
        await conn.request("POST", "/users/sign_in", host, body=urlencode({"username": login}).encode())
    finally:
        conn.close()
    if conn.status != 302 or not conn.cookies:
        raise RuntimeError(f"GitLab sign-in of {login} failed: {conn.status} {bytes(conn.body)[:300]!r}")
    return "; ".join(conn.cookies)


async def sign_in(gateway: str, gitlab: str, gitlab_cookie: str) -> float:
    """One whole browser sign-in (signed in to GitLab, no cookie of the gateway); its duration in seconds."""
    started = time.perf_counter()
    gw, gw_host = await connect(gateway)
    gl, gl_host = await connect(gitlab)
    try:
        await gw.request("GET", "/oauth2/start?rd=%2F", gw_host)
        if gw.status != 302 or not gw.cookies:
            raise RuntimeError(f"start: {gw.status} {bytes(gw.body)[:300]!r}")
        state = "; ".join(gw.cookies)
        await gl.request("GET", target_of(gw.location), gl_host, cookie=gitlab_cookie)
        if gl.status != 302 or not gl.location.startswith(gateway):
            raise RuntimeError(f"authorize: {gl.status} {gl.location!r} {bytes(gl.body)[:300]!r}")
        await gw.request("GET", target_of(gl.location), gw_host, cookie=state)
        if gw.status != 302 or not any(c.startswith("_gateway=") for c in gw.cookies):
            raise RuntimeError(f"callback: {gw.status} {bytes(gw.body)[:300]!r}")
    finally:
        gw.close()
        gl.close()
    return time.perf_counter() - started


async def gitlab_sessions(gitlab: str, logins: list[str]) -> dict[str, str]:
    """login -> GitLab session cookie, CONCURRENCY sign-ins at GitLab at a time."""
    cookies: dict[str, str] = {}
    queue = list(logins)

    async def worker() -> None:
        while queue:
            login = queue.pop()
            cookies[login] = await gitlab_sign_in(gitlab, login)

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return cookies


async def sign_in_all(gateway: str, gitlab: str, logins: list[str], gitlab_cookies: dict[str, str] | None = None
                      ) -> tuple[float, list[float]]:
    """Every login signed in, CONCURRENCY at a time: (wall seconds, each sign-in's seconds). Without
    `gitlab_cookies` each browser first signs in to GitLab (not timed)."""
    cookies = gitlab_cookies if gitlab_cookies is not None else await gitlab_sessions(gitlab, logins)
    queue = list(reversed(logins))
    durations: list[float] = []

    async def worker() -> None:
        while queue:
            durations.append(await sign_in(gateway, gitlab, cookies[queue.pop()]))

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
    # Every browser is signed in to GitLab already (its session cookie lasts the whole run).
    gitlab_cookies = run_fast(gitlab_sessions(gitlab, [f"u{uid}" for uid in range(1, users * len(settings) + 1)]))
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
        run_fast(sign_in(gateway, gitlab, gitlab_cookies[logins[0]]))  # warm-up (a first sign-in, repeated below)
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
            wall, durations = run_fast(sign_in_all(gateway, gitlab, logins[1:] if kind == "signin-first" else logins,
                                                   gitlab_cookies))
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
