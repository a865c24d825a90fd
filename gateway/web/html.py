"""Server-rendered pages (SPEC §15): Jinja2 templates under gateway/templates, autoescaped, no build step.

Every value that came from GitLab or an administrator reaches HTML only through a template with autoescape on
(a group named `<script>` renders as text); pages are never cached and never framed.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import aiohttp_jinja2
import jinja2
from aiohttp import web

from gateway.web.pages import NO_STORE

# The pages use no script, no external resource and post forms only to themselves.
PAGE_HEADERS = {
    **NO_STORE,
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; "
                               "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "X-Content-Type-Options": "nosniff",
}


def when(at: datetime | None) -> str:
    """A time as people read it in a table: 2026-01-31 12:00 UTC, or a dash."""
    return at.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC") if at is not None else "–"


def setup(app: web.Application) -> None:
    """Templates for this app, autoescaped whatever the file name."""
    env = aiohttp_jinja2.setup(app, loader=jinja2.PackageLoader("gateway", "templates"), autoescape=True,
                               undefined=jinja2.StrictUndefined)
    env.globals["when"] = when


def render(request: web.Request, template: str, context: dict[str, Any], *, status: int = 200,
           csrf: Callable[[], str] | None = None) -> web.Response:
    """A page; `csrf` makes a fresh single-use form token for each form that asks for one."""
    context.setdefault("notice", None)
    context.setdefault("problem", None)
    context["csrf"] = csrf or (lambda: "")
    response = aiohttp_jinja2.render_template(template, request, context, status=status)
    response.headers.update(PAGE_HEADERS)
    return response
