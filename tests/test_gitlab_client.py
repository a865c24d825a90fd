"""gateway.gitlab against real in-process servers: the fake GitLab for GitLab's behaviour, and a tiny scripted
server for answers no real GitLab gives on purpose (pagination loops, a Link header without X-Next-Page, odd
shapes). aioresponses is not used: 0.7.9 cannot build responses under aiohttp 3.14 (it lacks the new
`stream_writer` argument, pnuckowski/aioresponses#289), and a real socket tests more of the client anyway.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import re
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.config import ConfigError, GitLabConfig
from gateway.demo.fake_gitlab import FakeGitLab, create_app
from gateway.errors import GatewayError, GitLabUnavailable, InvalidState, SignInRefused
from gateway.sync.gitlab import (
    GitLabClient,
    GitLabGroup,
    GitLabUser,
    TokenResponse,
    pkce_pair,
    random_token,
    s256,
)

CLIENT_ID = "gateway-app"
CLIENT_SECRET = "app-secret-never-shown"
TOKEN = "access-token-never-shown"
REDIRECT_URI = "https://tool.example/oauth2/callback"

Server = Callable[..., Awaitable[TestServer]]
MakeClient = Callable[..., GitLabClient]
Calls = list[tuple[str, int]]


def assert_clean(exc: BaseException, *secrets: str) -> None:
    """Error messages and advice never carry a token or the client secret."""
    assert isinstance(exc, GatewayError)
    for text in (str(exc), exc.message, exc.advice):
        for secret in (TOKEN, CLIENT_SECRET, *secrets):
            assert secret not in text


@pytest.fixture
async def make_client() -> AsyncIterator[MakeClient]:
    """GitLabClient factory over GitLabClient.make_session; every session is closed after the test."""
    sessions: list[aiohttp.ClientSession] = []

    def make(url: str, *, calls: Calls | None = None, **changes: Any) -> GitLabClient:
        changes.setdefault("timeout", 2.0)
        changes.setdefault("client_secret", CLIENT_SECRET)
        cfg = GitLabConfig(url=url, client_id=CLIENT_ID, **changes)
        session = GitLabClient.make_session(cfg)
        sessions.append(session)
        hook = None if calls is None else lambda endpoint, code: calls.append((endpoint, code))
        return GitLabClient(cfg, session, on_request=hook)

    yield make
    for session in sessions:
        await session.close()


# ------------------------------------------------------------------------------------------------------------
# PKCE, state and the authorize URL


def test_s256_matches_the_rfc_7636_vector() -> None:
    verifier = "ks02i3jdikdo2k0dkfodf3m39rjfjsdk0wk349rj3jrhf"
    assert s256(verifier) == "2i0WFA-0AerkjQm4X4oDEhqA17QIAKNjXpagHBXmO_U"


def test_pkce_pair_is_a_fresh_verifier_and_its_s256_challenge() -> None:
    verifier, challenge = pkce_pair()
    assert re.fullmatch(r"[A-Za-z0-9_-]{64}", verifier)  # RFC 7636: 43-128 unreserved characters
    assert challenge == s256(verifier)
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", challenge)  # a SHA-256 digest, unpadded base64url
    assert pkce_pair()[0] != verifier


def test_random_token_is_url_safe_and_unpredictable() -> None:
    tokens = {random_token() for _ in range(50)}
    assert len(tokens) == 50
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{43}", t) for t in tokens)
    assert len(random_token(16)) == 22


@pytest.mark.parametrize("base", ["https://gitlab.example", "https://example.com/gitlab"])
async def test_authorize_url(make_client: MakeClient, base: str) -> None:
    client = make_client(base, scopes=("openid", "email"))
    url = client.authorize_url(state="st/ate+", code_challenge="chal", redirect_uri=f"{REDIRECT_URI}?x=1&y",
                               nonce="n0nce")
    parts = urlsplit(url)
    assert f"{parts.scheme}://{parts.netloc}{parts.path}" == f"{base}/oauth/authorize"
    assert parse_qs(parts.query, strict_parsing=True) == {
        "client_id": [CLIENT_ID], "redirect_uri": [f"{REDIRECT_URI}?x=1&y"], "response_type": ["code"],
        "state": ["st/ate+"], "scope": ["openid email"], "code_challenge": ["chal"],
        "code_challenge_method": ["S256"], "nonce": ["n0nce"],
    }
    without_nonce = client.authorize_url(state="s", code_challenge="c", redirect_uri=REDIRECT_URI, nonce=None)
    assert "nonce" not in parse_qs(urlsplit(without_nonce).query)
    assert CLIENT_SECRET not in url


# ------------------------------------------------------------------------------------------------------------
# Against the fake GitLab


@pytest.fixture
def fake() -> FakeGitLab:
    fake = FakeGitLab()
    fake.add_application(CLIENT_ID, CLIENT_SECRET, [REDIRECT_URI])
    fake.add_user(1, "alice", name="Alice Adams", email="alice@corp.example")
    fake.add_user(2, "dave", name="Dave Davis", state="blocked")
    fake.add_group(100, "acme")
    fake.add_group(101, "platform", parent="acme")
    fake.add_group(102, "sre", parent="acme/platform")
    fake.add_group(200, "other-org")
    fake.add_group(300, "minimal")
    fake.add_member("alice", "acme", access_level=10)  # Guest: enough, and brings every descendant
    fake.add_member("alice", "minimal", access_level=5)  # Minimal Access: not listed
    fake.add_member("dave", "acme")
    return fake


async def serve(aiohttp_server: Server, fake: FakeGitLab) -> str:
    """Start the fake; return its gitlab.url (origin + base path)."""
    server = await aiohttp_server(create_app(fake))
    return f"http://127.0.0.1:{server.port}{fake.base_path}"


async def sign_in(client: GitLabClient, url: str, username: str) -> tuple[str, str]:
    """Play the browser: sign in to the fake as `username`, follow authorize; return (code, verifier)."""
    verifier, challenge = pkce_pair()
    state = random_token()
    authorize = client.authorize_url(state=state, code_challenge=challenge, redirect_uri=REDIRECT_URI,
                                     nonce=random_token())
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as browser:
        async with browser.post(f"{url}/users/sign_in", data={"username": username},
                                allow_redirects=False) as resp:
            assert resp.status == 302
        async with browser.get(authorize, allow_redirects=False) as resp:
            assert resp.status == 302, await resp.text()
            query = parse_qs(urlsplit(resp.headers["Location"]).query)
    assert query["state"] == [state]
    return query["code"][0], verifier


async def token_for(client: GitLabClient, url: str, username: str) -> TokenResponse:
    code, verifier = await sign_in(client, url, username)
    return await client.exchange_code(code, code_verifier=verifier, redirect_uri=REDIRECT_URI)


async def test_sign_in_with_groups_from_the_api(make_client: MakeClient, aiohttp_server: Server,
                                                fake: FakeGitLab) -> None:
    url = await serve(aiohttp_server, fake)
    calls: Calls = []
    client = make_client(url, calls=calls)
    token = await token_for(client, url, "alice")
    assert token.scope == "read_user read_api" and token.id_token is None
    assert token.access_token not in repr(token)

    data = await client.sign_in_data(token.access_token, need_groups=True)
    assert data.user == GitLabUser(1, "alice", "Alice Adams", "alice@corp.example", "active")
    # Descendants of a Guest membership are included; a Minimal Access one and unrelated groups are not.
    assert set(data.groups or ()) == {GitLabGroup("acme", 100), GitLabGroup("acme/platform", 101),
                                      GitLabGroup("acme/platform/sre", 102)}
    assert sorted(calls) == [("groups", 200), ("token", 200), ("user", 200)]
    assert ("GET", "/api/v4/groups?min_access_level=10&per_page=100&page=1") in fake.requests

    only_user = await client.sign_in_data(token.access_token, need_groups=False)
    assert only_user.user.id == 1 and only_user.groups is None
    assert len([r for r in fake.requests if r[1].startswith("/api/v4/groups")]) == 1


async def test_all_250_groups_come_back_across_three_pages(make_client: MakeClient, aiohttp_server: Server,
                                                           fake: FakeGitLab) -> None:
    for i in range(250):
        fake.add_group(1000 + i, f"team-{i:03d}")
        fake.add_member("alice", 1000 + i)
    url = await serve(aiohttp_server, fake)
    client = make_client(url)
    token = await token_for(client, url, "alice")
    groups = await client.fetch_groups(token.access_token)
    assert len(groups) == 253
    assert {g.full_path for g in groups} == set(fake.user_groups("alice"))
    assert {g.id for g in groups} >= set(range(1000, 1250))
    pages = [p for m, p in fake.requests if p.startswith("/api/v4/groups")]
    assert [parse_qs(urlsplit(p).query)["page"] for p in pages] == [["1"], ["2"], ["3"]]


async def test_gitlab_on_a_subpath(make_client: MakeClient, aiohttp_server: Server) -> None:
    fake = FakeGitLab(base_path="/gitlab")
    fake.add_application(CLIENT_ID, CLIENT_SECRET, [REDIRECT_URI])
    fake.add_user(1, "alice")
    fake.add_group(100, "acme")
    fake.add_member("alice", "acme")
    for i in range(120):  # two pages, so the next page is also built under the subpath
        fake.add_group(1000 + i, f"t{i}", parent="acme")
    url = await serve(aiohttp_server, fake)
    assert url.endswith("/gitlab")
    client = make_client(url)
    token = await token_for(client, url, "alice")
    data = await client.sign_in_data(token.access_token, need_groups=True)
    assert data.user.username == "alice" and data.groups is not None and len(data.groups) == 121
    await client.revoke(token.access_token)
    assert all(path.startswith("/gitlab/") for _, path in fake.requests)
    assert fake.issued_tokens()[0].revoked


async def test_sign_in_with_groups_from_userinfo(make_client: MakeClient, aiohttp_server: Server,
                                                 fake: FakeGitLab) -> None:
    url = await serve(aiohttp_server, fake)
    client = make_client(url, groups_source="userinfo", scopes=("openid", "email"))
    token = await token_for(client, url, "alice")
    assert token.id_token is not None and token.scope == "openid email"
    data = await client.sign_in_data(token.access_token, need_groups=True)
    assert data.user == GitLabUser(1, "alice", "Alice Adams", "alice@corp.example", "active")
    assert data.groups == tuple(GitLabGroup(p, None) for p in fake.user_groups("alice"))
    assert not [p for _, p in fake.requests if p.startswith("/api/")]

    user, groups = await client.fetch_userinfo(token.access_token)
    assert user == data.user and groups == data.groups
    without = await client.sign_in_data(token.access_token, need_groups=False)
    assert without.groups is None


async def test_userinfo_without_the_email_scope_has_no_email(make_client: MakeClient, aiohttp_server: Server,
                                                             fake: FakeGitLab) -> None:
    url = await serve(aiohttp_server, fake)
    client = make_client(url, groups_source="userinfo", scopes=("openid",))
    token = await token_for(client, url, "alice")
    user, _ = await client.fetch_userinfo(token.access_token)
    assert user.email == "" and user.username == "alice"


async def test_500_on_page_3_fails_the_whole_listing(make_client: MakeClient, aiohttp_server: Server,
                                                     fake: FakeGitLab) -> None:
    for i in range(250):
        fake.add_group(1000 + i, f"team-{i:03d}")
        fake.add_member("alice", 1000 + i)
    fake.fail("groups", 500, page=3)
    url = await serve(aiohttp_server, fake)
    calls: Calls = []
    client = make_client(url, calls=calls)
    token = await token_for(client, url, "alice")
    with pytest.raises(GitLabUnavailable, match="HTTP 500") as info:
        await client.sign_in_data(token.access_token, need_groups=True)
    assert info.value.status == 502
    assert_clean(info.value, token.access_token)
    assert [c for c in calls if c[0] == "groups"] == [("groups", 200), ("groups", 200), ("groups", 500)]


async def test_429_is_gitlab_rate_limiting(make_client: MakeClient, aiohttp_server: Server,
                                           fake: FakeGitLab) -> None:
    fake.fail("user", 429, retry_after=30)
    url = await serve(aiohttp_server, fake)
    calls: Calls = []
    client = make_client(url, calls=calls)
    token = await token_for(client, url, "alice")
    with pytest.raises(GitLabUnavailable, match="rate limiting") as info:
        await client.fetch_user(token.access_token)
    assert "30 seconds" in info.value.advice
    assert calls[-1] == ("user", 429)


async def test_a_slow_gitlab_times_out_at_gitlab_timeout(make_client: MakeClient, aiohttp_server: Server,
                                                         fake: FakeGitLab) -> None:
    fake.fail("groups", 0, delay=5.0)  # status 0: the right answer, too late
    url = await serve(aiohttp_server, fake)
    calls: Calls = []
    client = make_client(url, calls=calls, timeout=0.3)
    token = await token_for(client, url, "alice")
    started = time.monotonic()
    with pytest.raises(GitLabUnavailable, match=r"in time \(gitlab\.timeout is 0\.3 seconds\)"):
        await client.sign_in_data(token.access_token, need_groups=True)
    assert time.monotonic() - started < 1.5
    assert ("groups", 0) in calls


async def test_blocked_user_is_refused(make_client: MakeClient, aiohttp_server: Server,
                                       fake: FakeGitLab) -> None:
    url = await serve(aiohttp_server, fake)
    client = make_client(url)
    token = await token_for(client, url, "dave")  # the fake lets him reach the API, which answers 403
    with pytest.raises(SignInRefused) as info:
        await client.fetch_user(token.access_token)
    assert info.value.code == "blocked" and info.value.status == 403
    assert info.value.message == "Your GitLab account is blocked"
    # The groups request fails too (GitLabUnavailable-worthy); the refusal is what the user sees.
    with pytest.raises(SignInRefused):
        await client.sign_in_data(token.access_token, need_groups=True)


async def test_invalid_or_reused_code_is_invalid_state(make_client: MakeClient, aiohttp_server: Server,
                                                       fake: FakeGitLab) -> None:
    url = await serve(aiohttp_server, fake)
    client = make_client(url)
    with pytest.raises(InvalidState, match="expired or was already used"):
        await client.exchange_code("not-a-code", code_verifier="v" * 64, redirect_uri=REDIRECT_URI)
    code, verifier = await sign_in(client, url, "alice")
    with pytest.raises(InvalidState):  # wrong PKCE verifier
        await client.exchange_code(code, code_verifier=pkce_pair()[0], redirect_uri=REDIRECT_URI)
    await client.exchange_code(code, code_verifier=verifier, redirect_uri=REDIRECT_URI)
    with pytest.raises(InvalidState) as info:  # single use
        await client.exchange_code(code, code_verifier=verifier, redirect_uri=REDIRECT_URI)
    assert info.value.status == 400 and code not in info.value.message


async def test_bad_client_secret_is_a_misconfiguration(make_client: MakeClient, aiohttp_server: Server,
                                                       fake: FakeGitLab) -> None:
    url = await serve(aiohttp_server, fake)
    calls: Calls = []
    client = make_client(url, calls=calls, client_secret="wrong-secret-value")
    code, verifier = await sign_in(client, url, "alice")
    with pytest.raises(GitLabUnavailable) as info:
        await client.exchange_code(code, code_verifier=verifier, redirect_uri=REDIRECT_URI)
    assert info.value.code == "gitlab_misconfigured" and info.value.status == 502
    assert "gitlab.client_id" in info.value.message and "gitlab.client_secret" in info.value.message
    assert_clean(info.value, "wrong-secret-value", code)
    assert calls == [("token", 401)]


async def test_missing_scope_names_gitlab_scopes(make_client: MakeClient, aiohttp_server: Server,
                                                 fake: FakeGitLab) -> None:
    url = await serve(aiohttp_server, fake)
    client = make_client(url, scopes=("read_user",))  # enough for /user, not for /groups
    token = await token_for(client, url, "alice")
    assert (await client.fetch_user(token.access_token)).username == "alice"
    with pytest.raises(GitLabUnavailable, match=r"gitlab\.scopes") as info:
        await client.sign_in_data(token.access_token, need_groups=True)
    assert info.value.code == "gitlab_misconfigured"

    userinfo_client = make_client(url, groups_source="userinfo")  # read_user read_api: no openid
    with pytest.raises(GitLabUnavailable, match="openid"):
        await userinfo_client.fetch_userinfo(token.access_token)


async def test_revoked_token_is_gitlab_unavailable(make_client: MakeClient, aiohttp_server: Server,
                                                   fake: FakeGitLab) -> None:
    url = await serve(aiohttp_server, fake)
    client = make_client(url)
    token = await token_for(client, url, "alice")
    await client.revoke(token.access_token)
    with pytest.raises(GitLabUnavailable, match="rejected the access token") as info:
        await client.fetch_user(token.access_token)
    assert_clean(info.value, token.access_token)


@pytest.mark.parametrize("body", ["<html><h1>We'll be back soon</h1></html>", '{"id": 1, "username": '])
async def test_invalid_json_is_gitlab_unavailable(make_client: MakeClient, aiohttp_server: Server,
                                                  fake: FakeGitLab, body: str) -> None:
    fake.fail("user", 200, body=body)
    url = await serve(aiohttp_server, fake)
    client = make_client(url)
    token = await token_for(client, url, "alice")
    with pytest.raises(GitLabUnavailable, match="invalid JSON"):
        await client.fetch_user(token.access_token)


@pytest.mark.parametrize("status", [502, 503])
async def test_gitlab_down_during_the_code_exchange(make_client: MakeClient, aiohttp_server: Server,
                                                    fake: FakeGitLab, status: int) -> None:
    fake.fail("token", status)
    url = await serve(aiohttp_server, fake)
    client = make_client(url)
    code, verifier = await sign_in(client, url, "alice")
    with pytest.raises(GitLabUnavailable, match=f"HTTP {status}"):
        await client.exchange_code(code, code_verifier=verifier, redirect_uri=REDIRECT_URI)
    # Nothing was consumed: the same code still works once GitLab is back.
    await client.exchange_code(code, code_verifier=verifier, redirect_uri=REDIRECT_URI)


# ------------------------------------------------------------------------------------------------------------
# A scripted server for answers the fake does not give


Responder = Callable[[web.Request], web.StreamResponse | Awaitable[web.StreamResponse]]


@pytest.fixture
async def scripted(aiohttp_server: Server) -> Callable[[dict[str, Responder]], Awaitable[str]]:
    """Serve `{path: responder}`; returns the server's URL. Unscripted paths answer 404."""

    async def start(routes: dict[str, Responder]) -> str:
        async def handle(request: web.Request) -> web.StreamResponse:
            responder = routes.get(request.path)
            if responder is None:
                return web.json_response({"message": "404 Not Found"}, status=404)
            result = responder(request)
            return await result if isinstance(result, Awaitable) else result

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        server = await aiohttp_server(app)
        return f"http://127.0.0.1:{server.port}"

    return start


