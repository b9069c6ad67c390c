"""The proxy's upstream client: pooled keep-alive HTTP/1.1 on httptools' response parser.

aiohttp's client cost about a third of the gateway's CPU per proxied request (issue 20);
this one does what the proxy needs and no more: it writes the request in one go, parses
the response with the C parser uvicorn uses, and hands the body over chunk by chunk as
it arrives (chunked, content-length, read-to-close, server-sent events), pausing the
socket while the caller is slower than the replica. Bodies are never decoded.

A connection goes back to its pool only after a complete response that allows keep-alive;
an idle one is dropped after ``KEEPALIVE_S`` (below the 5 s model servers on uvicorn
keep it), so a replica closing an idle connection rarely meets a new request. A request
is retried on a fresh connection only when no byte of it can have been processed: the
pooled connection was found closed before anything was written, or it died without a
byte of answer and the method is idempotent (a POST a replica may have run is never
sent twice).
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator
from typing import Any

import httptools

KEEPALIVE_S = 4.0
# The socket pauses while this much of a body waits for the caller to take it.
HIGH_WATER = 256 * 1024
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})


class UpstreamError(Exception):
    """The replica could not be reached, or its answer broke off or was malformed."""


class ConnectError(UpstreamError):
    """No connection: nothing was sent (another replica may take the request)."""


class UpstreamTimeout(UpstreamError, TimeoutError):
    """No byte from the replica within the read timeout."""


class _Conn(asyncio.Protocol):
    """One connection and the response being read from it (parser callbacks included)."""

    def __init__(self, pool: UpstreamPool, key: tuple[str, int]) -> None:
        self.pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reused = False
        self.idle_since = 0.0
        self.response: Response | None = None

    # -- asyncio.Protocol --------------------------------------------------------------------
    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        resp = self.response
        if resp is None:  # bytes nobody asked for: this connection cannot be reused
            self.close()
            return
        resp.received = True
        try:
            resp.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            resp.fail(UpstreamError(f"malformed response: {exc}"))
            self.close()

    def eof_received(self) -> bool:
        resp = self.response
        if resp is not None and not resp.complete:
            if resp.headers_done and resp.until_close:  # a body that ends with the connection
                resp.on_message_complete()
            else:
                resp.fail(UpstreamError("the replica closed the connection mid-response"))
        self.closed = True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool._forget(self)
        resp = self.response
        if resp is not None and not resp.complete:
            resp.fail(UpstreamError(f"connection to the replica lost: {exc or 'closed'}"))

    def pause_writing(self) -> None:  # requests are written whole; the kernel buffers them
        pass

    def resume_writing(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class Response:
    """A response being received: status and headers at once, the body as it arrives."""

    def __init__(self, conn: _Conn, method: str, timeout_s: float) -> None:
        self.conn = conn
        self.head = method == "HEAD"
        self.timeout_s = timeout_s
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.content_length: int | None = None
        self.content_type = ""
        self.until_close = False  # no length, not chunked: the body ends with the connection
        self.received = False  # any byte of answer (retry rule)
        self.headers_done = False
        self.keep_alive = False
        self.complete = False
        self.error: Exception | None = None
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._released = False

    # -- parser callbacks ----------------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        self.raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:  # interim (100 Continue): the real one follows
            self.raw_headers = []
            return
        self.status = status
        self.keep_alive = self.parser.should_keep_alive()  # llhttp forgets it at the end
        chunked = False
        for name, value in self.raw_headers:
            lname = name.lower()
            if lname == b"content-length":
                self.content_length = int(value)
            elif lname == b"content-type":
                self.content_type = value.decode("latin-1")
            elif lname == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
        if chunked:
            self.content_length = None
        no_body = self.head or status in (101, 204, 304)
        self.until_close = not chunked and self.content_length is None and not no_body
        self.headers_done = True
        if self.head:  # the parser would wait for the announced length's bytes
            self.on_message_complete()
        else:
            self._wake()

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > HIGH_WATER and not self._paused and self.conn.transport is not None:
            self._paused = True
            self.conn.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if not self.headers_done:  # the end of an interim response
            return
        self.complete = True
        self._wake()

    # -- state -------------------------------------------------------------------------------
    def fail(self, exc: Exception) -> None:
        if self.error is None:
            self.error = exc
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def _wait(self) -> None:
        loop = asyncio.get_running_loop()
        self._waiter = loop.create_future()
        timer = loop.call_later(self.timeout_s, self._timed_out, self._waiter)
        try:
            await self._waiter
        finally:
            timer.cancel()
            self._waiter = None

    def _timed_out(self, waiter: asyncio.Future[None]) -> None:
        if not waiter.done():
            self.fail(UpstreamTimeout(f"no answer from the replica within {self.timeout_s:g}s"))

    async def _headers(self) -> None:
        while not self.headers_done:
            if self.error is not None:
                raise self.error
            await self._wait()

    def header(self, name: str) -> str | None:
        """The first value of a header (``name`` in lower case)."""
        key = name.encode()
        for k, v in self.raw_headers:
            if k.lower() == key:
                return v.decode("latin-1")
        return None

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body's bytes as they come (raises ``UpstreamError`` if it breaks off)."""
        while True:
            if self._chunks:
                chunk = self._chunks.popleft()
                self._buffered -= len(chunk)
                if self._paused and self._buffered <= HIGH_WATER // 4:
                    self._paused = False
                    if self.conn.transport is not None:
                        self.conn.transport.resume_reading()
                yield chunk
            elif self.complete:
                return
            elif self.error is not None:
                raise self.error
            else:
                await self._wait()

    def is_eof(self) -> bool:
        """The whole body was received and taken."""
        return self.complete and not self._chunks

    def release(self) -> None:
        """Done with the response: a complete keep-alive one returns its connection to
        the pool, anything else closes it (a replica still generating stops)."""
        if self._released:
            return
        self._released = True
        conn = self.conn
        conn.response = None
        reusable = (
            self.is_eof()
            and not self.until_close
            and not self.head
            and self.error is None
            and self.keep_alive
        )
        conn.pool._put_back(conn, reusable)

    close = release  # the proxy's "cut" path: not complete, so the connection goes


