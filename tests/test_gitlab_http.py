"""The GitLab client's own HTTP/1.1 transport (gateway/sync/gitlab_http.py), against raw socket servers that
answer exactly as scripted: keep-alive reuse, a pooled connection closed while idle (an idempotent request is
sent again once, a POST never), chunked, close-delimited and compressed answers, the size limit, and the
connections closed with the session."""

from __future__ import annotations

import asyncio
import gzip
import json
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from gateway.config import GitLabConfig
from gateway.errors import GitLabUnavailable
from gateway.sync import gitlab_http
from gateway.sync.gitlab import GitLabClient

USER = json.dumps({"id": 7, "username": "ann", "name": "Ann", "email": "ann@example.com", "state": "active"})
TOKEN_BODY = json.dumps({"access_token": "at", "token_type": "Bearer", "scope": "read_user"})

# reader, writer, the number of this connection (from 1), the number of the request on it (from 1)
Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int, int], Awaitable[bool]]


class RawServer:
    """A raw HTTP/1.1 server: reads each request head (and its Content-Length body) and lets `script` answer;
    the script returns False to stop serving that connection."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.requests: list[tuple[int, str]] = []  # (connection, request line)
        self.raw: list[bytes] = []  # each request as received
        self.open = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        number, count = self.connections, 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                self.raw.append(head + await reader.readexactly(length))
                count += 1
                self.requests.append((number, head.split(b"\r\n", 1)[0].decode()))
                if not await self.script(reader, writer, number, count):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.open -= 1
            writer.close()

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


def response(body: bytes, *, status: str = "200 OK", headers: str = "") -> bytes:
    return (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n{headers}\r\n"
            .encode() + body)


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Script], Awaitable[tuple[RawServer, GitLabClient]]]]:
    started: list[tuple[RawServer, Any]] = []

    async def start(script: Script) -> tuple[RawServer, GitLabClient]:
        server = RawServer(script)
        cfg = GitLabConfig(url=await server.start(), client_id="app", client_secret="secret", timeout=2.0)
        session = GitLabClient.make_session(cfg)
        started.append((server, session))
        return server, GitLabClient(cfg, session)

    yield start
    for server, session in started:
        await session.close()
        await server.close()


async def keep_alive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: int, n: int) -> bool:
    writer.write(response(USER.encode()))
    return True


async def test_calls_reuse_one_connection(serve: Any) -> None:
    server, client = await serve(keep_alive)
    for _ in range(5):
        assert (await client.fetch_user("t")).username == "ann"
    assert server.connections == 1 and len(server.requests) == 5


async def test_closing_the_session_closes_the_pooled_connections(serve: Any) -> None:
    server, client = await serve(keep_alive)
    await client.fetch_user("t")
    assert server.open == 1
    await client.session.close()
    for _ in range(100):
        if server.open == 0:
            break
        await asyncio.sleep(0.01)
    assert server.open == 0


async def closes_the_second_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: int,
                                    n: int) -> bool:
    """Answers the first request of each connection; on a second one, closes without answering (as a server
    whose keep-alive timeout ends just as the request arrives)."""
    if n > 1:
        return False
    writer.write(response(USER.encode()))
    return True


async def test_an_idempotent_request_on_a_connection_closed_while_idle_is_sent_once_more(serve: Any) -> None:
    server, client = await serve(closes_the_second_request)
    await client.fetch_user("t")
    assert (await client.fetch_user("t")).username == "ann"  # the reused connection failed: a new one
    assert [c for c, _line in server.requests] == [1, 1, 2]


async def test_a_post_is_never_sent_twice(serve: Any) -> None:
    server, client = await serve(closes_the_second_request)
    await client.fetch_user("t")
    with pytest.raises(GitLabUnavailable, match="Cannot reach GitLab for the token request"):
        await client.exchange_code("code", code_verifier="v", redirect_uri="https://tool/cb")
    assert [line.split()[0] for _c, line in server.requests] == ["GET", "POST"]


async def test_an_answer_cut_short_is_not_retried(serve: Any) -> None:
    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: int, n: int) -> bool:
        if n == 1:
            writer.write(response(USER.encode()))
            return True
        writer.write(response(USER.encode())[:-5])  # part of an answer, then the connection closes
        await writer.drain()
        return False

    server, client = await serve(cut)
    await client.fetch_user("t")
    with pytest.raises(GitLabUnavailable, match="Cannot reach GitLab"):
        await client.fetch_user("t")
    assert len(server.requests) == 2


async def test_chunked_answers(serve: Any) -> None:
    async def chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: int, n: int) -> bool:
        body = USER.encode()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
        for i in range(0, len(body), 7):
            part = body[i:i + 7]
            writer.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        return True

    server, client = await serve(chunked)
    assert (await client.fetch_user("t")).username == "ann"
    assert (await client.fetch_user("t")).username == "ann"
    assert server.connections == 1


async def test_close_delimited_answers(serve: Any) -> None:
    async def until_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: int, n: int) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n" + USER.encode())
        await writer.drain()
        return False

    server, client = await serve(until_close)
    assert (await client.fetch_user("t")).username == "ann"
    assert (await client.fetch_user("t")).username == "ann"
    assert server.connections == 2


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "raw-deflate"])
async def test_compressed_answers_are_decoded(serve: Any, encoding: str) -> None:
    if encoding == "gzip":
        body = gzip.compress(USER.encode())
    elif encoding == "deflate":
        body = zlib.compress(USER.encode())
    else:  # deflate without the zlib wrapper, as some servers send it
        packer = zlib.compressobj(wbits=-zlib.MAX_WBITS)
        body = packer.compress(USER.encode()) + packer.flush()
    name = encoding.removeprefix("raw-")

    async def compressed(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: int, n: int) -> bool:
        writer.write(response(body, headers=f"Content-Encoding: {name}\r\n"))
        return True

    _server, client = await serve(compressed)
    assert (await client.fetch_user("t")).username == "ann"


async def test_an_answer_over_the_size_limit_is_refused(serve: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gitlab_http, "MAX_BODY", 1000)

    async def huge(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: int, n: int) -> bool:
        writer.write(response(b'{"pad": "' + b"x" * 5000 + b'"}'))
        return True

    _server, client = await serve(huge)
    with pytest.raises(GitLabUnavailable, match=r"Cannot reach GitLab for the user request \(ProtocolError\)"):
        await client.fetch_user("t")


async def test_garbage_is_gitlab_unavailable(serve: Any) -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: int, n: int) -> bool:
        writer.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
        return True

    _server, client = await serve(garbage)
    with pytest.raises(GitLabUnavailable, match="Cannot reach GitLab"):
        await client.fetch_user("t")


async def test_the_request_head_and_form_body(serve: Any) -> None:
    async def token(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: int, n: int) -> bool:
        writer.write(response(TOKEN_BODY.encode()))
        return True

    server, client = await serve(token)
    answer = await client.exchange_code("c/d", code_verifier="v é", redirect_uri="https://tool/cb")
    assert answer.access_token == "at"
    head, body = server.raw[0].decode().split("\r\n\r\n")
    lines = head.split("\r\n")
    assert lines[0] == "POST /oauth/token HTTP/1.1"
    headers = dict(line.split(": ", 1) for line in lines[1:])
    assert headers["Host"] == client._cfg.url.removeprefix("http://")
    assert headers["User-Agent"] == "gateway/0.1" and headers["Accept"] == "application/json"
    assert headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert headers["Authorization"].startswith("Basic ") and int(headers["Content-Length"]) == len(body.encode())
    assert body == ("grant_type=authorization_code&code=c%2Fd&redirect_uri=https%3A%2F%2Ftool%2Fcb"
                    "&code_verifier=v+%C3%A9")
