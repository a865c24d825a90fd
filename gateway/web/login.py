"""The sign-in handlers of SPEC §4: {prefix}/start, {prefix}/callback, {prefix}/sign_out.

The sign-in state (state, PKCE verifier, nonce, where to go back) travels in a short-lived encrypted cookie
named after the state, so several tabs can sign in at once without overwriting each other's state; its Path
is the prefix, so it never reaches the upstream tool's pages.
"""

from __future__ import annotations

import base64
import hmac
import json
import logging
import re
import time
from urllib.parse import quote

from aiohttp import web
from aiohttp_session import Session
from cryptography.fernet import InvalidToken

from gateway import keys
from gateway.access.redirects import safe_redirect
from gateway.db import DB_UNAVAILABLE
from gateway.db import audit as db_audit
from gateway.errors import (
    DatabaseUnavailable,
    Forbidden,
    GatewayError,
    GitLabUnavailable,
    InvalidState,
    SignInRefused,
    TooManySignIns,
)
from gateway.sessions.store import SessionStore, cookie_value
from gateway.sync import provisioning, resync
from gateway.sync.gitlab import pkce_pair, random_token
from gateway.web.pages import redirect, sign_out_page

log = logging.getLogger("gateway.login")

STATE_TTL = 600  # seconds: SPEC §4, "a short-lived (10 min) signed cookie"
_REFUSAL_CODE = re.compile(r"[a-z_]{1,40}")
MAX_STATE_COOKIES = 5  # SPEC §16: sign-ins in progress per browser; the oldest is dropped
# Bytes of state cookies a browser may hold at once: one with the longest accepted rd (2,048 bytes) fits, and
# with the session cookie and the tool's own cookies the header stays far below aiohttp's 8,190-byte limit.
STATE_COOKIE_BUDGET = 4096


def _state_cookie_name(store: SessionStore, state: str) -> str:
    # Only a prefix of the state: enough to tell tabs apart; the full state is checked inside the cookie.
    return f"{store.cookie_name}_state_{state[:12]}"


def _stale_state_cookies(request: web.Request, store: SessionStore, new_size: int) -> list[str]:
    """Names of this browser's sign-in state cookies to drop so that, with a new one of `new_size`
    characters, at most MAX_STATE_COOKIES remain within STATE_COOKIE_BUDGET (SPEC §16): abandoned sign-ins
    (tabs closed at GitLab's page, repeated clicks) must never grow the Cookie header past the server's limit
    and lock the browser out of {prefix}/*. The oldest go first; unreadable ones count as oldest."""
    prefix = f"{store.cookie_name}_state_"
    held = []
    for name, value in request.cookies.items():
        if name.startswith(prefix):
            try:
                # Fernet's own timestamp has whole seconds only: several starts share one.
                issued = float(json.loads(store.fernet.decrypt(value.encode(), ttl=STATE_TTL))["t"])
            except (InvalidToken, ValueError, KeyError, TypeError):
                issued = 0.0
            held.append((issued, name, len(name) + len(value) + 2))
    held.sort(reverse=True)  # newest first
    keep, used = 0, new_size
    for _issued, _name, size in held:
        if keep + 1 >= MAX_STATE_COOKIES or used + size > STATE_COOKIE_BUDGET:
            break
        keep, used = keep + 1, used + size
    return [name for _issued, name, _size in held[keep:]]


def _safe_rd(request: web.Request) -> str:
    cfg = request.app[keys.CONFIG]
    return safe_redirect(request.query.get("rd"), own_host=cfg.server.public_host,
                         allowed_domains=cfg.redirect_domains)  # with every upstream host (SPEC §13)


def _limit_anonymous(request: web.Request, store: SessionStore) -> None:
    """SPEC §16: anonymous start/callback traffic per client address is limited to server.signin_rate (the
    address from X-Forwarded-For only when the peer is a trusted proxy). Signed-in browsers are not counted."""
    if store.request_ref(request) is not None:
        return
    client, _scheme, _host = request.app[keys.HEADER_POLICY].effective_client(
        request.remote or "", request.headers, scheme=request.scheme)
    wait = request.app[keys.SIGNIN_LIMITER].check(client)
    if wait:
        log.warning("sign-in rate limit reached", extra={"client": client, "path": request.path})
        raise TooManySignIns(wait)


