"""Ships WAL records to the metering API: `POST {api}/v1/usage` with `{"records": [...]}`.

Batches in WAL order, and never waits behind one record:

* 200: every record stored (or already stored): acked.
* 207, or 422 with per-record ``errors``: the accepted records are acked; each refused
  record is written to the dead-letter file (`dead_letter.DeadLetters`), counted and
  logged, then acked: the API will refuse it again, so retrying it would block the rest.
* A whole-batch 4xx (400, 413, a 422 about the body's shape): the batch is halved until
  the record at fault travels alone; then it is dead-lettered (413: only halved).
* Connection errors and 5xx are retried with exponential backoff and full jitter
  (``full_jitter``). A batch that fails with a 5xx is halved before the next attempt, and a
  record that fails alone is parked with its own backoff, so a record that makes the API
  fail cannot hold back the records behind it; it is never dropped.
* 401, 403, 408 and 429 say nothing about the records (a token being rotated, a
  misconfigured ServiceAccount, throttling): retried with backoff, never dead-lettered.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gpucloud_agent.dead_letter import DeadLetters
from gpucloud_agent.httpclient import HttpClient, HTTPError, Response
from gpucloud_agent.wal import Wal

log = logging.getLogger(__name__)
DEFAULT_TOKEN_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/token"
_CALLER_ERRORS = {401, 403, 408, 429}  # about the caller or the moment, not the records
Batch = list[tuple[int, dict[str, Any]]]
Refused = dict[int, tuple[str, str, str]]  # index in the batch -> (rule, field, message)


class Shipper:
    def __init__(
        self,
        wal: Wal,
        api_url: str,
        token_file: str | None = DEFAULT_TOKEN_FILE,
        batch_size: int = 500,
        backoff_base_s: float = 0.5,
        backoff_cap_s: float = 30.0,
        timeout_s: float = 10.0,
        dead_letters: DeadLetters | None = None,
        sleep: Callable[[float], object] | None = None,
    ) -> None:
        if not 1 <= batch_size <= 10000:
            raise ValueError("batch_size must be in 1..10000 (the API's batch limit)")
        self.wal = wal
        self.url = api_url.rstrip("/") + "/v1/usage"
        self.token_file = token_file
        self.batch_size = batch_size
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
        self.dead_letters = dead_letters or DeadLetters(Path(wal.dir) / "dead-letter.jsonl")
        self.errors_total = 0
        self.shipped_total = 0
        self.last_error: str | None = None
        self._limit = batch_size  # halved while a batch fails, to isolate a bad record
        self._parked: dict[int, tuple[float, int]] = {}  # WAL id -> (retry after, failures)
        self._client = HttpClient(timeout_s)
        self._stop = threading.Event()
        self._sleep = sleep or self._stop.wait

    @property
    def client(self) -> HttpClient:
        """The HTTP client, shared with the wipe loop (one connection pool, one token)."""
        return self._client

    def headers(self) -> dict[str, str]:
        if not self.token_file:
            return {}
        try:
            # re-read every time: projected ServiceAccount tokens are rotated on disk
            token = Path(self.token_file).read_text().strip()
        except FileNotFoundError:
            return {}
        return {"Authorization": f"Bearer {token}"} if token else {}

    _headers = headers

    def _next_batch(self) -> Batch:
        """The next records in WAL order, past the parked ones; a parked record whose
        backoff is over travels alone (it would fail the batch it joined)."""
        now = time.monotonic()
        candidates = self.wal.pending(self._limit + len(self._parked))
        for rid, record in candidates:
            parked = self._parked.get(rid)
            if parked is not None and parked[0] <= now:
                return [(rid, record)]
        ready = [(i, r) for i, r in candidates if i not in self._parked]
        return ready[: self._limit]

    def ship_once(self) -> bool | None:
        """Send one batch. True: progress (records acked or dead-lettered); False: failed,
        to be retried after a backoff; None: nothing to send."""
        batch = self._next_batch()
        if not batch:
            return None
        try:
            resp = self._client.post(
                self.url, json={"records": [r for _, r in batch]}, headers=self.headers()
            )
        except HTTPError as exc:
            return self._fail(str(exc))
        status = resp.status_code
        if status == 200:
            self._done(batch, {})
            return True
        errors = _record_errors(resp, len(batch)) if status in (207, 422) else None
        if errors is not None:
            self._done(batch, errors, status)
            return True
        why = f"HTTP {status}: {resp.text[:200]}"
        if status >= 500 or status == 413:
            return self._shrink(batch, why, park=status >= 500)
        if status in _CALLER_ERRORS:
            return self._fail(why)
        if len(batch) > 1:  # a 4xx about the body: find the record at fault
            return self._shrink(batch, why, park=False)
        self._done(batch, {0: (f"http_{status}", "", resp.text[:1000])}, status)
        return True

    def _done(self, batch: Batch, refused: Refused, status: int = 200) -> None:
        """Dead-letter the refused records (durably, first), then ack the whole batch."""
        if refused:
            items = [(batch[i][0], batch[i][1], status, *refused[i]) for i in sorted(refused)]
            self.dead_letters.append(items)
            rules = sorted({rule for _, _, _, rule, _, _ in items})
            log.error(
                "%d usage record(s) refused by the API, moved to %s (rules: %s); first: "
                "record %s, %s: %s",
                len(items), self.dead_letters.path, ", ".join(rules),
                items[0][0], items[0][4] or "record", items[0][5],
            )  # fmt: skip
        ids = [rid for rid, _ in batch]
        self.wal.ack(ids)
        for rid in ids:
            self._parked.pop(rid, None)
        self.shipped_total += len(batch) - len(refused)
        self._limit = min(self.batch_size, self._limit * 2)

    def _shrink(self, batch: Batch, why: str, park: bool) -> bool:
        if len(batch) > 1:
            self._limit = max(1, len(batch) // 2)
        elif park:  # alone and still failing: let the records behind it go first
            rid = batch[0][0]
            failures = self._parked.get(rid, (0.0, 0))[1] + 1
            delay = min(self.backoff_cap_s, self.backoff_base_s * 2 ** min(failures, 30))
            self._parked[rid] = (time.monotonic() + delay, failures)
        return self._fail(why)

    def _fail(self, why: str) -> bool:
        self.errors_total += 1
        self.last_error = why
        log.warning("shipping to %s failed: %s", self.url, why)
        return False

    def run(self) -> None:
        failures = 0  # in a row; progress starts the backoff over
        while not self._stop.is_set():
            result = self.ship_once()
            if result is False:
                failures += 1
                if not self._stop.is_set():
                    self._sleep(full_jitter(failures, self.backoff_base_s, self.backoff_cap_s))
                continue
            failures = 0
            if result is None:
                self.wal.wait_pending(0.5)

    def stop(self) -> None:
        self._stop.set()
        with self.wal.has_pending:
            self.wal.has_pending.notify_all()

    def close(self) -> None:
        self._client.close()


def full_jitter(attempt: int, base_s: float, cap_s: float) -> float:
    """The wait after the ``attempt``-th failure in a row (1, 2, ...): uniform in
    ``[0, min(cap, base * 2^(attempt-1))]`` ("full jitter", tenacity's
    ``wait_random_exponential``), so a fleet of agents does not hammer an API that is
    coming back in step."""
    return random.uniform(0, min(cap_s, base_s * 2 ** min(attempt - 1, 62)))


def _record_errors(resp: Response, n: int) -> Refused | None:
    """index -> (rule, field, message) of the refused records of a 207/422 that lists
    them; None when the body says nothing per record (a 422 about the whole body)."""
    try:
        body = resp.json()
    except ValueError:
        return None
    errors = body.get("errors") if isinstance(body, dict) else None
    if not isinstance(errors, list) or not errors:
        return None
    out: Refused = {}
    for e in errors:
        index = e.get("index") if isinstance(e, dict) else None
        if not isinstance(index, int) or not 0 <= index < n:
            return None
        if index not in out:  # a record's first error names it
            out[index] = (str(e.get("rule", "")), str(e.get("field", "")), str(e.get("message")))
    return out