Scripted = Callable[[dict[str, Responder]], Awaitable[str]]


def answer(payload: Any = None, status: int = 200, headers: dict[str, str] | None = None,
           text: str | None = None) -> Responder:
    if text is not None:
        return lambda request: web.Response(text=text, status=status, headers=headers)
    return lambda request: web.json_response(payload, status=status, headers=headers)


def pages(*answers: tuple[list[Any], dict[str, str]]) -> Responder:
    """A groups listing: answers[page - 1] is (items, headers) for ?page=N."""

    def respond(request: web.Request) -> web.Response:
        assert request.query["min_access_level"] == "10" and request.query["per_page"] == "100"
        items, headers = answers[int(request.query["page"]) - 1]
        return web.json_response(items, headers=headers)

    return respond


def group_items(first: int, count: int) -> list[dict[str, Any]]:
    return [{"id": i, "full_path": f"g{i}", "name": f"G {i}"} for i in range(first, first + count)]


async def test_connection_refused_is_gitlab_unavailable(make_client: MakeClient) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    calls: Calls = []
    client = make_client(f"http://127.0.0.1:{port}", calls=calls)
    with pytest.raises(GitLabUnavailable, match="Cannot reach GitLab") as info:
        await client.fetch_user(TOKEN)
    assert info.value.status == 502
    assert_clean(info.value)
    assert calls == [("user", 0)]


