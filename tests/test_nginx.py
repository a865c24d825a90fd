"""auth_request mode (SPEC §2) through a real nginx with the shipped deploy/nginx configuration.

browser -> nginx -> echo upstream, nginx asking the gateway's /oauth2/auth for every request and proxying
/oauth2/* to it. The configs are used as shipped, with only their literal addresses substituted.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from conftest import Gateway, echoed_headers
from yarl import URL

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "nginx"

pytestmark = [
    pytest.mark.nginx,
    pytest.mark.skipif(NGINX is None, reason="nginx is not installed (Debian: apt-get install nginx-light)"),
]


@contextlib.contextmanager
def run_nginx(server_conf: str, *, nginx_port: int, gateway: str, upstream: str,
              more: dict[str, str] | None = None) -> Iterator[str]:
    """nginx in the foreground from a temporary prefix, with deploy/nginx/<server_conf> as its server;
    `more` maps other literal addresses of that file to the ones to use."""
    assert NGINX is not None
    prefix = Path(tempfile.mkdtemp(prefix="gateway-nginx-test-"))
    prefix.chmod(0o755)  # started as root, nginx's workers run as nobody and must enter the prefix
    proc: subprocess.Popen[bytes] | None = None
    log = (prefix / "stderr.log").open("wb")
    try:
        shutil.copy(DEPLOY / "nginx.test.conf", prefix / "nginx.conf")
        shutil.copy(DEPLOY / "auth_request_cache.conf", prefix / "auth_request_cache.conf")
        text = (DEPLOY / server_conf).read_text()
        for literal in ("127.0.0.1:4180", "127.0.0.1:8080", "listen 8000;", *(more or {})):
            assert literal in text, f"{server_conf} no longer contains {literal!r}"
        text = (text.replace("127.0.0.1:4180", gateway).replace("127.0.0.1:8080", upstream)
                .replace("listen 8000;", f"listen 127.0.0.1:{nginx_port};"))
        for literal, address in (more or {}).items():
            text = text.replace(literal, address)
        (prefix / "auth_request.conf").write_text(text)
        conf = ["-p", str(prefix), "-c", str(prefix / "nginx.conf")]
        check = subprocess.run([NGINX, "-t", *conf], capture_output=True, text=True, check=False)
        assert check.returncode == 0, check.stderr
        proc = subprocess.Popen([NGINX, *conf], stderr=log)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", nginx_port), timeout=0.2).close()
                break
            except OSError:
                assert proc.poll() is None, (prefix / "stderr.log").read_text()
                assert time.monotonic() < deadline, "nginx did not start listening"
                time.sleep(0.05)
        yield f"http://127.0.0.1:{nginx_port}"
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
        shutil.rmtree(prefix, ignore_errors=True)


@pytest.mark.parametrize("server_conf", ["auth_request.conf", "auth_request_cached.conf"])
async def test_the_whole_flow_through_nginx(gateway_factory, upstream, unused_tcp_port_factory, server_conf):
    nginx_port = unused_tcp_port_factory()
    nginx_url = f"http://127.0.0.1:{nginx_port}"
    # What the browser sees is nginx: the OAuth callback goes through it, and nginx is a trusted proxy.
    gw = await gateway_factory(server={"public_url": nginx_url, "trusted_proxies": ["127.0.0.1/32"]})
    gw.fake.add_user(10, "alice", email="alice@example.com")
    gateway = URL(gw.public_url).raw_authority
    with run_nginx(server_conf, nginx_port=nginx_port, gateway=gateway, upstream=URL(upstream).raw_authority):
        via_nginx: Gateway = dataclasses.replace(gw, public_url=nginx_url)
        async with via_nginx.browser() as b:
            # Signed out: the browser is sent to sign in, with the exact path+query to come back to.
            r = await b.get("/page?a=1&b=x%26y")
            assert r.status == 302
            location = URL(r.headers["Location"])
            assert location.path == "/oauth2/start" and location.query["rd"] == "/page?a=1&b=x%26y"
            # An API client gets the same sign-in redirect (the shipped config forces it) and no upstream.
            async with aiohttp.ClientSession() as api, api.post(nginx_url + "/api/x", data=b"{}",
                                                                allow_redirects=False) as r:
                assert r.status == 302

            # Signing in happens through nginx too (start, callback and the cookie all on nginx's origin).
            r = await b.sign_in("alice", rd="/page?a=1")
            assert r.headers["Location"] == "/page?a=1"
            r = await b.get("/page?a=1", headers={
                "X-Forwarded-User": "mallory", "X-Auth-Request-User": "mallory",
                "X-Forwarded-Groups": "admins", "X-Auth-Request-Groups": "admins"})
            assert r.status == 200
            payload = await r.json()
            assert payload["path"] == "/page?a=1"
            h = echoed_headers(payload)
            assert h["x-forwarded-user"] == ["alice"]
            assert h["x-forwarded-email"] == ["alice@example.com"]
            assert h["x-forwarded-groups"] == ["gateway-users"]
            assert "x-auth-request-user" not in h and "x-auth-request-groups" not in h

            # /oauth2/userinfo is the gateway's, reached through nginx.
            r = await b.get("/oauth2/userinfo")
            assert r.status == 200 and (await r.json())["user"] == "alice"

            # Sign-out: the cookie goes, and so does access (with the cache too: the key was the cookie).
            r = await b.get("/oauth2/sign_out?rd=/bye")
            assert r.status == 302 and r.headers["Location"] == "/bye"
            r = await b.get("/page?a=1")
            assert r.status == 302
            assert URL(r.headers["Location"]).path == "/oauth2/start"


@pytest.mark.parametrize("server_conf", ["auth_request.conf", "auth_request_cached.conf"])
async def test_a_bearer_token_through_nginx(gateway_factory, upstream, unused_tcp_port_factory, server_conf):
    """SPEC §14 in auth_request mode: the token is judged by /oauth2/auth on every request (never from the
    cache), its Authorization header never reaches the tool, and a tool's own Authorization passes."""
    nginx_port = unused_tcp_port_factory()
    nginx_url = f"http://127.0.0.1:{nginx_port}"
    gw = await gateway_factory(server={"public_url": nginx_url, "trusted_proxies": ["127.0.0.1/32"]},
                               tokens={"enabled": True})
    gw.fake.add_user(10, "alice", email="alice@example.com")
    gateway = URL(gw.public_url).raw_authority
    with run_nginx(server_conf, nginx_port=nginx_port, gateway=gateway, upstream=URL(upstream).raw_authority):
        via_nginx: Gateway = dataclasses.replace(gw, public_url=nginx_url)
        async with via_nginx.browser() as b:
            await b.sign_in("alice", rd="/")
            cookie = b.cookie("_gateway")
        async with gw.admin() as admin:
            r = await admin.post("/api/v1/tokens", json={"login": "alice", "name": "ci"})
            made = await r.json()
        bearer = {"Authorization": f"Bearer {made['token']}"}
        async with aiohttp.ClientSession() as http:
            for _ in range(2):
                async with http.get(nginx_url + "/data", headers=bearer, allow_redirects=False) as r:
                    assert r.status == 200
                    h = echoed_headers(await r.json())
                assert h["x-forwarded-user"] == ["alice"] and "authorization" not in h
            async with http.get(nginx_url + "/data", headers={"Authorization": "Basic dG9vbDpvd24=",
                                                              "Cookie": f"_gateway={cookie}"}) as r:
                assert r.status == 200
                assert echoed_headers(await r.json())["authorization"] == ["Basic dG9vbDpvd24="]
            # Cookie and token together: answered for the token, so a revoked token is refused at once even
            # when the cookie's answer is cached.
            both = {**bearer, "Cookie": f"_gateway={cookie}"}
            async with http.get(nginx_url + "/data", headers=both, allow_redirects=False) as r:
                assert r.status == 200
            async with gw.admin() as admin:
                assert (await admin.delete(f"/api/v1/tokens/{made['id']}")).status == 204
            for _ in range(250):
                async with http.get(nginx_url + "/data", headers=both, allow_redirects=False) as r:
                    if r.status != 200:
                        break
                await asyncio.sleep(0.02)
            assert r.status in (302, 401)


