"""Model billing against a real SQLite ledger, to the cent, for each pricing kind, and
the gateway's usage queue drained into it."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import pytest
import yaml
from gateway_testkit import PRICEBOOK_SPEC, PRODUCT, pricebook, wait_for
from gpucloud_gateway.drain import DrainProcess
from gpucloud_gateway.outbox import LedgerDrain, UsageQueue, restored_stats
from hypothesis import given, settings
from hypothesis import strategies as st

from gpucloud.billing import model_online_charge, to_minor
from gpucloud.billing.model_charges import ModelBillingError, ModelPlan, Rule, UsageEvent
from gpucloud.ledger import EntryKind, Ledger, open_ledger

T0 = datetime(2026, 3, 1, 10, 0, tzinfo=UTC)
PB = pricebook()


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    led = open_ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    for acct in ("owner", "caller"):
        led.ensure_account(acct)
        led.post_entry(acct, EntryKind.RECHARGE, 100_000, f"seed:{acct}", at=T0)
    yield led
    led.close()


class Store:
    """Records straight into the ledger (what the gateway's drain does per batch)."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    def record(self, p: ModelPlan, e: UsageEvent, payer: str | None = None) -> bool:
        return self.ledger.record_model_requests([(p, e, payer)], PB) == 1

    def settle_online(self, _: object, p: ModelPlan, now: datetime) -> int:
        return self.ledger.settle_model_online(p, PB, now)

    def replica_online(self, p: ModelPlan, replica: str, at: datetime) -> None:
        self.ledger.replica_online(p.key, replica, at)

    def replica_offline(self, p: ModelPlan, replica: str, at: datetime) -> None:
        self.ledger.replica_offline(p.key, replica, at)


@pytest.fixture
def store(ledger: Ledger) -> Store:
    return Store(ledger)


def plan(**kw: object) -> ModelPlan:
    base: dict[str, object] = {
        "namespace": "ns",
        "name": "m",
        "account": "owner",
        "product": PRODUCT,
    }
    return ModelPlan(**{**base, **kw})  # type: ignore[arg-type]


def event(i: int, status: int = 200, **kw: int) -> UsageEvent:
    return UsageEvent(
        f"req-{i}", "ns", "m", T0 + timedelta(seconds=i), kw.pop("ms", 100), status, **kw
    )


def charged(led: Ledger, account: str, resource: str) -> int:
    return led.charges_by_resource(account).get(resource, 0)


def test_official_text_model_bills_tokens_rounded_once(store: Store, ledger: Ledger) -> None:
    p = plan(visibility="Public", publisher="Official", task="TextGeneration")
    assert p.rule is Rule.OFFICIAL
    events = [event(i, prompt_tokens=100 + i, completion_tokens=37) for i in range(60)]
    for e in events:
        assert store.record(p, e)
    tokens = sum(e.tokens for e in events)
    exact = Decimal("0.0137") * tokens / 1000
    assert ledger.model_exact_total("owner", "ns/m") == exact
    assert charged(ledger, "owner", "model/ns/m") == to_minor(exact) == 14
    # A single request here costs ~0.19 fen: separately rounded slices would post 0.
    assert to_minor(Decimal("0.0137") * events[0].tokens / 1000) == 0


def test_a_drain_killed_after_the_ledger_commit_charges_nothing_twice(
    ledger: Ledger, tmp_path: Path
) -> None:
    p = plan(visibility="Public", publisher="Official", task="ImageGeneration")
    usage = UsageQueue(tmp_path / "queue.db")
    drain = LedgerDrain(usage, ledger, PB)
    usage.append_many([(p, event(i, images=3), None) for i in range(7)])
    usage.append_many([(p, event(3, images=3), None)])  # a request id is recorded once
    # Killed between the ledger's commit and forgetting the batch: recorded, still queued.
    ledger.record_model_requests([rec for _, rec in usage.peek()], PB, source=usage.source)
    before = ledger.balance("owner")
    assert usage.pending() == 8
    # The restarted gateway's counts: each request once, from the ledger and the queue.
    arrivals, totals = restored_stats(UsageQueue(tmp_path / "queue.db"), ledger, T0)
    assert len(arrivals) == 7 and totals["ns/m"][0] == 7
    assert drain.drain_once() == 8 and drain.drain_once() == 0
    assert usage.pending() == 8  # forgotten at the drain's next tick, not per batch
    drain.forget()
    assert usage.pending() == 0 and LedgerDrain(usage, ledger, PB).drain_once() == 0
    assert ledger.balance("owner") == before
    assert charged(ledger, "owner", "model/ns/m") == to_minor(Decimal("0.0815") * 21) == 171
    usage.close()


def test_official_video_model_bills_videos(store: Store, ledger: Ledger) -> None:
    p = plan(visibility="Public", publisher="Official", task="VideoGeneration")
    store.record(p, event(1, videos=2))
    store.record(p, event(2, videos=1))
    store.record(p, event(3, status=500, videos=1))  # a failed request costs nothing
    assert charged(ledger, "owner", "model/ns/m") == to_minor(Decimal("1.2345") * 3) == 370


def test_personal_model_bills_request_runtime_to_the_caller(store: Store, ledger: Ledger) -> None:
    p = plan(visibility="Public", publisher="Personal")
    runtimes = [1234, 87, 15_001, 3]
    for i, ms in enumerate(runtimes):
        store.record(p, event(i, ms=ms), payer="caller")
    exact = Decimal("0.0031") * sum(runtimes) / 1000
    assert charged(ledger, "caller", "model/ns/m") == to_minor(exact) == 5
    assert charged(ledger, "owner", "model/ns/m") == 0


def test_private_model_bills_replica_online_time_and_nothing_while_cold(
    store: Store, ledger: Ledger
) -> None:
    p = plan(gpus_per_replica=2)
    assert p.rule is Rule.ONLINE
    store.record(p, event(1))  # requests of a private model cost nothing by themselves
    assert charged(ledger, "owner", "model/ns/m") == 0
    store.replica_online(p, "r0", T0)
    store.replica_online(p, "r0", T0)  # idempotent
    store.replica_online(p, "r1", T0 + timedelta(seconds=125))
    posted = [store.settle_online(ledger, p, T0 + timedelta(seconds=s)) for s in (1, 30, 299)]
    assert store.settle_online(ledger, p, T0 + timedelta(seconds=299)) == 0  # a retry
    store.replica_offline(p, "r0", T0 + timedelta(seconds=433))
    store.replica_offline(p, "r1", T0 + timedelta(seconds=601))
    # Cold from 601 s on: a day later, nothing more is due.
    posted.append(store.settle_online(ledger, p, T0 + timedelta(seconds=700)))
    assert store.settle_online(ledger, p, T0 + timedelta(days=1)) == 0
    exact = model_online_charge(PB, PRODUCT, 2, [433, 601 - 125])
    assert exact == Decimal("7.21") * 2 * (433 + 476) / 3600
    assert charged(ledger, "owner", "model/ns/m#online") == sum(posted) == to_minor(exact) == 364
    # Woken again: a new interval of the same replica name.
    store.replica_online(p, "r0", T0 + timedelta(days=2))
    store.settle_online(ledger, p, T0 + timedelta(days=2, seconds=60))
    total = model_online_charge(PB, PRODUCT, 2, [433, 476, 60])
    assert charged(ledger, "owner", "model/ns/m#online") == to_minor(total)


def test_bad_plans_name_the_field() -> None:
    with pytest.raises(ModelBillingError, match=r"pricing\.task: required for an official model"):
        plan(visibility="Public", publisher="Official")
    with pytest.raises(ModelBillingError, match=r"pricing\.publisher"):
        plan(visibility="Public")
    with pytest.raises(ModelBillingError, match=r"gpu\.count: must be >= 1"):
        plan(gpus_per_replica=0)


def test_public_models_have_no_online_time(ledger: Ledger) -> None:
    with pytest.raises(ModelBillingError, match="is public: it is billed per request"):
        ledger.settle_model_online(plan(visibility="Public", publisher="Personal"), PB, T0)


@settings(max_examples=25, deadline=None)
@given(
    gpus=st.integers(1, 4),
    online=st.lists(st.tuples(st.integers(0, 7200), st.integers(1, 7200)), min_size=1, max_size=4),
    settles=st.lists(st.integers(1, 4 * 3600), min_size=1, max_size=12),
)
def test_online_time_settled_at_any_instants_is_the_exact_total_rounded_once(
    gpus: int, online: list[tuple[int, int]], settles: list[int]
) -> None:
    """A private model's online time (7.21 per GPU-hour: a fen is 4.99... GPU-seconds)
    settled at any sequence of instants: after each settlement the ledger holds the
    exact charge of the online seconds so far rounded once, never drifting."""
    with tempfile.TemporaryDirectory() as tmp:
        led = open_ledger(f"sqlite:///{Path(tmp) / 'ledger.db'}")
        s = Store(led)
        try:
            led.ensure_account("owner")
            p = plan(gpus_per_replica=gpus)
            for i, (begin, length) in enumerate(online):
                s.replica_online(p, f"r{i}", T0 + timedelta(seconds=begin))
                s.replica_offline(p, f"r{i}", T0 + timedelta(seconds=begin + length))
            at = 0
            for step in settles:
                at += step
                s.settle_online(led, p, T0 + timedelta(seconds=at))
                seconds = sum(max(0, min(b + n, at) - b) for b, n in online)
                exact = Fraction("7.21") * gpus * seconds / 3600  # the oracle
                assert charged(led, "owner", "model/ns/m#online") == to_minor(exact)
        finally:
            led.close()


def drain_config(tmp_path: Path, billing: bool = True) -> Path:
    cfg: dict[str, object] = {"models": []}
    if billing:
        (tmp_path / "pricebook.yaml").write_text(
            yaml.safe_dump({"kind": "PriceBook", "spec": PRICEBOOK_SPEC})
        )
        cfg["billing"] = {
            "queue": "queue.db",
            "pricebook": "pricebook.yaml",
            "ledger": f"sqlite:///{tmp_path / 'ledger.db'}",
        }
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_the_drain_process_charges_the_queue_and_a_last_pass_on_sigterm(
    ledger: Ledger, tmp_path: Path
) -> None:
    p = plan(visibility="Public", publisher="Official", task="ImageGeneration")
    usage = UsageQueue(tmp_path / "queue.db")
    usage.append_many([(p, event(i, images=3), None) for i in range(7)])
    drain = DrainProcess(drain_config(tmp_path))

    async def run() -> None:
        await drain.start()
        await async_wait(lambda: charged(ledger, "owner", "model/ns/m") == 171, "7 charged")
        usage.append_many([(p, event(7, images=1), None)])  # in the last pass, at the latest
        await drain.stop()

    asyncio.run(run())
    assert charged(ledger, "owner", "model/ns/m") == to_minor(Decimal("0.0815") * 22) == 179
    assert usage.pending() == 0  # forgotten by the last pass
    usage.close()


def test_the_drain_process_ends_with_a_killed_gateway_and_restarts_after_a_crash(
    tmp_path: Path,
) -> None:
    config = drain_config(tmp_path)
    spawn = (
        "import os, subprocess, sys, time;"
        "p = subprocess.Popen([sys.executable, '-m', 'gpucloud_gateway.drain', '--config',"
        f" {str(config)!r}, '--parent', str(os.getpid())]);"
        "print(p.pid, flush=True); time.sleep(60)"
    )
    gateway = subprocess.Popen([sys.executable, "-c", spawn], stdout=subprocess.PIPE)
    assert gateway.stdout is not None
    child = int(gateway.stdout.readline())
    gateway.kill()  # kill -9: the drain notices its parent is gone
    gateway.wait()

    def gone() -> bool:
        try:
            return Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
        except FileNotFoundError:
            return True

    wait_for(gone, timeout=10, what="the orphaned drain to exit")

    (tmp_path / "nobilling").mkdir()
    broken = DrainProcess(drain_config(tmp_path / "nobilling", billing=False), restart_s=0.05)

    async def crash() -> None:
        await broken.start()
        first = broken.pid()
        await async_wait(lambda: broken.pid() != first, "a restarted drain")
        await broken.stop()

    asyncio.run(crash())


async def async_wait(cond: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)