async def test_dropped_connection_is_gitlab_unavailable(make_client: MakeClient, scripted: Scripted) -> None:
    async def hang_up(request: web.Request) -> web.Response:
        assert request.transport is not None
        request.transport.close()
        await asyncio.sleep(0.1)
        return web.Response()

    client = make_client(await scripted({"/api/v4/user": hang_up}))
    with pytest.raises(GitLabUnavailable, match="Cannot reach GitLab"):
        await client.fetch_user(TOKEN)


async def test_requests_carry_user_agent_and_bearer_and_are_logged_without_it(
        make_client: MakeClient, scripted: Scripted, caplog: pytest.LogCaptureFixture) -> None:
    seen: dict[str, str] = {}

    def user(request: web.Request) -> web.Response:
        seen.update(request.headers)
        return web.json_response({"id": 7, "username": "ann", "name": "Ann", "state": "active"})

    client = make_client(await scripted({"/api/v4/user": user}))
    caplog.set_level("DEBUG", logger="gateway.gitlab")
    # No email in the answer (never for /user, but the client must cope): an empty one.
    assert await client.fetch_user(TOKEN) == GitLabUser(7, "ann", "Ann", "", "active")
    assert seen["User-Agent"] == "gateway/0.1" and seen["Authorization"] == f"Bearer {TOKEN}"
    assert [r.getMessage() for r in caplog.records if r.name == "gateway.gitlab"] == ["gitlab user -> 200"]