async def test_a_renewed_cache_entry_is_read_from_its_new_file(gateway_factory, upstream, unused_tcp_port_factory):
    """auth_request_cached.conf keeps its entries' files open (open_file_cache): once an entry expires and the
    gateway's new answer replaces it, the following hits serve the new answer, never the old file's."""
    nginx_port = unused_tcp_port_factory()
    nginx_url = f"http://127.0.0.1:{nginx_port}"
    gw = await gateway_factory(server={"public_url": nginx_url, "trusted_proxies": ["127.0.0.1/32"]})
    gw.fake.add_user(10, "alice", email="alice@example.com")
    gateway = URL(gw.public_url).raw_authority
    with run_nginx("auth_request_cached.conf", nginx_port=nginx_port, gateway=gateway,
                   upstream=URL(upstream).raw_authority):
        via_nginx: Gateway = dataclasses.replace(gw, public_url=nginx_url)
        async with via_nginx.browser() as b:
            await b.sign_in("alice", rd="/")

            async def groups() -> list[str]:
                r = await b.http.get(nginx_url + "/page", allow_redirects=False)
                assert r.status == 200
                return echoed_headers(await r.json())["x-forwarded-groups"]

            assert await groups() == ["gateway-users"]
            assert await groups() == ["gateway-users"]  # from the cache
            async with gw.admin() as admin:
                r = await admin.post("/api/v1/groups", json={"name": "ops"})
                group = await r.json()
                r = await admin.post(f"/api/v1/groups/{group['id']}/members", json={"login": "alice"})
                assert r.status == 201
            await asyncio.sleep(6.2)  # the 5 s entry has expired (nginx counts whole seconds)
            for _ in range(3):  # the new answer, then twice from the entry that replaced the old one
                assert await groups() == ["gateway-users,ops"]


