"""Functional tests of the GitLab stand-in over real HTTP, against ../shared/reference/gitlab-api.md."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from gateway.demo.fake_gitlab import FakeGitLab, create_app, demo_seed, serve

ClientFactory = Callable[[web.Application], Awaitable[TestClient[Any, Any]]]

CLIENT_ID = "gw-client"
CLIENT_SECRET = "gw-secret"
REDIRECT_URI = "https://tool.example.com/oauth2/callback"
UNTRUSTED_ID = "untrusted-app"
UNTRUSTED_SECRET = "untrusted-secret"
VERIFIER = "ks02i3jdikdo2k0dkfodf3m39rjfjsdk0wk349rj3jrhf"
CHALLENGE = "2i0WFA-0AerkjQm4X4oDEhqA17QIAKNjXpagHBXmO_U"
INVALID_GRANT = {
    "error": "invalid_grant",
    "error_description": "The provided authorization grant is invalid, expired, revoked, does not match the "
    "redirection URI used in the authorization request, or was issued to another client.",
}
INVALID_CLIENT = {
    "error": "invalid_client",
    "error_description": "Client authentication failed due to unknown client, no client authentication "
    "included, or unsupported authentication method.",
}
HEX64 = re.compile(r"[0-9a-f]{64}")


def seeded(base_path: str = "") -> FakeGitLab:
    """acme > platform > sre, acme > docs, other-org; users with various memberships and states."""
    fake = FakeGitLab(base_path=base_path)
    fake.add_application(CLIENT_ID, CLIENT_SECRET, [REDIRECT_URI, "http://127.0.0.1:4180/cb?tenant=a"])
    fake.add_application(UNTRUSTED_ID, UNTRUSTED_SECRET, [REDIRECT_URI], trusted=False)
    fake.add_group(10, "acme")
    fake.add_group(11, "platform", parent="acme")
    fake.add_group(12, "sre", parent=11)
    fake.add_group(13, "docs", parent="acme")
    fake.add_group(20, "other-org")
    fake.add_user(1, "alice", name="Alice Adams", email="alice@corp.example")
    fake.add_user(2, "bob", public_email="bob@public.example")
    fake.add_user(3, "carol")
    fake.add_user(4, "dave", state="blocked")
    fake.add_user(5, "erin")
    fake.add_member("alice", "acme", 50)
    fake.add_member("alice", "acme/platform", 40)
    fake.add_member("alice", "other-org", 30)
    fake.add_member("bob", "acme/platform/sre", 30)
    fake.add_member("carol", "acme", 5)  # minimal access: not a real membership
    fake.add_member("dave", "acme", 30)
    return fake


@pytest.fixture
async def fake_and_client(aiohttp_client: ClientFactory) -> tuple[FakeGitLab, TestClient[Any, Any]]:
    fake = seeded()
    return fake, await aiohttp_client(create_app(fake))


def local(location: str) -> str:
    """The path+query of an absolute Location, for the test client (which only takes paths)."""
    parts = urlsplit(location)
    return parts.path + (f"?{parts.query}" if parts.query else "")


def query_of(location: str) -> dict[str, list[str]]:
    return parse_qs(urlsplit(location).query, keep_blank_values=True)


def authorize_query(**overrides: str | None) -> str:
    params: dict[str, str | None] = {
        "client_id": CLIENT_ID,
        "redirect_uri": REDIRECT_URI,
        "response_type": "code",
        "state": "st-123",
        "scope": "openid email read_user read_api",
        "code_challenge": CHALLENGE,
        "code_challenge_method": "S256",
        "nonce": "n-456",
    }
    params.update(overrides)
    return urlencode({k: v for k, v in params.items() if v is not None})


async def sign_in(client: TestClient[Any, Any], username: str, base: str = "") -> None:
    resp = await client.post(f"{base}/users/sign_in", data={"username": username}, allow_redirects=False)
    assert resp.status == 302


async def get_code(
    client: TestClient[Any, Any], username: str = "alice", base: str = "", **params: str | None
) -> str:
    await sign_in(client, username, base)
    resp = await client.get(f"{base}/oauth/authorize?{authorize_query(**params)}", allow_redirects=False)
    assert resp.status == 302, await resp.text()
    return query_of(resp.headers["Location"])["code"][0]


async def exchange(
    client: TestClient[Any, Any], code: str, base: str = "", **fields: str
) -> aiohttp.ClientResponse:
    """POST /oauth/token for `code` with body client auth; a field given as "-" is left out."""
    data = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": REDIRECT_URI,
        "code_verifier": VERIFIER,
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
    }
    data.update(fields)
    return await client.post(f"{base}/oauth/token", data={k: v for k, v in data.items() if v != "-"})


async def tokens(
    client: TestClient[Any, Any],
    username: str = "alice",
    scope: str | None = "openid email read_user read_api",
    **params: str | None,
) -> dict[str, Any]:
    code = await get_code(client, username, scope=scope, **params)
    resp = await exchange(client, code)
    assert resp.status == 200, await resp.text()
    body: dict[str, Any] = await resp.json()
    return body


def links(response: aiohttp.ClientResponse) -> dict[str, str]:
    """rel -> URL of a Link header."""
    return {rel: url for url, rel in re.findall(r'<([^>]+)>; rel="(\w+)"', response.headers["Link"])}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def b64url_decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


# ------------------------------------------------------------------ token endpoint


async def test_pkce_vector_accepted_and_wrong_verifier_refused(fake_and_client: Any) -> None:
    _, client = fake_and_client
    code = await get_code(client)
    wrong = await exchange(client, code, code_verifier="x" * 43)
    assert (wrong.status, await wrong.json()) == (400, INVALID_GRANT)
    right = await exchange(client, code)  # a failed attempt does not burn the code
    assert right.status == 200
    assert right.headers["Cache-Control"] == "no-store"


async def test_missing_verifier_for_pkce_code_is_invalid_request(fake_and_client: Any) -> None:
    _, client = fake_and_client
    resp = await exchange(client, await get_code(client), code_verifier="-")
    assert resp.status == 400
    assert (await resp.json())["error"] == "invalid_request"


async def test_plain_pkce_is_the_default_method(fake_and_client: Any) -> None:
    _, client = fake_and_client
    code = await get_code(client, code_challenge="plain-verifier-" + "a" * 40, code_challenge_method=None)
    assert (await exchange(client, code)).status == 400
    assert (await exchange(client, code, code_verifier="plain-verifier-" + "a" * 40)).status == 200


async def test_code_is_single_use_and_expires(fake_and_client: Any) -> None:
    fake, client = fake_and_client
    code = await get_code(client)
    assert (await exchange(client, code)).status == 200
    again = await exchange(client, code)
    assert (again.status, await again.json()) == (400, INVALID_GRANT)

    now = fake.clock()
    code = await get_code(client)
    fake.clock = lambda: now + 601
    late = await exchange(client, code)
    assert (late.status, await late.json()) == (400, INVALID_GRANT)


async def test_redirect_uri_must_equal_the_authorize_one(fake_and_client: Any) -> None:
    _, client = fake_and_client
    code = await get_code(client)
    resp = await exchange(client, code, redirect_uri=REDIRECT_URI + "/other")
    assert (resp.status, await resp.json()) == (400, INVALID_GRANT)


async def test_client_auth_basic_first_then_body(fake_and_client: Any) -> None:
    _, client = fake_and_client
    good = {"Authorization": aiohttp.encode_basic_auth(CLIENT_ID, CLIENT_SECRET)}
    bad = {"Authorization": aiohttp.encode_basic_auth(CLIENT_ID, "nope")}

    code = await get_code(client)
    resp = await client.post(
        "/oauth/token",
        headers=good,
        data={
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT_URI,
            "code_verifier": VERIFIER,
            "client_secret": "ignored-when-basic-is-sent",
        },
    )
    assert resp.status == 200

    code = await get_code(client)
    resp = await exchange(client, code, client_secret=CLIENT_SECRET)
    assert resp.status == 200  # body credentials alone

    code = await get_code(client)
    resp = await client.post(
        "/oauth/token",
        headers=bad,
        data={
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT_URI,
            "code_verifier": VERIFIER,
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
        },
    )
    assert (resp.status, await resp.json()) == (401, INVALID_CLIENT)  # Basic wins, even when wrong

    resp = await exchange(client, code, client_id="-", client_secret="-")
    assert (resp.status, await resp.json()) == (401, INVALID_CLIENT)


async def test_token_body_shape(fake_and_client: Any) -> None:
    _, client = fake_and_client
    body = await tokens(client, scope="read_user read_api")
    assert set(body) == {"access_token", "token_type", "expires_in", "refresh_token", "scope", "created_at"}
    assert HEX64.fullmatch(body["access_token"]) and HEX64.fullmatch(body["refresh_token"])
    assert (body["token_type"], body["expires_in"], body["scope"]) == ("Bearer", 7200, "read_user read_api")
    assert isinstance(body["created_at"], int)


async def test_refresh_rotates_both_tokens(fake_and_client: Any) -> None:
    _, client = fake_and_client
    first = await tokens(client)
    form = {
        "grant_type": "refresh_token",
        "refresh_token": first["refresh_token"],
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
    }
    resp = await client.post("/oauth/token", data=form)
    second = await resp.json()
    assert resp.status == 200 and second["access_token"] != first["access_token"]
    assert "id_token" not in second

    old = await client.get("/api/v4/user", headers=bearer(first["access_token"]))
    assert old.status == 401
    revoked = "Token was revoked. You have to re-authorize from the user."
    assert (await old.json())["error_description"] == revoked
    assert (await client.get("/api/v4/user", headers=bearer(second["access_token"]))).status == 200

    reuse = await client.post("/oauth/token", data=form)
    assert (reuse.status, await reuse.json()) == (400, INVALID_GRANT)


async def test_revoke_is_always_200_and_kills_the_token(fake_and_client: Any) -> None:
    _, client = fake_and_client
    body = await tokens(client)
    auth = {"Authorization": aiohttp.encode_basic_auth(CLIENT_ID, CLIENT_SECRET)}
    for token in ("unknown-token", body["access_token"]):
        resp = await client.post("/oauth/revoke", data={"token": token}, headers=auth)
        assert (resp.status, await resp.json()) == (200, {})
    assert (await client.get("/oauth/userinfo", headers=bearer(body["access_token"]))).status == 401


# ------------------------------------------------------------------ OpenID Connect


async def test_userinfo_bad_tokens_are_401_with_empty_body(fake_and_client: Any) -> None:
    fake, client = fake_and_client
    resp = await client.get("/oauth/userinfo", headers=bearer("f" * 64))
    assert resp.status == 401 and await resp.read() == b""
    assert resp.headers["WWW-Authenticate"].startswith('Bearer realm="Doorkeeper", error="invalid_token"')

    body = await tokens(client)
    fake.expire_token(body["access_token"])
    resp = await client.post("/oauth/userinfo", headers=bearer(body["access_token"]))
    assert resp.status == 401 and await resp.read() == b""
    assert 'error_description="The access token expired"' in resp.headers["WWW-Authenticate"]

    dave = await tokens(client, "dave", scope="openid")  # GitLab finds owners with User.active
    resp = await client.get("/oauth/userinfo", headers=bearer(dave["access_token"]))
    assert resp.status == 401 and await resp.read() == b""


async def test_userinfo_without_openid_is_403_with_empty_body(fake_and_client: Any) -> None:
    _, client = fake_and_client
    body = await tokens(client, scope="read_user")
    resp = await client.get("/oauth/userinfo", headers=bearer(body["access_token"]))
    assert resp.status == 403 and await resp.read() == b""


async def test_userinfo_email_needs_the_email_scope(fake_and_client: Any) -> None:
    _, client = fake_and_client
    with_email = await tokens(client, "alice", scope="openid email")
    info = await (await client.get("/oauth/userinfo", headers=bearer(with_email["access_token"]))).json()
    assert (info["email"], info["email_verified"]) == ("alice@corp.example", True)

    without = await tokens(client, "alice", scope="openid")
    info = await (await client.get("/oauth/userinfo", headers=bearer(without["access_token"]))).json()
    assert "email" not in info and "email_verified" not in info

    public = await tokens(client, "bob", scope="openid")
    info = await (await client.get("/oauth/userinfo", headers=bearer(public["access_token"]))).json()
    assert info["email"] == "bob@public.example"


async def test_userinfo_groups_and_role_claims(fake_and_client: Any) -> None:
    _, client = fake_and_client
    alice = await tokens(client, "alice", scope="openid")
    info = await (await client.get("/oauth/userinfo", headers=bearer(alice["access_token"]))).json()
    assert info["sub"] == "1" and info["preferred_username"] == "alice" and info["nickname"] == "alice"
    assert info["profile"].endswith("/alice") and HEX64.fullmatch(info["sub_legacy"])
    assert info["groups"] == ["acme", "acme/platform", "acme/platform/sre", "acme/docs", "other-org"]
    assert info["https://gitlab.org/claims/groups/owner"] == ["acme"]
    assert info["https://gitlab.org/claims/groups/maintainer"] == ["acme/platform"]
    assert info["https://gitlab.org/claims/groups/developer"] == ["other-org"]

    bob = await tokens(client, "bob", scope="openid")
    info = await (await client.get("/oauth/userinfo", headers=bearer(bob["access_token"]))).json()
    assert info["groups"] == ["acme/platform/sre"]  # no ancestors
    roles = [k for k in info if k.startswith("https://gitlab.org/claims/groups/")]
    assert roles == ["https://gitlab.org/claims/groups/developer"]

    carol = await tokens(client, "carol", scope="openid")
    info = await (await client.get("/oauth/userinfo", headers=bearer(carol["access_token"]))).json()
    assert info["groups"] == []  # minimal access excluded; the claim stays, the role claims go
    assert not any(k.startswith("https://gitlab.org/claims/") for k in info)


async def test_id_token_verifies_against_jwks(fake_and_client: Any) -> None:
    _, client = fake_and_client
    body = await tokens(client, "alice", scope="openid email")
    discovery = await (await client.get("/.well-known/openid-configuration")).json()
    issuer = str(client.make_url("")).rstrip("/")
    assert discovery["issuer"] == issuer
    assert discovery["jwks_uri"] == f"{issuer}/oauth/discovery/keys"
    assert discovery["code_challenge_methods_supported"] == ["plain", "S256"]
    jwks = await (await client.get(local(discovery["jwks_uri"]))).json()
    assert len(jwks["keys"]) >= 2

    for jwk in jwks["keys"]:  # kid is the RFC 7638 thumbprint
        canonical = json.dumps({"e": jwk["e"], "kty": "RSA", "n": jwk["n"]}, separators=(",", ":"))
        thumbprint = base64.urlsafe_b64encode(hashlib.sha256(canonical.encode()).digest()).rstrip(b"=")
        assert jwk["kid"] == thumbprint.decode()

    head_b64, claims_b64, sig_b64 = body["id_token"].split(".")
    header = json.loads(b64url_decode(head_b64))
    assert header["typ"] == "JWT" and header["alg"] == "RS256"
    jwk = next(k for k in jwks["keys"] if k["kid"] == header["kid"])
    public = rsa.RSAPublicNumbers(
        int.from_bytes(b64url_decode(jwk["e"]), "big"), int.from_bytes(b64url_decode(jwk["n"]), "big")
    ).public_key()
    signed = f"{head_b64}.{claims_b64}".encode()
    public.verify(b64url_decode(sig_b64), signed, padding.PKCS1v15(), hashes.SHA256())

    claims = json.loads(b64url_decode(claims_b64))
    assert (claims["iss"], claims["sub"], claims["aud"], claims["nonce"]) == (issuer, "1", CLIENT_ID, "n-456")
    assert claims["exp"] == claims["iat"] + 120 and isinstance(claims["auth_time"], int)
    assert (claims["email"], claims["email_verified"]) == ("alice@corp.example", True)
    assert claims["groups_direct"] == ["acme", "acme/platform", "other-org"]
    assert "website" not in claims and "groups" not in claims


async def test_id_token_omits_nonce_when_not_sent_and_only_with_openid(fake_and_client: Any) -> None:
    _, client = fake_and_client
    body = await tokens(client, "carol", scope="openid", nonce=None)
    claims = json.loads(b64url_decode(body["id_token"].split(".")[1]))
    assert "nonce" not in claims and "groups_direct" not in claims and "email" not in claims
    assert "id_token" not in await tokens(client, "carol", scope="read_user")


# ------------------------------------------------------------------ REST API


async def test_api_user_body_and_query_token(fake_and_client: Any) -> None:
    _, client = fake_and_client
    body = await tokens(client, "alice", scope="read_user")
    resp = await client.get(f"/api/v4/user?access_token={body['access_token']}")
    user = await resp.json()
    assert resp.status == 200
    keys = ("id", "username", "email", "name", "state", "locked", "bot", "external")
    assert {k: user[k] for k in keys} == {
        "id": 1, "username": "alice", "email": "alice@corp.example", "name": "Alice Adams", "state": "active",
        "locked": False, "bot": False, "external": False,
    }  # fmt: skip
    assert user["web_url"] == str(client.make_url("/alice"))
    for key in ("avatar_url", "created_at", "public_email", "confirmed_at", "two_factor_enabled"):
        assert key in user


async def test_api_user_errors(fake_and_client: Any) -> None:
    fake, client = fake_and_client
    assert (await client.get("/api/v4/user")).status == 401
    resp = await client.get("/api/v4/user", headers=bearer("0" * 64))
    assert (resp.status, await resp.json()) == (401, {"message": "401 Unauthorized"})

    openid_only = await tokens(client, "alice", scope="openid")
    resp = await client.get("/api/v4/user", headers=bearer(openid_only["access_token"]))
    assert (resp.status, await resp.json()) == (403, {
        "error": "insufficient_scope",
        "error_description": "The request requires higher privileges than provided by the access token.",
        "scope": "read_user api read_api",
    })  # fmt: skip

    body = await tokens(client, "alice", scope="read_user")
    fake.expire_token(body["access_token"])
    resp = await client.get("/api/v4/user", headers=bearer(body["access_token"]))
    assert (resp.status, await resp.json()) == (401, {
        "error": "invalid_token",
        "error_description": "Token is expired. You can either do re-authorization or token refresh.",
    })  # fmt: skip

    blocked = {"message": "403 Forbidden - Your account has been blocked."}
    dave = await tokens(client, "dave", scope="read_user read_api")
    for path in ("/api/v4/user", "/api/v4/groups?min_access_level=10"):
        resp = await client.get(path, headers=bearer(dave["access_token"]))
        assert (resp.status, await resp.json()) == (403, blocked)

    erin = await tokens(client, "erin", scope="read_user")
    fake.set_user_state("erin", "deactivated")
    resp = await client.get("/api/v4/user", headers=bearer(erin["access_token"]))
    assert resp.status == 403
    assert (await resp.json())["message"].startswith("403 Forbidden - Your account has been deactivated by your "
                                                     "administrator. Please log back in from a web browser")


async def test_groups_direct_plus_descendants_with_min_access_level(fake_and_client: Any) -> None:
    _, client = fake_and_client
    alice = bearer((await tokens(client, "alice"))["access_token"])
    resp = await client.get("/api/v4/groups?min_access_level=10&per_page=100", headers=alice)
    groups = await resp.json()
    assert sorted(g["full_path"] for g in groups) == [
        "acme", "acme/docs", "acme/platform", "acme/platform/sre", "other-org"
    ]  # fmt: skip
    sre = next(g for g in groups if g["full_path"] == "acme/platform/sre")
    assert (sre["id"], sre["path"], sre["parent_id"]) == (12, "sre", 11)
    assert sre["full_name"] == "Acme / Platform / Sre"
    assert sre["web_url"] == str(client.make_url("/groups/acme/platform/sre"))
    for key in ("name", "description", "visibility", "created_at"):
        assert key in sre

    resp = await client.get("/api/v4/groups?min_access_level=40", headers=alice)  # ordered by name
    expected = ["acme", "acme/docs", "acme/platform", "acme/platform/sre"]
    assert [g["full_path"] for g in await resp.json()] == expected

    bob = await tokens(client, "bob")
    resp = await client.get("/api/v4/groups?min_access_level=10", headers=bearer(bob["access_token"]))
    assert [g["full_path"] for g in await resp.json()] == ["acme/platform/sre"]
    resp = await client.get("/api/v4/groups", headers=bearer(bob["access_token"]))  # ancestors too
    assert sorted(g["full_path"] for g in await resp.json()) == ["acme", "acme/platform", "acme/platform/sre"]

    carol = await tokens(client, "carol")
    resp = await client.get("/api/v4/groups?min_access_level=10", headers=bearer(carol["access_token"]))
    assert await resp.json() == []  # minimal access (5) is not membership


async def test_groups_listing_follows_renames_and_transfers_after_being_listed(fake_and_client: Any) -> None:
    """The listing's JSON is kept per group (the sign-in benchmark lists 50 groups per sign-in): what a rename,
    a transfer or a deletion changes shows at once, and the body is what encoding the entities gives."""
    fake, client = fake_and_client
    alice = bearer((await tokens(client, "alice"))["access_token"])

    async def listing() -> list[dict[str, Any]]:
        resp = await client.get("/api/v4/groups?min_access_level=10&per_page=100", headers=alice)
        assert resp.content_type == "application/json"
        body = await resp.text()
        entities = [fake._group_entity(str(client.make_url("")).rstrip("/"), fake.group(g["id"]))
                    for g in json.loads(body)]
        assert body == json.dumps(entities)
        return entities

    before = {g["id"]: g["full_path"] for g in await listing()}
    assert before[12] == "acme/platform/sre"
    fake.rename_group("acme/platform", "infra")
    fake.transfer_group("acme/docs", "other-org")
    after = {g["id"]: (g["full_path"], g["parent_id"]) for g in await listing()}
    assert after[11] == ("acme/infra", 10) and after[12] == ("acme/infra/sre", 11)
    assert after[13][0] == "other-org/docs" and after[13][1] == fake.group("other-org").id
    fake.delete_group("acme/infra")
    assert {g["full_path"] for g in await listing()} == {"acme", "other-org", "other-org/docs"}


async def test_groups_need_read_api(fake_and_client: Any) -> None:
    _, client = fake_and_client
    body = await tokens(client, "alice", scope="read_user openid")
    resp = await client.get("/api/v4/groups?min_access_level=10", headers=bearer(body["access_token"]))
    assert resp.status == 403
    assert await resp.json() == {
        "error": "insufficient_scope",
        "error_description": "The request requires higher privileges than provided by the access token.",
        "scope": "api read_api",
    }


async def test_groups_pagination_headers(aiohttp_client: ClientFactory) -> None:
    fake = seeded()
    for i in range(250):
        fake.add_group(1000 + i, f"team-{i:03d}", parent="acme/docs")
    client = await aiohttp_client(create_app(fake))
    auth = bearer((await tokens(client, "alice"))["access_token"])

    resp = await client.get("/api/v4/groups?min_access_level=10&per_page=250&search=team", headers=auth)
    assert len(await resp.json()) == 100
    h = resp.headers
    assert (h["X-Page"], h["X-Per-Page"], h["X-Next-Page"], h["X-Prev-Page"]) == ("1", "100", "2", "")
    assert (h["X-Total"], h["X-Total-Pages"]) == ("250", "3")
    rels = links(resp)
    assert set(rels) == {"next", "first", "last"}
    assert rels["next"].startswith(str(client.make_url("/api/v4/groups?")))
    assert query_of(rels["next"]) == {
        "min_access_level": ["10"], "per_page": ["100"], "search": ["team"], "page": ["2"]
    }  # fmt: skip

    seen: list[str] = []
    url: str | None = local(rels["first"])
    while url:  # follow rel="next" the way the gateway's client does
        resp = await client.get(url, headers=auth)
        seen += [g["path"] for g in await resp.json()]
        url = local(links(resp)["next"]) if resp.headers["X-Next-Page"] else None
    assert seen == [f"team-{i:03d}" for i in range(250)]
    h = resp.headers
    assert (h["X-Page"], h["X-Next-Page"], h["X-Prev-Page"]) == ("3", "", "2")
    assert set(links(resp)) == {"prev", "first", "last"}

    resp = await client.get("/api/v4/groups?min_access_level=10", headers=auth)
    assert (resp.headers["X-Per-Page"], len(await resp.json())) == ("20", 20)
    resp = await client.get("/api/v4/groups?min_access_level=7", headers=auth)
    assert resp.status == 400


# ------------------------------------------------------------------ failure injection


async def test_failure_on_one_page_only(fake_and_client: Any) -> None:
    fake, client = fake_and_client
    auth = bearer((await tokens(client, "alice"))["access_token"])
    fake.fail("groups", 500, page=3)
    statuses = []
    for page in (1, 2, 3, 3):
        statuses.append((await client.get(f"/api/v4/groups?per_page=1&page={page}", headers=auth)).status)
    assert statuses == [200, 200, 500, 200]


async def test_failure_429_like_gitlab_throttle(fake_and_client: Any) -> None:
    fake, client = fake_and_client
    fake.fail("token", 429)
    fake.fail("user", 429, retry_after=7, times=None)
    resp = await exchange(client, "whatever")
    assert (resp.status, await resp.text(), resp.headers["Retry-After"]) == (429, "Retry later\n", "60")
    assert resp.content_type == "text/plain"
    for _ in range(2):
        resp = await client.get("/api/v4/user")
        assert (resp.status, resp.headers["Retry-After"]) == (429, "7")
    fake.clear_failures()
    assert (await client.get("/api/v4/user")).status == 401
    assert ("GET", "/api/v4/user") in fake.requests


async def test_failure_delay_and_slow_success(fake_and_client: Any) -> None:
    fake, client = fake_and_client
    fake.fail("discovery", 0, delay=0.3)
    with pytest.raises(asyncio.TimeoutError):
        await client.get("/.well-known/openid-configuration", timeout=aiohttp.ClientTimeout(total=0.05))
    fake.fail("keys", 0, delay=0.05)
    resp = await client.get("/oauth/discovery/keys")
    assert resp.status == 200 and "keys" in await resp.json()
    with pytest.raises(ValueError):
        fake.fail("nope")


# ------------------------------------------------------------------ browser flows


async def test_browser_flow_sign_in_then_redirect_with_code_and_state(fake_and_client: Any) -> None:
    _, client = fake_and_client
    query = authorize_query(redirect_uri="http://127.0.0.1:4180/cb?tenant=a")
    resp = await client.get(f"/oauth/authorize?{query}", allow_redirects=False)
    assert resp.status == 302
    sign_in_url = local(resp.headers["Location"])
    assert sign_in_url.startswith("/users/sign_in?redirect_to=")

    page = await (await client.get(sign_in_url)).text()
    for user in ("alice", "bob", "carol", "dave", "erin"):
        assert f'id="sign-in-{user}"' in page
    assert "blocked" in page
    redirect_to = re.search(r'name="redirect_to" value="([^"]*)"', page)
    assert redirect_to is not None
    form = {"username": "alice", "redirect_to": redirect_to.group(1).replace("&amp;", "&")}
    resp = await client.post("/users/sign_in", data=form, allow_redirects=False)
    cookie = resp.headers["Set-Cookie"]
    assert cookie.startswith("_gitlab_session=") and "httponly" in cookie.lower()
    back = resp.headers["Location"]
    assert urlsplit(back).path == "/oauth/authorize" and query_of(back) == parse_qs(query)

    resp = await client.get(local(resp.headers["Location"]), allow_redirects=False)
    location = resp.headers["Location"]
    assert location.startswith("http://127.0.0.1:4180/cb?tenant=a&code=")
    params = query_of(location)
    assert params["state"] == ["st-123"] and HEX64.fullmatch(params["code"][0])


async def test_loopback_redirect_port_is_ignored(fake_and_client: Any) -> None:
    _, client = fake_and_client
    code = await get_code(client, redirect_uri="http://127.0.0.1:9999/cb?tenant=a")
    assert (await exchange(client, code, redirect_uri="http://127.0.0.1:9999/cb?tenant=a")).status == 200
    await sign_in(client, "alice")
    query = authorize_query(redirect_uri="http://10.0.0.1:4180/cb?tenant=a")  # not loopback: exact
    resp = await client.get(f"/oauth/authorize?{query}")
    assert resp.status == 200 and "invalid_redirect_uri" in await resp.text()


async def test_untrusted_app_consent_deny_and_approve(fake_and_client: Any) -> None:
    _, client = fake_and_client
    await sign_in(client, "bob")
    query = authorize_query(client_id=UNTRUSTED_ID, scope="read_user")
    resp = await client.get(f"/oauth/authorize?{query}", allow_redirects=False)
    page = await resp.text()
    assert resp.status == 200 and 'id="authorize"' in page and 'id="deny"' in page
    assert 'name="_method" value="delete"' in page

    authorize_form = page.split('id="authorize"')[0]
    fields = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)">', authorize_form))
    resp = await client.post("/oauth/authorize", data={**fields, "_method": "delete"}, allow_redirects=False)
    assert resp.headers["Location"] == (
        f"{REDIRECT_URI}?error=access_denied&error_description=The+resource+owner+or+authorization+server"
        "+denied+the+request.&state=st-123"
    )

    resp = await client.post("/oauth/authorize", data=fields, allow_redirects=False)
    assert resp.status == 302 and "code=" in resp.headers["Location"]
    code = query_of(resp.headers["Location"])["code"][0]
    resp = await exchange(client, code, client_id=UNTRUSTED_ID, client_secret=UNTRUSTED_SECRET)
    assert resp.status == 200

    # Doorkeeper skips consent when the app already holds a live token with the same scopes.
    resp = await client.get(f"/oauth/authorize?{query}", allow_redirects=False)
    assert resp.status == 302


@pytest.mark.parametrize(
    ("override", "error"),
    [
        ({"client_id": "nobody"}, "invalid_client"),
        ({"redirect_uri": "https://evil.example/cb"}, "invalid_redirect_uri"),
        ({"scope": "openid sudo"}, "invalid_scope"),
        ({"response_type": "token"}, "unsupported_response_type"),
        ({"code_challenge_method": "S512"}, "invalid_code_challenge_method"),
    ],
)
async def test_invalid_authorize_requests_get_a_200_error_page(
    fake_and_client: Any, override: dict[str, str], error: str
) -> None:
    _, client = fake_and_client
    await sign_in(client, "alice")
    resp = await client.get(f"/oauth/authorize?{authorize_query(**override)}", allow_redirects=False)
    assert resp.status == 200 and resp.content_type == "text/html"
    assert f'<p id="error-code">{error}</p>' in await resp.text()


async def test_omitted_scope_defaults_to_api(fake_and_client: Any) -> None:
    _, client = fake_and_client
    body = await tokens(client, scope=None)
    assert body["scope"] == "api"


async def test_sign_in_redirect_stays_local_and_sign_out(fake_and_client: Any) -> None:
    _, client = fake_and_client
    for target in ("https://evil.example/", "//evil.example/x", "/\\evil.example"):
        resp = await client.post(
            "/users/sign_in", data={"username": "bob", "redirect_to": target}, allow_redirects=False
        )
        assert local(resp.headers["Location"]) == "/"
    assert "Signed in as <b>bob</b>" in await (await client.get("/")).text()
    resp = await client.get("/users/sign_out", allow_redirects=False)
    assert resp.status == 302
    assert "Not signed in" in await (await client.get("/")).text()
    resp = await client.post("/users/sign_in", data={"username": "mallory"})
    assert "Invalid login" in await resp.text()


async def test_base_path_subpath(aiohttp_client: ClientFactory) -> None:
    fake = seeded(base_path="/gitlab/")
    client = await aiohttp_client(create_app(fake))
    root = str(client.make_url("/gitlab"))
    discovery = await (await client.get("/gitlab/.well-known/openid-configuration")).json()
    assert discovery["issuer"] == root
    assert discovery["token_endpoint"] == f"{root}/oauth/token"
    assert (await client.get("/.well-known/openid-configuration")).status == 404
    assert await (await client.get("/gitlab/-/health")).text() == "GitLab OK"

    resp = await client.get(f"/gitlab/oauth/authorize?{authorize_query()}", allow_redirects=False)
    assert local(resp.headers["Location"]).startswith("/gitlab/users/sign_in?redirect_to=%2Fgitlab%2Foauth")
    code = await get_code(client, "alice", base="/gitlab")
    resp = await exchange(client, code, base="/gitlab")
    body = await resp.json()
    claims = json.loads(b64url_decode(body["id_token"].split(".")[1]))
    assert claims["iss"] == root
    resp = await client.get("/gitlab/api/v4/groups?search=acme", headers=bearer(body["access_token"]))
    assert [g["web_url"] for g in await resp.json()] == [f"{root}/groups/acme"]

    fake.external_url = "https://gitlab.example.com/gitlab"
    discovery = await (await client.get("/gitlab/.well-known/openid-configuration")).json()
    assert discovery["issuer"] == "https://gitlab.example.com/gitlab"


# ------------------------------------------------------------------ seeding API


def test_group_rename_delete_and_validation() -> None:
    fake = seeded()
    fake.rename_group("acme/platform", "infra")
    assert fake.group(12).full_path == "acme/infra/sre" and fake.group("ACME/INFRA").id == 11
    assert fake.user_groups("bob") == ["acme/infra/sre"]
    fake.rename_user("bob", "robert")
    assert fake.user("robert").id == 2
    fake.delete_group("acme/infra")
    assert fake.user_groups("robert") == []
    assert fake.user_groups("alice") == ["acme", "acme/docs", "other-org"]
    fake.remove_member("alice", "other-org")
    assert fake.user_groups("alice") == ["acme", "acme/docs"]
    for bad in ("-x", "a--b", "x.git", "Acme"):
        with pytest.raises(ValueError):
            fake.add_group(99, bad)  # "Acme" collides with "acme" case-insensitively
    with pytest.raises(ValueError):
        fake.add_member("alice", "acme", 35)


async def test_demo_seed_and_serve_on_a_real_socket() -> None:
    fake = FakeGitLab()
    demo_seed(fake, client_id="demo", client_secret="s", redirect_uri="http://127.0.0.1:4180/oauth2/callback")
    assert fake.user_groups("alice") == ["acme", "acme/platform", "acme/platform/sre"]
    assert fake.user_groups("bob") == ["acme/platform/sre"]
    assert fake.user_groups("carol") == ["other-org"]
    assert fake.user("dave").state == "blocked"

    runner = await serve(fake, "127.0.0.1", 0)
    try:
        host, port = runner.addresses[0][:2]
        async with aiohttp.ClientSession() as session, session.get(f"http://{host}:{port}/-/health") as resp:
            assert await resp.text() == "GitLab OK"
    finally:
        await runner.cleanup()


# ------------------------------------------------------------------ why GitLab refuses a user (SPEC §16)

# Word for word GitLab's Gitlab::Auth::UserAccessDeniedReason#rejection_message, behind lib/api/helpers.rb's
# "403 Forbidden - " (lib/api/api_guard.rb find_current_user!); {url} is GitLab's URL, {user} the username.
API_REFUSALS = [
    ({"state": "blocked"}, "Your account has been blocked."),
    ({"state": "ldap_blocked"}, "Your account has been blocked."),
    ({"state": "banned"}, "Your account has been blocked."),
    ({"state": "blocked_pending_approval"},
     "Your account is pending approval from your administrator and hence blocked."),
    ({"state": "deactivated"}, "Your account has been deactivated by your administrator. Please log back in from "
                               "a web browser to reactivate your account at {url}"),
    ({"email_confirmation": "required"},
     "Your primary email address is not confirmed. Please check your inbox for the confirmation instructions. "
     "In case the link is expired, you can request a new confirmation email at {url}/users/confirmation/new"),
    ({"password_expired": True},
     "Your password expired. Please access GitLab from a web browser to update your password."),
    ({"terms_accepted": False}, "You (@{user}) must accept the Terms of Service in order to perform this action. "
                                "To accept these terms, please access GitLab from a web browser at {url}."),
    ({"user_type": "alert_bot"}, "This action cannot be performed by internal users"),
    # GitLab's order: internal first, then pending approval, terms, deactivated, unconfirmed, blocked, password.
    ({"user_type": "support_bot", "state": "blocked"}, "This action cannot be performed by internal users"),
    ({"state": "deactivated", "terms_accepted": False}, "You (@{user}) must accept the Terms of Service in order "
     "to perform this action. To accept these terms, please access GitLab from a web browser at {url}."),
    ({"state": "blocked", "password_expired": True}, "Your account has been blocked."),
]


@pytest.mark.parametrize(("holds", "reason"), API_REFUSALS, ids=[str(h) for h, _ in API_REFUSALS])
async def test_api_refuses_users_with_gitlabs_reason(fake_and_client: Any, holds: dict[str, Any],
                                                     reason: str) -> None:
    fake, client = fake_and_client
    fake.add_user(50, "zoe", **holds)
    body = await tokens(client, "zoe", scope="openid email read_user read_api")
    url = str(client.make_url("")).rstrip("/")
    for path in ("/api/v4/user", "/api/v4/groups?min_access_level=10"):
        resp = await client.get(path, headers=bearer(body["access_token"]))
        assert (resp.status, await resp.json()) == (
            403, {"message": "403 Forbidden - " + reason.format(url=url, user="zoe")})
    # Doorkeeper still says whose token it is.
    info = await client.get("/oauth/token/info", headers=bearer(body["access_token"]))
    assert info.status == 200 and (await info.json())["resource_owner_id"] == 50
    # userinfo finds the owner with User.active (active state, not internal): nobody for these.
    userinfo = await client.get("/oauth/userinfo", headers=bearer(body["access_token"]))
    inactive = holds.get("state", "active") != "active" or "user_type" in holds
    assert userinfo.status == (401 if inactive else 200)


async def test_soft_email_confirmation_lets_the_user_in_unverified(fake_and_client: Any) -> None:
    fake, client = fake_and_client
    fake.add_user(50, "zoe", email_confirmation="pending")
    body = await tokens(client, "zoe", scope="openid email read_user")
    user = await (await client.get("/api/v4/user", headers=bearer(body["access_token"]))).json()
    assert user["confirmed_at"] is None
    claims = await (await client.get("/oauth/userinfo", headers=bearer(body["access_token"]))).json()
    assert claims["email_verified"] is False and claims["email"] == "zoe@example.com"


async def test_token_info_of_an_unknown_token_is_401(fake_and_client: Any) -> None:
    _, client = fake_and_client
    resp = await client.get("/oauth/token/info", headers=bearer("nope"))
    assert resp.status == 401 and (await resp.json())["error"] == "invalid_token"
