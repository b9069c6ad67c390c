"""Settlement of GPU time: the run's meter is opened in the ledger when its pod runs
(from the instant Kubernetes recorded), closed at the stop instant (saved in status
first), and settled once after the metering grace period (agents' usage rated, the
seconds they missed billed from control-plane timestamps, in one transaction); meters
closed but not settled are listed in status.unsettledMeters until then. Also
status.accruedCost and status.gpus, for display (the ledger is the record)."""

from __future__ import annotations

import contextlib
import logging
import threading
from datetime import datetime, timedelta

from gpucloud.clock import monotonic
from gpucloud.ledger import Meter, NotFound
from gpucloud_operator import builders as b
from gpucloud_operator import rules as r
from gpucloud_operator.crash import crash_point
from gpucloud_operator.instances.core import Core, Pass
from gpucloud_operator.instances.kubeapi import PLURAL, Obj
from gpucloud_operator.instances.refresh import Ticket, cost_text, running_minor
from gpucloud_operator.instances.sweeper import refresh_after

log = logging.getLogger(__name__)


class Settlement(Core):
    """GPU meters: open, close, settle; the cost and GPUs shown in status."""

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
            # the product's devices only: a MIG slice, a share or a whole GPU
            gpu_product=p.product,
            # only this node's agent may report the pod's usage (gpucloud.ledger.admission)
            node=(pod.get("spec") or {}).get("nodeName"),
        )
        self._open_meters.add(meter_id)

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
        meter = None
        meter_id = p.status.get("meterId")
        if meter_id and p.phase == "Running":
            with contextlib.suppress(NotFound):  # not opened yet: nothing running
                meter = self.ledger.get_meter(meter_id)
        running = running_minor(meter, p.now, p.pb.currency)
        self._patch(p, {"accruedCost": cost_text(posted + running, p.pb.currency)})
        return True

    def _gpus_eager(self, p: Pass, pod: Obj) -> bool:
        """Whether a pass of a run whose GPUs no agent has reported yet looks them up:
        during its first ``gpus_eager_s`` (agents report within seconds), later only
        with the cost refresh (``_gpus_asked`` in concurrency.py)."""
        pod_uid, now = pod["metadata"]["uid"], monotonic()
        asked = self._gpus_asked.get(p.uid)
        if asked is None or asked[0] != pod_uid:  # this run's first ask
            asked = self._gpus_asked[p.uid] = (pod_uid, now)
        return now - asked[1] < self.gpus_eager_s

    def _show_gpus(self, p: Pass, pod: Obj) -> None:
        """status.gpus: the GPU UUIDs the agents reported for this run's pod (the pod UID
        is new each run). Refreshed with accruedCost, and on every pass of the run's
        first minute until the first usage arrives; patched only when it changes. Once
        every GPU of the run is shown, the ledger has nothing new to say for this pod:
        no query (``_gpus_known``; it was a quarter of the idle CPU at 2,000 instances)."""
        pod_uid = pod["metadata"]["uid"]
        shown = p.status.get("gpus") or []
        if self._gpus_known.get(p.uid) == pod_uid and len(shown) >= p.count:
            return
        gpus = self.ledger.gpus_seen(pod_uid)
        if gpus:
            self._patch(p, {"gpus": gpus})
            self._gpus_known[p.uid] = pod_uid

    # -- the refresh without a whole pass (instances/refresh.py; sweeper rule 3a) --------
    def _ticket(self, p: Pass) -> Ticket | None:
        """What a refresh of this instance needs, if its pass left it running with a meter
        this process opened and saw its run's pod (``_observe_running``); else None."""
        meter_id = p.status.get("meterId") or ""  # none: a package's run, charged ahead
        if (
            p.phase != "Running"
            or not p.pod_uid
            or (meter_id and meter_id not in self._open_meters)
            or p.pb is None
            or not p.account
        ):
            return None
        return Ticket(
            namespace=p.ns,
            name=p.name,
            account=p.account,
            resource=p.resource,
            meter_id=meter_id,
            currency=p.pb.currency,
            pod_uid=p.pod_uid,
            gpus_wanted=p.count,
            cost_shown=p.status.get("accruedCost"),
            gpus_shown=tuple(p.status.get("gpus") or ()),
        )

    def refresh_shown(self, items: list[tuple[str, str, str]]) -> None:
        """The sweeper's refreshes due at one check (namespace, name, uid): accruedCost
        and the GPUs' lookup of each, as ``_update_cost`` and ``_show_gpus`` would, but
        with one ledger query each for all of them, and a status patch only where the
        shown value changed. An instance whose lock a pass holds is left to that pass;
        one without a ticket gets a whole pass."""
        held: list[tuple[str, Ticket, threading.Lock]] = []
        whole: list[tuple[str, str, str]] = []
        try:
            for ns, name, uid in items:
                lock = self._lock(self._locks, uid)
                if not lock.acquire(blocking=False):
                    self._refreshed(uid, self.cfg.tick_interval_s)  # the pass may be done
                    continue
                ticket = self._tickets.get(uid)
                if ticket is None:
                    lock.release()
                    whole.append((ns, name, uid))
                else:
                    held.append((uid, ticket, lock))
            if held:
                self._refresh_held([(uid, t) for uid, t, _ in held])
        finally:
            for _, _, lock in held:
                lock.release()
        for ns, name, uid in whole:
            self._reconcile_fresh(ns, name, uid, wait=False)

    def _refresh_held(self, tickets: list[tuple[str, Ticket]]) -> None:
        """Under each instance's lock: the batch reads, then one patch per change."""
        now, mono = r.second(self.clock.now()), monotonic()
        slack = self.sweeper.check_s if self.sweeper is not None else 1.0
        cost_due = {
            uid
            for uid, _ in tickets
            if (last := self._cost_shown.get(uid)) is None
            or mono - last >= self.cfg.cost_refresh_s - slack
        }
        gpus_due = {
            uid
            for uid, t in tickets
            if not (self._gpus_known.get(uid) == t.pod_uid and len(t.gpus_shown) >= t.gpus_wanted)
        }
        # the GPUs' first-minute lookups between cost refreshes only when usage was
        # stored since the last (kwok has no agents: they were half the refreshes' CPU);
        # the cost refresh looks whatever the watermark says (a PostgreSQL record may
        # commit below it), so a skipped one waits a cost_refresh_s at most
        mark = self.ledger.usage_watermark() if gpus_due else None
        gpus_due = {
            uid
            for uid, t in tickets
            if uid in gpus_due and (uid in cost_due or t.gpus_mark != mark)
        }
        costed = [t for uid, t in tickets if uid in cost_due]
        pods = [t.pod_uid for uid, t in tickets if uid in gpus_due]
        posted: dict[tuple[str, str], int] = {}
        meters: dict[str, Meter] = {}
        if costed:
            posted = self.ledger.charges_by_resources((t.account, t.resource) for t in costed)
            meters = self.ledger.get_meters(t.meter_id for t in costed if t.meter_id)
        seen = self.ledger.gpus_seen_by_pod(pods) if pods else {}
        for uid, t in tickets:
            cost, gpus = t.cost_shown, t.gpus_shown
            if uid in cost_due:
                self._cost_shown[uid] = mono
                owed = posted.get((t.account, t.resource), 0)
                owed += running_minor(meters.get(t.meter_id), now, t.currency)
                cost = cost_text(owed, t.currency)
            found = seen.get(t.pod_uid)
            if found:
                gpus = tuple(found)
                self._gpus_known[uid] = t.pod_uid
            changes: Obj = {}
            if cost is not None and cost != t.cost_shown:
                changes["accruedCost"] = cost
            if gpus != t.gpus_shown:
                changes["gpus"] = list(gpus)
            try:
                if changes:
                    patched = self.kube.patch_status(PLURAL, t.namespace, t.name, changes)
                    with self._guard:
                        self._status_written.add(uid)
                    self._saw_version(uid, patched)
                self._tickets.shown(uid, cost, gpus, mark if uid in gpus_due else None)
            except Exception:
                log.exception("refresh of %s/%s failed", t.namespace, t.name)
                self._refreshed(uid, self.cfg.tick_interval_s)
                continue
            self._refreshed(uid, self._refresh_left(uid, bool(gpus), mono))

    def _refresh_left(self, uid: str, gpus_shown: bool, mono: float) -> float | None:
        """Real seconds to the instance's next refresh (``sweeper.refresh_after``)."""
        return refresh_after(*self._shown_left(uid, gpus_shown, mono), self.cfg)

    def _shown_left(self, uid: str, gpus_shown: bool, mono: float) -> tuple[float, float | None]:
        """Of a running instance, at monotonic ``mono``: real seconds to its accruedCost
        refresh, and left of its GPUs' first lookups (None: shown, or not asked yet).
        What a pass's schedule and a refresh's both start from."""
        cost = self._cost_shown.get(uid)
        asked = self._gpus_asked.get(uid)
        return (
            self.cfg.cost_refresh_s - (mono - cost if cost is not None else 0.0),
            self.gpus_eager_s - (mono - asked[1]) if asked is not None and not gpus_shown else None,
        )

    def _refreshed(self, uid: str, refresh_s: float | None) -> None:
        if self.sweeper is not None:
            self.sweeper.refreshed(uid, refresh_s)
