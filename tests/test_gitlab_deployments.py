"""A self-managed GitLab on a subpath, behind a private CA: the whole sign-in still works (and fails clearly
without the CA)."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp import web
from conftest import CLIENT_ID, CLIENT_SECRET
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.demo.fake_gitlab import FakeGitLab, create_app


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca_and_server_cert(tmp: Path) -> tuple[Path, Path, Path]:
    """A private CA and a server certificate for 127.0.0.1 signed by it: (ca.pem, cert.pem, key.pem)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("Test Private CA")).issuer_name(_name("Test Private CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name("gitlab.internal")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = tmp / "ca.pem", tmp / "cert.pem", tmp / "key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


@pytest.fixture
async def tls_gitlab(tmp_path: Path, unused_tcp_port_factory: Any) -> AsyncIterator[tuple[FakeGitLab, str, Path]]:
    """A GitLab stand-in on https://127.0.0.1:PORT/gitlab with a certificate from a private CA."""
    ca, cert, key = make_ca_and_server_cert(tmp_path)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    fake = FakeGitLab(base_path="/gitlab")
    runner = web.AppRunner(create_app(fake))
    await runner.setup()
    port = unused_tcp_port_factory()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=ctx).start()
    yield fake, f"https://127.0.0.1:{port}/gitlab", ca
    await runner.cleanup()


async def start_with(gateway_factory: Any, fake: FakeGitLab, url: str, **gitlab: Any) -> Any:
    gw = await gateway_factory(gitlab={"url": url, **gitlab})
    fake.add_application(CLIENT_ID, CLIENT_SECRET, [gw.config.server.callback_url])
    gw.fake, gw.fake_url = fake, url.rsplit("/gitlab", 1)[0]
    return gw


async def test_subpath_gitlab_with_private_ca(gateway_factory: Any, tls_gitlab: Any, db: asyncpg.Pool) -> None:
    fake, url, ca = tls_gitlab
    gw = await start_with(gateway_factory, fake, url, ca_file=str(ca))
    fake.add_group(1, "acme")
    fake.add_user(10, "alice")
    fake.add_member("alice", "acme")
    await db.execute("INSERT INTO groups (name) VALUES ('acme')")
    async with gw.browser(ssl=ssl.create_default_context(cafile=str(ca))) as b:
        r = await b.sign_in("alice", rd="/x")
        assert r.headers["Location"] == "/x"
        assert (await (await b.get("/oauth2/userinfo")).json())["groups"] == ["acme", "gateway-users"]
    assert any(p.startswith("/gitlab/api/v4/groups") for _, p in fake.requests)


async def test_private_ca_missing_is_a_clear_502(gateway_factory: Any, tls_gitlab: Any, db: asyncpg.Pool) -> None:
    fake, url, ca = tls_gitlab
    gw = await start_with(gateway_factory, fake, url)
    fake.add_user(10, "alice")
    async with gw.browser(ssl=ssl.create_default_context(cafile=str(ca))) as b:
        b.http.headers["Accept"] = "application/json"
        r = await b.sign_in("alice", expect_status=502)
        body = await r.json()
        assert body["error"] == "gitlab_misconfigured" and "gitlab.ca_file" in body["message"]
    assert await db.fetchval("SELECT count(*) FROM users") == 0
