"""Webhook notifications: JSON POSTed with httpx from a background thread.

Every message is ``payload(type, account, message, at, ...)`` (docs/arrears.md, docs/spot.md),
sent to the Account's ``spec.webhook.url`` or else the operator's ``webhook_url``
(``webhook_url``).

Enforcement (shutdown, deletion, preemption) must never wait on a tenant's web server, so
``Notifier.notify`` only enqueues; one worker thread delivers in order, retrying a
failed delivery (connection error or a non-2xx answer) with exponential backoff, and
gives up after ``attempts`` tries (logged). A full queue drops the newest message
(logged) rather than block. Events and conditions remain the durable notification.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import httpx
import tenacity

from gpucloud.crd.account import AccountSpec
from gpucloud_operator import rules as r

log = logging.getLogger("gpucloud.operator.notify")


def payload(kind: str, account: str, message: str, now: datetime, **extra: object) -> dict:
    """A webhook's JSON body: what happened, to which account, when, and its figures."""
    return {"type": kind, "account": account, "message": message, "at": r.fmt(now), **extra}


def webhook_url(spec: AccountSpec | None, default: str) -> str:
    """Where an Account's notifications go: its spec.webhook.url (as the model reads it),
    else ``default`` (also for a spec the model refuses: None)."""
    return spec.webhook.url if spec is not None and spec.webhook else default


@dataclass
class Delivery:
    url: str
    payload: dict[str, Any]
    attempts: int = 0


@dataclass
class Notifier:
    attempts: int = 5
    backoff_s: float = 0.5  # first retry after this, doubling, capped at max_backoff_s
    max_backoff_s: float = 30.0
    timeout_s: float = 5.0
    max_queue: int = 1000
    sleep: Callable[[float], None] = time.sleep
    delivered: int = 0
    failed: int = 0
    _queue: queue.Queue[Delivery | None] = field(init=False)
    _thread: threading.Thread | None = field(default=None, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    def __post_init__(self) -> None:
        self._queue = queue.Queue(self.max_queue)

    def notify(self, url: str | None, payload: dict[str, Any]) -> bool:
        """Queue one message; False when there is no URL or the queue is full."""
        if not url:
            return False
        self._ensure_worker()
        try:
            self._queue.put_nowait(Delivery(url, payload))
        except queue.Full:
            log.error("webhook queue full: dropping %s for %s", payload.get("type"), url)
            return False
        return True

    def join(self, timeout: float = 10.0) -> bool:
        """Wait until every queued message was delivered or given up (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=self.timeout_s + 1)

    def _ensure_worker(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="gpucloud-webhook", daemon=True
                )
                self._thread.start()

    def _run(self) -> None:
        with httpx.Client(timeout=self.timeout_s) as client:
            while True:
                item = self._queue.get()
                try:
                    if item is None:
                        return
                    self._deliver(client, item)
                finally:
                    self._queue.task_done()

    def _deliver(self, client: httpx.Client, item: Delivery) -> None:
        # tenacity, as the agent's shipper: exponential backoff, capped, on our sleep
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_result(lambda problem: problem is not None),
            wait=tenacity.wait_exponential(
                multiplier=self.backoff_s, exp_base=2, min=self.backoff_s, max=self.max_backoff_s
            ),
            stop=tenacity.stop_after_attempt(self.attempts),
            sleep=self.sleep,
            before_sleep=lambda state: log.warning(
                "webhook %s attempt %d failed (%s)",
                item.url,
                state.attempt_number,
                state.outcome.result() if state.outcome else None,
            ),
            retry_error_callback=lambda state: state.outcome.result() if state.outcome else None,
        )
        problem = retrying(self._post, client, item)
        if problem is None:
            self.delivered += 1
            return
        self.failed += 1
        log.error(
            "webhook %s gave up after %d attempts (%s): %s",
            item.url, item.attempts, problem, item.payload.get("type"),
        )  # fmt: skip

    @staticmethod
    def _post(client: httpx.Client, item: Delivery) -> str | None:
        """One attempt: None when delivered, else what went wrong."""
        item.attempts += 1
        try:
            resp = client.post(item.url, json=item.payload)
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}"
        return None if 200 <= resp.status_code < 300 else f"HTTP {resp.status_code}"
