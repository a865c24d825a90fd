"""Turning errors into answers: an HTML page for browsers, JSON for everything else (one middleware)."""

from __future__ import annotations

import html
import json
import logging

from aiohttp import web

from gateway.errors import GatewayError

log = logging.getLogger("gateway.pages")

NO_STORE = {"Cache-Control": "no-store"}

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<title>{title}</title>
<style>body{{font:16px/1.5 system-ui,sans-serif;max-width:40rem;margin:4rem auto;padding:0 1rem;color:#222}}
h1{{font-size:1.4rem}} .code{{color:#777;font-size:.85rem}} a.button{{display:inline-block;padding:.5rem 1rem;
background:#554488;color:#fff;border-radius:4px;text-decoration:none}}</style></head>
<body><h1 id="title">{title}</h1><p id="message">{message}</p><p id="advice">{advice}</p>{switch}{link}
<p class="code">Error {status} · {code}{request_id}</p></body></html>
"""


# Set by the pages' form handlers (SPEC §15): a browser posting a form gets its refusal as a page too.
FORM_POST = web.RequestKey("form_post", bool)


def wants_html(request: web.BaseRequest) -> bool:
    """Browsers navigating (GET/HEAD accepting HTML) get pages and redirects; API clients get JSON."""
    return request.method in ("GET", "HEAD") and "text/html" in request.headers.get("Accept", "")


def render(request: web.BaseRequest, err: GatewayError, *, request_id: str = "", json_only: bool = False
           ) -> web.Response:
    status, headers, body = error_answer(
        err, request_id=request_id, json_only=json_only, accept=request.headers.get("Accept", ""),
        navigating=request.method in ("GET", "HEAD"), form_post=request.get(FORM_POST, False))
    return web.Response(status=status, body=body, headers=headers)


def error_answer(err: GatewayError, *, request_id: str, accept: str, navigating: bool, json_only: bool = False,
                 form_post: bool = False) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of the page or JSON that answers `err`: shared by aiohttp's handlers (render)
    and the proxied path's own server (fast_lane.py), which has no aiohttp request."""
    headers = dict(NO_STORE)
    if err.status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="gateway"'
    if err.retry_after is not None:
        headers["Retry-After"] = str(err.retry_after)
    html_accepted = "text/html" in accept
    if json_only or err.json_only or not ((navigating and html_accepted) or (form_post and html_accepted)):
        body = {"error": err.code, "message": err.message, **(err.details or {})}
        headers["Content-Type"] = "application/json; charset=utf-8"
        return err.status, headers, json.dumps(body).encode()
    link = ""
    if err.retry_url:
        link = (f'<p><a class="button" id="retry" href="{html.escape(err.retry_url)}">'
                f'{html.escape(err.retry_label)}</a></p>')
    switch = ""
    if err.switch_account_url:
        # GitLab signs the user straight back in as the same account: the way out is to sign out there first.
        switch = (f'<p id="switch-account">To use another GitLab account, <a id="gitlab-sign-out" href="'
                  f'{html.escape(err.switch_account_url)}">open GitLab</a>, sign out there, then choose '
                  f'{html.escape(err.retry_label)}.</p>')
    page = _PAGE.format(
        title=html.escape(err.title), message=html.escape(err.message), advice=html.escape(err.advice),
        switch=switch, link=link, status=err.status, code=html.escape(err.code),
        request_id=f" · request {html.escape(request_id)}" if request_id else "",
    )
    headers["Content-Type"] = "text/html; charset=utf-8"
    return err.status, headers, page.encode()


def redirect(location: str) -> web.Response:
    """A 302 whose Location is exactly `location`: no re-encoding (what was validated is what is sent)."""
    return web.Response(status=302, headers={"Location": location, **NO_STORE})


_CONFIRM_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<title>Sign out?</title>
<style>body{{font:16px/1.5 system-ui,sans-serif;max-width:40rem;margin:4rem auto;padding:0 1rem;color:#222}}
h1{{font-size:1.4rem}} button{{padding:.5rem 1rem;background:#554488;color:#fff;border:0;border-radius:4px;
font:inherit;cursor:pointer}}</style></head>
<body><h1 id="title">Sign out?</h1><p id="message">A link on another site sent you here to sign you out.</p>
<p id="advice">If you want to sign out, press the button; otherwise close this page.</p>
<form method="post" action="{action}"><button id="sign-out" type="submit">Sign out</button></form></body></html>
"""


def sign_out_page(action: str) -> web.Response:
    """The page a cross-site sign-out link lands on: a button that POSTs the sign-out to `action`."""
    return web.Response(status=200, text=_CONFIRM_PAGE.format(action=html.escape(action)), content_type="text/html",
                        headers=NO_STORE)