@pytest.mark.parametrize("payload", [
    {"username": "a", "name": "A", "email": "a@x", "state": "active"},                # no id
    {"id": "1", "username": "a", "name": "A", "email": "a@x", "state": "active"},     # id not a number
    {"id": 1, "name": "A", "email": "a@x", "state": "active"},                        # no username
    {"id": 1, "username": "", "name": "A", "email": "a@x", "state": "active"},        # empty username
    {"id": 1, "username": "a", "name": "A", "email": "a@x"},                          # no state
    [{"id": 1, "username": "a"}],                                                      # not an object
])
async def test_unexpected_user_shape_is_gitlab_unavailable(make_client: MakeClient, scripted: Scripted,
                                                           payload: Any) -> None:
    client = make_client(await scripted({"/api/v4/user": answer(payload)}))
    with pytest.raises(GitLabUnavailable, match="unexpected shape"):
        await client.fetch_user(TOKEN)


@pytest.mark.parametrize(("state", "message"), [
    ("blocked", "Your GitLab account is blocked"),
    ("banned", "Your GitLab account is blocked"),
    ("deactivated", "Your GitLab account is not active (deactivated)"),
])
async def test_inactive_state_in_the_body_is_refused(make_client: MakeClient, scripted: Scripted, state: str,
                                                     message: str) -> None:
    user = {"id": 7, "username": "ann", "name": "Ann", "email": "a@x", "state": state}
    client = make_client(await scripted({"/api/v4/user": answer(user)}))
    with pytest.raises(SignInRefused) as info:
        await client.fetch_user(TOKEN)
    assert info.value.code == "blocked" and info.value.message == message and info.value.status == 403


