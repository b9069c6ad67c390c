"""Arrears of the instance's account (docs/arrears.md): the instance stops at the arrears
instant (a package term's unused part refunded first), storage keeps billing, and the
data is deleted when the 7-day countdown ends. The account's state is decided by
``gpucloud_operator.arrears``; this room applies it to one instance."""

from __future__ import annotations

from datetime import datetime

from gpucloud.ledger import NotFound
from gpucloud_operator import arrears as ar
from gpucloud_operator import rules as r
from gpucloud_operator.instances.core import Core, Pass
from gpucloud_operator.instances.kubeapi import Obj


class Arrears(Core):
    """An instance of an account in arrears."""

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
            changes: Obj = {"haltedGeneration": p.meta.get("generation")}
            if p.phase == "Queued":  # off the resume queue: it would start on its own
                changes |= {
                    "phase": "Stopped",
                    "message": f"taken off the resume queue: account {p.account!r} is in "
                    "arrears; recharge, then start it again",
                }
            self._patch(p, changes)
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
