"""Tests written for mutants of scripts/mutate that survived the rest of the suite.

Secrets compared with `==`, which no behaviour test can see: a `==` on a secret returns as soon as a byte
differs, so its timing tells an attacker how much of a guess was right. Every comparison of a presented secret
(admin token, sign-in state, nonce) must go through `secrets.compare_digest` / `hmac.compare_digest`; the test
reads the package's source and fails on a `==` or `!=` between two runtime values when either names a secret.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from conftest import session_cookie

from gateway.db import groups as db_groups

PACKAGE = Path(__file__).resolve().parents[1] / "gateway"
# The GitLab stand-in is a test double, not part of the gateway's attack surface.
SKIPPED = {"demo"}
SECRET = re.compile(r"token|secret|state|nonce|password|verifier|presented|digest|signature", re.IGNORECASE)


def _names(node: ast.AST) -> set[str]:
    """Identifiers, attribute names and string keys an expression mentions."""
    out: set[str] = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name):
            out.add(sub.id)
        elif isinstance(sub, ast.Attribute):
            out.add(sub.attr)
        elif isinstance(sub, ast.Constant) and isinstance(sub.value, str):
            out.add(sub.value)
    return out


def _is_literal(node: ast.AST) -> bool:
    # A comparison with a literal ("bearer", "active", None) reveals nothing secret.
    return isinstance(node, ast.Constant) or (
        isinstance(node, ast.Tuple | ast.List | ast.Set) and all(isinstance(e, ast.Constant) for e in node.elts))


def secret_equality_comparisons(source: str, filename: str) -> list[str]:
    """`file:line: code` of every == / != between two non-literal values where one side names a secret."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.Compare):
            continue
        operands = [node.left, *node.comparators]
        for op, left, right in zip(node.ops, operands[:-1], operands[1:], strict=True):
            if not isinstance(op, ast.Eq | ast.NotEq) or _is_literal(left) or _is_literal(right):
                continue
            if any(SECRET.search(name) for name in _names(left) | _names(right)):
                found.append(f"{filename}:{node.lineno}: {ast.unparse(node)}")
    return found


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p.relative_to(PACKAGE).parts[0] not in SKIPPED)


def test_no_secret_is_compared_with_equals() -> None:
    found = [hit for path in _modules()
             for hit in secret_equality_comparisons(path.read_text(encoding="utf-8"),
                                                    str(path.relative_to(PACKAGE.parent)))]
    assert found == [], "compare secrets with secrets.compare_digest:\n" + "\n".join(found)


@pytest.mark.parametrize(("code", "flagged"), [
    ("ok = token.token == presented.strip()", True),
    ("ok = data.get('state') != state", True),
    ("ok = claims['nonce'] == nonce", True),
    ("ok = secrets.compare_digest(token.encode(), presented.encode())", False),
    ("ok = user.state != 'active'", False),
    ("ok = token_type.lower() in ('bearer',)", False),
    ("ok = scheme.lower() == 'bearer'", False),
    ("ok = key == name", False),
])
def test_the_check_itself(code: str, flagged: bool) -> None:
    assert bool(secret_equality_comparisons(code, "x.py")) is flagged


# ---- {prefix}/auth asked directly (tests/test_nginx.py asks through nginx, when nginx is installed) ----------

async def test_auth_allowed_groups_means_any_of_them(gateway_factory: Any) -> None:
    gw = await gateway_factory()
    cookie = await session_cookie(gw)  # alice, in the default group only
    async with aiohttp.ClientSession(headers={"Cookie": f"_gateway={cookie}"}) as http:
        async def status(query: str) -> int:
            async with http.get(f"{gw.public_url}/oauth2/auth{query}", allow_redirects=False) as r:
                return r.status

        assert await status("") == 202
        assert await status("?allowed_groups=ops,gateway-users") == 202  # one of them is enough
        assert await status("?allowed_groups=%20gateway-users%20,") == 202
        assert await status("?allowed_groups=ops") == 403
        # An empty list (an nginx variable that came out empty) admits nobody rather than everybody.
        assert await status("?allowed_groups=") == 403
    async with aiohttp.ClientSession() as anon, anon.get(f"{gw.public_url}/oauth2/auth") as r:
        assert r.status == 401


# ---- guards in the SQL itself (the services check first; the statements hold even for a caller that forgets) --

async def test_the_default_group_row_cannot_be_deleted(db: asyncpg.Pool) -> None:
    async with db.acquire() as conn:
        default = await db_groups.default_group(conn)
        assert await db_groups.delete(conn, default.id) is False
        assert await db_groups.by_id(conn, default.id) is not None
