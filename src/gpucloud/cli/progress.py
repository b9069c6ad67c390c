"""Progress on stderr while waiting: a spinner on a terminal, a line per change otherwise
(logs and CI keep a short, readable record; stdout stays for the result)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console


@contextmanager
def progress_reporter(console: Console, what: str) -> Iterator[Callable[[str, float], None]]:
    """Yields ``report(observed, elapsed_s)``."""
    if console.is_terminal:
        with console.status(f"waiting for {what}") as status:

            def spin(observed: str, elapsed: float) -> None:
                status.update(f"waiting for {what}: {observed} ({elapsed:.0f}s)")

            yield spin
        return
    last: list[str] = []

    def line(observed: str, elapsed: float) -> None:
        if last != [observed]:
            console.print(f"waiting for {what}: {observed} ({elapsed:.0f}s)")
            last[:] = [observed]

    yield line
