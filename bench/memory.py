"""Memory of one gateway process (issue 11): idle keep-alive connections, and long streams both ways.

    python bench/memory.py [--connections 10000] [--stream-mb 2048]

One gateway (`python -m gateway run`, workers 1, default configuration: server.max_connections 10000), nginx
as the upstream (a file of --stream-mb MB to download; uploads are read and discarded by nginx), PostgreSQL as
in run.py, one signed-in cookie. It prints the gateway's RSS (resident set size, from /proc):

1. after start-up and a few requests (the baseline);
2. the highest RSS seen (sampled every 20 ms) while a --stream-mb download, then a --stream-mb upload, goes
   through the gateway, and what is left after each (target: growth < 50 MB for 2 GB each way);
3. with --connections client connections open at once, each having made one proxied request and now idle
   (keep-alive): the total, and per connection (target: < 150 MB in all for 10,000).

The open-files limit of this process (and so of the gateway it starts) is raised to its hard limit: each
connection is a descriptor in the client here and one in the gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import (
    PAGE,
    REPO,
    Processes,
    database,
    fetch,
    free_port,
    gateway_config,
    mint_session,
    wait_port,
    wait_ready,
)

MB = 1024 * 1024
CHUNK = 256 * 1024


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / MB


class Peak:
    """The highest RSS of `pid` while in the with-block, sampled every 20 ms in a thread."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb(self.pid))
            time.sleep(0.02)

    def __enter__(self) -> Peak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb(self.pid))


async def idle_connections(port: int, cookie: str, count: int) -> list[asyncio.StreamWriter]:
    """`count` connections, each after one keep-alive GET of the page, left open and idle."""
    request = (f"GET /index.html HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nCookie: {cookie}\r\n\r\n").encode()
    writers: list[asyncio.StreamWriter] = []
    gate = asyncio.Semaphore(200)  # connect in waves: the listen backlog is 1024

    async def one() -> None:
        async with gate:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200"), head[:100]
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            await reader.readexactly(length)
            writers.append(writer)

    await asyncio.gather(*(one() for _ in range(count)))
    return writers


async def download(url: str, cookie: str) -> int:
    import aiohttp

    got = 0
    async with aiohttp.ClientSession() as http, http.get(url, headers={"Cookie": cookie}) as r:
        assert r.status == 200, r.status
        async for chunk in r.content.iter_chunked(CHUNK):
            got += len(chunk)
    return got


async def upload(url: str, cookie: str, size: int) -> int:
    import aiohttp

    block = b"\0" * CHUNK

    async def body() -> object:
        sent = 0
        while sent < size:
            n = min(CHUNK, size - sent)
            yield block[:n]
            sent += n

    async with aiohttp.ClientSession() as http, http.post(url, data=body(),
                                                          headers={"Cookie": cookie,
                                                                   "Content-Length": str(size)}) as r:
        await r.read()
        return r.status


