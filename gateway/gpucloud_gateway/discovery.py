"""Pluggable endpoint discovery and wake-up (the edges the gateway talks to).

* ``EndpointSource``: where a model's ready replicas are (``http://host:port`` base URLs).
  ``StaticEndpoints`` (a dict) and ``FileEndpoints`` (a JSON map, re-read when it changes)
  are for tests and simple setups; ``gpucloud_gateway.kube.EndpointSliceSource`` reads the
  Service's EndpointSlices in a cluster.
* ``Scaler``: asks for a cold model's replicas to come up. ``CommandScaler`` runs a
  command (tests start a local model server with it); ``gpucloud_gateway.kube.KubeScaler``
  patches the Deployment's replicas.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol


class EndpointSource(Protocol):
    def endpoints(self, namespace: str, model: str) -> list[str]:
        """Base URLs of the model's ready replicas (empty: the model is cold)."""
        ...


class Scaler(Protocol):
    async def wake(self, namespace: str, model: str) -> None:
        """Ask for at least one replica; returns once asked (not once it is ready)."""
        ...

    async def close(self) -> None: ...


class StaticEndpoints:
    def __init__(self, mapping: Mapping[str, Sequence[str]] | None = None) -> None:
        self.mapping: dict[str, list[str]] = {k: list(v) for k, v in (mapping or {}).items()}

    def endpoints(self, namespace: str, model: str) -> list[str]:
        return self.mapping.get(f"{namespace}/{model}", [])


class FileEndpoints:
    """``{"ns/model": ["http://127.0.0.1:8001", ...]}`` in a JSON file, re-read whenever its
    modification time or size changes (writers replace it atomically). The file is looked
    at once per ``check_s`` (a ``stat()`` per request was 3 % of the proxy's CPU), and at
    every request that would find no replica: a model that gets its first replica is seen
    at once, a replica taken out is left within ``check_s``."""

    def __init__(self, path: str | os.PathLike[str], check_s: float = 0.1) -> None:
        self.path = Path(path)
        self.check_s = check_s
        self._stamp: tuple[int, int] | None = None
        self._checked = -float("inf")  # time.monotonic() of the last look
        self._map: dict[str, list[str]] = {}

    def endpoints(self, namespace: str, model: str) -> list[str]:
        key = f"{namespace}/{model}"
        found = self._map.get(key)
        now = time.monotonic()
        if found and now - self._checked < self.check_s:
            return found
        self._checked = now
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._map, self._stamp = {}, None
            return []
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            try:
                data = json.loads(self.path.read_text())
            except (OSError, ValueError):
                return self._map.get(key, [])  # mid-replace: keep the last
            self._map = {str(k): [str(u) for u in v] for k, v in data.items()}
            self._stamp = stamp
        return self._map.get(key, [])


class NoScaler:
    """Models never wake: a request to a cold model waits, then gets a 503."""

    async def wake(self, namespace: str, model: str) -> None:
        return None

    async def close(self) -> None:
        return None


class CommandScaler:
    """Runs ``argv`` (``{namespace}`` and ``{model}`` substituted) to wake a model, without
    waiting for it to exit: the command may be the model server itself. Processes it
    started are terminated on close."""

    def __init__(self, argv: Sequence[str]) -> None:
        if not argv:
            raise ValueError("scaler.argv: must name a command")
        self.argv = list(argv)
        self.procs: list[asyncio.subprocess.Process] = []

    async def wake(self, namespace: str, model: str) -> None:
        argv = [a.format(namespace=namespace, model=model) for a in self.argv]
        env = {**os.environ, "GPUCLOUD_MODEL_NAMESPACE": namespace, "GPUCLOUD_MODEL": model}
        proc = await asyncio.create_subprocess_exec(*argv, env=env, start_new_session=True)
        self.procs.append(proc)

    async def close(self) -> None:
        for proc in self.procs:
            if proc.returncode is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
        for proc in self.procs:
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except TimeoutError:
                os.killpg(proc.pid, signal.SIGKILL)
