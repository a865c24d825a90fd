"""SPEC §9/§16 logs: text lines cannot be forged with control characters, and aiohttp's own bad-request lines
carry no fragment of the request's cookies or tokens."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from yarl import URL

from gateway import logs


@contextlib.contextmanager
def log_capture(fmt: str) -> Iterator[io.StringIO]:
    """Every log record (pytest keeps the root logger at DEBUG) formatted by our `fmt` formatter, into a buffer."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(logs.JsonFormatter() if fmt == "json" else logs.TextFormatter())
    logging.getLogger().addHandler(handler)
    try:
        yield buffer
    finally:
        logging.getLogger().removeHandler(handler)


async def test_text_log_lines_cannot_be_forged_from_a_path(gateway_factory: Any) -> None:
    gw = await gateway_factory()
    with log_capture("text") as buffer:
        async with gw.browser() as b:
            await b.http.get(URL(f"{gw.public_url}/x%0d%0a12:00:00 INFO    gateway.login: signed in user=root"
                                 .replace(" ", "%20"), encoded=True), allow_redirects=False)
    lines = buffer.getvalue().splitlines()
    access = [line for line in lines if "gateway.access" in line and "/x" in line]
    assert len(access) == 1 and "/x\\r\\n12:00:00" in access[0], lines
    assert not any(line.startswith("12:00:00") for line in lines), lines


def test_text_formatter_escapes_controls_in_messages_fields_and_tracebacks() -> None:
    try:
        raise ValueError("bad\nFORGED line")
    except ValueError:
        record = logging.makeLogRecord({
            "name": "t", "levelno": logging.ERROR, "levelname": "ERROR", "msg": "a\rb\u2028c",
            "user": "mallory\n00:00:00 INFO x", "exc_info": __import__("sys").exc_info()})
    text = logs.TextFormatter().format(record)
    assert "a\\rb\\u2028c" in text and "user=mallory\\n00:00:00" in text
    assert all(line.startswith("  | ") for line in text.splitlines()[1:]), text
    assert "FORGED" in text and "\nFORGED" not in text


@pytest.mark.parametrize("fmt", ["json", "text"])
async def test_aiohttp_bad_request_lines_carry_no_cookie_fragment(gateway_factory: Any, fmt: str) -> None:
    gw = await gateway_factory()
    port = int(gw.public_url.rsplit(":", 1)[1])
    secret = "SECRETCOOKIEFRAGMENT"
    with log_capture(fmt) as buffer:
        for header in (f"Cookie: _gateway={secret * 500}", f"Authorization: Bearer {secret}\x01"):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(f"GET / HTTP/1.1\r\nHost: x\r\n{header}\r\n\r\n".encode())
            await writer.drain()
            status = (await reader.readline()).decode()
            writer.close()
            assert " 400 " in status, status
    out = buffer.getvalue()
    assert "Error handling request" in out, out
    assert secret not in out, out
    if fmt == "json":
        events = [json.loads(line) for line in out.splitlines()]
        assert any("BadHttpMessage" in e.get("exception", "") or "LineTooLong" in e.get("exception", "")
                   for e in events), out
