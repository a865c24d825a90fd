"""server.event_loop (gateway/loops.py): auto takes uvloop when installed; a wrong or unusable value names the key."""

from __future__ import annotations

import asyncio

import pytest
from test_config import config, problems

from gateway import loops


def test_default_is_auto_and_values_are_checked() -> None:
    assert config().server.event_loop == "auto"
    assert config(server={"event_loop": "UVLOOP"}).server.event_loop == "uvloop"
    assert problems(server={"event_loop": "trio"}) == ["server.event_loop: must be one of auto, asyncio, uvloop"]


def test_uvloop_refused_by_name_when_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loops, "uvloop_available", lambda: False)
    [problem] = problems(server={"event_loop": "uvloop"})
    assert problem.startswith("server.event_loop: uvloop is not installed")
    assert config(server={"event_loop": "auto"}).server.event_loop == "auto"
    assert loops.loop_factory("auto") is None  # auto falls back on asyncio's loop


@pytest.mark.parametrize(("choice", "module"), [("auto", "uvloop"), ("uvloop", "uvloop"),
                                                ("asyncio", "asyncio.unix_events")])
def test_run_uses_the_chosen_loop(choice: str, module: str) -> None:
    async def which() -> str:
        return type(asyncio.get_running_loop()).__module__

    assert loops.run(which(), choice) == module
