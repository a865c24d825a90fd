"""Run the auth_request nginx configs in a real nginx against stand-ins, and check what users would see.

    python3 deploy/nginx/selftest.py [--nginx /usr/sbin/nginx]

For each of auth_request.conf and auth_request_cached.conf: copy it with nginx.test.conf and
auth_request_cache.conf into a temporary prefix, substitute free ports for the literal 127.0.0.1:4180,
127.0.0.1:8080 and `listen 8000;`, run `nginx -t`, start nginx, and send requests. The gateway stand-in
answers /oauth2/auth like SPEC §4 (202 + X-Auth-Request-* for a known `_gateway` cookie, 403 for the
"outsider" cookie, 401 otherwise, always Cache-Control: no-store) and, like the real catch-all, redirects
signed-out browser GETs to /oauth2/start?rd=<percent-encoded path+query>. The upstream stand-in echoes the
headers it received. Exit 0 when every check passes; needs only the standard library and nginx.
"""

from __future__ import annotations

import argparse
import http.client
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote, unquote

HERE = Path(__file__).resolve().parent
SESSIONS = {
    "alice-session": ("alice", "alice@example.com", "gateway-users,team-a"),
    "carol-session": ("carol", "carol@example.com", "gateway-users"),
    "dave-session": ("dave", "dave@example.com", "gateway-users"),
    "erin-session": ("erin", "erin@example.com", "gateway-users"),
    "outsider-session": None,  # signed in, but not in the ?allowed_groups: 403
}


def cookie(header: str | None, name: str) -> str | None:
    for part in (header or "").split(";"):
        key, sep, value = part.strip().partition("=")
        if sep and key == name:
            return value
    return None


