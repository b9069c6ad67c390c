"""Arrears: the pure decisions with an injected clock, and the account/instance
reconcilers enforcing them against a real SQLite ledger (opworld)."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from gpucloud_operator import arrears as ar
from gpucloud_operator.accounts import AccountReconciler
from gpucloud_operator.notify import Notifier
from opworld import NS, T0, World

from gpucloud.ledger import EntryKind

WEEK = timedelta(days=7)


def verdict(balance: int, available: int, burn: str = "5.22", since=None, now=T0, hours=24):
    return ar.assess(
        balance_minor=balance,
        available_minor=available,
        currency="CNY",
        burn_per_hour=Decimal(burn),
        warning_hours=hours,
        arrears_since=since,
        now=now,
        retention=WEEK,
    )


def test_states_and_hours_left() -> None:
    ok = verdict(200_00, 200_00, "5.00")
    assert (ok.state, ok.hours_left, ok.arrears_since) == ("Active", Decimal(40), None)
    low = verdict(100_00, 100_00, "5.00")  # 20 h < 24 h
    assert (low.state, low.hours_left) == ("LowBalance", Decimal(20))
    assert verdict(100_00, 100_00, "5.00", hours=12).state == "Active"
    assert verdict(0, 0, "0").state == "Active"  # nothing billed: nothing owed
    assert verdict(1, 1, "0").hours_left is None


@pytest.mark.parametrize(
    ("balance", "available", "burn"),
    [(-1, -1, "0"), (10, -1, "5"), (0, 0, "0.0001"), (-500, -900, "5")],
)
def test_arrears_when_fees_are_not_covered(balance: int, available: int, burn: str) -> None:
    v = verdict(balance, available, burn)
    assert v.in_arrears and v.arrears_since == T0 and v.data_deletion_at == T0 + WEEK


def test_countdown_keeps_its_start_and_is_due_exactly_at_day_7() -> None:
    later = T0 + timedelta(days=3)
    v = verdict(-100, -100, since=T0, now=later)
    assert v.arrears_since == T0 and v.data_deletion_at == T0 + WEEK
    assert not v.deletion_due(T0 + WEEK - timedelta(seconds=1))
    assert v.deletion_due(T0 + WEEK)
    # a recharge that clears the debt ends arrears at once: no countdown left
    cleared = verdict(10_00, 10_00, since=T0, now=later)
    assert cleared.arrears_since is None and cleared.data_deletion_at is None
    # arrears again later: a new countdown from then
    again = verdict(-1, -1, since=None, now=later + timedelta(hours=1))
    assert again.data_deletion_at == later + timedelta(hours=1) + WEEK


def test_bad_settings_are_named() -> None:
    with pytest.raises(ValueError, match="lowBalanceWarningHours"):
        verdict(1, 1, hours=0)


# -- reconcilers on the fake cluster and a real ledger ------------------------------------
class Recorder(Notifier):
    def __init__(self) -> None:
        super().__init__()
        self.sent: list[dict] = []

    def notify(self, url: str | None, payload: dict) -> bool:
        self.sent.append(payload)
        return True


def accounts(w: World, notifier: Notifier) -> AccountReconciler:
    return AccountReconciler(w.kube, w.ledger, w.clock, w.cfg, notifier)


def charges_after(w: World, at) -> list:
    return [e for e in w.ledger.entries("acme", limit=10_000) if e.amount_minor < 0 and e.at > at]


def into_arrears(w: World, tmp_path: Path) -> tuple[AccountReconciler, Recorder, dict]:
    """A 2-hour balance (L40S 5.20/h + 50 GiB x 0.0004/h = 5.22/h) runs out."""
    w.cfg = w.rec.cfg = w.cfg.with_overrides({"data_root": str(tmp_path / "data")})
    w.fund(10_44)
    rec, sent = None, Recorder()
    rec = accounts(w, sent)
    acct = w.kube.cluster[("accounts", "acme")]
    w.instance("job", "NVIDIA-L40S")
    w.tick()
    assert w.status("job")["phase"] == "Running"
    (tmp_path / "data/instances" / NS / "job").mkdir(parents=True)
    (tmp_path / "data/instances" / NS / "job/weights.bin").write_bytes(b"x" * 10_000)
    rec.refresh_account(acct)
    assert acct["status"]["state"] == "LowBalance"
    assert [m["type"] for m in sent.sent] == ["LowBalanceWarning"]
    assert "LowBalanceWarning" in w.kube.reasons("acme")
    w.clock.advance(timedelta(hours=1, minutes=59))
    rec.refresh_account(acct)
    assert acct["status"]["state"] == "LowBalance"  # still covered
    w.clock.advance(timedelta(minutes=2))  # 2 h 01 min: available < 0
    rec.refresh_account(acct)
    st = acct["status"]
    assert st["state"] == "Arrears" and st["arrearsSince"] == "2026-01-01T02:01:00Z"
    assert st["dataDeletionAt"] == "2026-01-08T02:01:00Z"
    assert [m["type"] for m in sent.sent] == ["LowBalanceWarning", "Arrears"]
    return rec, sent, acct


def test_arrears_shutdown_storage_only_then_deletion_at_day_7(world: World, tmp_path: Path) -> None:
    w = world
    rec, _sent, acct = into_arrears(w, tmp_path)
    since = T0 + timedelta(hours=2, minutes=1)
    w.clock.advance(timedelta(seconds=40))  # the instance's tick comes a little later
    w.tick()
    st = w.status("job")
    assert st["phase"] == "Stopped" and st["stoppedAt"] == "2026-01-01T02:01:00Z"
    assert "ArrearsShutdown" in w.kube.reasons("job")
    assert not w.kube.pods and w.kube.pvs  # GPUs released, data kept
    # GPU time is charged up to the arrears instant, not to the tick
    (gpu,) = [m for m in w.ledger.meters("acme") if m.kind == "gpu_time"]
    assert gpu.closed_at == since
    # it stays down although the desired state is Running, even after a day
    w.clock.advance(timedelta(days=1))
    w.tick()
    assert w.status("job")["phase"] == "Stopped" and not w.kube.pods
    assert {e.key.split(":")[0] for e in charges_after(w, since)} <= {"storage", "meter-fallback"}
    assert all(e.meta.get("quota_gib") == 50 for e in charges_after(w, since) if "storage" in e.key)
    # one second before day 7: data still there
    w.clock.set(since + WEEK - timedelta(seconds=1))
    rec.refresh_account(acct)
    w.tick()
    assert w.kube.pvs and (tmp_path / "data/instances" / NS / "job").exists()
    w.clock.set(since + WEEK + timedelta(minutes=30))
    rec.refresh_account(acct)
    w.tick()
    st = w.status("job")
    assert not w.kube.pvs and not w.kube.pvcs
    assert not (tmp_path / "data/instances" / NS / "job").exists()
    assert "DataDeleted" in w.kube.reasons("job") and "volumeNode" not in st
    assert any(c["type"] == "DataDeleted" and c["status"] == "True" for c in st["conditions"])
    audit = [a for a in w.ledger.audit_events("acme") if a.action == "data.deleted"]
    assert [(a.subject, a.at) for a in audit] == [(f"instance:{NS}/job", since + WEEK)]
    # storage billed exactly up to the deletion instant, not a second more
    last = max(
        (e for e in w.ledger.entries("acme", limit=10_000) if e.key.startswith("storage:")),
        key=lambda e: e.meta["end"],
    )
    # (the last minute, 02:00 -> 02:01, rounds to 0 fen and posts nothing)
    assert "2026-01-08T02:00:00Z" <= last.meta["end"] <= "2026-01-08T02:01:00Z"
    w.clock.advance(timedelta(hours=3))
    before = w.ledger.balance("acme")
    w.tick()
    assert w.ledger.balance("acme") == before  # nothing left to bill


def test_recharge_on_day_6_saves_the_data(world: World, tmp_path: Path) -> None:
    w = world
    rec, sent, acct = into_arrears(w, tmp_path)
    w.tick()
    assert w.status("job")["phase"] == "Stopped"
    w.clock.advance(timedelta(days=6))
    w.tick()
    debt = -w.ledger.balance("acme")
    assert debt > 0
    w.ledger.post_entry("acme", EntryKind.RECHARGE, debt + 500_00, "fund-2", at=w.clock.now())
    rec.refresh_account(acct)
    st = acct["status"]
    assert st["state"] == "Active" and "arrearsSince" not in st and "dataDeletionAt" not in st
    assert sent.sent[-1]["type"] == "ArrearsCleared" and "ArrearsCleared" in w.kube.reasons("acme")
    w.clock.advance(timedelta(days=2))  # past the old deletion date
    rec.refresh_account(acct)
    w.tick()
    assert w.kube.pvs and (tmp_path / "data/instances" / NS / "job/weights.bin").exists()
    assert w.status("job")["phase"] == "Stopped"  # stays stopped until the user starts it
    w.kube.update_spec("gpuinstances", NS, "job", {"state": "Stopped"})
    w.tick()
    w.kube.update_spec("gpuinstances", NS, "job", {"state": "Running"})
    w.tick()
    assert w.status("job")["phase"] == "Running"
