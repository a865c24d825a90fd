"""The GitLab client: authorize URL, code exchange, the user, their groups (every page) and userinfo.

Every failure becomes a `GatewayError` (SPEC §5 rule 1: any GitLab error, timeout, 429 or incomplete listing
fails the sign-in, so nothing is ever synchronized from partial data). Messages and logs never carry tokens,
secrets or response bodies: only endpoint labels, statuses and GitLab's short error codes.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import hashlib
import json
import logging
import math
import re
import secrets
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import quote, urlencode, urlsplit

import aiohttp
import msgspec
from multidict import CIMultiDictProxy
from yarl import URL

from gateway.config import ConfigError, GitLabConfig
from gateway.errors import GitLabRateLimited, GitLabUnavailable, InvalidState, SignInRefused
from gateway.sync.gitlab_http import GitLabConnector, GitLabHTTP, ProtocolError

log = logging.getLogger("gateway.gitlab")

USER_AGENT: Final = "gateway/0.1"
PER_PAGE: Final = 100
MAX_PAGES: Final = 1000
# Connecting should be quick even when answering is slow; the total still bounds each request.
CONNECT_TIMEOUT: Final = 5.0
_BLOCKED_STATES: Final = frozenset({"blocked", "ldap_blocked", "blocked_pending_approval", "banned"})
_SHORT_CODE = re.compile(r"[a-z_]{1,40}")
_MISCONFIGURED: Final = "gitlab_misconfigured"
MAX_RETRY_AFTER: Final = 3600
FORM: Final = "application/x-www-form-urlencoded"  # a longer (or absurd) Retry-After is shown as an hour

# Why GitLab's API refuses a user: its API guard answers 403 {"message": "403 Forbidden - <reason>"} with the
# reason from Gitlab::Auth::UserAccessDeniedReason#rejection_message (lib/gitlab/auth/user_access_denied_reason.rb,
# lib/api/api_guard.rb find_current_user!, lib/api/helpers.rb forbidden!). Matched on a stable fragment of
# each reason, in GitLab's own order (a pending approval also says "blocked"); the user's page says what to do.
# (fragment, code, message, advice)
GITLAB_REFUSALS: Final = (
    ("cannot be performed by internal users", "gitlab_internal_user",
     "This GitLab account is an internal (bot) account, which cannot sign in to applications",
     "Sign in with your personal GitLab account."),
    ("pending approval", "gitlab_pending_approval", "Your GitLab account is waiting for an administrator's approval",
     "Ask a GitLab administrator to approve your account, then sign in again."),
    ("terms of service", "gitlab_terms", "You have not accepted GitLab's Terms of Service",
     "Sign in to GitLab, accept its terms, then sign in here again."),
    ("has been deactivated", "gitlab_deactivated", "Your GitLab account is deactivated",
     "Sign in to GitLab in your browser, which reactivates it, then sign in here again."),
    ("email address is not confirmed", "gitlab_email_unconfirmed", "Your GitLab email address is not confirmed",
     "Follow the confirmation link GitLab emailed you (GitLab can send a new one), then sign in again."),
    ("password expired", "gitlab_password_expired", "Your GitLab password has expired",
     "Sign in to GitLab in your browser and choose a new password, then sign in here again."),
    ("has been blocked", "blocked", "Your GitLab account is blocked",
     "Ask a GitLab administrator to unblock your account, then sign in again."),
)


@dataclass(frozen=True, slots=True)
class GitLabUser:
    id: int
    username: str
    name: str
    email: str
    state: str
    # GitLab's word on the email: userinfo's email_verified, or /api/v4/user's confirmed_at (SPEC §16).
    email_verified: bool = True


@dataclass(frozen=True, slots=True)
class GitLabGroup:
    full_path: str
    id: int | None  # None when the groups come from the userinfo claim (it carries paths only)


@dataclass(frozen=True, slots=True)
class TokenResponse:
    access_token: str = field(repr=False)
    id_token: str | None = field(repr=False)
    scope: str
    refresh_token: str | None = field(default=None, repr=False)


class GrantRefused(GitLabUnavailable):
    """GitLab answered `invalid_grant` to a refresh: the grant was revoked, expired or its token reused."""

    code = "invalid_grant"


@dataclass(frozen=True, slots=True)
class SignInData:
    user: GitLabUser
    groups: tuple[GitLabGroup, ...] | None  # None when the caller did not need groups


def s256(verifier: str) -> str:
    """The RFC 7636 S256 code challenge of a verifier."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def pkce_pair() -> tuple[str, str]:
    """A fresh (verifier, S256 challenge): 48 random bytes give 64 url-safe characters."""
    verifier = secrets.token_urlsafe(48)
    return verifier, s256(verifier)