class Recorder:
    """What the stand-ins saw, shared with the checks."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: list[tuple[str, str, str, dict[str, list[str]]]] = []  # (who, method, path, headers)

    def add(self, who: str, handler: BaseHTTPRequestHandler) -> dict[str, list[str]]:
        headers: dict[str, list[str]] = {}
        for name, value in handler.headers.items():
            headers.setdefault(name.lower(), []).append(value)
        with self.lock:
            self.requests.append((who, handler.command, handler.path, headers))
        return headers

    def hits(self, who: str, path_prefix: str = "") -> list[tuple[str, str, dict[str, list[str]]]]:
        with self.lock:
            return [(m, p, h) for w, m, p, h in self.requests if w == who and p.startswith(path_prefix)]

    def clear(self) -> None:
        with self.lock:
            self.requests.clear()


def make_gateway(rec: Recorder) -> type[BaseHTTPRequestHandler]:
    class Gateway(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # quiet
            pass

        def reply(self, status: int, headers: dict[str, str] | None = None, body: bytes = b"") -> None:
            self.send_response(status)
            for k, v in {"Cache-Control": "no-store", **(headers or {})}.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def handle_any(self) -> None:
            headers = rec.add("gateway", self)
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            value = cookie(self.headers.get("Cookie"), "_gateway") or ""
            known = value in SESSIONS
            identity = SESSIONS.get(value)
            path = self.path.split("?", 1)[0]
            if path == "/oauth2/auth":
                if not known:
                    self.reply(401)
                elif identity is None:
                    self.reply(403)
                else:
                    user, email, groups = identity
                    self.reply(202, {"X-Auth-Request-User": user, "X-Auth-Request-Email": email,
                                     "X-Auth-Request-Preferred-Username": user,
                                     "X-Auth-Request-Groups": groups})
            elif path.startswith("/oauth2/"):
                self.reply(200, {"Content-Type": "application/json"},
                           json.dumps({"path": self.path, "headers": headers}).encode())
            elif (not known and self.command in ("GET", "HEAD")
                  and "text/html" in self.headers.get("Accept", "")):
                self.reply(302, {"Location": "/oauth2/start?rd=" + quote(self.path, safe="")})
            else:
                self.reply(401, {"Content-Type": "application/json"}, b'{"error":"unauthenticated"}')

        do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = handle_any

    return Gateway


def make_upstream(rec: Recorder) -> type[BaseHTTPRequestHandler]:
    class Upstream(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def handle_any(self) -> None:
            headers = rec.add("upstream", self)
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            out = json.dumps({"method": self.command, "path": self.path, "headers": headers,
                              "body_length": len(body)}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = handle_any

    return Upstream


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def serve(handler: type[BaseHTTPRequestHandler], port: int) -> Iterator[None]:
    server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def nginx(binary: str, server_conf: str, ports: dict[str, int]) -> Iterator[int]:
    prefix = Path(tempfile.mkdtemp(prefix="gateway-nginx-"))
    prefix.chmod(0o755)  # workers run as "nobody" when this runs as root; they must enter the prefix
    proc: subprocess.Popen[bytes] | None = None
    try:
        shutil.copy(HERE / "nginx.test.conf", prefix / "nginx.conf")
        shutil.copy(HERE / "auth_request_cache.conf", prefix / "auth_request_cache.conf")
        text = (HERE / server_conf).read_text()
        for literal in ("127.0.0.1:4180", "127.0.0.1:8080", "listen 8000;"):
            assert literal in text, f"{server_conf} no longer contains {literal!r}"
        text = (text.replace("127.0.0.1:4180", f"127.0.0.1:{ports['gateway']}")
                .replace("127.0.0.1:8080", f"127.0.0.1:{ports['upstream']}")
                .replace("listen 8000;", f"listen 127.0.0.1:{ports['nginx']};"))
        (prefix / "auth_request.conf").write_text(text)
        conf = ["-p", str(prefix), "-c", str(prefix / "nginx.conf")]
        test = subprocess.run([binary, "-t", *conf], capture_output=True, text=True, check=False)
        print(f"  nginx -t ({server_conf}): rc={test.returncode}")
        for line in test.stderr.strip().splitlines():
            print(f"    {line}")
        if test.returncode != 0:
            raise SystemExit(f"nginx -t failed for {server_conf}")
        proc = subprocess.Popen([binary, *conf], stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", ports["nginx"]), timeout=0.2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    err = proc.stderr.read().decode() if proc.stderr else ""
                    raise SystemExit(f"nginx did not start: {err}") from None
                time.sleep(0.05)
        yield ports["nginx"]
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(prefix, ignore_errors=True)


class Checks:
    def __init__(self) -> None:
        self.failed: list[str] = []

    def check(self, ok: bool, what: str, detail: object = "") -> None:
        print(f"  [{'ok' if ok else 'FAIL'}] {what}" + ("" if ok else f": {detail}"))
        if not ok:
            self.failed.append(what)


def request(port: int, method: str, path: str, headers: list[tuple[str, str]] | None = None,
            body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.putrequest(method, path, skip_accept_encoding=True)
    for name, value in headers or []:  # putheader, not a dict: duplicates and odd spellings go out as given
        conn.putheader(name, value)
    if body is not None:
        conn.putheader("Content-Length", str(len(body)))
    conn.endheaders(body)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data


def common_checks(c: Checks, rec: Recorder, port: int) -> None:
    rec.clear()
    target = "/some/page?a=1&b=x%26y&c=%2F+z"
    status, headers, _ = request(port, "GET", target)
    location = headers.get("location", "")
    c.check(status == 302 and location.startswith("/oauth2/start?rd="),
            "no cookie: 302 to /oauth2/start?rd=...", (status, location))
    rd = unquote(location.partition("?rd=")[2])
    c.check(rd == target, "rd decodes once to the exact original path+query (& and %-escapes kept)", rd)
    c.check(not rec.hits("upstream"), "no cookie: the upstream was not called", rec.hits("upstream"))

    status, headers, _ = request(port, "POST", "/api/items?x=1", [("Content-Type", "application/json")],
                                 b'{"big": "body"}')
    c.check(status == 302 and headers.get("location") == "/oauth2/start?rd=%2Fapi%2Fitems%3Fx%3D1",
            "no cookie, POST: same 302 (method forced to GET for the redirect)",
            (status, headers.get("location")))

    status, headers, _ = request(port, "GET", "/x", [("Cookie", "_gateway=forged-value")])
    c.check(status == 302, "unknown cookie: 302 to sign-in", status)
    signin = [h for m, p, h in rec.hits("gateway") if not p.startswith("/oauth2/")]
    c.check(bool(signin) and all("cookie" not in h and h.get("accept") == ["text/html"] for h in signin),
            "sign-in redirect request reaches the gateway without Cookie, with Accept: text/html", signin)

    rec.clear()
    status, _, body = request(port, "POST", "/app/save?q=1",
                              [("Cookie", "other=1; _gateway=alice-session"),
                               ("X-Forwarded-User", "mallory"), ("x-forwarded-user", "mallory2"),
                               ("X-FORWARDED-GROUPS", "admins"), ("X-Forwarded-Email", "m@evil"),
                               ("X-Forwarded-Preferred-Username", "mallory"),
                               ("X-Auth-Request-User", "mallory"), ("X-Auth-Request-Groups", "admins"),
                               ("X_Forwarded_User", "mallory")],
                              b"payload")
    seen = json.loads(body)["headers"] if status == 200 else {}
    c.check(status == 200, "alice's cookie: 200 from the upstream", status)
    c.check(seen.get("x-forwarded-user") == ["alice"], "upstream sees X-Forwarded-User: alice (only)",
            seen.get("x-forwarded-user"))
    c.check(seen.get("x-forwarded-email") == ["alice@example.com"]
            and seen.get("x-forwarded-preferred-username") == ["alice"]
            and seen.get("x-forwarded-groups") == ["gateway-users,team-a"],
            "upstream sees email, preferred username and groups from the gateway", seen)
    leaked = sorted(k for k in seen if k.startswith("x-auth-request-") or "_" in k)
    c.check(not leaked, "client's X-Auth-Request-* and X_Forwarded_User copies are dropped", leaked)
    auth = rec.hits("gateway", "/oauth2/auth")
    c.check(len(auth) == 1, "one auth subrequest", len(auth))
    if auth:
        method, _, h = auth[0]
        c.check(method == "GET" and h.get("x-original-uri") == ["/app/save?q=1"]
                and h.get("x-forwarded-uri") == ["/app/save?q=1"] and h.get("x-original-method") == ["POST"],
                "auth subrequest: GET with X-Original-URI/X-Forwarded-Uri/X-Original-Method of the original",
                h)
        c.check("content-length" not in h, "auth subrequest carries no body", h.get("content-length"))
    c.check(json.loads(body).get("body_length") == 7 if status == 200 else False,
            "the request body still reaches the upstream", body[:200])

    rec.clear()
    status, _, _ = request(port, "GET", "/", [("Cookie", "_gateway=outsider-session")])
    c.check(status == 403 and not rec.hits("upstream"), "gateway 403 -> client 403, upstream not called",
            status)

    status, _, body = request(port, "GET", "/oauth2/start?rd=%2Fx", [("X-Forwarded-For", "6.6.6.6")])
    seen = json.loads(body)["headers"] if status == 200 else {}
    c.check(status == 200 and seen.get("x-forwarded-for") == ["127.0.0.1"]
            and seen.get("x-forwarded-proto") == ["http"] and seen.get("x-real-ip") == ["127.0.0.1"],
            "/oauth2/start is proxied to the gateway; a client X-Forwarded-For is replaced, not appended",
            seen)


def cache_checks(c: Checks, rec: Recorder, port: int, cached: bool) -> None:
    rec.clear()
    for _ in range(3):  # erin: a session not seen before, so the first request cannot be a cache hit
        request(port, "GET", "/page", [("Cookie", "_gateway=erin-session")])
    n = len(rec.hits("gateway", "/oauth2/auth"))
    if cached:
        c.check(n == 1, "cached: 3 requests with one cookie -> 1 auth call (2nd and 3rd from the cache)", n)
    else:
        c.check(n == 3, "uncached: 3 requests -> 3 auth calls", n)
    users = [h.get("x-forwarded-user") for _, _, h in rec.hits("upstream")]
    c.check(users == [["erin"]] * 3, "identity headers identical on cache hits", users)
    if not cached:
        return

    rec.clear()
    status, _, body = request(port, "GET", "/page", [("Cookie", "_gateway=carol-session")])
    seen = json.loads(body)["headers"] if status == 200 else {}
    c.check(seen.get("x-forwarded-user") == ["carol"] and len(rec.hits("gateway", "/oauth2/auth")) == 1,
            "another cookie is another cache entry (carol is carol, not alice)", seen.get("x-forwarded-user"))

    rec.clear()
    for _ in range(2):
        request(port, "GET", "/page")
        request(port, "GET", "/page", [("Cookie", "_gateway=forged-value")])
        request(port, "GET", "/page", [("Cookie", "_gateway=outsider-session")])
    c.check(len(rec.hits("gateway", "/oauth2/auth")) == 6, "401 and 403 answers are never cached",
            len(rec.hits("gateway", "/oauth2/auth")))

    rec.clear()
    for _ in range(2):  # erin's 202 is in the cache, but an Authorization header (a token) is judged every time
        request(port, "GET", "/page", [("Cookie", "_gateway=erin-session"), ("Authorization", "Basic dG9vbDpvd24=")])
    c.check(len(rec.hits("gateway", "/oauth2/auth")) == 2, "a request with an Authorization header bypasses the cache",
            len(rec.hits("gateway", "/oauth2/auth")))

    rec.clear()
    request(port, "GET", "/page", [("Cookie", "_gateway=dave-session; _GATEWAY=x; _gateway=alice-session")])
    auth = rec.hits("gateway", "/oauth2/auth")
    c.check(len(auth) == 1 and auth[0][2].get("cookie") == ["_gateway=dave-session"],
            "the gateway is shown only the cookie the cache key uses", [h.get("cookie") for _, _, h in auth])

    # nginx counts validity in whole seconds: an entry stored at t lives until ceil-ish(t) + 5, at most 6 s.
    rec.clear()
    time.sleep(6.2)
    request(port, "GET", "/page", [("Cookie", "_gateway=erin-session")])
    c.check(len(rec.hits("gateway", "/oauth2/auth")) == 1, "after 6 s the entry has expired: asked again",
            len(rec.hits("gateway", "/oauth2/auth")))


def same_server(c: Checks) -> None:
    def body(name: str) -> list[str]:
        lines, skipping = [], False
        for line in (HERE / name).read_text().splitlines():
            if line.strip().startswith("# >>> auth cache"):
                skipping = True
            elif line.strip().startswith("# <<< auth cache"):
                skipping = False
            elif not skipping and line.strip() and not line.lstrip().startswith("#"):
                lines.append(line)
        return lines

    c.check(body("auth_request.conf") == body("auth_request_cached.conf"),
            "auth_request_cached.conf = auth_request.conf + the marked cache block")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--nginx", default=shutil.which("nginx") or "/usr/sbin/nginx")
    args = parser.parse_args()
    # SIGTERM (a test runner's timeout) unwinds like Ctrl-C, so nginx is stopped and the prefix removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    c = Checks()
    same_server(c)
    rec = Recorder()
    ports = {"gateway": free_port(), "upstream": free_port(), "nginx": free_port()}
    with serve(make_gateway(rec), ports["gateway"]), serve(make_upstream(rec), ports["upstream"]):
        for conf, cached in (("auth_request.conf", False), ("auth_request_cached.conf", True)):
            print(f"{conf}:")
            with nginx(args.nginx, conf, ports) as port:
                common_checks(c, rec, port)
                cache_checks(c, rec, port, cached)
    print("all checks passed" if not c.failed else f"{len(c.failed)} check(s) FAILED")
    return 1 if c.failed else 0


if __name__ == "__main__":
    sys.exit(main())
