"""Arrears: the pure decisions (no I/O, ``now`` passed in) and the account's burn rate.

The seed: "If the balance is insufficient, we will notify you. If the balance cannot
cover instance and storage fees, instances will be shut down. If your account is in
arrears, we will retain your data for 7 days, after which it will be deleted."

As implemented (docs/arrears.md):
- *Arrears* when the balance cannot cover the fees: the balance is negative, or the
  available balance (balance minus what running meters accrued) is negative, or the
  balance is zero while something is billed per hour.
- *LowBalance* (a warning) when not in arrears and the available balance lasts less than
  the largest runway notice tier (``spec.runwayNoticeHours``, default 24) at the current
  burn rate.
- *Runway notices*: one per tier (``runway_notice``) when the runway falls below it, once
  per episode; an episode ends when the runway is back at or above the largest tier (or
  nothing burns). A pass that finds several tiers newly crossed sends one notice, for the
  lowest (the most urgent), and counts the ones above it as sent. None while in arrears
  (the Arrears notice says more).
- The countdown starts at the first instant arrears were seen (``arrearsSince``) and
  runs while arrears last without interruption; data is deleted at
  ``arrearsSince + retention``. Leaving arrears (a recharge) clears it at once.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from gpucloud.billing import (
    BillingMode,
    InstanceLoad,
    PriceBook,
    burn_rate_per_hour,
    from_minor,
    hours_affordable,
)
from gpucloud_operator import rules as r

Obj = dict[str, Any]
ACTIVE, LOW, ARREARS = "Active", "LowBalance", "Arrears"


@dataclass(frozen=True)
class Assessment:
    state: str  # Active | LowBalance | Arrears
    hours_left: Decimal | None  # None: nothing burns
    arrears_since: datetime | None
    data_deletion_at: datetime | None

    @property
    def in_arrears(self) -> bool:
        return self.state == ARREARS

    def deletion_due(self, now: datetime) -> bool:
        return self.data_deletion_at is not None and now >= self.data_deletion_at


def in_arrears(balance_minor: int, available_minor: int, burn_per_hour: Decimal) -> bool:
    """The balance cannot cover instance and storage fees."""
    return balance_minor < 0 or available_minor < 0 or (balance_minor == 0 and burn_per_hour > 0)


def assess(
    *,
    balance_minor: int,
    available_minor: int,
    currency: str,
    burn_per_hour: Decimal,
    warning_hours: int,
    arrears_since: datetime | None,
    now: datetime,
    retention: timedelta,
) -> Assessment:
    """The account's state at ``now``. ``arrears_since`` is the start of the arrears the
    account was already in (from its status), kept so the countdown does not restart."""
    if warning_hours < 1:
        raise ValueError("spec.runwayNoticeHours: tiers must be >= 1")
    if retention <= timedelta(0):
        raise ValueError("arrears_retention_s: must be > 0")
    hours = hours_affordable(from_minor(max(available_minor, 0), currency), burn_per_hour)
    if in_arrears(balance_minor, available_minor, burn_per_hour):
        since = arrears_since if arrears_since is not None and arrears_since <= now else now
        return Assessment(ARREARS, hours, since, since + retention)
    state = LOW if hours is not None and hours < warning_hours else ACTIVE
    return Assessment(state, hours, None, None)


def runway_notice(
    hours_left: Decimal | None,
    tiers: Sequence[int],
    noticed: int | None,
    in_arrears: bool,
) -> tuple[int | None, int | None]:
    """(the lowest tier noticed in the episode after this pass, the tier to notify now).
    ``noticed``: the lowest tier already noticed in the current episode (None: no
    episode); a tier at or above it counts as sent."""
    if not tiers:
        raise ValueError("spec.runwayNoticeHours: at least one tier")
    if hours_left is None or hours_left >= max(tiers):
        return None, None  # no episode, or it ended (a recharge, nothing burning)
    if in_arrears:
        return noticed, None
    tier = min(t for t in tiers if hours_left < t)
    if noticed is not None and tier >= noticed:
        return noticed, None
    return tier, tier


def instance_load(inst: Obj, now: datetime) -> InstanceLoad | None:
    """One GPUInstance as the burn rate sees it (None once released)."""
    spec, st = inst.get("spec") or {}, inst.get("status") or {}
    if st.get("phase") == "Released" or inst["metadata"].get("deletionTimestamp"):
        return None
    key = st.get("billingMode") or r.billing_key(spec["billing"])
    terms = st.get("packageTerms") or []
    return InstanceLoad(
        product=spec["gpu"]["product"],
        gpu_count=int(spec["gpu"].get("count", 1)),
        mode=r.mode_of(key),
        running=st.get("phase") in ("Running", "Starting", "Stopping"),
        storage_gib=int((spec.get("storage") or {}).get("quotaGi", 50))
        if st.get("storageSince")
        else 0,
        package_active=r.mode_of(key) is BillingMode.PACKAGE
        and r.active_term(terms, now) is not None,
    )


def used_bytes(items: Iterable[Obj]) -> int:
    """Last measured bytes of CloudDisks or Images whose data still exists."""
    return sum(
        int((i.get("status") or {}).get("usedBytes") or 0)
        for i in items
        if (i.get("status") or {}).get("phase") not in ("Deleted", "Failed")
    )


def account_burn_rate(
    pb: PriceBook,
    instances: Iterable[Obj],
    disks: Iterable[Obj],
    images: Iterable[Obj],
    now: datetime,
) -> Decimal:
    """What the account spends per hour now, in currency units (the billing core)."""
    loads = [x for x in (instance_load(i, now) for i in instances) if x is not None]
    return burn_rate_per_hour(
        pb, loads, cloud_disk_bytes=used_bytes(disks), image_bytes=used_bytes(images)
    )


def deletion_confirmed(kube: Any, ledger: Any, account: str, now: datetime) -> bool:
    """Data is deleted only when a fresh read confirms it: the Account (not a cached
    copy) is still in arrears with a deletion date that has passed, and the ledger still
    shows the debt (a recharge the account reconciler has not seen yet saves the data)."""
    acct = next(
        (a for a in kube.list_cluster_objects("accounts") if a["metadata"]["name"] == account),
        None,
    )
    st = (acct or {}).get("status") or {}
    due = r.parse(st.get("dataDeletionAt"))
    if st.get("state") != ARREARS or due is None or now < due:
        return False
    return ledger.balance(account) <= 0 or ledger.available_balance(account, now) < 0