def random_token(nbytes: int = 32) -> str:
    """An unguessable url-safe string for state and nonce values."""
    return secrets.token_urlsafe(nbytes)


@dataclass(frozen=True, slots=True)
class _Answer:
    endpoint: str
    status: int
    headers: CIMultiDictProxy[str]
    url: str  # of the request: relative links are resolved against it
    body: bytes

    @property
    def links(self) -> Mapping[str, Mapping[str, Any]]:
        """The parsed Link header (read only when pagination needs it); a malformed one counts as absent
        (pagination then fails safe)."""
        try:
            return parse_links(self.headers.getall("Link", []), URL(self.url))
        except ValueError:
            return {}


def parse_links(values: list[str], base: URL) -> Mapping[str, Mapping[str, Any]]:
    """rel -> {"url": URL, and the other parameters} of Link header values (RFC 8288), as aiohttp's
    ClientResponse.links reads them: the URL resolved against `base`; ValueError for a malformed URL."""
    links: dict[str, Mapping[str, Any]] = {}
    for value in _LINK_SPLIT.split(", ".join(values)) if values else ():
        match = _LINK.match(value)
        if match is None:
            continue
        target, params = match.groups()
        link: dict[str, Any] = {}
        for param in params.split(";")[1:]:
            pm = _LINK_PARAM.match(param)
            if pm is not None:
                link.setdefault(pm.group(1), pm.group(3))
        link["url"] = base.join(URL(target))
        links.setdefault(str(link.get("rel", target)), link)
    return links


_LINK_SPLIT = re.compile(r",(?=\s*<)")
_LINK = re.compile(r"\s*<(.*)>(.*)")
_LINK_PARAM = re.compile(r"^\s*(\S*)\s*=\s*(['\"]?)(.*?)(\2)\s*$", re.M)


def _short_code(value: object) -> str | None:
    """GitLab's machine error code (invalid_grant, ...) when it is one; never free text."""
    return value if isinstance(value, str) and _SHORT_CODE.fullmatch(value) else None


