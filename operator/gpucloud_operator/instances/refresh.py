"""Tickets for the refresh of what a running instance's status shows for display
(``accruedCost``, ``gpus``) without a whole pass (``instances/sweeper.py``, rule 3a).

A quiet running instance needs nothing but that refresh once a ``cost_refresh_s``: a
whole pass per refresh was 33 passes a second at 2,000 instances, each with its own
ledger queries (docs/benchmarks.md, "Scale"). The refresh does them for every instance
due at one check of the sweeper at once (``Settlement.refresh_shown``): one query for
the posted charges of them all, one for their meters, one for the GPUs of their pods;
then a status patch only where the shown value changed. It needs, per instance, what
the last pass knew: its ticket.

Rules (the concurrency of this room):

- **Written by passes only, under the instance lock**: every pass ends by putting the
  instance's ticket, if it is running with an open meter of this process and a pod of
  the run (``InstanceReconciler._schedule``), or dropping it; a release drops it. The
  refresh, under the same lock, writes back what it showed (``shown``).
- **Read under the instance lock** by the refresh, which takes each instance's lock
  without waiting (a pass holding it sets the instance's next refresh itself): so what
  a refresh reads is what the last pass or refresh left.
- ``_lock`` is a leaf lock over the table, held for a dictionary operation only.
- **A hint, not a record**: a missing ticket makes the refresh a whole pass; the refresh
  never posts or changes money (it reads the ledger and patches display fields), and
  every phase change or stop is a whole pass's, which replaces or drops the ticket.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from datetime import datetime
from fractions import Fraction

from gpucloud.billing import format_money, to_minor
from gpucloud.ledger import Meter


@dataclass(frozen=True)
class Ticket:
    """What the refresh of one running instance needs, as its last pass left it."""

    namespace: str
    name: str
    account: str
    resource: str  # the ledger's resource of the instance (``Pass.resource``)
    meter_id: str  # the run's open meter ("" for a package's run: charged ahead)
    currency: str  # the price book's (the account's; ``Core._resolve`` checks them)
    pod_uid: str  # the run's pod: agents report its GPUs
    gpus_wanted: int  # the run's GPU count: all shown, no more lookups
    cost_shown: str | None  # status.accruedCost now
    gpus_shown: tuple[str, ...]  # status.gpus now
    # the ledger's usage watermark when a refresh last looked the GPUs up: unchanged, no
    # record was stored since, and a lookup between cost refreshes is skipped
    gpus_mark: int | None = None


def running_minor(meter: Meter | None, now: datetime, currency: str) -> int:
    """What the open meter's run owes beyond its postings at ``now``: its GPU-seconds
    so far at its price, rounded once, less what it posted (display: the ledger is the
    record). 0 for no meter or a closed one."""
    if meter is None or meter.closed_at is not None:
        return 0
    seconds = max(0, int((now - meter.opened_at).total_seconds()))
    exact = Fraction(meter.unit_price) * meter.gpus * seconds / 3600
    return max(0, to_minor(exact, currency) - meter.posted_minor)


def cost_text(minor: int, currency: str) -> str:
    """status.accruedCost: the amount without its currency."""
    return format_money(minor, currency).split()[0]


class Tickets:
    """uid -> Ticket, by the rules of the module docstring."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rows: dict[str, Ticket] = {}

    def put(self, uid: str, ticket: Ticket) -> None:
        with self._lock:
            self._rows[uid] = ticket

    def drop(self, uid: str) -> None:
        with self._lock:
            self._rows.pop(uid, None)

    def get(self, uid: str) -> Ticket | None:
        with self._lock:
            return self._rows.get(uid)

    def shown(self, uid: str, cost: str | None, gpus: tuple[str, ...], mark: int | None) -> None:
        """What a refresh showed (its patch, if any, went through), and the usage
        watermark of its GPUs' lookup (None: it did not look)."""
        with self._lock:
            row = self._rows.get(uid)
            if row is not None:
                mark = row.gpus_mark if mark is None else mark
                self._rows[uid] = replace(row, cost_shown=cost, gpus_shown=gpus, gpus_mark=mark)

    def __len__(self) -> int:
        with self._lock:
            return len(self._rows)
