"""The usage outbox: a request's usage is durable before its caller has the answer.

The gateway awaits :meth:`Outbox.record` before it sends a response's last bytes (the
final chunk of a body of known length, the ``data: [DONE]`` event of a stream, or the
end of a chunked body), so a caller never holds a complete answer whose usage a
``kill -9`` could still lose. The records of one event loop iteration are appended to a
local SQLite queue in one transaction (group commit), in the loop itself: a commit
there costs less than handing it to a thread and being woken by it (issue 20). When the
queue is busy (the drain process holds its write lock for a moment) or ``fsync`` makes a
commit take milliseconds, a writer thread commits instead, so the loop never waits on a
lock or the disk. The request path never waits on the ledger, which may be slow, locked
or remote.

:class:`LedgerDrain` moves queued records into the ledger, in a process of its own
(``gpucloud_gateway.drain``) started with the gateway: a batch is recorded and charged in
one ledger transaction (``Ledger.record_model_requests``, idempotent on (model, request
id)) and removed from the queue afterwards (within a second). A kill between the two
leaves records in the queue that the ledger already holds; the next drain finds them
there and charges nothing again. So the queue holds only what the ledger may not have
yet, and no answered request is lost or charged twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import queue
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from gpucloud.billing import PriceBook
from gpucloud.billing.model_charges import ModelPlan, UsageEvent

log = logging.getLogger(__name__)

MAX_BATCH = 1000

# (plan, event, payer): what the ledger records
Record = tuple[ModelPlan, UsageEvent, str | None]
# a record, and the loop and future to resolve once committed (or None)
_Item = tuple[ModelPlan, UsageEvent, str | None, Any, "asyncio.Future[None] | None"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS queued (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    record TEXT NOT NULL            -- JSON: plan, event, payer
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class RequestLedger(Protocol):
    """The part of ``gpucloud.ledger.Ledger`` the drain and the startup counts use."""

    def record_model_requests(
        self, batch: Iterable[Record], pricebook: PriceBook, *, source: str = ""
    ) -> int: ...

    def model_requests_known(self, keys: Iterable[tuple[str, str]]) -> set[tuple[str, str]]: ...

    def model_request_stats(
        self, source: str, since: datetime
    ) -> tuple[list[tuple[str, datetime]], dict[str, tuple[int, datetime | None]]]: ...


@functools.lru_cache(maxsize=4096)
def _plan_json(plan: ModelPlan) -> str:
    """A plan's JSON, once per plan (frozen; the same few for every request)."""
    return json.dumps(dataclasses.asdict(plan))


_EVENT_FIELDS = tuple(f.name for f in dataclasses.fields(UsageEvent))


def _encode(plan: ModelPlan, event: UsageEvent, payer: str | None) -> str:
    # flat dataclasses: a shallow dict is what asdict's deep copy would give, cheaper
    ev = {name: getattr(event, name) for name in _EVENT_FIELDS}
    ev["at"] = event.at.isoformat()
    return (
        f'{{"plan": {_plan_json(plan)}, "event": {json.dumps(ev)}, "payer": {json.dumps(payer)}}}'
    )


@functools.lru_cache(maxsize=4096)
def _plan_of(fields: tuple[tuple[str, Any], ...]) -> ModelPlan:
    """A decoded plan, built (and checked) once per distinct plan: the drain decodes the
    same few in every record."""
    return ModelPlan(**dict(fields))


def _decode(text: str) -> Record:
    doc = json.loads(text)
    ev = doc["event"] | {"at": datetime.fromisoformat(doc["event"]["at"])}
    return _plan_of(tuple(doc["plan"].items())), UsageEvent(**ev), doc["payer"]


