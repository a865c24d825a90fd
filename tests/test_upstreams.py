"""Several upstreams (SPEC §13): host and path-prefix matching, first match wins, unknown host = None, and no
spelling of the Host header selects another upstream."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.access.hosts import canonical_host, host_matches
from gateway.access.upstreams import UpstreamTable, prefix_matches, strip_path
from gateway.config import UpstreamConfig
from gateway.config_access import UpstreamRoute

TABLE = UpstreamTable([
    UpstreamRoute(UpstreamConfig(url="http://127.0.0.1:3000"), host="grafana.example.com"),
    UpstreamRoute(UpstreamConfig(url="http://127.0.0.1:8081/"), host="tools.example.com", path_prefix="/docs/",
                  strip_prefix=True),
    UpstreamRoute(UpstreamConfig(url="http://127.0.0.1:8082"), host=".apps.example.com"),
    UpstreamRoute(UpstreamConfig(url="http://127.0.0.1:8080"), host="tools.example.com"),
])


def chosen(host: str, path: str = "/") -> int | None:
    target = TABLE.select(canonical_host(host), path)
    return None if target is None else target.index


@pytest.mark.parametrize(("host", "path", "index"), [
    ("grafana.example.com", "/d/x", 0),
    ("GRAFANA.example.com", "/", 0),
    ("grafana.example.com:8443", "/", 0),
    ("grafana.example.com.", "/", 0),
    ("tools.example.com", "/docs/a", 1),
    ("tools.example.com", "/docs", 3),  # "/docs/" needs the slash
    ("tools.example.com", "/docsx/a", 3),
    ("apps.example.com", "/", 2),
    ("x.y.apps.example.com", "/", 2),
    ("tools.example.com", "/", 3),
    # unknown hosts: never the first upstream
    ("evil.example.com", "/", None),
    ("grafana.example.com.evil.com", "/", None),
    ("evilgrafana.example.com", "/", None),
    ("xapps.example.com", "/", None),
    ("grafana.example.com@evil.com", "/", None),
    ("", "/", None),
    ("grafana.example.com, tools.example.com", "/", None),
])
def test_selection(host, path, index):
    assert chosen(host, path) == index


def test_one_upstream_takes_everything():
    only = UpstreamTable([UpstreamRoute(UpstreamConfig(url="http://127.0.0.1:8080/"))])
    target = only.select(None, "/anything")
    assert target is not None and target.base == "http://127.0.0.1:8080" and target.strip is None


def test_prefix_and_strip():
    assert all(prefix_matches("/docs", p) for p in ("/docs", "/docs/a", "/docs?q"))
    assert not prefix_matches("/docs", "/docsx") and not prefix_matches("/docs/", "/docs")
    assert [strip_path("/docs", p) for p in ("/docs/a?b", "/docs", "/docs?x")] == ["/a?b", "/", "/?x"]
    target = TABLE.select("tools.example.com", "/docs/a")
    assert target is not None and target.strip == "/docs" and target.base == "http://127.0.0.1:8081"


HOSTS = [r.route.host for r in TABLE.targets]


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet="abcdeglmnoprstxy.-:_@[]1234567890 ,AG", max_size=40))
def test_property_host_spoofing_never_selects_another_upstream(header):
    # Whatever the Host header says, an upstream bound to a host is chosen only for that very host (any case,
    # any port, a trailing dot), and a header that is not a plain host[:port] selects nothing.
    target = TABLE.select(canonical_host(header), "/")
    host = canonical_host(header)
    if target is None:
        assert host is None or not any(host_matches(h, host) for h in HOSTS if h)
        return
    assert host is not None and target.route.host is not None and host_matches(target.route.host, host)
    bare = header.strip().lower().rstrip(".")
    assert bare.split(":")[0].rstrip(".") == host
