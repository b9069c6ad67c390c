"""Helpers for the agent tests: a usage receiver and an agent process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

from gpucloud.testing.net import free_port
from gpucloud.usage import UsageBatch

REPO = Path(__file__).resolve().parents[2]


def send_json(handler: BaseHTTPRequestHandler, code: int, body: Any) -> None:
    """Answer a request of an http.server handler with ``body`` as JSON."""
    out = json.dumps(body).encode()
    handler.send_response(code)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(out)))
    handler.end_headers()
    handler.wfile.write(out)


def wait_for(cond: Callable[[], Any], timeout: float = 30, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = cond()
        except (httpx.HTTPError, OSError, ValueError):
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


class Receiver:
    """A minimal stand-in for `POST /v1/usage`: records by natural key, duplicates counted.

    Modes: "ok" (200), "unavailable" (503), "down" (the port refuses connections).
    ``refuse(record) -> rule | None`` refuses records one by one as the API does (207,
    or 422 when none is stored); ``poison(record) -> bool`` answers 500 to any batch that
    holds such a record (a bug the record triggers)."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.records: dict[str, dict[str, Any]] = {}
        self.duplicates = 0
        self.conflicts: list[tuple[dict[str, Any], dict[str, Any]]] = []
        self.requests = 0
        self.tokens: set[str] = set()
        self.mode = "ok"
        self.refuse: Callable[[dict[str, Any]], str | None] = lambda _: None
        self.poison: Callable[[dict[str, Any]], bool] = lambda _: False
        self.batches: list[int] = []  # size of each batch received
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _start(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.requests += 1
                if receiver.mode == "unavailable" or self.path != "/v1/usage":
                    self.send_response(503 if receiver.mode == "unavailable" else 404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                batch = UsageBatch.model_validate_json(body)  # the shared wire format
                dumped = [rec.model_dump(mode="json") for rec in batch.records]
                receiver.batches.append(len(dumped))
                if any(receiver.poison(d) for d in dumped):
                    self.send_response(500)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                accepted = duplicate = 0
                errors = []
                with receiver.lock:
                    receiver.tokens.add(self.headers.get("Authorization", ""))
                    for index, rec in enumerate(batch.records):
                        data = dumped[index]
                        rule = receiver.refuse(data)
                        if rule is not None:
                            errors.append(
                                {"index": index, "field": "node", "rule": rule, "message": rule}
                            )
                            continue
                        old = receiver.records.get(rec.natural_key)
                        if old is None:
                            receiver.records[rec.natural_key] = data
                            accepted += 1
                        elif old == data:
                            duplicate += 1
                            receiver.duplicates += 1
                        else:
                            receiver.conflicts.append((old, data))
                stored = accepted + duplicate
                out = {"accepted": accepted, "duplicates": duplicate, "errors": errors}
                send_json(self, 200 if not errors else 207 if stored else 422, out)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def set_mode(self, mode: str) -> None:
        if mode == "down" and self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        elif mode != "down" and self._server is None:
            self._start()
        self.mode = mode

    def close(self) -> None:
        self.set_mode("down")

    def snapshot(self) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.records.values())


class AgentProcess:
    """The agent as a real process (`python -m gpucloud_agent.main`)."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.args = args
        self.env = {**os.environ, **env}
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.metrics_port = int(args[args.index("--metrics-port") + 1])

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gpucloud_agent.main", *self.args],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=REPO,
            )

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.metrics_port}{path}"

    def state(self) -> dict[str, Any]:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"agent exited with {self.proc.returncode}: {self.log.read_text()}")
        return httpx.get(self.url("/debug/state"), timeout=2).json()

    def wait_ready(self, timeout: float = 60) -> None:
        def ready() -> bool:
            self.state()  # raises (with the log) if the process died
            return httpx.get(self.url("/readyz"), timeout=2).status_code == 200

        wait_for(ready, timeout, "agent /readyz")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


class ApiReceiver:
    """The project's real metering API as the receiver, on a real SQLite ledger.

    Modes: "ok" (running), "unavailable" (stopped with SIGTERM), "down" (SIGKILLed,
    possibly in the middle of an ingestion); "ok" again restarts it on the same port and
    database. What arrived is read back from the ledger."""

    def __init__(self, workdir: Path, node: str) -> None:
        from gpucloud.api.testserver import ApiProcess, agent_token

        self.api = ApiProcess(workdir, nodes=[node]).start()
        self.token = agent_token(node)
        self.mode = "ok"
        self.conflicts: list[Any] = []  # the API refuses conflicts; they would be missing
        self._ledger: Any = None

    @property
    def url(self) -> str:
        return self.api.url

    def set_mode(self, mode: str) -> None:
        if mode == self.mode:
            return
        if mode == "unavailable":
            self.api.stop()
        elif mode == "down":
            self.api.kill()
        else:
            self.api.start()
        self.mode = mode

    def close(self) -> None:
        if self._ledger is not None:
            self._ledger.close()
        self.api.stop()

    def snapshot(self) -> list[dict[str, Any]]:
        """Every GPU record the ledger holds (none is rated: no meter is open)."""
        from gpucloud.ledger import open_ledger

        if self._ledger is None:
            self._ledger = open_ledger(self.api.database_url)
        return [
            {
                "gpu": {"uuid": u.subject},
                "pod": {"uid": u.owner},
                "start": u.start,
                "end": u.end,
                "quantity": u.quantity,
            }
            for u in self._ledger.unrated_usage(limit=1_000_000)
            if u.kind == "gpu_time"
        ]


def make_pki(d: Path) -> None:
    """A CA (ca.crt), a server certificate for 127.0.0.1 (server.crt/.key) and a client
    certificate (client.crt/.key), all signed by it, made with openssl in ``d``."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=60)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key",
            "-out", "ca.crt", "-days", "1", "-subj", "/CN=test-ca")  # fmt: skip
    for name, ext in (
        ("server", "subjectAltName=IP:127.0.0.1"),
        ("client", "extendedKeyUsage=clientAuth"),
    ):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
                "-out", f"{name}.csr", "-subj", f"/CN={name}")  # fmt: skip
        (d / f"{name}.ext").write_text(ext + "\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", f"{name}.crt", "-days", "1",
                "-extfile", f"{name}.ext")  # fmt: skip
