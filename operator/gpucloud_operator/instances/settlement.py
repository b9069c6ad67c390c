"""Settlement of GPU time: the run's meter is opened in the ledger when its pod runs
(from the instant Kubernetes recorded), closed at the stop instant (saved in status
first), and settled once after the metering grace period (agents' usage rated, the
seconds they missed billed from control-plane timestamps, in one transaction); meters
closed but not settled are listed in status.unsettledMeters until then. Also
status.accruedCost and status.gpus, for display (the ledger is the record)."""

from __future__ import annotations

from datetime import datetime, timedelta
from fractions import Fraction

from gpucloud.billing import format_money, to_minor
from gpucloud.clock import monotonic
from gpucloud.ledger import NotFound
from gpucloud_operator import builders as b
from gpucloud_operator import rules as r
from gpucloud_operator.crash import crash_point
from gpucloud_operator.instances.core import Core, Pass
from gpucloud_operator.instances.kubeapi import Obj


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
