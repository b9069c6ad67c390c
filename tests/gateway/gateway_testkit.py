"""Helpers for the gateway tests: real processes on 127.0.0.1, waited on by condition."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import yaml

from gpucloud.billing import PriceBook
from gpucloud.crd.pricebook import price_book
from gpucloud.testing.model_prices import PRICEBOOK_SPEC, PRODUCT  # noqa: F401 (re-exported)
from gpucloud.testing.net import free_port


def pricebook() -> PriceBook:
    return price_book(PRICEBOOK_SPEC)


def wait_for(cond: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = cond()
        except (httpx.HTTPError, OSError, ValueError):
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


class Proc:
    """A child process in its own session, killed with its children at the end."""

    ops_url = ""  # a gateway's operational port (/metrics, /v1/stats)

    def __init__(self, argv: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log = log
        self._fh = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            argv,
            stdout=self._fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, sig)
                self.popen.wait(10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(5)
        self._fh.close()

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start_model_server(tmp: Path, name: str, *extra: str) -> tuple[Proc, str]:
    port_file = tmp / f"{name}.port"
    proc = Proc(
        [
            sys.executable,
            "-m",
            "gpucloud_gateway.fake_model_server",
            "--port-file",
            str(port_file),
            "--model",
            name,
            *extra,
        ],
        tmp / f"{name}.log",
    )
    port = wait_for(
        lambda: port_file.exists() and port_file.read_text(), what=f"model server {name}"
    )
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: httpx.get(url + "/healthz").status_code == 200, what=f"{name} healthz")
    return proc, url


def start_gateway(
    tmp: Path,
    config: dict[str, Any],
    port: int | None = None,
    name: str = "gateway",
    env: dict[str, str] | None = None,
    ops_port: int | None = None,
) -> tuple[Proc, str]:
    """The gateway's process (``proc.ops_url``: its /metrics and /v1/stats) and URL."""
    cfg = tmp / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump(config))
    port = port or free_port()
    ops_port = ops_port or free_port()
    proc = Proc(
        [
            sys.executable,
            "-m",
            "gpucloud_gateway.main",
            "--config",
            str(cfg),
            "--port",
            str(port),
            "--ops-port",
            str(ops_port),
        ],
        tmp / f"{name}.log",
        env,
    )
    url = f"http://127.0.0.1:{port}"
    proc.ops_url = f"http://127.0.0.1:{ops_port}"

    def up() -> bool:
        if proc.popen.poll() is not None:
            raise AssertionError(f"gateway exited: {proc.output()}")
        return httpx.get(url + "/healthz").status_code == 200

    wait_for(up, what="gateway healthz")
    return proc, url


def write_endpoints(path: Path, mapping: dict[str, list[str]]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(mapping))
    tmp.replace(path)
