"""The ledger drain in a process of its own, started and stopped by the gateway.

In the gateway's process the drain's ledger transactions (about 70 µs of Python per
record) held the interpreter's lock for milliseconds at a time, every pass: requests
waited for it (most of the overhead's p99) and the proxy's event loop shared one core
with them (issue 20, docs/benchmarks.md). Here it runs ``LedgerDrain``'s passes on the
same queue file (SQLite WAL: the gateway's writer and this process each commit their
own transactions) every ``gap_s`` while records wait, checkpoints the queue every
second, and stops after one last pass on SIGTERM, or when the gateway that started it
is gone (a killed gateway's next start runs a new one). The durability contract does
not change: the gateway commits a record before the answer's last bytes; this process
only moves committed records to the ledger, idempotently (see ``outbox``).

``python -m gpucloud_gateway.drain --config GATEWAY.yaml --parent PID``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
from pathlib import Path

log = logging.getLogger(__name__)


class DrainProcess:
    """The gateway's handle on its drain process: started with the gateway, restarted
    if it exits (a ledger that cannot be opened yet), stopped with a last pass."""

    def __init__(self, config_path: Path, restart_s: float = 1.0) -> None:
        self.config_path = config_path
        self.restart_s = restart_s
        self._proc: asyncio.subprocess.Process | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._stopping = False

    async def start(self) -> None:
        await self._spawn()
        self._keeper = asyncio.create_task(self._keep(), name="ledger-drain-keeper")

    async def _spawn(self) -> None:
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gpucloud_gateway.drain",
            "--config", str(self.config_path), "--parent", str(os.getpid()),
        )  # fmt: skip

    async def _keep(self) -> None:
        while True:
            assert self._proc is not None
            code = await self._proc.wait()
            if self._stopping or code == 0:  # stopped (SIGTERM to the process group too)
                return
            log.error("the ledger drain exited (%s); restarting it", code)
            await asyncio.sleep(self.restart_s)
            await self._spawn()

    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    async def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM: the drain makes one last pass (bounded: everything queued is durable
        anyway, and recorded at the next start)."""
        self._stopping = True
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeper
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), timeout_s)
        except TimeoutError:
            log.warning("usage drain: still running after %.0fs; killed", timeout_s)
            proc.kill()
            await proc.wait()


def run(config_path: Path, parent: int, stop: threading.Event) -> None:
    """Drain passes until ``stop`` is set or ``parent`` is gone, then a last one."""
    from gpucloud_gateway.main import billing_parts
    from gpucloud_gateway.outbox import LedgerDrain

    parts = billing_parts(config_path)
    if parts is None:
        raise SystemExit(f"{config_path}: no billing section: nothing to drain")
    usage, ledger, pricebook = parts
    drain = LedgerDrain(usage, ledger, pricebook)
    try:
        while not stop.is_set() and os.getppid() == parent:
            drain.run_pass()
            stop.wait(drain.gap_s)
        drain.run_pass()
        drain.forget()
    finally:
        usage.close()
        ledger.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, required=True, help="the gateway's config file")
    p.add_argument("--parent", type=int, required=True, help="the gateway's process id")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="gpucloud-gateway drain: %(message)s")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    run(args.config, args.parent, stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