class UpstreamPool:
    """Keep-alive connections per replica, at most ``limit`` open in all (then requests
    wait for one to be freed)."""

    def __init__(
        self, *, limit: int = 1000, connect_timeout_s: float = 5.0, read_timeout_s: float = 600.0
    ) -> None:
        self.limit = limit
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self._idle: dict[tuple[str, int], list[_Conn]] = {}
        self._open = 0
        self._slots: collections.deque[asyncio.Future[None]] = collections.deque()
        self._closed = False

    @staticmethod
    def split(base_url: str) -> tuple[str, int, str]:
        """``http://host:port`` -> (host, port, Host header value)."""
        if not base_url.startswith("http://"):
            raise UpstreamError(f"only http:// replicas are supported, got {base_url!r}")
        hostport = base_url[7:].rstrip("/")
        host, sep, port = hostport.rpartition(":")
        if not sep or not port.isdigit():
            return hostport.strip("[]"), 80, hostport
        return host.strip("[]"), int(port), hostport

    async def request(
        self,
        method: str,
        base_url: str,
        target: str,
        headers: list[tuple[str, str]],
        body: bytes,
    ) -> Response:
        """Send a request and return once the response's status and headers are in.
        ``target`` is the path and query; hop-by-hop headers are the caller's to drop."""
        host, port, host_header = self.split(base_url)
        key = (host, port)
        parts = [f"{method} {target} HTTP/1.1\r\nhost: {host_header}\r\n"]
        parts += [f"{k}: {v}\r\n" for k, v in headers]
        if body or method not in ("GET", "HEAD", "OPTIONS", "DELETE"):
            parts.append(f"content-length: {len(body)}\r\n")
        parts.append("\r\n")
        data = "".join(parts).encode("latin-1") + body
        for _ in range(3):  # a fresh connection ends the loop either way
            conn = await self._acquire(key)
            resp = Response(conn, method, self.read_timeout_s)
            conn.response = resp
            assert conn.transport is not None
            conn.transport.write(data)
            try:
                await resp._headers()
                return resp
            except UpstreamError:
                resp.release()
                if conn.reused and not resp.received and method in IDEMPOTENT:
                    continue  # a replica closing an idle connection; nothing was answered
                raise
            except BaseException:  # cancelled: the connection is in an unknown state
                resp.release()
                raise
        raise UpstreamError("the replica closed every pooled connection")  # pragma: no cover

    async def _acquire(self, key: tuple[str, int]) -> _Conn:
        while True:
            if self._closed:
                raise UpstreamError("the upstream pool is closed")
            idle = self._idle.get(key)
            now = time.monotonic()
            while idle:
                conn = idle.pop()
                if not conn.closed and now - conn.idle_since < KEEPALIVE_S:
                    conn.reused = True
                    return conn
                conn.close()  # found closed or too old: nothing was written to it
            if self._open < self.limit:
                break
            self._drop_idle()  # another replica's idle connection makes room
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._slots.append(fut)
            await fut  # a connection closed or went idle
        self._open += 1
        try:
            loop = asyncio.get_running_loop()
            async with asyncio.timeout(self.connect_timeout_s):
                _, conn = await loop.create_connection(lambda: _Conn(self, key), *key)
        except (OSError, TimeoutError) as exc:
            self._open -= 1
            self._free_slot()
            raise ConnectError(f"cannot connect to {key[0]}:{key[1]}: {exc!r}") from exc
        except BaseException:
            self._open -= 1
            self._free_slot()
            raise
        return conn

    def _put_back(self, conn: _Conn, reusable: bool) -> None:
        if reusable and not conn.closed and not self._closed:
            conn.idle_since = time.monotonic()
            self._idle.setdefault(conn.key, []).append(conn)
            self._free_slot()  # a waiter may take this idle one (or drop it)
        else:
            conn.close()  # connection_lost frees the slot

    def _forget(self, conn: _Conn) -> None:
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)
        self._open -= 1
        self._free_slot()

    def _drop_idle(self) -> bool:
        for idle in self._idle.values():
            if idle:
                idle.pop(0).close()
                return True
        return False

    def _free_slot(self) -> None:
        while self._slots:
            fut = self._slots.popleft()
            if not fut.done():
                fut.set_result(None)
                return

    async def close(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()