class GitLabClient:
    """Talks to one GitLab over one shared `ClientSession` made by `make_session`: its own calls go through
    the session connector's GitLabHTTP pool (gitlab_http.py), anything else (automatic provisioning) through
    aiohttp."""

    def __init__(self, cfg: GitLabConfig, session: aiohttp.ClientSession,
                 on_request: Callable[[str, int], None] | None = None) -> None:
        self._cfg = cfg
        self._session = session
        connector = session.connector
        if not isinstance(connector, GitLabConnector):
            raise TypeError("GitLabClient needs a session made by GitLabClient.make_session")
        self._http = connector.http
        self._base_path = urlsplit(cfg.url).path.rstrip("/")
        self._on_request = on_request
        # GitLab's discovery document, read once (SPEC §16): the issuer it announces and where browsers go.
        self._issuer: str | None = cfg.issuer
        self._authorize_endpoint: str | None = f"{cfg.issuer}/oauth/authorize" if cfg.issuer else None

    @property
    def session(self) -> aiohttp.ClientSession:
        """The shared session (automatic provisioning lists groups over it with its own token)."""
        return self._session

    @staticmethod
    def make_session(cfg: GitLabConfig) -> aiohttp.ClientSession:
        """The one session for GitLab: bounded timeouts, the configured CA, our User-Agent."""
        ssl_ctx: ssl.SSLContext | bool = True
        if cfg.ca_file:
            try:
                ssl_ctx = ssl.create_default_context(cafile=cfg.ca_file)
            except OSError as exc:  # ssl.SSLError is one: not PEM, or no certificate in it
                raise ConfigError([f"gitlab.ca_file: cannot load {cfg.ca_file} as a CA bundle: "
                                   f"{exc.strerror or exc}"]) from None
        connect_timeout = min(cfg.timeout, CONNECT_TIMEOUT)
        headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
        http = GitLabHTTP(cfg.url, ssl_context=ssl_ctx if isinstance(ssl_ctx, ssl.SSLContext) else None,
                          connect_timeout=connect_timeout, headers={**headers, "Accept-Encoding": "gzip, deflate"})
        return aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=cfg.timeout, connect=connect_timeout),
            connector=GitLabConnector(http, ssl=ssl_ctx),
            headers=headers,
            raise_for_status=False,
            # GitLab's answers are never sent back as cookies: one jar shared by every user's calls could
            # only carry one user's cookie into another's request (and filling it costs every request).
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    # ---------------------------------------------------------------------------------------------------
    # OAuth

    def authorize_url(self, *, state: str, code_challenge: str, redirect_uri: str, nonce: str | None) -> str:
        """Where to send the browser to sign in at GitLab."""
        params = {
            "client_id": self._cfg.client_id,
            "redirect_uri": redirect_uri,
            "response_type": "code",
            "state": state,
            # Always explicit: GitLab defaults an omitted scope to `api`.
            "scope": " ".join(self._cfg.scopes),
            "code_challenge": code_challenge,
            "code_challenge_method": "S256",
        }
        if nonce is not None:
            params["nonce"] = nonce
        # gitlab.url may be an address only the gateway reaches (in-cluster); browsers go where GitLab says.
        endpoint = self._authorize_endpoint or f"{self._cfg.url}/oauth/authorize"
        return f"{endpoint}?{urlencode(params, quote_via=quote)}"

    @property
    def browser_url(self) -> str:
        """GitLab's address for people (its issuer once known, else gitlab.url): where they sign out."""
        return self._issuer or self._cfg.url

    async def issuer(self) -> str:
        """The issuer GitLab announces (its external_url): `gitlab.issuer`, else discovery, fetched once."""
        if self._issuer is None:
            answer = await self._request("discovery", "GET", "/.well-known/openid-configuration")
            body = _ok_json(answer)
            issuer = body.get("issuer") if isinstance(body, dict) else None
            endpoint = body.get("authorization_endpoint") if isinstance(body, dict) else None
            if not _is_http_url(issuer) or not (endpoint is None or _is_http_url(endpoint)):
                raise _shape(answer)
            assert isinstance(issuer, str)
            self._issuer = issuer.rstrip("/")
            self._authorize_endpoint = endpoint if isinstance(endpoint, str) else f"{self._issuer}/oauth/authorize"
        return self._issuer

    async def token_owner(self, token: str) -> int | None:
        """The GitLab user id a token belongs to (GET /oauth/token/info), even when GitLab refuses that user
        everything else; None when GitLab does not say. Only used to name a refused user in the audit log."""
        try:
            answer = await self._request("token_info", "GET", "/oauth/token/info", token=token)
            body = _json_object(answer) if answer.status == 200 else {}
        except GitLabUnavailable:
            return None
        owner = body.get("resource_owner_id")
        return owner if isinstance(owner, int) and not isinstance(owner, bool) else None

    async def exchange_code(self, code: str, *, code_verifier: str, redirect_uri: str) -> TokenResponse:
        """Trade the callback's code for tokens (HTTP Basic client authentication)."""
        answer = await self._request(
            "token", "POST", "/oauth/token", auth=self._client_auth(),
            data={"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri,
                  "code_verifier": code_verifier},
        )
        if answer.status == 400:
            error = _error_code(answer)
            if error in ("invalid_grant", "invalid_request"):
                raise InvalidState("GitLab refused the sign-in code (it expired or was already used)",
                                   advice="Start the sign-in again.")
            if error in ("invalid_scope", "unauthorized_client", "unsupported_grant_type"):
                raise GitLabUnavailable(
                    f"GitLab refused the gateway's OAuth application ({error}): check gitlab.scopes "
                    "and the application's settings in GitLab", code=_MISCONFIGURED)
            raise GitLabUnavailable(f"GitLab refused the code exchange ({error or 'HTTP 400'})")
        if answer.status == 401:
            raise GitLabUnavailable(
                "GitLab did not accept the gateway's OAuth application credentials: "
                "check gitlab.client_id and gitlab.client_secret", code=_MISCONFIGURED,
                advice="An administrator must fix the gateway's GitLab application settings.")
        return _token_response(answer)

    async def refresh(self, refresh_token: str) -> TokenResponse:
        """Trade a refresh token for a new pair (GitLab rotates: the old pair dies); GrantRefused when refused."""
        answer = await self._request("token", "POST", "/oauth/token", auth=self._client_auth(),
                                     data={"grant_type": "refresh_token", "refresh_token": refresh_token})
        if answer.status in (400, 401):
            error = _error_code(answer)
            if error == "invalid_grant":
                raise GrantRefused("GitLab refused the kept grant (revoked, expired or already used)")
            raise GitLabUnavailable(f"GitLab refused the token refresh ({error or answer.status})",
                                    code=_MISCONFIGURED if answer.status == 401 else None)
        token = _token_response(answer)
        if not token.refresh_token:
            raise _shape(answer)
        return token

    async def revoke(self, token: str) -> None:
        """Revoke a token at GitLab; best effort, never raises (a failure is logged, with its cause)."""
        try:
            answer = await self._request("revoke", "POST", "/oauth/revoke", auth=self._client_auth(),
                                         data={"token": token})
        except Exception as exc:
            # Revocation is a courtesy: signing in or out must not fail because GitLab did not answer.
            cause = exc.message if isinstance(exc, GitLabUnavailable) else type(exc).__name__
            log.warning("GitLab token revocation failed", extra={"cause": cause})
            return
        if answer.status != 200:
            log.warning("GitLab token revocation failed", extra={"cause": f"GitLab answered {answer.status}"})

    # ---------------------------------------------------------------------------------------------------
    # Identity

    async def fetch_user(self, token: str) -> GitLabUser:
        """GET /api/v4/user; a blocked (or otherwise inactive) account is refused."""
        return _user(await self._request("user", "GET", "/api/v4/user", token=token))

    async def access_token_user(self, token: str) -> GitLabUser | None:
        """SPEC §14: whose GitLab access token this is; None when GitLab refuses the token (invalid, expired,
        revoked) or its user is not active."""
        answer = await self._request("user", "GET", "/api/v4/user", token=token)
        if answer.status in (401, 403):
            return None
        try:
            return _user(answer)
        except SignInRefused:
            return None

    async def fetch_groups(self, token: str) -> tuple[GitLabGroup, ...]:
        """Every page of the user's groups (direct membership >= Guest, plus descendants), or an error."""
        groups: dict[int, GitLabGroup] = {}
        page, total = 1, None
        for _ in range(MAX_PAGES):
            answer = await self._request(
                "groups", "GET", "/api/v4/groups", token=token,
                params={"min_access_level": "10", "per_page": str(PER_PAGE), "page": str(page)},
            )
            items = _group_page(answer)
            for item in items:
                # An offset listing that shifts while we page repeats an item; X-Total below catches the loss.
                groups.setdefault(item.id, GitLabGroup(item.full_path, item.id))
            total = _int_header(answer, "X-Total", total)
            next_page = _next_page(answer, page, len(items))
            if next_page is None:
                break
            page = next_page
        else:
            raise GitLabUnavailable(
                f"GitLab listed more than {MAX_PAGES} pages of groups; refusing a possibly partial listing")
        if total is not None and total != len(groups):
            raise GitLabUnavailable(
                f"GitLab's group listing was incomplete ({len(groups)} of {total} groups); "
                "it may have changed during sign-in")
        return tuple(groups.values())

    async def fetch_userinfo(self, token: str) -> tuple[GitLabUser, tuple[GitLabGroup, ...]]:
        """GET /oauth/userinfo: the user and the `groups` claim (paths only)."""
        user, groups = await self._userinfo(token, need_groups=True)
        assert groups is not None
        return user, groups

    async def sign_in_data(self, token: str, *, need_groups: bool) -> SignInData:
        """Everything a sign-in needs from GitLab, from the configured source; all of it or an error."""
        data = await self._sign_in_data(token, need_groups=need_groups)
        if not data.user.email_verified and not self._cfg.allow_unverified_email:
            # An unverified address may belong to someone else: the tool would trust it as the user's.
            raise SignInRefused(
                "Your GitLab email address is not verified", code="email_unverified",
                advice="Confirm your email address in GitLab (GitLab emailed you a link), then sign in again.",
                login=data.user.username, gitlab_id=data.user.id)
        return data

    async def _sign_in_data(self, token: str, *, need_groups: bool) -> SignInData:
        if self._cfg.groups_source == "userinfo":
            user, groups = await self._userinfo(token, need_groups=need_groups)
            return SignInData(user, groups)
        if not need_groups:
            return SignInData(await self.fetch_user(token), None)
        # Both run to completion (return_exceptions) so that the error raised does not depend on timing.
        got_user, got_groups = await asyncio.gather(
            self.fetch_user(token), self.fetch_groups(token), return_exceptions=True)
        failures = [r for r in (got_user, got_groups) if isinstance(r, BaseException)]
        if failures:
            # A refusal says more to the user than "GitLab is unavailable": prefer it when both failed.
            raise next((f for f in failures if isinstance(f, SignInRefused)), failures[0])
        assert isinstance(got_user, GitLabUser) and isinstance(got_groups, tuple)
        return SignInData(got_user, got_groups)

    async def _userinfo(self, token: str, *,
                        need_groups: bool) -> tuple[GitLabUser, tuple[GitLabGroup, ...] | None]:
        answer = await self._request("userinfo", "GET", "/oauth/userinfo", token=token)
        if answer.status == 403 and not answer.body.strip():
            raise GitLabUnavailable("GitLab refused the userinfo request: gitlab.scopes must include openid",
                                    code=_MISCONFIGURED)
        if answer.status == 401 and (owner := await self.token_owner(token)) is not None:
            # The token it just issued is valid (token/info names its owner), yet userinfo finds nobody:
            # GitLab looks the owner up among active, non-internal users (User.active), and this one is not.
            raise SignInRefused(
                "Your GitLab account is not active: it is blocked, deactivated or an internal account",
                code="gitlab_inactive", gitlab_id=owner,
                advice="Sign in to GitLab in your browser to see why (signing in reactivates a deactivated "
                       "account), or ask a GitLab administrator; then sign in here again.")
        body = _ok_json(answer)
        if not isinstance(body, dict):
            raise _shape(answer)
        sub = body.get("sub")
        username = body.get("preferred_username") or body.get("nickname")
        name, email = body.get("name"), body.get("email")
        uid = int(sub) if isinstance(sub, str) and sub.isascii() and sub.isdigit() else sub
        if (not isinstance(uid, int) or isinstance(uid, bool) or not isinstance(username, str)
                or not isinstance(name, str | None) or not isinstance(email, str | None)):
            raise _shape(answer)
        # GitLab issues no token to a blocked user, so a userinfo answer means an active account.
        # email_verified comes with the email (GitLab omits both without the email scope and a public email).
        user = GitLabUser(id=uid, username=username, name=name or "", email=email or "", state="active",
                          email_verified=body.get("email_verified") is not False)
        if not need_groups:
            return user, None
        claim = body.get("groups")
        # The claim is always present (possibly []); its absence is not "no groups" and must not drive a sync.
        if not isinstance(claim, list) or not all(isinstance(g, str) and g for g in claim):
            raise _shape(answer)
        return user, tuple(GitLabGroup(path, None) for path in dict.fromkeys(claim))

    # ---------------------------------------------------------------------------------------------------
    # Transport and error mapping

    def _client_auth(self) -> str:
        """HTTP Basic credentials, built by hand: aiohttp.BasicAuth is deprecated and its replacement raises
        on a ':' in the login, an error that would escape as a raw ValueError."""
        pair = f"{self._cfg.client_id}:{self._cfg.client_secret}".encode()
        return f"Basic {base64.b64encode(pair).decode('ascii')}"

    async def _request(self, endpoint: str, method: str, path: str, *, token: str | None = None,
                       params: Mapping[str, str] | None = None, data: Mapping[str, str] | None = None,
                       auth: str | None = None) -> _Answer:
        authorization = f"Bearer {token}" if token is not None else auth
        headers = {"Authorization": authorization} if authorization is not None else {}
        body = None
        if data is not None:
            # Form-encoded (UTF-8) as aiohttp's FormData did.
            body = urlencode(data).encode()
            headers["Content-Type"] = FORM
        target = self._base_path + path + (f"?{urlencode(params)}" if params else "")
        try:
            # Redirects are not followed: the API never redirects, and a redirect (http -> https, a moved
            # GitLab) would turn the token POST into a GET or carry the bearer token elsewhere.
            async with asyncio.timeout(self._cfg.timeout):
                reply = await self._http.request(method, target, headers=headers, body=body)
            answer = _Answer(endpoint, reply.status, reply.headers, f"{self._cfg.url}{path}", reply.body)
        except ssl.SSLCertVerificationError:
            self._record(endpoint, 0)
            raise GitLabUnavailable(
                "GitLab's TLS certificate is not trusted: set gitlab.ca_file to its CA bundle",
                code=_MISCONFIGURED) from None
        except TimeoutError:
            self._record(endpoint, 0)
            raise GitLabUnavailable(f"GitLab did not answer the {endpoint} request in time "
                                    f"(gitlab.timeout is {self._cfg.timeout:g} seconds)") from None
        except (OSError, ProtocolError) as exc:
            self._record(endpoint, 0)
            raise GitLabUnavailable(
                f"Cannot reach GitLab for the {endpoint} request ({type(exc).__name__}): check gitlab.url "
                "and the network") from None
        self._record(endpoint, answer.status)
        return answer

    def _record(self, endpoint: str, status: int) -> None:
        log.debug("gitlab %s -> %s", endpoint, status)
        if self._on_request is not None:
            self._on_request(endpoint, status)


