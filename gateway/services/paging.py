"""Lists are pages: `{"items": [...], "next": <cursor or null>}`, read with `?cursor=&limit=`.

A cursor is opaque to clients: URL-safe base64 of a small JSON array naming the list it belongs to and the
sort key of the last item returned. Pages are keyset pages (never OFFSET), so rows inserted or deleted between
two calls neither shift nor repeat the rest of the listing.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from gateway.errors import BadRequest

T = TypeVar("T")

DEFAULT_LIMIT = 50
MAX_LIMIT = 500


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    items: tuple[T, ...]
    next: str | None


def encode(kind: str, *key: Any) -> str:
    raw = json.dumps([kind, *key], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def invalid_cursor() -> BadRequest:
    return BadRequest("The cursor is not valid for this list: pass the `next` value of the previous page as is")


def _fits(value: Any, t: type) -> bool:
    if t is int:  # a PostgreSQL bigint, and not a JSON true/false
        return isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63
    return isinstance(value, t)


def decode(kind: str, cursor: str | None, *types: type) -> list[Any] | None:
    """The key inside a cursor made by `encode(kind, ...)`, checked against `types` (default: one int);
    None for no cursor; BadRequest when it is not such a cursor."""
    if cursor is None or cursor == "":
        return None
    types = types or (int,)
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        data = json.loads(raw)
    except (binascii.Error, ValueError):
        data = None
    if (not isinstance(data, list) or len(data) != len(types) + 1 or data[0] != kind
            or not all(_fits(v, t) for v, t in zip(data[1:], types, strict=True))):
        raise invalid_cursor()
    return data[1:]


def check_limit(limit: int | None) -> int:
    """The page size: DEFAULT_LIMIT when not given, else 1..MAX_LIMIT."""
    if limit is None:
        return DEFAULT_LIMIT
    if not 1 <= limit <= MAX_LIMIT:
        raise BadRequest(f"limit must be between 1 and {MAX_LIMIT}")
    return limit


def page(rows: Sequence[T], limit: int, cursor_of: Callable[[T], str]) -> Page[T]:
    """Rows fetched with LIMIT limit+1 -> a page of `limit` items and the cursor of the next one, if any."""
    if len(rows) > limit:
        return Page(tuple(rows[:limit]), cursor_of(rows[limit - 1]))
    return Page(tuple(rows), None)
