"""The signed identity (SPEC §13), checked with an independent JOSE library (PyJWT): claims, kid, the JWKS,
key rotation, expiry, audience, tampering, and the per-session cache."""

from __future__ import annotations

import base64
import json

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from gateway.access.assertion import LIFETIME, Signer, load_signing_key, session_hash
from gateway.identity import Identity

ISSUER = "https://tool.example.com"
AUD = "http://127.0.0.1:3000"
ALICE = Identity(7, "alice", "alice@example.com", ("gateway-users", "sre"), gitlab_id=4242,
                 sid_hash=session_hash("session-id-1"))


def pem(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def es256() -> str:
    return pem(ec.generate_private_key(ec.SECP256R1()))


def ed() -> str:
    return pem(ed25519.Ed25519PrivateKey.generate())


def verify(token: str, jwks: dict, *, audience: str = AUD, **kw) -> dict:
    """What an upstream does: pick the key by kid from the published JWKS, check alg, signature, aud, iss, exp."""
    keys = jwt.PyJWKSet.from_dict(jwks)
    kid = jwt.get_unverified_header(token)["kid"]
    key = next(k for k in keys.keys if k.key_id == kid)
    return jwt.decode(token, key.key, algorithms=["ES256", "EdDSA"], audience=audience, issuer=ISSUER,
                      options={"require": ["exp", "iat", "sub"]}, **kw)


@pytest.mark.parametrize(("make", "alg"), [(es256, "ES256"), (ed, "EdDSA")])
def test_claims_and_header_verify_with_pyjwt(make, alg):
    now = 1_800_000_000.0
    signer = Signer([make()], issuer=ISSUER, clock=lambda: now)
    token = signer.token(ALICE, ALICE.sid_hash, AUD)
    header = jwt.get_unverified_header(token)
    assert header["alg"] == alg and header["kid"] == signer.jwks()["keys"][0]["kid"]
    claims = verify(token, signer.jwks(), leeway=10**9)  # the fixed clock is in the future of "now"
    assert claims == {"iss": ISSUER, "aud": AUD, "sub": "4242", "login": "alice", "email": "alice@example.com",
                      "groups": ["gateway-users", "sre"], "sid": ALICE.sid_hash, "iat": int(now),
                      "exp": int(now) + LIFETIME}
    assert "session-id-1" not in token and ALICE.sid_hash != "session-id-1"


def test_a_fresh_token_verifies_without_leeway():
    signer = Signer([es256()], issuer=ISSUER)
    assert verify(signer.token(ALICE, ALICE.sid_hash, AUD), signer.jwks())["login"] == "alice"


def test_rotation_old_tokens_still_verify_while_both_keys_are_listed():
    old_key, new_key = ed(), es256()
    before = Signer([old_key], issuer=ISSUER)
    old_token = before.token(ALICE, ALICE.sid_hash, AUD)
    after = Signer([new_key, old_key], issuer=ISSUER)  # the new key first: it signs; both are published
    new_token = after.token(ALICE, ALICE.sid_hash, AUD)
    jwks = after.jwks()
    assert len(jwks["keys"]) == 2 and len({k["kid"] for k in jwks["keys"]}) == 2
    assert jwt.get_unverified_header(new_token)["kid"] == jwks["keys"][0]["kid"]
    assert verify(old_token, jwks)["sub"] == verify(new_token, jwks)["sub"] == "4242"
    # Once the old key is dropped, its tokens no longer find a key.
    with pytest.raises(StopIteration):
        verify(old_token, Signer([new_key], issuer=ISSUER).jwks())


def test_kid_is_stable_for_a_key():
    key = ed()
    assert Signer([key], issuer=ISSUER).jwks() == Signer([key], issuer=ISSUER).jwks()


def test_expired_token_is_rejected():
    signer = Signer([es256()], issuer=ISSUER, clock=lambda: 1_000_000.0)
    with pytest.raises(jwt.ExpiredSignatureError):
        verify(signer.token(ALICE, ALICE.sid_hash, AUD), signer.jwks())


def test_wrong_audience_is_rejected():
    signer = Signer([es256()], issuer=ISSUER)
    token = signer.token(ALICE, ALICE.sid_hash, "http://127.0.0.1:8081")
    with pytest.raises(jwt.InvalidAudienceError):
        verify(token, signer.jwks())


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _tampered(token: str) -> list[str]:
    header, payload, sig = token.split(".")
    claims = json.loads(_unb64(payload))
    forged = []
    for change in ({"login": "mallory"}, {"groups": ["admins"]}, {"exp": claims["exp"] + 3600},
                   {"aud": AUD + "/"}, {"sub": "1"}):
        forged.append(f"{header}.{_b64(json.dumps({**claims, **change}).encode())}.{sig}")
    hdr = json.loads(_unb64(header))
    forged.append(f"{_b64(json.dumps({**hdr, 'alg': 'none'}).encode())}.{payload}.")
    forged.append(f"{_b64(json.dumps({**hdr, 'alg': 'HS256'}).encode())}.{payload}.{sig}")
    raw = bytearray(_unb64(sig))
    raw[0] ^= 1
    forged.append(f"{header}.{payload}.{_b64(bytes(raw))}")
    forged.append(f"{header}.{payload}.{sig[:-4]}")
    forged.append(f"{header}.{payload}")
    return forged


@pytest.mark.parametrize("make", [es256, ed])
def test_every_tampered_variant_is_rejected(make):
    signer = Signer([make()], issuer=ISSUER)
    token = signer.token(ALICE, ALICE.sid_hash, AUD)
    for forged in _tampered(token):
        with pytest.raises((jwt.InvalidTokenError, StopIteration, KeyError)):
            verify(forged, signer.jwks())
    # A token signed by someone else's key with our kid: refused too.
    impostor = Signer([make()], issuer=ISSUER).token(ALICE, ALICE.sid_hash, AUD)
    _, p, s = impostor.split(".")
    with pytest.raises(jwt.InvalidSignatureError):
        verify(f"{token.split('.')[0]}.{p}.{s}", signer.jwks())


def test_tokens_are_reused_per_session_and_audience_until_a_minute_before_exp():
    now = [1_000.0]
    signer = Signer([ed()], issuer=ISSUER, clock=lambda: now[0])
    first = signer.token(ALICE, ALICE.sid_hash, AUD)
    now[0] += LIFETIME - 61
    assert signer.token(ALICE, ALICE.sid_hash, AUD) == first and signer.signed == 1
    # Another audience, another session, or changed groups: another token.
    assert signer.token(ALICE, ALICE.sid_hash, AUD + "1") != first
    other = Identity(7, "alice", "alice@example.com", ("gateway-users", "sre"), gitlab_id=4242, sid_hash="x")
    assert signer.token(other, other.sid_hash, AUD) != first
    moved = Identity(7, "alice", "alice@example.com", ("gateway-users",), gitlab_id=4242, sid_hash=ALICE.sid_hash)
    assert json.loads(_unb64(signer.token(moved, moved.sid_hash, AUD).split(".")[1]))["groups"] == ["gateway-users"]
    now[0] += 2
    assert signer.token(ALICE, ALICE.sid_hash, AUD) != first


@pytest.mark.parametrize("bad", ["", "not a key", pem(rsa.generate_private_key(65537, 2048)),
                                 pem(ec.generate_private_key(ec.SECP384R1()))])
def test_unsupported_keys_are_refused_without_echoing_them(bad):
    with pytest.raises(ValueError) as info:
        load_signing_key(bad)
    assert "PRIVATE" not in str(info.value) or "BEGIN" not in str(info.value)