class UsageQueue:
    """Records not yet known to be in the ledger, in a local SQLite file (WAL).

    ``fsync``: ``True`` syncs every commit to disk (survives a power loss); ``False``
    (synchronous=NORMAL, the default) survives a killed process, and :meth:`checkpoint`,
    run every second by the drain, bounds what a host crash can take. The file also
    holds this gateway instance's ``source`` name (a new file, a new name): the ledger
    rows it recorded, from which a restarted gateway rebuilds its own request counts.
    """

    def __init__(self, path: str | Path, *, fsync: bool = False) -> None:
        self.path = str(path)
        self.fsync = fsync
        self._lock = threading.Lock()
        self._checkpointer: sqlite3.Connection | None = None
        self._no_wait: sqlite3.Connection | None = None
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={'FULL' if fsync else 'NORMAL'}")
        self._db.execute("PRAGMA busy_timeout=10000")
        # No checkpoint by the writer: one would run inside a request's commit when the
        # log passes 1,000 pages (and sync the disk); the drain checkpoints every second.
        self._db.execute("PRAGMA wal_autocheckpoint=0")
        self._db.executescript(_SCHEMA)
        self._db.execute(
            "INSERT OR IGNORE INTO meta VALUES ('source', ?)", (f"gw-{uuid.uuid4().hex[:16]}",)
        )
        row = self._db.execute("SELECT value FROM meta WHERE key = 'source'").fetchone()
        self.source: str = row[0]

    def close(self) -> None:
        self._db.close()
        for extra in (self._checkpointer, self._no_wait):
            if extra is not None:
                extra.close()

    def append_many(self, records: Iterable[Record]) -> None:
        """Append a batch in one transaction (waits up to 10 s for the write lock)."""
        rows = [(_encode(p, e, payer),) for p, e, payer in records]
        with self._lock:
            _insert(self._db, rows)

    def try_append_many(self, records: Iterable[Record]) -> bool:
        """Append a batch in one transaction if that needs no wait: False (nothing
        written) while another connection holds the queue's write lock. Its own
        connection, which never waits (the event loop's)."""
        rows = [(_encode(p, e, payer),) for p, e, payer in records]
        if not self._lock.acquire(blocking=False):  # the writer thread is in a commit
            return False
        try:
            if self._no_wait is None:
                self._no_wait = sqlite3.connect(
                    self.path, isolation_level=None, check_same_thread=False
                )
                self._no_wait.execute("PRAGMA busy_timeout=0")
                self._no_wait.execute("PRAGMA synchronous=NORMAL")
                self._no_wait.execute("PRAGMA wal_autocheckpoint=0")
            _insert(self._no_wait, rows)
            return True
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                return False  # rolled back: nothing of it is in the queue
            raise
        finally:
            self._lock.release()

    def peek(self, limit: int = MAX_BATCH, after: int = 0) -> list[tuple[int, Record]]:
        """The oldest ``limit`` queued records after sequence number ``after``, with
        their sequence numbers."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, record FROM queued WHERE seq > ? ORDER BY seq LIMIT ?",
                (after, limit),
            ).fetchall()
        return [(seq, _decode(text)) for seq, text in rows]

    def remove_through(self, seq: int) -> None:
        """Forget the records up to ``seq``: the ledger has them."""
        with self._lock:
            self._db.execute("DELETE FROM queued WHERE seq <= ?", (seq,))

    def pending(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT count(*) FROM queued").fetchone()[0])

    def checkpoint(self) -> None:
        """Copy the write-ahead log into the database file, syncing both to disk: what
        was committed before this survives a host crash too. Its own connection: a
        passive checkpoint does not stop the outbox's writer."""
        if self._checkpointer is None:
            self._checkpointer = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False
            )
            self._checkpointer.execute("PRAGMA busy_timeout=10000")
        self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()


def restored_stats(
    usage: UsageQueue, ledger: RequestLedger, since: datetime
) -> tuple[list[tuple[str, datetime]], dict[str, tuple[int, datetime | None]]]:
    """This gateway instance's request counts after a restart: its rows in the ledger,
    plus the queued records the ledger does not hold yet (each request counted once)."""
    arrivals, totals = ledger.model_request_stats(usage.source, since)
    queued = [rec for _, rec in usage.peek(limit=10**9)]
    known = ledger.model_requests_known((p.key, e.request_id) for p, e, _ in queued)
    seen: set[tuple[str, str]] = set()
    for plan, event, _ in queued:
        key = (plan.key, event.request_id)
        if key in known or key in seen:
            continue
        seen.add(key)
        if event.at >= since:
            arrivals.append((plan.key, event.at))
        n, last = totals.get(plan.key, (0, None))
        totals[plan.key] = (n + 1, event.at if last is None else max(last, event.at))
    arrivals.sort(key=lambda a: a[1])
    return arrivals, totals


def _insert(db: sqlite3.Connection, rows: list[tuple[str]]) -> None:
    db.execute("BEGIN IMMEDIATE")
    try:
        db.executemany("INSERT INTO queued (record) VALUES (?)", rows)
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def _resolve(futures: list[asyncio.Future[None]], error: BaseException | None) -> None:
    for fut in futures:
        if fut.done():  # the request was cancelled meanwhile: its record stands anyway
            continue
        if error is None:
            fut.set_result(None)
        else:
            fut.set_exception(error)


