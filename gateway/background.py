"""Work a request starts but need not wait for (a courtesy call to GitLab after sign-in), tracked per app.

A task here never delays the answer; its failure is logged (the coroutine should log its own cause; anything
it lets escape is logged here); at shutdown the app waits for the tasks up to a bound, then cancels the rest,
so none is left pending when the event loop closes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

log = logging.getLogger("gateway.background")

T = TypeVar("T")

# How long shutdown waits for background tasks (each is bounded by its own timeout, e.g. gitlab.timeout).
CLOSE_WAIT = 5.0


class Background:
    """The app's background tasks; created and closed in a cleanup_ctx."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, T], *, name: str) -> asyncio.Task[T]:
        """Start `coro`; the task is returned for a caller that wants to wait a little for its result."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.warning("background task failed", extra={"task": task.get_name(), "error": repr(exc)[:200]})

    @property
    def pending(self) -> int:
        return len(self._tasks)

    async def close(self, within: float = CLOSE_WAIT) -> None:
        """Let running tasks finish for `within` seconds, then cancel what is left."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=within)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks))
