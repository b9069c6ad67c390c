"""Unary gRPC calls over one persistent HTTP/2 connection on a unix socket.

gRPC is HTTP/2 (grpc's doc/PROTOCOL-HTTP2.md): a call is a POST to
``/<service>/<method>`` with ``content-type: application/grpc``, the request and the
response each a length-prefixed message (a flag byte, 0 = uncompressed, and a 4-byte
big-endian length), and the outcome in the trailers' ``grpc-status`` (0 = OK) and
``grpc-message``; an error before any message comes as one HEADERS frame holding both
("trailers-only").

The HTTP/2 framing (RFC 9113) is done here, for this one use: the client sends only
its preface and SETTINGS, one HEADERS and one DATA frame per call, PING and SETTINGS
acknowledgements and WINDOW_UPDATEs. It decodes every header block the server sends
with ``hpack`` (whose dynamic table must see each one, in order). Flow control: the
client opens a 32 MiB window for each stream and for the connection and tops the
connection's up after each call, so a response of up to ``MAX_MESSAGE_BYTES`` flows
without waiting for window updates. The ``h2`` package did the same in 3.5 times the
CPU per call (issue 20, docs/benchmarks.md).

The connection stays open between calls. Before each call, what the server sent
meanwhile is read (PINGs are answered); a connection the server closed or said GOAWAY
on is replaced, and a call that fails on a connection that had served earlier calls is
made once more on a new one (the kubelet restarted). Only idempotent calls belong here:
List is a read.
"""

from __future__ import annotations

import socket
import time
from urllib.parse import unquote

import hpack

MAX_MESSAGE_BYTES = 16 << 20  # gRPC's own clients default to 4 MiB
WINDOW = 32 << 20  # the receive window the client opens (> a whole message)
MAX_FRAME = 16384  # SETTINGS_MAX_FRAME_SIZE: the client keeps the default
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# frame types and flags
DATA, HEADERS, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, CONTINUATION = (
    0, 1, 3, 4, 5, 6, 7, 9)  # fmt: skip
WINDOW_UPDATE = 8
END_STREAM = ACK = 0x1
END_HEADERS, PADDED, PRIORITY = 0x4, 0x8, 0x20
# settings: SETTINGS_ENABLE_PUSH = 0, SETTINGS_INITIAL_WINDOW_SIZE = WINDOW
_SETTINGS = (2).to_bytes(2, "big") + (0).to_bytes(4, "big") + (4).to_bytes(2, "big") + (
    WINDOW.to_bytes(4, "big"))  # fmt: skip
# the names of gRPC's status codes, for messages
STATUS = ("OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
          "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
          "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
          "UNAUTHENTICATED")  # fmt: skip

Frame = tuple[int, int, int, bytes]  # type, flags, stream, payload


class RpcError(RuntimeError):
    """The call failed: the message says how (the socket, HTTP/2, or the gRPC status)."""


class _Closed(Exception):
    """The connection is gone (EOF, GOAWAY): worth one more try on a new one."""


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return len(payload).to_bytes(3, "big") + bytes((kind, flags)) + stream.to_bytes(4, "big") + (
        payload)  # fmt: skip


def _hpack_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def request_headers(path: str) -> bytes:
    """The header block of a call to ``path``: literals that are never indexed (so the
    same bytes serve every call, whatever the server's HPACK table holds), no Huffman."""
    headers = [(":method", "POST"), (":scheme", "http"), (":path", path),
               (":authority", "localhost"), ("content-type", "application/grpc"),
               ("te", "trailers")]  # fmt: skip
    out = bytearray()
    for name, value in headers:
        out.append(0x10)  # literal never indexed, new name
        for text in (name.encode(), value.encode()):
            out += _hpack_int(len(text), 7) + text
    return bytes(out)


def _unpad(flags: int, payload: bytes, priority: bool = False) -> bytes:
    """A DATA or HEADERS payload without its padding (and a HEADERS' priority fields)."""
    start, end = 0, len(payload)
    if flags & PADDED:
        if not payload or payload[0] >= len(payload):
            raise RpcError("HTTP/2 protocol error: padding longer than the frame")
        start, end = 1, end - payload[0]
    if priority and flags & PRIORITY:
        start += 5
    return payload[start:end]