def sink(port: int) -> None:
    """An upstream for uploads: reads each request's whole body (Content-Length or chunked), then answers 200."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).lower()
                if b"transfer-encoding: chunked" in head:
                    while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
                        await reader.readexactly(size + 2)
                    await reader.readuntil(b"\r\n")
                else:
                    left = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                                 if line.startswith(b"content-length:")), 0)
                    while left:
                        left -= len(await reader.read(min(left, 1 << 20)))
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    async def run() -> None:
        server = await asyncio.start_server(serve, "127.0.0.1", port)
        await server.serve_forever()

    asyncio.run(run())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--stream-mb", type=int, default=2048)
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < args.connections + 200:
        raise SystemExit(f"the open-files hard limit is {hard}: raise it (ulimit -Hn) to measure "
                         f"{args.connections} connections")
    workdir = Path(tempfile.mkdtemp(prefix="gateway-memory-"))
    workdir.chmod(0o755)
    procs = Processes(workdir)
    size = args.stream_mb * MB
    try:
        www = workdir / "www"
        www.mkdir()
        (www / "index.html").write_bytes(PAGE)
        with (www / "big").open("wb") as f:
            f.truncate(size)  # sparse: costs no disk
        sink = free_port()
        sink_proc = procs.start([sys.executable, __file__, "--sink", str(sink)], "upload-sink")
        wait_port(sink, sink_proc, "upload sink")
        # nginx serves the download and streams uploads to the sink (which answers once it has read them all).
        up, _up_proc = procs.nginx("upstream", f"""server {{ LISTEN
            location / {{ root {www}; }}
            location = /upload {{ client_max_body_size 0; proxy_request_buffering off;
                                  proxy_http_version 1.1; proxy_pass http://127.0.0.1:{sink}; }} }}""")
        with database(workdir) as dsn:
            cookie = f"_gateway={asyncio.run(mint_session(dsn))}"
            path, public, admin = gateway_config(workdir, "gateway-memory", dsn=dsn,
                                                 upstream=f"http://127.0.0.1:{up}", workers=1)
            gw = procs.start([sys.executable, "-m", "gateway", "run", "--no-migrate", "-c", str(path)],
                             "gateway-memory", cwd=REPO)
            wait_ready(admin, gw)
            base_url = f"http://127.0.0.1:{public}"
            for _ in range(20):
                status, body = fetch(f"{base_url}/index.html", cookie)
                assert status == 200 and body == PAGE, (status, body[:200])
            time.sleep(0.5)
            baseline = rss_mb(gw.pid)
            print(f"gateway RSS after start-up and 20 requests: {baseline:.1f} MB")

            for label, run in (("download", lambda: download(f"{base_url}/big", cookie)),
                               ("upload", lambda: upload(f"{base_url}/upload", cookie, size))):
                before = rss_mb(gw.pid)
                started = time.monotonic()
                with Peak(gw.pid) as peak:
                    result = asyncio.run(run())
                elapsed = time.monotonic() - started
                time.sleep(0.5)
                left = rss_mb(gw.pid)
                if label == "download":
                    assert result == size, f"downloaded {result} of {size} bytes"
                else:
                    assert result == 200, f"upload answered {result}"
                print(f"{args.stream_mb} MB {label} through the gateway in {elapsed:.1f} s "
                      f"({args.stream_mb / elapsed:.0f} MB/s): RSS before {before:.1f} MB, peak {peak.peak:.1f} MB "
                      f"({peak.peak - before:+.1f} MB), after {left:.1f} MB ({left - before:+.1f} MB) "
                      f"(target: growth < 50 MB: {'met' if peak.peak - before < 50 else 'NOT met'})")

            async def hold() -> None:
                before = rss_mb(gw.pid)
                started = time.monotonic()
                writers = await idle_connections(public, cookie, args.connections)
                opened = time.monotonic() - started
                open_now = len(psutil.Process(gw.pid).net_connections(kind="tcp"))
                # Measured twice: 1 s after the last request, and once idle past server.header_timeout (10 s),
                # when the per-connection header timer of the last request is gone too.
                for idle in (1.0, 11.0):
                    await asyncio.sleep(idle - (0 if idle == 1.0 else 1.0))
                    rss = rss_mb(gw.pid)
                    print(f"{len(writers)} keep-alive connections idle for {idle:.0f} s (opened in {opened:.1f} s; "
                          f"the gateway holds {open_now} TCP sockets): RSS {rss:.1f} MB in all, "
                          f"{rss - before:+.1f} MB over the {before:.1f} MB before, "
                          f"{(rss - before) * 1024 / len(writers):.1f} KB per connection "
                          f"(target < 150 MB in all: {'met' if rss < 150 else 'NOT met'})")
                for w in writers:
                    w.close()
                await asyncio.sleep(1.0)

            asyncio.run(hold())
            time.sleep(1.0)
            print(f"after they closed: RSS {rss_mb(gw.pid):.1f} MB")

    finally:
        procs.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        if sys.argv[1:2] == ["--sink"]:
            sink(int(sys.argv[2]))
        else:
            sys.exit(main())
