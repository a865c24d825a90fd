"""The signed identity of SPEC §13: a compact JWS (ES256 or EdDSA) the upstream can verify with our JWKS.

Plain identity headers are only safe when nothing but the gateway can reach the upstream; an assertion lets a
tool check for itself that the identity came from us, for it (`aud`), and recently (`exp`). Signing costs tens
of microseconds, so a signed token is reused per session and audience until a minute before it expires: the
proxied path signs about once per session per four minutes.

Pure: keys arrive as PEM text (config reads the files), time comes from the caller's clock.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from gateway.identity import Identity

LIFETIME = 300  # seconds: exp = iat + 5 min (SPEC §13)
REUSE_MARGIN = 60  # a cached token is replaced a minute before its exp
CACHE_SIZE = 20_000

SigningKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def load_signing_key(pem: str) -> SigningKey:
    """A P-256 or Ed25519 private key from PEM; ValueError with a sentence that never echoes the key."""
    try:
        key = serialization.load_pem_private_key(pem.encode(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ValueError("must be an unencrypted PEM private key (ES256 P-256 or Ed25519); make one with: "
                         "openssl genpkey -algorithm ed25519") from None
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key
    if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
        return key
    raise ValueError("must be an ES256 (EC P-256) or Ed25519 key; other key types are not supported")


@dataclass(frozen=True, slots=True)
class _Key:
    private: SigningKey
    alg: str
    kid: str
    jwk: dict[str, str]


def _describe(private: SigningKey) -> _Key:
    public = private.public_key()
    jwk: dict[str, str]
    if isinstance(public, ed25519.Ed25519PublicKey):
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        jwk, alg = {"crv": "Ed25519", "kty": "OKP", "x": _b64(raw)}, "EdDSA"
    else:
        numbers = public.public_numbers()
        jwk = {"crv": "P-256", "kty": "EC", "x": _b64(numbers.x.to_bytes(32, "big")),
               "y": _b64(numbers.y.to_bytes(32, "big"))}
        alg = "ES256"
    # RFC 7638 thumbprint: the required members, sorted, no spaces. Stable across restarts and replicas.
    kid = _b64(hashlib.sha256(json.dumps(jwk, sort_keys=True, separators=(",", ":")).encode()).digest())
    return _Key(private, alg, kid, {**jwk, "kid": kid, "alg": alg, "use": "sig"})


def session_hash(session_id: str) -> str:
    """The `sid` claim: ties tokens of one session together without revealing the id (a bearer secret)."""
    return _b64(hashlib.sha256(b"gateway-sid:" + session_id.encode()).digest()[:18])


class Signer:
    """Signs assertions with the first key, publishes every key; remembers tokens per session and audience."""

    def __init__(self, pems: Sequence[str], *, issuer: str, clock: Callable[[], float] = time.time) -> None:
        if not pems:
            raise ValueError("at least one signing key is needed")
        self._keys = [_describe(load_signing_key(pem)) for pem in pems]
        self._signing = self._keys[0]
        self._issuer = issuer
        self._clock = clock
        self._header = _b64(json.dumps({"alg": self._signing.alg, "kid": self._signing.kid, "typ": "JWT"},
                                       separators=(",", ":")).encode())
        self._cache: dict[tuple[str, str], tuple[Identity, float, str]] = {}
        self.signed = 0  # tokens actually signed (the rest came from the cache)

    def jwks(self) -> dict[str, Any]:
        """The JWKS document: every configured key, so tokens signed before a rotation still verify."""
        return {"keys": [dict(k.jwk) for k in self._keys]}

    def token(self, identity: Identity, sid_hash: str, audience: str) -> str:
        """A valid assertion for this session and audience: cached until REUSE_MARGIN before exp."""
        key = (sid_hash, audience)
        now = self._clock()
        hit = self._cache.get(key)
        # The identity object changes when the session cache refreshes it; equal content keeps the token.
        if hit is not None and hit[1] > now and (hit[0] is identity or hit[0] == identity):
            return hit[2]
        iat = int(now)
        claims = {
            "iss": self._issuer, "aud": audience,
            # A session exists only after a GitLab sign-in, so gitlab_id is set; the local id is a fallback.
            "sub": str(identity.gitlab_id if identity.gitlab_id is not None else f"local:{identity.user_id}"),
            "login": identity.login, "email": identity.email, "groups": list(identity.groups),
            "sid": sid_hash, "iat": iat, "exp": iat + LIFETIME,
        }
        token = self._sign(claims)
        self.signed += 1
        if len(self._cache) >= CACHE_SIZE:
            self._evict(now)
        self._cache[key] = (identity, iat + LIFETIME - REUSE_MARGIN, token)
        return token

    def _evict(self, now: float) -> None:
        stale = [k for k, v in self._cache.items() if v[1] <= now]
        for k in stale:
            del self._cache[k]
        if len(self._cache) >= CACHE_SIZE:  # all fresh: drop the oldest half (dicts keep insertion order)
            for k in list(self._cache)[: CACHE_SIZE // 2]:
                del self._cache[k]

    def _sign(self, claims: dict[str, Any]) -> str:
        payload = _b64(json.dumps(claims, separators=(",", ":"), ensure_ascii=False).encode())
        signing_input = f"{self._header}.{payload}".encode("ascii")
        private = self._signing.private
        if isinstance(private, ed25519.Ed25519PrivateKey):
            signature = private.sign(signing_input)
        else:
            # JWS wants r || s, 32 bytes each (RFC 7518 §3.4), not the DER that cryptography returns.
            r, s = decode_dss_signature(private.sign(signing_input, ec.ECDSA(hashes.SHA256())))
            signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
        return f"{self._header}.{payload}.{_b64(signature)}"
