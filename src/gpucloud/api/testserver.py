"""Run the API as a real uvicorn process on 127.0.0.1 (tests, benchmarks, demos).

Authentication is the static token table (demo/tests only) written next to the
database; the sandbox payment provider is on with a known secret.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from gpucloud.testing.net import free_port

SANDBOX_SECRET = "sandbox-test-secret"
AGENT_SA = "system:serviceaccount:gpucloud-system:gpucloud-agent"

# token -> principal spec (see gpucloud.api.main.load_static_tokens)
DEFAULT_TOKENS: dict[str, dict[str, Any]] = {
    "admin-token": {"username": "alice-admin", "groups": ["gpucloud:admins"]},
    "tenant-token": {"username": "bob", "accounts": ["acme"]},
    "stranger-token": {"username": "mallory", "accounts": ["evil"]},
}


def agent_token(node: str) -> str:
    return f"agent-{node}"


class ApiProcess:
    """A ``gpucloud-api`` child process. ``start()`` waits until /readyz answers."""

    def __init__(
        self,
        workdir: Path,
        database_url: str | None = None,
        nodes: list[str] | None = None,
        clock: str = "system",
        extra_args: list[str] | None = None,
        extra_env: dict[str, str] | None = None,
        static_tokens: bool = True,
    ) -> None:
        """``static_tokens=False``: authenticate as ``extra_args`` say (e.g. --kubeconfig)."""
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.database_url = database_url or f"sqlite:///{self.workdir / 'ledger.db'}"
        self.clock = clock
        self.port = free_port()
        self.ops_port = free_port()
        self.extra_args = extra_args or []
        self.extra_env = extra_env or {}
        tokens = dict(DEFAULT_TOKENS)
        for node in nodes or ["node-a", "node-b"]:
            tokens[agent_token(node)] = {"username": AGENT_SA, "node": node}
        self.tokens_path = self.workdir / "tokens.yaml"
        self.tokens_path.write_text(yaml.safe_dump(tokens))
        self.static_tokens = static_tokens
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.workdir / f"api-{self.port}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ops_url(self) -> str:
        """/metrics, /healthz, /readyz (the operational port)."""
        return f"http://127.0.0.1:{self.ops_port}"

    def _sandbox_secret_file(self) -> Path:
        """The secret travels in a file, as in production, never as an argument."""
        path = self.workdir / "sandbox-secret"
        path.write_text(SANDBOX_SECRET)
        return path

    def start(self, timeout_s: float = 30.0) -> ApiProcess:
        cmd = [
            sys.executable, "-m", "gpucloud.api.main",
            "--port", str(self.port),
            "--ops-port", str(self.ops_port),
            "--database-url", self.database_url,
            "--clock", self.clock,
            "--sandbox-secret-file", str(self._sandbox_secret_file()),
            "--voucher-dir", str(self.workdir / "vouchers"),
            *self.extra_args,
        ]  # fmt: skip
        if self.static_tokens:
            cmd += ["--static-tokens", str(self.tokens_path)]
        env = {**os.environ, **self.extra_env}
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"API exited with {self.proc.returncode}:\n{self.log()}")
            try:
                ok = httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200
                if ok and httpx.get(f"{self.ops_url}/readyz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.kill()
        raise TimeoutError(f"API not ready after {timeout_s} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def kill(self) -> None:
        """SIGKILL: no shutdown handlers run (the crash test)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> ApiProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