# ------------------------------------------------------------------------------------------------------------
# Reading answers


def _user(answer: _Answer) -> GitLabUser:
    """The user of a GET /api/v4/user answer; a blocked (or otherwise inactive) account is refused."""
    body = _ok_json(answer)
    if not isinstance(body, dict):
        raise _shape(answer)
    uid, username, state = body.get("id"), body.get("username"), body.get("state")
    name, email = body.get("name"), body.get("email")
    if (not isinstance(uid, int) or isinstance(uid, bool) or not isinstance(username, str) or not username
            or not isinstance(state, str) or not isinstance(name, str | None)
            or not isinstance(email, str | None)):
        raise _shape(answer)
    # confirmed_at is null for an unconfirmed address; GitLab versions without the field are taken at
    # their word (they refused unconfirmed users outright).
    user = GitLabUser(id=uid, username=username, name=name or "", email=email or "", state=state,
                      email_verified=body.get("confirmed_at", "") is not None)
    if user.state != "active":
        raise _inactive(user.state, user)
    return user


def _json(body: bytes) -> Any:
    """The parsed body; a ValueError (UnicodeDecodeError is one) when it is not JSON."""
    return json.loads(body)


def _ok_json(answer: _Answer) -> Any:
    """The JSON body of a 200, or the error that the status means."""
    _raise_for_status(answer)
    try:
        return _json(answer.body)
    except ValueError:
        raise GitLabUnavailable(f"GitLab answered the {answer.endpoint} request with invalid JSON") from None


