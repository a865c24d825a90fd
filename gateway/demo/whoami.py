"""The demo's "tool": a tiny upstream that shows the identity headers the gateway sent it, and every other
request header, so `gateway demo` users can see exactly what an application behind the gateway receives.

Run it alone with `python -m gateway.demo.whoami --listen 127.0.0.1:8080`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import html
from collections.abc import Sequence

from aiohttp import web

from gateway.config import HeadersConfig

SIGN_OUT_URL = web.AppKey("sign_out_url", str)
IDENTITY_HEADERS = web.AppKey("identity_headers", HeadersConfig)

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<title>whoami · {user_title}</title>
<style>body{{font:16px/1.5 system-ui,sans-serif;max-width:52rem;margin:3rem auto;padding:0 1rem;color:#222}}
h1{{font-size:1.5rem}} h2{{font-size:1.1rem;margin-top:2rem}}
table{{border-collapse:collapse;width:100%}} th,td{{text-align:left;padding:.3rem .6rem;
border-bottom:1px solid #ddd;vertical-align:top}} th{{width:1%;white-space:nowrap;color:#555;font-weight:600}}
td{{font-family:ui-monospace,monospace;word-break:break-all}} .missing{{color:#a00;font-style:italic}}
.groups span{{display:inline-block;background:#eef;border-radius:3px;padding:0 .4rem;margin:0 .3rem .2rem 0}}
a.button{{display:inline-block;padding:.45rem 1rem;background:#554488;color:#fff;border-radius:4px;
text-decoration:none}} .note{{color:#666;font-size:.9rem}}</style></head>
<body><h1>whoami: you are <span id="whoami">{user}</span></h1>
<p class="note">This page is the application behind the gateway. It has no login of its own: it only reads
the identity headers the gateway adds to every request it forwards.</p>
<h2>Identity headers</h2>
<table id="identity">
{identity_rows}
</table>
<p><a class="button" id="sign-out" href="{sign_out}">Sign out</a></p>
<h2>All other request headers</h2>
<table id="headers">
{header_rows}
</table>
<p class="note">{method} {path}</p>
</body></html>
"""


def _row(label: str, value: str, *, row_id: str = "", cell: str | None = None) -> str:
    attr = f' id="{html.escape(row_id)}"' if row_id else ""
    shown = cell if cell is not None else html.escape(value)
    return f"<tr><th>{html.escape(label)}</th><td{attr}>{shown}</td></tr>"


async def whoami(request: web.Request) -> web.Response:
    """The page: identity headers first (ids user/email/preferred-username/groups), then the rest."""
    names = request.app[IDENTITY_HEADERS]
    identity = (
        ("user", names.user), ("email", names.email),
        ("preferred-username", names.preferred_username), ("groups", names.groups),
    )
    rows = []
    for row_id, header in identity:
        value = request.headers.get(header)
        if value is None:
            rows.append(_row(header, "", row_id=row_id, cell='<span class="missing">(not sent)</span>'))
        elif row_id == "groups":
            chips = "".join(f"<span>{html.escape(g)}</span>" for g in value.split(",") if g)
            rows.append(_row(header, value, row_id=row_id,
                             cell=f'<span class="groups" data-value="{html.escape(value)}">{chips}</span>'))
        else:
            rows.append(_row(header, value, row_id=row_id))
    shown = {h.lower() for _, h in identity}
    others = [_row(k, v) for k, v in request.headers.items() if k.lower() not in shown]
    user = request.headers.get(names.user, "")
    page = _PAGE.format(
        user_title=html.escape(user or "anonymous"),
        user=html.escape(user) if user else '<span class="missing">nobody (no identity headers)</span>',
        identity_rows="\n".join(rows), header_rows="\n".join(others) or _row("(none)", ""),
        sign_out=html.escape(request.app[SIGN_OUT_URL]), method=html.escape(request.method),
        path=html.escape(request.raw_path),
    )
    return web.Response(text=page, content_type="text/html", headers={"Cache-Control": "no-store"})


def create_app(*, sign_out_url: str = "/oauth2/sign_out", headers: HeadersConfig | None = None
               ) -> web.Application:
    """The whoami app; `sign_out_url` is where its Sign out button points."""
    app = web.Application()
    app[SIGN_OUT_URL] = sign_out_url
    app[IDENTITY_HEADERS] = headers or HeadersConfig()
    app.router.add_route("*", "/{tail:.*}", whoami)
    return app


async def serve(host: str, port: int, *, sign_out_url: str = "/oauth2/sign_out") -> web.AppRunner:
    """Start whoami on a real socket (port 0 = any; see runner.addresses); call runner.cleanup()."""
    runner = web.AppRunner(create_app(sign_out_url=sign_out_url), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


async def _run_forever(host: str, port: int) -> None:
    runner = await serve(host, port)
    print(f"whoami on http://{host}:{port}/")
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> None:
    """Serve whoami until interrupted."""
    parser = argparse.ArgumentParser(prog="python -m gateway.demo.whoami", description="shows the headers it gets")
    parser.add_argument("--listen", default="127.0.0.1:8080", help="HOST:PORT (default 127.0.0.1:8080)")
    args = parser.parse_args(argv)
    host, _, port = str(args.listen).rpartition(":")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_run_forever(host.strip("[]") or "127.0.0.1", int(port)))


if __name__ == "__main__":
    main()
