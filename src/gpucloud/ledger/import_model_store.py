"""Import an old model-billing SQLite file (the ``BillingStore`` of releases before the
model money moved into the ledger) into the ledger's model tables, once per file.

    python -m gpucloud.ledger.import_model_store /var/lib/gpucloud/model-billing.db \\
        --ledger-url postgresql+psycopg://... [--currency CNY]

Run it for the operator's file (replica intervals) and for each gateway's (requests),
before the new gateway and operator start, so every meter goes on from its imported
total. Request rows keep their exact amount and cumulative total, so each posting has
the key and amount the old store gave it: a posting already in the ledger is replayed
(nothing is posted twice) and one the old store had not posted yet is posted now.
Running it again changes nothing.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
from collections.abc import Iterator
from datetime import datetime
from decimal import Decimal
from pathlib import Path

from gpucloud.ledger.ledger import Ledger, open_ledger
from gpucloud.ledger.model_billing import StoredRequest

BATCH = 1000
SOURCE = "import"  # no gateway instance restores its counts from imported rows


def _requests(db: sqlite3.Connection) -> Iterator[list[StoredRequest]]:
    cur = db.execute(
        "SELECT model, request_id, account, at, runtime_ms, status, prompt_tokens,"
        " completion_tokens, images, videos, amount, cumulative FROM requests ORDER BY seq"
    )
    while rows := cur.fetchmany(BATCH):
        yield [
            StoredRequest(
                model, rid, account, SOURCE, datetime.fromisoformat(at), ms, status, pt, ct,
                images, videos, None if amount is None else Decimal(amount),
                None if cumulative is None else Decimal(cumulative),
            )
            for model, rid, account, at, ms, status, pt, ct, images, videos, amount, cumulative
            in rows
        ]  # fmt: skip


def _has_table(db: sqlite3.Connection, name: str) -> bool:
    query = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?"
    return db.execute(query, (name,)).fetchone() is not None


def import_store(path: Path, ledger: Ledger, currency: str = "CNY") -> tuple[int, int]:
    """Import the file's requests and replica intervals; returns (new request rows,
    intervals read). Idempotent."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        new = 0
        if _has_table(db, "requests"):
            for batch in _requests(db):
                new += ledger.store_model_requests(batch, currency)
        intervals = []
        if _has_table(db, "replica_intervals"):
            intervals = db.execute(
                "SELECT model, replica, start_at, end_at FROM replica_intervals ORDER BY start_at"
            ).fetchall()
        for model, replica, start, end in intervals:
            begun = datetime.fromisoformat(start)
            ledger.replica_online(model, replica, begun)
            if end is not None:
                ledger.replica_offline(model, replica, datetime.fromisoformat(end), start=begun)
        return new, len(intervals)
    finally:
        db.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("path", type=Path, help="the old model-billing SQLite file")
    p.add_argument("--ledger-url", required=True, help="sqlite:///... or postgresql://...")
    p.add_argument("--currency", default="CNY", help="of payers the ledger does not know yet")
    args = p.parse_args(argv)
    if not args.path.is_file():
        print(f"import_model_store: {args.path} is not a file", file=sys.stderr)
        return 2
    ledger = open_ledger(args.ledger_url)
    try:
        new, intervals = import_store(args.path, ledger, args.currency)
    finally:
        ledger.close()
    print(f"imported {new} new request row(s) and {intervals} replica interval(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
