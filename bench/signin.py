"""Full sign-ins per second (first and repeat), for bench/run.py's `signin-first` and `signin-repeat` rows.

    python bench/run.py --only signin-first,signin-repeat [--signin-users 300]

The GitLab stand-in runs in its own process, answering from memory (no latency), with `--signin-users` users
who are each members of the same 50 groups. The gateway (`python -m gateway run`, workers 1, sign-up and group
sync on) signs each of them in once (first sign-ins: a user row and 50 memberships to write), then each again
(repeat sign-ins: nothing changed). Each sign-in is the whole browser flow, from a fresh cookie jar: start ->
GitLab authorize -> GitLab's sign-in form -> authorize -> callback (code exchange, user, groups, provisioning,
session) -> the cookie. The load comes from this process, 16 sign-ins at a time. Sign-ins/s moves with whatever
shares the cores (the stand-in, PostgreSQL and this client use them too); the gateway's CPU per sign-in does not.
"""

from __future__ import annotations

import asyncio
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
         profile: str = "") -> tuple[dict[str, Result], str]:
    """The two rows as run.Result objects (rps = sign-ins/s, latency of a whole sign-in, CPU = the gateway's),
    and the py-spy summary of the gateway during the row named `profile` (if one is)."""
    from run import LABELS, Result, cpu_seconds, free_port, gateway_config, summarize_profile, wait_port, wait_ready

    port = free_port()
    ready = workdir / f"standin-{port}.ready"
    standin = procs.start([sys.executable, __file__, "--standin", str(port), str(users), str(ready)],
                          f"signin-standin-{port}")
    deadline = time.monotonic() + 180
    while not ready.exists():
        if standin.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("the sign-in stand-in did not start")
        time.sleep(0.1)
    wait_port(port, standin, "stand-in")
    gitlab = f"http://127.0.0.1:{port}"
    path, public, admin = gateway_config(
        workdir, "gateway-signin", dsn=dsn, upstream=upstream, workers=1,
        extra={"gitlab": {"url": gitlab, "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}})
    repo = Path(__file__).resolve().parents[1]
    gw = procs.start([sys.executable, "-m", "gateway", "run", "--no-migrate", "-c", str(path)],
                     "gateway-signin", cwd=repo)
    wait_ready(admin, gw)
    gateway = f"http://127.0.0.1:{public}"
    out: dict[str, Result] = {}
    summary = ""
    logins = [f"u{uid}" for uid in range(1, users + 1)]
    asyncio.run(sign_in(gateway, gitlab, logins[0]))  # warm-up (a first sign-in, repeated below)
    for name in ("signin-first", "signin-repeat"):
        spy = None
        if name == profile:
            spy = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(gw.pid),
                                    "--rate", "250", "--format", "raw", "--nonblocking", "--output",
                                    str(workdir / f"{name}.profile")],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1)  # py-spy attached
        before = cpu_seconds([gw])
        wall, durations = asyncio.run(sign_in_all(gateway, gitlab, logins[1:] if name == "signin-first" else logins))
        cpu = cpu_seconds([gw]) - before
        if spy is not None:
            spy.send_signal(signal.SIGINT)  # py-spy writes what it recorded and exits
            spy.wait(timeout=30)
            summary = f"py-spy, {LABELS[name]}, the gateway:\n" + summarize_profile(workdir / f"{name}.profile")
        ms = sorted(d * 1000 for d in durations)
        r = out[name] = Result(rps=len(durations) / wall, p50_ms=statistics.median(ms),
                               p99_ms=ms[min(len(ms) - 1, int(len(ms) * 0.99))], errors=0,
                               requests=len(durations), cpu_us=cpu / len(durations) * 1e6)
        print(f"  {name:<36} {r.rps:9.1f} sign-ins/s  p50 {r.p50_ms:6.1f} ms  "
              f"gateway {cpu / len(durations) * 1e3:5.2f} ms CPU/sign-in", file=sys.stderr, flush=True)
    procs.stop(gw)
    procs.stop(standin)
    return out, summary


if __name__ == "__main__":
    if sys.argv[1:2] == ["--standin"]:
        standin_main(int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
    else:
        # Otherwise: run.py's two sign-in rows, with any further run.py options.
        sys.exit(subprocess.call([sys.executable, str(Path(__file__).with_name("run.py")),
                                  "--only", "signin-first,signin-repeat", *sys.argv[1:]]))
