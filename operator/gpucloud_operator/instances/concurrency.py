"""The instance reconciler's locks and in-memory caches, and the rules for them.

Kopf runs handlers on a pool of worker threads (and the sweeper its passes on its own),
so passes over different instances run at once, and the claim rechecks run on the
``Later`` thread. Everything below is a hint or a serialisation: the record is the
instance's status and the ledger. A restart empties all of it, and a fresh process must
(and does) reach the same postings with the same keys, so nothing here can lose or
invent money; a lost entry costs at most an API read or a repeated idempotent call.

Locks, outermost first (a thread takes them in this order only, so none can deadlock):

``_locks[uid]`` (instance lock)
    One pass at a time per instance: held for the whole pass by
    ``InstanceReconciler._reconcile_fresh`` and ``release``, API and ledger calls
    included. Every status read-modify-patch of the instance happens under it. A sweeper
    pass that finds it taken skips (``wait=False``); an event waits, and then
    drops what its body showed (another pass ran meanwhile).
    One pass may hold a second instance lock: a pass that gives a spot instance its
    preemption notice (``Preemption._give_notice``) takes the victim's lock, so that the
    notice and its delivery never interleave with the victim's own pass (which delivers
    a notice a crash left undelivered). It waits at most ``notice_lock_s`` for it and
    skips that victim otherwise (the next pass plans again), so two passes holding one
    lock each and waiting for the other's cannot deadlock.
``_account_locks[account]`` (admission lock)
    Serialises admission per account in ``Lifecycle._start``: the instance limit
    count, the money rule applied to what others reserved, and the slot noted
    (``_note_phase(..., "Pending")``) and the package term reserved, as one step, so
    two starts on one account never both count on the same slot or balance. The ledger
    reads of the money rule and of the account's budgets are done before it is taken;
    under it only cached lists are read (the Account list, and the instance list once
    per process to fill ``_phases``), and a refusal (``_refuse``) patches the status.
    The status patch that claims the run, and the pod, come after it is let go (a burst
    of starts on one account would queue on those API calls). Never held with the
    placement lock.
``_placement_lock``
    Serialises placement: ``Placement._place`` and ``Placement._room_on`` (a queued
    spot instance's resume) read the node and pod lists (cached) and read and write
    ``_assumed``, so two placements never count on the same GPUs. Held by
    ``Lifecycle._start`` and ``Storage._volume_node`` around ``_place``, by ``_room_on``,
    and around ``_assumed.pop`` when a start is refused, a run stops or the instance is
    released. Never held with the admission lock (``_start`` lets it go before
    admission).
``_guard``
    A leaf lock over the small in-memory tables below: held for a few dictionary or set
    operations, never across an API or ledger call, and no other lock is taken under
    it. ``_lock`` takes it to create a per-key lock.

Caches and hints, by the room that owns them:

========================  =================  ==========================================
attribute                 guarded by         what it is, and what a stale entry costs
========================  =================  ==========================================
``_phases``               ``_guard``         admission: uid -> (namespace, phase) of
                                             every instance, so the instance limit is
                                             counted without listing all instances per
                                             start. Filled from one list on first use,
                                             then written by every phase patch of this
                                             process (``_note_phase``).
``_reservations``         ``_guard``         admission: uid -> (account, minor units) of
                                             package starts admitted here and not
                                             charged yet; dropped when the term is
                                             charged or the phase leaves Pending and
                                             Starting. Starts of another process are
                                             read from the instance list instead.
``_accrual_memo``         ``_guard``         admission and budgets: account -> (second,
                                             monotonic time, ``Unposted`` by resource):
                                             the ledger's accrual
                                             figure reused for ``accrual_reuse_s`` of
                                             real time within the same second.
``_assumed``              placement lock     placement: uid -> (namespace, pod, node,
                                             GPUs) of first placements and resumes
                                             whose pods the cached pod list does not
                                             show yet; dropped when it shows them, or
                                             the run stops (a pod deleted before any
                                             list saw it would hold its GPUs forever).
``_awaiting_bind``        ``_guard``         storage: instances whose pod waits for its
                                             claim to bind; the claim's Bound event
                                             starts their next pass (``claim_changed``).
``_nudging``              ``_guard``         storage: instances with a claim recheck
                                             chain running (one chain each).
``_status_written``       ``_guard``         lifecycle: instances whose status this
                                             process patched, so an event body without a
                                             status is out of date and is read again.
``_known_version``        ``_guard``         lifecycle: uid -> resourceVersion of the
                                             instance as a pass last read it or left it
                                             (its status patch's answer). A sweeper pass's
                                             or event's body of that very version
                                             postdates every patch of this process, so
                                             the pass uses it and skips the read (at
                                             2,000 instances the ticks' reads were a GET
                                             per instance every tick); a change made by
                                             someone else since comes with its own
                                             event, of another version, which is read.
                                             A stale entry only means a read.
``_run_pods``             ``_guard``         lifecycle: uid -> pod uid of the current
                                             run, so a Running event is trusted only for
                                             the very pod this run created.
``_open_meters``          instance lock      settlement: meters this process opened in
                          (per entry)        the ledger (a miss opens it again, which the
                                             ledger answers idempotently).
``_cost_shown``           instance lock      settlement: uid -> when accruedCost was last
                          (per entry)        refreshed (display only).
``_gpus_asked``           instance lock      settlement: uid -> (its run's pod uid, when
                          (per entry)        ``status.gpus`` was first looked up for that
                                             pod); dropped on release. While no agent
                                             has reported, the lookup runs on every pass
                                             for ``gpus_eager_s``, then with each cost
                                             refresh (a missing agent cost a ledger
                                             query per tick: a quarter of the idle CPU
                                             at 500 instances). A miss only asks again.
``_gpus_known``           instance lock      settlement: uid -> the pod uid of the run
                          (per entry)        whose GPUs ``status.gpus`` shows in full:
                                             the cost refresh skips the ledger lookup.
                                             Dropped on release; a miss only asks again.
``_tickets``              instance lock      settlement: uid -> what the batched refresh
                          (per entry; the    of accruedCost and status.gpus needs, as the
                          table: its own     last pass left it (``instances/refresh.py``,
                          leaf lock)         whose rules it follows): put or dropped at
                                             the end of every pass, dropped on release.
                                             A miss makes the refresh a whole pass.
``_idle_checked``         instance lock      idle GPUs: uid -> the clock instant of its last
                          (per entry)        check (one ledger read a minute per instance;
                                             a miss only checks again).
``_ledger_accounts``      none (GIL)         core: ledger accounts known to exist (a miss
                                             repeats an idempotent ``ensure_account``).
``_pb_cache``             none (GIL)         core: the parsed PriceBook of one
                                             resourceVersion (a miss parses it again).
========================  =================  ==========================================

"Per entry": an entry belongs to one instance and is touched only by that instance's
passes; the table itself is shared, and a single add, discard or assignment is atomic
under the GIL. "None (GIL)": the same, with any thread writing any entry; a lost update
only repeats an idempotent call.

Tunables the tests turn: ``accrual_reuse_s`` (admission), ``claim_recheck_s`` (storage),
``notice_lock_s`` (preemption), ``idle_check_s`` (idle GPUs, clock seconds).
The sweeper (``instances/sweeper.py``) runs the passes nothing else asks for, taking
the instance lock like a timer tick did (``wait=False``); each pass sets the instance's
next entry under the instance lock (``InstanceReconciler._schedule``). Its batched
refreshes (``Settlement.refresh_shown``) take the lock of each instance of the batch
without waiting, skipping those a pass holds, so one thread may hold many instance
locks at once; it never waits for one while holding others, so none can deadlock.
``_later`` runs the claim rechecks (``Storage._nudge_claim``) on its own thread; they take
``_guard`` only, not the instance lock: they read the volume and touch the claim's
annotations, nothing a pass writes. It also runs the passes asked for at an instant
(``Core._pass_at``: a spot stop at its notice's time); those are ordinary passes, taking
the instance's lock like any other."""