@pytest.mark.parametrize(("status", "payload", "match"), [
    (401, {"message": "401 Unauthorized"}, "rejected the access token"),
    (403, {"message": "403 Forbidden"}, "HTTP 403"),
    (404, {"message": "404 Not Found"}, r"gitlab\.url"),
    (503, {"message": "down"}, "HTTP 503"),
])
async def test_api_error_statuses(make_client: MakeClient, scripted: Scripted, status: int, payload: Any,
                                  match: str) -> None:
    client = make_client(await scripted({"/api/v4/user": answer(payload, status)}))
    with pytest.raises(GitLabUnavailable, match=match) as info:
        await client.fetch_user(TOKEN)
    assert info.value.status == 502
    assert_clean(info.value)


async def test_redirects_are_not_followed(make_client: MakeClient, scripted: Scripted) -> None:
    # e.g. http:// configured for an https-only GitLab: following would turn the token POST into a GET,
    # or carry the bearer token to wherever the redirect points.
    user = {"id": 1, "username": "a", "name": "A", "email": "a@x", "state": "active"}
    calls: Calls = []
    url = await scripted({"/api/v4/user": answer({}, 301, {"Location": "/moved/api/v4/user"}),
                          "/moved/api/v4/user": answer(user)})
    with pytest.raises(GitLabUnavailable, match=r"HTTP 301 .*check gitlab\.url") as info:
        await make_client(url, calls=calls).fetch_user(TOKEN)
    assert info.value.code == "gitlab_misconfigured"
    assert calls == [("user", 301)]