def start_url(prefix: str, rd: str, *, again: str | None = None) -> str:
    """The sign-in link; `again` names the refusal a "Try again" follows, so a repeat can say so (SPEC §16)."""
    return f"{prefix}/start?rd={quote(rd, safe='')}" + (f"&again={again}" if again else "")


async def start(request: web.Request) -> web.Response:
    """Begin sign-in: remember state + PKCE verifier in a cookie bound to this browser, go to GitLab."""
    cfg = request.app[keys.CONFIG]
    store = request.app[keys.SESSIONS]
    _limit_anonymous(request, store)
    rd = _safe_rd(request)
    state = random_token()
    verifier, challenge = pkce_pair()
    nonce = random_token() if "openid" in cfg.gitlab.scopes else None
    again = request.query.get("again", "")
    state_data = {"state": state, "verifier": verifier, "nonce": nonce, "rd": rd,
                  "again": again if _REFUSAL_CODE.fullmatch(again) else None, "t": time.time()}
    sealed = store.fernet.encrypt(json.dumps(state_data).encode()).decode()
    gitlab = request.app[keys.GITLAB]
    if nonce is not None:
        # Discovery names GitLab's external URL (where browsers go) and the issuer the ID token will carry.
        await gitlab.issuer()
    url = gitlab.authorize_url(state=state, code_challenge=challenge, redirect_uri=cfg.server.callback_url,
                               nonce=nonce)
    response = redirect(url)
    name = _state_cookie_name(store, state)
    for stale in _stale_state_cookies(request, store, len(name) + len(sealed) + 2):
        response.del_cookie(stale, path=cfg.server.prefix, secure=cfg.cookie_secure, httponly=True,
                            samesite="Lax")
    response.set_cookie(name, sealed, max_age=STATE_TTL, path=cfg.server.prefix,
                        secure=cfg.cookie_secure, httponly=True, samesite="Lax")
    return response


def check_id_token(id_token: str | None, *, nonce: str, client_id: str, issuer: str) -> None:
    """Check the ID token's nonce, audience, issuer and expiry (OIDC Core 3.1.3.7).

    The token comes straight from GitLab's token endpoint over TLS, authenticated with our client secret, so
    its signature need not be checked (OIDC Core 3.1.3.7 item 6); the nonce ties it to this browser's sign-in.
    """
    if not id_token:
        raise GitLabUnavailable("GitLab sent no ID token although the openid scope was granted")
    try:
        payload = id_token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError):
        raise GitLabUnavailable("GitLab sent an ID token that cannot be read") from None
    aud = claims.get("aud")
    audiences = aud if isinstance(aud, list) else [aud]
    if (not hmac.compare_digest(str(claims.get("nonce", "")).encode(), nonce.encode())
            or client_id not in audiences or str(claims.get("iss", "")).rstrip("/") != issuer
            or not isinstance(claims.get("exp"), int) or claims["exp"] < time.time() - 60):
        raise InvalidState("GitLab's ID token does not belong to this sign-in")


def _open_state(request: web.Request, store: SessionStore) -> dict[str, str | None]:
    state = request.query.get("state", "")
    if not state:
        raise InvalidState("The sign-in answer from GitLab carries no state")
    # One cookie looked up, not the whole header parsed (aiohttp's parser cost 3 % of a sign-in's CPU).
    sealed = cookie_value(request.headers.get("Cookie"), _state_cookie_name(store, state))
    if not sealed:
        raise InvalidState("This sign-in was not started in this browser, or it has expired")
    try:
        data = json.loads(store.fernet.decrypt(sealed.encode(), ttl=STATE_TTL))
    except (InvalidToken, ValueError):
        raise InvalidState("This sign-in has expired or its state was tampered with") from None
    if not isinstance(data, dict) or not hmac.compare_digest(str(data.get("state", "")).encode(), state.encode()):
        raise InvalidState("The sign-in state does not match")
    return data


