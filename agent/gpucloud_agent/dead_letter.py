"""Usage records the metering API refused, kept on the node for a person to look at.

One JSON line per record, fsync'd before the record leaves the WAL, so a refused record
is never lost: ``{"at", "id", "status", "rule", "field", "message", "record"}``. The
API refuses such a record again on every re-send (it names another node, a GPU beyond
its pod's count, more bytes than its volume holds, ...), so it is not retried; once the
cause is fixed, the lines can be posted again as they are.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

# (WAL id, record, HTTP status, rule, field, message)
Item = tuple[int, dict[str, Any], int, str, str, str]


class DeadLetters:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.counts: dict[str, int] = {}  # rule -> records, since the process started
        self._lock = threading.Lock()

    def append(self, items: list[Item]) -> None:
        now = int(time.time())
        keys = ("id", "record", "status", "rule", "field", "message")
        lines = [
            json.dumps({"at": now, **dict(zip(keys, item, strict=True))}, separators=(",", ":"))
            for item in items
        ]
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write("\n".join(lines) + "\n")
                f.flush()
                os.fsync(f.fileno())
            for _, _, _, rule, _, _ in items:
                self.counts[rule] = self.counts.get(rule, 0) + 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counts)

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line]
