"""Account status, Recharge and RechargeReview reconciliation (ledger <-> resources).

The three specs are read through their CRD models (``gpucloud.crd``), defaults
included. A spec the models refuse (written before a schema tightened, or around the
API server's validation) gets ``Valid=False`` (Account, Recharge) or ``Applied=False``
(RechargeReview), reason ``InvalidSpec``, and a Warning event, both naming the field and
the rule; nothing is submitted to or credited in the ledger for it, and no ledger
account is made for it (docs/operator.md, "Accounts and recharges")."""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Callable
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from gpucloud import ownership
from gpucloud.billing import (
    BillingError,
    BillingMode,
    available_balance,
    format_money,
    parse_amount,
    to_minor,
)
from gpucloud.clock import Clock
from gpucloud.crd import SpecError, parse
from gpucloud.crd.account import AccountSpec
from gpucloud.crd.pricebook import price_book
from gpucloud.crd.recharge import Online, RechargeSpec
from gpucloud.crd.rechargereview import RechargeReviewSpec
from gpucloud.ledger import (
    IdempotencyConflict,
    Ledger,
    NotFound,
    Order,
    OrderStatus,
    ReviewRefused,
    Unposted,
    Voucher,
    VoucherStatus,
)
from gpucloud.recharge import SandboxProvider
from gpucloud_operator import arrears as ar
from gpucloud_operator import budgets as bu
from gpucloud_operator import builders as b
from gpucloud_operator import rules as r
from gpucloud_operator.account_notices import AccountNotices
from gpucloud_operator.config import OperatorConfig
from gpucloud_operator.instances import KubeAPI
from gpucloud_operator.metrics import AccountMetrics, NoticeCounters
from gpucloud_operator.notify import Notifier, payload, webhook_url
from gpucloud_operator.runout import Alarms, run_out_at

log = logging.getLogger("gpucloud.operator.accounts")
Obj = dict[str, Any]


def _condition(status: Obj, type_: str) -> tuple[str, str] | None:
    """(status, message) of a condition, or None."""
    for c in status.get("conditions") or []:
        if c.get("type") == type_:
            return str(c.get("status")), str(c.get("message"))
    return None


def _valid_reason(status: Obj) -> str | None:
    """The reason of the Valid condition, or None."""
    return next(
        (c.get("reason") for c in status.get("conditions") or [] if c.get("type") == "Valid"),
        None,
    )


def account_state(balance_minor: int, available_minor: int) -> str:
    """Arrears when the balance is negative; LowBalance when running resources have
    accrued more than what is left; else Active."""
    if balance_minor < 0:
        return "Arrears"
    if available_minor <= 0 < balance_minor or available_minor < 0:
        return "LowBalance"
    return "Active"


def money(minor: int, currency: str) -> str:
    return format_money(minor, currency).split()[0]


REVIEWER = "gpucloud.dev/reviewer"
SUBMITTER = "gpucloud.dev/submitter"


def submitter(rc: Obj) -> str:
    """Who submitted a Recharge, for the audit trail: the annotation the chart's
    admission policy makes equal to the creating user, else the Recharge itself."""
    meta = rc["metadata"]
    user = (meta.get("annotations") or {}).get(SUBMITTER)
    return str(user) if user else f"recharge:{meta['namespace']}/{meta['name']}"


def review_mismatch(review: RechargeReviewSpec, recharge: RechargeSpec, rc: Obj) -> str | None:
    """What differs between what the admin saw (pinned in the review) and the Recharge
    ``rc`` (whose spec is ``recharge``) and its voucher now; None when they match."""
    ref = review.recharge_ref
    if ref.uid != rc["metadata"].get("uid"):
        return (
            f"spec.rechargeRef.uid: the review is for Recharge {ref.uid!r}, "
            f"{ref.name!r} is now {rc['metadata'].get('uid')!r}"
        )
    if Decimal(review.amount) != Decimal(recharge.amount):  # both exact decimal strings
        return (
            f"spec.amount: the review is for {review.amount}, the Recharge is for {recharge.amount}"
        )
    order_id = (rc.get("status") or {}).get("orderId")
    if review.voucher_id != order_id:
        return (
            f"spec.voucherId: the review is for voucher {review.voucher_id!r}, the "
            f"Recharge's is {order_id!r}"
        )
    return None


