"""Wiring only: the public app and the admin app, their long-lived resources (cleanup_ctx) and middlewares."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import asyncpg
from aiohttp import web

from gateway import keys, logs
from gateway.access.headers import HeaderPolicy
from gateway.access.ratelimit import RateLimiter
from gateway.background import Background
from gateway.config import Config, ConfigError
from gateway.db import DB_UNAVAILABLE
from gateway.db import grants as db_grants
from gateway.db import groups as db_groups
from gateway.db import migrate as db_migrate
from gateway.db import sessions as db_sessions
from gateway.db.server import close_pool, create_pool
from gateway.errors import GatewayError, Unauthenticated
from gateway.metrics import Metrics
from gateway.sessions.store import SessionStore, running_listener
from gateway.sessions.tokens import TokenStore, flushing
from gateway.sync import schedule as autoprov_schedule
from gateway.sync.gitlab import GitLabClient
from gateway.sync.resync import RUN_SCHEDULER, resync_ctx
from gateway.web import access, auth_request, html, login, me, webhook
from gateway.web import tokens as web_tokens
from gateway.web.forms import FORMS, FormTokens
from gateway.web.pages import NO_STORE, render

log = logging.getLogger("gateway.app")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Readiness:
    """Shared by the public and admin apps of a process: what /readyz reports."""

    public_serving: bool = False
    migrations_current: bool = False


READINESS = web.AppKey("readiness", Readiness)
# Only the public listener's requests are gateway_requests_total: admin calls and /metrics scrapes are not traffic.
COUNT_REQUESTS = web.AppKey("count_requests", bool)
# The admin listener answers errors as JSON whatever the client accepts: its clients are programs.
JSON_ERRORS = web.AppKey("json_errors", bool)


# ---- middlewares ---------------------------------------------------------------------------------------

def _json_errors(request: web.Request) -> bool:
    # The admin listener's pages (/admin/) are for people: their errors are pages like the public ones.
    return request.app.get(JSON_ERRORS, False) and not request.path.startswith("/admin/")


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request id, domain errors -> pages/JSON, unexpected errors -> a 500 page without a traceback."""
    request_id = logs.request_id(request.headers.get("X-Request-Id"))
    request[keys.REQUEST_ID] = request_id
    log_context = logs.REQUEST_ID.set(request_id)
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        if status >= 400 and _json_errors(request):
            # aiohttp's own 404/405/413 are plain text: the admin API answers every error in its JSON shape.
            err = GatewayError(exc.reason, code=exc.reason.lower().replace(" ", "_"), advice="")
            err.status = status
            return render(request, err, request_id=request_id, json_only=True)
        raise
    except GatewayError as err:
        status = err.status
        if status >= 500:
            # The one line that says why (a database, GitLab or the upstream failing); the page never shows it.
            log.warning("request failed", extra={"request_id": request_id, "path": request.rel_url.path,
                                                 "status": status, "error": err.code, "cause": err.cause})
        return render(request, err, request_id=request_id, json_only=_json_errors(request))
    except Exception:
        log.exception("unhandled error", extra={"request_id": request_id})
        return render(request, GatewayError("The gateway failed to handle this request"), request_id=request_id)
    finally:
        elapsed = time.perf_counter() - started
        if request.app.get(COUNT_REQUESTS):
            request.app[keys.METRICS].request(status, elapsed)
        identity = request.get(keys.IDENTITY)
        # `outcome` only when the status tells less than the truth (a streamed response cut: "truncated").
        outcome = request.get(keys.OUTCOME)
        logs.ACCESS.write(request_id, request.method, request.rel_url.path, status, elapsed, request.remote,
                          getattr(identity, "login", None), **({"outcome": outcome} if outcome else {}))
        logs.REQUEST_ID.reset(log_context)


# ---- long-lived resources -------------------------------------------------------------------------------

async def database_ctx(app: web.Application) -> AsyncIterator[None]:
    cfg = app[keys.CONFIG]
    pool = await create_pool(app[keys.DSN], size=cfg.database.pool_size)
    app[keys.POOL] = pool
    taken = False
    async with pool.acquire() as conn:
        app[READINESS].migrations_current = not await db_migrate.pending(conn)
        if app[READINESS].migrations_current:
            try:
                await db_groups.rename_default(conn, cfg.provisioning.default_group)
            except asyncpg.UniqueViolationError:
                taken = True
    if taken:
        await close_pool(pool)
        name = cfg.provisioning.default_group
        raise ConfigError([
            f"provisioning.default_group: a group named {name!r} already exists and is not the default group; "
            "rename or delete it (gateway groups delete), or choose another name"])
    yield
    await close_pool(pool)