from __future__ import annotations

import threading
from collections import defaultdict
from datetime import datetime

from gpucloud.billing import PriceBook
from gpucloud.clock import Clock
from gpucloud.ledger import Ledger, Unposted
from gpucloud_operator import rules as r
from gpucloud_operator.config import OperatorConfig
from gpucloud_operator.instances.kubeapi import KubeAPI, Obj
from gpucloud_operator.instances.refresh import Tickets
from gpucloud_operator.instances.sweeper import Sweeper
from gpucloud_operator.later import Later
from gpucloud_operator.metrics import NoticeCounters, SpotMetrics
from gpucloud_operator.notify import Notifier


class ReconcilerState:
    """The locks, caches and hints of the module docstring, created together, and the
    reconciler's collaborators (the API, the ledger, the clock, the webhook notifier and
    the spot counters)."""

    def __init__(
        self,
        kube: KubeAPI,
        ledger: Ledger,
        clock: Clock,
        cfg: OperatorConfig,
        notifier: Notifier | None = None,
        spot_metrics: SpotMetrics | None = None,
        counters: NoticeCounters | None = None,
    ) -> None:
        self.kube = kube
        self.ledger = ledger
        self.clock = clock
        self.cfg = cfg
        self.notifier = notifier or Notifier()
        self.spot_metrics = spot_metrics or SpotMetrics()
        self.counters = counters or NoticeCounters()  # budget refusals (metrics)
        # locks, outermost first
        self._locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)
        self._account_locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)
        self._placement_lock = threading.Lock()
        self._guard = threading.Lock()
        # admission
        self._phases: dict[str, tuple[str, str]] | None = None
        self._reservations: dict[str, tuple[str, int]] = {}
        self._accrual_memo: dict[str, tuple[datetime, float, dict[str, Unposted]]] = {}
        self.accrual_reuse_s = 1.0
        # placement
        self._assumed: dict[str, tuple[str, str, str, int]] = {}
        # storage: claims
        self._awaiting_bind: set[str] = set()
        self._nudging: set[str] = set()
        self._later = Later()
        self.claim_recheck_s = 1.0
        # preemption
        self.notice_lock_s = 5.0
        # lifecycle: event hints
        self._status_written: set[str] = set()
        self._known_version: dict[str, str] = {}
        self._run_pods: dict[str, str] = {}
        # settlement
        self._open_meters: set[str] = set()
        self._cost_shown: dict[str, float] = {}  # uid -> monotonic time of the last update
        self._gpus_asked: dict[str, tuple[str, float]] = {}  # uid -> (pod uid, first ask)
        self._gpus_known: dict[str, str] = {}  # uid -> pod uid whose GPUs status shows
        self.gpus_eager_s = 60.0
        self._tickets = Tickets()  # a room of its own: instances/refresh.py
        # idle GPUs
        self._idle_checked: dict[str, datetime] = {}
        self.idle_check_s = 60
        # core
        self._ledger_accounts: set[str] = set()
        self._pb_cache: tuple[str, PriceBook] | None = None
        # the schedule of passes (main.py attaches it; unit tests run passes by hand)
        self.sweeper: Sweeper | None = None

    def _lock(self, table: defaultdict[str, threading.Lock], key: str) -> threading.Lock:
        with self._guard:
            return table[key]

    def _saw_version(self, uid: str, obj: Obj | None) -> None:
        """Note the instance's version a pass read, or its own status patch produced."""
        version = ((obj or {}).get("metadata") or {}).get("resourceVersion")
        with self._guard:
            if version:
                self._known_version[uid] = version
            else:  # an answer without one: read next time
                self._known_version.pop(uid, None)

    def _body_current(self, uid: str, body: Obj) -> bool:
        """Whether an event's or tick's body stands for a fresh read: a body without a
        status that no pass of this process patched (nothing has), or one of the very
        version a pass last read or left."""
        with self._guard:
            if not body.get("status"):
                return uid not in self._status_written
            version = (body.get("metadata") or {}).get("resourceVersion")
            return version is not None and self._known_version.get(uid) == version

    def _note_phase(self, uid: str, namespace: str, phase: str | None) -> None:
        with self._guard:
            if phase not in r.ADMITTED_PHASES:
                self._reservations.pop(uid, None)  # charged, refused or gone
            if self._phases is not None:
                if phase is None:
                    self._phases.pop(uid, None)
                else:
                    self._phases[uid] = (namespace, phase)
