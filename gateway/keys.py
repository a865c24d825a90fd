"""Every typed application and request key, in one place (aiohttp >= 3.14 AppKey / RequestKey)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import aiohttp
import asyncpg
from aiohttp import web

if TYPE_CHECKING:
    from gateway.access.headers import HeaderPolicy
    from gateway.access.ratelimit import RateLimiter
    from gateway.background import Background
    from gateway.config import Config
    from gateway.identity import Anonymous, Identity
    from gateway.metrics import Metrics
    from gateway.sessions.store import SessionStore
    from gateway.sync.gitlab import GitLabClient
    from gateway.web.access import Access

CONFIG: web.AppKey[Config] = web.AppKey("config")
DSN = web.AppKey("dsn", str)
POOL = web.AppKey("pool", asyncpg.Pool)
GITLAB: web.AppKey[GitLabClient] = web.AppKey("gitlab")
SESSIONS: web.AppKey[SessionStore] = web.AppKey("sessions")
UPSTREAM_HTTP = web.AppKey("upstream_http", aiohttp.ClientSession)
HEADER_POLICY: web.AppKey[HeaderPolicy] = web.AppKey("header_policy")
METRICS: web.AppKey[Metrics] = web.AppKey("metrics")
BACKGROUND: web.AppKey[Background] = web.AppKey("background")
ACCESS: web.AppKey[Access] = web.AppKey("access")  # SPEC §13: policy, upstream routing, signer
SIGNIN_LIMITER: web.AppKey[RateLimiter] = web.AppKey("signin_limiter")

REQUEST_ID = web.RequestKey("request_id", str)
# How a request really ended when its status says otherwise (a streamed response cut: "truncated").
OUTCOME = web.RequestKey("outcome", str)
IDENTITY: web.RequestKey[Identity | Anonymous] = web.RequestKey("identity")