def _json_object(answer: _Answer) -> dict[str, Any]:
    """The body as a JSON object, or {} (error answers may be empty, HTML or plain text)."""
    try:
        body = _json(answer.body)
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _error_code(answer: _Answer) -> str | None:
    """The OAuth `error` of an error answer when it is a machine code; never free text."""
    return _short_code(_json_object(answer).get("error"))


def _raise_for_status(answer: _Answer) -> None:
    status, endpoint = answer.status, answer.endpoint
    if status == 200:
        return
    if status == 429:
        raise GitLabRateLimited(f"GitLab is rate limiting the gateway (HTTP 429 on {endpoint})",
                                retry_after=retry_after(answer.headers.get("Retry-After", "")))
    if status == 401:
        # It was issued a moment ago: GitLab itself is confused, or the user was blocked meanwhile.
        raise GitLabUnavailable(f"GitLab rejected the access token it had just issued ({endpoint}, HTTP 401)")
    if status == 403:
        body = _json_object(answer)
        if body.get("error") == "insufficient_scope":
            raise GitLabUnavailable(f"The access token lacks a scope the {endpoint} request needs: check "
                                    "gitlab.scopes (read_user and read_api for groups_source api)",
                                    code=_MISCONFIGURED)
        refusal = gitlab_refusal(body.get("message"))
        if refusal is not None:
            raise refusal
        raise GitLabUnavailable(f"GitLab refused the {endpoint} request (HTTP 403)")
    if 300 <= status < 400 or status == 404:
        raise GitLabUnavailable(f"GitLab answered HTTP {status} to the {endpoint} request: check gitlab.url",
                                code=_MISCONFIGURED)
    raise GitLabUnavailable(f"GitLab answered HTTP {status} to the {endpoint} request")