async def test_unaccepted_terms_of_service_is_a_refusal(make_client: MakeClient, scripted: Scripted) -> None:
    terms = answer({"message": "403 Forbidden - You (@ann) must accept the Terms of Service in order to perform "
                               "this action. To accept these terms, please access GitLab from a web browser."}, 403)
    with pytest.raises(SignInRefused) as info:
        await make_client(await scripted({"/api/v4/user": terms})).fetch_user(TOKEN)
    assert info.value.code == "gitlab_terms" and "@ann" not in info.value.message


async def test_a_refusal_wins_over_an_outage(make_client: MakeClient, scripted: Scripted) -> None:
    blocked = answer({"message": "403 Forbidden - Your account has been blocked."}, 403)
    url = await scripted({"/api/v4/user": answer({"message": "boom"}, 503), "/api/v4/groups": blocked})
    with pytest.raises(SignInRefused) as info:
        await make_client(url).sign_in_data(TOKEN, need_groups=True)
    assert info.value.code == "blocked"


async def test_missing_x_next_page_follows_the_link_header(make_client: MakeClient,
                                                           scripted: Scripted) -> None:
    # The Link names GitLab's external_url (another host here): only its page number is used.
    link = '<https://elsewhere.example/api/v4/groups?min_access_level=10&page={p}&per_page=100>; rel="{rel}"'
    calls: Calls = []
    url = await scripted({"/api/v4/groups": pages(
        (group_items(1, 100), {"Link": f'{link.format(p=2, rel="next")}, {link.format(p=1, rel="first")}'}),
        (group_items(101, 30), {"Link": link.format(p=1, rel="prev")}),
    )})
    groups = await make_client(url, calls=calls).fetch_groups(TOKEN)
    assert [g.id for g in groups] == list(range(1, 131))
    assert groups[0] == GitLabGroup("g1", 1)
    assert calls == [("groups", 200), ("groups", 200)]


async def test_pagination_loop_is_refused(make_client: MakeClient, scripted: Scripted) -> None:
    calls: Calls = []
    url = await scripted({"/api/v4/groups": pages(
        (group_items(1, 100), {"X-Next-Page": "2"}),
        (group_items(101, 100), {"X-Next-Page": "1"}),
    )})
    with pytest.raises(GitLabUnavailable, match="pagination is inconsistent"):
        await make_client(url, calls=calls).fetch_groups(TOKEN)
    assert len(calls) == 2


async def test_pagination_that_never_ends_stops_at_1000_pages(make_client: MakeClient,
                                                              scripted: Scripted) -> None:
    def endless(request: web.Request) -> web.Response:
        page = int(request.query["page"])
        return web.json_response(group_items(page, 1), headers={"X-Next-Page": str(page + 1)})

    calls: Calls = []
    client = make_client(await scripted({"/api/v4/groups": endless}), calls=calls)
    with pytest.raises(GitLabUnavailable, match="more than 1000 pages"):
        await client.fetch_groups(TOKEN)
    assert len(calls) == 1000


@pytest.mark.parametrize(("headers", "match"), [
    ({}, "no pagination headers"),                                          # a full page, nothing says "last"
    ({"X-Next-Page": "3"}, "pagination is inconsistent"),                   # skips page 2
    ({"X-Next-Page": "two"}, "pagination is inconsistent"),
    ({"X-Next-Page": "", "X-Total": "250"}, r"incomplete \(100 of 250"),    # stops early
    ({"X-Next-Page": "", "X-Total": "lots"}, "invalid X-Total"),
    ({"Link": '<https://g.example/api/v4/groups>; rel="next"'}, "pagination is inconsistent"),  # no page
])
async def test_incomplete_pagination_is_refused(make_client: MakeClient, scripted: Scripted,
                                                headers: dict[str, str], match: str) -> None:
    client = make_client(await scripted({"/api/v4/groups": pages((group_items(1, 100), headers))}))
    with pytest.raises(GitLabUnavailable, match=match):
        await client.fetch_groups(TOKEN)


