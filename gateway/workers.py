"""`server.workers` > 1: N processes share the public port (SO_REUSEPORT), supervised by the main process.

The main process (server.serve) has already resolved the database and applied migrations; it then

- starts N workers (multiprocessing, spawn: a fresh interpreter each, nothing inherited but the config and
  the DSN). Each runs the public app on `server.listen` with reuse_port, so the kernel spreads connections
  over them, and has its own caches, pool and LISTEN connection (a NOTIFY reaches every worker);
- runs the admin listener itself. /readyz reports the public listener as serving only while every worker
  serves; /metrics adds up the snapshots the workers send over their pipe every second and when they exit
  (counters never go backwards: a worker that died keeps its last numbers);
- restarts a worker that dies (after a pause that grows while it keeps dying); a worker that cannot even
  listen (port taken) stops the whole gateway with that reason;
- on SIGTERM/SIGINT, sends SIGTERM to every worker: each stops accepting, finishes its in-flight requests (up
  to server.shutdown_grace) and exits; then the main process closes the admin listener and returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from aiohttp import web

from gateway.app import Readiness, create_admin_app, create_public_app
from gateway.config import Config
from gateway.errors import GatewayError
from gateway.metrics import Metrics

log = logging.getLogger("gateway.workers")

SNAPSHOT_INTERVAL = 1.0
RESTART_DELAY = 1.0
MAX_RESTART_DELAY = 30.0
# A worker alive this long is considered healthy again: its next crash restarts it after RESTART_DELAY.
STABLE_AFTER = 30.0


# ---- the worker process ---------------------------------------------------------------------------------

def worker_main(cfg: Config, dsn: str, index: int, conn: Connection) -> None:
    """Entry point of a worker process (spawned: must be importable and take picklable arguments)."""
    from gateway import logs, loops

    logs.setup(cfg.log.level, cfg.log.format)
    code = 0
    try:
        code = loops.run(_worker(cfg, dsn, index, conn), cfg.server.event_loop)
    except KeyboardInterrupt:
        pass
    finally:
        conn.close()
    raise SystemExit(code)


async def _worker(cfg: Config, dsn: str, index: int, conn: Connection) -> int:
    from gateway.server import public_runner, settle_heap, start_site, stop_site

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    parent = os.getppid()
    metrics = Metrics()
    runner = public_runner(create_public_app(cfg, dsn, metrics=metrics), cfg)
    site = None

    def send(message: tuple[Any, ...]) -> bool:
        try:
            conn.send(message)
            return True
        except (OSError, ValueError):  # the main process is gone (broken pipe) or the pipe is closed
            return False

    try:
        await runner.setup()
        settle_heap()
        site = await start_site(runner, cfg.server.listen, cfg, what="server.listen", reuse_port=True,
                                fast_lane=True)
    except GatewayError as err:
        send(("failed", err.message))
        await runner.cleanup()
        return 1
    send(("serving", os.getpid()))
    try:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), SNAPSHOT_INTERVAL)
            if os.getppid() != parent or not send(("metrics", metrics.snapshot())):
                log.warning("main process gone: worker stopping", extra={"worker": index})
                break
    finally:
        await stop_site(runner, site)  # stops accepting, then waits for in-flight requests (shutdown_grace)
        send(("metrics", metrics.snapshot()))
    return 0


# ---- the main process -------------------------------------------------------------------------------------

@dataclass
class _Worker:
    index: int
    process: BaseProcess
    conn: Connection
    started: float = field(default_factory=time.monotonic)
    serving: bool = False
    pid: int | None = None
    snapshot: dict[str, object] | None = None


class Supervisor:
    """Starts, watches and stops the worker processes; merges their metrics; keeps readiness honest."""

    def __init__(self, cfg: Config, dsn: str, count: int, readiness: Readiness, own_metrics: Metrics) -> None:
        self.cfg = cfg
        self.dsn = dsn
        self.count = count
        self.readiness = readiness
        self.own_metrics = own_metrics
        self.retired = Metrics()  # the last numbers of workers that exited
        self.workers: dict[int, _Worker] = {}
        self.stopping = False
        self.failure: str | None = None
        self.failed = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._context = multiprocessing.get_context("spawn")
        self._delays: dict[int, float] = {}
        self._ever_served: set[int] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._none_left = asyncio.Event()

    # -- lifecycle --

    def start_all(self) -> None:
        for index in range(self.count):
            self._start(index)

    def _start(self, index: int) -> None:
        parent_end, child_end = self._context.Pipe(duplex=False)
        process = self._context.Process(target=worker_main, args=(self.cfg, self.dsn, index, child_end),
                                        name=f"gateway-worker-{index}", daemon=False)
        process.start()
        child_end.close()  # only the child writes; our copy would keep the pipe open after it dies
        worker = _Worker(index, process, parent_end)
        self.workers[index] = worker
        threading.Thread(target=self._read, args=(worker,), name=f"gateway-worker-{index}-pipe",
                         daemon=True).start()
        self._update_readiness()

    def _read(self, worker: _Worker) -> None:
        """Runs in a thread per worker: blocking reads of its pipe, handed over to the event loop."""
        with contextlib.suppress(RuntimeError):  # the loop is closed: the main process is exiting anyway
            while True:
                try:
                    message = worker.conn.recv()
                except (EOFError, OSError):
                    break
                self._loop.call_soon_threadsafe(self._on_message, worker, message)
            self._loop.call_soon_threadsafe(self._on_exit, worker)

    def _on_message(self, worker: _Worker, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "serving":
            worker.serving, worker.pid = True, int(message[1])
            self._ever_served.add(worker.index)
            log.info("worker serving", extra={"worker": worker.index, "pid": worker.pid})
        elif kind == "metrics":
            worker.snapshot = message[1]
        elif kind == "failed":
            log.error("worker could not start", extra={"worker": worker.index, "reason": message[1]})
            if worker.index not in self._ever_served:
                # At start-up this is a configuration problem (port taken...): say so and stop. Later (the
                # database briefly away during a restart) it is one more crash to retry.
                self.failure = str(message[1])
                self.failed.set()
        self._update_readiness()

    def _on_exit(self, worker: _Worker) -> None:
        worker.serving = False
        self._update_readiness()
        task = asyncio.ensure_future(self._reap(worker))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reap(self, worker: _Worker) -> None:
        await asyncio.to_thread(worker.process.join, 10)  # its pipe closed: it is exiting
        worker.conn.close()
        if worker.snapshot is not None:
            self.retired.merge_snapshot(worker.snapshot)
            worker.snapshot = None
        if self.workers.get(worker.index) is worker:
            del self.workers[worker.index]
        if not self.workers:
            self._none_left.set()
        self._update_readiness()
        if self.stopping or self.failed.is_set():
            return
        lived = time.monotonic() - worker.started
        delay = RESTART_DELAY if lived > STABLE_AFTER else min(
            self._delays.get(worker.index, RESTART_DELAY / 2) * 2, MAX_RESTART_DELAY)
        self._delays[worker.index] = delay
        log.error("worker died; restarting it", extra={"worker": worker.index, "exitcode": worker.process.exitcode,
                                                      "restart_in_s": delay})
        await asyncio.sleep(delay)
        if not self.stopping and not self.failed.is_set() and worker.index not in self.workers:
            self._start(worker.index)

    def _update_readiness(self) -> None:
        self.readiness.public_serving = (
            not self.stopping and len(self.workers) == self.count and all(w.serving for w in self.workers.values()))

    async def stop_all(self, grace: float) -> None:
        """SIGTERM every worker, wait for them to finish their requests, kill what is left after `grace`."""
        self.stopping = True
        self._update_readiness()
        for worker in self.workers.values():
            if worker.process.is_alive():
                worker.process.terminate()
        if await self._all_gone(grace):
            return
        for worker in list(self.workers.values()):
            if worker.process.is_alive():
                log.error("worker did not stop in time; killing it", extra={"worker": worker.index})
                worker.process.kill()
        await self._all_gone(5)

    async def _all_gone(self, within: float) -> bool:
        self._none_left.clear()
        if not self.workers:
            return True
        try:
            await asyncio.wait_for(self._none_left.wait(), within)
        except TimeoutError:
            return False
        return True

    # -- metrics --

    def merged_metrics(self) -> Metrics:
        """This process's metrics plus every worker's latest snapshot (and the last ones of dead workers)."""
        merged = Metrics()
        merged.merge_snapshot(self.own_metrics.snapshot())
        merged.merge_snapshot(self.retired.snapshot())
        for worker in self.workers.values():
            if worker.snapshot is not None:
                merged.merge_snapshot(worker.snapshot)
        merged.sessions_active = self.own_metrics.sessions_active
        return merged


async def serve_workers(cfg: Config, dsn: str, count: int, stop: asyncio.Event) -> None:
    """Run `count` public workers and the admin listener until `stop` is set."""
    from gateway.server import STOP_MARGIN, start_site

    readiness, metrics = Readiness(), Metrics()
    supervisor = Supervisor(cfg, dsn, count, readiness, metrics)
    admin = web.AppRunner(create_admin_app(cfg, dsn, readiness=readiness, metrics=metrics,
                                           metrics_source=supervisor.merged_metrics),
                          access_log=None, handle_signals=False)
    await admin.setup()
    site = None
    try:
        site = await start_site(admin, cfg.admin.listen, cfg, what="admin.listen")
        supervisor.start_all()
        log.info("serving", extra={"public": str(cfg.server.listen), "admin": str(cfg.admin.listen),
                                   "workers": count, "public_url": cfg.server.public_url,
                                   "upstream": cfg.upstream.url})
        stopped = asyncio.ensure_future(stop.wait())
        failed = asyncio.ensure_future(supervisor.failed.wait())
        await asyncio.wait({stopped, failed}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        failed.cancel()
        log.info("shutting down: workers finish their in-flight requests")
    finally:
        await supervisor.stop_all(cfg.server.shutdown_grace + STOP_MARGIN)
        if site is not None:
            site.close()
        await admin.cleanup()
    if supervisor.failure is not None:
        raise GatewayError(supervisor.failure)
