"""Measure usage ingestion into the ledger directly (no HTTP), on SQLite and PostgreSQL.

    python -m gpucloud.ledger.bench [--records 50000] [--batch 5000] [--no-postgres] [--rate]

Prints ``ledger_ingest_records_per_s_sqlite: N`` and ``ledger_ingest_records_per_s_postgres:
N`` (records of 10 s GPU windows; GPU-seconds/s is ten times that). ``--rate``: every pod
has an open meter and each batch is rated in its ingest transaction (``rate_at``), as
the API does. PostgreSQL is a
throwaway server from ``gpucloud.testing.postgres``; it is skipped with a note if no
server binaries are installed.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

from gpucloud.ledger import open_ledger
from gpucloud.usage import GPURef, PodRef, UsageKind, UsageRecord

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def make_batches(records: int, batch: int, gpus: int = 64) -> list[list[UsageRecord]]:
    """Consecutive 10 s windows of ``gpus`` GPUs on 8 nodes, as agents would send them."""
    t0 = int(T0.timestamp())
    out: list[UsageRecord] = []
    for i in range(records):
        window, gpu = divmod(i, gpus)
        out.append(
            UsageRecord(
                kind=UsageKind.GPU_TIME,
                node=f"node-{gpu // 8}",
                start=t0 + 10 * window,
                end=t0 + 10 * window + 10,
                quantity=10,
                gpu=GPURef(uuid=f"GPU-{gpu:04d}", product="NVIDIA-H100-80GB-HBM3"),
                pod=PodRef(namespace="bench", name=f"pod-{gpu}", uid=f"uid-{gpu}"),
            )
        )
    return [out[i : i + batch] for i in range(0, len(out), batch)]


def measure(url: str, batches: list[list[UsageRecord]], rate: bool = False) -> float:
    ledger = open_ledger(url)  # migrations run here, outside the measurement
    try:
        rate_at = None
        if rate:
            rate_at = T0 + timedelta(days=30)
            ledger.ensure_account("bench")
            for uid in sorted({r.pod.uid for b in batches for r in b if r.pod is not None}):
                ledger.open_meter(
                    f"m-{uid}", account="bench", resource=f"bench/{uid}", kind="gpu_time",
                    subject=uid, unit_price=Decimal("9.80"), unit="gpu_hour", opened_at=T0,
                )  # fmt: skip
        total = 0
        started = time.perf_counter()
        for batch in batches:
            result = ledger.ingest_usage(batch, received_at=T0, rate_at=rate_at)
            if result.rejected or result.duplicates:
                raise RuntimeError(f"bench batch not cleanly accepted: {result}")
            total += result.accepted
        return total / (time.perf_counter() - started)
    finally:
        ledger.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=50_000)
    parser.add_argument("--batch", type=int, default=5_000)
    parser.add_argument("--no-postgres", action="store_true")
    parser.add_argument("--rate", action="store_true", help="rate in the ingest transaction")
    args = parser.parse_args(argv)
    batches = make_batches(args.records, args.batch)
    with tempfile.TemporaryDirectory() as tmp:
        rate = measure(f"sqlite:///{Path(tmp) / 'bench.db'}", batches, args.rate)
    print(f"ledger_ingest_records_per_s_sqlite: {rate:.0f}", flush=True)
    if args.no_postgres:
        return
    from gpucloud.testing.postgres import PostgresUnavailable, postgres_server

    try:
        with postgres_server() as url:
            rate = measure(url, batches, args.rate)
        print(f"ledger_ingest_records_per_s_postgres: {rate:.0f}", flush=True)
    except PostgresUnavailable as exc:
        print(f"# postgres skipped: {exc}")


if __name__ == "__main__":
    main()
