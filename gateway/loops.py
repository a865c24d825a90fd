"""The event loop a gateway process runs on (`server.event_loop`): uvloop when available, else asyncio's own.

uvloop (libuv under asyncio's API) makes the socket reads and writes that most of a proxied request's time
goes to cheaper; nothing in the gateway depends on which loop runs it, so `auto` takes uvloop when it is
installed (it is a Linux dependency of the package) and asyncio otherwise.
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
CHOICES = ("auto", "asyncio", "uvloop")


def uvloop_available() -> bool:
    return importlib.util.find_spec("uvloop") is not None


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The factory for asyncio.Runner (None: asyncio's default loop)."""
    if choice == "asyncio" or (choice == "auto" and not uvloop_available()):
        return None
    import uvloop  # `server.event_loop: uvloop` without uvloop is refused when the configuration is read

    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T], choice: str) -> T:
    """asyncio.run(main) on the chosen loop."""
    with asyncio.Runner(loop_factory=loop_factory(choice)) as runner:
        return runner.run(main)