def _token_response(answer: _Answer) -> TokenResponse:
    """The tokens of a 200 from /oauth/token, or the error its status or shape means."""
    body = _ok_json(answer)
    if not isinstance(body, dict):
        raise _shape(answer)
    access_token, token_type = body.get("access_token"), body.get("token_type")
    id_token, scope = body.get("id_token"), body.get("scope", "")
    refresh_token = body.get("refresh_token")
    if (not isinstance(access_token, str) or not access_token or not isinstance(token_type, str)
            or token_type.lower() != "bearer" or not isinstance(scope, str)
            or not (id_token is None or isinstance(id_token, str))
            or not (refresh_token is None or isinstance(refresh_token, str))):
        raise _shape(answer)
    return TokenResponse(access_token=access_token, id_token=id_token, scope=scope, refresh_token=refresh_token)


def _shape(answer: _Answer) -> GitLabUnavailable:
    return GitLabUnavailable(f"GitLab's answer to the {answer.endpoint} request has an unexpected shape")


def _inactive(state: str, user: GitLabUser | None = None) -> SignInRefused:
    if state in _BLOCKED_STATES:
        message = "Your GitLab account is blocked"
    else:
        message = f"Your GitLab account is not active ({_short_code(state) or 'unknown state'})"
    return SignInRefused(message, code="blocked",
                         advice="Ask a GitLab administrator to unblock your account, then sign in again.",
                         login=user.username if user else None, gitlab_id=user.id if user else None)


