"""Idle GPUs (docs/idle.md): a Running instance of an Account with ``spec.idle`` is
checked once a minute (clock time): its run's usage records and their activity, read
from the ledger (only what the meter admitted: the run's own node and GPUs), say since
when its GPUs have been idle (``gpucloud_operator.idle_gpus``, the pure rule). Status
shows it; a notice (event, condition, ``instance.idle`` webhook) goes out once per idle
stretch; with ``stopAfterMinutes`` the instance is stopped like a user stop, its data
kept and billed to the second of the stop. Metered runs only (pay-as-you-go, spot: a GPU
meter): a package term is paid whatever the GPUs do, and a stop would save nothing."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from gpucloud.crd.account import IdlePolicy
from gpucloud.usage import MAX_GPU_WINDOW_S
from gpucloud_operator import idle_gpus as ig
from gpucloud_operator import rules as r
from gpucloud_operator.instances.core import Core, Pass
from gpucloud_operator.notify import payload, webhook_url

WEBHOOK_TYPE = "instance.idle"
CLEARED = {"idleSince": None, "idleSeenUntil": None}


class IdleGPUs(Core):
    """Idle-since in status, its notice, and the opt-in stop."""

    def _idle_gpus(self, p: Pass) -> bool:
        """True: stopped for idleness, nothing else to do this pass."""
        policy = p.account_spec.idle if p.account_spec is not None else None
        meter_id = p.status.get("meterId")
        began = r.parse(p.status.get("meterSince") or p.status.get("startedAt"))
        if policy is None or p.phase != "Running" or not meter_id or began is None:
            if p.status.get("idleSince") or p.status.get("idleSeenUntil"):
                self._patch(p, {**CLEARED, "conditions": self._idle_condition(p, None, None)})
            return False
        with self._guard:
            last = self._idle_checked.get(p.uid)
        if last is not None and p.now - last < timedelta(seconds=self.idle_check_s):
            return False
        with self._guard:
            self._idle_checked[p.uid] = p.now
        view = self._idle_view(p, policy, began, meter_id)
        verdict = ig.verdict(view, policy)
        since = _at(view.since) if view is not None and verdict.idle else None
        changes = {
            "idleSince": r.fmt(since) if since else None,
            "idleSeenUntil": r.fmt(_at(view.seen_until)) if since and view else None,
            "conditions": self._idle_condition(p, since, view),
        }
        self._patch(p, changes)
        if since is None:
            return False
        if verdict.notify and p.status.get("idleNoticedFor") != r.fmt(since):
            self._idle_notice(p, since, policy)
        if verdict.stop:
            minutes = policy.stop_after_minutes
            message = (
                f"stopped: its GPUs were idle since {r.fmt(since)} (at most "
                f"{_rule(policy)}) for {minutes} min, the Account's spec.idle."
                "stopAfterMinutes; its data is kept; start it again with spec.state"
            )
            self._stop(p, "Stopped", "IdleStopped", message)
            self._patch(p, {"haltedGeneration": p.meta.get("generation"), **CLEARED})
            self.counters.idle_stops.labels(p.product).inc()
            return True
        return False

    def _idle_view(
        self, p: Pass, policy: IdlePolicy, began: datetime, meter_id: str
    ) -> ig.IdleView | None:
        """Look back only as far as the policy's longest period (and a margin): a stretch
        that started before that is carried by status.idleSince."""
        now_s = int(p.now.timestamp())
        longest = max(
            policy.idle_after_minutes, policy.notify_after_minutes, policy.stop_after_minutes or 0
        )
        grace_end = int(began.timestamp()) + policy.grace_minutes * 60
        horizon = now_s - (longest + 10) * 60
        known_from = max(grace_end, horizon)
        records = self.ledger.gpu_activity(meter_id, since_s=known_from - MAX_GPU_WINDOW_S)
        view = ig.idle_view(records, p.count, known_from, policy)
        shown = r.parse(p.status.get("idleSince"))
        if view is not None and view.since == known_from and shown is not None:
            # no break since the horizon: the stretch status shows goes on
            view = ig.IdleView(min(view.since, int(shown.timestamp())), view.seen_until)
        return view

    def _idle_condition(
        self, p: Pass, since: datetime | None, view: ig.IdleView | None
    ) -> list[dict]:
        if since is None or view is None:
            return self._conditions(p, ("Idle", False, "Active", "its GPUs are in use"))
        minutes = view.seconds // 60
        message = f"all its GPUs idle since {r.fmt(since)} ({minutes} min)"
        return self._conditions(p, ("Idle", True, "GPUsIdle", message))

    def _idle_notice(self, p: Pass, since: datetime, policy: IdlePolicy) -> None:
        stop = policy.stop_after_minutes
        text = (
            f"instance {p.resource}: its GPUs ({p.product} x{p.count}) have been idle "
            f"(at most {_rule(policy)}) since {r.fmt(since)}; it is still billed"
            + (
                f"; it is stopped after {stop} min idle, data kept"
                if stop is not None
                else "; stop it if it is not needed"
            )
        )
        self._event(p, "Warning", "GPUsIdle", text)
        body = payload(WEBHOOK_TYPE, p.account, text, p.now, instance=p.name,
                       namespace=p.ns, idleSince=r.fmt(since))  # fmt: skip
        self.notifier.notify(webhook_url(p.account_spec, self.cfg.webhook_url), body)
        self._patch(p, {"idleNoticedFor": r.fmt(since)})
        self.counters.idle_notices.labels(p.product).inc()


def _at(seconds: int) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def _rule(policy: IdlePolicy) -> str:
    memory = f" and {policy.memory_mib} MiB" if policy.memory_mib is not None else ""
    return f"{policy.utilization_percent}% busy{memory}"
