"""Automatic provisioning on a schedule (SPEC §12), in the admin listener's process of every replica.

Each replica wakes when the newest recorded run (any replica's) is `interval` old and tries the run lock;
the replica that gets it re-checks that the run is still due and runs; the others log that another replica
is running it and skip. A failed run is retried after min(interval, RETRY_AFTER_FAILURE). Runs started by
`POST /api/v1/sync` or `gateway sync` use the same lock and count as runs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import aiohttp
import asyncpg
from aiohttp import web

from gateway import keys
from gateway.config import Config
from gateway.db import DB_UNAVAILABLE
from gateway.db import automatic as db_auto
from gateway.errors import GatewayError
from gateway.metrics import Metrics
from gateway.sync import automatic

log = logging.getLogger("gateway.automatic")

RETRY_AFTER_FAILURE = 300.0
SKIPPED_PAUSE = 60.0  # after "another replica is running it": look again this much later


async def automatic_ctx(app: web.Application) -> AsyncIterator[None]:
    """When provisioning.automatic is set, the scheduler task (over the admin app's GitLab session)."""
    cfg = app[keys.CONFIG]
    if cfg.provisioning.automatic is None:
        yield
        return
    task = asyncio.create_task(scheduler(app[keys.POOL], cfg, app[keys.GITLAB].session, app[keys.METRICS]))
    yield
    task.cancel()  # a run in progress rolls back: its transaction never commits half
    await asyncio.gather(task, return_exceptions=True)


async def due_in(pool: asyncpg.Pool, interval: float) -> float:
    """Seconds until the next run is due (0 or less: now), from the newest recorded run."""
    last = await db_auto.last_run(pool)
    if last is None:
        return 0.0
    wait = interval if last.ok else min(interval, RETRY_AFTER_FAILURE)
    return last.finished_epoch + wait - time.time()


async def scheduler(pool: asyncpg.Pool, cfg: Config, session: aiohttp.ClientSession, metrics: Metrics) -> None:
    """Run forever: one run per interval across all replicas."""
    auto = cfg.provisioning.automatic
    assert auto is not None
    while True:
        try:
            wait = await due_in(pool, auto.interval)
            if wait > 0:
                await asyncio.sleep(min(wait, auto.interval))
                continue
            result = await automatic.run(pool, cfg, session, only_if_due=auto.interval,
                                         on_request=metrics.gitlab_request)
            if result.skipped:
                log.info("automatic provisioning: another replica has just run it; skipping")
        except automatic.RunInProgress:
            log.info("automatic provisioning: another replica is running it; skipping")
            await asyncio.sleep(min(auto.interval, SKIPPED_PAUSE))
        except GatewayError:
            # Logged by the run with its reason (a GitLab failure is recorded, so due_in() schedules the retry).
            await asyncio.sleep(min(auto.interval, SKIPPED_PAUSE))
        except DB_UNAVAILABLE as exc:
            log.warning("automatic provisioning: database unavailable", extra={"error": type(exc).__name__})
            await asyncio.sleep(min(auto.interval, SKIPPED_PAUSE))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("automatic provisioning: unexpected failure")
            await asyncio.sleep(min(auto.interval, RETRY_AFTER_FAILURE))


async def last_run_metrics(conn: asyncpg.Connection, metrics: Metrics) -> None:
    """Fill the gateway_autoprov_last_run_* gauges from the newest recorded run."""
    last = await db_auto.last_run(conn)
    if last is None:
        return
    metrics.autoprov = {
        "gateway_autoprov_last_run_timestamp_seconds": last.finished_epoch,
        "gateway_autoprov_last_run_success": 1.0 if last.ok else 0.0,
        "gateway_autoprov_last_run_duration_seconds": last.duration,
        "gateway_autoprov_last_run_gitlab_calls": float(last.gitlab_calls),
    }
    metrics.autoprov_changes = {k: int(v) for k, v in last.counts.items()}
