"""The agent's standard-library HTTP client against real HTTP/1.1 servers: keep-alive,
connections the server closed, timeouts, refused connections and TLS."""

from __future__ import annotations

import json
import socket
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from agent_testkit import make_pki
from gpucloud_agent import httpclient
from gpucloud_agent.httpclient import HttpClient, HTTPError

from gpucloud.testing.net import free_port


class Server:
    """An HTTP/1.1 echo server that records which connection carried each request.
    ``close_after`` makes it close the connection after answering, without saying so
    (as a server whose keep-alive timeout ran out does)."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.connections: list[int] = []  # the client's port, per request
        self.bodies: list[tuple[str, str, dict[str, str], bytes]] = []
        self.close_after = False
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                server.connections.append(self.client_address[1])
                server.bodies.append((self.command, self.path, dict(self.headers), body))
                out = json.dumps({"path": self.path, "n": len(server.bodies)}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)
                if server.close_after:
                    self.close_connection = True

            do_GET = do_POST = _answer

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.http.daemon_threads = True
        if tls is not None:
            self.http.socket = tls.wrap_socket(self.http.socket, server_side=True)
        threading.Thread(target=self.http.serve_forever, daemon=True).start()
        scheme = "https" if tls else "http"
        self.url = f"{scheme}://127.0.0.1:{self.http.server_port}"

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server()
    yield s
    s.close()


def test_keeps_the_connection_alive_and_sends_json(server: Server) -> None:
    client = HttpClient()
    resp = client.post(f"{server.url}/v1/usage?x=1", json={"records": ["é"]},
                       headers={"Authorization": "Bearer t"})  # fmt: skip
    assert resp.status_code == 200 and resp.json() == {"path": "/v1/usage?x=1", "n": 1}
    assert client.get(f"{server.url}/b").json()["n"] == 2
    assert len(set(server.connections)) == 1  # one connection for both
    method, _, headers, body = server.bodies[0]
    assert method == "POST" and headers["Authorization"] == "Bearer t"
    assert headers["Content-Type"] == "application/json"
    assert body == '{"records":["é"]}'.encode()  # compact UTF-8, as httpx sent it
    client.close()


def test_a_connection_the_server_closed_is_replaced(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = HttpClient()
    server.close_after = True
    assert client.get(f"{server.url}/a").status_code == 200
    # seen closed before use: a new connection
    assert client.get(f"{server.url}/b").status_code == 200
    assert len(set(server.connections)) == 2
    # closed after the check (a race): the request fails on it and is sent once more
    monkeypatch.setattr(httpclient, "_dropped", lambda conn: False)
    assert client.get(f"{server.url}/c").json()["path"] == "/c"
    assert len(set(server.connections)) == 3
    assert [p for _, p, _, _ in server.bodies] == ["/a", "/b", "/c"]
    client.close()


def test_no_answer_is_an_http_error_naming_the_url() -> None:
    port = free_port()
    with pytest.raises(HTTPError, match=rf"POST http://127\.0\.0\.1:{port}/v1/usage: "):
        HttpClient().post(f"http://127.0.0.1:{port}/v1/usage", json={})
    # a server that accepts and never answers: the timeout
    with socket.create_server(("127.0.0.1", 0)) as silent:
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/x"
        with pytest.raises(HTTPError, match="timed out"):
            HttpClient(timeout_s=0.3).get(url)
    with pytest.raises(ValueError, match="not an http:// or https:// URL"):
        HttpClient().get("unix:///x")


def test_https_trusts_the_system_store_or_ssl_cert_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_pki(tmp_path)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(tmp_path / "server.crt", tmp_path / "server.key")
    server = Server(tls)
    try:
        monkeypatch.delenv("SSL_CERT_FILE", raising=False)
        with pytest.raises(HTTPError, match="CERTIFICATE_VERIFY_FAILED"):
            HttpClient().get(f"{server.url}/a")  # a CA nobody trusts
        monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.crt"))
        client = HttpClient()
        assert client.get(f"{server.url}/a").json()["path"] == "/a"
        assert client.post(f"{server.url}/b", json={}).json()["path"] == "/b"
        assert len(set(server.connections)) == 1
        client.close()
    finally:
        server.close()