def gitlab_refusal(message: object) -> SignInRefused | None:
    """What the message of a GitLab API 403 means for the user: GitLab's API guard refusing them
    ("403 Forbidden - <reason>", see GITLAB_REFUSALS) is a refusal, never "GitLab is unavailable"; anything
    else is None. GitLab's own words are not shown: they may name GitLab's URL or the user's handle."""
    text = message.lower() if isinstance(message, str) else ""
    if not text.startswith("403 forbidden - "):
        return None
    code, title, advice = next(((c, m, a) for fragment, c, m, a in GITLAB_REFUSALS if fragment in text),
                               ("gitlab_refused", "GitLab refuses to let applications use your account",
                                "Sign in to GitLab in your browser to see why, then sign in here again."))
    return SignInRefused(title, code=code, advice=advice)


def retry_after(value: str) -> int | None:
    """Seconds to wait from a Retry-After header: delay-seconds or an HTTP date (RFC 9110 10.2.3), capped."""
    value = value.strip()
    if value.isascii() and value.isdigit():
        return min(int(value), MAX_RETRY_AFTER)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0, min(math.ceil(when.timestamp() - time.time()), MAX_RETRY_AFTER))


def _is_http_url(value: object) -> bool:
    return isinstance(value, str) and value.startswith(("http://", "https://")) and len(value) < 2048


