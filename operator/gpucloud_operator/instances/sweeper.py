"""The sweeper: one schedule of instance passes instead of a Kopf timer per instance.

A timer per GPUInstance ran a pass every ``tick_interval_s`` whether anything was due
or not: at 2,000 instances 200 passes a second, most of the operator's idle CPU
(docs/benchmarks.md, "Scale"). The sweeper runs a pass only for an instance with
something due; watch events (the instance's, its pod's and claim's, an account's
arrears through ``wake_instance``) start the passes for everything else.

Rules:

1. **One entry per instance** (keyed by uid): the clock instant of its next pass and a
   real-time deadline, whichever comes first. Every pass ends by setting it from what
   the pass left (``next_due``), under the instance's lock, so the entry always follows
   the latest pass. A deleted (or vanished) instance's entry is dropped.
2. **Keyed by the injected clock.** The time rules (package expiry and reminder, the
   storage hour, the metering grace, an idle check, a spot notice, a budget month) are
   clock instants; the schedule is checked every ``check_s`` real seconds, so a file
   clock that jumps makes everything due at once, at the next check. Real-time
   deadlines are checked at the same looks (up to ``check_s`` late), so that the
   refreshes due within one look go together.
3. **Real seconds** only for what is counted in real seconds (the accruedCost refresh,
   the first minute of a run waiting for its GPUs' report) and for the cap.
3a. **Two kinds of work** (``Work``). A whole pass (``PASS``) for every time rule, a
   busy phase and the cap; a refresh (``REFRESH``) when all that is due is what
   ``status`` shows for display, ``accruedCost`` and the GPUs' lookup, of a run whose
   last pass left what a refresh needs (``Seen.refreshable``: ``instances/refresh.py``).
   An entry holds both deadlines; the refresh one only if it comes before the pass's.
   Every refresh due at one check is handed over in one batch (``refresh``): one
   ledger query for them all instead of a whole pass each (at 2,000 instances the
   refreshes were 33 whole passes a second, docs/benchmarks.md). A refresh keeps the
   entry's pass deadlines and only moves its refresh deadline (``refreshed``).
4. **Nothing waits forever**: every entry is due at the latest ``sweep_max_interval_s``
   after its pass, in clock and in real seconds (a clock that stands still, a rule the
   schedule does not know: a price book or Account edit). An instance in a phase that
   moves on its own (Pending, Starting, Stopping, Queued, Refused), with runs to settle,
   of an account in arrears, or with a folder being wiped, is "busy": checked every
   ``tick_interval_s`` as the timer did.
5. **Earlier only** from outside a pass (``earlier``: a spot stop at its notice's time
   asked for by another instance's pass): it can bring an entry forward, never push it
   back, so no due pass is skipped.
6. **Taking** a due entry removes it; the pass runs on the pool with ``wait=False``: if
   another pass over the instance holds its lock, that pass sets the next entry when it
   ends. A pass that fails still sets it, at the busy pace
   (``InstanceReconciler._reconcile_fresh``), and a call that fails outright is given
   the busy interval here, so an error is retried.

7. **Only while Kopf works here** (HA, ``--peering``): Kopf pauses a replica that a
   live one of higher priority outranks, its handlers and timers included, but not
   this thread. With ``lease_s`` set, the sweeper runs passes only within ``lease_s`` of
   the last Kopf handler call of this process (``alive``: every instance, pod and
   account handler; the account timer alone calls it every ``account_interval_s``), so
   a replica that stands by stops sweeping within ``lease_s``; its entries wait, due,
   for the day it works again.

Locks: ``_cv`` is a leaf lock over ``_entries`` and the two heaps (stale heap items are
skipped by their sequence number), held for dictionary and heap operations only, never
while a pass runs; passes run on their own pool (``background``).
"""

from __future__ import annotations

import enum
import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from gpucloud.clock import Clock
from gpucloud_operator import budgets as bu
from gpucloud_operator import rules as r
from gpucloud_operator.config import OperatorConfig

log = logging.getLogger(__name__)

# Phases that move on their own, checked at the busy pace (rule 4).
QUIET_PHASES = frozenset({"Running", "Stopped", "Expired", "Preempted"})
NEVER = float("inf")  # no refresh deadline

Runner = Callable[[str, str, str], None]  # (namespace, name, uid): one pass, wait=False
Item = tuple[str, str, str]  # (namespace, name, uid)
Refresher = Callable[[list[Item]], None]  # the refreshes due at one check (rule 3a)


