"""HeaderPolicy (SPEC §7): what the upstream and the client receive, and what they never receive."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.access.headers import (
    HOP_BY_HOP,
    HeaderPolicy,
    auth_response_headers,
    hop_by_hop_names,
    is_spoofed,
)
from gateway.config import Config
from gateway.identity import ANONYMOUS, Anonymous, Identity

ALICE = Identity(user_id=7, login="alice", email="alice@example.com", groups=("zeta", "gateway-users", "dev"))
TRUSTED = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8"))
POLICY = HeaderPolicy(trusted_proxies=TRUSTED)
OWN = "tool.example.com"
IDENTITY_NAMES = {
    "x-forwarded-user", "x-forwarded-email", "x-forwarded-preferred-username", "x-forwarded-groups",
}


def headers(*items: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(items))


def upstream(
    *items: tuple[str, str], policy: HeaderPolicy = POLICY, client_ip: str = "203.0.113.5",
    identity: Identity | Anonymous | None = None, pass_host_header: bool = True, websocket: bool = False,
) -> CIMultiDict[str]:
    return policy.upstream_request_headers(
        headers(("Host", "tool.example.com"), *items), client_ip=client_ip, scheme="https",
        host="tool.example.com", identity=identity, pass_host_header=pass_host_header,
        upstream_host="127.0.0.1:8080", websocket=websocket,
    )


# --- identity --------------------------------------------------------------------------------------------


def test_identity_sorts_groups_once_and_anonymous_is_not_authenticated() -> None:
    assert ALICE.groups == ("dev", "gateway-users", "zeta")
    assert ALICE.groups_csv == "dev,gateway-users,zeta"
    assert ALICE.is_authenticated is True
    assert ANONYMOUS.is_authenticated is False
    assert Identity(1, "bob", "b@example.com", ()).groups_csv == ""


# --- spoofing ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "spoofed"),
    [
        ("X-Forwarded-User", True),
        ("x_forwarded_groups", True),
        ("X-FORWARDED-EMAIL", True),
        ("X_Forwarded-Preferred_Username", True),
        ("X-Auth-Request-User", True),
        ("x-auth-request-anything", True),
        ("X_AUTH_REQUEST_GROUPS", True),
        ("X-Forwarded-Users", False),
        ("X-Forwarded-For", False),
        ("X-Auth-Requester", False),
        ("Authorization", False),
    ],
)
def test_is_spoofed(name: str, spoofed: bool) -> None:
    assert is_spoofed(name, frozenset(IDENTITY_NAMES)) is spoofed


SPOOFS = ["X-Forwarded-User", "x_forwarded_groups", "X-FORWARDED-EMAIL", "x-forwarded-preferred-username",
          "X-Auth-Request-User", "x-auth-request-anything", "X_Auth_Request_Email"]


@pytest.mark.parametrize("name", SPOOFS)
def test_client_identity_headers_never_reach_upstream(name: str) -> None:
    out = upstream((name, "mallory"), (name, "admin"), ("X-Other", "kept"))
    assert all(v != "mallory" and v != "admin" for v in out.values()), dict(out)
    assert out["X-Other"] == "kept"


@pytest.mark.parametrize("name", SPOOFS)
def test_signed_in_user_gets_exactly_one_value_per_identity_header(name: str) -> None:
    out = upstream((name, "mallory"), (name, "admin"), identity=ALICE)
    assert "mallory" not in out.values() and "admin" not in out.values()
    for header in ("X-Forwarded-User", "X-Forwarded-Email", "X-Forwarded-Preferred-Username",
                   "X-Forwarded-Groups"):
        assert len(out.getall(header)) == 1


def test_identity_header_values() -> None:
    out = upstream(identity=ALICE)
    assert out["X-Forwarded-User"] == "alice"
    assert out["X-Forwarded-Preferred-Username"] == "alice"
    assert out["X-Forwarded-Email"] == "alice@example.com"
    assert out["X-Forwarded-Groups"] == "dev,gateway-users,zeta"


@pytest.mark.parametrize("identity", [None, ANONYMOUS])
def test_no_identity_headers_without_a_session(identity: Anonymous | None) -> None:
    out = upstream(("X-Forwarded-User", "mallory"), identity=identity)
    assert not {k.lower() for k in out} & IDENTITY_NAMES


def test_custom_identity_header_names_are_stripped_and_set() -> None:
    policy = HeaderPolicy(user="Remote-User", email="Remote-Email", preferred_username="Remote-Name",
                          groups="Remote-Groups", trusted_proxies=TRUSTED)
    out = upstream(("remote_user", "mallory"), ("REMOTE-GROUPS", "admins"), ("X-Auth-Request-User", "m"),
                   ("X-Forwarded-User", "not-ours-any-more"), policy=policy, identity=ALICE)
    assert out.getall("Remote-User") == ["alice"]
    assert out.getall("Remote-Groups") == ["dev,gateway-users,zeta"]
    assert out.getall("Remote-Name") == ["alice"]
    assert "X-Auth-Request-User" not in out
    # Only the configured names are ours (SPEC §7): the default name is an ordinary header now.
    assert out["X-Forwarded-User"] == "not-ours-any-more"


def test_auth_response_headers() -> None:
    assert auth_response_headers(ALICE) == POLICY.auth_response_headers(ALICE) == {
        "X-Auth-Request-User": "alice",
        "X-Auth-Request-Email": "alice@example.com",
        "X-Auth-Request-Preferred-Username": "alice",
        "X-Auth-Request-Groups": "dev,gateway-users,zeta",
    }


# --- cookies -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sent", "expected"),
    [
        (["_gateway=abc"], []),
        (["_gateway=abc; _gateway_csrf=x; _gateway_state=s"], []),
        (["other=1; _gateway=abc; theme=dark"], ["other=1; theme=dark"]),
        (["_gateway_csrf=x; other=1"], ["other=1"]),
        (["other=1;_gateway_state=s;theme=dark"], ["other=1; theme=dark"]),
        (["other=1; theme=dark"], ["other=1; theme=dark"]),
        (["other=1;theme=\"a b\""], ["other=1;theme=\"a b\""]),
        (["x_gateway=1; gateway=2; _Gateway=3"], ["x_gateway=1; gateway=2; _Gateway=3"]),
        (["_gateway=a", "other=1; _gateway_state=b", "theme=dark"], ["other=1", "theme=dark"]),
        (["_gateway", "other=1; _gateway ; x=_gateway"], ["other=1; x=_gateway"]),
    ],
)
def test_gateway_cookies_are_removed(sent: list[str], expected: list[str]) -> None:
    out = upstream(*(("Cookie", value) for value in sent))
    assert out.getall("Cookie", []) == expected


def test_cookie_prefix_follows_session_cookie_name() -> None:
    policy = HeaderPolicy(cookie_prefix="sso")
    out = upstream(("Cookie", "_gateway=1; sso=2; sso_state=3"), policy=policy)
    assert out.getall("Cookie") == ["_gateway=1"]


def test_empty_cookie_prefix_is_refused() -> None:
    with pytest.raises(ValueError, match="cookie_prefix"):
        HeaderPolicy(cookie_prefix="")


# --- hop-by-hop --------------------------------------------------------------------------------------------


def test_hop_by_hop_names_include_connection_tokens() -> None:
    found = hop_by_hop_names(headers(("Connection", "keep-alive, X-Hop-One"), ("Connection", " x-hop-two ,")))
    assert found == HOP_BY_HOP | {"x-hop-one", "x-hop-two"}
    assert hop_by_hop_names(headers()) == HOP_BY_HOP


def test_hop_by_hop_headers_are_not_forwarded_upstream() -> None:
    out = upstream(
        ("Connection", "keep-alive, X-Hop"), ("Connection", "Upgrade"), ("Keep-Alive", "timeout=5"),
        ("TE", "trailers"), ("Trailer", "X-Checksum"), ("Transfer-Encoding", "chunked"), ("Upgrade", "h2c"),
        ("Proxy-Authorization", "Basic eA=="), ("Proxy-Connection", "keep-alive"), ("X-Hop", "1"),
        ("Content-Length", "12"), ("X-Kept", "yes"),
    )
    names = {k.lower() for k in out}
    assert not names & (HOP_BY_HOP | {"x-hop"})
    assert out["Content-Length"] == "12"
    assert out["X-Kept"] == "yes"


def test_underscore_spellings_of_special_headers_are_read_as_the_header() -> None:
    out = upstream(("X_Forwarded_For", "1.2.3.4"), ("Transfer_Encoding", "chunked"), ("Content_Length", "5"),
                   ("Content-Length", "12"), ("Proxy_Authorization", "Basic eA=="), ("X_Custom", "kept"))
    assert list(out.items()) == [
        ("Host", "tool.example.com"), ("Content-Length", "12"), ("X_Custom", "kept"),
        ("X-Forwarded-For", "203.0.113.5"), ("X-Forwarded-Proto", "https"), ("X-Forwarded-Host", OWN),
    ]


@pytest.mark.parametrize(("websocket", "forwarded"), [(True, False), (False, True)])
def test_websocket_handshake_headers_are_left_to_the_relay(websocket: bool, forwarded: bool) -> None:
    out = upstream(("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="), ("Sec-WebSocket-Extensions",
                   "permessage-deflate"), ("Upgrade", "websocket"), ("Origin", "https://tool.example.com"),
                   websocket=websocket)
    assert ("Sec-WebSocket-Key" in out) is forwarded
    assert ("Sec-WebSocket-Extensions" in out) is forwarded
    assert "Upgrade" not in out
    assert out["Origin"] == "https://tool.example.com"


def test_response_headers_drop_hop_by_hop_and_keep_the_rest_as_sent() -> None:
    out = POLICY.response_headers(headers(
        ("Connection", "close, X-Internal"), ("X-Internal", "secret"), ("Transfer-Encoding", "chunked"),
        ("Keep-Alive", "timeout=5"), ("Set-Cookie", "a=1; Path=/"), ("Set-Cookie", "b=2; HttpOnly"),
        ("Location", "/next?x=%2F"), ("Content-Length", "42"), ("Content-Encoding", "gzip"),
    ))
    assert list(out.items()) == [
        ("Set-Cookie", "a=1; Path=/"), ("Set-Cookie", "b=2; HttpOnly"), ("Location", "/next?x=%2F"),
        ("Content-Length", "42"), ("Content-Encoding", "gzip"),
    ]


# --- host and forwarding -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pass_host_header", "expected"), [(True, "tool.example.com"), (False, "127.0.0.1:8080")]
)
def test_pass_host_header(pass_host_header: bool, expected: str) -> None:
    out = upstream(pass_host_header=pass_host_header)
    assert out.getall("Host") == [expected]
    assert out["X-Forwarded-Host"] == "tool.example.com"


def test_untrusted_client_cannot_choose_forwarding_facts() -> None:
    out = upstream(("X-Forwarded-For", "1.2.3.4"), ("X-Forwarded-Proto", "http"),
                   ("X-Forwarded-Host", "evil"), ("Forwarded", "for=1.2.3.4"), ("X-Real-IP", "1.2.3.4"),
                   client_ip="203.0.113.5")
    assert out.getall("X-Forwarded-For") == ["203.0.113.5"]
    assert out.getall("X-Forwarded-Proto") == ["https"]
    assert out.getall("X-Forwarded-Host") == ["tool.example.com"]
    assert "Forwarded" not in out and "X-Real-IP" not in out


def test_trusted_proxy_values_are_kept_and_its_address_appended() -> None:
    out = upstream(("X-Forwarded-For", "198.51.100.7"), ("x-forwarded-for", "10.1.1.1"),
                   ("X-Forwarded-Proto", "http"), ("X-Forwarded-Host", "public.example.com"),
                   ("X-Real-IP", "198.51.100.7"), client_ip="10.0.0.2")
    assert out.getall("X-Forwarded-For") == ["198.51.100.7, 10.1.1.1, 10.0.0.2"]
    assert out.getall("X-Forwarded-Proto") == ["http"]
    assert out.getall("X-Forwarded-Host") == ["public.example.com"]
    assert out["X-Real-IP"] == "198.51.100.7"


def test_no_forwarded_host_when_the_request_had_no_host() -> None:
    out = POLICY.upstream_request_headers(
        headers(("X-Forwarded-Host", "evil")), client_ip="203.0.113.5", scheme="http", host="",
        identity=None, pass_host_header=True, upstream_host="127.0.0.1:8080",
    )
    assert out.getall("Host") == ["127.0.0.1:8080"]
    assert "X-Forwarded-Host" not in out
    assert out["X-Forwarded-Proto"] == "http"


@pytest.mark.parametrize("client_ip", ["10.0.0.2", "::ffff:10.0.0.2", "fd00::1"])
def test_trusted_proxy_without_forwarding_headers_gets_our_own(client_ip: str) -> None:
    out = upstream(client_ip=client_ip)
    assert out.getall("X-Forwarded-For") == [client_ip]
    assert out.getall("X-Forwarded-Proto") == ["https"]
    assert out.getall("X-Forwarded-Host") == ["tool.example.com"]


@pytest.mark.parametrize(
    ("ip", "trusted"),
    [("10.0.0.2", True), ("::ffff:10.0.0.2", True), ("fd00::1", True), ("11.0.0.1", False),
     ("127.0.0.1", False), ("not-an-ip", False), ("", False)],
)
def test_client_ip_is_trusted(ip: str, trusted: bool) -> None:
    assert POLICY.client_ip_is_trusted(ip) is trusted
    assert HeaderPolicy().client_ip_is_trusted(ip) is False


@pytest.mark.parametrize(
    ("remote", "sent", "expected"),
    [
        ("203.0.113.5", [("X-Forwarded-For", "1.2.3.4"), ("X-Forwarded-Proto", "http"),
                         ("X-Forwarded-Host", "evil")], ("203.0.113.5", "https", OWN)),
        ("10.0.0.2", [("X-Forwarded-For", "198.51.100.7, 10.0.0.9"), ("X-Forwarded-Proto", "HTTP, https"),
                      ("X-Forwarded-Host", "public.example.com:8443")],
         ("198.51.100.7", "http", "public.example.com:8443")),
        # A client can prepend anything; only what our proxies appended counts.
        ("10.0.0.2", [("X-Forwarded-For", "1.1.1.1, 198.51.100.7")], ("198.51.100.7", "https", OWN)),
        ("10.0.0.2", [("X-Forwarded-For", "10.0.0.3"), ("X-Forwarded-For", "10.0.0.9")],
         ("10.0.0.3", "https", OWN)),
        ("10.0.0.2", [("X-Forwarded-For", "evil, 10.0.0.9")], ("10.0.0.9", "https", OWN)),
        ("10.0.0.2", [("X-Forwarded-For", "198.51.100.7, unknown, 10.0.0.9")], ("10.0.0.9", "https", OWN)),
        ("10.0.0.2", [("X-Forwarded-For", "198.51.100.7:5555")], ("198.51.100.7", "https", OWN)),
        ("10.0.0.2", [("X-Forwarded-For", "[2001:db8::1]:5555")], ("2001:db8::1", "https", OWN)),
        ("10.0.0.2", [], ("10.0.0.2", "https", OWN)),
        ("10.0.0.2", [("X-Forwarded-Proto", "javascript"), ("X-Forwarded-Host", "a b\r\n")],
         ("10.0.0.2", "https", OWN)),
    ],
)
def test_effective_client(remote: str, sent: list[tuple[str, str]], expected: tuple[str, str, str]) -> None:
    assert POLICY.effective_client(remote, headers(("Host", OWN), *sent), scheme="https") == expected


def test_policy_from_config() -> None:
    policy = HeaderPolicy.from_config(Config())
    assert policy.cookie_prefix == "_gateway"
    assert policy.identity_names == frozenset(IDENTITY_NAMES)
    assert policy.trusted_proxies == ()


# ---- properties (hypothesis) ------------------------------------------------------------------------------

_NAME_PIECES = ["X", "x", "-", "_", "Forwarded", "FORWARDED", "forwarded", "User", "user", "Email", "Groups",
                "Preferred", "Username", "Auth", "AUTH", "Request", "request", "Other", "a", "Sso", "Tenant"]
_TOKEN_CHARS = "!#$%&'*+.^_`|~-0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


@settings(max_examples=400, deadline=None)
@given(names=st.lists(st.one_of(st.lists(st.sampled_from(_NAME_PIECES), min_size=1, max_size=5).map("".join),
                                st.text(alphabet=_TOKEN_CHARS, min_size=1, max_size=12)), max_size=8),
       signed_in=st.booleans(),
       custom=st.sampled_from([HeaderPolicy(trusted_proxies=TRUSTED),
                               HeaderPolicy("X-Sso-User", "X-Sso-Email", "X-Sso-Username", "X-Tenant_Groups")]))
def test_no_spoofed_identity_header_survives(names: list[str], signed_in: bool, custom: HeaderPolicy) -> None:
    """Property: of the headers a client sends, none whose name (lower-cased, "_" read as "-") is a configured
    identity header or starts with x-auth-request- reaches the upstream; the only identity headers the
    upstream sees are the gateway's own, one value each, and only for a signed-in user (SPEC §7)."""
    sent = [(name, "spoofed") for name in names]
    out = upstream(*sent, policy=custom, client_ip="10.1.2.3", identity=ALICE if signed_in else ANONYMOUS)
    for name, value in out.items():
        key = name.lower().replace("_", "-")
        if key in custom.identity_names:
            assert signed_in and value != "spoofed" and len(out.getall(name)) == 1, (name, value)
        assert value != "spoofed" or not (key in custom.identity_names or key.startswith("x-auth-request-"))
