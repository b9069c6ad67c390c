"""The GPUInstance reconciler: level-triggered, one pass per event or timer tick.

State that a posting depends on (run number, meter id, stop and release instants,
package terms, storage progress) is written to ``status`` *before* the posting, and every
posting has a key derived from that state, so a pass interrupted anywhere (SIGKILL
included) repeats the same postings with the same keys on restart: the ledger answers
"already posted" and nothing is charged twice or lost.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from fractions import Fraction
from typing import Any, Protocol

from gpucloud.billing import (
    BillingError,
    BillingMode,
    Decision,
    PackagePeriod,
    PriceBook,
    PriceBookError,
    RunningTotal,
    Term,
    UnknownProduct,
    available_balance,
    format_money,
    leave_package,
    minor_exponent,
    package_price,
    package_purchase_decision,
    payg_start_decision,
    to_minor,
)
from gpucloud.clock import Clock, monotonic
from gpucloud.ledger import EntryKind, IdempotencyConflict, Ledger, NotFound, Unposted
from gpucloud_operator import arrears as ar
from gpucloud_operator import builders as b
from gpucloud_operator import rules as r
from gpucloud_operator.config import OperatorConfig
from gpucloud_operator.crash import crash_point
from gpucloud_operator.later import Later
from gpucloud_operator.placement import (
    NodeGPUs,
    PodGPUs,
    choose_node,
    fallback_node,
    largest_node,
    plan_preemption,
)

log = logging.getLogger("gpucloud.operator.instances")
Obj = dict[str, Any]
PLURAL = "gpuinstances"


class KubeAPI(Protocol):
    """The part of gpucloud_operator.kube.Kube the reconciler uses."""

    def list_cluster_objects(self, plural: str, ttl: float = 0.0) -> list[Obj]: ...
    def get_namespaced_object(self, plural: str, namespace: str, name: str) -> Obj | None: ...
    def get_pricebook(self, name: str, ttl: float = 2.0) -> Obj | None: ...
    def patch_status(self, plural: str, namespace: str | None, name: str, status: Obj) -> Obj: ...
    def get_pod(self, namespace: str, name: str) -> Obj | None: ...
    def create_pod(self, pod: Obj) -> Obj: ...
    def delete_pod(self, namespace: str, name: str, grace_s: int | None = None) -> None: ...
    def patch_pod_labels(self, namespace: str, name: str, labels: dict[str, str]) -> None: ...
    def ensure_pvc(self, pvc: Obj) -> Obj | None: ...
    def annotate_pvc(self, namespace: str, name: str, annotations: dict[str, str]) -> None: ...
    def ensure_pv(self, pv: Obj) -> None: ...
    def pvc_bound(self, namespace: str, name: str) -> bool: ...
    def delete_pvc(self, namespace: str, name: str) -> None: ...
    def delete_pv(self, name: str) -> None: ...
    def get_pv(self, name: str) -> Obj | None: ...
    def gpu_nodes(self) -> list[NodeGPUs]: ...
    def gpu_pods(self, ttl: float = 0.0) -> list[Obj]: ...
    def event(
        self, obj: Obj, type_: str, reason: str, message: str, now: datetime | None = None
    ) -> None: ...


@dataclass
class Pass:
    """One reconcile pass over one instance."""

    inst: Obj
    now: datetime
    status: Obj
    account: str = ""
    currency: str = "CNY"
    pb: PriceBook | None = None
    # changes to send with the pass's next patch (saves an API call per pass)
    deferred: Obj = field(default_factory=dict)
    acct_status: Obj = field(default_factory=dict)  # the Account's status (arrears)
    # What the watch event that started the pass said, so the pass need not ask again:
    # the instance's pod as the event showed it, or that its claim is Bound.
    pod_seen: Obj | None = None
    claim_bound: bool = False

    @property
    def meta(self) -> Obj:
        return self.inst["metadata"]

    @property
    def spec(self) -> Obj:
        return self.inst["spec"]

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
        return self.spec["gpu"]["product"]

    @property
    def count(self) -> int:
        return int(self.spec["gpu"].get("count", 1))

    @property
    def quota(self) -> int:
        return int(self.spec.get("storage", {}).get("quotaGi", 50))

    @property
    def phase(self) -> str | None:
        return self.status.get("phase")

    @property
    def terms(self) -> list[Obj]:
        return list(self.status.get("packageTerms") or [])


_RECHECKS = (1, 1, 1, 2, 4, 8)  # claim checks, in claim_recheck_s: see _nudge_claim


def _bind_wait(node: str | None) -> str:
    return f"waiting for the instance volume to bind on {node}"


class InstanceReconciler:
    def __init__(self, kube: KubeAPI, ledger: Ledger, clock: Clock, cfg: OperatorConfig) -> None:
        self.kube = kube
        self.ledger = ledger
        self.clock = clock
        self.cfg = cfg
        self._locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)
        self._account_locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)
        self._guard = threading.Lock()
        self._open_meters: set[str] = set()
        self._ledger_accounts: set[str] = set()
        # uid -> (namespace, phase) of every instance: the instance limit is counted here,
        # not by listing all instances on every start (the operator writes every phase).
        self._phases: dict[str, tuple[str, str]] | None = None
        # First placements whose pods the (cached) pod list may not show yet:
        # uid -> (namespace, pod name, node, GPUs), so two placements never share GPUs.
        self._assumed: dict[str, tuple[str, str, str, int]] = {}
        self._placement_lock = threading.Lock()
        self._pb_cache: tuple[str, PriceBook] | None = None
        self._cost_shown: dict[str, float] = {}  # uid -> monotonic time of the last update
        # Instances whose pod waits for their claim to bind: the claim's bind event starts
        # their next pass (claim_changed) instead of the next timer tick.
        self._awaiting_bind: set[str] = set()
        # account -> (second, monotonic time computed, figures): see _unposted
        self._accrual_memo: dict[str, tuple[datetime, float, Unposted]] = {}
        # uid -> (account, minor units) of package starts this process admitted whose
        # term is not charged yet: see _reserved
        self._reservations: dict[str, tuple[str, int]] = {}
        self.accrual_reuse_s = 1.0  # see _unposted
        self._later = Later()
        self.claim_recheck_s = 1.0  # see _nudge_claim
        self._nudging: set[str] = set()  # instances with a claim check chain running
        # instances whose status this process has patched (an event body without a status
        # is then out of date), and the uid of the pod each one's current run got
        self._status_written: set[str] = set()
        self._run_pods: dict[str, str] = {}

    def _lock(self, table: defaultdict[str, threading.Lock], key: str) -> threading.Lock:
        with self._guard:
            return table[key]

    # -- entry points ---------------------------------------------------------------
    def reconcile_named(
        self, namespace: str, name: str, uid: str | None = None, **seen: Any
    ) -> None:
        """A pass over the instance ``namespace/name`` (only the incarnation ``uid`` when
        given: then the instance is read once, under its lock). ``seen``: what the event
        that asked for the pass showed (``Pass.pod_seen``, ``Pass.claim_bound``)."""
        if uid is not None:
            self._reconcile_fresh(namespace, name, uid, wait=True, **seen)
            return
        inst = self.kube.get_namespaced_object(PLURAL, namespace, name)
        if inst is not None:
            self.reconcile(inst)

    def reconcile(self, inst: Obj, *, wait: bool = True) -> None:
        """A pass over ``inst`` as it is now. ``wait=False`` (timer ticks): skip it when a
        pass over the instance is already running, rather than hold a worker thread on
        the lock for a pass that repeats it."""
        meta = inst["metadata"]
        # no status yet: unless a pass of this process patched it (checked under the
        # lock), nothing has, and the body is as fresh as a read would be
        body = None if inst.get("status") else inst
        self._reconcile_fresh(meta["namespace"], meta["name"], meta["uid"], wait=wait, body=body)

    def _reconcile_fresh(
        self,
        namespace: str,
        name: str,
        uid: str,
        *,
        wait: bool,
        body: Obj | None = None,
        **seen: Any,
    ) -> None:
        lock = self._lock(self._locks, uid)
        if not lock.acquire(blocking=False):
            if not wait:
                return
            lock.acquire()
            seen = {}  # another pass ran meanwhile: what the event showed may be out of date
        try:
            with self._guard:
                if uid in self._status_written:
                    body = None
            # read under the lock: the body of the event may predate the last pass's patches
            fresh = body or self.kube.get_namespaced_object(PLURAL, namespace, name)
            if fresh is None or fresh["metadata"]["uid"] != uid:
                return
            if fresh["metadata"].get("deletionTimestamp"):
                return  # the release handler owns it now
            self._reconcile(self._pass(fresh, **seen))
        finally:
            lock.release()

    def pod_changed(self, pod: Obj, deleted: bool) -> None:
        """A pod of an instance changed. Only changes that matter to the instance start
        a pass: the pod ran, ended, vanished, or could not be scheduled."""
        meta = pod.get("metadata") or {}
        name = (meta.get("labels") or {}).get(b.INSTANCE_LABEL)
        owner = next((o["uid"] for o in meta.get("ownerReferences") or []), None)
        if not name:
            return
        phase = (pod.get("status") or {}).get("phase")
        with self._guard:
            known = (self._phases or {}).get(owner or "", ("", ""))[1]
        if not deleted:
            if phase == "Running" and known == "Running":
                return  # nothing new for the instance
            if phase == "Pending":
                conds = (pod.get("status") or {}).get("conditions") or []
                if not any(
                    c.get("type") == "PodScheduled" and c.get("status") == "False" for c in conds
                ):
                    return  # still on its way: the Running event follows
        self.reconcile_named(meta["namespace"], name, owner, pod_seen=None if deleted else pod)

    def claim_changed(self, pvc: Obj, deleted: bool) -> None:
        """An instance's claim changed: once it is bound, the pod waiting for it can be
        created now (the pass that found it unbound asked to be woken up)."""
        meta = pvc.get("metadata") or {}
        name = (meta.get("labels") or {}).get(b.INSTANCE_LABEL)
        owner = next((o["uid"] for o in meta.get("ownerReferences") or []), None)
        if not name or owner is None:
            return
        with self._guard:
            if deleted or (pvc.get("status") or {}).get("phase") != "Bound":
                if deleted:
                    self._awaiting_bind.discard(owner)
                return
            if owner not in self._awaiting_bind:
                return
            self._awaiting_bind.discard(owner)
        self.reconcile_named(meta["namespace"], name, owner, claim_bound=True)

    def release(self, inst: Obj) -> bool:
        """Settle everything, then delete pod, claim and volume. False: not done yet
        (agent usage may still arrive for the last run); call again later."""
        with self._lock(self._locks, inst["metadata"]["uid"]):
            fresh = self.kube.get_namespaced_object(
                PLURAL, inst["metadata"]["namespace"], inst["metadata"]["name"]
            )
            return self._release(self._pass(fresh or inst))

    def _pass(self, inst: Obj, **seen: Any) -> Pass:
        return Pass(
            inst=inst,
            now=r.second(self.clock.now()),
            status=dict(inst.get("status") or {}),
            **seen,
        )

    # -- status and events ----------------------------------------------------------
    def _patch(self, p: Pass, changes: Obj) -> None:
        """Persist at once: later steps (and a restart) rely on it."""
        changes, p.deferred = {**p.deferred, **changes}, {}
        changes = {k: v for k, v in changes.items() if p.status.get(k) != v}
        if not changes:
            return
        self.kube.patch_status(PLURAL, p.ns, p.name, changes)
        with self._guard:
            self._status_written.add(p.uid)
        if "phase" in changes:
            self._note_phase(p.uid, p.ns, changes["phase"])
        for k, v in changes.items():
            if v is None:
                p.status.pop(k, None)
            else:
                p.status[k] = v

    def _note_phase(self, uid: str, namespace: str, phase: str | None) -> None:
        with self._guard:
            if phase not in r.ADMITTED_PHASES:
                self._reservations.pop(uid, None)  # charged, refused or gone
            if self._phases is not None:
                if phase is None:
                    self._phases.pop(uid, None)
                else:
                    self._phases[uid] = (namespace, phase)

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
            return sum(
                1
                for uid, (ns, phase) in self._phases.items()
                if ns in namespaces and uid != exclude_uid and phase in r.ACTIVE_PHASES
            )

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

    # -- the pass -------------------------------------------------------------------
    def _resolve(self, p: Pass) -> bool:
        """Account, price book and product; False (after a refusal) if one is missing."""
        accounts = self.kube.list_cluster_objects("accounts", ttl=2.0)
        acct = next(
            (a for a in accounts if p.ns in (a.get("spec", {}).get("namespaces") or [])), None
        )
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
        p.currency = acct.get("spec", {}).get("currency", "CNY")
        if p.account not in self._ledger_accounts:
            self.ledger.ensure_account(p.account, p.currency)
            self._ledger_accounts.add(p.account)
        pb_obj = self.kube.get_pricebook(self.cfg.pricebook)
        if pb_obj is None:
            self._refuse(p, "NoPriceBook", f"PriceBook {self.cfg.pricebook!r} does not exist")
            return False
        try:
            p.pb = self._pricebook(pb_obj)
            p.pb.gpu_price(p.product)
        except UnknownProduct as exc:
            self._refuse(p, "UnknownProduct", f"spec.gpu.product: {exc}")
            return False
        except PriceBookError as exc:
            self._refuse(p, "InvalidPriceBook", str(exc))
            return False
        return True

    def _pricebook(self, obj: Obj) -> PriceBook:
        """Parsed once per resourceVersion."""
        version = obj["metadata"].get("resourceVersion", "")
        cached = self._pb_cache
        if cached is None or cached[0] != version:
            cached = (version, PriceBook.from_resource(obj))
            self._pb_cache = cached
        return cached[1]

    def _reconcile(self, p: Pass) -> None:
        if not self._resolve(p):
            return
        p.deferred = {
            "account": p.account,
            "currency": p.pb.currency if p.pb else p.currency,
            "gpuSummary": b.gpu_summary(p.product, p.count),
            "observedGeneration": p.meta.get("generation"),
        }
        try:
            self._reconcile_resolved(p)
        finally:
            if p.deferred:
                self._patch(p, {})

    def _reconcile_resolved(self, p: Pass) -> None:
        self._settle_meters(p)
        if self._wipe_pending(p):  # a deleted volume's folder is not removed yet
            return
        if self._arrears(p):
            return
        self._settle_storage(p, final=False)
        phase = p.phase
        if phase == "Stopping":  # a stop was interrupted: finish it first
            self._stop(p, p.status.get("stopTarget", "Stopped"), "Stopped", "stop completed")
            return
        if phase == "Running":
            switched = p.status.get("billingMode") != r.billing_key(p.spec["billing"])
            why = r.not_offered(p.pb, p.product, r.billing_key(p.spec["billing"]))
            if switched and why is not None:
                self._keep_mode(p, why)  # stays billed as it is, says why
                switched = False
            if switched and not self._switch_mode(p):
                return
            if self._preemption_due(p) or self._package_rules(p):
                return
        else:
            self._leave_idle_package(p)
        desired = p.spec.get("state", "Running")
        if desired == "Stopped":
            if phase in r.ADMITTED_PHASES:
                self._bill_if_started(p)  # its pod may have run while nobody watched
                phase = p.phase
            if phase in r.ACTIVE_PHASES:
                self._stop(p, "Stopped", "Stopped", "stopped by the user (spec.state: Stopped)")
            elif phase not in ("Stopped", "Expired", "Preempted"):
                self._patch(
                    p,
                    {
                        "phase": "Stopped",
                        "message": "not running (spec.state: Stopped)",
                        "conditions": self._conditions(
                            p, ("Ready", False, "Stopped", "spec.state is Stopped")
                        ),
                    },
                )
            return
        if phase in ("Pending", "Starting"):
            self._observe_start(p)
        elif phase == "Running":
            self._observe_running(p)
        elif phase in (*r.HALTED_PHASES, "Stopped") and p.status.get(
            "haltedGeneration"
        ) == p.meta.get("generation"):
            return  # stays down until the user changes the spec
        else:
            self._start(p)

    # -- starting -------------------------------------------------------------------
    def _start(self, p: Pass) -> None:
        """Admission (instance limit, then the money rule) is serialised per account and
        reserves the instance's slot at once; the claim of the run is written after the
        lock is let go (a burst of starts on one account would queue on the API call),
        and placement and object creation happen outside the lock too."""
        assert p.pb is not None
        why = r.not_offered(p.pb, p.product, r.billing_key(p.spec["billing"]))
        if why is not None:  # the PriceBook leaves this mode out for the product
            self._refuse(p, "NotOffered", why)
            return
        if not self._disks_ready(p):  # cloud disks (docs/arrears.md)
            return
        node = p.status.get("volumeNode")
        new_volume = node is None
        if node is None:
            with self._placement_lock:
                node = self._place(p)
        # the money rule reads the ledger (a query per meter of the account) and the
        # instance list: before the lock, as starting a run changes no balance; under
        # it, the instance limit counts runs that other passes are claiming and the money
        # rule deducts what other admissions reserved (a package term is charged only
        # when its pod runs: two package starts must not both count on the same balance)
        money = self._money_rule(p)
        listed = self._listed_reservations(p) if money is not None else {}
        with self._lock(self._account_locks, p.account):
            decision = None if money is None else money(self._reserved(p, listed))
            admitted = self._admit(p, decision)
            if admitted:
                with self._guard:
                    held = (self._phases or {}).get(p.uid)
                self._note_phase(p.uid, p.ns, "Pending")  # counted by the next admission
                mode = r.mode_of(r.billing_key(p.spec["billing"]))
                if decision is not None and mode is BillingMode.PACKAGE:
                    self._reserve(p, decision)
        if not admitted:
            with self._placement_lock:
                self._assumed.pop(p.uid, None)
            return
        try:
            runs = int(p.status.get("runs") or 0) + 1
            # a new volume's claim cannot be bound yet: say so now, not in a second patch
            waiting = node is not None and new_volume
            changes: Obj = {
                "phase": "Pending",
                "runs": runs,
                "message": _bind_wait(node) if waiting else f"placing run {runs}",
                "haltedGeneration": None,
                "preemptAt": None,
                "preemptedFor": None,
                "conditions": self._conditions(
                    p,
                    ("Ready", False, "Placing", "waiting for the pod to run"),
                    ("Preempting", False, "NotPreempted", "no preemption notice"),
                ),
            }
            if node is not None:
                changes["volumeNode"] = node
            self._patch(p, changes)
        except BaseException:
            self._note_phase(p.uid, p.ns, held[1] if held else None)  # the slot is free again
            raise
        self._create_run(p, new_volume)

    def _money_rule(self, p: Pass) -> Callable[[int], Decision] | None:
        """The money rule of a start, to be applied to the amount other admissions have
        reserved (None: a paid package term covers the start). The available balance
        is the balance minus what open meters accrued and stopped runs still owe
        (``Ledger.unposted``) minus the reserved amount (``billing.available_balance``)."""
        assert p.pb is not None
        pb = p.pb
        key = r.billing_key(p.spec["billing"])
        mode = r.mode_of(key)
        if mode is BillingMode.PACKAGE and r.active_term(p.terms, p.now) is not None:
            return None
        balance, unposted = self.ledger.balance(p.account), self._unposted(p.account, p.now)

        def decide(reserved: int) -> Decision:
            available = available_balance(
                balance, [unposted.open_minor], [unposted.closed_minor], [reserved]
            )
            if mode is BillingMode.PACKAGE:
                return package_purchase_decision(
                    available, p.product, p.count, r.period_of(key), pb
                )
            return payg_start_decision(
                available, p.product, p.count, pb, mode=mode, storage_gib=p.quota
            )

        return decide

    # -- reservations: admitted package terms and renewals due, not charged yet ----------
    def _listed_reservations(self, p: Pass) -> dict[str, r.Reservation]:
        """The account's reservations as the (cached) instance list shows them, less
        those the ledger has charged meanwhile."""
        assert p.pb is not None
        acct = self._account_obj(p.account)
        namespaces = set((acct.get("spec") or {}).get("namespaces") or [])
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
            mine = {u: m for u, (a, m) in self._reservations.items() if a == p.account}
            phases = dict(self._phases or {})
        total = sum(m for u, m in mine.items() if u != p.uid)
        for uid, res in listed.items():
            if uid == p.uid or uid in mine:
                continue
            known = phases.get(uid, ("", res.phase))[1]
            if res.phase in r.ADMITTED_PHASES and known not in r.ADMITTED_PHASES:
                continue  # the list is older than this process's own patch
            total += res.minor
        return total

    def _reserve(self, p: Pass, decision: Decision) -> None:
        """An admitted package start reserves its term until the term is charged (the
        phase leaves Pending/Starting: _note_phase lets it go)."""
        with self._guard:
            self._reservations[p.uid] = (p.account, decision.needed_minor)

    def _unposted(self, account: str, now: datetime) -> Unposted:
        """The ledger's estimate of what the account's runs owe beyond their postings at
        ``now`` (whole seconds), computed once per account and second: it walks every
        unsettled meter of the account, and a burst of starts on a big account asked for
        the same second's figure over and over. A start changes no accrual (a new run
        starts at zero); the figure is reused for one second of real time at most, as
        usage the agents send meanwhile refines it (an injected clock may stand still)."""
        with self._guard:
            hit = self._accrual_memo.get(account)
        if hit is not None and hit[0] == now and time.monotonic() - hit[1] < self.accrual_reuse_s:
            return hit[2]
        value = self.ledger.unposted(account, now)
        with self._guard:
            self._accrual_memo[account] = (now, time.monotonic(), value)
        return value

    def _account_obj(self, account: str) -> Obj:
        return next(
            (
                a
                for a in self.kube.list_cluster_objects("accounts", ttl=2.0)
                if a["metadata"]["name"] == account
            ),
            {},
        )

    def _admit(self, p: Pass, money: Decision | None) -> bool:
        """The instance limit, then the money rule (decided by _money_rule)."""
        acct = self._account_obj(p.account)
        limit = int(acct.get("spec", {}).get("instanceLimit", 5))
        namespaces = set(acct.get("spec", {}).get("namespaces") or [])
        active = self._active_count(namespaces, p.uid)
        if active >= limit:
            self._refuse(
                p,
                "InstanceLimit",
                f"account {p.account!r} already runs {active} instance(s); its "
                f"instanceLimit is {limit}",
            )
            return False
        if money is None:
            return True
        if not money.allowed:
            self._refuse(p, "InsufficientBalance", money.message)
        return money.allowed

    def _create_run(self, p: Pass, new_volume: bool = False) -> None:
        """The volume (first run only) and the run's pod. ``new_volume``: the volume was
        placed by this pass, so it does not exist yet."""
        with self._guard:  # before the claim is checked: a bind right after wakes us up
            self._awaiting_bind.add(p.uid)
        node, bound = self._volume_node(p, new_volume)
        if node is None:
            message = f"no node offers GPU product {p.product!r}; waiting for one"
            self._patch(
                p,
                {
                    "message": message,
                    "conditions": self._conditions(p, ("Ready", False, "NoNode", message)),
                },
            )
            return
        if bound is None:
            bound = self.kube.pvc_bound(p.ns, b.pvc_name(p.name))
        if not bound:
            # A pod created before its claim binds is parked by the scheduler as
            # "unbound immediate PersistentVolumeClaims" and not retried for minutes, and
            # that reason hides a real GPU shortage from preemption: wait for the bind
            # (claim_changed starts the next pass when it happens).
            self._patch(p, {"message": _bind_wait(node)})
            return
        with self._guard:
            self._awaiting_bind.discard(p.uid)
        runs = int(p.status.get("runs") or 0)
        # The billing anchor: the operator's clock just before the pod can exist, saved
        # before it does (a kill right after the create still finds it; a kill before
        # the create writes it again with the next attempt). Rounded up: a fraction of a
        # second is the tenant's. See rules.billed_start.
        anchor = r.fmt(r.second_up(self.clock.now()))
        self._patch(p, {"podCreatedAt": anchor, "podWaitingAt": None})
        crash_point("anchor-saved")
        pod = self.kube.create_pod(b.build_instance_pod(p.inst, runs))
        crash_point("pod-created")
        with self._guard:
            self._run_pods[p.uid] = (pod.get("metadata") or {}).get("uid", "")
        self._event(p, "Normal", "Starting", f"run {runs}: pod created, pinned to {node}")

    def _volume_node(self, p: Pass, new: bool) -> tuple[str | None, bool | None]:
        """The node holding the instance's data, chosen (and the volume created) on the
        first placement, and whether its claim is bound (None: not known)."""
        node = p.status.get("volumeNode")
        if node is None:
            with self._placement_lock:
                node = self._place(p)
            if node is None:
                return None, False
        self._patch(p, {"volumeNode": node})
        # a bound claim has its volume (a later run): nothing to create again
        if not new and (p.claim_bound or self.kube.pvc_bound(p.ns, b.pvc_name(p.name))):
            return node, True
        # The claim first, then its volume bound to the claim's uid: the PV controller
        # (20 API requests/s by default, shared by all claims) then only records the
        # binding (3 writes) instead of binding the volume itself (6 or more). A burst of
        # starts waits on those writes.
        claim = self.kube.ensure_pvc(b.build_instance_pvc(p.inst))
        pv = b.build_local_pv(p.inst, node)
        uid = ((claim or {}).get("metadata") or {}).get("uid")
        if uid:
            pv["spec"]["claimRef"]["uid"] = uid
        self.kube.ensure_pv(pv)
        if uid:
            # the PV controller syncs a claim on its own events only (or every 15 s):
            # an update of the claim once its volume exists has it bound at once
            volume = {"gpucloud.dev/volume": pv["metadata"]["name"]}
            self.kube.annotate_pvc(p.ns, b.pvc_name(p.name), volume)
            self._nudge_claim(p.ns, p.name, p.uid)
        if claim is None:
            return node, None
        return node, (claim.get("status") or {}).get("phase") == "Bound"

    def _nudge_claim(self, namespace: str, name: str, uid: str, step: int = 0) -> None:
        """Look again while the claim is unbound (after 1, 1, 1, 2, 4, 8 x
        ``claim_recheck_s``; one chain per instance). The update above makes the PV
        controller sync the claim; when that sync comes before the new volume reaches the
        controller's cache, the claim (which names its volume) waits for the controller's
        next resync, 15 s later: that was the slowest twentieth of a burst of starts.
        The volume's own sync marks it Bound without touching the claim, so a Bound
        volume beside an unbound claim is that case: touch the claim again, then look
        less often (the sync waits in the controller's queue). Otherwise the controller
        is only behind (its client rate), and an update would just add work."""
        if step == 0:
            with self._guard:
                if uid in self._nudging:
                    return  # a chain runs already
                self._nudging.add(uid)

        def again() -> None:
            after = len(_RECHECKS)  # the chain ends unless set below
            try:
                with self._guard:
                    if uid not in self._awaiting_bind:
                        return  # bound (or the instance went away)
                after = step + 1
                pv = self.kube.get_pv(b.pv_name(uid))
                if ((pv or {}).get("status") or {}).get("phase") == "Bound":
                    # a new value each time, or the patch changes nothing and no sync follows
                    touch = {"gpucloud.dev/volume-sync": str(time.monotonic_ns())}
                    self.kube.annotate_pvc(namespace, b.pvc_name(name), touch)
                    after = max(after, _RECHECKS.index(2))
            finally:
                if after < len(_RECHECKS):
                    self._nudge_claim(namespace, name, uid, after)
                else:
                    with self._guard:
                        self._nudging.discard(uid)

        self._later.call(self.claim_recheck_s * _RECHECKS[step], again)

    def _place(self, p: Pass) -> str | None:
        nodes = self.kube.gpu_nodes()
        # a few seconds stale at most: this pass's own placements are in _assumed until
        # the list shows them, and the scheduler has the last word on every pod
        listed = self.kube.gpu_pods(ttl=5.0)
        seen = {(x["namespace"], x["name"]) for x in listed}
        pods = [self._pod_gpus(x, {}) for x in listed]
        for uid, (ns, pod, node, gpus) in list(self._assumed.items()):
            if (ns, pod) in seen:
                del self._assumed[uid]  # the list shows it now
            else:
                pods.append(PodGPUs(ns, pod, node, gpus, spot=False, started_at=None))
        pods += self._placed_elsewhere(p, seen)
        node = (
            choose_node(nodes, pods, p.product, p.count)
            or fallback_node(nodes, p.product, p.count)
            or largest_node(nodes, p.product)
        )
        if node is not None:
            self._assumed[p.uid] = (p.ns, b.pod_name(p.name), node, p.count)
        return node

    def _placed_elsewhere(self, p: Pass, seen: set[tuple[str, str]]) -> list[PodGPUs]:
        """Starts placed by another process (a replica that died, this one before a
        restart) whose pods do not exist yet, e.g. waiting for their claim to bind: their
        volumes hold the GPUs of their node as surely as this process's own ``_assumed``
        ones, so a standby taking over a burst does not pin more volumes to a node than
        it has GPUs."""
        out = []
        for inst in self.kube.list_cluster_objects(PLURAL, ttl=2.0):
            meta, st = inst["metadata"], inst.get("status") or {}
            pod = (meta["namespace"], b.pod_name(meta["name"]))
            node = st.get("volumeNode")
            if (
                node
                and st.get("phase") in r.ADMITTED_PHASES
                and meta["uid"] not in (p.uid, *self._assumed)
                and pod not in seen
            ):
                count = int(((inst.get("spec") or {}).get("gpu") or {}).get("count", 1))
                out.append(PodGPUs(meta["namespace"], meta["name"], node, count, False, None))
        return out

    def _observe_start(self, p: Pass) -> None:
        runs = int(p.status.get("runs") or 0)
        if runs == 0:
            self._start(p)
            return
        pod = self._pod_now(p, runs)
        if pod is None:
            # not created yet (no node, or an interrupted pass), or deleted by someone
            self._create_run(p)
            return
        labels = pod["metadata"].get("labels") or {}
        if labels.get(b.RUN_LABEL) != str(runs) or pod["metadata"].get("deletionTimestamp"):
            return  # the previous run's pod is still going away
        pod_phase = (pod.get("status") or {}).get("phase")
        if pod_phase == "Running":
            self._begin_billing(p, pod)
        elif pod_phase in ("Succeeded", "Failed"):
            self.kube.delete_pod(p.ns, b.pod_name(p.name), grace_s=0)
        else:
            self._pending(p, pod)

    def _bill_if_started(self, p: Pass) -> None:
        """A stop asked for before the operator saw the run's pod running (it was down):
        if the pod did run, its time is billed like any run's, from its start."""
        runs = int(p.status.get("runs") or 0)
        pod = self.kube.get_pod(p.ns, b.pod_name(p.name)) if runs else None
        if pod is None or pod["metadata"].get("deletionTimestamp"):
            return
        running = (pod.get("status") or {}).get("phase") == "Running"
        if running and (pod["metadata"].get("labels") or {}).get(b.RUN_LABEL) == str(runs):
            self._begin_billing(p, pod)

    def _pod_now(self, p: Pass, runs: int) -> Obj | None:
        """The run's pod. A pass started by the pod's Running event or by its claim's
        bind skips the read (a burst of starts made it one request per step): the event
        showed the pod, or the pod waited for the bind and was not created yet (should a
        concurrent pass have created it meanwhile, creating it again finds it)."""
        seen = p.pod_seen
        if seen is not None and not seen["metadata"].get("deletionTimestamp"):
            with self._guard:  # the very pod this run created, not one of the same name
                ours = self._run_pods.get(p.uid) == seen["metadata"].get("uid")
            labels = seen["metadata"].get("labels") or {}
            running = seen.get("status", {}).get("phase") == "Running"
            if ours and running and labels.get(b.RUN_LABEL) == str(runs):
                return seen
        if p.claim_bound:
            return None
        return self.kube.get_pod(p.ns, b.pod_name(p.name))

    def _pending(self, p: Pass, pod: Obj) -> None:
        """Not placed yet: show the scheduler's reason; a pay-as-you-go or package
        instance short of GPUs may preempt spot instances."""
        conds = (pod.get("status") or {}).get("conditions") or []
        sched = next((c for c in conds if c.get("type") == "PodScheduled"), None)
        if sched is None or sched.get("status") != "False":
            return
        reason = sched.get("reason") or "Unschedulable"
        message = f"{reason}: {sched.get('message') or 'not scheduled yet'}"
        self._patch(
            p,
            {
                # not started at this instant: billing cannot start before it, whatever
                # the kubelet's clock says (rules.billed_start)
                "podWaitingAt": r.fmt(p.now),
                "message": message,
                "conditions": self._conditions(p, ("Ready", False, reason, message)),
            },
        )
        short_of_gpus = "Insufficient nvidia.com/gpu" in message
        if short_of_gpus and r.billing_key(p.spec["billing"]) != "Spot":
            self._maybe_preempt(p)

    def _begin_billing(self, p: Pass, pod: Obj) -> None:
        """The run started: billing starts when Kubernetes says the pod started
        (rules.billed_start), not when this pass saw it: the operator may have been
        down meanwhile, and the agents' usage since then is charged to the meter."""
        assert p.pb is not None
        key = r.billing_key(p.spec["billing"])
        mode = r.mode_of(key)
        node = (pod.get("spec") or {}).get("nodeName")
        since = r.billed_start(
            r.parse(p.status.get("podCreatedAt")),
            pod,
            p.now,
            waiting=r.parse(p.status.get("podWaitingAt")),
        )
        changes: Obj = {
            "phase": "Running",
            "startedAt": r.fmt(since),
            # Instance storage is billed from the first time the pod runs: the volume is
            # bound and mounted and the instance exists for the user. Before that it is a
            # request waiting for GPUs (its volume holds no data), and charging it
            # storage would bill a wait the seed never bills (docs/operator.md).
            "storageSince": p.status.get("storageSince") or r.fmt(since),
            "node": node,
            "billingMode": key,
            "message": f"running on {node}",
            "conditions": self._conditions(
                p,
                ("Ready", True, "Running", f"running on {node}"),
                ("Billing", True, str(key).replace("/", ""), f"billed as {key}"),
            ),
        }
        if mode is BillingMode.PACKAGE:
            term = r.active_term(p.terms, since)
            if term is None and not self._buy_term(p, r.period_of(key), since):
                self._stop(
                    p, "Refused", "InsufficientBalance", "the balance no longer covers the package"
                )
                return
            self._patch(p, changes)
        else:
            meter_id = f"gpu:{p.uid}:{p.status.get('runs')}:{int(since.timestamp())}"
            changes |= {"meterId": meter_id, "meterSince": r.fmt(since)}
            self._patch(p, changes)
            crash_point("billing-saved")
            self._ensure_meter(p, pod)
        self._event(
            p, "Normal", "Started", f"running on {node} since {r.fmt(since)}, billed as {key}"
        )
        if mode is BillingMode.PACKAGE:
            self._package_rules(p)  # a day or week package is within the reminder lead

    def _ensure_meter(self, p: Pass, pod: Obj | None = None) -> None:
        meter_id = p.status.get("meterId")
        if not meter_id or meter_id in self._open_meters:
            return
        assert p.pb is not None
        pod = pod or self.kube.get_pod(p.ns, b.pod_name(p.name))
        if pod is None:
            return
        since = r.parse(p.status.get("meterSince"))
        assert since is not None
        mode = r.mode_of(p.status["billingMode"])
        self.ledger.open_meter(
            meter_id,
            account=p.account,
            resource=p.resource,
            kind="gpu_time",
            subject=pod["metadata"]["uid"],
            unit_price=r.hourly_price(p.pb, p.product, mode),
            unit="gpu_hour",
            opened_at=since,
            memo=f"{mode} {b.gpu_summary(p.product, p.count)}",
            gpus=p.count,
            # only this node's agent may report the pod's usage (gpucloud.ledger.admission)
            node=(pod.get("spec") or {}).get("nodeName"),
        )
        self._open_meters.add(meter_id)

    def _observe_running(self, p: Pass) -> None:
        pod = self.kube.get_pod(p.ns, b.pod_name(p.name))
        runs = str(p.status.get("runs"))
        gone = (
            pod is None
            or (pod["metadata"].get("labels") or {}).get(b.RUN_LABEL) != runs
            or (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed")
        )
        if gone:
            self._stop(p, "Stopped", "PodGone", "the instance's pod ended; billing stopped")
            return
        self._ensure_meter(p, pod)
        refreshed = self._update_cost(p, force=False)
        if refreshed or not p.status.get("gpus"):
            self._show_gpus(p, pod)

    def _show_gpus(self, p: Pass, pod: Obj) -> None:
        """status.gpus: the GPU UUIDs the agents reported for this run's pod (the pod UID
        is new each run). Refreshed with accruedCost, and every tick until the first
        usage arrives; patched only when it changes."""
        gpus = self.ledger.gpus_seen(pod["metadata"]["uid"])
        if gpus:
            self._patch(p, {"gpus": gpus})

    def _update_cost(self, p: Pass, *, force: bool = True) -> bool:
        """status.accruedCost: what was posted for the instance plus the unposted part of
        the running meter. On a plain tick it is refreshed at most every
        cost_refresh_s real seconds (it is for display; the ledger is the record).
        True when it was refreshed."""
        assert p.pb is not None
        last = self._cost_shown.get(p.uid)
        if not force and last is not None and monotonic() - last < self.cfg.cost_refresh_s:
            return False
        self._cost_shown[p.uid] = monotonic()
        posted = self.ledger.charges_by_resource(p.account).get(p.resource, 0)
        running = 0
        meter_id = p.status.get("meterId")
        if meter_id and p.phase == "Running":
            try:
                m = self.ledger.get_meter(meter_id)
            except NotFound:
                m = None
            if m is not None and m.closed_at is None:
                seconds = max(0, int((p.now - m.opened_at).total_seconds()))
                exact = Fraction(m.unit_price) * m.gpus * max(seconds, 0) / 3600
                running = max(0, to_minor(exact, p.pb.currency) - m.posted_minor)
        cost = format_money(posted + running, p.pb.currency).split()[0]
        self._patch(p, {"accruedCost": cost})
        return True

    # -- stopping -------------------------------------------------------------------
    def _stop(self, p: Pass, final: str, reason: str, message: str) -> None:
        """Delete the pod (GPUs are not kept), close the GPU meter at the stop instant
        (persisted first), keep the data."""
        if p.phase != "Stopping":
            self._patch(
                p,
                {
                    "phase": "Stopping",
                    "stoppedAt": r.fmt(p.now),
                    "stopTarget": final,
                    "message": message,
                },
            )
        crash_point("stop-saved")
        stopped_at = r.parse(p.status.get("stoppedAt")) or p.now
        self.kube.delete_pod(p.ns, b.pod_name(p.name))
        meter_id = p.status.get("meterId")
        if meter_id:
            self._close_meter(p, meter_id, stopped_at)
        changes: Obj = {
            "phase": final,
            "stopTarget": None,
            "node": None,
            "gpus": None,  # the pod and its GPUs are gone
            "preemptAt": None,
            "preemptedFor": None,
            "message": message,
            "conditions": self._conditions(p, ("Ready", False, reason, message)),
        }
        if final in r.HALTED_PHASES or final == "Refused":
            changes["haltedGeneration"] = p.meta.get("generation")
        self._patch(p, changes)
        self._event(p, "Warning" if final != "Stopped" else "Normal", reason, message)
        if p.pb is not None and p.account:
            self._update_cost(p)

    def _close_meter(self, p: Pass, meter_id: str, at: datetime) -> datetime:
        try:
            meter = self.ledger.close_meter(meter_id, at)
            closed = meter.closed_at or at
        except NotFound:  # never opened (interrupted right after the status patch)
            closed = at
        crash_point("meter-closed")
        self._open_meters.discard(meter_id)
        unsettled = list(p.status.get("unsettledMeters") or [])
        if meter_id not in unsettled:
            unsettled.append(meter_id)
        self._patch(p, {"unsettledMeters": unsettled, "meterId": None, "meterSince": None})
        return closed

    # -- settlement -------------------------------------------------------------------
    def _settle_meters(self, p: Pass) -> bool:
        """Settle closed runs once their grace period is over: the ledger rates the
        agents' usage, bills the GPU-seconds still missing from the control plane's
        timestamps (``meter-fallback:<meter>``) and marks the meter settled, in one
        transaction; usage that arrives later is stored as late, never charged. True
        when nothing is left waiting."""
        pending = list(p.status.get("unsettledMeters") or [])
        if not pending:
            return True
        grace = timedelta(seconds=self.cfg.metering_grace_s)
        left: list[str] = []
        for meter_id in pending:
            try:
                m = self.ledger.get_meter(meter_id)
            except NotFound:
                continue  # the run never reached the ledger: nothing to bill
            if m.settled_at is not None:
                continue  # settled by a pass whose status patch was lost
            if m.closed_at is None or p.now < m.closed_at + grace:
                left.append(meter_id)
                continue
            memo = (
                f"GPU time billed from control-plane timestamps "
                f"({r.fmt(m.opened_at)} -> {r.fmt(m.closed_at)}): no agent usage for part "
                f"of the run after a {self.cfg.metering_grace_s} s grace period"
            )
            m = self.ledger.settle_meter(
                meter_id, p.now, fallback=True, memo=memo, meta={"source": "control-plane"}
            )
            crash_point("settled")
            if m.fallback_minor:
                self._event(
                    p,
                    "Warning",
                    "MeteringFallback",
                    f"run {meter_id}: {m.fallback_quantity} GPU-seconds had no agent usage; "
                    "billed from control-plane timestamps",
                )
        self._patch(p, {"unsettledMeters": left or None})
        if len(left) < len(pending) and p.pb is not None and p.account:
            self._update_cost(p)  # the settled run now shows in status.accruedCost
        return not left

    def _settle_storage(self, p: Pass, final: bool) -> None:
        """Instance storage by quota, one posting per settlement window (clock hours by
        default), running or not, minus the seconds covered by package terms. Only whole
        windows are settled, except the last one at release. The windows add up in a
        ``RunningTotal`` kept in status (``storageExact``, ``storagePostedMinor``): each
        posts the delta of the rounded cumulative totals, so the instance's storage
        postings are its exact storage total rounded once. A pass killed before the patch
        repeats the same windows from the same total: same keys, same amounts."""
        assert p.pb is not None
        since = r.parse(p.status.get("storageSince"))
        if since is None:
            return
        start = r.parse(p.status.get("storageBilledUntil")) or since
        window = self.cfg.storage_settlement_s
        if final:
            until = r.parse(p.status.get("releasedAt")) or p.now
        else:
            ts = int(p.now.timestamp())
            until = datetime.fromtimestamp(ts - ts % window, p.now.tzinfo)
        if until <= start:
            return
        total = RunningTotal.decode(
            p.status.get("storageExact"), p.status.get("storagePostedMinor")
        )
        for a, z in r.storage_windows(start, until, window):
            exact = r.storage_window_exact(p.pb, p.quota, (a, z), p.terms)
            total, amount = total.add(exact, p.pb.currency)
            if amount <= 0:
                continue
            key = f"storage:{p.uid}:{int(a.timestamp())}"
            try:
                self.ledger.post_entry(
                    p.account,
                    EntryKind.CHARGE,
                    -amount,
                    key,
                    resource=p.resource,
                    memo=f"instance storage {p.quota} GiB quota, {r.fmt(a)} -> {r.fmt(z)}",
                    at=p.now,
                    meta={
                        "quota_gib": p.quota,
                        "start": r.fmt(a),
                        "end": r.fmt(z),
                        "exact_total": total.encode(),
                        "posted_total_minor": total.posted_minor,
                    },
                )
            except IdempotencyConflict:
                # posted before with other figures (the price or quota changed between a
                # killed pass and its repeat): the ledger's entry is the record, go on
                # from the total it recorded
                total = self._adopt_storage_entry(p, key, total, amount)
        self._patch(
            p,
            {
                "storageBilledUntil": r.fmt(until),
                "storageExact": total.encode(),
                "storagePostedMinor": total.posted_minor,
            },
        )

    def _adopt_storage_entry(
        self, p: Pass, key: str, total: RunningTotal, amount: int
    ) -> RunningTotal:
        """The running total after a window the ledger already holds under ``key`` with
        other figures than ``amount``: the ledger's entry is the record."""
        entry = self.ledger.get_entry(key)
        log.warning("storage window %s of %s was posted with other figures", key, p.resource)
        if "exact_total" in entry.meta:
            return RunningTotal.decode(entry.meta["exact_total"], entry.meta["posted_total_minor"])
        # posted by an older operator, window by window: keep our exact total, count what
        # was really posted, and never let the total fall below it (no credit follows)
        posted = total.posted_minor - amount - entry.amount_minor
        assert p.pb is not None
        floor = Fraction(posted, 10 ** minor_exponent(p.pb.currency))
        return RunningTotal(max(total.exact, floor), posted)

    # -- cloud disks (docs/arrears.md) ---------------------------------------------------
    def _disks_ready(self, p: Pass) -> bool:
        """Every disk in spec.cloudDisks exists, is Ready and is not being deleted; else
        the start is refused before anything is charged (no pod, meter or term yet)."""
        for i, name in enumerate(p.spec.get("cloudDisks") or []):
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

    # -- arrears (docs/arrears.md) --------------------------------------------------------
    def _arrears(self, p: Pass) -> bool:
        """While the account is in arrears: stop the instance at the arrears instant
        (data kept, it stays Stopped until the spec changes), keep billing storage, and
        delete the data when the countdown ends. True: nothing else to do this pass."""
        acct = p.acct_status
        # a shutdown whose package refund is posted but whose stop was interrupted is
        # finished whatever the account shows now (the refund may have paid the debt)
        refunded_at = self._arrears_refund_at(p)
        if refunded_at is None:
            if acct.get("state") != "Arrears":
                return False
            if (
                self.ledger.balance(p.account) > 0
                and self.ledger.available_balance(p.account, p.now) >= 0
            ):
                return False  # a recharge the (cached) Account status does not show yet
        since = refunded_at or r.parse(acct.get("arrearsSince")) or p.now
        if p.phase in r.ACTIVE_PHASES:
            began = r.parse(p.status.get("meterSince") or p.status.get("startedAt"))
            saved, p.now = p.now, min(p.now, max(since, began or since))
            self._refund_on_arrears(p)  # before the stop: a pass killed between repeats it
            message = (
                f"shut down: account {p.account!r} is in arrears since {r.fmt(since)}; "
                f"data kept until {acct.get('dataDeletionAt')}; recharge, then start it again"
            )
            self._stop(p, "Stopped", "ArrearsShutdown", message)
            p.now = saved
            self._patch(p, {"haltedGeneration": p.meta.get("generation")})
        elif p.phase not in ("Stopped", *r.HALTED_PHASES) and p.phase is not None:
            # e.g. Refused: keep it down with the reason
            self._patch(p, {"haltedGeneration": p.meta.get("generation")})
        deletion_at = r.parse(acct.get("dataDeletionAt"))
        if (
            deletion_at is not None
            and p.now >= deletion_at
            and p.status.get("storageSince")
            and ar.deletion_confirmed(self.kube, self.ledger, p.account, p.now)
        ):
            self._delete_data(p, deletion_at)
        self._settle_storage(p, final=False)
        return True

    def _arrears_refund_at(self, p: Pass) -> datetime | None:
        """The instant of an arrears refund of the last term if the instance is still
        active (a pass was killed between the refund and the stop), else None. Cheap for
        a running package: its last term ends in the future, so no ledger read."""
        if p.phase not in r.ACTIVE_PHASES or not p.terms:
            return None
        last = p.terms[-1]
        end = r.parse(last["end"])
        if end is None or end > p.now:
            return None
        try:
            entry = self.ledger.get_entry(f"package-refund:{p.uid}:{last['seq']}")
        except NotFound:
            return None
        return r.parse(entry.meta.get("switched_at")) if entry.meta.get("arrears") else None

    def _refund_on_arrears(self, p: Pass) -> None:
        """A package instance shut down by arrears gets the unused part of its term back
        by the mode-switch rule (the time used at the pay-as-you-go rate, the rest
        refunded, never below zero), which also reduces the debt. The refund key is per
        term (shared with a mode switch), so a term is refunded at most once."""
        if not (p.status.get("billingMode") or "").startswith("Package") or not p.terms:
            return
        last = p.terms[-1]
        start, end = r.parse(last["start"]), r.parse(last["end"])
        assert start is not None and end is not None
        if end > p.now:  # not over yet, nor left before
            self._leave_term(p, last, at=max(p.now, start), arrears=True)

    def _delete_data(self, p: Pass, at: datetime) -> None:
        """Storage is settled up to ``at`` exactly, then the volume goes: the agent of the
        volume's node is asked (through the ledger) to remove the node-local folder, and
        claim and volume are deleted. DataDeleted stays False (WipePending) until the
        agent reports the folder gone (``_wipe_pending``). Every step is idempotent, so a
        pass killed midway repeats it."""
        saved, p.now = p.now, at
        self._settle_storage(p, final=True)
        p.now = saved
        node = p.status.get("volumeNode") or self._pv_node(p)
        if node:  # before the PV goes: a pass killed after it still finds the node
            self.ledger.request_wipe(
                node, f"instances/{p.ns}/{p.name}", self._wipe_subject(p), p.account, at
            )
        self.kube.delete_pvc(p.ns, b.pvc_name(p.name))
        self.kube.delete_pv(b.pv_name(p.uid))
        message = (
            f"instance storage deleted at {r.fmt(at)} after "
            f"{self.cfg.arrears_retention_s // 3600} h of arrears; waiting for the agent of "
            f"node {node!r} to remove the folder (a start waits for it too)"
        )
        self._patch(
            p,
            {
                "storageSince": None,
                "storageBilledUntil": None,
                "storageExact": None,
                "storagePostedMinor": None,
                "volumeNode": None,
                "message": message,
                "conditions": self._conditions(p, ("DataDeleted", False, "WipePending", message)),
            },
        )
        self._wipe_pending(p, deleted_at=at, node=node)

    def _path_being_wiped(self, p: Pass) -> bool:
        """An instance about to place a new volume where another one's folder (an earlier
        instance of the same name) is still to be wiped waits: True."""
        if (
            p.status.get("volumeNode")
            or p.phase in r.ACTIVE_PHASES
            or p.spec.get("state", "Running") != "Running"
        ):
            return False
        other = self.ledger.pending_wipe_at(f"instances/{p.ns}/{p.name}")
        if other is None:
            return False
        self._patch(
            p,
            {
                "message": f"waiting for the agent of node {other.node!r} to remove the "
                f"folder of a deleted volume of the same name ({other.subject})"
            },
        )
        return True

    def _wipe_subject(self, p: Pass) -> str:
        # one volume per run count: a new volume is only ever created by a new run
        return f"instance-volume:{p.uid}:{int(p.status.get('runs') or 0)}"

    def _pv_node(self, p: Pass) -> str | None:
        """The node of the instance's local volume, from its node affinity."""
        pv = self.kube.get_pv(b.pv_name(p.uid)) or {}
        terms = (((pv.get("spec") or {}).get("nodeAffinity") or {}).get("required") or {}).get(
            "nodeSelectorTerms"
        ) or []
        for term in terms:
            for expr in term.get("matchExpressions") or []:
                if expr.get("key") == "kubernetes.io/hostname" and expr.get("values"):
                    return str(expr["values"][0])
        return None

    def _wipe_pending(
        self, p: Pass, deleted_at: datetime | None = None, node: str | None = None
    ) -> bool:
        """While the agent has not removed a deleted volume's folder: True (the pass
        stops here, so no new volume is placed at that path). Once it reports the wipe
        done: DataDeleted=True, the event and the audit record."""
        cond = next(
            (c for c in p.status.get("conditions") or [] if c.get("type") == "DataDeleted"), None
        )
        if cond is None or cond.get("reason") != "WipePending":
            return self._path_being_wiped(p)
        wipe = self.ledger.get_wipe(self._wipe_subject(p))
        if wipe is not None and wipe.done_at is None:
            return True
        at = wipe.requested_at if wipe is not None else (deleted_at or p.now)
        freed = (wipe.bytes_freed or 0) if wipe is not None else 0
        where = f" on node {wipe.node}" if wipe is not None else " (no node held it)"
        message = (
            f"instance storage deleted at {r.fmt(at)} after "
            f"{self.cfg.arrears_retention_s // 3600} h of arrears; {freed} bytes freed{where}"
        )
        self.ledger.record_audit(
            p.account,
            "gpucloud-operator",
            "data.deleted",
            f"instance:{p.resource}",
            {
                "kind": "instance_volume",
                "resource": p.resource,
                "path": f"instances/{p.ns}/{p.name}",
                "node": wipe.node if wipe is not None else node,
                "bytes_freed": freed,
            },
            at,
        )
        self._patch(
            p,
            {
                "message": message,
                "conditions": self._conditions(
                    p, ("DataDeleted", True, "ArrearsRetention", message)
                ),
            },
        )
        self._event(p, "Warning", "DataDeleted", message)
        return False

    # -- packages ---------------------------------------------------------------------
    def _buy_term(self, p: Pass, period: Any, start: datetime) -> bool:
        """Charge one package term upfront; False when the balance does not cover it."""
        assert p.pb is not None
        terms = p.terms
        seq = len(terms) + 1
        key = f"package:{p.uid}:{seq}"
        price = to_minor(package_price(p.pb, p.product, period, p.count), p.pb.currency)
        try:
            self.ledger.get_entry(key)
            replay = True
        except NotFound:
            replay = False
        if not replay:
            reserved = self._reserved(p, self._listed_reservations(p))
            available = self.ledger.available_balance(p.account, p.now, reserved_minor=reserved)
            decision = package_purchase_decision(available, p.product, p.count, period, p.pb)
            if not decision.allowed:
                self._event(p, "Warning", "InsufficientBalance", decision.message)
                return False
        end = start + self.cfg.package_length(period)
        self.ledger.post_entry(
            p.account,
            EntryKind.CHARGE,
            -price,
            key,
            resource=p.resource,
            memo=f"{period} package {b.gpu_summary(p.product, p.count)}, term {seq} "
            f"{r.fmt(start)} -> {r.fmt(end)}",
            at=p.now,
            meta={"seq": seq, "period": str(period)},
        )
        crash_point("term-charged")
        with self._guard:
            self._reservations.pop(p.uid, None)  # charged now: no longer reserved
        term = {
            "seq": seq,
            "period": str(period),
            "start": r.fmt(start),
            "end": r.fmt(end),
            "prepaidMinor": price,
        }
        self._patch(p, {"packageTerms": [*terms, term], "packageExpiresAt": r.fmt(end)})
        self._event(p, "Normal", "PackagePurchased", f"term {seq} paid, expires {r.fmt(end)}")
        return True

    def _package_rules(self, p: Pass) -> bool:
        """Reminder, expiry and auto-renewal of a running package instance. True when the
        instance was shut down."""
        key = p.status.get("billingMode") or ""
        if not key.startswith("Package") or not p.terms:
            return False
        last = p.terms[-1]
        end = r.parse(last["end"])
        assert end is not None
        while p.now >= end:
            # shut down at the expiry itself, even if this pass comes later (the operator
            # was down): the GPUs were paid until then, not after
            at = self._stop_instant(p, end)
            if not p.spec["billing"].get("autoRenew"):
                message = f"the package expired at {r.fmt(end)}"
                self._stop_at(p, at, "Expired", "PackageExpired", message)
                return True
            if not self._buy_term(p, r.period_of(key), end):
                self._stop_at(
                    p,
                    at,
                    "Expired",
                    "RenewalFailed",
                    f"auto-renewal at {r.fmt(end)} failed: the balance does not cover the "
                    "next term; recharge and start the instance again",
                )
                return True
            self._event(p, "Normal", "PackageRenewed", f"renewed from {r.fmt(end)}")
            end = r.parse(p.terms[-1]["end"]) or end
        if r.reminder_due(p.now, end, self.cfg.reminder_lead) and p.status.get(
            "reminderSentFor"
        ) != r.fmt(end):
            message = f"the package expires at {r.fmt(end)}" + (
                " and renews automatically" if p.spec["billing"].get("autoRenew") else ""
            )
            self._patch(
                p,
                {
                    "reminderSentFor": r.fmt(end),
                    "conditions": self._conditions(
                        p, ("PackageExpiring", True, "ExpiresSoon", message)
                    ),
                },
            )
            self._event(p, "Warning", "PackageExpiring", message)
        return False

    def _switch_mode(self, p: Pass) -> bool:
        """Leave the mode in force at ``now`` and enter the one in the spec. Package ->
        other: the used time at the pay-as-you-go rate is kept and the rest refunded (the
        billing core's rule). Metered -> other: the meter is closed (settled to the
        second). False when the new mode could not be entered (the instance stopped)."""
        assert p.pb is not None
        old = p.status.get("billingMode") or ""
        new = r.billing_key(p.spec["billing"])
        at = p.now
        if old.startswith("Package"):
            term = r.active_term(p.terms, p.now)
            if term is not None:
                at = self._leave_term(p, term)
        elif p.status.get("meterId"):
            at = self._close_meter(p, p.status["meterId"], p.now)
        if r.mode_of(new) is BillingMode.PACKAGE:
            if not self._buy_term(p, r.period_of(new), at):
                self._stop(
                    p,
                    "Refused",
                    "InsufficientBalance",
                    f"cannot switch to {new}: the balance does not cover the package",
                )
                return False
        else:
            meter_id = f"gpu:{p.uid}:{p.status.get('runs')}:{int(at.timestamp())}"
            self._patch(p, {"meterId": meter_id, "meterSince": r.fmt(at)})
            self._patch(p, {"billingMode": new})
            self._ensure_meter(p)
        self._patch(
            p,
            {
                "billingMode": new,
                "conditions": self._conditions(
                    p, ("Billing", True, new.replace("/", ""), f"billed as {new}")
                ),
            },
        )
        self.kube.patch_pod_labels(
            p.ns, b.pod_name(p.name), {b.MODE_LABEL: p.spec["billing"]["mode"]}
        )
        self._event(p, "Normal", "BillingModeChanged", f"{old} -> {new} at {r.fmt(at)}")
        return True

    def _keep_mode(self, p: Pass, why: str) -> None:
        """A switch to a mode the PriceBook does not offer for the product: the instance
        keeps running in the mode in force; the Billing condition and an event say why."""
        key = p.status.get("billingMode") or ""
        message = f"{why}; still billed as {key}"
        cond = next((c for c in p.status.get("conditions") or [] if c["type"] == "Billing"), {})
        if cond.get("message") == message:
            return
        conds = self._conditions(p, ("Billing", False, "NotOffered", message))
        self._patch(p, {"conditions": conds})
        self._event(p, "Warning", "NotOffered", message)

    def _leave_idle_package(self, p: Pass) -> None:
        """A stopped instance whose billing leaves a package mid-term gets the unused
        part refunded at once (the seed's mode-switch rule), not at its next start."""
        old = p.status.get("billingMode") or ""
        new = r.billing_key(p.spec["billing"])
        term = r.active_term(p.terms, p.now)
        if not old.startswith("Package") or old == new or term is None:
            return
        at = self._leave_term(p, term)
        self._patch(p, {"billingMode": new})
        self._event(p, "Normal", "BillingModeChanged", f"{old} -> {new} at {r.fmt(at)}")

    def _leave_term(
        self, p: Pass, term: Obj, at: datetime | None = None, arrears: bool = False
    ) -> datetime:
        """Refund the unused part of ``term`` left at ``at`` (default: now) and end the
        term there; idempotent per term (the refund key)."""
        assert p.pb is not None
        key = f"package-refund:{p.uid}:{term['seq']}"
        start, end = r.parse(term["start"]), r.parse(term["end"])
        assert start is not None and end is not None
        try:
            entry = self.ledger.get_entry(key)  # a replay: keep the first switch instant
            at = r.parse(entry.meta.get("switched_at")) or at or p.now
        except NotFound:
            at = at or p.now
            period = PackagePeriod(term["period"])
            settlement = leave_package(
                p.pb, p.product, p.count, Term(period, start, end), term["prepaidMinor"], at
            )
            if settlement.refund_minor:
                self.ledger.post_entry(
                    p.account,
                    EntryKind.REFUND,
                    settlement.refund_minor,
                    key,
                    resource=p.resource,
                    memo=f"package term {term['seq']} "
                    f"{'shut down by arrears' if arrears else 'left'} at {r.fmt(at)}: "
                    f"{settlement.used_seconds} s used at the pay-as-you-go rate",
                    at=at,
                    meta={
                        "switched_at": r.fmt(at),
                        "used_minor": settlement.used_minor,
                        **({"arrears": True} if arrears else {}),
                    },
                )
        terms = [dict(t) for t in p.terms]
        terms[-1]["end"] = r.fmt(at)
        self._patch(p, {"packageTerms": terms, "packageExpiresAt": None})
        return at

    # -- preemption ---------------------------------------------------------------------
    def _pod_gpus(self, pod: Obj, instances: dict[tuple[str, str], Obj]) -> PodGPUs:
        labels = pod["labels"]
        name = labels.get(b.INSTANCE_LABEL, "")
        st = (instances.get((pod["namespace"], name)) or {}).get("status") or {}
        return PodGPUs(
            namespace=pod["namespace"],
            instance=name,
            node=pod["node"],
            gpus=pod["gpus"],
            spot=bool(name) and labels.get(b.MODE_LABEL) == "Spot",
            started_at=r.parse(st.get("startedAt")),
            preempting=bool(st.get("preemptAt")) or pod["deleting"],
        )

    def _maybe_preempt(self, p: Pass) -> None:
        instances = {
            (i["metadata"]["namespace"], i["metadata"]["name"]): i
            for i in self.kube.list_cluster_objects(PLURAL)
        }
        pods = [self._pod_gpus(x, instances) for x in self.kube.gpu_pods()]
        plan = plan_preemption(
            self.kube.gpu_nodes(), pods, p.product, p.count, only_node=p.status.get("volumeNode")
        )
        if plan is None:
            return
        deadline = p.now + timedelta(seconds=self.cfg.preemption_grace_s)
        for victim in plan.victims:
            vic = instances.get((victim.namespace, victim.instance))
            if vic is None:
                continue
            message = (
                f"preempted for {p.resource} ({p.spec['billing']['mode']}): this spot "
                f"instance stops at {r.fmt(deadline)} (grace {self.cfg.preemption_grace_s} s); "
                "its data is kept and billing ends at the stop"
            )
            vic_status = dict(vic.get("status") or {})
            cond = b.condition("Preempting", True, "PreemptionNotice", message, r.fmt(p.now))
            self.kube.patch_status(
                PLURAL,
                victim.namespace,
                victim.instance,
                {
                    "preemptAt": r.fmt(deadline),
                    "preemptedFor": p.resource,
                    "message": message,
                    "conditions": b.merge_conditions(vic_status.get("conditions"), [cond]),
                },
            )
            self.kube.event(vic, "Warning", "PreemptionNotice", message)
            crash_point("notice-given")
        names = ", ".join(f"{v.namespace}/{v.instance}" for v in plan.victims)
        self._event(
            p, "Normal", "PreemptingSpot", f"spot instance(s) {names} on {plan.node} given notice"
        )

    def _preemption_due(self, p: Pass) -> bool:
        """Stop a spot instance whose notice ran out, at the instant the notice promised:
        a deadline that passed while the operator was down is carried out at once and
        billed only up to the deadline."""
        due = r.parse(p.status.get("preemptAt"))
        if due is None or p.now < due:
            return False
        at = self._stop_instant(p, due)
        self._mark_waiting(p.status.get("preemptedFor"), p.now)
        self._stop_at(
            p,
            at,
            "Preempted",
            "Preempted",
            f"stopped at {r.fmt(at)} to free GPUs (spot); data kept, no billing after the stop",
        )
        return True

    def _mark_waiting(self, resource: str | None, now: datetime) -> None:
        """The instance a preemption frees GPUs for is still waiting for them now (its
        pod cannot be placed before the victim's pod goes): say so in its status, so its
        billing cannot start earlier whatever the clocks say (rules.billed_start)."""
        if not resource:
            return
        ns, name = resource.split("/", 1)
        waiting = self.kube.get_namespaced_object(PLURAL, ns, name)
        if waiting is not None and (waiting.get("status") or {}).get("phase") == "Pending":
            self.kube.patch_status(PLURAL, ns, name, {"podWaitingAt": r.fmt(now)})

    def _stop_instant(self, p: Pass, due: datetime) -> datetime:
        """A stop that was due at ``due`` (a deadline the operator may have slept
        through): at ``due``, but never before the run's billing began nor after now."""
        began = r.parse(p.status.get("meterSince") or p.status.get("startedAt"))
        return min(p.now, max(due, began or due))

    def _stop_at(self, p: Pass, at: datetime, final: str, reason: str, message: str) -> None:
        """_stop with the stop instant ``at`` (in the past) instead of now."""
        saved, p.now = p.now, at
        try:
            self._stop(p, final, reason, message)
        finally:
            p.now = saved

    # -- release ----------------------------------------------------------------------
    def _release(self, p: Pass) -> bool:
        if not p.status.get("releasedAt"):
            self._patch(p, {"releasedAt": r.fmt(p.now)})
        released_at = r.parse(p.status["releasedAt"]) or p.now
        resolved = self._resolve(p)
        if p.phase in r.ACTIVE_PHASES:
            saved_now, p.now = p.now, released_at
            self._stop(p, "Stopped", "Released", "released: stopping")
            p.now = saved_now
        if resolved:
            try:
                self._settle_storage(p, final=True)
            except BillingError as exc:
                log.error("storage settlement of %s failed: %s", p.resource, exc)
            if not self._settle_meters(p):
                self._patch(p, {"message": "released: waiting for the last usage to settle"})
                return False
        self.kube.delete_pod(p.ns, b.pod_name(p.name), grace_s=0)
        # the data: the agent of the volume's node removes the folder (durable request in
        # the ledger, so it is done even if that agent is down now; a new instance of the
        # same name waits for it before placing a volume at that path)
        node = p.status.get("volumeNode") or self._pv_node(p)
        if node and p.account:
            self.ledger.request_wipe(
                node, f"instances/{p.ns}/{p.name}", self._wipe_subject(p), p.account, p.now
            )
        self.kube.delete_pvc(p.ns, b.pvc_name(p.name))
        self.kube.delete_pv(b.pv_name(p.uid))
        data = f"the agent of node {node!r} removes the data" if node else "no data was held"
        self._patch(
            p,
            {
                "phase": "Released",
                "message": f"released: settled, pod and volume deleted; {data}",
                "conditions": self._conditions(p, ("Ready", False, "Released", "released")),
            },
        )
        self._event(p, "Normal", "Released", f"settled; pod and volume deleted; {data}")
        self._note_phase(p.uid, p.ns, None)
        with self._placement_lock:
            self._assumed.pop(p.uid, None)
        with self._guard:
            self._awaiting_bind.discard(p.uid)
            self._status_written.discard(p.uid)
            self._run_pods.pop(p.uid, None)
        return True
