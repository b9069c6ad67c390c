"""What every room of the instance reconciler shares: the Kubernetes calls it makes
(``KubeAPI``), one pass over one instance (``Pass``), and the steps every room takes:
read the pass, patch the status (persisted before anything that depends on it), post an
event, refuse, resolve account, price book and product."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from typing import Any

from gpucloud import ownership
from gpucloud.billing import PriceBook, PriceBookError, UnknownProduct
from gpucloud.crd import SpecError, parse
from gpucloud.crd.account import AccountSpec
from gpucloud.crd.gpuinstance import GPUInstanceSpec
from gpucloud.crd.pricebook import price_book
from gpucloud.gpu_kinds import shared_count_refusal
from gpucloud.ledger import NotFound, Unposted
from gpucloud_operator import builders as b
from gpucloud_operator import rules as r
from gpucloud_operator.currency import mismatch
from gpucloud_operator.instances.concurrency import ReconcilerState
from gpucloud_operator.instances.kubeapi import PLURAL, Obj

log = logging.getLogger("gpucloud.operator.instances")


@dataclass
class Pass:
    """One reconcile pass over one instance."""

    inst: Obj
    now: datetime
    status: Obj
    account: str = ""
    currency: str = ""  # the account's, once resolved
    # the Account's spec as its model reads it; None when the model refuses it, and then
    # ``account_refused`` says why (nothing new is admitted for such an Account)
    account_spec: AccountSpec | None = None
    account_refused: str = ""
    pb: PriceBook | None = None
    # changes to send with the pass's next patch (saves an API call per pass)
    deferred: Obj = field(default_factory=dict)
    acct_status: Obj = field(default_factory=dict)  # the Account's status (arrears)
    # What the watch event that started the pass said, so the pass need not ask again:
    # the instance's pod as the event showed it, or that its claim is Bound.
    pod_seen: Obj | None = None
    claim_bound: bool = False
    # the run's pod uid, once a Running pass saw that pod still runs (a refresh ticket)
    pod_uid: str = ""

    @property
    def meta(self) -> Obj:
        return self.inst["metadata"]

    @property
    def spec(self) -> Obj:
        return self.inst["spec"]

    @cached_property
    def model(self) -> GPUInstanceSpec:
        """The spec as the CRD's model reads it (defaults applied); SpecError names the
        field and the rule when it refuses (``Core._admit_spec``)."""
        return parse(GPUInstanceSpec, self.inst.get("spec"))

    @property
    def ns(self) -> str:
        return self.meta["namespace"]

    @property
    def name(self) -> str:
        return self.meta["name"]

    @property
    def uid(self) -> str:
        return self.meta["uid"]

    @property
    def resource(self) -> str:
        return f"{self.ns}/{self.name}"

    @property
    def product(self) -> str:
        return self.model.gpu.product

    @property
    def gpu_resource(self) -> str:
        return r.resource_of(self.pb, self.product)

    @property
    def count(self) -> int:
        return self.model.gpu.count

    @property
    def quota(self) -> int:
        return self.model.quota_gi

    @property
    def billing_key(self) -> str:
        return r.billing_key(self.model.billing.dump())

    @property
    def phase(self) -> str | None:
        return self.status.get("phase")

    @property
    def terms(self) -> list[Obj]:
        return list(self.status.get("packageTerms") or [])


class Core(ReconcilerState):
    """The steps every room takes; the rooms are mixins of ``InstanceReconciler``."""

    def _pass(self, inst: Obj, **seen: Any) -> Pass:
        return Pass(
            inst=inst,
            now=r.second(self.clock.now()),
            status=dict(inst.get("status") or {}),
            **seen,
        )

    def _patch(self, p: Pass, changes: Obj) -> None:
        """Persist at once: later steps (and a restart) rely on it."""
        changes, p.deferred = {**p.deferred, **changes}, {}
        changes = {k: v for k, v in changes.items() if p.status.get(k) != v}
        if not changes:
            return
        patched = self.kube.patch_status(PLURAL, p.ns, p.name, changes)
        with self._guard:
            self._status_written.add(p.uid)
        self._saw_version(p.uid, patched)
        if "phase" in changes:
            self._note_phase(p.uid, p.ns, changes["phase"])
        for k, v in changes.items():
            if v is None:
                p.status.pop(k, None)
            else:
                p.status[k] = v

    def _pass_at(self, p: Pass, at: datetime) -> None:
        """Ask for a pass over this incarnation of the instance at clock instant ``at``,
        so a deadline is kept to the second (the sweeper checks its schedule every real
        second). Without a sweeper (unit tests' reconcilers), a delayed call counted in
        real seconds from the pass's instant."""
        if self.sweeper is not None:
            self.sweeper.earlier(p.uid, p.ns, p.name, at)
            return
        delay = (at - p.now).total_seconds()
        if delay <= 0:
            return  # due now: this pass is the one
        ns, name, uid = p.ns, p.name, p.uid
        self._later.call(delay, lambda: self._reconcile_fresh(ns, name, uid, wait=True))

    def _reconcile_fresh(self, namespace: str, name: str, uid: str, *, wait: bool) -> None:
        raise NotImplementedError  # the reconciler's entry point (``InstanceReconciler``)

    def _conditions(self, p: Pass, *conds: tuple[str, bool | str, str, str]) -> list[Obj]:
        new = [b.condition(t, s, reason, msg, r.fmt(p.now)) for t, s, reason, msg in conds]
        return b.merge_conditions(p.status.get("conditions"), new)

    def _event(self, p: Pass, type_: str, reason: str, message: str) -> None:
        self.kube.event(p.inst, type_, reason, message)

    def _refuse(self, p: Pass, reason: str, message: str) -> None:
        if p.phase == "Refused" and p.status.get("message") == message:
            return
        if p.phase in ("Pending", "Starting"):
            self.kube.delete_pod(p.ns, b.pod_name(p.name))  # not billed yet: just withdraw
        if p.phase in ("Running", "Stopping"):
            # e.g. the price book lost the product of a running instance: it keeps running
            # and billing at the meter's price; say so, but do not pretend it was refused
            self._patch(p, {"conditions": self._conditions(p, ("Billing", False, reason, message))})
            return
        self._patch(
            p,
            {
                "phase": "Refused",
                "message": message,
                "conditions": self._conditions(p, ("Ready", False, reason, message)),
            },
        )
        self._event(p, "Warning", reason, message)

    def _admit_spec(self, p: Pass) -> bool:
        """False (after a refusal naming the field and rule) if the models refuse the
        spec: the API server enforces the same schema, so only a drifted CRD or an
        object written around it gets here."""
        try:
            p.model  # noqa: B018 (parsed once per pass, here first)
        except SpecError as exc:
            self._refuse(p, "InvalidSpec", str(exc))
            return False
        return True

    def _resolve(self, p: Pass) -> bool:
        """Account, price book and product; False (after a refusal) if one is missing."""
        accounts = self.kube.list_cluster_objects("accounts", ttl=2.0)
        acct = ownership.account_for(accounts, p.ns)  # the first claim wins a conflict
        if acct is None:
            if p.phase not in r.ACTIVE_PHASES:
                self._refuse(
                    p,
                    "NoAccount",
                    f"no Account lists namespace {p.ns!r} in spec.namespaces; "
                    "ask an admin to add it",
                )
            return False
        p.account = acct["metadata"]["name"]
        p.acct_status = acct.get("status") or {}
        if not self._account_spec(p, acct):
            return False
        if p.account not in self._ledger_accounts:
            self.ledger.ensure_account(p.account, p.currency)
            self._ledger_accounts.add(p.account)
        pb_obj = self.kube.get_pricebook(self.cfg.pricebook)
        if pb_obj is None:
            self._refuse(p, "NoPriceBook", f"PriceBook {self.cfg.pricebook!r} does not exist")
            return False
        try:
            p.pb = self._pricebook(pb_obj)
            price = p.pb.gpu_price(p.product)
        except UnknownProduct as exc:
            self._refuse(p, "UnknownProduct", f"spec.gpu.product: {exc}")
            return False
        except PriceBookError as exc:
            self._refuse(p, "InvalidPriceBook", str(exc))
            return False
        if why := shared_count_refusal(p.product, price.unit_kind, p.count, "an instance"):
            self._refuse(p, "SharedGPUCount", why)
            return False
        if wrong := mismatch(p.account, p.currency, self.cfg.pricebook, p.pb.currency):
            self._refuse(p, "CurrencyMismatch", wrong)
            return False
        return True

    def _account_spec(self, p: Pass, acct: Obj) -> bool:
        """The Account's spec through its model. One the model refuses admits nothing new
        (``_admit``); what already runs bills on to the ledger account it had when valid
        (its currency is fixed there), so usage is neither lost nor charged elsewhere.
        False (after a refusal) when there is no such ledger account: nothing to bill."""
        try:
            p.account_spec = parse(AccountSpec, acct.get("spec"))
        except SpecError as exc:
            p.account_refused = (
                f"Account {p.account!r} has a spec the models refuse ({exc}); it admits no "
                "new instance until an admin fixes it"
            )
            try:
                p.currency = self.ledger.get_account(p.account).currency
            except NotFound:
                if p.phase not in r.ACTIVE_PHASES:
                    self._refuse(p, "InvalidAccount", p.account_refused)
                return False
            return True
        p.currency = p.account_spec.currency
        return True

    def _unposted_by_resource(self, account: str, now: datetime) -> dict[str, Unposted]:
        """The ledger's estimate of what the account's runs owe beyond their postings at
        ``now`` (whole seconds), per resource, computed once per account and second: it
        walks every unsettled meter of the account, and a burst of starts on a big
        account asked for the same second's figure over and over (the one-hour rule and
        budgets read it). A start changes no accrual (a new run starts at zero); the
        figure is reused for one second of real time at most, as usage the agents send
        meanwhile refines it (an injected clock may stand still)."""
        with self._guard:
            hit = self._accrual_memo.get(account)
        if hit is not None and hit[0] == now and time.monotonic() - hit[1] < self.accrual_reuse_s:
            return hit[2]
        value = self.ledger.unposted_by_resource(account, now)
        with self._guard:
            self._accrual_memo[account] = (now, time.monotonic(), value)
        return value

    def _pricebook(self, obj: Obj) -> PriceBook:
        """Parsed once per resourceVersion."""
        version = obj["metadata"].get("resourceVersion", "")
        cached = self._pb_cache
        if cached is None or cached[0] != version:
            cached = (version, price_book(obj))
            self._pb_cache = cached
        return cached[1]
