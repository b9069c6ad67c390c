"""Admission: whether a start may go ahead, decided once per start under the account's
admission lock (see ``concurrency``): cloud disks ready, the per-account instance limit,
then the money rule (pay-as-you-go and spot: the available balance must exceed one hour
of the instance, storage quota included; a package: it must cover the term), the
available balance being the balance less what running and stopped-but-unsettled runs owe
and what other admissions reserved (package terms admitted but not charged yet, renewals
due). A spot checkpoint must fit in the preemption notice (``checkpoint_refusal``). The rules
themselves are pure (``start_decision``, ``reserved_by_others``, ``count_active``,
``instance_limit_refusal``, ``checkpoint_refusal``); the mixin feeds them."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from gpucloud import ownership
from gpucloud.billing import (
    BillingMode,
    Decision,
    PriceBook,
    available_balance,
    package_purchase_decision,
    payg_start_decision,
)
from gpucloud.crd.gpuinstance import GPUInstanceSpec
from gpucloud.ledger import NotFound, Unposted
from gpucloud_operator import rules as r
from gpucloud_operator.instances.core import Core, Pass
from gpucloud_operator.instances.kubeapi import PLURAL


def checkpoint_refusal(spec: GPUInstanceSpec, grace_s: int) -> str | None:
    """A spot checkpoint longer than the preemption notice could not run in it: the start
    is refused, naming the field and the rule (the CRD cannot know the operator's
    setting)."""
    checkpoint = spec.spot.checkpoint if spec.spot else None
    if checkpoint is None or checkpoint.timeout_seconds <= grace_s:
        return None
    return (
        f"spec.spot.checkpoint.timeoutSeconds: {checkpoint.timeout_seconds} s is longer than "
        f"the preemption notice ({grace_s} s, the operator's preemption_grace_s); the "
        "checkpoint must fit in it"
    )


def start_decision(
    balance: int,
    unposted: Unposted,
    reserved: int,
    *,
    pb: PriceBook,
    product: str,
    count: int,
    key: str,
    quota_gib: int,
) -> Decision:
    """The money rule of a start in billing mode ``key``: the available balance (the
    balance less what open meters accrued, what stopped runs still owe and what other
    admissions ``reserved``) must exceed one hour of the instance, storage quota
    included (pay-as-you-go, spot), or cover the package term."""
    available = available_balance(
        balance, [unposted.open_minor], [unposted.closed_minor], [reserved]
    )
    mode = r.mode_of(key)
    if mode is BillingMode.PACKAGE:
        return package_purchase_decision(available, product, count, r.period_of(key), pb)
    return payg_start_decision(available, product, count, pb, mode=mode, storage_gib=quota_gib)


def reserved_by_others(
    uid: str,
    account: str,
    mine: dict[str, tuple[str, int]],
    phases: dict[str, tuple[str, str]],
    listed: dict[str, r.Reservation],
) -> int:
    """Minor units the other instances of ``account`` have reserved, each counted once:
    those this process admitted (``mine``: uid -> (account, minor units)) and those the
    instance list shows (``listed``: an earlier process's admissions, renewals due),
    less a listed admission whose phase this process has since seen move on
    (``phases``: uid -> (namespace, phase)), as the list is older than that patch."""
    own = {u: m for u, (a, m) in mine.items() if a == account}
    total = sum(m for u, m in own.items() if u != uid)
    for other, res in listed.items():
        if other == uid or other in own:
            continue
        known = phases.get(other, ("", res.phase))[1]
        if res.phase in r.ADMITTED_PHASES and known not in r.ADMITTED_PHASES:
            continue  # the list is older than this process's own patch
        total += res.minor
    return total


def count_active(phases: dict[str, tuple[str, str]], namespaces: set[str], exclude_uid: str) -> int:
    """Instances in ``namespaces`` that hold a slot of the instance limit (Pending,
    Starting, Running, Stopping), ``exclude_uid`` (the one starting) aside."""
    return sum(
        1
        for uid, (ns, phase) in phases.items()
        if ns in namespaces and uid != exclude_uid and phase in r.ACTIVE_PHASES
    )


def instance_limit_refusal(account: str, active: int, limit: int) -> str | None:
    """Why a start is refused by the account's instance limit, or None."""
    if active < limit:
        return None
    return f"account {account!r} already runs {active} instance(s); its instanceLimit is {limit}"


class Admission(Core):
    """Instance limit, money rule and reservations of a start (``Lifecycle._start``
    calls them)."""

    def _disks_ready(self, p: Pass) -> bool:
        """Every disk in spec.cloudDisks exists, is Ready and is not being deleted; else
        the start is refused before anything is charged (no pod, meter or term yet)."""
        for i, name in enumerate(p.model.cloud_disks or ()):
            disk = self.kube.get_namespaced_object("clouddisks", p.ns, name)
            st = (disk or {}).get("status") or {}
            ready = any(
                c.get("type") == "Ready" and c.get("status") == "True"
                for c in st.get("conditions") or []
            )
            if disk is None:
                reason, why = "CloudDiskNotFound", f"CloudDisk {name!r} does not exist in {p.ns!r}"
            elif disk["metadata"].get("deletionTimestamp"):
                reason, why = "CloudDiskDeleting", f"CloudDisk {name!r} is being deleted"
            elif st.get("phase") != "Ready" or not ready:
                detail = st.get("message") or "not reconciled yet"
                reason, why = "CloudDiskNotReady", f"CloudDisk {name!r} is not Ready ({detail})"
            else:
                continue
            self._refuse(
                p, reason, f"spec.cloudDisks[{i}]: {why}; an attached disk must exist and be Ready"
            )
            return False
        return True

    def _money_rule(self, p: Pass) -> Callable[[int], Decision] | None:
        """The money rule of a start, to be applied to the amount other admissions have
        reserved (None: a paid package term covers the start). The available balance
        is the balance minus what open meters accrued and stopped runs still owe
        (``Ledger.unposted``) minus the reserved amount (``billing.available_balance``)."""
        assert p.pb is not None
        pb = p.pb
        key = p.billing_key
        mode = r.mode_of(key)
        if mode is BillingMode.PACKAGE and r.active_term(p.terms, p.now) is not None:
            return None
        balance, unposted = self.ledger.balance(p.account), self._unposted(p.account, p.now)

        def decide(reserved: int) -> Decision:
            return start_decision(
                balance,
                unposted,
                reserved,
                pb=pb,
                product=p.product,
                count=p.count,
                key=key,
                quota_gib=p.quota,
            )

        return decide

    def _listed_reservations(self, p: Pass) -> dict[str, r.Reservation]:
        """The account's reservations as the (cached) instance list shows them, less
        those the ledger has charged meanwhile."""
        assert p.pb is not None
        namespaces = self._owned(p.account)
        listed = r.reservations(
            self.kube.list_cluster_objects(PLURAL, ttl=2.0), namespaces, p.pb, p.now
        )
        out = {}
        for uid, res in listed.items():
            try:
                self.ledger.get_entry(res.key)
            except NotFound:
                out[uid] = res
        return out

    def _reserved(self, p: Pass, listed: dict[str, r.Reservation]) -> int:
        """Minor units other instances of the account have reserved: those this process
        admitted (in memory, until their phase moves on) and those the list shows (an
        earlier process's admissions, renewals due), each once."""
        with self._guard:
            mine = dict(self._reservations)
            phases = dict(self._phases or {})
        return reserved_by_others(p.uid, p.account, mine, phases, listed)

    def _reserve(self, p: Pass, decision: Decision) -> None:
        """An admitted package start reserves its term until the term is charged (the
        phase leaves Pending/Starting: _note_phase lets it go)."""
        with self._guard:
            self._reservations[p.uid] = (p.account, decision.needed_minor)

    def _unposted(self, account: str, now: datetime) -> Unposted:
        """What the account's runs owe beyond their postings at ``now`` (the memo of
        ``Core._unposted_by_resource``, summed)."""
        return Unposted.summed(self._unposted_by_resource(account, now).values())

    def _owned(self, account: str) -> set[str]:
        """The namespaces billing to ``account`` (not those another Account claimed first)."""
        return ownership.owned(self.kube.list_cluster_objects("accounts", ttl=2.0), account)

    def _admit(
        self,
        p: Pass,
        money: Decision | None,
        budget: Callable[[Decision | None], str | None] | None = None,
    ) -> bool:
        """The Account's spec, the instance limit, then the money rule (decided by
        _money_rule), then the account's budgets (``Budgets._budget_rule``: the start's
        cost against each)."""
        if p.account_spec is None:  # refused by its model: nothing new for it
            self._refuse(p, "InvalidAccount", p.account_refused)
            return False
        limit = p.account_spec.instance_limit
        namespaces = self._owned(p.account)
        refusal = instance_limit_refusal(p.account, self._active_count(namespaces, p.uid), limit)
        if refusal is not None:
            self._refuse(p, "InstanceLimit", refusal)
            return False
        if money is not None and not money.allowed:
            self._refuse(p, "InsufficientBalance", money.message)
            return False
        why = budget(money) if budget is not None else None
        if why is not None:
            self._refuse(p, "BudgetExceeded", why)
            return False
        return True

    def _active_count(self, namespaces: set[str], exclude_uid: str) -> int:
        with self._guard:
            known = self._phases
        if known is None:
            known = {
                i["metadata"]["uid"]: (
                    i["metadata"]["namespace"],
                    (i.get("status") or {}).get("phase") or "",
                )
                for i in self.kube.list_cluster_objects(PLURAL)
            }
            with self._guard:
                self._phases = known
        with self._guard:
            return count_active(self._phases, namespaces, exclude_uid)
