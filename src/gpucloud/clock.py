"""One injectable clock for every time rule.

Production uses the system clock. Tests that drive real processes (operator, API,
agents) through a month of rules in seconds share a *file clock*: a file holding
the current POSIX time as a decimal number, which the test advances. Select it with
``GPUCLOUD_CLOCK=file:/path/to/clock``; ``GPUCLOUD_CLOCK=system`` (the default)
uses the real time.
"""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime:
        """The current time, timezone-aware UTC."""
        ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)


class ManualClock:
    """An in-process clock that only moves when told to."""

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime(2026, 1, 1, tzinfo=UTC)

    def now(self) -> datetime:
        return self._now

    def advance(self, delta: timedelta | float) -> datetime:
        self._now += delta if isinstance(delta, timedelta) else timedelta(seconds=delta)
        return self._now

    def set(self, when: datetime) -> None:
        self._now = when


class FileClock:
    """A clock shared between processes through a file of POSIX seconds."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def now(self) -> datetime:
        return datetime.fromtimestamp(float(self.path.read_text().strip()), UTC)

    def set(self, when: datetime) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(f"{when.timestamp():.6f}\n")
        tmp.replace(self.path)  # atomic: readers never see a half-written number

    def advance(self, delta: timedelta | float) -> datetime:
        when = self.now() + (delta if isinstance(delta, timedelta) else timedelta(seconds=delta))
        self.set(when)
        return when


def clock_from_env(value: str | None = None) -> Clock:
    spec = value if value is not None else os.environ.get("GPUCLOUD_CLOCK", "system")
    if spec in ("", "system"):
        return SystemClock()
    if spec.startswith("file:"):
        return FileClock(spec.removeprefix("file:"))
    raise ValueError(f"GPUCLOUD_CLOCK: unknown clock {spec!r} (expected 'system' or 'file:PATH')")


def monotonic() -> float:
    """Monotonic seconds, for schedules and durations (never for billing instants)."""
    return time.monotonic()
