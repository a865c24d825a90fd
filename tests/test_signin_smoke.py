"""First end-to-end: sign in through the GitLab stand-in and reach the echo upstream."""

from conftest import echoed_headers
from yarl import URL


async def test_sign_in_then_proxy(gateway_factory, db):
    gw = await gateway_factory()
    gw.fake.add_user(10, "alice", name="Alice", email="alice@example.com")
    async with gw.browser() as b:
        r = await b.get("/hello?x=1")
        assert r.status == 302
        loc = URL(r.headers["Location"])
        assert loc.path == "/oauth2/start" and loc.query["rd"] == "/hello?x=1"
        r = await b.sign_in("alice", rd="/hello?x=1")
        assert r.headers["Location"] == "/hello?x=1"
        r = await b.get("/hello?x=1")
        assert r.status == 200
        payload = await r.json()
        h = echoed_headers(payload)
        assert h["x-forwarded-user"] == ["alice"]
        assert h["x-forwarded-groups"] == ["gateway-users"]
    row = await db.fetchrow("SELECT login, gitlab_id, provisioned_by FROM users")
    assert tuple(row) == ("alice", 10, "jit")