class _ListedGroup(msgspec.Struct):
    """What a sign-in reads of a GET /groups item; its other fields are skipped, not built into dicts (json.loads
    of 50 groups cost more than the rest of the listing's handling)."""

    id: int  # an int, not a bool or a float (msgspec is strict), as the JSON check it replaces
    full_path: str


_GROUP_PAGE: Final = msgspec.json.Decoder(list[_ListedGroup])


def _group_page(answer: _Answer) -> list[_ListedGroup]:
    """The groups of one page of GET /groups, or the error its status, syntax or shape means."""
    _raise_for_status(answer)
    try:
        items = _GROUP_PAGE.decode(answer.body)
    except msgspec.ValidationError:  # a DecodeError too: first
        raise _shape(answer) from None
    except msgspec.DecodeError:
        raise GitLabUnavailable(f"GitLab answered the {answer.endpoint} request with invalid JSON") from None
    if not all(item.full_path for item in items):
        raise _shape(answer)
    return items


def _int_header(answer: _Answer, name: str, default: int | None) -> int | None:
    value = answer.headers.get(name, "").strip()
    if not value:
        return default
    if not value.isascii() or not value.isdigit():
        raise GitLabUnavailable(f"GitLab sent an invalid {name} header on the {answer.endpoint} request")
    return int(value)


def _next_page(answer: _Answer, page: int, count: int) -> int | None:
    """The page after `page`, None on the last one; anything but page + 1 would skip or repeat data."""
    if "X-Next-Page" in answer.headers:
        raw = answer.headers["X-Next-Page"].strip()
    elif (link := answer.links.get("next")) is not None:
        # Only the page number is used: the link names GitLab's external_url, which may differ from ours.
        raw = str(link["url"].query.get("page", "")) or "(none)"
    elif count >= PER_PAGE:
        # A full page with no pagination headers (a proxy stripped them?) may not be the last one.
        raise GitLabUnavailable("GitLab sent no pagination headers for a full page of groups; "
                                "refusing a possibly partial listing")
    else:
        raw = ""
    if not raw:
        return None
    if not raw.isascii() or not raw.isdigit() or int(raw) != page + 1:
        raise GitLabUnavailable(
            f"GitLab's group pagination is inconsistent (page {page} points to {raw[:10]!r})")
    return int(raw)
