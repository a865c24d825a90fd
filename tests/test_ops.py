"""Operations (SPEC §9): JSON logs without secrets, Prometheus metrics, graceful shutdown of `gateway run`."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import math
import re
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from conftest import ADMIN_TOKEN, CLIENT_SECRET, SESSION_KEY

from gateway import logs
from gateway.logs import JsonFormatter, TextFormatter, scrub
from gateway.metrics import Metrics

ROOT = Path(__file__).resolve().parents[1]
SPEC_METRICS = {
    "gateway_requests_total": "counter",
    "gateway_request_duration_seconds": "histogram",
    "gateway_upstream_duration_seconds": "histogram",
    "gateway_logins_total": "counter",
    "gateway_group_sync_changes_total": "counter",
    "gateway_gitlab_requests_total": "counter",
    "gateway_sessions_active": "gauge",
}


# ---- helpers ---------------------------------------------------------------------------------------------

@contextmanager
def json_log_capture(level: str = "debug") -> Iterator[io.StringIO]:
    """Every log line, configured and formatted exactly as `gateway run` does (logs.setup), into a buffer."""
    buffer = io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:], root.level, {name: logging.getLogger(name).level for name in logs.QUIET}
    logs.setup(level, "json", stream=buffer)
    try:
        yield buffer
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
        for name, old in saved[2].items():
            logging.getLogger(name).setLevel(old)


async def sign_in_capturing(b, login: str) -> dict[str, str]:
    """The browser flow of conftest.Browser.sign_in, keeping the values that must never be logged."""
    gw = b.gw
    r = await b.http.get(f"{gw.public_url}/oauth2/start", params={"rd": "/hello"}, allow_redirects=False)
    assert r.status == 302
    r = await b.http.get(r.headers["Location"], allow_redirects=False)
    sign_in_url = r.headers["Location"]
    if sign_in_url.startswith("/"):
        sign_in_url = gw.fake_url + sign_in_url
    redirect_to = parse_qs(urlsplit(sign_in_url).query)["redirect_to"][0]
    r = await b.http.post(f"{gw.fake_url}/users/sign_in", data={"username": login, "redirect_to": redirect_to},
                          allow_redirects=False)
    nxt = r.headers["Location"]
    r = await b.http.get(nxt if nxt.startswith("http") else gw.fake_url + nxt, allow_redirects=False)
    callback = r.headers["Location"]
    query = parse_qs(urlsplit(callback).query)
    r = await b.http.get(callback, allow_redirects=False)
    assert r.status == 302, await r.text()
    return {"code": query["code"][0], "state": query["state"][0]}


Sample = tuple[str, tuple[tuple[str, str], ...]]

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_SAMPLE = re.compile(rf"^({_NAME})(?:\{{(.*)\}})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"(,|$)')


def parse_prometheus(text: str) -> tuple[dict[str, str], dict[Sample, float]]:
    """A strict reader of the text format 0.0.4: (family -> type, (name, labels) -> value). Fails on anything
    malformed: unknown line shapes, samples before their TYPE, duplicate samples, non-monotonic buckets."""
    assert text.endswith("\n"), "the exposition must end with a newline"
    types: dict[str, str] = {}
    helps: set[str] = set()
    samples: dict[Sample, float] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name = line.split(" ", 3)[2]
            assert name not in helps, f"second HELP for {name}"
            helps.add(name)
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert re.fullmatch(_NAME, name) and kind in ("counter", "gauge", "histogram", "summary", "untyped")
            assert name not in types, f"second TYPE for {name}"
            types[name] = kind
            continue
        assert line and not line.startswith("#"), f"unexpected line {line!r}"
        m = _SAMPLE.match(line)
        assert m, f"malformed sample {line!r}"
        name, raw_labels, value = m.groups()
        labels: list[tuple[str, str]] = []
        if raw_labels:
            pos = 0
            while pos < len(raw_labels):
                lm = _LABEL.match(raw_labels, pos)
                assert lm, f"malformed labels in {line!r}"
                labels.append((lm.group(1), lm.group(2)))
                pos = lm.end()
        family = re.sub(r"_(bucket|sum|count)$", "", name) if name not in types else name
        assert family in types, f"sample {name} before its TYPE"
        key = (name, tuple(sorted(labels)))
        assert key not in samples, f"duplicate sample {line!r}"
        samples[key] = float(value)  # raises on a non-number
    for family, kind in types.items():
        if kind != "histogram":
            continue
        buckets = sorted(((math.inf if dict(lb)["le"] == "+Inf" else float(dict(lb)["le"])), v)
                         for (n, lb), v in samples.items() if n == f"{family}_bucket")
        counts = [v for _, v in buckets]
        assert counts == sorted(counts), f"{family} buckets are not cumulative"
        assert buckets and buckets[-1][0] == math.inf, f"{family} has no +Inf bucket"
        assert buckets[-1][1] == samples[(f"{family}_count", ())]
    return types, samples


def value(samples: dict[Sample, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: dict[Sample, float], name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


async def scrape(gw) -> dict[Sample, float]:
    async with aiohttp.ClientSession() as http:
        r = await http.get(f"{gw.admin_url}/metrics")
        assert r.status == 200 and r.content_type == "text/plain"
        types, samples = parse_prometheus(await r.text())
    for name, kind in SPEC_METRICS.items():
        assert types.get(name) == kind, f"{name} should be a {kind}"
    return samples


# ---- logs --------------------------------------------------------------------------------------------------

async def test_logs_are_json_lines_without_secrets(gateway_factory, db):
    gw = await gateway_factory()
    gw.fake.add_user(10, "alice", name="Alice", email="alice@example.com")
    with json_log_capture() as buffer:
        async with gw.browser() as b:
            caught = await sign_in_capturing(b, "alice")
            cookie = b.cookie(gw.config.session.cookie_name)
            assert cookie
            r = await b.get("/hello?token=not-a-secret")
            assert r.status == 200
            r = await b.get("/oauth2/userinfo", headers={"Accept": "application/json"})
            assert r.status == 200
            async with gw.admin() as admin:
                r = await admin.get("/api/v1/users")
                assert r.status in (200, 404)  # the admin API may be elsewhere in progress; the token is what counts
                r = await admin.get("/metrics")
                assert r.status == 200
            r = await b.get("/oauth2/sign_out")
            assert r.status == 302
        async with aiohttp.ClientSession() as anon:  # a wrong admin token must not be echoed either
            r = await anon.get(f"{gw.admin_url}/api/v1/users",
                               headers={"Authorization": "Bearer wrong-token-0123456789abcdef"})
            assert r.status == 401
    lines = buffer.getvalue().splitlines()
    assert lines, "nothing was logged"
    secrets = {
        "client secret": CLIENT_SECRET, "session cookie": cookie, "authorization code": caught["code"],
        "oauth state": caught["state"], "admin token": ADMIN_TOKEN, "session key": SESSION_KEY,
        "wrong admin token": "wrong-token-0123456789abcdef",
    }
    tokens = gw.fake.issued_tokens()
    assert tokens, "the fake GitLab issued no token"
    for t in tokens:
        secrets[f"access token of user {t.user_id}"] = t.access_token
        secrets[f"refresh token of user {t.user_id}"] = t.refresh_token
    access = []
    for line in lines:
        for what, secret in secrets.items():
            assert secret not in line, f"the {what} leaked into a log line: {line}"
        event = json.loads(line)  # one JSON object per line
        assert {"time", "level", "event"} <= event.keys(), line
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", event["time"])
        if event.get("logger") == "gateway.access":
            access.append(event)
    assert access, "no access log lines"
    for event in access:
        assert {"request_id", "user", "status", "duration_ms", "method", "path"} <= event.keys(), event
        assert isinstance(event["status"], int) and event["duration_ms"] >= 0
    proxied = [e for e in access if e["path"] == "/hello"]
    assert proxied and proxied[0]["user"] == "alice" and proxied[0]["status"] == 200
    assert all("?" not in e["path"] for e in access), "queries (which may carry codes) are not logged"
    signed_in = [json.loads(line) for line in lines if '"signed in"' in line]
    assert signed_in and signed_in[0]["user"] == "alice", "the sign-in itself is logged"
    callback = [e for e in access if e["path"] == "/oauth2/callback"]
    assert signed_in[0]["request_id"] == callback[0]["request_id"], "lines of one request share its id"
    ids = [e["request_id"] for e in access]
    assert len(set(ids)) == len(ids), "every request gets its own id"


def test_formatters_redact_secret_fields_and_credentials():
    record = logging.makeLogRecord({
        "name": "t", "levelno": logging.INFO, "levelname": "INFO",
        "msg": "connect postgresql://gw:hunter2secret@db:5432/gw with Bearer abcdefghijklmnop",
        "access_token": "glpat-xyz", "Authorization": "Bearer zzz", "user": "alice", "status": 200,
    })
    line = JsonFormatter().format(record)
    event = json.loads(line)
    assert "hunter2secret" not in line and "glpat-xyz" not in line and "abcdefghijklmnop" not in line
    assert event["access_token"] == "[redacted]" and event["Authorization"] == "[redacted]"
    assert event["user"] == "alice" and event["status"] == 200
    assert "postgresql://gw:[redacted]@db:5432/gw" in event["event"]
    text = TextFormatter().format(record)
    assert "hunter2secret" not in text and "glpat-xyz" not in text and "user=alice" in text
    assert scrub("https://example.com/a:b@c") == "https://example.com/a:b@c"  # not userinfo: left alone
    assert scrub("GET /oauth2/callback?code=abc123&state=xyz789 HTTP/1.1") == (
        "GET /oauth2/callback?code=[redacted]&state=[redacted] HTTP/1.1")
    assert scrub("/search?q=code=1&page=2") == "/search?q=code=1&page=2"


# ---- metrics -----------------------------------------------------------------------------------------------

async def test_metrics_change_after_a_sign_in(gateway_factory, db):
    gw = await gateway_factory()
    gw.fake.add_user(10, "alice", name="Alice", email="alice@example.com")
    gw.fake.add_group(500, "acme")
    gw.fake.add_member("alice", "acme")
    await db.execute("INSERT INTO groups (name) VALUES ('acme')")
    before = await scrape(gw)
    assert value(before, "gateway_sessions_active") == 0
    async with gw.browser() as b:
        await b.sign_in("alice", rd="/hello")
        r = await b.get("/hello")
        assert r.status == 200
        after = await scrape(gw)
        assert value(after, "gateway_sessions_active") == 1
    assert value(after, "gateway_logins_total", result="success") == value(before, "gateway_logins_total",
                                                                           result="success") + 1
    assert value(after, "gateway_group_sync_changes_total", op="add") == 1
    assert value(after, "gateway_requests_total", code="302") >= value(before, "gateway_requests_total",
                                                                       code="302") + 2  # start, callback
    assert value(after, "gateway_requests_total", code="200") > value(before, "gateway_requests_total", code="200")
    assert value(after, "gateway_request_duration_seconds_count") > value(before,
                                                                          "gateway_request_duration_seconds_count")
    assert value(after, "gateway_upstream_duration_seconds_count") == value(
        before, "gateway_upstream_duration_seconds_count") + 1
    gitlab_calls = {dict(labels)["endpoint"]: v for (n, labels), v in after.items()
                    if n == "gateway_gitlab_requests_total" and dict(labels)["code"] == "200"}
    assert gitlab_calls and total(after, "gateway_gitlab_requests_total") > total(before,
                                                                                  "gateway_gitlab_requests_total")
    assert any("token" in e for e in gitlab_calls) and any("user" in e for e in gitlab_calls), gitlab_calls

    # A refusal counts under its own result.
    gw.fake.add_user(11, "carol", name="Carol", email="carol@example.com")
    gw.fake.set_user_state("carol", "blocked")
    async with gw.browser() as b:
        await b.sign_in("carol", expect_status=403)
    refused = await scrape(gw)
    failures = {dict(lb)["result"]: v for (n, lb), v in refused.items() if n == "gateway_logins_total"}
    assert failures.get("success") == 1 and sum(failures.values()) == 2, failures


def test_metrics_text_declares_every_family_and_escapes_labels():
    m = Metrics()
    types, samples = parse_prometheus(m.render())  # before any sample: declared, empty, still valid
    assert {n: types[n] for n in SPEC_METRICS} == SPEC_METRICS
    assert value(samples, "gateway_request_duration_seconds_count") == 0
    m.login('odd"result\\with\nnewline')
    m.request(200, 0.003)
    m.request(200, 7.0)
    _, samples = parse_prometheus(m.render())
    assert value(samples, "gateway_logins_total", result='odd\\"result\\\\with\\nnewline') == 1
    assert value(samples, "gateway_request_duration_seconds_bucket", le="0.005") == 1
    assert value(samples, "gateway_request_duration_seconds_bucket", le="+Inf") == 2
    assert value(samples, "gateway_request_duration_seconds_sum") == pytest.approx(7.003)


# ---- graceful shutdown ---------------------------------------------------------------------------------------

async def wait_ready(admin_url: str, proc: asyncio.subprocess.Process, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            if proc.returncode is not None:
                raise AssertionError(f"gateway run exited {proc.returncode}")
            try:
                r = await http.get(f"{admin_url}/readyz")
                if r.status == 200:
                    return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError("gateway run did not become ready")


async def test_sigterm_finishes_in_flight_requests_then_refuses(write_config, upstream, unused_tcp_port_factory):
    public_port, admin_port = unused_tcp_port_factory(), unused_tcp_port_factory()
    config = write_config(
        server={"listen": f"127.0.0.1:{public_port}", "public_url": f"http://127.0.0.1:{public_port}"},
        admin={"listen": f"127.0.0.1:{admin_port}"}, upstream={"url": upstream, "timeout": "10s"},
        routes={"public": ["^/_upstream/"]}, log={"level": "info", "format": "json"})
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "run", "-c", str(config), cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    public = f"http://127.0.0.1:{public_port}"
    try:
        await wait_ready(f"http://127.0.0.1:{admin_port}", proc)
        async with aiohttp.ClientSession() as http:
            slow = asyncio.create_task(http.get(f"{public}/_upstream/slow?s=2"))
            await asyncio.sleep(0.5)  # the request is now waiting on the upstream
            assert not slow.done()
            proc.send_signal(signal.SIGTERM)
            # New connections are refused while the in-flight request is still being answered.
            deadline = time.monotonic() + 1.2
            while True:
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", public_port)
                except OSError:
                    break
                writer.close()
                await writer.wait_closed()
                assert time.monotonic() < deadline, "the public listener still accepts after SIGTERM"
                await asyncio.sleep(0.05)
            assert not slow.done()
            r = await slow
            assert r.status == 200
            assert (await r.json())["path"] == "/_upstream/slow?s=2"
        code = await asyncio.wait_for(proc.wait(), 10)
        _, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert code == 0, err.decode()
    events = [json.loads(line) for line in err.decode().splitlines()]  # every line is a JSON object
    finished = [e for e in events if e.get("logger") == "gateway.access" and e.get("path") == "/_upstream/slow"]
    assert finished and finished[0]["status"] == 200 and finished[0]["duration_ms"] >= 1900
    assert any(e["event"].startswith("shutting down") for e in events)

