"""The Python verifier shown in deploy/README.md, run as written (only its URLs replaced) against a real
gateway: it accepts the gateway's assertion and rejects forged, retargeted and expired ones."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from test_policy_proxy import call, cookie_of, header, start

README = Path(__file__).resolve().parents[1] / "deploy" / "README.md"


def readme_verifier(jwks_url: str, audience: str, issuer: str) -> Any:
    block = re.search(r"Python \(`pip install.*?```python\n(.*?)```", README.read_text(), re.S)
    assert block is not None, "deploy/README.md lost its Python verifier"
    code = block.group(1)
    assert len([line for line in code.splitlines() if line.strip()]) <= 10
    code = (code.replace("https://tools.example.com/oauth2/jwks.json", jwks_url)
            .replace("http://127.0.0.1:8081", audience).replace("https://tools.example.com", issuer))
    namespace: dict[str, Any] = {}
    exec(compile(code, "deploy/README.md", "exec"), namespace)
    return namespace["identity"]


async def test_the_readme_verifier(gateway_factory, db, tools):
    gw = await start(gateway_factory, db, tools)
    identity = readme_verifier(gw.public_url + "/oauth2/jwks.json", tools["grafana"], gw.config.server.public_url)
    alice = await cookie_of(gw, "alice")
    _, body, _ = await call(gw, "/x", cookie=alice)
    token = header(body, "X-Gateway-Assertion")[0]
    claims = await asyncio.to_thread(identity, {"X-Gateway-Assertion": token})
    assert claims["login"] == "alice" and claims["groups"] == ["gateway-users", "sre"]
    # Another tool's token, a token signed by a key the gateway does not publish, a tampered one.
    _, body, _ = await call(gw, "/docs/x", host="tools.test", cookie=alice)
    with pytest.raises(jwt.InvalidAudienceError):
        await asyncio.to_thread(identity, {"X-Gateway-Assertion": header(body, "X-Gateway-Assertion")[0]})
    stranger = jwt.encode({"login": "mallory"}, ed25519.Ed25519PrivateKey.generate(), algorithm="EdDSA",
                          headers={"kid": "not-published"})
    with pytest.raises(jwt.PyJWKClientError):
        await asyncio.to_thread(identity, {"X-Gateway-Assertion": stranger})
    h, p, s = token.split(".")
    with pytest.raises(jwt.InvalidTokenError):
        await asyncio.to_thread(identity, {"X-Gateway-Assertion": f"{h}.{p[:-2]}AA.{s}"})
