"""Requests answered but never billed when the gateway is killed during a burst.

The scenario of ``tests/gateway/kill_burst.py``: 2,000 paid requests (official per-token
and personal per-runtime models, half streaming) through a real gateway process that is
killed with SIGKILL 3 times during the burst and once at its end, while another
connection holds the SQLite ledger's write lock 2.3 s at a time. Prints
``gateway_unbilled_after_kill`` (goal 0), ``gateway_doubled_after_kill`` (goal 0) and
how many recorded requests a kill cut before their caller had them.
Usage: ``.venv/bin/python bench/gateway_kill_bench.py [--requests N]``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "gateway"))

from kill_burst import run_burst  # a test helper, found through the path above


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--kills", type=int, default=3)
    args, _ = ap.parse_known_args()  # run_all.py passes its own arguments through
    with tempfile.TemporaryDirectory(prefix="gwkill-") as tmp:
        started = time.monotonic()
        out = run_burst(Path(tmp), requests=args.requests, kills=args.kills)
        took = time.monotonic() - started
    print(f"gateway_kill_requests_answered: {len(out.answered)} requests")
    print(f"gateway_kill_kills: {out.kills} kills")
    print(f"gateway_unbilled_after_kill: {len(out.unbilled)} requests")
    print(f"gateway_doubled_after_kill: {len(out.doubled)} postings")
    print(f"gateway_kill_billing_mismatches: {len(out.mismatches)} models")
    print(f"gateway_billed_unanswered_after_kill: {out.billed_unanswered} requests")
    print(f"gateway_kill_left_unposted: {out.left_unposted} queued records")
    print(f"gateway_kill_bench_s: {took:.1f} s")
    return 0 if not (out.unbilled or out.doubled or out.mismatches) else 1


if __name__ == "__main__":
    sys.exit(main())
