"""What SPEC §13 adds to each proxied request, measured in one process (so a busy machine hits both alike).

    python bench/policy_cost.py [--rounds 12]

The part of the proxied path that policy and assertions touch: the Host reading, the upstream choice, the
policy decision, the upstream request headers (identity + assertion) and their serialization by aiohttp's
client, for gateway-1's configuration and for run.py's gateway-1-policy one (20 rules, the last deciding,
and an ES256 assertion). Rounds alternate between the two; the minimum of each is reported, next to the CPU a
whole proxied request costs (run.py's "CPU us/req" column, about 220-400 us on the reference machine).
"""

from __future__ import annotations

import argparse
import sys
import timeit
from collections.abc import Callable

from aiohttp.http_writer import _serialize_headers
from aiohttp.test_utils import make_mocked_request
from cryptography.fernet import Fernet
from multidict import CIMultiDict
from run import policy_sections  # bench/ is on sys.path when this file is run as a script

from gateway.access.headers import HeaderPolicy
from gateway.config import Config, build_config
from gateway.identity import Identity
from gateway.web.access import Access

IDENTITY = Identity(1, "bench", "bench@example.com", ("gateway-users",), gitlab_id=1, sid_hash="x" * 24)
REQUEST = make_mocked_request("GET", "/index.html", headers=CIMultiDict({
    "Host": "127.0.0.1:4180", "User-Agent": "wrk", "Accept": "*/*", "Cookie": "_gateway=" + "x" * 180}))


def request_work(cfg: Config) -> Callable[[], None]:
    headers = HeaderPolicy.from_config(cfg)
    access = Access.from_config(cfg, headers)
    audience = cfg.routing[0].upstream.url

    def one() -> None:
        host = access.host_of(REQUEST)
        access.table.select(host, REQUEST.raw_path)
        access.policy.decide(REQUEST.method, host, REQUEST.raw_path, IDENTITY)
        out = headers.upstream_request_headers(
            REQUEST.headers, client_ip="127.0.0.1", scheme="http", host="127.0.0.1:4180", identity=IDENTITY,
            pass_host_header=True, upstream_host="127.0.0.1:8080")
        if access.assertion_header is not None and access.signer is not None:
            out[access.assertion_header] = access.signer.token(IDENTITY, IDENTITY.sid_hash, audience)
        _serialize_headers("GET /index.html HTTP/1.1", out)

    one()
    return one


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--number", type=int, default=20000, help="calls per round")
    args = parser.parse_args()
    base = {"gitlab": {"client_id": "bench", "client_secret": "bench-secret"},
            "session": {"secrets": [Fernet.generate_key().decode()]}}
    rows = {"gateway-1": request_work(build_config(base, env={})),
            "gateway-1-policy": request_work(build_config({**base, **policy_sections()}, env={}))}
    best = {name: float("inf") for name in rows}
    for _ in range(args.rounds):
        for name, work in rows.items():
            best[name] = min(best[name], timeit.timeit(work, number=args.number) / args.number * 1e6)
    extra = best["gateway-1-policy"] - best["gateway-1"]
    print(f"per request, min of {args.rounds} rounds: gateway-1 {best['gateway-1']:.1f} us, "
          f"gateway-1-policy {best['gateway-1-policy']:.1f} us: 20 rules + assertion add {extra:.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
