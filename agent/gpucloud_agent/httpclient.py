"""The agent's HTTP client for the metering API, on the standard library (``http.client``).

httpx cost the agent 7 MiB of memory (issue 20) for three kinds of call: the shipper's
POSTs and the wiper's and image copier's GETs and POSTs. This client keeps idle
keep-alive connections per origin (the shipper's and the wiper's threads share it),
speaks TLS for ``https://`` URLs (the system's CA store, or ``SSL_CERT_FILE``/
``SSL_CERT_DIR``, through ``ssl.create_default_context``) and applies one timeout to
connecting and to every read and write, as ``httpx.Client(timeout=...)`` did.

A server closes idle keep-alive connections (uvicorn after 5 s): an idle connection that
the server has closed is dropped before use, and a request whose reused connection turns
out to be closed is sent once more on a new one. Every request the agent makes is
idempotent (usage records have natural keys; wipe and copy reports state a result), so
the second send is safe even when the first reached the server.
"""

from __future__ import annotations

import http.client
import json as jsonlib
import select
import ssl
import threading
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit


class HTTPError(Exception):
    """No answer: the connection was refused or reset, timed out, or the answer was broken."""


@dataclass(frozen=True)
class Response:
    status_code: int
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")

    def json(self) -> Any:
        """The body as JSON; ValueError if it is not."""
        return jsonlib.loads(self.content)


Origin = tuple[str, str, int]


def _dropped(conn: http.client.HTTPConnection) -> bool:
    """Whether the server closed an idle connection: it is readable (EOF, or bytes no
    request asked for)."""
    sock = conn.sock
    if sock is None:
        return True
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


class HttpClient:
    def __init__(self, timeout_s: float = 10.0, ssl_context: ssl.SSLContext | None = None) -> None:
        """``ssl_context``: for https:// (default: the system's CA store)."""
        self.timeout_s = timeout_s
        self._idle: dict[Origin, list[http.client.HTTPConnection]] = {}
        self._lock = threading.Lock()  # guards _idle; a request holds its connection alone
        self._ssl_context = ssl_context

    def _connection(self, origin: Origin) -> http.client.HTTPConnection:
        scheme, host, port = origin
        if scheme == "http":
            return http.client.HTTPConnection(host, port, timeout=self.timeout_s)
        if self._ssl_context is None:
            self._ssl_context = ssl.create_default_context()
        return http.client.HTTPSConnection(
            host, port, timeout=self.timeout_s, context=self._ssl_context
        )

    def _take(self, origin: Origin) -> http.client.HTTPConnection | None:
        """An idle connection to ``origin`` that the server has not closed, if any."""
        while True:
            with self._lock:
                idle = self._idle.get(origin)
                if not idle:
                    return None
                conn = idle.pop()
            if not _dropped(conn):
                return conn
            conn.close()

    def _put(self, origin: Origin, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            self._idle.setdefault(origin, []).append(conn)

    def request(
        self,
        method: str,
        url: str,
        json: Any = None,
        headers: dict[str, str] | None = None,
    ) -> Response:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{url!r}: not an http:// or https:// URL")
        default_port = 443 if parts.scheme == "https" else 80
        origin = (parts.scheme, parts.hostname, parts.port or default_port)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        sent = dict(headers or {})
        body = None
        if json is not None:
            # as httpx encodes json=: compact, UTF-8
            body = jsonlib.dumps(json, ensure_ascii=False, separators=(",", ":"),
                                 allow_nan=False).encode()  # fmt: skip
            sent["Content-Type"] = "application/json"
        conn = self._take(origin)
        while True:
            reused = conn is not None
            if conn is None:
                conn = self._connection(origin)
            try:
                conn.request(method, target, body, sent)
                resp = conn.getresponse()
                content = resp.read()
            except ConnectionError as exc:
                conn.close()
                conn = None
                if reused:  # closed by the server since its last answer: once more
                    continue
                raise HTTPError(f"{method} {url}: {type(exc).__name__}: {exc}") from exc
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                raise HTTPError(f"{method} {url}: {type(exc).__name__}: {exc}") from exc
            if resp.will_close:
                conn.close()
            else:
                self._put(origin, conn)
            return Response(resp.status, content)

    def get(self, url: str, headers: dict[str, str] | None = None) -> Response:
        return self.request("GET", url, headers=headers)

    def post(self, url: str, json: Any = None, headers: dict[str, str] | None = None) -> Response:
        return self.request("POST", url, json=json, headers=headers)

    def close(self) -> None:
        """Close the idle connections (one in use is closed by its request's end)."""
        with self._lock:
            conns = [c for idle in self._idle.values() for c in idle]
            self._idle.clear()
        for conn in conns:
            conn.close()
