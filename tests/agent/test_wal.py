from __future__ import annotations

import json
from pathlib import Path

import pytest
from gpucloud_agent.wal import Wal, WalCorrupt


def rec(i: int) -> dict[str, int]:
    return {"n": i}


def segments(d: Path) -> list[Path]:
    return sorted(d.glob("seg-*.jsonl"))


def test_records_survive_reopen_until_acked(tmp_path: Path) -> None:
    w = Wal(tmp_path)
    w.append([rec(1), rec(2), rec(3)], {"meter": {"x": 1}})
    w.ack([1])
    w.append([], {"disk_hour": 3600})
    w.close()  # no clean shutdown logic exists: reopen is recovery
    w2 = Wal(tmp_path)
    assert [r for _, r in w2.pending(10)] == [rec(2), rec(3)]
    assert w2.state == {"meter": {"x": 1}, "disk_hour": 3600}
    w2.append([rec(4)])
    assert [i for i, _ in w2.pending(10)] == [2, 3, 4]  # ids keep growing, never reused


def test_compaction_keeps_only_state_and_unacked(tmp_path: Path) -> None:
    w = Wal(tmp_path, segment_max_bytes=2048)
    for i in range(120):
        w.append([rec(i)], {"meter": {"i": i}})
        if i % 3 == 0:
            w.ack([i + 1])  # ack every third record right away
    assert w.compactions > 2
    assert len(segments(tmp_path)) == 1
    expected = [rec(i) for i in range(120) if i % 3 != 0]
    assert [r for _, r in w.pending(1000)] == expected
    w.close()
    w2 = Wal(tmp_path)
    assert [r for _, r in w2.pending(1000)] == expected
    assert w2.state == {"meter": {"i": 119}}


def test_torn_tail_is_ignored(tmp_path: Path) -> None:
    w = Wal(tmp_path)
    w.append([rec(1)], {"meter": {}})
    w.close()
    seg = segments(tmp_path)[-1]
    with seg.open("a") as f:
        f.write('{"op":"rec","id":2,"r":{"n"')  # a crash in the middle of a write
    w2 = Wal(tmp_path)
    assert [r for _, r in w2.pending(10)] == [rec(1)]


def test_replay_of_a_half_finished_compaction_is_idempotent(tmp_path: Path) -> None:
    w = Wal(tmp_path)
    w.append([rec(1), rec(2)])
    w.close()
    # a crash after the new segment was written but before the old one was deleted
    old = segments(tmp_path)[-1]
    (tmp_path / "seg-000000000099.jsonl").write_text(old.read_text())
    w2 = Wal(tmp_path)
    assert [r for _, r in w2.pending(10)] == [rec(1), rec(2)]


def test_corruption_in_the_middle_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "seg-000000000001.jsonl").write_text(
        "garbage\n" + json.dumps({"op": "rec", "id": 1, "r": {}}) + "\n"
    )
    with pytest.raises(WalCorrupt, match="line 1"):
        Wal(tmp_path)
