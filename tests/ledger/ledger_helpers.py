"""Helpers shared by the ledger tests (importable: tests/ledger is on sys.path)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from gpucloud.usage import Activity, GPURef, PodRef, UsageKind, UsageRecord

T0 = datetime(2026, 1, 1, tzinfo=UTC)
T0_S = int(T0.timestamp())


def gpu_record(
    start: int,
    length: int = 10,
    *,
    gpu: str = "GPU-a",
    pod_uid: str = "pod-1",
    namespace: str = "team-a",
    node: str = "node-1",
    activity: Activity | None = None,
) -> UsageRecord:
    return UsageRecord(
        kind=UsageKind.GPU_TIME,
        node=node,
        start=start,
        end=start + length,
        quantity=length,
        gpu=GPURef(uuid=gpu, product="NVIDIA-H100"),
        pod=PodRef(namespace=namespace, name=f"pod-{pod_uid}", uid=pod_uid),
        activity=activity,
    )


def disk_record(
    start: int,
    length: int,
    size: int,
    *,
    volume: str = "disk-1",
    kind: UsageKind = UsageKind.CLOUD_DISK,
) -> UsageRecord:
    return UsageRecord(
        kind=kind, node="node-1", start=start, end=start + length, quantity=size, volume=volume
    )


def post_many(url: str, worker: int, count: int, shared: int) -> int:
    """Worker for the concurrency tests (threads and processes): post ``count`` entries
    of its own and try every one of ``shared`` keys that all workers post too. Returns
    how many of the shared keys this worker created."""
    from gpucloud.ledger import open_ledger

    ledger = open_ledger(url)
    created = 0
    try:
        for i in range(count):
            if i % 2:
                ledger.post_entry("acct", "charge", -1, f"w{worker}-{i}", at=T0)
            else:
                ledger.post_entry("acct", "recharge", 3, f"w{worker}-{i}", at=T0)
            if i < shared:
                # Rotate the start so workers collide on the same keys at the same time.
                key = f"shared-{(i + worker) % shared}"
                created += ledger.post_entry("acct", "recharge", 7, key, at=T0).created
    finally:
        ledger.close()
    return created


def expected_balance(workers: int, count: int, shared: int) -> int:
    per_worker = sum(-1 if i % 2 else 3 for i in range(count))
    return workers * per_worker + 7 * shared


CRASH_PRICE = "2.57"
CRASH_GPUS = ("GPU-a", "GPU-b")


def crash_worker(url: str, windows: int, batch: int, progress: Any = None) -> None:
    """Ingest and rate in a loop, counting steps in ``progress`` (a shared int); the
    crash test kills it with SIGKILL at random moments and restarts it. Restarting from
    window 0 is safe: re-sent usage is a duplicate, and rating is idempotent."""
    from decimal import Decimal

    from gpucloud.ledger import open_ledger

    def step() -> None:
        if progress is not None:
            progress.value += 1

    ledger = open_ledger(url)
    ledger.ensure_account("acct")
    ledger.open_meter(
        "m", account="acct", resource="r", kind="gpu_time", subject="pod-1",
        unit_price=Decimal(CRASH_PRICE), unit="gpu_hour", opened_at=T0, gpus=len(CRASH_GPUS),
    )  # fmt: skip
    later = T0 + timedelta(days=1)
    for first in range(0, windows, batch):
        records = [
            gpu_record(T0_S + 10 * i, gpu=g)
            for i in range(first, min(first + batch, windows))
            for g in CRASH_GPUS
        ]
        step()
        ledger.ingest_usage(records, received_at=T0)
        step()
        ledger.rate_pending(later)
    ledger.rate_pending(later)
    ledger.close()


def worker_context() -> Any:
    """A multiprocessing context whose workers fork from a server that has imported the
    ledger once: real separate processes without paying interpreter start-up each time."""
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["gpucloud.ledger", "ledger_helpers"])
    return ctx
