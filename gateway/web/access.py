"""Applying SPEC §13 to a request: which host it is for, what the policy says, and how a refusal looks.

Shared by the proxy (web/proxy.py) and auth_request (web/auth_request.py) so both modes decide identically.
The decisions themselves are pure (access/policy.py, access/upstreams.py); this module reads the request.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from urllib.parse import quote

from aiohttp import web
from multidict import MultiMapping

from gateway.access.assertion import Signer
from gateway.access.headers import HeaderPolicy
from gateway.access.hosts import canonical_host
from gateway.access.policy import Decision, Policy
from gateway.access.upstreams import UpstreamTable
from gateway.config import Config
from gateway.errors import Forbidden, NotFound, Unauthenticated
from gateway.identity import Sender
from gateway.web.login import start_url
from gateway.web.pages import NO_STORE, redirect, wants_html

log = logging.getLogger("gateway.policy")

JWKS_CACHE = {"Cache-Control": "public, max-age=300"}  # SPEC §13: cacheable for 5 minutes


class PolicyForbidden(Forbidden):
    """A signed-in user failed a policy rule: says who would pass and offers another account."""

    code, title = "forbidden", "You do not have access to this page"


class UnknownHost(NotFound):
    code, title = "unknown_host", "No application is served at this address"
    advice = "Check the address you typed or followed."


@dataclass(frozen=True, slots=True)
class Access:
    """Built once per app: the compiled policy, the routing table and the signer."""

    policy: Policy
    table: UpstreamTable
    headers: HeaderPolicy
    prefix: str
    gitlab_url: str  # where the 403 page sends a user to switch GitLab accounts
    signer: Signer | None
    assertion_header: str | None
    needs_host: bool  # some upstream or rule names a host: only then is the Host read

    @classmethod
    def from_config(cls, cfg: Config, headers: HeaderPolicy) -> Access:
        policy = Policy.from_config(cfg.routes.public, cfg.routes.api, cfg.policy)
        table = UpstreamTable(cfg.routing)
        return cls(policy, table, headers, cfg.server.prefix, cfg.gitlab.url, make_signer(cfg), cfg.headers.assertion,
                   table.by_host or any(r.host for r in policy.rules))

    def host_of(self, request: Sender) -> str | None:
        """The canonical host to match: Host, or X-Forwarded-Host from a trusted proxy (SPEC §13)."""
        if not self.needs_host:
            return None
        return canonical_host(self._forwarded(request.headers, request.remote, "X-Forwarded-Host")
                              or request.headers.get("Host", ""))

    def forwarded_request(self, request: Sender) -> tuple[str | None, str | None, str | None]:
        """auth_request: the original (method, host, path) nginx passed, believed only from trusted_proxies.

        Unknown parts are None: the policy then assumes the strictest rule that could apply.
        """
        method = self._forwarded(request.headers, request.remote, "X-Forwarded-Method")
        uri = self._forwarded(request.headers, request.remote, "X-Forwarded-Uri")
        host = self.host_of(request)
        if uri is not None and not uri.startswith("/"):
            # Absolute form ("http://h/x"): nginx's $request_uri keeps it as the client wrote it.
            scheme, sep, rest = uri.partition("://")
            uri = ("/" + rest.partition("/")[2]) if sep and scheme.isalpha() else None
        return (method.upper() if method else None), host, uri

    def _forwarded(self, headers: MultiMapping[str], remote: str | None, name: str) -> str | None:
        value = headers.get(name)
        if value is None or not self.headers.client_ip_is_trusted(remote or ""):
            return None
        return value.partition(",")[0].strip() or None



def make_signer(cfg: Config) -> Signer | None:
    """The assertion signer, when keys are configured (their JWKS is published even if the header is off)."""
    return Signer(cfg.headers.assertion_keys, issuer=cfg.server.public_url) if cfg.headers.assertion_keys else None


def unknown_host() -> UnknownHost:
    return UnknownHost("No application is configured for this host name.")


def refuse(access: Access, request: web.Request, decision: Decision, raw_path: str) -> web.Response:
    """The answer to a request the policy did not allow (sign-in needed, or forbidden)."""
    if decision.outcome == "forbidden":
        raise forbidden(access, decision, raw_path)
    if decision.api:
        return unauthenticated_json()  # JSON even for a browser: routes.api is for programs (SPEC §4)
    if wants_html(request):
        return redirect(start_url(access.prefix, raw_path))
    raise Unauthenticated()


def unauthenticated_json() -> web.Response:
    err = Unauthenticated()
    return web.Response(status=401, text=json.dumps({"error": err.code, "message": err.message}),
                        content_type="application/json",
                        headers={**NO_STORE, "WWW-Authenticate": 'Bearer realm="gateway"'})


def who_passes(decision: Decision) -> str:
    """'members of sre or ops', 'specific users', or both: the sentence fragment of the 403 page."""
    parts = []
    if decision.groups:
        names = [f"“{g}”" for g in decision.groups]
        joined = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
        parts.append(f"members of the group{'s' if len(names) > 1 else ''} {joined}")
    if decision.users:
        parts.append("specific users")
    return " and ".join(parts) or "nobody"


def forbidden(access: Access, decision: Decision, raw_path: str) -> PolicyForbidden:
    """403 naming what would pass, with a way to sign in with another account; logged with the rule's key
    path so an operator can tell which rule refused (the access log line has the user and path)."""
    log.info("refused by policy", extra={"rule": decision.rule})
    again = start_url(access.prefix, raw_path if raw_path.startswith("/") else "/")
    err = PolicyForbidden(
        f"Only {who_passes(decision)} can use this page.",
        advice="Ask an administrator if you think you should have access.",
        retry_url=f"{access.prefix}/sign_out?rd={quote(again, safe='')}")
    err.retry_label = "Sign in with another account"
    # GitLab would sign the browser straight back in as the same account: sign out there first (SPEC §16).
    err.switch_account_url = f"{access.gitlab_url}/"
    err.details = {"allowed_groups": list(decision.groups), "specific_users": decision.users}
    return err


async def jwks(request: web.Request) -> web.Response:
    """{prefix}/jwks.json and the admin listener's /jwks.json: the public keys that verify assertions."""
    signer = request.app[SIGNER]
    if signer is None:
        raise NotFound("No assertion keys are configured (headers.assertion_keys)")
    return web.Response(text=json.dumps(signer.jwks()), content_type="application/json", headers=JWKS_CACHE)


SIGNER: web.AppKey[Signer | None] = web.AppKey("signer")
