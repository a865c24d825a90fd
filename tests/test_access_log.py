"""The access log's own writer (logs.AccessLog): the same JSON object as the logging path, escaped and masked."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import logs

text = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=40)
maybe_text = st.none() | text


@contextmanager
def configured(*, second_handler: bool = False) -> Iterator[io.StringIO]:
    """logs.setup into a buffer; with a second root handler, the access log must fall back on logging."""
    buffer = io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:], root.level, {name: logging.getLogger(name).level for name in logs.QUIET}
    handler = logs.setup("info", "json", stream=buffer)
    if second_handler:
        root.addHandler(logging.NullHandler())
    try:
        yield buffer
    finally:
        logs.ACCESS.flush()
        logs.ACCESS.install(None)
        root.handlers[:], root.level = saved[0], saved[1]
        for name, old in saved[2].items():
            logging.getLogger(name).setLevel(old)
        handler.close()


def one_line(*, second_handler: bool, **fields: object) -> dict[str, object]:
    with configured(second_handler=second_handler) as buffer:
        logs.ACCESS.write(**fields)  # type: ignore[arg-type]
    out = buffer.getvalue()
    assert out.endswith("\n") and out.count("\n") == 1, out  # one line, whatever the values hold
    event: dict[str, object] = json.loads(out)
    return event


@settings(max_examples=200, deadline=None)
@given(request_id=text, method=text, path=text, remote=maybe_text, user=maybe_text, outcome=text,
       status=st.integers(100, 599), elapsed=st.floats(0, 1000, allow_nan=False))
def test_the_fast_line_is_the_logging_line(request_id: str, method: str, path: str, remote: str | None,
                                           user: str | None, outcome: str, status: int, elapsed: float) -> None:
    """Property: for any values (quotes, backslashes, control characters, non-ASCII, credential shapes), the
    line written without logging parses to the object the logging path writes, every string masked by scrub."""
    fields = {"request_id": request_id, "method": method, "path": path, "status": status, "elapsed": elapsed,
              "remote": remote, "user": user, "outcome": outcome}
    fast = one_line(second_handler=False, **fields)
    slow = one_line(second_handler=True, **fields)
    assert fast.pop("time") and slow.pop("time")
    assert fast == slow
    assert fast["path"] == logs.scrub(path) and fast["user"] == (None if user is None else logs.scrub(user))
    assert fast["logger"] == "gateway.access" and fast["event"] == "request" and fast["status"] == status


def test_credentials_are_masked_and_secret_named_fields_redacted() -> None:
    event = one_line(second_handler=False, request_id="Bearer abcdefghijklmnopqrstuvwxyz", method="GET",
                     path="/cb?code=s3cr3tc0de&state=xyz", status=200, elapsed=0.001, remote="10.0.0.1",
                     user='al"ice\n', token="glpat-0123456789")
    line = json.dumps(event)
    assert "abcdefghijklmnop" not in line and "s3cr3tc0de" not in line and "glpat-0123456789" not in line
    assert event["token"] == logs.REDACTED and event["user"] == 'al"ice\n'


async def test_lines_of_one_loop_turn_keep_their_order_with_other_lines() -> None:
    """Access lines are written once per loop turn; a line logged meanwhile through logging comes after them."""
    with configured() as buffer:
        for n in range(3):
            logs.ACCESS.write(f"r{n}", "GET", f"/{n}", 200, 0.0, None, None)
        assert buffer.getvalue() == ""  # still waiting for the end of this turn
        logging.getLogger("gateway.test").warning("after")
        logs.ACCESS.write("r3", "GET", "/3", 200, 0.0, None, None)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        events = [json.loads(line) for line in buffer.getvalue().splitlines()]
    assert [e.get("path", e["event"]) for e in events] == ["/0", "/1", "/2", "after", "/3"]


def test_below_info_nothing_is_written() -> None:
    with configured() as buffer:
        logging.getLogger().setLevel(logging.WARNING)
        logs.ACCESS.write("r", "GET", "/", 200, 0.0, None, None)
    assert buffer.getvalue() == ""
