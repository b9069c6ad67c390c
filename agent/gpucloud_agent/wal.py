"""The agent's write-ahead log: every record stays on local disk until the API acks it.

Append-only segment files of JSON lines in one directory:

    {"op": "rec", "id": 7, "r": {...usage record...}}   a record, durable once fsync'd
    {"op": "ack", "ids": [5, 6, 7]}                    the API accepted these
    {"op": "state", "s": {...}}                        the metering cursors (last one wins)

A record counts as emitted only after its line is fsync'd. Acks need no fsync: losing
one means a re-send, which the API treats as a no-op (records have natural keys).
Compaction: when the current segment grows past `segment_max_bytes` (and at every
start), a new segment is written holding only the latest state and the unacked
records, fsync'd, and then the older segments are deleted. Recovery replays all
segments in order (ids make replays idempotent); a torn last line, left by a crash in
the middle of a write, is ignored.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

_PREFIX, _SUFFIX = "seg-", ".jsonl"


class WalCorrupt(RuntimeError):
    pass


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Wal:
    def __init__(self, directory: str | os.PathLike[str], segment_max_bytes: int = 4 << 20) -> None:
        if segment_max_bytes < 1024:
            raise ValueError("segment_max_bytes must be >= 1024")
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.segment_max_bytes = segment_max_bytes
        self._lock = threading.Lock()
        self.has_pending = threading.Condition(self._lock)
        self._pending: dict[int, dict[str, Any]] = {}
        self._next_id = 1
        self.state: dict[str, Any] | None = None
        self.compactions = 0
        self._seq = 0
        self._file: Any = None
        self._recover()
        with self._lock:
            self._compact_locked()

    def _segments(self) -> list[tuple[int, Path]]:
        segs = []
        for p in self.dir.iterdir():
            if p.name.startswith(_PREFIX) and p.name.endswith(_SUFFIX):
                segs.append((int(p.name[len(_PREFIX) : -len(_SUFFIX)]), p))
        return sorted(segs)

    def _recover(self) -> None:
        for seq, path in self._segments():
            self._seq = max(self._seq, seq)
            lines = path.read_bytes().split(b"\n")
            for i, line in enumerate(lines):
                if not line:
                    continue
                try:
                    entry = json.loads(line)
                except ValueError as exc:
                    if i == len(lines) - 1:
                        break  # torn tail of an interrupted write
                    raise WalCorrupt(f"{path}: line {i + 1} is not JSON") from exc
                op = entry.get("op")
                if op == "rec":
                    rid = int(entry["id"])
                    self._pending[rid] = entry["r"]
                    self._next_id = max(self._next_id, rid + 1)
                elif op == "ack":
                    for rid in entry["ids"]:
                        self._pending.pop(int(rid), None)
                elif op == "state":
                    self.state = entry["s"]
                else:
                    raise WalCorrupt(f"{path}: line {i + 1}: unknown op {op!r}")
        self._pending = dict(sorted(self._pending.items()))

    def _compact_locked(self) -> None:
        old = self._segments()
        self._seq += 1
        path = self.dir / f"{_PREFIX}{self._seq:012d}{_SUFFIX}"
        f = open(path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for appends
        parts = []
        if self.state is not None:
            parts.append(json.dumps({"op": "state", "s": self.state}, separators=(",", ":")))
        for rid, rec in self._pending.items():
            parts.append(json.dumps({"op": "rec", "id": rid, "r": rec}, separators=(",", ":")))
        if parts:
            f.write("\n".join(parts) + "\n")
        f.flush()
        os.fsync(f.fileno())
        _fsync_dir(self.dir)
        if self._file is not None:
            self._file.close()
        self._file = f
        for _, p in old:
            p.unlink()
        _fsync_dir(self.dir)
        self.compactions += 1

    def _maybe_compact_locked(self) -> None:
        if self._file.tell() > self.segment_max_bytes:
            self._compact_locked()

    def append(self, records: list[dict[str, Any]], state: dict[str, Any] | None = None) -> None:
        """Write records (and state keys to update) durably; returns once fsync'd."""
        if not records and state is None:
            return
        with self._lock:
            parts = []
            ids = range(self._next_id, self._next_id + len(records))
            for rid, rec in zip(ids, records, strict=True):
                parts.append(json.dumps({"op": "rec", "id": rid, "r": rec}, separators=(",", ":")))
            merged = None
            if state is not None:
                # writers own top-level keys (meter cursors, disk cursor): merge, write it whole
                merged = {**(self.state or {}), **state}
                parts.append(json.dumps({"op": "state", "s": merged}, separators=(",", ":")))
            self._file.write("\n".join(parts) + "\n")
            self._file.flush()
            if records:
                # state-only lines reach the OS (safe against a process crash) but skip the
                # fsync: after a power loss the meter re-bridges at most one open window
                os.fsync(self._file.fileno())
                self._next_id += len(records)
                self._pending.update(zip(ids, records, strict=True))
                self.has_pending.notify_all()
            if merged is not None:
                self.state = merged
            self._maybe_compact_locked()

    def pending(self, limit: int) -> list[tuple[int, dict[str, Any]]]:
        with self._lock:
            out = []
            for item in self._pending.items():
                if len(out) >= limit:
                    break
                out.append(item)
            return out

    def wait_pending(self, timeout: float) -> bool:
        with self._lock:
            return bool(self._pending) or self.has_pending.wait(timeout)

    def ack(self, ids: list[int]) -> None:
        if not ids:
            return
        with self._lock:
            for rid in ids:
                self._pending.pop(rid, None)
            self._file.write(json.dumps({"op": "ack", "ids": ids}, separators=(",", ":")) + "\n")
            self._file.flush()
            self._maybe_compact_locked()

    @property
    def backlog(self) -> int:
        with self._lock:
            return len(self._pending)

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
