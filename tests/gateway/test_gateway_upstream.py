"""The gateway's upstream client (``gpucloud_gateway.upstream``) against the real fake
model server, and against a scripted TCP server for what a model server rarely does
(chunked bodies, bodies ending with the connection, idle connections closed, no answer)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from gateway_testkit import start_model_server
from gpucloud_gateway.upstream import (
    ConnectError,
    UpstreamError,
    UpstreamPool,
    UpstreamTimeout,
)

from gpucloud.testing.net import free_port

CHAT = b'{"messages": [{"role": "user", "content": "one two three"}], "max_tokens": 5}'
JSON = [("content-type", "application/json")]

# A scripted server's reply to one request: bytes to write (None: close without answering).
Script = Callable[[int, bytes], Awaitable[bytes | None]]


class Scripted:
    """A TCP server that answers each request with what ``script(n, request)`` returns,
    and counts connections and requests (n: the request's number, from 0)."""

    def __init__(self, script: Script, close_after_answer: bool = False) -> None:
        self.script = script
        self.close_after_answer = close_after_answer
        self.connections = 0
        self.requests: list[bytes] = []
        self.open = 0
        self.max_open = 0

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        self.max_open = max(self.max_open, self.open)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                request = head + await reader.readexactly(length)
                n = len(self.requests)
                self.requests.append(request)
                answer = await self.script(n, request)
                if answer is None:
                    return
                writer.write(answer)
                await writer.drain()
                if self.close_after_answer:
                    return
        finally:
            self.open -= 1
            writer.close()

    async def stop(self) -> None:
        self.server.close()


@contextlib.asynccontextmanager
async def serving(
    script: Script, close_after_answer: bool = False, **pool_args: float
) -> AsyncIterator[tuple[Scripted, str, UpstreamPool]]:
    """A scripted server, its URL and a pool, closed at the end."""
    srv = Scripted(script, close_after_answer)
    url = await srv.start()
    pool = UpstreamPool(**pool_args)  # type: ignore[arg-type]
    try:
        yield srv, url, pool
    finally:
        await pool.close()
        await srv.stop()


def ok(body: bytes = b"hello", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n%s\r\n%s" % (len(body), extra, body)


async def body_of(resp) -> bytes:  # type: ignore[no-untyped-def]
    try:
        return b"".join([c async for c in resp.chunks()])
    finally:
        resp.release()


def run(coro: Awaitable[None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 30))  # type: ignore[arg-type]


# -- against the fake model server -----------------------------------------------------------
@pytest.fixture(scope="module")
def model_url(tmp_path_factory: pytest.TempPathFactory) -> object:
    tmp: Path = tmp_path_factory.mktemp("upstream")
    proc, url = start_model_server(tmp, "llm", "--token-ms", "30")
    yield url
    proc.stop()


def test_keep_alive_connections_are_reused_and_bodies_arrive_whole(model_url: str) -> None:
    async def go() -> None:
        pool = UpstreamPool()
        try:
            for i in range(3):
                resp = await pool.request("POST", model_url, "/v1/chat/completions", JSON, CHAT)
                assert resp.status == 200 and resp.content_type == "application/json"
                doc = json.loads(await body_of(resp))
                assert doc["usage"] == {
                    "prompt_tokens": 3,
                    "completion_tokens": 5,
                    "total_tokens": 8,
                }
                assert resp.content_length is not None
                assert resp.conn.reused is (i > 0)
            assert pool._open == 1
        finally:
            await pool.close()

    run(go())


def test_a_stream_is_relayed_as_it_comes_not_when_it_ends(model_url: str) -> None:
    async def go() -> None:
        pool = UpstreamPool()
        body = b'{"stream": true, "max_tokens": 4, "stream_options": {"include_usage": true}}'
        resp = await pool.request("POST", model_url, "/v1/chat/completions", JSON, body)
        assert resp.status == 200 and resp.content_type.startswith("text/event-stream")
        got = []
        async for chunk in resp.chunks():
            got.append((chunk, resp.complete))
        resp.release()
        text = b"".join(c for c, _ in got)
        assert text.count(b"data: ") == 6 and text.endswith(b"data: [DONE]\n\n")
        assert not got[0][1]  # the first token came while the replica was still generating
        assert resp.conn.response is None and pool._idle  # a complete stream: reusable
        await pool.close()

    run(go())


def test_a_replica_dying_mid_stream_breaks_the_body_off(tmp_path: Path) -> None:
    proc, url = start_model_server(tmp_path, "dying", "--die-after", "3")

    async def go() -> None:
        pool = UpstreamPool()
        body = b'{"stream": true, "max_tokens": 10}'
        resp = await pool.request("POST", url, "/v1/chat/completions", JSON, body)
        got = []
        with pytest.raises(UpstreamError, match=r"mid-response|lost"):
            async for chunk in resp.chunks():
                got.append(chunk)
        resp.release()
        assert b"".join(got).count(b"tok") == 3
        await pool.close()

    try:
        run(go())
    finally:
        proc.stop()


# -- against scripted servers ----------------------------------------------------------------
def test_a_chunked_body_is_decoded_chunk_by_chunk() -> None:
    async def script(n: int, req: bytes) -> bytes:
        return (
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
        )

    async def go() -> None:
        async with serving(script) as (srv, url, pool):
            for _ in range(2):
                resp = await pool.request("GET", url, "/x", [], b"")
                assert resp.content_length is None
                assert await body_of(resp) == b"hello world"
            assert srv.connections == 1  # the terminating chunk ended it: reused

    run(go())


def test_a_body_without_length_ends_with_the_connection_which_is_not_reused() -> None:
    async def script(n: int, req: bytes) -> bytes:
        return b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nall of it"

    async def go() -> None:
        async with serving(script, close_after_answer=True) as (srv, url, pool):
            for _ in range(2):
                resp = await pool.request("GET", url, "/x", [], b"")
                assert await body_of(resp) == b"all of it"
            assert srv.connections == 2

    run(go())


def test_connection_close_is_honoured_and_head_has_no_body() -> None:
    async def script(n: int, req: bytes) -> bytes:
        if req.startswith(b"HEAD"):
            return b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n"
        return ok(extra=b"connection: close\r\n")

    async def go() -> None:
        async with serving(script) as (srv, url, pool):
            resp = await pool.request("GET", url, "/x", [("x-a", "1")], b"")
            assert await body_of(resp) == b"hello"
            resp = await pool.request("HEAD", url, "/x", [], b"")
            assert resp.content_length == 100 and await body_of(resp) == b""
            assert srv.connections == 2
            assert srv.requests[0].startswith(b"GET /x HTTP/1.1\r\nhost: 127.0.0.1:")
            assert b"x-a: 1\r\n" in srv.requests[0] and b"content-length" not in srv.requests[0]

    run(go())


def test_an_idle_connection_the_replica_closed_is_not_used_a_post_goes_on_a_fresh_one() -> None:
    async def script(n: int, req: bytes) -> bytes:
        return ok(b"#%d" % n)

    async def go() -> None:
        # the replica closes each connection after its answer
        async with serving(script, close_after_answer=True) as (srv, url, pool):
            resp = await pool.request("POST", url, "/x", [], b"a")
            assert await body_of(resp) == b"#0"
            await asyncio.sleep(0.05)  # the replica's close arrives while the connection idles
            resp = await pool.request("POST", url, "/x", [], b"b")
            assert await body_of(resp) == b"#1" and not resp.conn.reused
            assert len(srv.requests) == 2  # sent once each

    run(go())


@pytest.mark.parametrize(("method", "retried"), [("POST", False), ("GET", True)])
def test_a_reused_connection_dying_without_an_answer_is_retried_only_if_idempotent(
    method: str, retried: bool
) -> None:
    async def script(n: int, req: bytes) -> bytes | None:
        return None if n == 1 else ok(b"#%d" % n)  # the second request: closed, no answer

    async def go() -> None:
        async with serving(script) as (srv, url, pool):
            assert await body_of(await pool.request(method, url, "/x", [], b"")) == b"#0"
            if retried:
                resp = await pool.request(method, url, "/x", [], b"")
                assert await body_of(resp) == b"#2" and srv.connections == 2
            else:
                with pytest.raises(UpstreamError):
                    await pool.request(method, url, "/x", [], b"")
                assert len(srv.requests) == 2  # the POST the replica may have run: not resent

    run(go())


def test_no_answer_times_out_and_a_refused_connection_is_a_connect_error() -> None:
    async def script(n: int, req: bytes) -> bytes:
        await asyncio.sleep(5)
        return ok()

    async def go() -> None:
        async with serving(script, read_timeout_s=0.2) as (_srv, url, pool):
            with pytest.raises(UpstreamTimeout):
                await pool.request("GET", url, "/x", [], b"")
            with pytest.raises(ConnectError):
                await pool.request("GET", f"http://127.0.0.1:{free_port()}", "/x", [], b"")
            assert pool._open <= 1  # the timed-out connection is closing

    run(go())


def test_the_connection_limit_makes_requests_wait_for_a_free_connection() -> None:
    async def script(n: int, req: bytes) -> bytes:
        await asyncio.sleep(0.05)
        return ok(b"#%d" % n)

    async def go() -> None:
        async with serving(script, limit=2) as (srv, url, pool):

            async def one() -> bytes:
                return await body_of(await pool.request("GET", url, "/x", [], b""))

            bodies = await asyncio.gather(*(one() for _ in range(6)))
            assert sorted(bodies) == sorted(b"#%d" % i for i in range(6))
            assert srv.max_open <= 2 and srv.connections == 2

    run(go())


def test_a_slow_reader_pauses_the_socket_and_gets_every_byte() -> None:
    big = bytes(range(256)) * 8192  # 2 MiB

    async def script(n: int, req: bytes) -> bytes:
        return ok(big)

    async def go() -> None:
        async with serving(script) as (_srv, url, pool):
            resp = await pool.request("GET", url, "/x", [], b"")
            got = bytearray()
            paused_seen = False
            async for chunk in resp.chunks():
                got += chunk
                paused_seen = paused_seen or resp._paused
                await asyncio.sleep(0.001)
            resp.release()
            assert bytes(got) == big and paused_seen

    run(go())


def test_a_malformed_answer_and_a_non_http_replica_are_errors() -> None:
    async def script(n: int, req: bytes) -> bytes:
        return b"SMTP ready\r\n\r\n"

    async def go() -> None:
        async with serving(script) as (_srv, url, pool):
            with pytest.raises(UpstreamError, match="malformed"):
                await pool.request("GET", url, "/x", [], b"")
            with pytest.raises(UpstreamError, match=r"only http://"):
                await pool.request("GET", "https://example.invalid", "/x", [], b"")

    run(go())
