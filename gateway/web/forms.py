"""Cross-site request forgery defences of the pages and {prefix}/api/tokens (SPEC §14, §15).

Two independent checks on every state-changing request:
- Origin: the browser's `Origin` must be the gateway's own (`server.public_url`, or the admin listener's own
  origin); without Origin, `Sec-Fetch-Site: same-origin` is accepted. A program that sends neither is refused:
  the same-origin API is for the pages' own scripts and for people, programs use the admin API.
- Form token (forms only): `issued.nonce.mac`, where mac = HMAC-SHA256 over (binding, issued, nonce) with a key
  derived from the session secrets; `binding` is the signed-in session (its hash), so a token from another
  session or browser is worthless. It is valid for FORM_TTL and single-use: the nonce is recorded in the
  database when the form is accepted, so a replayed post is refused on every replica.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from urllib.parse import urlsplit

import asyncpg
from aiohttp import web

from gateway.db import tokens as db_tokens
from gateway.errors import Forbidden
from gateway.services._db import transaction
from gateway.web.pages import FORM_POST

FORM_TTL = 4 * 3600.0
FIELD = "csrf"


class CrossSite(Forbidden):
    code, title = "cross_site", "This form did not come from this site"
    advice = "Open the page again from its address and submit the form from there."


class StaleForm(Forbidden):
    code, title = "stale_form", "This form has expired or was already submitted"
    advice = "Reload the page and submit the form again."


def origin_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


def check_origin(request: web.BaseRequest, allowed: str) -> None:
    """Refuse (403) a state-changing request whose Origin is not `allowed` (an origin: scheme://host[:port])."""
    origin = request.headers.get("Origin")
    if origin is not None:
        if origin.lower() != allowed:
            raise CrossSite(f"Requests from {origin[:200]} may not change anything here")
        return
    if request.headers.get("Sec-Fetch-Site") != "same-origin":
        raise CrossSite("The request carries no Origin header: it cannot be shown to come from this site")


class FormTokens:
    """Issues and checks the single-use form tokens; keyed by the session secrets (all replicas agree)."""

    def __init__(self, secrets_: tuple[str, ...]) -> None:
        self._keys = [hashlib.sha256(b"gateway form token\x00" + s.encode()).digest() for s in secrets_]

    def _mac(self, key: bytes, binding: str, issued: str, nonce: str) -> str:
        return hmac.new(key, f"{binding}\x00{issued}\x00{nonce}".encode(), hashlib.sha256).hexdigest()

    def issue(self, binding: str) -> str:
        issued, nonce = str(int(time.time())), secrets.token_urlsafe(16)
        return f"{issued}.{nonce}.{self._mac(self._keys[0], binding, issued, nonce)}"

    def valid(self, binding: str, token: str) -> str | None:
        """The nonce of a well-formed, unexpired token made for `binding`; None otherwise."""
        issued, _, rest = token.partition(".")
        nonce, _, mac = rest.partition(".")
        if not issued.isdigit() or not nonce or len(token) > 200:
            return None
        if not 0 <= time.time() - int(issued) <= FORM_TTL:
            return None
        if not any(hmac.compare_digest(self._mac(k, binding, issued, nonce), mac) for k in self._keys):
            return None
        return nonce

    async def spend(self, pool: asyncpg.Pool, binding: str, token: str | None) -> None:
        """Accept a form once: Forbidden when the token is missing, forged, expired or already used."""
        nonce = self.valid(binding, token or "")
        if nonce is None:
            raise StaleForm("The form's security token is missing or does not belong to your session")
        async with transaction(pool) as conn:
            if not await db_tokens.use_nonce(conn, nonce, keep=FORM_TTL):
                raise StaleForm("This form was already submitted once")


async def checked_form(request: web.Request, forms: FormTokens, pool: asyncpg.Pool, binding: str,
                       allowed_origin: str) -> dict[str, str]:
    """The fields of a posted form that passed both checks (Origin, then the single-use token)."""
    request[FORM_POST] = True
    check_origin(request, allowed_origin)
    data = await request.post()
    fields = {k: v for k, v in data.items() if isinstance(v, str)}
    await forms.spend(pool, binding, fields.get(FIELD))
    return fields


FORMS = web.AppKey("forms", FormTokens)
