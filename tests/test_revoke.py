"""The GitLab token revocation after sign-in (SPEC §6 with `resync_interval: 0`: tokens are not kept; with
SPEC §11's re-checks, the grant a new sign-in replaces) runs in the background: a slow or
failing /oauth/revoke never delays nor fails the sign-in redirect, a failure is logged with its cause, and the
task is finished or cancelled when the gateway stops (nothing left pending)."""

from __future__ import annotations

import asyncio

from gateway import keys


async def test_a_slow_revoke_does_not_delay_the_sign_in(gateway_factory):
    gw = await gateway_factory(provisioning={"resync_interval": 0})
    gw.fake.add_user(10, "alice", name="Alice", email="alice@example.com")
    gw.fake.fail("revoke", status=0, delay=2.0)  # answers, but late
    async with gw.browser() as b:
        r = await b.sign_in("alice", rd="/hello")
        assert r.headers["Location"] == "/hello"
        # The redirect came back while GitLab was still sitting on the revocation.
        [token] = gw.fake.issued_tokens()
        assert not token.revoked, "the sign-in waited for /oauth/revoke"
        assert gw.public_app[keys.BACKGROUND].pending == 1
        assert (await b.get("/hello")).status == 200
    for _ in range(100):
        if gw.fake.issued_tokens()[0].revoked:
            break
        await asyncio.sleep(0.05)
    assert gw.fake.issued_tokens()[0].revoked, "the token was never revoked"
    assert gw.public_app[keys.BACKGROUND].pending == 0


async def test_a_failing_revoke_is_logged_and_a_pending_one_ends_with_the_gateway(gateway_factory, caplog):
    gw = await gateway_factory(provisioning={"resync_interval": 0})
    gw.fake.add_user(10, "alice", name="Alice", email="alice@example.com")
    gw.fake.fail("revoke", status=500)
    async with gw.browser() as b:
        await b.sign_in("alice")
    for _ in range(100):
        if gw.public_app[keys.BACKGROUND].pending == 0:
            break
        await asyncio.sleep(0.02)
    failed = [r for r in caplog.records if r.getMessage() == "GitLab token revocation failed"]
    assert len(failed) == 1 and "500" in failed[0].cause

    gw.fake.fail("revoke", status=0, delay=30)
    async with gw.browser() as b:
        await b.sign_in("alice")
    assert gw.public_app[keys.BACKGROUND].pending == 1
    await gw.close()  # the app's cleanup: waits briefly, then cancels the revocation
    assert gw.public_app[keys.BACKGROUND].pending == 0
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "gitlab-revoke"]