def account_refused(name: str, exc: SpecError) -> str:
    """Why nothing is credited to an Account whose spec the models refuse."""
    return (
        f"spec.account: Account {name!r} has a spec the models refuse ({exc}); nothing is "
        "credited to it until an admin fixes it"
    )


class AccountReconciler:
    def __init__(
        self,
        kube: KubeAPI,
        ledger: Ledger,
        clock: Clock,
        cfg: OperatorConfig,
        notifier: Notifier | None = None,
        metrics: AccountMetrics | None = None,
        counters: NoticeCounters | None = None,
        alarms: Alarms | None = None,
        wake_instance: Callable[[str, str, str], None] | None = None,
    ) -> None:
        self.kube, self.ledger, self.clock, self.cfg = kube, ledger, clock, cfg
        self.notifier = notifier or Notifier()
        self.metrics = metrics
        self.notices = AccountNotices(kube, ledger, self.notifier, counters)
        # enforcement at the run-out instant (gpucloud_operator.runout): the next pass is
        # asked for then, and entering arrears starts a pass of each active instance
        # (``wake_instance(namespace, name, uid)``, which should not wait for the pass:
        # main hands it to a pool) instead of waiting for its tick
        self.alarms = alarms
        self.wake_instance = wake_instance
        # one pass per account at a time: the Kopf handlers and the alarms both call it
        self._locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)
        self._alarm_written: set[str] = set()  # status patched by an alarm's pass
        self._guard = threading.Lock()  # leaf: over _locks and _alarm_written only

    # -- arrears (docs/arrears.md) ----------------------------------------------------
    def _assess(
        self,
        acct: Obj,
        tiers: tuple[int, ...],
        balance: int,
        available: int,
        owed: int,
        currency: str,
        now: datetime,
        namespaces: set[str],
    ) -> tuple[ar.Assessment, Decimal]:
        """The verdict, and the burn rate (currency units per hour) it was made with."""

        # stopped runs not yet settled count as owed (``Ledger.unposted``; the ledger, not
        # the cached, lagging instance status, says which ones): the available balance
        # already deducts them, the balance the rules judge does too
        balance -= owed
        burn = self._burn(acct["metadata"]["name"], namespaces, now)
        status = acct.get("status") or {}
        verdict = ar.assess(
            balance_minor=balance,
            available_minor=available,
            currency=currency,
            burn_per_hour=burn,
            warning_hours=max(tiers),  # LowBalance: below the largest runway tier
            arrears_since=r.parse(status.get("arrearsSince")),
            now=now,
            retention=self.cfg.arrears_retention,
        )
        return verdict, burn

    def _burn(self, name: str, namespaces: set[str], now: datetime) -> Decimal:
        """What the account's instances, cloud disks and images in ``namespaces`` cost per
        hour now (currency units); 0 without a usable price book."""

        def mine(plural: str) -> list[Obj]:
            return [
                o
                for o in self.kube.list_cluster_objects(plural, ttl=2.0)
                if o["metadata"].get("namespace") in namespaces
            ]

        pb_obj = self.kube.get_pricebook(self.cfg.pricebook)
        if pb_obj is None:
            return Decimal(0)
        try:
            return ar.account_burn_rate(
                price_book(pb_obj), mine("gpuinstances"), mine("clouddisks"), mine("images"), now
            )
        except BillingError as exc:  # a bad price book must not stop enforcement
            log.error("burn rate of %s: %s", name, exc)
            return Decimal(0)

    def webhook_url(self, spec: AccountSpec) -> str:
        """The Account's own webhook, else the installation's."""
        return webhook_url(spec, self.cfg.webhook_url)

    def _notify_transitions(
        self,
        acct: Obj,
        spec: AccountSpec,
        status: Obj,
        verdict: ar.Assessment,
        new: Obj,
        now: datetime,
    ) -> list[Obj]:
        """Event + condition + webhook on entering/leaving arrears and on the low-balance
        warning; conditions remember what was already sent, so each is sent once."""
        name = acct["metadata"]["name"]
        old = {c["type"]: c.get("status") for c in status.get("conditions") or []}
        conds: list[Obj] = []
        url = self.webhook_url(spec)
        figures = {"balance": new["balance"], "available": new["available"]}
        hours = verdict.hours_left
        warn = verdict.state in (ar.LOW, ar.ARREARS)
        if warn and old.get("LowBalanceWarning") != "True":
            lasts = "nothing left" if hours is None or hours <= 0 else f"about {hours:.1f} h left"
            msg = (
                f"balance {new['balance']} {new['currency']} is low: {lasts} at the current "
                "burn rate; recharge to avoid a shutdown"
            )
            conds.append(b.condition("LowBalanceWarning", True, "LowBalance", msg, r.fmt(now)))
            self.kube.event(acct, "Warning", "LowBalanceWarning", msg)
            self.notifier.notify(url, payload("LowBalanceWarning", name, msg, now, **figures))
        elif not warn and old.get("LowBalanceWarning") == "True":
            conds.append(
                b.condition(
                    "LowBalanceWarning", False, "Funded", "balance is sufficient", r.fmt(now)
                )
            )
        if verdict.in_arrears and old.get("Arrears") != "True":
            msg = (
                f"account is in arrears (balance {new['balance']} {new['currency']}): running "
                f"instances are shut down; data is kept until {new['dataDeletionAt']}, then "
                "deleted unless the debt is cleared"
            )
            conds.append(b.condition("Arrears", True, "Arrears", msg, r.fmt(now)))
            self.kube.event(acct, "Warning", "ArrearsShutdown", msg)
            self.notifier.notify(
                url,
                payload(
                    "Arrears",
                    name,
                    msg,
                    now,
                    arrearsSince=new["arrearsSince"],
                    dataDeletionAt=new["dataDeletionAt"],
                    **figures,
                ),
            )
        elif not verdict.in_arrears and old.get("Arrears") == "True":
            msg = "arrears cleared: the data deletion countdown stopped; start instances again"
            conds.append(b.condition("Arrears", False, "Cleared", msg, r.fmt(now)))
            self.kube.event(acct, "Normal", "ArrearsCleared", msg)
            self.notifier.notify(url, payload("ArrearsCleared", name, msg, now, **figures))
        return conds

    # -- Account --------------------------------------------------------------------
    def refresh_named(self, name: str) -> None:
        """A pass over the Account ``name`` as it is now (an alarm's pass: read fresh,
        the one object: a list of every Account per alarm cost the operator's CPU)."""
        self.refresh_account({"metadata": {"name": name}}, fresh=True)

    def refresh_account(self, acct: Obj, *, fresh: bool = False) -> None:
        """One pass over the Account, one at a time per account. The body is read again
        under the lock when ``fresh`` is asked for, or when an alarm's pass has patched
        the status since Kopf last saw it: a Kopf body older than that pass's patch would
        announce the same transition twice (an Arrears webhook sent again)."""
        name = acct["metadata"]["name"]
        with self._guard:
            lock = self._locks[name]
        with lock:
            with self._guard:
                stale = name in self._alarm_written
                self._alarm_written.discard(name)
            if fresh or stale:
                read = self.kube.get_cluster_object("accounts", name)
                if read is None:
                    return
                acct = read
            if self._refresh(acct) and fresh:
                with self._guard:
                    self._alarm_written.add(name)

    def _refresh(self, acct: Obj) -> bool:
        """The pass; True if it patched the Account's status."""
        name = acct["metadata"]["name"]
        now = r.second(self.clock.now())
        status = dict(acct.get("status") or {})
        refused = ""
        try:
            spec = parse(AccountSpec, acct.get("spec"))
        except SpecError as exc:  # the CRD refuses it: an older object, or one written around it
            refused = str(exc)
            held = self._held_spec(name)
            if held is None:
                self._invalid_spec(acct, status, refused, now)
                return False
            spec = held
        currency = spec.currency
        self.ledger.ensure_account(name, currency)
        model = None if refused else spec  # a refused spec sets no budget
        tiers = spec.runway_tiers()
        balance = self.ledger.balance(name)
        by_resource = self.ledger.unposted_by_resource(name, now)
        unposted = Unposted.summed(by_resource.values())
        available = available_balance(balance, [unposted.open_minor], [unposted.closed_minor])
        # this body is fresher than the cached list (a new Account may not be in it yet)
        accounts = [
            *(a for a in self.kube.list_cluster_objects("accounts", ttl=2.0)
              if a["metadata"]["name"] != name),
            acct,
        ]  # fmt: skip
        namespaces = ownership.owned(accounts, name)
        running = sum(
            1
            for i in self.kube.list_cluster_objects("gpuinstances", ttl=2.0)
            if i["metadata"]["namespace"] in namespaces
            and (i.get("status") or {}).get("phase") in ("Running", "Starting")
        )
        # arrears, low-balance warning and their notifications (gpucloud_operator.arrears)
        verdict, burn = self._assess(
            acct, tiers, balance, available, unposted.closed_minor, currency, now, namespaces
        )
        url = self.webhook_url(spec)
        budget_pass = self.notices.budget(
            acct,
            model,
            status,
            currency,
            now,
            {res: u.total_minor for res, u in by_resource.items()},
            url,
        )
        if self.metrics is not None:
            self.metrics.observe(
                name,
                currency,
                balance_minor=balance,
                available_minor=available,
                cost_per_hour=burn,
                in_arrears=verdict.in_arrears,
                data_deletion_at=verdict.data_deletion_at,
                budget_ratios=budget_pass.ratios,
            )
        state = verdict.state
        new = {
            "balance": money(balance, currency),
            "available": money(available, currency),
            "currency": currency,
            "runningInstances": running,
            "state": state,
            "observedGeneration": acct["metadata"].get("generation"),
            "arrearsSince": r.fmt(verdict.arrears_since) if verdict.arrears_since else None,
            "dataDeletionAt": r.fmt(verdict.data_deletion_at) if verdict.data_deletion_at else None,
            "budget": budget_pass.status,
            # the burn rate the verdict used: the console's runway divides by it
            "costPerHour": format(burn, "f"),
        }
        conds: list[Obj] = list(budget_pass.conditions)
        if state != status.get("state"):
            conds.append(
                b.condition(
                    "Funded",
                    state == "Active",
                    state,
                    f"balance {new['balance']} {currency}",
                    r.fmt(now),
                )
            )
            if status.get("state") is not None or state != "Active":
                self.kube.event(
                    acct,
                    "Normal" if state == "Active" else "Warning",
                    state,
                    f"account is {state}: balance {new['balance']}, available "
                    f"{new['available']} {currency}",
                )
        conds += self._notify_transitions(acct, spec, status, verdict, new, now)
        figures = {k: new[k] for k in ("balance", "available", "currency")}
        new["runway"], runway_conds = self.notices.runway(
            acct, tiers, status, verdict, burn, figures, now, url
        )
        conds += runway_conds
        conds += self._namespace_conflicts(acct, status, ownership.conflicts(accounts, name), now)
        if refused:
            conds.append(self._refused_condition(acct, status, refused, now))
        elif _valid_reason(status) == "InvalidSpec" and not any(
            c["type"] == "Valid" for c in conds
        ):  # refused, fixed now (an invalid budget says so itself)
            conds.append(b.condition("Valid", True, "SpecAccepted", "spec accepted", r.fmt(now)))
        if conds:
            new["conditions"] = b.merge_conditions(status.get("conditions"), conds)
        changes = {k: v for k, v in new.items() if status.get(k) != v}
        for k in ("budget", "runway"):  # a merge patch merges objects: drop what is gone
            was, fresh = status.get(k), changes.get(k)
            if isinstance(was, dict) and isinstance(fresh, dict):
                changes[k] = {**{x: None for x in was if x not in fresh}, **fresh}
        if changes:
            self.kube.patch_status("accounts", None, name, changes)
        if self.alarms is not None:
            run_out = None if verdict.in_arrears else run_out_at(
                now, available, len(by_resource), burn, currency
            )  # fmt: skip
            spent_at = self._budget_spent_at(
                name, budget_pass.stops, by_resource, burn, now, currency
            )
            self._plan_next_pass(name, [run_out, *spent_at])
        if verdict.in_arrears and status.get("state") != ar.ARREARS:
            self._enforce_now(namespaces)
        elif spent := {
            ns for rd in budget_pass.stops if bu.stop_due(rd.spent_minor, rd.scope)
            for ns in namespaces if rd.scope.covers(ns)
        }:  # fmt: skip
            self._enforce_now(spent, metered_only=True)
        return bool(changes)

    def _budget_spent_at(
        self,
        name: str,
        stops: tuple[bu.Reading, ...],
        by_resource: dict[str, Unposted],
        account_burn: Decimal,
        now: datetime,
        currency: str,
    ) -> list[datetime | None]:
        """When each StopPayAsYouGo scope not spent yet will be (``runout.run_out_at`` over
        what its budget has left, at the burn rate of its namespaces, less one minor unit
        per unsettled meter of the scope for rounding)."""
        out: list[datetime | None] = []
        for rd in stops:
            ns = rd.scope.namespace
            if bu.stop_due(rd.spent_minor, rd.scope):
                continue  # spent: its instances are woken now
            burn = account_burn if ns is None else self._burn(name, {ns}, now)
            meters = sum(1 for res in by_resource if ns is None or bu.namespace_of(res) == ns)
            left = rd.scope.monthly_minor - rd.spent_minor
            out.append(run_out_at(now, left, meters, burn, currency))
        return out

    def _plan_next_pass(self, name: str, instants: list[datetime | None]) -> None:
        """Ask for the next pass at the earliest predicted instant (``runout``): the money
        running out or a StopPayAsYouGo budget spent; none when nothing is predicted
        (in arrears, nothing burns: the periodic pass still runs)."""
        assert self.alarms is not None
        at = min((t for t in instants if t is not None), default=None)
        if at is None:
            self.alarms.cancel(name)
        else:
            self.alarms.set(name, at, lambda: self.refresh_named(name))

    def _enforce_now(self, namespaces: set[str], *, metered_only: bool = False) -> None:
        """A pass of each active instance of ``namespaces`` now, not at its next tick: the
        account just entered arrears (every instance stops at the arrears instant), or a
        StopPayAsYouGo budget covering them is spent (``metered_only``: pay-as-you-go and
        spot instances stop; a paid package term runs on). The cached Account list
        predates this pass's status, so it is dropped first: the instance passes read the
        Arrears or Exceeded state."""
        if self.wake_instance is None:
            return
        woken = []
        for inst in self.kube.list_cluster_objects("gpuinstances", ttl=2.0):
            meta, st = inst["metadata"], inst.get("status") or {}
            if meta.get("namespace") not in namespaces or st.get("phase") not in r.ACTIVE_PHASES:
                continue
            if metered_only and (
                st.get("phase") == "Stopping"
                or r.mode_of(st.get("billingMode") or r.billing_key(inst["spec"]["billing"]))
                is BillingMode.PACKAGE
            ):
                continue
            woken.append((meta["namespace"], meta["name"], meta["uid"]))
        if woken:
            self.kube.forget("accounts")
        for ns, inst_name, uid in woken:
            self.wake_instance(ns, inst_name, uid)

    def _held_spec(self, name: str) -> AccountSpec | None:
        """For an Account whose spec is refused but which has a ledger account (what runs
        in its namespaces bills on there): its ledger currency and the model's defaults
        for the rest, so balance, arrears and warnings are still enforced. None without
        a ledger account: nothing has been or will be charged to it."""
        try:
            currency = self.ledger.get_account(name).currency
        except NotFound:
            return None
        return AccountSpec(namespaces=[], currency=currency)  # type: ignore[arg-type]

    def _refused_condition(self, acct: Obj, status: Obj, msg: str, now: datetime) -> Obj:
        """Valid=False naming the field and the rule; the Warning event is sent once."""
        if _condition(status, "Valid") != ("False", msg):
            self.kube.event(acct, "Warning", "InvalidSpec", msg)
        return b.condition("Valid", False, "InvalidSpec", msg, r.fmt(now))

    def _invalid_spec(self, acct: Obj, status: Obj, msg: str, now: datetime) -> None:
        """A refused spec and no ledger account: none is made, no figure computed."""
        if _condition(status, "Valid") != ("False", msg):
            cond = self._refused_condition(acct, status, msg, now)
            conditions = b.merge_conditions(status.get("conditions"), [cond])
            self.kube.patch_status("accounts", None, acct["metadata"]["name"], {
                "conditions": conditions
            })  # fmt: skip

    def _namespace_conflicts(
        self, acct: Obj, status: Obj, found: list[ownership.Conflict], now: datetime
    ) -> list[Obj]:
        """NamespaceConflict: True naming each namespace and the Account that keeps it."""
        name = acct["metadata"]["name"]
        old = _condition(status, "NamespaceConflict")
        if found:
            msg = "; ".join(c.message(name) for c in found)
            if old != ("True", msg):
                self.kube.event(acct, "Warning", "NamespaceConflict", msg)
            return [b.condition("NamespaceConflict", True, "NamespaceClaimed", msg, r.fmt(now))]
        if old is not None and old[0] == "True":
            msg = "every namespace in spec.namespaces bills to this Account"
            return [b.condition("NamespaceConflict", False, "NoConflict", msg, r.fmt(now))]
        return []

    # -- Recharge -------------------------------------------------------------------
    def reconcile_recharge(self, rc: Obj) -> None:
        meta = rc["metadata"]
        status = dict(rc.get("status") or {})
        phase = status.get("phase")
        if phase in ("Credited", "Rejected", "Expired", "Failed"):
            return
        try:
            spec = parse(RechargeSpec, rc.get("spec"))
        except SpecError as exc:
            self._recharge_refused(rc, "InvalidSpec", str(exc))
            return
        now = r.second(self.clock.now())
        account = spec.account
        acct = self.kube_account(account)
        if acct is None:
            self._recharge_status(
                rc, {"phase": "Failed", "reason": f"spec.account: Account {account!r} not found"}
            )
            return
        owner = ownership.owners(self.kube.list_cluster_objects("accounts", ttl=2.0)).get(
            meta["namespace"]
        )
        if owner != account:
            elsewhere = f" (it bills to Account {owner!r}, which claimed it first)" if owner else ""
            self._recharge_status(
                rc,
                {
                    "phase": "Failed",
                    "reason": f"spec.account: namespace {meta['namespace']!r} does not bill "
                    f"to account {account!r}{elsewhere}",
                },
            )
            return
        try:
            currency = parse(AccountSpec, acct.get("spec")).currency
        except SpecError as exc:
            self._recharge_refused(rc, "InvalidAccount", account_refused(account, exc))
            return
        self.ledger.ensure_account(account, currency)
        try:  # never rounded: 10.123 is refused, not credited as 10.12
            amount = parse_amount(spec.amount, currency, "spec.amount")
        except BillingError as exc:
            if not status.get("orderId"):
                self._recharge_status(rc, {"phase": "Failed", "reason": str(exc)})
                return
            # submitted to the ledger before amounts were checked: finish it as it was
            amount = to_minor(Decimal(spec.amount), currency)
        if spec.method == "Online":
            self._online(rc, spec, amount, currency, now)
        else:
            self._bank_transfer(rc, spec, amount, now)

    def kube_account(self, name: str) -> Obj | None:
        return next(
            (
                a
                for a in self.kube.list_cluster_objects("accounts", ttl=2.0)
                if a["metadata"]["name"] == name
            ),
            None,
        )

    def _recharge_status(self, rc: Obj, changes: Obj) -> None:
        status = rc.get("status") or {}
        changes = {k: v for k, v in changes.items() if status.get(k) != v}
        if changes:
            meta = rc["metadata"]
            self.kube.patch_status("recharges", meta["namespace"], meta["name"], changes)
            if "phase" in changes:
                self.kube.event(
                    rc,
                    "Warning"
                    if changes["phase"] in ("Failed", "Rejected", "Expired")
                    else "Normal",
                    changes["phase"],
                    changes.get("reason") or f"recharge is {changes['phase']}",
                )

    def _recharge_refused(self, rc: Obj, reason: str, msg: str) -> None:
        """Valid=False and a Warning event naming the field and the rule, said once.
        Nothing is submitted for it: one not submitted yet fails; one the ledger already
        holds (status.orderId, from before a schema tightened) keeps its phase, since an
        online payment is credited by the payment callback and a transfer voucher can be
        reviewed through the API (``POST /v1/vouchers/{id}/review``), never from here."""
        status = rc.get("status") or {}
        now = r.second(self.clock.now())
        submitted = status.get("orderId")
        # what the ledger says of it now: paid or reviewed through the API meanwhile
        follow = self._submitted_phase(submitted, now) if submitted else {}
        said = _condition(status, "Valid") == ("False", msg)
        if said and all(status.get(k) == v for k, v in follow.items()):
            return
        cond = b.condition("Valid", False, reason, msg, r.fmt(now))
        changes: Obj = {"conditions": b.merge_conditions(status.get("conditions"), [cond])}
        changes |= follow if submitted else {"phase": "Failed", "reason": msg}
        meta = rc["metadata"]
        self.kube.patch_status("recharges", meta["namespace"], meta["name"], changes)
        if not said:
            self.kube.event(rc, "Warning", reason, msg)

    def _submitted_phase(self, order_id: str, now: datetime) -> Obj:
        """The status of a submitted order or voucher as the ledger has it."""
        try:
            return _order_phase(self.ledger.get_order(order_id), now)
        except NotFound:
            pass
        try:
            return _voucher_phase(self.ledger.get_voucher(order_id), now)
        except NotFound:
            return {}

    def _online(self, rc: Obj, spec: RechargeSpec, amount: int, currency: str, now: Any) -> None:
        ref = f"rc-{rc['metadata']['uid']}"  # one order per Recharge, whatever its name
        order = self.ledger.find_order(spec.account, ref)
        if order is None:
            order = self.ledger.create_order(
                spec.account,
                amount,
                (spec.online or Online()).provider,  # the model's default provider
                now + timedelta(seconds=self.cfg.order_ttl_s),
                client_ref=ref,
                actor=submitter(rc),
            )
        if order.status is OrderStatus.PENDING and now >= order.expires_at:
            self.ledger.expire_orders(now)
            order = self.ledger.get_order(order.order_id)
        # The URL encodes no secret: the sandbox provider only signs callbacks.
        url = (
            SandboxProvider(b"unused-for-urls", self.cfg.pay_base_url)
            .create_payment(order.order_id, order.amount_minor, currency, order.expires_at)
            .url
        )
        changes: Obj = {
            "orderId": order.order_id,
            "paymentURL": url,
            "expiresAt": r.fmt(order.expires_at),
        }
        self._recharge_status(rc, changes | _order_phase(order, now))

    def _bank_transfer(self, rc: Obj, spec: RechargeSpec, amount: int, now: Any) -> None:
        """Submit the voucher once (its id goes to status.orderId), then follow it. The
        model requires spec.bankTransfer (with its voucher reference) for this method."""
        bt = spec.bank_transfer
        assert bt is not None  # RechargeSpec's rule: required when method is BankTransfer
        submitted = (rc.get("status") or {}).get("orderId")
        try:
            if submitted:
                voucher = self.ledger.get_voucher(submitted)
            else:
                voucher = self.ledger.submit_voucher(
                    spec.account,
                    amount,
                    bt.payer,
                    bt.bank,
                    bt.transfer_number,
                    bt.voucher_ref.removeprefix("sha256:"),
                    now,
                    submitter=submitter(rc),
                )
        except IdempotencyConflict as exc:
            self._recharge_status(rc, {"phase": "Failed", "reason": str(exc)})
            return
        self._recharge_status(rc, {"orderId": voucher.voucher_id} | _voucher_phase(voucher, now))

    # -- RechargeReview -------------------------------------------------------------
    def reconcile_review(self, review: Obj) -> None:
        """Carry out an admin's decision exactly once, on exactly what the admin saw: the
        review pins the Recharge's UID, amount and voucher id (``spec.rechargeRef.uid``,
        ``spec.amount``, ``spec.voucherId``) and is refused on any mismatch (a Recharge
        deleted and recreated under the same name is another Recharge). The reviewer is
        the annotation ``gpucloud.dev/reviewer``, which the chart's admission policy
        makes equal to the Kubernetes user who created the review; a review without it
        is refused, and so is one by the Recharge's submitter. A review, or a Recharge,
        whose spec the models refuse is refused naming the field (nothing credited).
        The ledger refuses a second review; a refusal that matches this decision means
        it was already applied (an interrupted earlier pass)."""
        status = review.get("status") or {}
        if status.get("applied"):
            return
        try:
            spec = parse(RechargeReviewSpec, review.get("spec"))
        except SpecError as exc:
            self._refuse_review(review, str(exc), "InvalidSpec", "InvalidSpec")
            return
        ref = spec.recharge_ref
        rc = self.kube.get_namespaced_object("recharges", ref.namespace, ref.name)
        if rc is None or not (rc.get("status") or {}).get("orderId"):
            return  # not there yet, or the voucher is not submitted yet: retry later
        try:
            recharge = parse(RechargeSpec, rc.get("spec"))
        except SpecError as exc:
            msg = f"Recharge {ref.namespace}/{ref.name} has a spec the models refuse: {exc}"
            self._refuse_review(review, msg, "InvalidRecharge", "InvalidRecharge")
            return
        if recharge.method != "BankTransfer":
            self._review_status(review, False, "only bank transfers are reviewed")
            return
        reviewer = (review["metadata"].get("annotations") or {}).get(REVIEWER)
        problem = review_mismatch(spec, recharge, rc)
        if problem is None and not reviewer:
            problem = f"metadata.annotations[{REVIEWER!r}]: required (the reviewing user)"
        if problem is None and reviewer == submitter(rc):
            problem = f"{reviewer!r} submitted this recharge: another admin must review it"
        if problem is not None:
            self._refuse_review(review, problem)
            return
        assert reviewer is not None
        approve = spec.decision == "Approve"
        now = r.second(self.clock.now())
        voucher_id = rc["status"]["orderId"]
        # the currency the ledger holds the account in (fixed when it was made)
        currency = self.ledger.get_account(self.ledger.get_voucher(voucher_id).account).currency
        expect = to_minor(Decimal(spec.amount), currency)
        try:
            voucher = self.ledger.review_voucher(
                voucher_id, approve, reviewer, spec.reason or "", now, expect_amount=expect
            )
        except ReviewRefused as exc:
            voucher = self.ledger.get_voucher(voucher_id)
            wanted = VoucherStatus.APPROVED if approve else VoucherStatus.REJECTED
            if exc.reason != "already_reviewed" or voucher.status is not wanted:
                self._review_status(review, False, str(exc))
                return
        self.kube.patch_status(
            "rechargereviews",
            None,
            review["metadata"]["name"],
            {
                "applied": True,
                "appliedAt": r.fmt(voucher.reviewed_at or now),
                "reviewer": voucher.reviewer or reviewer,
                # the voucher file the decision was made on (the ledger's record of it)
                "voucherRef": f"sha256:{voucher.file_sha256}" if voucher.file_sha256 else None,
            },
        )
        self.kube.event(review, "Normal", "Applied", f"voucher {voucher_id} {voucher.status.value}")
        self.reconcile_recharge(rc)

    def _refuse_review(
        self, review: Obj, message: str, reason: str = "NotApplied", event: str = "Refused"
    ) -> None:
        """Applied=False and a Warning event, once per message."""
        conditions = (review.get("status") or {}).get("conditions")
        if conditions is None or all(c.get("message") != message for c in conditions):
            self._review_status(review, False, message, reason)
            self.kube.event(review, "Warning", event, message)

    def _review_status(
        self, review: Obj, applied: bool, message: str, reason: str = "NotApplied"
    ) -> None:
        now = r.fmt(r.second(self.clock.now()))
        cond = b.condition("Applied", applied, reason, message, now)
        self.kube.patch_status(
            "rechargereviews",
            None,
            review["metadata"]["name"],
            {
                "applied": applied,
                "conditions": b.merge_conditions(
                    (review.get("status") or {}).get("conditions"), [cond]
                ),
            },
        )


def _order_phase(order: Order, now: datetime) -> Obj:
    """A Recharge's phase from its online order."""
    if order.status is OrderStatus.PAID:
        return {"phase": "Credited", "creditedAt": r.fmt(order.paid_at or now)}
    if order.status is OrderStatus.EXPIRED:
        return {"phase": "Expired", "reason": "the order expired unpaid"}
    return {"phase": "AwaitingPayment"}


def _voucher_phase(voucher: Voucher, now: datetime) -> Obj:
    """A Recharge's phase from its transfer voucher."""
    if voucher.status is VoucherStatus.APPROVED:
        return {"phase": "Credited", "creditedAt": r.fmt(voucher.reviewed_at or now)}
    if voucher.status is VoucherStatus.REJECTED:
        return {"phase": "Rejected", "reason": voucher.reason or "rejected"}
    return {"phase": "AwaitingReview"}
