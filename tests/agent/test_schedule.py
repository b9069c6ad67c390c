from __future__ import annotations

import pytest
from gpucloud_agent.schedule import Ticker


class FakeTime:
    """Monotonic time that each wait advances by the delay plus a fixed oversleep."""

    def __init__(self, oversleep: float) -> None:
        self.t = 50.0
        self.oversleep = oversleep
        self.sample_cost = 0.0

    def now(self) -> float:
        return self.t

    def wait(self, delay: float) -> bool:
        self.t += delay + self.oversleep
        return False


def test_ticks_stay_on_the_grid_despite_oversleep_and_sample_cost() -> None:
    ft = FakeTime(oversleep=0.003)
    ticker = Ticker(1.0, now=ft.now, wait=ft.wait)
    starts = []
    for _ in range(1000):
        ft.t += 0.2  # the sample itself takes 200 ms
        late = ticker.next()
        assert late == pytest.approx(0.003)
        starts.append(ft.t)
    # tick n starts at start + n s (+ the oversleep), never start + n * (1.203) s
    assert starts[-1] == pytest.approx(50.0 + 1000 + 0.003)


def test_overrun_skips_missed_ticks_and_stays_on_the_grid() -> None:
    ft = FakeTime(oversleep=0.0)
    ticker = Ticker(1.0, now=ft.now, wait=ft.wait)
    ft.t += 3.5  # a sample that took 3.5 periods
    late = ticker.next()
    assert ticker.skipped == 2
    assert late == pytest.approx(0.5)
    assert ticker.next() == pytest.approx(0.0)
    assert ft.t == pytest.approx(50.0 + 4)


def test_stop_ends_the_wait() -> None:
    ticker = Ticker(3600.0)
    ticker.stop()
    assert ticker.next() is None


def test_period_must_be_positive() -> None:
    with pytest.raises(ValueError, match="sample period"):
        Ticker(0)