class Work(enum.Enum):
    """What is due for an instance (rule 3a)."""

    PASS = "pass"  # a whole pass: a time rule, a busy phase, the cap, a failure
    REFRESH = "refresh"  # only what status shows for display: accruedCost, the GPUs


@dataclass(frozen=True)
class Due:
    """When an instance next needs a pass: at clock instant ``at`` or after ``real_s``
    real seconds, whichever first; and a refresh (rule 3a) after ``refresh_s`` real
    seconds, when that comes before the pass's deadlines."""

    at: datetime
    real_s: float
    refresh_s: float | None = None

    def work(self, now: datetime, elapsed_s: float) -> Work | None:
        """What is due at clock instant ``now``, ``elapsed_s`` real seconds after the
        pass that set it: the whole pass wins over a refresh; None: nothing yet."""
        if now >= self.at or elapsed_s >= self.real_s:
            return Work.PASS
        if self.refresh_s is not None and elapsed_s >= self.refresh_s:
            return Work.REFRESH
        return None


@dataclass(frozen=True)
class Seen:
    """What a pass left that the schedule depends on (``next_due``'s input)."""

    status: dict
    now: datetime
    in_arrears: bool = False
    failed: bool = False  # the pass raised: retried at the busy pace
    idle_checked: datetime | None = None  # None: the idle rule does not apply
    cost_left_s: float | None = None  # real seconds to the next accruedCost refresh
    eager_left_s: float | None = None  # real seconds left of the GPUs' first lookups
    # the pass left what a refresh needs (a ticket, instances/refresh.py): the cost and
    # GPUs' deadlines are a refresh's, not a whole pass's (rule 3a)
    refreshable: bool = False


def refresh_after(
    cost_left_s: float | None, eager_left_s: float | None, cfg: OperatorConfig
) -> float | None:
    """Real seconds to the next refresh of what status shows: the accruedCost refresh
    (not sooner than a second: ``cost_refresh_s`` may be 0), or the next of the GPUs'
    first lookups (at the busy pace); None when neither applies."""
    out: list[float] = []
    if cost_left_s is not None:
        out.append(max(cost_left_s, 1.0))
    if eager_left_s is not None and eager_left_s > 0:
        out.append(min(eager_left_s, cfg.tick_interval_s))
    return min(out) if out else None


def next_due(seen: Seen, cfg: OperatorConfig, idle_check_s: float) -> Due:
    """The pure rule: the earliest instant a time rule of ``instances/*.py`` acts on
    the instance after this pass, capped by ``sweep_max_interval_s`` (see the module
    docstring; docs/operator.md, "Passes")."""
    st, now = seen.status, seen.now
    cap = cfg.sweep_max_interval_s
    busy = (
        st.get("phase") not in QUIET_PHASES
        or bool(st.get("unsettledMeters"))
        or seen.in_arrears
        or seen.failed
        or any(
            c.get("type") == "DataDeleted" and c.get("reason") == "WipePending"
            for c in st.get("conditions") or []
        )
    )
    if busy:
        cap = min(cap, cfg.tick_interval_s)
    at = [now + timedelta(seconds=cap)]
    real = [cap]
    if cfg.storage_settlement_s:  # the next storage window's end (Storage._settle_storage)
        window = cfg.storage_settlement_s
        ts = int(now.timestamp())
        at.append(datetime.fromtimestamp(ts - ts % window + window, now.tzinfo))
    terms = st.get("packageTerms") or []
    if (st.get("billingMode") or "").startswith("Package") and terms:
        end = r.parse(terms[-1].get("end"))  # expiry or renewal (Packages._package_rules)
        if end is not None:
            at.append(end)
            remind = end - cfg.reminder_lead
            if st.get("reminderSentFor") != r.fmt(end) and remind > now:
                at.append(remind)
    notice = r.parse(st.get("preemptStopAt") or st.get("preemptAt"))
    if notice is not None:  # a spot notice's stop (Preemption._preemption_due)
        at.append(notice)
    if seen.idle_checked is not None:  # IdleGPUs._idle_gpus: once a minute of clock time
        at.append(seen.idle_checked + timedelta(seconds=idle_check_s))
    at.append(bu.month_of(now).end)  # budgets are per calendar month (Budgets)
    refresh = refresh_after(seen.cost_left_s, seen.eager_left_s, cfg)
    if refresh is not None and not seen.refreshable:
        real.append(refresh)  # only a whole pass can do it
        refresh = None
    real_s = max(0.0, min(real))
    if refresh is not None and refresh >= real_s:
        refresh = None  # the pass comes first and refreshes too
    return Due(at=max(now + timedelta(seconds=1), min(at)), real_s=real_s, refresh_s=refresh)