async def test_short_page_without_headers_is_the_last(make_client: MakeClient, scripted: Scripted) -> None:
    client = make_client(await scripted({"/api/v4/groups": pages((group_items(1, 3), {}))}))
    assert [g.full_path for g in await client.fetch_groups(TOKEN)] == ["g1", "g2", "g3"]


async def test_no_groups_at_all(make_client: MakeClient, scripted: Scripted) -> None:
    client = make_client(await scripted({"/api/v4/groups": pages(([], {"X-Next-Page": "", "X-Total": "0"}))}))
    assert await client.fetch_groups(TOKEN) == ()


async def test_listing_that_shifts_between_pages_is_refused(make_client: MakeClient,
                                                            scripted: Scripted) -> None:
    # A group was added before page 2 was read: group 100 comes again and the total grew.
    client = make_client(await scripted({"/api/v4/groups": pages(
        (group_items(1, 100), {"X-Next-Page": "2", "X-Total": "120"}),
        (group_items(100, 21), {"X-Next-Page": "", "X-Total": "121"}),
    )}))
    with pytest.raises(GitLabUnavailable, match=r"incomplete \(120 of 121"):
        await client.fetch_groups(TOKEN)


@pytest.mark.parametrize("item", [{"full_path": "a"}, {"id": 1}, {"id": 1, "full_path": ""}, "a", None, [1],
                                  {"id": True, "full_path": "a"}, {"id": 1.0, "full_path": "a"},
                                  {"id": "1", "full_path": "a"}, {"id": 1, "full_path": 5},
                                  {"id": 1, "full_path": None}])
async def test_unexpected_group_shape_is_refused(make_client: MakeClient, scripted: Scripted,
                                                 item: Any) -> None:
    client = make_client(await scripted({"/api/v4/groups": pages(([item], {"X-Next-Page": ""}))}))
    with pytest.raises(GitLabUnavailable, match="unexpected shape"):
        await client.fetch_groups(TOKEN)


@pytest.mark.parametrize(("body", "error"), [('{"message": "ok"}', "unexpected shape"),
                                             ('"groups"', "unexpected shape"),
                                             ('[{"id": 1, "full_path": "a"}', "invalid JSON"),
                                             ("<html>maintenance</html>", "invalid JSON"),
                                             ('[{"id": 1, "full_path": "a"}] []', "invalid JSON")])
async def test_a_group_page_that_is_not_a_list_of_groups_is_refused(make_client: MakeClient, scripted: Scripted,
                                                                   body: str, error: str) -> None:
    client = make_client(await scripted({"/api/v4/groups": lambda request: web.Response(
        text=body, content_type="application/json", headers={"X-Next-Page": ""})}))
    with pytest.raises(GitLabUnavailable, match=error):
        await client.fetch_groups(TOKEN)


async def test_group_items_keep_only_id_and_path_whatever_else_they_carry(make_client: MakeClient,
                                                                          scripted: Scripted) -> None:
    items = [{"id": 1, "full_path": "a", "parent_id": None, "statistics": {"x": [1, {"y": None}]}, "name": "A"},
             {"full_path": "a/b", "id": 2, "marked_for_deletion_on": "2026-01-01", "avatar_url": None}]
    client = make_client(await scripted({"/api/v4/groups": pages((items, {"X-Next-Page": "", "X-Total": "2"}))}))
    assert await client.fetch_groups(TOKEN) == (GitLabGroup("a", 1), GitLabGroup("a/b", 2))


@pytest.mark.parametrize(("status", "payload", "error", "check"), [
    (200, {"access_token": "abc", "token_type": "mac", "scope": "x"}, GitLabUnavailable, "unexpected shape"),
    (200, {"token_type": "Bearer", "scope": "x"}, GitLabUnavailable, "unexpected shape"),
    (400, {"error": "invalid_request", "error_description": "Missing required parameter: code_verifier."},
     InvalidState, "expired or was already used"),
    (400, {"error": "invalid_scope"}, GitLabUnavailable, r"gitlab\.scopes"),
    (400, {"error": "something_new"}, GitLabUnavailable, "something_new"),
    (429, None, GitLabUnavailable, "rate limiting"),
])
async def test_token_endpoint_answers(make_client: MakeClient, scripted: Scripted, status: int, payload: Any,
                                      error: type[GatewayError], check: str) -> None:
    respond = answer(text="Retry later\n", status=429) if payload is None else answer(payload, status)
    client = make_client(await scripted({"/oauth/token": respond}))
    with pytest.raises(error, match=check):
        await client.exchange_code("c", code_verifier="v", redirect_uri=REDIRECT_URI)