async def sessions_ctx(app: web.Application) -> AsyncIterator[None]:
    store = SessionStore(app[keys.CONFIG], app[keys.POOL])
    app[keys.SESSIONS] = store
    async with running_listener(store, app[keys.DSN]):
        yield


async def tokens_ctx(app: web.Application) -> AsyncIterator[None]:
    """SPEC §14: bearer tokens on the public listener, with their usage written in the background."""
    cfg = app[keys.CONFIG]
    if not cfg.tokens.enabled:
        yield
        return
    store = TokenStore(cfg, app[keys.POOL], app[keys.GITLAB])
    app[keys.SESSIONS].tokens = store
    async with flushing(store):
        yield


async def gitlab_ctx(app: web.Application) -> AsyncIterator[None]:
    cfg = app[keys.CONFIG]
    session = GitLabClient.make_session(cfg.gitlab)
    app[keys.GITLAB] = GitLabClient(cfg.gitlab, session, on_request=app[keys.METRICS].gitlab_request)
    yield
    await session.close()


async def background_ctx(app: web.Application) -> AsyncIterator[None]:
    # After gitlab_ctx: its tasks (token revocations) finish or are cancelled before GitLab's session closes.
    app[keys.BACKGROUND] = background = Background()
    yield
    await background.close()


def _base_app(cfg: Config, dsn: str, readiness: Readiness, metrics: Metrics) -> web.Application:
    app = web.Application(middlewares=[errors_middleware], client_max_size=1024**2)
    app[keys.CONFIG] = cfg
    app[keys.DSN] = dsn
    app[READINESS] = readiness
    app[keys.METRICS] = metrics
    return app


def create_public_app(cfg: Config, dsn: str, *, readiness: Readiness | None = None,
                      metrics: Metrics | None = None) -> web.Application:
    """The public listener: {prefix}/* handlers and the catch-all proxy."""
    from gateway.web import proxy  # the proxy pulls in the upstream client; keep import order one-way

    app = _base_app(cfg, dsn, readiness or Readiness(), metrics or Metrics())
    app[COUNT_REQUESTS] = True
    app[keys.HEADER_POLICY] = HeaderPolicy.from_config(cfg)
    app[keys.ACCESS] = access.Access.from_config(cfg, app[keys.HEADER_POLICY])
    app[access.SIGNER] = app[keys.ACCESS].signer
    app[keys.SIGNIN_LIMITER] = RateLimiter(cfg.server.signin_rate.count, cfg.server.signin_rate.period)
    app.cleanup_ctx.extend([database_ctx, sessions_ctx, gitlab_ctx, resync_ctx, tokens_ctx, background_ctx,
                            proxy.upstream_ctx])
    p = cfg.server.prefix
    if cfg.gitlab.webhook_secret:
        app.router.add_post(f"{p}/gitlab/webhook", webhook.receive)
    app.router.add_get(f"{p}/start", login.start)
    app.router.add_get(f"{p}/callback", login.callback)
    app.router.add_route("GET", f"{p}/sign_out", login.sign_out)
    app.router.add_route("POST", f"{p}/sign_out", login.sign_out)
    app.router.add_get(f"{p}/auth", auth_request.auth)
    app.router.add_get(f"{p}/userinfo", auth_request.userinfo)
    app.router.add_get(f"{p}/jwks.json", access.jwks)
    web_tokens.add_routes(app, p)
    html.setup(app)
    app[FORMS] = FormTokens(cfg.session.secrets)
    me.add_routes(app, p)
    from gateway.admin import pages as admin_pages

    admin_pages.add_routes(app, f"{p}/admin", admin_pages.public_viewer)
    app.router.add_route("*", "/{tail:.*}", proxy.handle)
    return app


# ---- admin listener -------------------------------------------------------------------------------------

async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"}, headers=NO_STORE)