async def callback(request: web.Request) -> web.Response:
    """Finish sign-in: check state, exchange the code, apply SPEC §5, open a NEW session."""
    cfg = request.app[keys.CONFIG]
    store = request.app[keys.SESSIONS]
    metrics = request.app[keys.METRICS]
    prefix = cfg.server.prefix
    gitlab = request.app[keys.GITLAB]
    rd, again = "/", None
    _limit_anonymous(request, store)
    try:
        # Before anything is sent to GitLab: a callback without this browser's valid state never costs a call.
        data = _open_state(request, store)
        rd, again = str(data.get("rd") or "/"), data.get("again")
        retry = start_url(prefix, rd)
        error = request.query.get("error")
        if error == "access_denied":
            raise Forbidden("You declined to let this application use your GitLab account", code="access_denied",
                            advice="Sign in again and choose Authorize to continue.", retry_url=retry)
        if error:
            raise GitLabUnavailable(f"GitLab could not complete the sign-in ({error[:64]})", retry_url=retry)
        code = request.query.get("code")
        if not code:
            raise InvalidState("GitLab's answer carries no authorization code", retry_url=retry)
        token = None
        try:
            token = await gitlab.exchange_code(code, code_verifier=str(data["verifier"]),
                                               redirect_uri=cfg.server.callback_url)
            if data.get("nonce"):
                check_id_token(token.id_token, nonce=str(data["nonce"]), client_id=cfg.gitlab.client_id,
                               issuer=await gitlab.issuer())
            need_groups = cfg.provisioning.sync_groups or bool(cfg.provisioning.allowed_groups)
            fetched = await gitlab.sign_in_data(token.access_token, need_groups=need_groups)
        except SignInRefused as err:
            # GitLab itself refused (a blocked account, unaccepted terms, an unverified email): audited like
            # every §5 refusal, naming the user GitLab's token belongs to.
            if err.gitlab_id is None and token is not None:
                err.gitlab_id = await gitlab.token_owner(token.access_token)
            err.login = await provisioning.audit_gitlab_refusal(request.app[keys.POOL], err)
            err.retry_url = err.retry_url or retry
            raise
        except GatewayError as err:
            err.retry_url = err.retry_url or retry
            raise
        # Taken before the sign-in: if an invalidation arrives meanwhile, the identity read below may
        # already be stale and must not be cached (see SessionStore.remember).
        generation = store.generation
        keep = bool(cfg.provisioning.resync_interval and token.refresh_token)
        new_session = provisioning.NewSession(lifetime=store.lifetime,
                                              user_agent=request.headers.get("User-Agent", ""),
                                              client_ip=request.remote or "",
                                              grant=resync.seal(store.fernet, token.refresh_token) if keep else None,
                                              resync_interval=cfg.provisioning.resync_interval)
        try:
            result = await provisioning.sign_in(request.app[keys.POOL], cfg.provisioning, fetched.user,
                                                fetched.groups, bind_groups=cfg.gitlab.groups_source == "api",
                                                session=new_session)
        except GatewayError as err:
            err.retry_url = err.retry_url or retry
            raise
        # Revocations are courtesies that must not delay the sign-in: they run in the background (each
        # bounded by gitlab.timeout, logged when it fails).
        if keep:
            # SPEC §11: the grant is kept for re-checks; the one it replaces dies at GitLab.
            revocation = resync.revoke_sealed(gitlab, store.fernet, result.replaced_grant)
        else:
            # GitLab tokens are not kept (SPEC §6): our session stands on its own from here.
            revocation = gitlab.revoke(token.access_token)
        request.app[keys.BACKGROUND].spawn(revocation, name="gitlab-revoke")
    except GatewayError as err:
        err.retry_url = err.retry_url or start_url(prefix, "/")
        login = err.login if isinstance(err, SignInRefused) else None
        if err.status == 403:
            _way_out(err, gitlab.browser_url, start_url(prefix, rd, again=err.code), repeated=again == err.code)
        metrics.login(err.code)
        if err.status < 500:  # an outage is logged with its cause by app.errors_middleware, once
            log.info("sign-in failed", extra={"reason": err.code, "status": err.status, "user": login})
        raise
    sid = result.session_id
    previous = store.request_ref(request)
    if previous is not None and previous.sid != sid:
        try:
            await store.revoke(previous.sid)
        except DatabaseUnavailable:
            # The new session is committed; the old one still expires or can be revoked by an admin.
            log.warning("could not revoke the browser's previous session")
    store.remember(sid, result.identity, result.expires_at, generation=generation,
                   confirmed_at=time.time() if keep else None)
    metrics.login("success")
    metrics.group_changes(len(result.added), len(result.removed))
    response = redirect(rd)
    # A fresh aiohttp-session Session, never the one the browser came with: no session fixation.
    session = Session(None, data=None, new=True, max_age=int(store.lifetime))
    session["sid"], session["uid"] = sid, result.identity.user_id
    await store.storage().save_session(request, response, session)
    response.del_cookie(_state_cookie_name(store, request.query["state"]), path=prefix)
    log.info("signed in", extra={"user": result.user.login, "new_user": result.created,
                                 "added": list(result.added), "removed": list(result.removed)})
    return response


