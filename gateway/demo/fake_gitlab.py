"""A GitLab stand-in that runs as a real aiohttp server (for `gateway demo` and the tests).

It answers the endpoints the gateway uses exactly as ../shared/reference/gitlab-api.md describes GitLab:
sign-in page, OAuth 2 authorize/token/revoke (Doorkeeper semantics, PKCE), OpenID Connect discovery, JWKS,
RS256 ID tokens and userinfo, and REST `GET /api/v4/user` and `GET /api/v4/groups` with offset pagination.
Every route lives under `base_path` so a self-managed GitLab on a subpath can be imitated.

Deliberate choices where the reference is silent, each taken from GitLab/Doorkeeper source:
- /oauth/authorize asks for sign-in before validating anything (Doorkeeper's authenticate_resource_owner!).
- A confidential app that already holds a live token with exactly the requested scopes skips the consent page.
- A code survives failed exchanges (bad verifier, wrong redirect_uri) and dies on the first successful one.
- Refresh responses carry no id_token (doorkeeper-openid_connect only adds it for authorization_code).
- Any user may "sign in" here whatever their state, so the gateway's handling of refused users can be
  exercised: their tokens then get GitLab's 403 on /api/v4 with the reason GitLab gives (blocked, pending
  approval, deactivated, unconfirmed email, expired password, terms not accepted, internal account: see
  FakeUser.api_refusal), and blocked, deactivated or internal users get 401 on /oauth/userinfo (GitLab's
  `User.active` lookup finds nobody). GET /oauth/token/info still names the token's owner.
- `external_url` makes it announce another URL (issuer, links, redirects) than the one it is reached at,
  like an in-cluster GitLab whose external_url is its ingress.

Demo users seeded by `demo_seed` (sign in as any of them on /users/sign_in, no password):
- alice: owner of `acme`, maintainer of `acme/platform`; sees acme, acme/platform, acme/platform/sre.
- bob:   developer of `acme/platform/sre` only (a subgroup member; not a member of `acme` itself).
- carol: maintainer of `other-org` only: outside an allowed group "acme".
- dave:  developer of `acme` but his account is `blocked`: GitLab answers 403 for his tokens.

Run it alone with `python -m gateway.demo.fake_gitlab --listen 127.0.0.1:8929`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import functools
import hashlib
import hmac
import html
import json
import math
import re
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import NoReturn
from urllib.parse import quote, urlencode, urlsplit, urlunsplit

from aiohttp import web
from aiohttp.typedefs import Handler
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from multidict import MultiDict

from gateway.demo import fake_gitlab_groups
from gateway.demo.fake_gitlab_groups import THROTTLED_ENDPOINTS, AccessToken, Throttle

ACCESS_MINIMAL = 5
ACCESS_GUEST = 10
ACCESS_DEVELOPER = 30
ACCESS_MAINTAINER = 40
ACCESS_OWNER = 50
ACCESS_LEVELS = frozenset({5, 10, 15, 20, 30, 40, 50})

KNOWN_SCOPES = ("api", "read_api", "read_user", "openid", "profile", "email")
USER_API_SCOPES = ("read_user", "api", "read_api")  # order as GitLab prints it in insufficient_scope
GROUPS_API_SCOPES = ("api", "read_api")
ENDPOINTS = frozenset({"token", "user", "groups", "userinfo", "authorize", "revoke", "discovery", "keys",
                       "token_info", "group", "descendant_groups", "members"})

ACCESS_TOKEN_LIFETIME = 7200
CODE_LIFETIME = 600
ID_TOKEN_LIFETIME = 120
SESSION_COOKIE = "_gitlab_session"
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})
MAX_PER_PAGE = 100
DEFAULT_PER_PAGE = 20
MAX_COUNTED_RESULTS = 10_000  # GitLab drops X-Total/X-Total-Pages above this
MAX_ANCESTORS = 20

INVALID_GRANT = (
    "The provided authorization grant is invalid, expired, revoked, does not match the redirection URI used"
    " in the authorization request, or was issued to another client."
)
INVALID_CLIENT = (
    "Client authentication failed due to unknown client, no client authentication included,"
    " or unsupported authentication method."
)
INVALID_SCOPE = "The requested scope is invalid, unknown, or malformed."
INVALID_REDIRECT_URI = "The requested redirect uri is malformed or doesn't match client redirect URI."
UNSUPPORTED_RESPONSE_TYPE = "The authorization server does not support this response type."
UNSUPPORTED_GRANT_TYPE = "The authorization grant type is not supported by the authorization server."
INVALID_CODE_CHALLENGE_METHOD = "The code challenge method must be plain or S256."
ACCESS_DENIED = "The resource owner or authorization server denied the request."
INSUFFICIENT_SCOPE = "The request requires higher privileges than provided by the access token."
API_TOKEN_EXPIRED = "Token is expired. You can either do re-authorization or token refresh."
API_TOKEN_REVOKED = "Token was revoked. You have to re-authorize from the user."
# Internal accounts (User::INTERNAL_USER_TYPES): GitLab's own bots, refused by the API guard and by
# User.active. project_bot and service_account are bots too, but not internal.
INTERNAL_USER_TYPES = frozenset({"ghost", "support_bot", "alert_bot", "visual_review_bot", "migration_bot",
                                 "security_bot", "automation_bot", "security_policy_bot", "admin_bot",
                                 "suggested_reviewers_bot", "llm_bot", "duo_code_review_bot"})
BOT_USER_TYPES = INTERNAL_USER_TYPES | {"project_bot", "service_account"}
BLOCKED_STATES = frozenset({"blocked", "ldap_blocked", "blocked_pending_approval", "banned"})
EMAIL_CONFIRMATIONS = ("confirmed", "pending", "required")
DOORKEEPER_TOKEN_ERRORS = {
    "unknown": "The access token is invalid",
    "expired": "The access token expired",
    "revoked": "The access token was revoked",
}
ROLE_CLAIMS = (
    ("https://gitlab.org/claims/groups/owner", ACCESS_OWNER),
    ("https://gitlab.org/claims/groups/maintainer", ACCESS_MAINTAINER),
    ("https://gitlab.org/claims/groups/developer", ACCESS_DEVELOPER),
)

_SLUG = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_.-]*[A-Za-z0-9])?")
_CONSECUTIVE_SPECIALS = re.compile(r"[_.-]{2}")


# ---------------------------------------- model


@dataclass
class FakeUser:
    """A GitLab account; mutable because tests rename, block and reactivate users between requests."""

    id: int
    username: str
    name: str
    email: str
    state: str = "active"
    public_email: str | None = None
    # "confirmed"; "pending": unconfirmed within Devise's allow_unconfirmed_access_for (GitLab's "soft"
    # confirmation: the API answers, with confirmed_at null and email_verified false); "required": unconfirmed
    # and GitLab insists (User#confirmation_required_on_sign_in?): the API refuses the user.
    email_confirmation: str = "confirmed"
    password_expired: bool = False
    terms_accepted: bool = True  # False: the instance enforces terms this user has not accepted
    user_type: str = "human"  # or one of INTERNAL_USER_TYPES, project_bot, service_account

    @property
    def internal(self) -> bool:
        return self.user_type in INTERNAL_USER_TYPES

    def api_refusal(self, gitlab_url: str) -> str | None:
        """Why GitLab's API guard refuses this user, word for word, or None when it does not.

        GitLab: lib/api/api_guard.rb (find_current_user! -> forbidden!(api_access_denied_message)), the
        conditions of app/policies/global_policy.rb and base_policy.rb that prevent :access_api/:access_git,
        and lib/gitlab/auth/user_access_denied_reason.rb for the reason and its order.
        """
        unconfirmed = self.email_confirmation != "confirmed"
        refused = (self.state != "active" or self.internal or not self.terms_accepted or self.password_expired
                   or self.email_confirmation == "required")
        if not refused:
            return None
        if self.internal:
            reason = "This action cannot be performed by internal users"
        elif self.state == "blocked_pending_approval":
            reason = "Your account is pending approval from your administrator and hence blocked."
        elif not self.terms_accepted:
            reason = (f"You (@{self.username}) must accept the Terms of Service in order to perform this action. "
                      f"To accept these terms, please access GitLab from a web browser at {gitlab_url}.")
        elif self.state == "deactivated":
            reason = ("Your account has been deactivated by your administrator. Please log back in from a web "
                      f"browser to reactivate your account at {gitlab_url}")
        elif unconfirmed:
            reason = ("Your primary email address is not confirmed. Please check your inbox for the confirmation "
                      "instructions. In case the link is expired, you can request a new confirmation email at "
                      f"{gitlab_url}/users/confirmation/new")
        elif self.state not in BLOCKED_STATES and self.password_expired:
            reason = "Your password expired. Please access GitLab from a web browser to update your password."
        else:
            reason = "Your account has been blocked."
        return f"403 Forbidden - {reason}"


@dataclass
class FakeGroup:
    """A GitLab group; full_path/full_name are kept in sync by FakeGitLab whenever an ancestor changes."""

    id: int
    path: str
    name: str
    parent_id: int | None
    full_path: str = field(default="", init=False)
    full_name: str = field(default="", init=False)


@dataclass(frozen=True)
class IssuedToken:
    """A snapshot of one OAuth token pair, for tests that want to look behind the curtain."""

    access_token: str
    refresh_token: str
    client_id: str
    user_id: int
    scopes: tuple[str, ...]
    created_at: int
    revoked: bool


@dataclass(frozen=True)
class _Application:
    client_id: str
    client_secret: str
    redirect_uris: tuple[str, ...]
    trusted: bool
    scopes: frozenset[str]


@dataclass(frozen=True)
class _AuthorizeRequest:
    app: _Application
    redirect_uri: str
    scopes: tuple[str, ...]
    state: str | None
    code_challenge: str | None
    code_challenge_method: str | None
    nonce: str | None


@dataclass(frozen=True)
class _Grant:
    code: str
    request: _AuthorizeRequest
    user_id: int
    auth_time: int
    expires_at: float


@dataclass
class _Token:
    """Mutable because revocation and test-driven expiry change it in place."""

    access_token: str
    refresh_token: str
    client_id: str
    user_id: int
    scopes: tuple[str, ...]
    created_at: int
    auth_time: int
    revoked: bool = False
    grant_id: str = ""  # every token of one authorization, across refresh rotations
    used: bool = False  # its refresh token was already exchanged (single use)
    personal: bool = False  # a personal access token (glpat-...): no 2-hour lifetime, no refresh token

    def expired(self, now: float) -> bool:
        return not self.personal and self.created_at + ACCESS_TOKEN_LIFETIME <= now


@dataclass(frozen=True)
class _BrowserSession:
    user_id: int
    signed_in_at: int


@dataclass(frozen=True)
class _Hook:
    """A system hook (group_id None) or a group webhook, with its secret token."""

    url: str
    token: str
    group_id: int | None


@dataclass
class _FailureRule:
    endpoint: str
    status: int
    remaining: int | None
    page: int | None
    retry_after: int | None
    delay: float
    body: str | None


class _OAuthError(Exception):
    """A Doorkeeper error answer: {"error", "error_description"}, 401 for invalid_client, else 400."""

    def __init__(self, error: str, description: str) -> None:
        super().__init__(error)
        self.error = error
        self.description = description

    def response(self) -> web.Response:
        status = 401 if self.error == "invalid_client" else 400
        headers = {"Cache-Control": "no-store", "Pragma": "no-cache"}
        if status == 401:
            headers["WWW-Authenticate"] = _www_authenticate("Doorkeeper", self.error, self.description)
        body = {"error": self.error, "error_description": self.description}
        return web.json_response(body, status=status, headers=headers)


class _AuthorizeError(Exception):
    """An authorize request GitLab refuses with its 200 HTML error page (never redirecting back)."""

    def __init__(self, error: str, description: str) -> None:
        super().__init__(error)
        self.error = error
        self.description = description


class _ApiError(Exception):
    """A ready-made error answer of the REST API or of Doorkeeper's protected resources."""

    def __init__(self, status: int, body: object | None, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(status)
        self.status = status
        self.body = body
        self.headers = dict(headers or {})

    def response(self) -> web.Response:
        if self.body is None:  # Doorkeeper answers `head status`: headers only
            return web.Response(status=self.status, headers=self.headers)
        return web.json_response(self.body, status=self.status, headers=self.headers)


# ---------------------------------------- keys


@functools.cache
def _shared_rsa_keys() -> tuple[rsa.RSAPrivateKey, rsa.RSAPrivateKey]:
    """Two RSA keys generated once per process: key generation would dominate test run time otherwise."""
    return (
        rsa.generate_private_key(public_exponent=65537, key_size=2048),
        rsa.generate_private_key(public_exponent=65537, key_size=2048),
    )


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _jwk(key: rsa.RSAPrivateKey) -> dict[str, str]:
    """Public JWK of `key` with kid = RFC 7638 thumbprint, as GitLab publishes it."""
    numbers = key.public_key().public_numbers()
    n = _b64url(numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big"))
    e = _b64url(numbers.e.to_bytes((numbers.e.bit_length() + 7) // 8, "big"))
    canonical = json.dumps({"e": e, "kty": "RSA", "n": n}, separators=(",", ":"), sort_keys=True)
    kid = _b64url(hashlib.sha256(canonical.encode("ascii")).digest())
    return {"kty": "RSA", "kid": kid, "e": e, "n": n, "use": "sig", "alg": "RS256"}


def _sign_jwt(key: rsa.RSAPrivateKey, kid: str, claims: Mapping[str, object]) -> str:
    header = {"typ": "JWT", "alg": "RS256", "kid": kid}
    signing_input = ".".join(
        _b64url(json.dumps(part, separators=(",", ":")).encode()) for part in (header, claims)
    )
    signature = key.sign(signing_input.encode("ascii"), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{_b64url(signature)}"


# ---------------------------------------- pure helpers


def _pkce_matches(verifier: str, challenge: str, method: str) -> bool:
    computed = _b64url(hashlib.sha256(verifier.encode("utf-8")).digest()) if method == "S256" else verifier
    return hmac.compare_digest(computed.encode("utf-8"), challenge.encode("utf-8"))


def _redirect_uri_matches(registered: str, given: str) -> bool:
    """Exact match, except that the port of a loopback redirect URI is ignored (RFC 8252 §7.3)."""
    if given == registered:
        return True
    try:
        reg, giv = urlsplit(registered), urlsplit(given)
        reg_host, giv_host = reg.hostname, giv.hostname
        reg.port, giv.port  # noqa: B018 - a malformed port raises ValueError here
    except ValueError:
        return False
    if reg_host not in LOOPBACK_HOSTS or reg_host != giv_host:
        return False
    return (reg.scheme, reg.path, reg.query, reg.fragment) == (giv.scheme, giv.path, giv.query, giv.fragment)


def _with_query(uri: str, params: Iterable[tuple[str, str]]) -> str:
    """Append params to the query uri already has, as Doorkeeper's URIBuilder does."""
    parts = urlsplit(uri)
    extra = urlencode(list(params))
    query = f"{parts.query}&{extra}" if parts.query else extra
    return urlunsplit(parts._replace(query=query))


def _www_authenticate(realm: str, error: str, description: str) -> str:
    return f'Bearer realm="{realm}", error="{error}", error_description="{description}"'


def _parse_scopes(raw: str | None) -> tuple[str, ...]:
    words = (raw or "").split()
    if not words:
        return ("api",)  # GitLab's default scope when the client names none
    return tuple(dict.fromkeys(words))


def _normalize_base_path(base_path: str) -> str:
    stripped = base_path.strip().rstrip("/")
    if stripped and not stripped.startswith("/"):
        stripped = "/" + stripped
    if "?" in stripped or "#" in stripped or "//" in stripped:
        raise ValueError(f"base_path must be a plain path like /gitlab, not {base_path!r}")
    return stripped


def _check_slug(path: str) -> None:
    if (
        not _SLUG.fullmatch(path)
        or _CONSECUTIVE_SPECIALS.search(path)
        or path.lower().endswith((".git", ".atom"))
    ):
        raise ValueError(f"{path!r} is not a valid GitLab group path")


def _compact(claims: Mapping[str, object]) -> dict[str, object]:
    return {k: v for k, v in claims.items() if v is not None and v != "" and v != []}


def _avatar_url(user: FakeUser) -> str:
    digest = hashlib.sha256(user.email.strip().lower().encode()).hexdigest()
    return f"https://www.gravatar.com/avatar/{digest}?s=80&d=identicon"


def _timestamp(seconds: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(seconds))


def _seed_time(entity_id: int) -> str:
    """A stable creation date per id, so answers are reproducible across runs."""
    return _timestamp(1_600_000_000 + entity_id * 3600)


# ---------------------------------------- the fake


class _Memberships(dict[tuple[int, int], int]):
    """(user id, group id) -> access level, with each user's memberships at hand (`of`): listing one user's
    groups must not scan every membership of a large stand-in (the sign-in benchmark holds thousands)."""

    def __init__(self, items: Mapping[tuple[int, int], int] | None = None) -> None:
        super().__init__()
        self._by_user: dict[int, dict[int, int]] = {}
        for key, level in (items or {}).items():
            self[key] = level

    def __setitem__(self, key: tuple[int, int], level: int) -> None:
        super().__setitem__(key, level)
        self._by_user.setdefault(key[0], {})[key[1]] = level

    def __delitem__(self, key: tuple[int, int]) -> None:
        super().__delitem__(key)
        del self._by_user[key[0]][key[1]]

    def pop(self, key: tuple[int, int], default: int | None = None) -> int | None:  # type: ignore[override]
        if key not in self:
            return default
        level = self[key]
        del self[key]
        return level

    def of(self, user_id: int) -> Mapping[int, int]:
        """group id -> access level of the user's direct memberships."""
        return self._by_user.get(user_id, {})


class FakeGitLab:
    """In-memory GitLab: seed it, then serve it with create_app() or serve()."""

    def __init__(self, *, base_path: str = "") -> None:
        self.base_path = _normalize_base_path(base_path)
        # Overrides scheme://host[:port] + base_path when the fake sits behind something that rewrites URLs.
        self.external_url: str | None = None
        # Tests may replace the clock to age codes and tokens without sleeping.
        self.clock: Callable[[], float] = time.time
        self.requests: list[tuple[str, str]] = []
        self._apps: dict[str, _Application] = {}
        self._users: dict[int, FakeUser] = {}
        self._groups: dict[int, FakeGroup] = {}
        self._memberships = _Memberships()
        self._children: dict[int, list[int]] = {}  # group id -> its subgroups' ids (see _refresh_paths)
        # GET /groups answers each group as this JSON, encoded once per (URL, id) while the group stays the same
        self._group_json_cache: dict[tuple[str, int], tuple[tuple[object, ...], str]] = {}
        self._grants: dict[str, _Grant] = {}
        self._tokens: dict[str, _Token] = {}
        self._refresh_tokens: dict[str, _Token] = {}
        self._sessions: dict[str, _BrowserSession] = {}
        self._failures: list[_FailureRule] = []
        # token-endpoint refresh calls per presented refresh token: tests assert "never refreshed twice"
        self.refresh_calls: dict[str, int] = {}
        self._hooks: list[_Hook] = []
        self.hook_deliveries: list[tuple[str, str, int]] = []  # (url, event_name, status; 0 = failed)
        self._hook_tasks: set[asyncio.Task[None]] = set()
        self._keys = _shared_rsa_keys()
        self._secret_key_base = secrets.token_hex(32)
        # SPEC §12 (fake_gitlab_groups): access tokens, administrators, GitLab.com's throttle.
        self._access_tokens: dict[str, AccessToken] = {}
        self.admins: set[int] = set()
        self.throttle: Throttle | None = None

    @property
    def _members(self) -> _Memberships:
        return self._memberships

    @_members.setter
    def _members(self, members: Mapping[tuple[int, int], int]) -> None:
        self._memberships = _Memberships(members)

    # ------------------------------------------------------------------ seeding

    def add_application(
        self,
        client_id: str,
        client_secret: str,
        redirect_uris: list[str],
        *,
        trusted: bool = True,
        scopes: Iterable[str] | None = None,
    ) -> None:
        """Register an OAuth application; trusted apps skip the consent page. scopes=None allows all."""
        allowed = frozenset(scopes) if scopes is not None else frozenset(KNOWN_SCOPES)
        unknown = allowed - set(KNOWN_SCOPES)
        if unknown:
            raise ValueError(f"unknown scopes {sorted(unknown)}")
        self._apps[client_id] = _Application(client_id, client_secret, tuple(redirect_uris), trusted, allowed)

    def add_user(
        self,
        id: int,
        username: str,
        *,
        name: str | None = None,
        email: str | None = None,
        state: str = "active",
        public_email: str | None = None,
        email_confirmation: str = "confirmed",
        password_expired: bool = False,
        terms_accepted: bool = True,
        user_type: str = "human",
    ) -> FakeUser:
        """Create a user; name defaults to the capitalised username, email to username@example.com."""
        if email_confirmation not in EMAIL_CONFIRMATIONS:
            raise ValueError(f"email_confirmation must be one of {EMAIL_CONFIRMATIONS}")
        if user_type != "human" and user_type not in BOT_USER_TYPES:
            raise ValueError(f"unknown user_type {user_type!r}")
        if id in self._users:
            raise ValueError(f"user id {id} already exists")
        if self._find_user(username) is not None:
            raise ValueError(f"username {username!r} is taken")
        user = FakeUser(
            id=id,
            username=username,
            name=name if name is not None else username.capitalize(),
            email=email if email is not None else f"{username}@example.com",
            state=state,
            public_email=public_email,
            email_confirmation=email_confirmation,
            password_expired=password_expired,
            terms_accepted=terms_accepted,
            user_type=user_type,
        )
        self._users[id] = user
        return user

    def add_group(
        self, id: int, path: str, *, parent: int | str | None = None, name: str | None = None
    ) -> FakeGroup:
        """Create a group under `parent` (its id or full path); name defaults to a title-cased path."""
        _check_slug(path)
        if id in self._groups:
            raise ValueError(f"group id {id} already exists")
        parent_group = self.group(parent) if parent is not None else None
        parent_id = parent_group.id if parent_group else None
        if parent_id is not None and len(self._ancestors(parent_id)) + 1 > MAX_ANCESTORS:
            raise ValueError("GitLab allows at most 20 ancestors")
        self._check_free_path(parent_id, path, exclude=None)
        group = FakeGroup(id=id, path=path, name=name or path.replace("-", " ").title(), parent_id=parent_id)
        self._groups[id] = group
        self._refresh_paths()
        return group

    def add_member(self, user: int | str, group: int | str, access_level: int = ACCESS_DEVELOPER) -> None:
        """Make `user` a direct member of `group` (5 minimal ... 50 owner), replacing any prior level."""
        if access_level not in ACCESS_LEVELS:
            raise ValueError(f"access level must be one of {sorted(ACCESS_LEVELS)}")
        key = (self.user(user).id, self.group(group).id)
        event = "user_update_for_group" if key in self._members else "user_add_to_group"
        self._members[key] = access_level
        self._emit_member(event, key, access_level)

    def remove_member(self, user: int | str, group: int | str) -> None:
        """Remove a direct membership; removing a missing one is a no-op."""
        key = (self.user(user).id, self.group(group).id)
        level = self._members.pop(key, None)
        if level is not None:
            self._emit_member("user_remove_from_group", key, level)

    def rename_group(self, group: int | str, new_path: str) -> None:
        """Change a group's path: the id stays, full_path of it and of all descendants change."""
        _check_slug(new_path)
        target = self.group(group)
        self._check_free_path(target.parent_id, new_path, exclude=target.id)
        old_path, old_full_path = target.path, target.full_path
        target.path = new_path
        self._refresh_paths()
        self._emit_group_rename(target, old_path, old_full_path)

    def transfer_group(self, group: int | str, new_parent: int | str | None) -> None:
        """Move a group under another parent (None: top level); the id stays, full paths change.

        GitLab's system hooks have no transfer event: a transfer is announced as `group_rename` with the
        old and new full path (doc/administration/system_hooks.md lists group_create/destroy/rename only).
        """
        target = self.group(group)
        parent_id = self.group(new_parent).id if new_parent is not None else None
        if parent_id is not None and (parent_id == target.id or target.id in self._ancestors(parent_id)):
            raise ValueError("a group cannot move under itself")
        self._check_free_path(parent_id, target.path, exclude=target.id)
        old_full_path = target.full_path
        target.parent_id = parent_id
        self._refresh_paths()
        self._emit_group_rename(target, target.path, old_full_path)

    def delete_group(self, group: int | str) -> None:
        """Delete a group, its descendants and every membership of them."""
        root_group = self.group(group)
        root = root_group.id
        self._emit({"event_name": "group_destroy", "name": root_group.name, "path": root_group.path,
                    "group_id": root}, group_id=None)
        doomed = self._descendants(root) | {root}
        for gid in doomed:
            del self._groups[gid]
        self._members = {k: v for k, v in self._members.items() if k[1] not in doomed}
        self._refresh_paths()

    def set_user_state(self, user: int | str, state: str) -> None:
        """Set a user's state: active, blocked, ldap_blocked, banned, deactivated..."""
        self.user(user).state = state

    def rename_user(self, user: int | str, new_username: str) -> None:
        """Change a username (the id, GitLab's identity key, stays)."""
        target = self.user(user)
        other = self._find_user(new_username)
        if other is not None and other.id != target.id:
            raise ValueError(f"username {new_username!r} is taken")
        old = target.username
        target.username = new_username
        self._emit({"event_name": "user_rename", "name": target.name, "email": target.email, "user_id": target.id,
                    "username": new_username, "old_username": old}, group_id=None)

    def revoke_authorizations(self, user: int | str, client_id: str | None = None) -> None:
        """The user revokes the application in their GitLab settings: every token of it dies."""
        uid = self.user(user).id
        for token in self._tokens.values():
            if token.user_id == uid and client_id in (None, token.client_id):
                token.revoked = True

    # ------------------------------------------------------------------ webhooks

    def add_hook(self, url: str, token: str, *, group: int | str | None = None) -> None:
        """Register a system hook (group=None) or a group webhook with member events, with its secret token."""
        self._hooks.append(_Hook(url, token, self.group(group).id if group is not None else None))

    async def hooks_delivered(self) -> None:
        """Wait until every webhook posted so far has been answered."""
        while self._hook_tasks:
            await asyncio.gather(*list(self._hook_tasks), return_exceptions=True)

    def _emit_member(self, event: str, key: tuple[int, int], level: int) -> None:
        user, group = self._users[key[0]], self._groups[key[1]]
        names = {5: "Minimal Access", 10: "Guest", 15: "Planner", 20: "Reporter", 30: "Developer",
                 40: "Maintainer", 50: "Owner"}
        self._emit({"event_name": event, "group_access": names[level], "group_id": group.id,
                    "group_name": group.name, "group_path": group.path, "user_email": user.email,
                    "user_name": user.name, "user_username": user.username, "user_id": user.id},
                   group_id=group.id)

    def _emit_group_rename(self, group: FakeGroup, old_path: str, old_full_path: str) -> None:
        self._emit({"event_name": "group_rename", "name": group.name, "path": group.path,
                    "full_path": group.full_path, "group_id": group.id, "old_path": old_path,
                    "old_full_path": old_full_path}, group_id=None)

    def _emit(self, payload: dict[str, object], *, group_id: int | None) -> None:
        """Post `payload` to every system hook and, for member events, to the group's webhooks (GitLab
        delivers them asynchronously, from Sidekiq: so does this)."""
        if not self._hooks:
            return
        now = _timestamp(int(self.clock()))
        body = {"created_at": now, "updated_at": now, **payload}
        for hook in self._hooks:
            if hook.group_id is None:
                kind = "System Hook"
            elif group_id is not None and (group_id == hook.group_id or hook.group_id in self._ancestors(group_id)):
                kind = "Member Hook"
            else:
                continue
            task = asyncio.get_running_loop().create_task(self._post_hook(hook, kind, body))
            self._hook_tasks.add(task)
            task.add_done_callback(self._hook_tasks.discard)

    async def _post_hook(self, hook: _Hook, kind: str, body: dict[str, object]) -> None:
        import aiohttp  # the stand-in is a server; only webhooks make it a client

        status = 0
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http, http.post(
                    hook.url, json=body, headers={"X-Gitlab-Event": kind, "X-Gitlab-Token": hook.token}) as resp:
                status = resp.status
        except (aiohttp.ClientError, TimeoutError):
            status = 0
        self.hook_deliveries.append((hook.url, str(body["event_name"]), status))

    def add_access_token(self, token: str, user: int | str, scopes: Iterable[str] = ("read_api",)) -> None:
        """A personal or group access token acting as `user` (for a group token: its bot user, a member)."""
        self._access_tokens[token] = AccessToken(self.user(user).id, tuple(scopes))

    def rate_limit(self, limit: int | None, period: float = 60.0,
                   endpoints: Iterable[str] = THROTTLED_ENDPOINTS) -> Throttle | None:
        """Throttle group API calls like GitLab.com: `limit` per `period` seconds per token (None: off)."""
        self.throttle = Throttle(limit, period, frozenset(endpoints)) if limit is not None else None
        return self.throttle

    # ------------------------------------------------------------------ failure injection

    def fail(
        self,
        endpoint: str,
        status: int = 500,
        *,
        times: int | None = 1,
        page: int | None = None,
        retry_after: int | None = None,
        delay: float = 0.0,
        body: str | None = None,
    ) -> None:
        """Make the next `times` requests to `endpoint` fail (times=None: forever).

        status 429 answers like GitLab's throttle; page=N only fails the groups listing's page N;
        delay sleeps before answering; status=0 with a delay answers normally, just late.
        """
        if endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {sorted(ENDPOINTS)}")
        if times is not None and times < 1:
            raise ValueError("times must be at least 1 (or None for forever)")
        self._failures.append(_FailureRule(endpoint, status, times, page, retry_after, delay, body))

    def clear_failures(self) -> None:
        """Forget every failure rule."""
        self._failures.clear()

    # ------------------------------------------------------------------ inspection helpers for tests

    def user(self, ref: int | str) -> FakeUser:
        """The user with this id or username (case-insensitive); KeyError if none."""
        found = self._users.get(ref) if isinstance(ref, int) else self._find_user(ref)
        if found is None:
            raise KeyError(f"no such GitLab user: {ref!r}")
        return found

    def group(self, ref: int | str) -> FakeGroup:
        """The group with this id or full path (case-insensitive); KeyError if none."""
        if isinstance(ref, int):
            found = self._groups.get(ref)
        else:
            wanted = ref.strip("/").casefold()
            found = next((g for g in self._groups.values() if g.full_path.casefold() == wanted), None)
        if found is None:
            raise KeyError(f"no such GitLab group: {ref!r}")
        return found

    def user_groups(self, user: int | str, min_access_level: int = ACCESS_GUEST) -> list[str]:
        """Full paths GitLab reports for `user`: direct memberships >= level plus all their descendants."""
        ids = self._membership_ids(self.user(user).id, min_access_level)
        return [self._groups[gid].full_path for gid in sorted(ids)]

    def issued_tokens(self) -> list[IssuedToken]:
        """Every token pair issued so far, oldest first."""
        return [
            IssuedToken(
                t.access_token, t.refresh_token, t.client_id, t.user_id, t.scopes, t.created_at, t.revoked
            )
            for t in self._tokens.values()
        ]

    def grant(self, client_id: str, user: int | str, scopes: Iterable[str] = ("read_user", "read_api")
              ) -> IssuedToken:
        """Issue a token pair as if `user` had authorized `client_id` (benchmarks seed thousands this way)."""
        token = self._issue(client_id, self.user(user).id, tuple(scopes), int(self.clock()))
        return IssuedToken(token.access_token, token.refresh_token, token.client_id, token.user_id, token.scopes,
                           token.created_at, token.revoked)

    def add_personal_access_token(self, user: int | str, scopes: tuple[str, ...] = ("read_user",)) -> str:
        """A personal access token of `user`, as GitLab's UI creates (glpat- + 20 characters); revoke it with
        revoke_token. The API accepts it like an OAuth token (Authorization: Bearer)."""
        value = "glpat-" + secrets.token_urlsafe(15)[:20]
        now = int(self.clock())
        self._tokens[value] = _Token(value, "", "", self.user(user).id, scopes, now, now, personal=True)
        return value

    def expire_token(self, access_token: str) -> None:
        """Age an access token past its 7200 s lifetime (its refresh token stays valid)."""
        token = self._tokens[access_token]
        token.created_at = int(self.clock()) - ACCESS_TOKEN_LIFETIME - 1

    def revoke_token(self, token: str) -> None:
        """Revoke an access or refresh token (both halves of the pair die), as /oauth/revoke does."""
        found = self._tokens.get(token) or self._refresh_tokens.get(token)
        if found is not None:
            found.revoked = True

    # ------------------------------------------------------------------ groups internals

    def _find_user(self, username: str) -> FakeUser | None:
        wanted = username.casefold()
        return next((u for u in self._users.values() if u.username.casefold() == wanted), None)

    def _check_free_path(self, parent_id: int | None, path: str, *, exclude: int | None) -> None:
        for other in self._groups.values():
            same_parent = other.parent_id == parent_id and other.id != exclude
            if same_parent and other.path.casefold() == path.casefold():
                raise ValueError(f"path {path!r} is taken (GitLab paths are unique case-insensitively)")

    def _ancestors(self, gid: int) -> list[int]:
        """Ancestor ids, nearest first."""
        chain: list[int] = []
        parent = self._groups[gid].parent_id
        while parent is not None:
            chain.append(parent)
            parent = self._groups[parent].parent_id
        return chain

    def _descendants(self, gid: int) -> set[int]:
        found: set[int] = set()
        below = list(self._children.get(gid, ()))
        while below:
            child = below.pop()
            found.add(child)
            below.extend(self._children.get(child, ()))
        return found

    def _refresh_paths(self) -> None:
        """Recompute every full path and name, and the tree (_children), after any change to the groups."""
        self._children = {}
        for group in self._groups.values():
            if group.parent_id is not None:
                self._children.setdefault(group.parent_id, []).append(group.id)
        for group in self._groups.values():
            lineage = [self._groups[a] for a in reversed(self._ancestors(group.id))] + [group]
            group.full_path = "/".join(g.path for g in lineage)
            group.full_name = " / ".join(g.name for g in lineage)

    def _direct_ids(self, user_id: int, min_level: int, *, exact: bool = False) -> list[int]:
        return sorted(
            gid
            for gid, level in self._members.of(user_id).items()
            if (level == min_level if exact else level >= min_level)
        )

    def _membership_ids(self, user_id: int, min_level: int) -> set[int]:
        direct = set(self._direct_ids(user_id, min_level))
        return direct.union(*(self._descendants(gid) for gid in direct))

    def _visible_ids(self, user_id: int) -> set[int]:
        """What /groups lists without min_access_level: memberships, their descendants and ancestors."""
        seen = self._membership_ids(user_id, ACCESS_GUEST) | set(self._direct_ids(user_id, ACCESS_MINIMAL))
        return seen.union(*(self._ancestors(gid) for gid in seen))

    # ------------------------------------------------------------------ URLs

    def _origin(self, request: web.Request) -> str:
        if self.external_url:
            parts = urlsplit(self.external_url)
            return f"{parts.scheme}://{parts.netloc}"
        return f"{request.scheme}://{request.host}"

    def _base_url(self, request: web.Request) -> str:
        """GitLab's URL (the OIDC issuer): computed per request so any port works."""
        if self.external_url:
            return self.external_url.rstrip("/")
        return self._origin(request) + self.base_path

    def _local_redirect(self, target: str) -> str:
        """`target` if it is a path on this GitLab, else GitLab's home page."""
        home = self.base_path + "/"
        parts = urlsplit(target)
        unsafe = parts.scheme or parts.netloc or "\\" in target or any(ord(c) < 0x20 for c in target)
        if unsafe or not target.startswith(home) or target.startswith("//"):
            return home
        return target

    # ------------------------------------------------------------------ browser sessions

    def _session_user(self, request: web.Request) -> tuple[FakeUser, _BrowserSession] | None:
        session = self._sessions.get(request.cookies.get(SESSION_COOKIE, ""))
        if session is None or session.user_id not in self._users:
            return None
        return self._users[session.user_id], session

    def _sign_in(self, user: FakeUser) -> str:
        session_id = secrets.token_hex(32)
        self._sessions[session_id] = _BrowserSession(user.id, int(self.clock()))
        return session_id

    # ------------------------------------------------------------------ OAuth: authorize

    def _pre_authorize(self, params: Mapping[str, str]) -> _AuthorizeRequest:
        """Validate an authorize request in Doorkeeper's order; raise _AuthorizeError."""
        client_id = params.get("client_id", "")
        if not client_id:
            raise _AuthorizeError("invalid_request", "Missing required parameter: client_id.")
        app = self._apps.get(client_id)
        if app is None:
            raise _AuthorizeError("invalid_client", INVALID_CLIENT)
        redirect_uri = params.get("redirect_uri", "")
        if not any(_redirect_uri_matches(r, redirect_uri) for r in app.redirect_uris):
            raise _AuthorizeError("invalid_redirect_uri", INVALID_REDIRECT_URI)
        response_type = params.get("response_type", "")
        if not response_type:
            raise _AuthorizeError("invalid_request", "Missing required parameter: response_type.")
        if response_type != "code":
            raise _AuthorizeError("unsupported_response_type", UNSUPPORTED_RESPONSE_TYPE)
        scopes = _parse_scopes(params.get("scope"))
        if not set(scopes) <= app.scopes:
            raise _AuthorizeError("invalid_scope", INVALID_SCOPE)
        challenge = params.get("code_challenge") or None
        method = params.get("code_challenge_method") or None
        if challenge is not None:
            method = method or "plain"  # RFC 7636 §4.3
            if method not in ("plain", "S256"):
                raise _AuthorizeError("invalid_code_challenge_method", INVALID_CODE_CHALLENGE_METHOD)
        else:
            method = None
        return _AuthorizeRequest(
            app=app,
            redirect_uri=redirect_uri,
            scopes=scopes,
            state=params.get("state"),
            code_challenge=challenge,
            code_challenge_method=method,
            nonce=params.get("nonce") or None,
        )

    def _skips_consent(self, pre: _AuthorizeRequest, user: FakeUser) -> bool:
        if pre.app.trusted:
            return True
        now = self.clock()
        return any(
            t.client_id == pre.app.client_id
            and t.user_id == user.id
            and not t.revoked
            and not t.expired(now)
            and set(t.scopes) == set(pre.scopes)
            for t in self._tokens.values()
        )

    def _approve(self, pre: _AuthorizeRequest, user: FakeUser, session: _BrowserSession) -> str:
        """Issue a code and return where the browser goes next."""
        code = secrets.token_hex(32)
        self._grants[code] = _Grant(code, pre, user.id, session.signed_in_at, self.clock() + CODE_LIFETIME)
        params = [("code", code)]
        if pre.state is not None:
            params.append(("state", pre.state))
        return _with_query(pre.redirect_uri, params)

    @staticmethod
    def _deny(pre: _AuthorizeRequest) -> str:
        params = [("error", "access_denied"), ("error_description", ACCESS_DENIED)]
        if pre.state is not None:
            params.append(("state", pre.state))
        return _with_query(pre.redirect_uri, params)

    # ------------------------------------------------------------------ OAuth: token

    def _authenticate_client(self, request: web.Request, params: Mapping[str, str]) -> _Application:
        """HTTP Basic first, then client_id/client_secret in the body (Doorkeeper's order)."""
        client_id, client_secret = params.get("client_id", ""), params.get("client_secret", "")
        header = request.headers.get("Authorization", "")
        if header[:6].lower() == "basic ":
            try:
                decoded = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
            except ValueError:
                raise _OAuthError("invalid_client", INVALID_CLIENT) from None
            client_id, _, client_secret = decoded.partition(":")
        app = self._apps.get(client_id)
        if app is None or not client_secret:
            raise _OAuthError("invalid_client", INVALID_CLIENT)
        if not hmac.compare_digest(app.client_secret.encode(), client_secret.encode()):
            raise _OAuthError("invalid_client", INVALID_CLIENT)
        return app

    def _exchange_code(self, issuer: str, app: _Application, params: Mapping[str, str]) -> dict[str, object]:
        grant = self._grants.get(params.get("code", ""))
        verifier = params.get("code_verifier", "")
        redirect_uri = params.get("redirect_uri", "")
        if grant is not None and grant.request.code_challenge and not verifier:
            raise _OAuthError("invalid_request", "Missing required parameter: code_verifier.")
        if not redirect_uri:
            raise _OAuthError("invalid_request", "Missing required parameter: redirect_uri.")
        usable = grant is not None and grant.expires_at > self.clock() and grant.request.app == app
        if grant is None or not usable or redirect_uri != grant.request.redirect_uri:
            raise _OAuthError("invalid_grant", INVALID_GRANT)
        challenge, method = grant.request.code_challenge, grant.request.code_challenge_method
        if challenge is None and verifier:
            raise _OAuthError("invalid_grant", INVALID_GRANT)  # a verifier for a grant that had no challenge
        if challenge is not None and not _pkce_matches(verifier, challenge, method or "plain"):
            raise _OAuthError("invalid_grant", INVALID_GRANT)
        del self._grants[grant.code]  # single use, consumed only by a successful exchange
        token = self._issue(app.client_id, grant.user_id, grant.request.scopes, grant.auth_time)
        body = self._token_body(token)
        if "openid" in token.scopes:
            body["id_token"] = self._id_token(issuer, token, grant.request.nonce)
        return body

    def _refresh(self, app: _Application, params: Mapping[str, str]) -> dict[str, object]:
        presented = params.get("refresh_token", "")
        if not presented:
            raise _OAuthError("invalid_request", "Missing required parameter: refresh_token.")
        self.refresh_calls[presented] = self.refresh_calls.get(presented, 0) + 1
        old = self._refresh_tokens.get(presented)
        if old is not None and old.used:
            # A refresh token presented twice: it may have been stolen, so the whole grant is revoked
            # (OAuth 2.0 Security BCP §4.14.2, refresh token rotation), and every later use fails.
            for token in self._tokens.values():
                if token.grant_id == old.grant_id:
                    token.revoked = True
        if old is None or old.revoked or old.client_id != app.client_id:
            raise _OAuthError("invalid_grant", INVALID_GRANT)
        scopes = old.scopes
        if params.get("scope"):
            scopes = _parse_scopes(params["scope"])
            if not set(scopes) <= set(old.scopes):
                raise _OAuthError("invalid_scope", INVALID_SCOPE)
        old.revoked = True  # rotation: the old access AND refresh tokens die at once
        old.used = True
        return self._token_body(self._issue(app.client_id, old.user_id, scopes, old.auth_time, old.grant_id))

    def _issue(self, client_id: str, user_id: int, scopes: tuple[str, ...], auth_time: int,
               grant_id: str | None = None) -> _Token:
        token = _Token(
            grant_id=grant_id or secrets.token_hex(8),
            access_token=secrets.token_hex(32),
            refresh_token=secrets.token_hex(32),
            client_id=client_id,
            user_id=user_id,
            scopes=scopes,
            created_at=int(self.clock()),
            auth_time=auth_time,
        )
        self._tokens[token.access_token] = token
        self._refresh_tokens[token.refresh_token] = token
        return token

    @staticmethod
    def _token_body(token: _Token) -> dict[str, object]:
        return {
            "access_token": token.access_token,
            "token_type": "Bearer",
            "expires_in": ACCESS_TOKEN_LIFETIME,
            "refresh_token": token.refresh_token,
            "scope": " ".join(token.scopes),
            "created_at": token.created_at,
        }

    # ------------------------------------------------------------------ OpenID Connect

    def _profile_claims(self, base: str, user: FakeUser, scopes: Iterable[str]) -> dict[str, object]:
        """Claims shared by the ID token and userinfo, including GitLab's email-scope rule."""
        email: str | None = None
        verified: bool | None = None
        if "email" in scopes:
            email, verified = user.email, user.email_confirmation == "confirmed"  # primary_email_verified?
        elif user.public_email:
            email, verified = user.public_email, True
        return {
            "sub_legacy": hashlib.sha256(f"{user.id}-{self._secret_key_base}".encode()).hexdigest(),
            "name": user.name,
            "nickname": user.username,
            "preferred_username": user.username,
            "email": email,
            "email_verified": verified,
            "website": None,
            "profile": f"{base}/{user.username}",
            "picture": _avatar_url(user),
        }

    def _id_token(self, issuer: str, token: _Token, nonce: str | None) -> str:
        user = self._users[token.user_id]
        now = int(self.clock())
        claims = {
            "iss": issuer,
            "sub": str(user.id),
            "aud": token.client_id,
            "exp": now + ID_TOKEN_LIFETIME,
            "iat": now,
            "nonce": nonce,
            "auth_time": token.auth_time,
            **self._profile_claims(issuer, user, token.scopes),
            "groups_direct": [self._groups[g].full_path for g in self._direct_ids(user.id, ACCESS_GUEST)],
        }
        key = self._keys[0]
        return _sign_jwt(key, _jwk(key)["kid"], _compact(claims))

    def _userinfo(self, base: str, token: _Token) -> dict[str, object]:
        user = self._users[token.user_id]
        claims: dict[str, object] = {"sub": str(user.id), **self._profile_claims(base, user, token.scopes)}
        claims = _compact(claims)
        claims["groups"] = self.user_groups(user.id)  # present even when empty, unlike the role claims
        for claim, level in ROLE_CLAIMS:
            paths = [self._groups[g].full_path for g in self._direct_ids(user.id, level, exact=True)]
            if paths:
                claims[claim] = paths
        return claims

    def _jwks(self) -> dict[str, object]:
        return {"keys": [_jwk(key) for key in self._keys]}

    def _discovery(self, base: str) -> dict[str, object]:
        return {
            "issuer": base,
            "authorization_endpoint": f"{base}/oauth/authorize",
            "token_endpoint": f"{base}/oauth/token",
            "revocation_endpoint": f"{base}/oauth/revoke",
            "introspection_endpoint": f"{base}/oauth/introspect",
            "userinfo_endpoint": f"{base}/oauth/userinfo",
            "jwks_uri": f"{base}/oauth/discovery/keys",
            "scopes_supported": list(KNOWN_SCOPES),
            "response_types_supported": ["code"],
            "response_modes_supported": ["query", "fragment", "form_post"],
            "grant_types_supported": ["authorization_code", "refresh_token"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "claim_types_supported": ["normal"],
            "claims_supported": [
                "iss", "sub", "aud", "exp", "iat", "sub_legacy", "name", "nickname", "preferred_username",
                "email", "email_verified", "website", "profile", "picture", "groups", "groups_direct",
                *(claim for claim, _ in ROLE_CLAIMS),
            ],
            "code_challenge_methods_supported": ["plain", "S256"],
        }  # fmt: skip

    # ------------------------------------------------------------------ protected resources

    def _userinfo_token(self, token_value: str) -> _Token:
        """Doorkeeper's doorkeeper_authorize!(:openid): 401/403 with an empty body."""
        token = self._tokens.get(token_value)
        problem = "unknown"
        if token is not None:
            problem = "revoked" if token.revoked else "expired" if token.expired(self.clock()) else ""
            owner = self._users[token.user_id]
            if not problem and (owner.state != "active" or owner.internal):
                # GitLab looks the owner up with User.active (active state, not internal): nobody here.
                problem = "unknown"
        if problem:
            header = _www_authenticate("Doorkeeper", "invalid_token", DOORKEEPER_TOKEN_ERRORS[problem])
            raise _ApiError(401, None, {"WWW-Authenticate": header})
        assert token is not None
        if "openid" not in token.scopes:
            raise _ApiError(403, None)
        return token

    def _token_info(self, token_value: str) -> dict[str, object]:
        """Doorkeeper's GET /oauth/token/info: whose token it is, whatever GitLab thinks of that user."""
        token = self._tokens.get(token_value)
        if token is None or token.revoked or token.expired(self.clock()):
            description = DOORKEEPER_TOKEN_ERRORS["unknown" if token is None else
                                                  "revoked" if token.revoked else "expired"]
            header = _www_authenticate("Doorkeeper", "invalid_token", description)
            raise _ApiError(401, {"error": "invalid_token", "error_description": description},
                            {"WWW-Authenticate": header})
        expires_in = token.created_at + ACCESS_TOKEN_LIFETIME - int(self.clock())
        return {"resource_owner_id": token.user_id, "scope": list(token.scopes), "expires_in": expires_in,
                "application": {"uid": token.client_id}, "created_at": token.created_at,
                "expires_in_seconds": expires_in}

    def _api_user(self, token_value: str, allowed: tuple[str, ...], gitlab_url: str = "") -> FakeUser:
        """GitLab's API authentication: 401, then insufficient scope, then a blocked account."""
        token = self._tokens.get(token_value)
        if token is None:
            raise _ApiError(401, {"message": "401 Unauthorized"})
        if token.revoked or token.expired(self.clock()):
            description = API_TOKEN_REVOKED if token.revoked else API_TOKEN_EXPIRED
            header = _www_authenticate("Protected by OAuth 2.0", "invalid_token", description)
            body = {"error": "invalid_token", "error_description": description}
            raise _ApiError(401, body, {"WWW-Authenticate": header})
        if not set(token.scopes) & set(allowed):
            header = _www_authenticate("Protected by OAuth 2.0", "insufficient_scope", INSUFFICIENT_SCOPE)
            body = {
                "error": "insufficient_scope",
                "error_description": INSUFFICIENT_SCOPE,
                "scope": " ".join(allowed),
            }
            raise _ApiError(403, body, {"WWW-Authenticate": header})
        user = self._users[token.user_id]
        refusal = user.api_refusal(gitlab_url)
        if refusal is not None:
            raise _ApiError(403, {"message": refusal})
        return user

    def _user_entity(self, base: str, user: FakeUser) -> dict[str, object]:
        created = _seed_time(user.id)
        return {
            "id": user.id,
            "username": user.username,
            "public_email": user.public_email,
            "name": user.name,
            "state": user.state,
            "locked": False,
            "avatar_url": _avatar_url(user),
            "web_url": f"{base}/{user.username}",
            "created_at": created,
            "bio": "",
            "location": "",
            "website_url": "",
            "organization": "",
            "job_title": "",
            "bot": user.user_type in BOT_USER_TYPES,
            "last_sign_in_at": created,
            "confirmed_at": created if user.email_confirmation == "confirmed" else None,
            "email": user.email,
            "theme_id": 1,
            "color_scheme_id": 1,
            "projects_limit": 100000,
            "identities": [],
            "can_create_group": True,
            "can_create_project": True,
            "two_factor_enabled": False,
            "external": False,
            "private_profile": False,
            "commit_email": user.email,
        }

    def _group_entity(self, base: str, group: FakeGroup) -> dict[str, object]:
        return {
            "id": group.id,
            "web_url": f"{base}/groups/{group.full_path}",
            "name": group.name,
            "path": group.path,
            "description": "",
            "visibility": "private",
            "share_with_group_lock": False,
            "require_two_factor_authentication": False,
            "avatar_url": None,
            "request_access_enabled": True,
            "full_name": group.full_name,
            "full_path": group.full_path,
            "created_at": _seed_time(group.id),
            "parent_id": group.parent_id,
        }

    def _group_json(self, base: str, group: FakeGroup) -> str:
        """_group_entity as JSON text, encoded again only when something it shows has changed."""
        shown = (group.name, group.path, group.full_path, group.full_name, group.parent_id)
        cached = self._group_json_cache.get((base, group.id))
        if cached is None or cached[0] != shown:
            cached = self._group_json_cache[(base, group.id)] = (shown, json.dumps(self._group_entity(base, group)))
        return cached[1]

    def _take_failure(self, endpoint: str, page: int) -> _FailureRule | None:
        for rule in self._failures:
            if rule.endpoint != endpoint or (rule.page is not None and rule.page != page):
                continue
            if rule.remaining is not None:
                rule.remaining -= 1
                if rule.remaining <= 0:
                    self._failures.remove(rule)
            return rule
        return None


FAKE_KEY = web.AppKey("fake_gitlab", FakeGitLab)


# ---------------------------------------- HTTP helpers


def _fake(request: web.Request) -> FakeGitLab:
    return request.app[FAKE_KEY]


def _redirect(location: str) -> web.Response:
    return web.Response(status=302, headers={"Location": location})


# Styled like the gateway's own pages (gateway/web/pages.py), so the demo reads as one product.
_STYLE = (
    "<style>body{font:16px/1.5 system-ui,sans-serif;max-width:44rem;margin:4rem auto;padding:0 1rem;color:#222}"
    "h1{font-size:1.4rem}table{border-collapse:collapse;width:100%}td,th{text-align:left;padding:.4rem .6rem;"
    "border-bottom:1px solid #ddd}button{padding:.4rem .9rem;background:#554488;color:#fff;border:0;"
    "border-radius:4px;cursor:pointer}[role=alert]{color:#a00}.state{color:#777}</style>"
)


def _page(title: str, body: str, *, status: int = 200) -> web.Response:
    document = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width">'
        f"<title>{html.escape(title)} · GitLab</title>{_STYLE}</head>\n<body>\n{body}\n</body></html>\n"
    )
    return web.Response(text=document, status=status, content_type="text/html")


def _hidden(name: str, value: str | None) -> str:
    if value is None:
        return ""
    return f'<input type="hidden" name="{html.escape(name)}" value="{html.escape(value)}">'


async def _params(request: web.Request) -> dict[str, str]:
    """Query then body (form or JSON), body winning, like Rails' merged params."""
    params = dict(request.query)
    if request.content_type == "application/json":
        try:
            data = await request.json()
        except ValueError:
            data = {}
        if isinstance(data, dict):
            params.update({str(k): str(v) for k, v in data.items() if isinstance(v, str | int)})
    elif request.can_read_body:
        form = await request.post()
        params.update({k: v for k, v in form.items() if isinstance(v, str)})
    return params


def _bearer(request: web.Request, params: Mapping[str, str]) -> str:
    header = request.headers.get("Authorization", "")
    if header[:7].lower() == "bearer ":
        return header[7:].strip()
    return params.get("access_token", "")


def _failure_response(rule: _FailureRule) -> web.Response:
    headers: dict[str, str] = {}
    if rule.status == 429 or rule.retry_after is not None:
        headers["Retry-After"] = str(rule.retry_after if rule.retry_after is not None else 60)
    if rule.status == 429:
        headers.update({"RateLimit-Limit": "2000", "RateLimit-Remaining": "0"})
    if rule.body is not None:
        try:
            json.loads(rule.body)
            content_type = "application/json"
        except ValueError:
            content_type = "text/plain"
        return web.Response(status=rule.status, text=rule.body, content_type=content_type, headers=headers)
    if rule.status == 429:
        return web.Response(status=429, text="Retry later\n", content_type="text/plain", headers=headers)
    if rule.status >= 502:  # what the nginx in front of GitLab says when Rails is down
        return _page("Error", f"<h1>{rule.status}</h1><p>GitLab is not responding.</p>", status=rule.status)
    reason = web.Response(status=rule.status).reason
    return web.json_response({"message": f"{rule.status} {reason}"}, status=rule.status, headers=headers)


@web.middleware
async def _record_and_inject(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Record every request, then apply the first matching failure rule."""
    fake = _fake(request)
    fake.requests.append((request.method, request.path_qs))
    resource = request.match_info.route.resource
    endpoint = resource.name if resource is not None else None
    if endpoint is not None and fake.throttle is not None:
        throttled = fake.throttle.check(request, endpoint, fake.clock())
        if throttled is not None:
            return throttled
    if endpoint is not None and endpoint in ENDPOINTS:
        try:
            page = int(request.query.get("page", "1"))
        except ValueError:
            page = 1
        rule = fake._take_failure(endpoint, page)
        if rule is not None:
            if rule.delay:
                await asyncio.sleep(rule.delay)
            if rule.status:
                return _failure_response(rule)
    return await handler(request)


# ---------------------------------------- pages


async def _home(request: web.Request) -> web.Response:
    fake = _fake(request)
    signed_in = fake._session_user(request)
    who = f"Signed in as <b>{html.escape(signed_in[0].username)}</b>." if signed_in else "Not signed in."
    links = (
        f'<a href="{fake.base_path}/users/sign_in">Switch user</a> · '
        f'<a href="{fake.base_path}/users/sign_out" id="sign-out">Sign out</a>'
    )
    return _page("GitLab", f'<h1>GitLab stand-in</h1>\n<p id="current-user">{who}</p>\n<p>{links}</p>')


async def _health(request: web.Request) -> web.Response:
    return web.Response(text="GitLab OK")


async def _sign_in_page(request: web.Request) -> web.Response:
    fake = _fake(request)
    redirect_to = request.query.get("redirect_to", "")
    return _sign_in_document(fake, redirect_to, error=None)


def _sign_in_document(fake: FakeGitLab, redirect_to: str, *, error: str | None) -> web.Response:
    rows = []
    for user in sorted(fake._users.values(), key=lambda u: u.id):
        name = html.escape(user.username)
        form = (
            f'<form method="post" action="{fake.base_path}/users/sign_in">'
            f"{_hidden('username', user.username)}{_hidden('redirect_to', redirect_to)}"
            f'<button type="submit" id="sign-in-{name}">Sign in as {name}</button></form>'
        )
        rows.append(
            f'<tr id="user-{name}"><td class="username">{name}</td><td class="name">{html.escape(user.name)}'
            f'</td><td class="state">{html.escape(user.state)}</td><td>{form}</td></tr>'
        )
    flash = f'<p id="flash-alert" role="alert">{html.escape(error)}</p>\n' if error else ""
    body = (
        f"<h1>Sign in to GitLab</h1>\n{flash}<p>This is a GitLab stand-in: pick who you are.</p>\n"
        "<table>\n<tr><th>Username</th><th>Name</th><th>State</th><th></th></tr>\n"
        + "\n".join(rows)
        + "\n</table>"
    )
    return _page("Sign in", body)


async def _sign_in(request: web.Request) -> web.Response:
    fake = _fake(request)
    form = await request.post()
    username, redirect_to = form.get("username", ""), form.get("redirect_to", "")
    username = username if isinstance(username, str) else ""
    redirect_to = redirect_to if isinstance(redirect_to, str) else ""
    user = fake._find_user(username)
    if user is None:
        return _sign_in_document(fake, redirect_to, error="Invalid login or password.")
    response = _redirect(fake._origin(request) + fake._local_redirect(redirect_to))
    response.set_cookie(
        SESSION_COOKIE, fake._sign_in(user), path=fake.base_path or "/", httponly=True, samesite="Lax"
    )
    return response


async def _sign_out(request: web.Request) -> web.Response:
    fake = _fake(request)
    fake._sessions.pop(request.cookies.get(SESSION_COOKIE, ""), None)
    response = _redirect(f"{fake._base_url(request)}/users/sign_in")
    response.del_cookie(SESSION_COOKIE, path=fake.base_path or "/")
    return response


def _error_page(error: _AuthorizeError) -> web.Response:
    body = (
        "<h1>An error has occurred</h1>\n"
        f'<p id="error-code">{html.escape(error.error)}</p>\n'
        f'<pre id="error-description">{html.escape(error.description)}</pre>'
    )
    return _page("An error has occurred", body)  # 200, as GitLab renders it


def _consent_page(fake: FakeGitLab, pre: _AuthorizeRequest, user: FakeUser) -> web.Response:
    fields = "".join(
        _hidden(name, value)
        for name, value in (
            ("client_id", pre.app.client_id),
            ("redirect_uri", pre.redirect_uri),
            ("response_type", "code"),
            ("scope", " ".join(pre.scopes)),
            ("state", pre.state),
            ("code_challenge", pre.code_challenge),
            ("code_challenge_method", pre.code_challenge_method),
            ("nonce", pre.nonce),
        )
    )
    action = f"{fake.base_path}/oauth/authorize"
    scopes = "".join(f"<li>{html.escape(s)}</li>" for s in pre.scopes)
    body = (
        f"<h1>Authorize {html.escape(pre.app.client_id)} to use your account?</h1>\n"
        f"<p>Signed in as {html.escape(user.username)}. Requested scopes:</p>\n"
        f'<ul id="scopes">{scopes}</ul>\n'
        f'<form method="post" action="{action}">{fields}'
        '<button type="submit" id="authorize">Authorize</button></form>\n'
        f'<form method="post" action="{action}">{fields}{_hidden("_method", "delete")}'
        '<button type="submit" id="deny">Deny</button></form>'
    )
    return _page("Authorize application", body)


async def _authorize(request: web.Request) -> web.Response:
    fake = _fake(request)
    signed_in = fake._session_user(request)
    if signed_in is None:
        back = quote(request.raw_path, safe="")  # as received, so the browser returns to the same URL
        return _redirect(f"{fake._base_url(request)}/users/sign_in?redirect_to={back}")
    params = await _params(request)
    try:
        pre = fake._pre_authorize(params)
    except _AuthorizeError as error:
        return _error_page(error)
    user, session = signed_in
    # HTML forms cannot send DELETE, so Deny posts `_method=delete` as Rails forms do.
    if request.method == "DELETE" or params.get("_method", "").lower() == "delete":
        return _redirect(fake._deny(pre))
    if request.method == "POST" or fake._skips_consent(pre, user):
        return _redirect(fake._approve(pre, user, session))
    return _consent_page(fake, pre, user)


# ---------------------------------------- OAuth / OIDC API


async def _token(request: web.Request) -> web.Response:
    fake = _fake(request)
    params = await _params(request)
    try:
        grant_type = params.get("grant_type", "")
        if not grant_type:
            raise _OAuthError("invalid_request", "Missing required parameter: grant_type.")
        if grant_type not in ("authorization_code", "refresh_token"):
            raise _OAuthError("unsupported_grant_type", UNSUPPORTED_GRANT_TYPE)
        app = fake._authenticate_client(request, params)
        if grant_type == "authorization_code":
            body = fake._exchange_code(fake._base_url(request), app, params)
        else:
            body = fake._refresh(app, params)
    except _OAuthError as error:
        return error.response()
    return web.json_response(body, headers={"Cache-Control": "no-store", "Pragma": "no-cache"})


async def _revoke(request: web.Request) -> web.Response:
    fake = _fake(request)
    params = await _params(request)
    fake.revoke_token(params.get("token", ""))
    return web.json_response({})  # RFC 7009: the same answer whether or not the token was known


async def _userinfo(request: web.Request) -> web.Response:
    fake = _fake(request)
    try:
        token = fake._userinfo_token(_bearer(request, await _params(request)))
    except _ApiError as error:
        return error.response()
    return web.json_response(fake._userinfo(fake._base_url(request), token))


async def _discovery(request: web.Request) -> web.Response:
    fake = _fake(request)
    return web.json_response(fake._discovery(fake._base_url(request)))


async def _token_info(request: web.Request) -> web.Response:
    fake = _fake(request)
    try:
        return web.json_response(fake._token_info(_bearer(request, request.query)))
    except _ApiError as error:
        return error.response()


async def _keys(request: web.Request) -> web.Response:
    return web.json_response(_fake(request)._jwks())


# ---------------------------------------- REST API


async def _api_user(request: web.Request) -> web.Response:
    fake = _fake(request)
    try:
        user = fake._api_user(_bearer(request, request.query), USER_API_SCOPES, fake._base_url(request))
    except _ApiError as error:
        return error.response()
    return web.json_response(fake._user_entity(fake._base_url(request), user))


@dataclass(frozen=True)
class _GroupQuery:
    page: int
    per_page: int
    min_access_level: int | None
    search: str
    top_level_only: bool
    order_by: str
    descending: bool

    @classmethod
    def parse(cls, query: Mapping[str, str]) -> _GroupQuery:
        """Grape's parameter validation for GET /groups; raises _ApiError 400."""
        page = _int_param(query, "page", 1)
        per_page = _int_param(query, "per_page", DEFAULT_PER_PAGE)
        level = _int_param(query, "min_access_level", None) if "min_access_level" in query else None
        if level is not None and level not in ACCESS_LEVELS:
            _bad_value("min_access_level")
        order_by = query.get("order_by", "name")
        if order_by not in ("name", "path", "id"):
            _bad_value("order_by")
        sort = query.get("sort", "asc")
        if sort not in ("asc", "desc"):
            _bad_value("sort")
        return cls(
            page=max(page or 1, 1),
            per_page=min(max(per_page or DEFAULT_PER_PAGE, 1), MAX_PER_PAGE),
            min_access_level=level,
            search=query.get("search", "").casefold(),
            top_level_only=query.get("top_level_only", "").lower() == "true",
            order_by=order_by,
            descending=sort == "desc",
        )


def _int_param(query: Mapping[str, str], name: str, default: int | None) -> int | None:
    raw = query.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise _ApiError(400, {"error": f"{name} is invalid"}) from None


def _bad_value(name: str) -> NoReturn:
    raise _ApiError(400, {"error": f"{name} does not have a valid value"})


def _listed_groups(fake: FakeGitLab, user: FakeUser, query: _GroupQuery) -> list[FakeGroup]:
    if query.min_access_level is not None:
        ids = fake._membership_ids(user.id, query.min_access_level)
    else:
        ids = fake._visible_ids(user.id)
    groups = [fake._groups[gid] for gid in ids]
    if query.search:
        groups = [g for g in groups if query.search in g.name.casefold() or query.search in g.path.casefold()]
    if query.top_level_only:
        groups = [g for g in groups if g.parent_id is None]
    keys: dict[str, Callable[[FakeGroup], tuple[str | int, int]]] = {
        "name": lambda g: (g.name.casefold(), g.id),
        "path": lambda g: (g.path.casefold(), g.id),
        "id": lambda g: (g.id, g.id),
    }
    return sorted(groups, key=keys[query.order_by], reverse=query.descending)


def _pagination_headers(
    fake: FakeGitLab, request: web.Request, query: _GroupQuery, total: int
) -> dict[str, str]:
    total_pages = max(1, math.ceil(total / query.per_page))
    next_page = query.page + 1 if query.page < total_pages else None
    prev_page = query.page - 1 if query.page > 1 else None

    def url(page: int) -> str:
        params = MultiDict(request.query)
        params["page"] = str(page)
        params["per_page"] = str(query.per_page)
        return f"{fake._origin(request)}{request.path}?{urlencode(list(params.items()))}"

    links = [(prev_page, "prev"), (next_page, "next"), (1, "first"), (total_pages, "last")]
    headers = {
        "X-Page": str(query.page),
        "X-Per-Page": str(query.per_page),
        "X-Next-Page": str(next_page or ""),
        "X-Prev-Page": str(prev_page or ""),
        "Link": ", ".join(f'<{url(page)}>; rel="{rel}"' for page, rel in links if page is not None),
    }
    if total <= MAX_COUNTED_RESULTS:
        headers["X-Total"] = str(total)
        headers["X-Total-Pages"] = str(total_pages)
    return headers


async def _api_groups(request: web.Request) -> web.Response:
    fake = _fake(request)
    try:
        user = fake._api_user(_bearer(request, request.query), GROUPS_API_SCOPES, fake._base_url(request))
        query = _GroupQuery.parse(request.query)
    except _ApiError as error:
        return error.response()
    groups = _listed_groups(fake, user, query)
    start = (query.page - 1) * query.per_page
    base = fake._base_url(request)
    # What web.json_response(list of entities) would send, from each entity's cached JSON.
    items = ", ".join(fake._group_json(base, g) for g in groups[start : start + query.per_page])
    return web.Response(text=f"[{items}]", content_type="application/json",
                        headers=_pagination_headers(fake, request, query, len(groups)))


# ---------------------------------------- wiring


def create_app(fake: FakeGitLab) -> web.Application:
    """The stand-in as an aiohttp application; every route lives under fake.base_path."""
    app = web.Application(middlewares=[_record_and_inject])
    app[FAKE_KEY] = fake
    b = fake.base_path
    routes: list[tuple[str, str, dict[str, Handler]]] = [
        (f"{b}/", "home", {"GET": _home}),
        (f"{b}/-/health", "health", {"GET": _health}),
        (f"{b}/users/sign_in", "sign_in", {"GET": _sign_in_page, "POST": _sign_in}),
        (f"{b}/users/sign_out", "sign_out", {"GET": _sign_out, "DELETE": _sign_out}),
        (f"{b}/oauth/authorize", "authorize", {"GET": _authorize, "POST": _authorize, "DELETE": _authorize}),
        (f"{b}/oauth/token", "token", {"POST": _token}),
        (f"{b}/oauth/revoke", "revoke", {"POST": _revoke}),
        (f"{b}/oauth/token/info", "token_info", {"GET": _token_info}),
        (f"{b}/oauth/userinfo", "userinfo", {"GET": _userinfo, "POST": _userinfo}),
        (f"{b}/.well-known/openid-configuration", "discovery", {"GET": _discovery}),
        (f"{b}/oauth/discovery/keys", "keys", {"GET": _keys}),
        (f"{b}/api/v4/user", "user", {"GET": _api_user}),
        (f"{b}/api/v4/groups", "groups", {"GET": _api_groups}),
        *fake_gitlab_groups.routes(b),
    ]
    for path, name, handlers in routes:
        resource = app.router.add_resource(path, name=name)
        for method, handler in handlers.items():
            resource.add_route(method, handler)
    return app


def demo_seed(fake: FakeGitLab, *, client_id: str, client_secret: str, redirect_uri: str) -> None:
    """Seed the demo world described in the module docstring (alice, bob, carol, dave)."""
    fake.add_application(client_id, client_secret, [redirect_uri], trusted=True)
    fake.add_group(100, "acme", name="Acme")
    fake.add_group(101, "platform", parent="acme", name="Platform")
    fake.add_group(102, "sre", parent="acme/platform", name="SRE")
    fake.add_group(200, "other-org", name="Other Org")
    fake.add_user(1, "alice", name="Alice Adams")
    fake.add_user(2, "bob", name="Bob Brown")
    fake.add_user(3, "carol", name="Carol Clark")
    fake.add_user(4, "dave", name="Dave Davis", state="blocked")
    fake.add_member("alice", "acme", ACCESS_OWNER)
    fake.add_member("alice", "acme/platform", ACCESS_MAINTAINER)
    fake.add_member("bob", "acme/platform/sre", ACCESS_DEVELOPER)
    fake.add_member("carol", "other-org", ACCESS_MAINTAINER)
    fake.add_member("dave", "acme", ACCESS_DEVELOPER)


async def serve(fake: FakeGitLab, host: str, port: int) -> web.AppRunner:
    """Start the stand-in on a real socket (port 0 = any; see runner.addresses); call runner.cleanup()."""
    runner = web.AppRunner(create_app(fake))
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


def _parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


async def _run_forever(fake: FakeGitLab, host: str, port: int) -> None:
    runner = await serve(fake, host, port)
    shown = f"[{host}]" if ":" in host else host
    print(f"GitLab stand-in on http://{shown}:{port}{fake.base_path}/ (users: alice, bob, carol, dave)")
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    """Run the demo-seeded stand-in until interrupted."""
    parser = argparse.ArgumentParser(prog="python -m gateway.demo.fake_gitlab", description="GitLab stand-in")
    parser.add_argument("--listen", type=_parse_listen, default=("127.0.0.1", 8929), help="HOST:PORT")
    parser.add_argument("--client-id", default="gateway-demo")
    parser.add_argument("--client-secret", default="gateway-demo-secret")
    parser.add_argument("--redirect-uri", default="http://127.0.0.1:4180/oauth2/callback")
    parser.add_argument("--base-path", default="", help="serve under a subpath, e.g. /gitlab")
    args = parser.parse_args(argv)
    fake = FakeGitLab(base_path=args.base_path)
    demo_seed(
        fake, client_id=args.client_id, client_secret=args.client_secret, redirect_uri=args.redirect_uri
    )
    host, port = args.listen
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is the normal way to stop it
        asyncio.run(_run_forever(fake, host, port))


if __name__ == "__main__":
    main()