class Outbox:
    """Durable usage records, committed in groups: the records of one event loop
    iteration in one transaction, in the loop; by the writer thread when that would wait
    (the queue's write lock is taken, or ``fsync``)."""

    def __init__(self, usage: UsageQueue) -> None:
        self.usage = usage
        self.in_loop = not usage.fsync  # an fsync'd commit takes milliseconds: the thread's
        self._pending: dict[asyncio.AbstractEventLoop, list[_Item]] = {}
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="usage-outbox", daemon=True)
        self._thread.start()

    async def record(self, plan: ModelPlan, event: UsageEvent, payer: str | None) -> None:
        """Return once the record is committed (raises if it could not be)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._add((plan, event, payer, loop, fut), loop)
        await fut

    def alive(self) -> bool:
        """The writer thread runs: records can become durable (readiness)."""
        return self._thread.is_alive()

    def record_later(self, plan: ModelPlan, event: UsageEvent, payer: str | None) -> None:
        """Queue a record nobody waits for (a cut response: the caller has no answer)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not called from a loop: the thread commits it
            self._queue.put((plan, event, payer, None, None))
            return
        self._add((plan, event, payer, None, None), loop)

    def _add(self, item: _Item, loop: asyncio.AbstractEventLoop) -> None:
        if not self.in_loop:
            self._queue.put(item)
            return
        pending = self._pending.get(loop)
        if pending is None:  # the first of this iteration: commit after the iteration's
            pending = self._pending[loop] = []  # other callbacks (call_soon runs next)
            loop.call_soon(self._commit, loop)
        pending.append(item)

    def _commit(self, loop: asyncio.AbstractEventLoop) -> None:
        """Commit one iteration's records in the loop, or hand them to the thread."""
        batch = self._pending.pop(loop, [])
        if not batch:
            return
        try:
            done = self.usage.try_append_many([(p, e, payer) for p, e, payer, _, _ in batch])
        except Exception as exc:  # the waiting requests fail: no answer without a record
            log.exception("committing %d usage records failed", len(batch))
            _resolve([fut for *_, fut in batch if fut is not None], exc)
            return
        if not done:  # busy: the thread waits for the lock, the loop goes on
            for item in batch:
                self._queue.put(item)
            return
        _resolve([fut for *_, fut in batch if fut is not None], None)

    def flush(self) -> None:
        """Commit what this loop has not committed yet (call in the loop, at shutdown)."""
        self._commit(asyncio.get_running_loop())

    def _run(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < MAX_BATCH:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            error: BaseException | None = None
            try:
                self.usage.append_many([(p, e, payer) for p, e, payer, _, _ in batch])
            except Exception as exc:  # the waiting requests fail: no answer without a record
                log.exception("committing %d usage records failed", len(batch))
                error = exc
            # one wake-up per event loop for the whole group, not one per request
            waiting: dict[Any, list[asyncio.Future[None]]] = {}
            for *_, loop, fut in batch:
                if fut is not None:
                    waiting.setdefault(loop, []).append(fut)
            for loop, futures in waiting.items():
                with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits
                    loop.call_soon_threadsafe(_resolve, futures, error)

    def close(self, timeout_s: float = 10.0) -> None:
        """Commit what the thread has queued, then stop it (after ``flush`` in the loop)."""
        for pending in self._pending.values():  # loops gone: nobody waits for these
            for item in pending:
                self._queue.put(item)
        self._pending.clear()
        self._queue.put(None)
        self._thread.join(timeout_s)


class LedgerDrain:
    """Moves queued records into the ledger (run by ``gpucloud_gateway.drain``, a process
    of its own): a pass records what is queued, a batch per ledger transaction; every
    ``tick_s`` it also forgets the recorded records and checkpoints the queue (a
    checkpoint syncs the disk), so with ``fsync: false`` a host crash loses at most the
    records of the last ``tick_s`` seconds and a pass's time (a killed process loses
    none). Passes run ``gap_s`` apart: under load one ledger transaction takes the records
    of many requests (a transaction costs much more than a record in it)."""

    def __init__(
        self,
        usage: UsageQueue,
        ledger: RequestLedger,
        pricebook: PriceBook,
        tick_s: float = 1.0,
        gap_s: float = 0.2,
    ) -> None:
        self.usage = usage
        self.ledger = ledger
        self.pricebook = pricebook
        self.tick_s = tick_s
        self.gap_s = gap_s
        self._ticked = 0.0  # time.monotonic() of the last checkpoint
        # Sequence numbers through which the ledger has the records, and through which
        # the queue forgot them: the queue's deletes wait for the tick, so that the
        # gateway's commits rarely meet this process's write lock.
        self._recorded = 0
        self._forgotten = 0

    def drain_once(self) -> int:
        """Record the next batch in the ledger; returns its size."""
        batch = self.usage.peek(MAX_BATCH, after=self._recorded)
        if not batch:
            return 0
        records = [rec for _, rec in batch]
        self.ledger.record_model_requests(records, self.pricebook, source=self.usage.source)
        self._recorded = batch[-1][0]
        return len(batch)

    def forget(self) -> None:
        """Remove what the ledger has from the queue (a kill before this: recorded again
        at the next start, which charges nothing twice)."""
        if self._recorded > self._forgotten:
            self.usage.remove_through(self._recorded)
            self._forgotten = self._recorded

    def run_pass(self) -> None:
        try:
            while self.drain_once() == MAX_BATCH:
                pass
        except Exception:  # they stay queued: the next pass retries
            log.exception("recording model usage in the ledger failed")
        if time.monotonic() - self._ticked >= self.tick_s:
            self._ticked = time.monotonic()
            self.forget()
            self.usage.checkpoint()