# /readyz answers within 2 s whatever the database does (SPEC §16 review): its database check gets
# READY_DB_BUDGET, plus at most READY_ACQUIRE for handing back a connection whose query was cut (asyncpg waits
# that long for the server to confirm the cancellation, then drops the connection).
READY_DB_BUDGET = 1.0
READY_ACQUIRE = 0.4


async def readyz(request: web.Request) -> web.Response:
    readiness = request.app[READINESS]
    problems = []
    if not readiness.public_serving:
        problems.append("public listener not serving yet")
    try:
        # One budget for the whole check: a hung database makes /readyz say so in time for the probe,
        # instead of after the statement timeout.
        async with asyncio.timeout(READY_DB_BUDGET), request.app[keys.POOL].acquire(timeout=READY_ACQUIRE) as conn:
            if await db_migrate.pending(conn):
                problems.append("migrations pending (run: gateway migrate)")
    except DB_UNAVAILABLE:
        problems.append("database not answering")
    status = 503 if problems else 200
    return web.json_response({"status": "ready" if not problems else "not ready", "problems": problems},
                             status=status, headers=NO_STORE)


async def metrics_handler(request: web.Request) -> web.Response:
    # The source merges every worker's counters; the active-session gauge is one fact from the database.
    metrics = request.app[METRICS_SOURCE]()
    with contextlib.suppress(*DB_UNAVAILABLE):
        async with asyncio.timeout(READY_DB_BUDGET), request.app[keys.POOL].acquire(timeout=READY_ACQUIRE) as conn:
            metrics.sessions_active = await db_sessions.count_active(conn)
            metrics.resync_lag = await db_grants.lag(conn)
            if request.app[keys.CONFIG].provisioning.automatic is not None:
                await autoprov_schedule.last_run_metrics(conn, metrics)
    response = web.Response(text=metrics.render(), headers={"Cache-Control": "no-store"})
    response.headers["Content-Type"] = "text/plain; version=0.0.4; charset=utf-8"
    return response


METRICS_SOURCE: web.AppKey[Callable[[], Metrics]] = web.AppKey("metrics_source")


@web.middleware
async def bearer_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every /api/v1 call needs `Authorization: Bearer <admin token>`, compared in constant time."""
    if request.path.startswith("/api/"):
        header = request.headers.get("Authorization", "")
        scheme, _, presented = header.partition(" ")
        name = None
        if scheme.lower() == "bearer" and presented:
            for token in request.app[keys.CONFIG].admin.tokens:
                # compare every token (no early exit) so timing does not tell which one nearly matched
                if secrets.compare_digest(token.token.encode(), presented.strip().encode()):
                    name = token.name
        if name is None:
            raise Unauthenticated("A valid admin bearer token is required",
                                  advice="Send Authorization: Bearer <token>.")
        request[ADMIN_ACTOR] = name
    return await handler(request)


ADMIN_ACTOR = web.RequestKey("admin_actor", str)


def create_admin_app(cfg: Config, dsn: str, *, readiness: Readiness | None = None,
                     metrics: Metrics | None = None,
                     metrics_source: Callable[[], Metrics] | None = None) -> web.Application:
    """The admin listener: /healthz, /readyz, /metrics and the /api/v1 JSON API."""
    from gateway.admin import api as admin_api
    from gateway.admin import pages as admin_pages

    app = _base_app(cfg, dsn, readiness or Readiness(), metrics or Metrics())
    app.middlewares.append(bearer_middleware)
    app[JSON_ERRORS] = True
    app[METRICS_SOURCE] = metrics_source or (lambda: app[keys.METRICS])
    # The admin call `users/{login}/sync` re-checks through GitLab; the public app runs the scheduler loop.
    app[RUN_SCHEDULER] = False
    # background_ctx: a "run now" from the Provisioning page outlives its request when the run is long.
    app.cleanup_ctx.extend([database_ctx, gitlab_ctx, resync_ctx, background_ctx, autoprov_schedule.automatic_ctx])
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_handler)
    app[access.SIGNER] = access.make_signer(cfg)
    app.router.add_get("/jwks.json", access.jwks)
    admin_api.add_routes(app)
    html.setup(app)
    app[FORMS] = FormTokens(cfg.session.secrets)
    admin_pages.add_admin_listener_routes(app)
    return app
