"""The one-hour rule's available balance against an oracle that replays what happened.

available = balance - accrued on open meters - owed on closed-but-unsettled runs
          - reserved amounts. Replayed plainly, every GPU run will cost its GPU-seconds
at its price rounded once, so the oracle is: recharges - the sum over runs of
round(price x GPU-seconds / 3600) - reserved, where a run's GPU-seconds are
* running: what the agents reported inside its window plus GPUs x the time since the
  last report (the estimate of the part not reported yet);
* stopped (settled or not): GPUs x its whole window, as the settlement bills it when
  the agents reported less.
No billing or ledger code computes the oracle.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from datetime import timedelta
from decimal import Decimal
from fractions import Fraction

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ledger_helpers import T0, T0_S, gpu_record

from gpucloud.ledger import EntryKind, Ledger

PRICES = ("19.80", "9.90", "5.20", "0.0005")
ACCOUNTS = itertools.count()


def half_even_fen(value: Fraction) -> int:
    scaled = value * 100
    floor = scaled.numerator // scaled.denominator
    rest = scaled - floor
    if rest > Fraction(1, 2) or (rest == Fraction(1, 2) and floor % 2):
        return floor + 1
    return floor


@dataclass
class Run:
    meter_id: str
    price: Fraction
    gpus: int
    opened: int
    closed: int | None = None
    settled: bool = False
    reported: int = 0  # GPU-seconds the agents reported inside the window
    last_end: int = 0  # end of the last report (opened when none)
    cursor: int = 0  # where the agents' next report starts

    def gpu_seconds(self, now: int) -> int:
        if self.closed is not None:
            return self.gpus * (self.closed - self.opened)
        return self.reported + self.gpus * max(0, now - self.last_end)


@dataclass
class Oracle:
    recharged: int = 0
    runs: list[Run] = field(default_factory=list)

    def available(self, now: int, reserved: int) -> int:
        owed = sum(half_even_fen(r.price * r.gpu_seconds(now) / 3600) for r in self.runs)
        return self.recharged - owed - reserved


ops = st.lists(
    st.one_of(
        st.tuples(st.just("recharge"), st.integers(1, 500_00)),
        st.tuples(st.just("open"), st.tuples(st.sampled_from(PRICES), st.integers(1, 4))),
        st.tuples(st.just("report"), st.tuples(st.integers(0, 7), st.integers(0, 40))),
        st.tuples(st.just("rate"), st.just(0)),
        st.tuples(st.just("close"), st.integers(0, 7)),
        st.tuples(st.just("settle"), st.integers(0, 7)),
        st.tuples(st.just("wait"), st.integers(1, 5000)),
        st.tuples(st.just("reserve"), st.integers(0, 300_00)),
    ),
    min_size=1,
    max_size=40,
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(program=ops)
def test_available_balance_equals_the_replayed_oracle(
    ledger: Ledger, program: list[tuple[str, object]]
) -> None:
    account = f"acct-{next(ACCOUNTS)}"  # the fixture's ledger is shared by the examples
    ledger.ensure_account(account)
    oracle, now, reserved = Oracle(), T0_S, 0
    for n, (op, arg) in enumerate(program):
        at = T0 + timedelta(seconds=now - T0_S)
        if op == "recharge":
            assert isinstance(arg, int)
            ledger.post_entry(account, EntryKind.RECHARGE, arg, f"{account}:r{n}", at=at)
            oracle.recharged += arg
        elif op == "open":
            price, gpus = arg  # type: ignore[misc]
            run = Run(f"{account}:m{n}", Fraction(price), gpus, now, last_end=now, cursor=now)
            ledger.open_meter(
                run.meter_id,
                account=account,
                resource=f"team-a/{run.meter_id}",
                kind="gpu_time",
                subject=f"pod-{run.meter_id}",
                unit_price=Decimal(price),
                unit="gpu_hour",
                opened_at=at,
                gpus=gpus,
            )
            oracle.runs.append(run)
        elif op == "report" and oracle.runs:
            i, gap = arg  # type: ignore[misc]
            run = oracle.runs[i % len(oracle.runs)]
            start = run.cursor + gap  # the agents may miss a few seconds
            length = min(10, now - start)  # an agent record spans at most 10 s
            if run.closed is None and length > 0:  # usage of a running pod, ended by now
                batch = [
                    gpu_record(
                        start,
                        length,
                        gpu=f"GPU-{run.meter_id.replace(':', '-')}-{g}",
                        pod_uid=f"pod-{run.meter_id}",
                    )
                    for g in range(run.gpus)
                ]
                ledger.ingest_usage(batch, received_at=at)
                run.reported += run.gpus * length
                run.cursor = run.last_end = start + length
        elif op == "rate":
            ledger.rate_pending(at)
        elif op == "close" and oracle.runs:
            run = oracle.runs[arg % len(oracle.runs)]  # type: ignore[operator]
            if run.closed is None:
                ledger.close_meter(run.meter_id, at)
                run.closed = now
        elif op == "settle" and oracle.runs:
            run = oracle.runs[arg % len(oracle.runs)]  # type: ignore[operator]
            if run.closed is not None and not run.settled:
                ledger.settle_meter(run.meter_id, at, fallback=True)
                run.settled = True
        elif op == "wait":
            assert isinstance(arg, int)
            now += arg
        elif op == "reserve":
            assert isinstance(arg, int)
            reserved = arg
        # after every step, at the instant it happened and a while later
        for later in (now, now + 600):
            when = T0 + timedelta(seconds=later - T0_S)
            got = ledger.available_balance(account, when, reserved_minor=reserved)
            assert got == oracle.available(later, reserved), (op, later - now)