async def test_the_auth_cache_keeps_each_answer_with_its_session(gateway_factory, upstream, unused_tcp_port_factory):
    """auth_request_cached.conf: an answer nginx remembers only ever serves the session cookie it was asked for
    (two users taking turns and at once, requests without a cookie or with an Authorization header beside the
    cookie, a Cookie header naming two sessions), and a revoked session stops working through the cache within
    the bound its comment states (5 s, at worst just under 6), while the gateway itself refuses it at once."""
    nginx_port = unused_tcp_port_factory()
    nginx_url = f"http://127.0.0.1:{nginx_port}"
    gw = await gateway_factory(server={"public_url": nginx_url, "trusted_proxies": ["127.0.0.1/32"]})
    gw.fake.add_user(10, "alice", email="alice@example.com")
    gw.fake.add_user(11, "bob", email="bob@example.com")
    with run_nginx("auth_request_cached.conf", nginx_port=nginx_port, gateway=URL(gw.public_url).raw_authority,
                   upstream=URL(upstream).raw_authority):
        via_nginx: Gateway = dataclasses.replace(gw, public_url=nginx_url)
        cookies = {}
        for login in ("alice", "bob"):
            async with via_nginx.browser() as b:
                await b.sign_in(login, rd="/")
                cookies[login] = f"_gateway={b.cookie('_gateway')}"

        async with aiohttp.ClientSession() as http:
            async def seen_as(headers: dict[str, str]) -> str:
                """Who the tool was told the request came from ("302" when nginx sent it to sign in)."""
                async with http.get(nginx_url + "/page", headers=headers, allow_redirects=False) as r:
                    if r.status != 200:
                        return str(r.status)
                    return ",".join(echoed_headers(await r.json()).get("x-forwarded-user", ["(none)"]))

            cases = [({"Cookie": cookies["alice"]}, "alice"), ({"Cookie": cookies["bob"]}, "bob"),
                     ({}, "302"), ({"Cookie": "_gateway="}, "302"),
                     ({"Cookie": cookies["alice"], "Authorization": "Basic dG9vbDpvd24="}, "alice"),
                     # nginx keys (and shows the gateway) the first _gateway cookie only.
                     ({"Cookie": f"{cookies['bob']}; {cookies['alice']}"}, "bob")]
            for _ in range(3):  # taking turns: the first round fills the cache, the others are hits
                assert [await seen_as(h) for h, _ in cases] == [who for _, who in cases]
            answers = await asyncio.gather(*(seen_as(h) for _ in range(10) for h, _ in cases))  # all at once
            assert answers == [who for _ in range(10) for _, who in cases]

            async with gw.admin() as admin:
                r = await admin.get("/api/v1/sessions", params={"login": "alice"})
                (session,) = (await r.json())["items"]
                assert (await admin.delete(f"/api/v1/sessions/{session['id']}")).status == 204
            revoked = time.monotonic()
            # The gateway: as soon as the revocation's NOTIFY reaches its LISTEN connection (the admin API answers
            # at its commit; SPEC: every replica within a second, given twice that on a loaded test machine).
            while True:
                async with http.get(gw.public_url + "/oauth2/auth", headers={"Cookie": cookies["alice"]}) as r:
                    if r.status == 401:
                        break
                    assert r.status == 202 and time.monotonic() - revoked < 2.0, r.status
                await asyncio.sleep(0.01)
            while (answer := await seen_as({"Cookie": cookies["alice"]})) == "alice":
                assert time.monotonic() - revoked < 8, "nginx kept answering for a revoked session past its bound"
                await asyncio.sleep(0.1)
            assert answer == "302"
            assert await seen_as({"Cookie": cookies["bob"]}) == "bob"
