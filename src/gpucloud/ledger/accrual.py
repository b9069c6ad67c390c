"""Accrual: what an account's GPU runs owe beyond their postings.

The one-hour start rule and arrears read it (``available_balance``): open meters' usage
not rated yet and the time since their last report, and what closed but unsettled meters
will post when settled (``Meters.settle_meter``'s rule). Read-only: one snapshot.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime
from typing import Any

from sqlalchemy import Row, select

from gpucloud.billing.decisions import available_balance
from gpucloud.billing.intervals import elapsed_seconds
from gpucloud.ledger import rating, schema
from gpucloud.ledger import validate as v
from gpucloud.ledger.accounts import Accounts
from gpucloud.ledger.meters import meter_of
from gpucloud.ledger.store import Store
from gpucloud.ledger.types import MeterKind, Unposted

U, M = schema.usage, schema.meters


class Accrual:
    """Estimates of what running and stopped-but-unsettled GPU meters owe."""

    def __init__(self, store: Store, accounts: Accounts) -> None:
        self._s = store
        self._accounts = accounts

    def unposted(self, account: str, now: datetime) -> Unposted:
        """What the account's GPU runs owe beyond their postings (``unposted_by_resource``
        summed over the resources)."""
        return Unposted.summed(self.unposted_by_resource(account, now).values())

    def unposted_by_resource(self, account: str, now: datetime) -> dict[str, Unposted]:
        """What the account's GPU runs owe beyond their postings, per meter resource (the
        instance ``<ns>/<name>``), minor units >= 0:

        * an open meter: its ingested-but-unrated usage plus ``gpus`` x the time from the
          end of its last usage (or opened_at) to ``now``;
        * a closed meter not settled yet (a stopped run in its metering grace period):
          what its settlement will post, ``gpus`` x its whole window or the usage the
          agents reported, whichever is more (``settle_meter``'s rule).

        Each meter is rounded once (the delta of its rounded cumulative total). Without
        the second part a stopped run was invisible to the one-hour rule and to arrears
        for the whole grace period."""
        v.instant(now, "now")
        now_s = schema.to_us(now) // 1_000_000
        out: dict[str, Unposted] = {}
        with self._s.read() as conn:
            acct = self._s.account_row(conn, account)
            rows = conn.execute(
                select(M).where(
                    M.c.account_id == acct.id,
                    M.c.kind == MeterKind.GPU_TIME.value,
                    M.c.settled_at.is_(None),
                )
            ).all()
            # one query for every meter's unrated usage (an admission check runs this for
            # accounts with many running instances; one query per meter was the cost)
            by_owner: defaultdict[str, list[Row[Any]]] = defaultdict(list)
            if rows:
                for u in conn.execute(
                    select(
                        U.c.owner, U.c.kind, U.c.rated_until, U.c.end_s, U.c.quantity, U.c.node
                    ).where(
                        U.c.kind == MeterKind.GPU_TIME.value,
                        U.c.owner.in_({row.subject for row in rows}),
                        U.c.rated_until < U.c.end_s,
                    )
                ):
                    by_owner[u.owner].append(u)
            for row in rows:
                meter = meter_of(row, account)
                window = rating.meter_window(meter)
                unrated = [
                    (u.kind, u.rated_until, u.end_s, u.quantity)
                    for u in by_owner[row.subject]
                    if u.end_s > window[0]
                    and (window[1] is None or u.rated_until < window[1])
                    and (row.node is None or u.node == row.node)
                ]
                quantity = meter.quantity_rated + rating.sum_clipped(unrated, window)
                if window[1] is None:
                    ends = [e for _, _, e, _ in unrated]
                    last = max([window[0], row.last_usage_end or window[0], *ends])
                    quantity += meter.gpus * max(0, now_s - last)
                else:
                    assert meter.closed_at is not None
                    held = meter.gpus * elapsed_seconds(meter.opened_at, meter.closed_at)
                    quantity = max(quantity, held)
                estimate = rating.rounded_cost(quantity, meter, acct.currency)
                owed = max(0, estimate - meter.posted_minor)
                was = out.get(meter.resource, Unposted(0, 0))
                if window[1] is None:
                    out[meter.resource] = Unposted(was.open_minor + owed, was.closed_minor)
                else:
                    out[meter.resource] = Unposted(was.open_minor, was.closed_minor + owed)
        return out

    def accrued_unsettled(self, account: str, now: datetime) -> int:
        """Everything the account's GPU runs owe beyond their postings (``unposted``)."""
        return self.unposted(account, now).total_minor

    def available_balance(self, account: str, now: datetime, reserved_minor: int = 0) -> int:
        """What the one-hour start rule checks (``gpucloud.billing.available_balance``):
        the balance minus what open meters accrued, what closed but unsettled runs owe,
        and ``reserved_minor`` (amounts the caller has committed but not charged yet:
        admitted package terms, renewals due)."""
        unposted = self.unposted(account, now)
        return available_balance(
            self._accounts.balance(account),
            accrued_minor=[unposted.open_minor],
            owed_minor=[unposted.closed_minor],
            reserved_minor=[reserved_minor],
        )