class Sweeper:
    """The schedule of rule 1 and the thread that runs what falls due."""

    def __init__(
        self,
        clock: Clock,
        run: Runner,
        *,
        retry_s: float,
        refresh: Refresher | None = None,
        check_s: float = 1.0,
        lease_s: float | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        batch: int = 200,
    ) -> None:
        self.clock = clock
        self._run_pass = run
        self._refresh = refresh  # None: a due refresh runs as a whole pass
        self.retry_s = retry_s
        self.check_s = check_s
        self.batch = batch  # refreshes per call of ``refresh`` (spread over the pool)
        self.lease_s = lease_s
        self._alive_at: float | None = None  # the last Kopf handler call (rule 7)
        self._monotonic = monotonic
        self._cv = threading.Condition()
        # uid -> (namespace, name, clock instant, pass deadline, refresh deadline, seq):
        # deadlines monotonic; the refresh one NEVER when none (rule 3a)
        self._entries: dict[str, tuple[str, str, datetime, float, float, int]] = {}
        self._by_clock: list[tuple[datetime, int, str]] = []
        self._by_real: list[tuple[float, int, str]] = []  # the earlier of the deadlines
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._submit: Callable[[Callable[[], None]], None] | None = None
        self.passes = 0  # passes handed to the pool (tests and the bench read it)
        self.refreshes = 0  # refreshes handed over in batches

    # -- the schedule ------------------------------------------------------------------
    def due(self, uid: str, namespace: str, name: str, due: Due) -> None:
        """Set the instance's next pass (replaces its entry: the latest pass knows)."""
        mono = self._monotonic()
        refresh = NEVER if due.refresh_s is None else mono + due.refresh_s
        with self._cv:
            self._put(uid, namespace, name, due.at, mono + due.real_s, refresh)

    def refreshed(self, uid: str, refresh_s: float | None) -> None:
        """A refresh ran (or could not, and asks again): the next one after ``refresh_s``
        real seconds, the entry's pass deadlines kept (rule 3a). No entry (a pass took
        it meanwhile, and sets it when it ends): nothing to do."""
        mono = self._monotonic()
        with self._cv:
            old = self._entries.get(uid)
            if old is not None:
                refresh = NEVER if refresh_s is None else mono + refresh_s
                self._put(uid, old[0], old[1], old[2], old[3], refresh)

    def earlier(self, uid: str, namespace: str, name: str, at: datetime) -> None:
        """A pass at clock instant ``at`` if that is before the entry's (rule 5)."""
        with self._cv:
            old = self._entries.get(uid)
            if old is None:
                self._put(uid, namespace, name, at, self._monotonic() + self.retry_s, NEVER)
            elif at < old[2]:
                self._put(uid, namespace, name, at, old[3], old[4])

    def _put(
        self, uid: str, ns: str, name: str, at: datetime, deadline: float, refresh: float
    ) -> None:
        """Under ``_cv``."""
        seq = next(self._seq)
        self._entries[uid] = (ns, name, at, deadline, refresh, seq)
        heapq.heappush(self._by_clock, (at, seq, uid))
        heapq.heappush(self._by_real, (min(deadline, refresh), seq, uid))
        # no notify: the loop looks every ``check_s`` anyway, and waking it on each of
        # hundreds of passes a second cost more than the look (py-spy, 500 instances)

    def alive(self) -> None:
        """Kopf ran a handler in this process: it is not paused (rule 7)."""
        self._alive_at = self._monotonic()  # one assignment: atomic under the GIL

    def forget(self, uid: str) -> None:
        with self._cv:
            self._entries.pop(uid, None)

    def when(self, uid: str) -> tuple[datetime, float] | None:
        """The entry's clock instant and monotonic pass deadline (tests)."""
        with self._cv:
            hit = self._entries.get(uid)
        return None if hit is None else (hit[2], hit[3])

    def refresh_at(self, uid: str) -> float | None:
        """The entry's monotonic refresh deadline, None if it has none (tests)."""
        with self._cv:
            hit = self._entries.get(uid)
        return None if hit is None or hit[4] == NEVER else hit[4]

    def __len__(self) -> int:
        with self._cv:
            return len(self._entries)

    def take_due(self) -> tuple[list[Item], list[Item]]:
        """What is due now, by the clock or by real time: (namespace, name, uid) of the
        whole passes, whose entries are removed (the pass sets the next), and of the
        refreshes, whose entries stay without a refresh deadline until ``refreshed``."""
        now, mono = self.clock.now(), self._monotonic()
        passes: list[Item] = []
        refreshes: list[Item] = []
        if self._standing_by(mono):
            return passes, refreshes  # rule 7: the entries stay, due
        with self._cv:
            for heap, limit in ((self._by_clock, now), (self._by_real, mono)):
                while heap and heap[0][0] <= limit:  # type: ignore[operator]
                    _, seq, uid = heapq.heappop(heap)
                    hit = self._entries.get(uid)
                    if hit is None or hit[5] != seq:
                        continue  # moved or dropped
                    ns, name, at, deadline, refresh, _ = hit
                    if at <= now or deadline <= mono:
                        del self._entries[uid]
                        passes.append((ns, name, uid))
                    elif refresh <= mono:
                        refreshes.append((ns, name, uid))  # in flight: no refresh deadline
                        self._put(uid, ns, name, at, deadline, NEVER)
            self._compact()
        if self._refresh is None:  # no batched refresh here: a whole pass does it
            with self._cv:
                for _, _, uid in refreshes:
                    self._entries.pop(uid, None)
            passes, refreshes = passes + refreshes, []
        return passes, refreshes

    def _standing_by(self, mono: float) -> bool:
        """Rule 7: with a lease, no Kopf handler ran here for longer than it."""
        alive = self._alive_at
        return self.lease_s is not None and (alive is None or mono - alive > self.lease_s)

    def _compact(self) -> None:
        """Under ``_cv``: rebuild a heap that is mostly stale items (every pass pushes
        two), so memory stays proportional to the instances."""
        if len(self._by_clock) > 4 * len(self._entries) + 64:
            self._by_clock = [(e[2], e[5], u) for u, e in self._entries.items()]
            self._by_real = [(min(e[3], e[4]), e[5], u) for u, e in self._entries.items()]
            heapq.heapify(self._by_clock)
            heapq.heapify(self._by_real)

    # -- running -----------------------------------------------------------------------
    def run_due(self) -> int:
        """Run what is due here, one after another (unit tests): how many passes and
        refreshes ran."""
        passes, refreshes = self.take_due()
        for ns, name, uid in passes:
            self._pass(ns, name, uid)
        if refreshes:
            self._refresh_batch(refreshes)
        return len(passes) + len(refreshes)

    def _pass(self, ns: str, name: str, uid: str) -> None:
        try:
            self._run_pass(ns, name, uid)
        except Exception:
            log.exception("sweep pass over %s/%s failed", ns, name)
            with self._cv:  # retried at the busy pace, unless a pass set it since
                if uid not in self._entries:
                    self._put(
                        uid,
                        ns,
                        name,
                        self.clock.now() + timedelta(seconds=self.retry_s),
                        self._monotonic() + self.retry_s,
                        NEVER,
                    )

    def _refresh_batch(self, items: list[Item]) -> None:
        assert self._refresh is not None
        try:
            self._refresh(items)
        except Exception:
            log.exception("refresh of %d instances failed", len(items))
            for _, _, uid in items:  # asked again at the busy pace
                self.refreshed(uid, self.retry_s)

    def start(self, submit: Callable[[Callable[[], None]], None]) -> None:
        """Check the schedule every ``check_s`` real seconds on a daemon thread and hand
        the due passes, and the due refreshes in batches, to ``submit`` (a pool)."""
        with self._cv:
            if self._thread is None:
                self._submit = submit
                self._thread = threading.Thread(target=self._loop, name="sweeper", daemon=True)
                self._thread.start()

    def _loop(self) -> None:
        assert self._submit is not None
        while True:
            passes, refreshes = self.take_due()
            for ns, name, uid in passes:
                self._submit(lambda ns=ns, name=name, uid=uid: self._pass(ns, name, uid))
                self.passes += 1
            for i in range(0, len(refreshes), self.batch):
                chunk = refreshes[i : i + self.batch]
                self._submit(lambda chunk=chunk: self._refresh_batch(chunk))
                self.refreshes += len(chunk)
            # one look per ``check_s``, not one per deadline: the refreshes that fell due
            # meanwhile go as one batch (waking for each deadline made batches of one)
            with self._cv:
                self._cv.wait(timeout=self.check_s)
