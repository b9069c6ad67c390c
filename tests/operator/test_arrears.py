"""Arrears: the pure decisions with an injected clock, and the account/instance
reconcilers enforcing them against a real SQLite ledger (opworld)."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import pytest
import yaml
from gpucloud_agent.wipe import remove, resolve
from gpucloud_operator import arrears as ar
from gpucloud_operator.accounts import AccountReconciler
from gpucloud_operator.notify import Notifier
from opworld import NS, ROOT, T0, World

from gpucloud.billing import PackagePeriod, Term, leave_package
from gpucloud.crd.pricebook import price_book
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
    with pytest.raises(ValueError, match="runwayNoticeHours"):
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
    # the burn rate the verdict used, published for the console's runway (exact)
    assert acct["status"]["costPerHour"] == "5.22"
    # 2 h left: the low-balance warning, and one runway notice, for the lowest tier crossed
    assert [(m["type"], m.get("tier")) for m in sent.sent] == [
        ("LowBalanceWarning", None),
        ("account.runway", 3),
    ]
    assert "LowBalanceWarning" in w.kube.reasons("acme")
    w.clock.advance(timedelta(hours=1, minutes=59))
    rec.refresh_account(acct)
    assert acct["status"]["state"] == "LowBalance"  # still covered
    w.clock.advance(timedelta(minutes=2))  # 2 h 01 min: available < 0
    rec.refresh_account(acct)
    st = acct["status"]
    assert st["state"] == "Arrears" and st["arrearsSince"] == "2026-01-01T02:01:00Z"
    assert st["dataDeletionAt"] == "2026-01-08T02:01:00Z"
    assert [(m["type"], m.get("tier")) for m in sent.sent] == [
        ("LowBalanceWarning", None),
        ("account.runway", 3),
        ("account.runway", 1),  # 1 min left at 1 h 59 min
        ("Arrears", None),
    ]
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
    node = w.status("job")["volumeNode"]
    w.clock.set(since + WEEK + timedelta(minutes=30))
    rec.refresh_account(acct)
    w.tick()
    st = w.status("job")
    assert not w.kube.pvs and not w.kube.pvcs and "volumeNode" not in st
    # the folder is node-local: the node's agent removes it, asked through the ledger
    folder = tmp_path / "data/instances" / NS / "job"
    (wipe,) = w.ledger.pending_wipes(node)
    assert wipe.path == f"instances/{NS}/job" and wipe.requested_at == since + WEEK
    assert folder.exists() and "DataDeleted" not in w.kube.reasons("job")
    (cond,) = [c for c in st["conditions"] if c["type"] == "DataDeleted"]
    assert (cond["status"], cond["reason"]) == ("False", "WipePending")
    w.tick()  # still pending: nothing changes
    assert w.status("job")["conditions"] == st["conditions"]
    freed = remove(resolve(tmp_path / "data", wipe.path))  # what the agent does
    assert freed is not None and freed >= 10_000 and not folder.exists()
    w.ledger.complete_wipe(wipe.id, node, freed, w.clock.now())
    w.tick()
    st = w.status("job")
    assert "DataDeleted" in w.kube.reasons("job")
    (cond,) = [c for c in st["conditions"] if c["type"] == "DataDeleted"]
    assert cond["status"] == "True" and f"{freed} bytes freed on node {node}" in cond["message"]
    audit = [a for a in w.ledger.audit_events("acme") if a.action == "data.deleted"]
    assert [(a.subject, a.at) for a in audit] == [(f"instance:{NS}/job", since + WEEK)]
    assert audit[0].detail["bytes_freed"] == freed
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


def test_a_start_waits_until_a_pending_wipe_of_its_path_is_done(world: World) -> None:
    """An instance re-created under a deleted one's name would place its volume at the
    folder the agent is about to remove: it waits for the wipe."""
    w = world
    w.fund(100_00)
    old = w.ledger.request_wipe(
        "gpu-node-x", f"instances/{NS}/job", "instance-volume:old-uid:1", "acme", w.clock.now()
    )
    w.instance("job", "NVIDIA-L40S")
    w.tick()
    st = w.status("job")
    assert st.get("phase") is None and not w.kube.pods and not w.kube.pvs
    assert "waiting for the agent of node 'gpu-node-x'" in st["message"]
    w.ledger.complete_wipe(old.id, "gpu-node-x", 0, w.clock.now())
    w.tick()
    assert w.status("job")["phase"] == "Running"


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


def test_arrears_shutdown_refunds_the_unused_package_term_once(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A day package (L40S 112.00) shut down by arrears 5 h into its term: the 5 h are
    kept at the pay-as-you-go rate (5 x 5.20 = 26.00), 86.00 comes back and pays the debt.
    A pass killed right after the refund repeats nothing."""
    w = world
    w.fund(112_00)
    w.instance("pkg", "NVIDIA-L40S", mode="Package", period="Day")
    w.tick()
    st = w.status("pkg")
    assert st["phase"] == "Running" and w.ledger.balance("acme") == 0
    uid = w.kube.instance(NS, "pkg")["metadata"]["uid"]
    since = T0 + timedelta(hours=5)
    w.clock.set(since)
    w.ledger.post_entry("acme", EntryKind.ADJUSTMENT, -1_00, "late-fee", at=since)
    rec = accounts(w, Recorder())
    acct = w.kube.cluster[("accounts", "acme")]
    rec.refresh_account(acct)
    assert acct["status"]["state"] == "Arrears"
    assert acct["status"]["arrearsSince"] == "2026-01-01T05:00:00Z"
    w.clock.advance(timedelta(seconds=40))  # the instance's pass comes a little later

    class Killed(Exception):
        pass

    def killed(*_a: object, **_k: object) -> None:
        raise Killed

    monkeypatch.setattr(w.rec, "_stop", killed)  # SIGKILL right after the refund
    with pytest.raises(Killed):
        w.tick("pkg")
    w.restart()
    w.tick("pkg")
    w.tick("pkg")
    st = w.status("pkg")
    assert st["phase"] == "Stopped" and "ArrearsShutdown" in w.kube.reasons("pkg")
    (refund,) = [e for e in w.ledger.entries("acme", limit=1000) if e.kind is EntryKind.REFUND]
    assert (refund.key, refund.amount_minor, refund.at) == (f"package-refund:{uid}:1", 86_00, since)
    assert refund.meta["used_minor"] == 26_00 and "shut down by arrears" in refund.memo
    assert w.ledger.balance("acme") == -1_00 + 86_00  # the refund paid the debt
    assert st["packageTerms"][0]["end"] == "2026-01-01T05:00:00Z"
    assert "packageExpiresAt" not in st
    # storage is billed again from the shutdown (outside the term): 50 GiB x 0.0004/h
    w.clock.set(since + timedelta(hours=10))
    w.tick("pkg")
    storage = [e for e in w.ledger.entries("acme", limit=1000) if e.key.startswith("storage:")]
    assert sum(-e.amount_minor for e in storage) == 10 * 2  # 0.02/h for 10 h
    rec.refresh_account(acct)
    assert acct["status"]["state"] != "Arrears"
    # starting again costs a new term: 85.00 - 0.20 does not cover 112.00
    w.kube.update_spec("gpuinstances", NS, "pkg", {"state": "Stopped"})
    w.tick("pkg")
    w.kube.update_spec("gpuinstances", NS, "pkg", {"state": "Running"})
    w.tick("pkg")
    assert w.status("pkg")["phase"] == "Refused"
    assert [e.key for e in w.ledger.entries("acme", limit=1000) if e.kind is EntryKind.REFUND] == [
        f"package-refund:{uid}:1"
    ]


def test_shutdown_refund_reading_of_the_billing_core() -> None:
    """The rule the arrears shutdown applies (docs/billing.md, reading 10): used time at
    the pay-as-you-go rate, capped at the prepaid amount, the rest refunded."""
    pb = price_book(yaml.safe_load((ROOT / "examples/pricebook.yaml").read_text()))
    term = Term.starting(T0, PackagePeriod.DAY)
    early = leave_package(pb, "NVIDIA-L40S", 1, term, 112_00, T0 + timedelta(hours=5))
    assert (early.used_minor, early.refund_minor, early.capped) == (26_00, 86_00, False)
    # 2 GPUs, 1 h 00 min 01 s: 10.40 x 3601/3600 = 10.4028.. -> 10.40
    two = leave_package(pb, "NVIDIA-L40S", 2, term, 224_00, T0 + timedelta(seconds=3601))
    assert (two.used_minor, two.refund_minor) == (10_40, 213_60)
    # 22 h at 5.20 = 114.40 > 112.00 prepaid: nothing back, nothing more owed
    late = leave_package(pb, "NVIDIA-L40S", 1, term, 112_00, T0 + timedelta(hours=22))
    assert (late.used_minor, late.refund_minor, late.capped) == (112_00, 0, True)