def _way_out(err: GatewayError, gitlab_url: str, retry: str, *, repeated: bool) -> None:
    """SPEC §16: a refused user can leave the loop. GitLab signs the browser straight back in as the same
    account, so the page points to GitLab to sign out first; and a "Try again" that meets the same refusal
    says so instead of showing the very same page."""
    err.switch_account_url = f"{gitlab_url}/"
    err.retry_url = retry
    if repeated:
        err.message = f"Same answer as before: {err.message}"
        err.advice = (f"{err.advice} GitLab signed you in with the same account again; to use another one, "
                      "sign out of GitLab first.")


# Sec-Fetch-Site values of a GET that the user made themselves (typed, bookmarked, a link of our own site), or
# of a client that does not send the header at all (older browsers, curl): those sign out at once.
_OWN_NAVIGATION = frozenset({"", "same-origin", "none"})


async def sign_out(request: web.Request) -> web.Response:
    """Revoke the server-side session, clear the cookie, go to the validated `rd`.

    A cross-site GET (an image or link on another site) does not sign out (SPEC §16): it gets a page whose
    button POSTs the sign-out, so no other site can end the user's session behind their back. A POST from
    another site (an auto-submitting form) gets the same page: it carries no SameSite=Lax session cookie, yet
    its answer could still clear the cookie.
    """
    cfg = request.app[keys.CONFIG]
    store = request.app[keys.SESSIONS]
    rd = _safe_rd(request)
    fetch_site = request.headers.get("Sec-Fetch-Site", "").lower()
    if fetch_site == "cross-site" or (request.method != "POST" and fetch_site not in _OWN_NAVIGATION):
        return sign_out_page(f"{cfg.server.prefix}/sign_out?rd={quote(rd, safe='')}")
    ref = store.request_ref(request)
    if ref is not None:
        try:
            identity = await store.lookup(ref.sid)
            if await store.revoke(ref.sid) is not None and identity is not None:
                try:
                    await db_audit.record(request.app[keys.POOL], identity.login, "sign_out", identity.login,
                                          session=ref.sid[:8])
                except DB_UNAVAILABLE:
                    log.error("could not audit a sign-out")
        except DatabaseUnavailable as err:
            # The browser forgets the session all the same; the row lapses at its expiry or an admin revokes it.
            store.invalidate_session(ref.sid)
            log.warning("sign-out could not revoke the session: cookie cleared only", extra={"cause": err.cause})
    response = redirect(rd)
    response.del_cookie(store.cookie_name, path="/", secure=cfg.cookie_secure, httponly=True,
                        samesite=cfg.session.samesite)
    return response