class _Connection:
    def __init__(self, path: str, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.settimeout(timeout_s)
            self.sock.connect(path)
            # the connection's window starts at 65535 whatever SETTINGS say: widened
            widen = frame(WINDOW_UPDATE, 0, 0, (WINDOW - 65535).to_bytes(4, "big"))
            self.sock.sendall(PREFACE + frame(SETTINGS, 0, 0, _SETTINGS) + widen)
        except BaseException:
            self.sock.close()
            raise
        self.decoder = hpack.Decoder()
        self.buf = bytearray()
        self.next_stream = 1
        self.block = bytearray()  # a header block whose CONTINUATION frames are due
        self.block_stream = 0

    def _recv(self, timeout: float) -> None:
        """Add what the socket holds to the buffer, waiting up to ``timeout`` seconds for
        it (0: not at all, BlockingIOError if there is nothing)."""
        self.sock.settimeout(timeout)  # 0.0: non-blocking
        try:
            data = self.sock.recv(65536)
        finally:
            self.sock.settimeout(self.timeout_s)
        if not data:
            raise _Closed("the server closed the connection")
        self.buf += data

    def _parse(self) -> list[Frame]:
        frames, pos, buf = [], 0, self.buf
        while len(buf) - pos >= 9:
            length = int.from_bytes(buf[pos : pos + 3], "big")
            if length > MAX_FRAME:
                raise RpcError(f"HTTP/2 protocol error: a frame of {length} bytes")
            if len(buf) - pos < 9 + length:
                break
            stream = int.from_bytes(buf[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
            payload = bytes(buf[pos + 9 : pos + 9 + length])
            frames.append((buf[pos + 3], buf[pos + 4], stream, payload))
            pos += 9 + length
        del buf[:pos]
        return frames

    def _headers(
        self, kind: int, flags: int, stream: int, payload: bytes
    ) -> list[tuple[str, str]] | None:
        """Collect a header block; decoded once complete (every block, whatever its
        stream: the HPACK table changes with each)."""
        if kind == HEADERS:
            if self.block_stream:
                raise RpcError("HTTP/2 protocol error: HEADERS inside a header block")
            self.block_stream = stream
            self.block += _unpad(flags, payload, priority=True)
        elif stream != self.block_stream:
            raise RpcError("HTTP/2 protocol error: CONTINUATION of another stream")
        else:
            self.block += payload
        if not flags & END_HEADERS:
            return None
        try:
            headers = self.decoder.decode(bytes(self.block))
        except hpack.HPACKError as exc:
            raise RpcError(f"HPACK error: {exc}") from exc
        self.block.clear()
        self.block_stream = 0
        return headers  # type: ignore[return-value]

    def _control(self, kind: int, flags: int, stream: int, payload: bytes) -> None:
        """A frame about the connection, or of a stream no call waits for."""
        if kind == SETTINGS and not flags & ACK:
            # nothing in them changes what this client sends (frames far below any
            # limit, no HPACK indexing): acknowledged
            self.sock.sendall(frame(SETTINGS, ACK, 0))
        elif kind == PING and not flags & ACK:
            self.sock.sendall(frame(PING, ACK, 0, payload))
        elif kind == GOAWAY:
            code = int.from_bytes(payload[4:8], "big") if len(payload) >= 8 else -1
            raise _Closed(f"GOAWAY from the server (HTTP/2 error {code})")
        elif kind == PUSH_PROMISE:
            raise RpcError("HTTP/2 protocol error: PUSH_PROMISE, though push is disabled")
        # WINDOW_UPDATE, PRIORITY, RST_STREAM and DATA of streams done, unknown types:
        # nothing to do (HTTP/2 says to ignore unknown frame types)

    def catch_up(self) -> None:
        """Handle what the server sent since the last call, without waiting."""
        while True:
            try:
                self._recv(0.0)
            except BlockingIOError:
                break
        for kind, flags, stream, payload in self._parse():
            if kind in (HEADERS, CONTINUATION):
                self._headers(kind, flags, stream, payload)
            else:
                self._control(kind, flags, stream, payload)

    def call(self, headers: bytes, request: bytes, deadline: float) -> tuple[dict[str, str], bytes]:
        """Headers and trailers merged, and the response body (length-prefixed)."""
        stream = self.next_stream
        self.next_stream += 2
        message = b"\0" + len(request).to_bytes(4, "big") + request
        self.sock.sendall(frame(HEADERS, END_HEADERS, stream, headers)
                          + frame(DATA, END_STREAM, stream, message))  # fmt: skip
        meta: dict[str, str] = {}
        body = bytearray()
        received = 0  # flow-controlled bytes, given back to the connection's window after
        ended = False
        while not ended:
            frames = self._parse()
            if not frames:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                self._recv(left)
                continue
            for kind, flags, sid, payload in frames:
                if kind in (HEADERS, CONTINUATION):
                    block = self._headers(kind, flags, sid, payload)
                    if sid == stream:
                        if kind == HEADERS and flags & END_STREAM:
                            ended = True  # once the block is whole
                        if block is not None:
                            meta.update(block)
                elif kind == DATA:
                    received += len(payload)
                    if sid == stream:
                        body += _unpad(flags, payload)
                        if len(body) > MAX_MESSAGE_BYTES + 5:
                            raise RpcError(f"response larger than {MAX_MESSAGE_BYTES} bytes")
                        ended = ended or bool(flags & END_STREAM)
                elif kind == RST_STREAM and sid == stream:
                    code = int.from_bytes(payload[:4], "big")
                    raise RpcError(f"the server reset the stream (HTTP/2 error {code})")
                else:
                    self._control(kind, flags, sid, payload)
            ended = ended and not self.block_stream
        if received:
            self.sock.sendall(frame(WINDOW_UPDATE, 0, 0, received.to_bytes(4, "big")))
        return meta, bytes(body)

    def close(self) -> None:
        self.sock.close()


def _message(meta: dict[str, str], body: bytes) -> bytes:
    """The one response message of an OK call; RpcError for anything else."""
    if meta.get(":status") != "200":
        raise RpcError(f"HTTP status {meta.get(':status')}, not a gRPC answer")
    code = meta.get("grpc-status")
    if code is None:
        raise RpcError("the answer has no grpc-status")
    if code != "0":
        name = STATUS[int(code)] if code.isdigit() and int(code) < len(STATUS) else code
        detail = unquote(meta.get("grpc-message", ""))  # percent-encoded on the wire
        raise RpcError(f"{name}: {detail}" if detail else name)
    if len(body) < 5 or body[0] != 0:
        raise RpcError("the answer is not one uncompressed message")
    length = int.from_bytes(body[1:5], "big")
    if len(body) != 5 + length:
        raise RpcError(f"the answer holds {len(body) - 5} bytes for a message of {length}")
    return body[5:]


class UnaryChannel:
    """Unary calls to the gRPC server on ``socket_path``; not thread-safe (the sampler
    is its one caller)."""

    def __init__(self, socket_path: str, timeout_s: float = 2.0) -> None:
        self.socket_path = socket_path
        self.timeout_s = timeout_s
        self._conn: _Connection | None = None
        self._headers: dict[str, bytes] = {}

    def call(self, path: str, request: bytes = b"") -> bytes:
        headers = self._headers.get(path)
        if headers is None:
            headers = self._headers[path] = request_headers(path)
        deadline = time.monotonic() + self.timeout_s
        while True:
            reused = self._conn is not None
            try:
                if self._conn is None:
                    self._conn = _Connection(self.socket_path, self.timeout_s)
                else:
                    self._conn.catch_up()
                meta, body = self._conn.call(headers, request, deadline)
            except (_Closed, ConnectionError) as exc:
                self.close()
                if reused:  # it had served earlier calls: the server restarted
                    continue
                why = str(exc) if isinstance(exc, _Closed) else f"{type(exc).__name__}: {exc}"
                raise RpcError(why) from exc
            except TimeoutError as exc:
                self.close()
                raise RpcError(f"no answer within {self.timeout_s:g} s") from exc
            except OSError as exc:
                self.close()
                raise RpcError(f"{type(exc).__name__}: {exc}") from exc
            except RpcError:
                self.close()
                raise
            return _message(meta, body)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
