from __future__ import annotations

import itertools

from gpucloud_agent.meter import Meter
from gpucloud_agent.records import GPURef, PodRef, UsageRecord
from hypothesis import given, settings
from hypothesis import strategies as st

G0 = GPURef(uuid="GPU-0", product="A100")
G1 = GPURef(uuid="GPU-1", product="A100")
A = PodRef(namespace="t", name="a", uid="ua")
B = PodRef(namespace="t", name="b", uid="ub")


def spans(records: list[UsageRecord]) -> list[tuple[str, str, int, int]]:
    return [(r.gpu.uuid, r.pod.name, r.start, r.end) for r in records]  # type: ignore[union-attr]


def run(meter: Meter, samples: list[tuple[int, dict[GPURef, PodRef | None]]]) -> list[UsageRecord]:
    out: list[UsageRecord] = []
    for second, holders in samples:
        out += meter.observe(second, holders)[0]
    return out


def test_ten_second_cap_and_holder_change_close_windows() -> None:
    m = Meter("n1")
    recs = run(m, [(100 + i, {G0: A}) for i in range(23)] + [(123, {G0: B}), (124, {G0: None})])
    assert spans(recs) == [
        ("GPU-0", "a", 100, 110),
        ("GPU-0", "a", 110, 120),
        ("GPU-0", "a", 120, 123),  # closed early: the holder changed
        ("GPU-0", "b", 123, 124),  # closed: the GPU was freed
    ]
    assert all(r.quantity == r.end - r.start for r in recs)


def test_two_samples_in_one_second_count_once() -> None:
    m = Meter("n1")
    recs = run(m, [(5, {G0: A}), (5, {G0: A}), (6, {G0: A}), (7, {G0: None})])
    assert spans(recs) == [("GPU-0", "a", 5, 7)]


def test_gap_with_same_holder_is_bridged_and_cut_at_ten() -> None:
    m = Meter("n1")
    recs = run(m, [(0, {G0: A}), (25, {G0: A}), (26, {G0: None})])
    assert spans(recs) == [("GPU-0", "a", 0, 10), ("GPU-0", "a", 10, 20), ("GPU-0", "a", 20, 26)]


def test_gap_with_changed_holder_bills_no_one() -> None:
    m = Meter("n1")
    recs = run(m, [(0, {G0: A}), (1, {G0: A}), (9, {G0: B}), (10, {G0: None})])
    assert spans(recs) == [("GPU-0", "a", 0, 2), ("GPU-0", "b", 9, 10)]


def test_gap_longer_than_max_bridge_is_not_bridged() -> None:
    m = Meter("n1", max_bridge_s=5)
    recs = run(m, [(0, {G0: A}), (10, {G0: A}), (11, {G0: None})])
    assert spans(recs) == [("GPU-0", "a", 0, 1), ("GPU-0", "a", 10, 11)]


def test_gpus_are_independent() -> None:
    m = Meter("n1")
    recs = run(m, [(0, {G0: A, G1: B}), (1, {G0: A, G1: None}), (2, {G0: None, G1: None})])
    assert sorted(spans(recs)) == [("GPU-0", "a", 0, 2), ("GPU-1", "b", 0, 1)]


def test_state_round_trip_resumes_without_reemitting() -> None:
    m = Meter("n1")
    first = run(m, [(i, {G0: A}) for i in range(13)])
    resumed = Meter("n1")
    resumed.restore(m.state())
    rest = run(resumed, [(13, {G0: A}), (13, {G0: A}), (14, {G0: None})])
    assert spans(first + rest) == [("GPU-0", "a", 0, 10), ("GPU-0", "a", 10, 14)]


def test_attributed_seconds_are_reported() -> None:
    m = Meter("n1")
    m.observe(0, {G0: A})
    _, added = m.observe(4, {G0: A})
    assert [(a.pod.name, a.seconds) for a in added] == [("a", 4)]


def reference(samples: list[tuple[int, PodRef | None]]) -> dict[int, str]:
    """Second -> pod name, straight from the rules (no windows)."""
    owned: dict[int, str] = {}
    nxt: int | None = None
    holder: PodRef | None = None
    for s, pod in samples:
        if nxt is not None and s < nxt:
            continue
        if pod is not None:
            start = nxt if (nxt is not None and holder == pod) else s
            for t in range(start, s + 1):
                owned[t] = pod.name
        nxt, holder = s + 1, pod
    return owned


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 4), st.sampled_from([A, B, None])), min_size=1, max_size=60)
)
def test_windows_carry_exactly_the_attributed_seconds(
    steps: list[tuple[int, PodRef | None]],
) -> None:
    samples, t = [], 1000
    for dt, pod in steps:
        t += dt
        samples.append((t, pod))
    samples.append((t + 1, None))  # free the GPU at the end: every window closes
    m = Meter("n1")
    recs = run(m, [(s, {G0: p}) for s, p in samples])
    owned: dict[int, str] = {}
    for r in recs:
        assert 1 <= r.end - r.start <= 10
        for sec in range(r.start, r.end):
            assert sec not in owned, f"second {sec} attributed twice"
            owned[sec] = r.pod.name  # type: ignore[union-attr]
    assert owned == reference(samples)
    # windows of one pod are closed only at the cap or at a change/gap
    for a, b in itertools.pairwise(recs):
        if a.end == b.start and a.pod == b.pod:
            assert a.end - a.start == 10


def test_windows_carry_the_busiest_sampled_second_and_the_sample_count() -> None:
    """Activity (idle detection): per window the highest utilization and memory the GPU
    showed in its sampled seconds, and how many were sampled; bridged seconds add none."""
    m = Meter("n1")
    out: list[UsageRecord] = []
    utils = [3, 0, 41, 2, 0, 0, 7, 1, 0, 9, 0, 0]
    for i, u in enumerate(utils):
        out += m.observe(i, {G0: A}, {"GPU-0": (u, (u + 1) * 2**20)})[0]
    out += m.observe(15, {G0: A}, {"GPU-0": (4, 2**20)})[0]  # 12-14 bridged, not sampled
    out += m.observe(16, {G0: None})[0]
    first, second = out
    assert (first.start, first.end) == (0, 10) and first.activity is not None
    assert (first.activity.util_max_percent, first.activity.samples) == (41, 10)
    assert first.activity.memory_max_bytes == 42 * 2**20
    assert (second.start, second.end) == (10, 16) and second.activity is not None
    assert (second.activity.util_max_percent, second.activity.samples) == (4, 3)  # 10, 11, 15


def test_an_open_windows_activity_survives_a_restart_and_old_state_has_none() -> None:
    m = Meter("n1")
    for i in range(4):
        m.observe(i, {G0: A}, {"GPU-0": (60 if i == 1 else 0, 0)})
    resumed = Meter("n1")
    resumed.restore(m.state())
    (rec,), _ = resumed.observe(4, {G0: None})
    assert rec.activity is not None and (rec.activity.util_max_percent, rec.activity.samples) == (
        60,
        4,
    )
    old = m.state()
    del old["GPU-0"]["open"]["activity"]  # a WAL written before activity was kept
    resumed = Meter("n1")
    resumed.restore(old)
    (rec,), _ = resumed.observe(4, {G0: None})
    assert rec.activity is None  # no sample recorded: no evidence, never "idle"
