"""Ships WAL records to the metering API: `POST {api}/v1/usage` with `{"records": [...]}`.

Batches in WAL order; acks a batch in the WAL only after a 200. Failures (connection
refused, timeouts, 5xx, any non-200) are retried forever with exponential backoff and
full jitter, so a fleet of agents does not hammer an API that is coming back.
"""

from __future__ import annotations

import logging
import random
import threading
from pathlib import Path

import httpx

from gpucloud_agent.wal import Wal

log = logging.getLogger(__name__)
DEFAULT_TOKEN_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/token"


def full_jitter(attempt: int, base_s: float, cap_s: float, rng: random.Random) -> float:
    """Sleep before retry `attempt` (1-based): uniform in [0, min(cap, base * 2^(attempt-1))]."""
    return rng.uniform(0, min(cap_s, base_s * (2 ** min(attempt - 1, 30))))


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
        rng: random.Random | None = None,
    ) -> None:
        if not 1 <= batch_size <= 10000:
            raise ValueError("batch_size must be in 1..10000 (the API's batch limit)")
        self.wal = wal
        self.url = api_url.rstrip("/") + "/v1/usage"
        self.token_file = token_file
        self.batch_size = batch_size
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
        self.rng = rng or random.Random()
        self.errors_total = 0
        self.shipped_total = 0
        self.last_error: str | None = None
        self._client = httpx.Client(timeout=timeout_s)
        self._stop = threading.Event()

    @property
    def client(self) -> httpx.Client:
        """The HTTP client, shared with the wipe loop (one connection pool, one token)."""
        return self._client

    def headers(self) -> dict[str, str]:
        return self._headers()

    def _headers(self) -> dict[str, str]:
        if not self.token_file:
            return {}
        try:
            # re-read every time: projected ServiceAccount tokens are rotated on disk
            token = Path(self.token_file).read_text().strip()
        except FileNotFoundError:
            return {}
        return {"Authorization": f"Bearer {token}"} if token else {}

    def ship_once(self) -> bool | None:
        """Send one batch. True: acked; False: failed; None: nothing to send."""
        batch = self.wal.pending(self.batch_size)
        if not batch:
            return None
        try:
            resp = self._client.post(
                self.url, json={"records": [r for _, r in batch]}, headers=self._headers()
            )
        except httpx.HTTPError as exc:
            self._fail(f"{type(exc).__name__}: {exc}")
            return False
        if resp.status_code != 200:
            self._fail(f"HTTP {resp.status_code}: {resp.text[:200]}")
            return False
        self.wal.ack([rid for rid, _ in batch])
        self.shipped_total += len(batch)
        return True

    def _fail(self, why: str) -> None:
        self.errors_total += 1
        self.last_error = why
        log.warning("shipping to %s failed: %s", self.url, why)

    def run(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            result = self.ship_once()
            if result is None:
                self.wal.wait_pending(0.5)
            elif result:
                attempt = 0
            else:
                attempt += 1
                self._stop.wait(
                    full_jitter(attempt, self.backoff_base_s, self.backoff_cap_s, self.rng)
                )

    def stop(self) -> None:
        self._stop.set()
        with self.wal.has_pending:
            self.wal.has_pending.notify_all()

    def close(self) -> None:
        self._client.close()
