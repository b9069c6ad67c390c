"""A real Prometheus for tests: scrapes the given targets every second and answers
instant queries. Debian's ``prometheus`` package (``make system-deps``) provides it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from gpucloud.testing.net import free_port

BINARY = shutil.which("prometheus")


class Prometheus:
    """``with Prometheus(workdir, {"job": "127.0.0.1:9400"}) as prom: prom.query(...)``"""

    def __init__(self, workdir: Path, jobs: dict[str, str], binary: str | None = None) -> None:
        self.workdir = workdir
        self.jobs = jobs
        self.binary = binary or BINARY
        self.port = free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Prometheus:
        if self.binary is None:
            raise RuntimeError("prometheus is not installed (make system-deps)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "prometheus.yml"
        scrapes = "".join(
            f"  - job_name: {job}\n    static_configs:\n      - targets: ['{target}']\n"
            for job, target in self.jobs.items()
        )
        config.write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n" + scrapes
        )
        with (self.workdir / "prometheus.log").open("wb") as log:
            self._proc = subprocess.Popen(
                [
                    self.binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={self.workdir / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(30)

    def query(self, q: str) -> list[dict[str, Any]]:
        """The result of an instant query; empty while Prometheus is still starting (no
        listener yet, or a 503 while it opens its storage)."""
        try:
            r = httpx.get(
                f"http://127.0.0.1:{self.port}/api/v1/query", params={"query": q}, timeout=5
            )
        except httpx.TransportError:
            return []
        if r.status_code == 503:
            return []
        r.raise_for_status()
        return list(r.json()["data"]["result"])

    def value(self, q: str) -> float | None:
        """The single sample's value, or None unless there is exactly one."""
        result = self.query(q)
        return float(result[0]["value"][1]) if len(result) == 1 else None