async def test_token_type_is_compared_case_insensitively(make_client: MakeClient, scripted: Scripted) -> None:
    seen: dict[str, Any] = {}

    async def token(request: web.Request) -> web.Response:
        seen.update(await request.post(), auth=request.headers.get("Authorization"))
        return web.json_response({"access_token": "abc", "token_type": "bearer", "expires_in": 7200,
                                  "scope": "read_user read_api", "created_at": 1})

    client = make_client(await scripted({"/oauth/token": token}))
    got = await client.exchange_code("the-code", code_verifier="the-verifier", redirect_uri=REDIRECT_URI)
    assert got == TokenResponse("abc", None, "read_user read_api")
    assert seen == {"grant_type": "authorization_code", "code": "the-code", "redirect_uri": REDIRECT_URI,
                    "code_verifier": "the-verifier",
                    "auth": aiohttp.encode_basic_auth(CLIENT_ID, CLIENT_SECRET)}


@pytest.mark.parametrize(("status", "body"), [
    (401, ""),                                                         # token no longer valid
    (200, '{"preferred_username": "a", "groups": []}'),                # no sub
    (200, '{"sub": "12", "groups": []}'),                              # no username
    (200, '{"sub": "12", "nickname": "a", "groups": [1]}'),            # groups not paths
    (200, '{"sub": "12", "nickname": "a"}'),                           # no groups claim: never "no groups"
])
async def test_userinfo_failures(make_client: MakeClient, scripted: Scripted, status: int, body: str) -> None:
    url = await scripted({"/oauth/userinfo": answer(text=body, status=status)})
    client = make_client(url, groups_source="userinfo", scopes=("openid",))
    with pytest.raises(GitLabUnavailable):
        await client.sign_in_data(TOKEN, need_groups=True)


async def test_userinfo_nickname_and_no_groups_claim_when_groups_are_not_needed(
        make_client: MakeClient, scripted: Scripted) -> None:
    url = await scripted({"/oauth/userinfo": answer({"sub": "12", "nickname": "ann", "name": "Ann"})})
    client = make_client(url, groups_source="userinfo", scopes=("openid",))
    data = await client.sign_in_data(TOKEN, need_groups=False)
    assert data.user == GitLabUser(12, "ann", "Ann", "", "active") and data.groups is None


async def test_revoke_never_raises(make_client: MakeClient, scripted: Scripted) -> None:
    calls: Calls = []
    client = make_client(await scripted({"/oauth/revoke": answer({"message": "boom"}, 500)}), calls=calls)
    await client.revoke(TOKEN)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    await make_client(f"http://127.0.0.1:{port}", calls=calls).revoke(TOKEN)
    assert calls == [("revoke", 500), ("revoke", 0)]


# ------------------------------------------------------------------------------------------------------------
# The session: timeouts and a private CA


async def test_slow_gitlab_times_out(make_client: MakeClient, scripted: Scripted) -> None:
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.json_response({})

    client = make_client(await scripted({"/oauth/userinfo": slow}), timeout=0.2, groups_source="userinfo")
    started = time.monotonic()
    with pytest.raises(GitLabUnavailable, match="did not answer"):
        await client.fetch_userinfo(TOKEN)
    assert time.monotonic() - started < 1.5


def make_certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 that is its own CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "private gitlab")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp_path / "ca.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


async def test_ca_file_trusts_a_private_ca(make_client: MakeClient, aiohttp_server: Server, tmp_path: Path,
                                           fake: FakeGitLab) -> None:
    cert_file, key_file = make_certificate(tmp_path)
    server_ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ssl.load_cert_chain(cert_file, key_file)
    server = await aiohttp_server(create_app(fake), ssl=server_ssl)
    url = f"https://127.0.0.1:{server.port}"
    with pytest.raises(GitLabUnavailable, match=r"gitlab\.ca_file") as info:
        await make_client(url).exchange_code("c", code_verifier="v", redirect_uri=REDIRECT_URI)
    assert info.value.code == "gitlab_misconfigured"
    with pytest.raises(InvalidState):  # trusted now: GitLab itself answers (the code is made up)
        await make_client(url, ca_file=str(cert_file)).exchange_code("c", code_verifier="v",
                                                                     redirect_uri=REDIRECT_URI)


async def test_unusable_ca_file_is_a_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "not-a-bundle.pem"
    bad.write_text("hello\n")
    with pytest.raises(ConfigError, match=r"gitlab\.ca_file: cannot load .*not-a-bundle\.pem"):
        GitLabClient.make_session(GitLabConfig(ca_file=str(bad)))
