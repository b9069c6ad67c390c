"""The JSON fast path (gpucloud.ledger.wire) accepts only what UsageRecord accepts, and
yields exactly the rows (and digests) that the model path yields."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ledger_helpers import T0_S, disk_record, gpu_record

from gpucloud.ledger.ingest import _row, _wire_row, digest
from gpucloud.ledger.wire import WireBatch, parse_batch
from gpucloud.usage import UsageBatch


def _gpu(start: int = T0_S, length: int = 10, **extra: Any) -> dict[str, Any]:
    return {
        "kind": "gpu_time",
        "node": "node-1",
        "start": start,
        "end": start + length,
        "quantity": length,
        "gpu": {"uuid": "GPU-a", "product": "NVIDIA-H100"},
        "pod": {"namespace": "ns", "name": "p", "uid": "pod-1"},
        **extra,
    }


def _same_rows(raw: bytes) -> None:
    fast = parse_batch(raw)
    assert fast is not None
    models = UsageBatch.model_validate_json(raw).records
    rows = [_wire_row(r, d, 7) for r, d in zip(fast.records, fast.digests, strict=True)]
    assert rows == [_row(m, 7) for m in models]


def test_a_valid_batch_takes_the_fast_path_with_the_same_rows() -> None:
    disk = {"kind": "cloud_disk", "node": "n", "start": 5, "end": 3605, "quantity": 2**40,
            "volume": "disk-1"}  # fmt: skip
    odd = _gpu(volume="vol-x", pod=None, gpu={"uuid": "GPU-b", "product": "P"})
    busy = {"util_max_percent": 97, "memory_max_bytes": 2**33, "samples": 3}
    records = [_gpu(), _gpu(T0_S + 10, 3, activity=busy), disk, {**disk, "pod": _gpu()["pod"]}]
    _same_rows(json.dumps({"records": records}).encode())
    assert parse_batch(json.dumps({"records": [odd]})) is None  # gpu_time without pod
    assert parse_batch(b'{"records": []}') is not None


@pytest.mark.parametrize(
    "record",
    [
        {**_gpu(), "start": str(T0_S)},  # lax coercion: left to the model path
        {**_gpu(), "quantity": 10.0},
        _gpu(length=11),  # windows of at most 10 s
        _gpu(length=0),  # end after start
        {**_gpu(), "quantity": 9},  # quantity == end - start
        _gpu(extra_field=1),
        _gpu(gpu=None),
        _gpu(gpu={"uuid": "not-a-gpu", "product": "P"}),
        _gpu(pod={"namespace": "", "name": "p", "uid": "u"}),
        _gpu(2**63),
        {"kind": "image", "node": "n", "start": 1, "end": 2, "quantity": 1},  # no volume
        {"kind": "tape", "node": "n", "start": 1, "end": 2, "quantity": 1, "volume": "v"},
        # activity: bounded, at most one sample a second, gpu_time only
        _gpu(activity={"util_max_percent": 101, "memory_max_bytes": 0, "samples": 1}),
        _gpu(activity={"util_max_percent": 1, "memory_max_bytes": -1, "samples": 1}),
        _gpu(length=3, activity={"util_max_percent": 1, "memory_max_bytes": 0, "samples": 4}),
        _gpu(activity={"util_max_percent": 1, "memory_max_bytes": 0, "samples": 0}),
        _gpu(activity={"util_max_percent": 1, "memory_max_bytes": 0}),
        {
            "kind": "image",
            "node": "n",
            "start": 1,
            "end": 2,
            "quantity": 1,
            "volume": "v",
            "activity": {"util_max_percent": 1, "memory_max_bytes": 0, "samples": 1},
        },
    ],
)
def test_anything_doubtful_goes_to_the_model_path(record: dict[str, Any]) -> None:
    assert parse_batch(json.dumps({"records": [_gpu(), record]})) is None


def test_batch_shape_is_checked_too() -> None:
    assert parse_batch(b"not json") is None
    assert parse_batch(b'{"records": [], "extra": 1}') is None
    assert parse_batch(json.dumps({"records": [_gpu(T0_S + 10 * i) for i in range(10001)]})) is None


def test_a_wire_batch_cannot_be_made_outside_parse_batch() -> None:
    with pytest.raises(TypeError, match="parse_batch"):
        WireBatch([_gpu()], object())


_values = st.one_of(
    st.integers(min_value=-2, max_value=2**64),
    st.sampled_from(["", "x", "GPU-1", "1", "gpu_time", "cloud_disk", "a" * 254]),
    st.none(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
)


@st.composite
def _records(draw: st.DrawFn) -> dict[str, Any]:
    """Mostly valid records with a few fields replaced, dropped or added."""
    kind = draw(st.sampled_from(["gpu_time", "cloud_disk", "image", "instance_volume"]))
    start = draw(st.integers(0, 2**40))
    length = draw(st.integers(1, 12))
    record: dict[str, Any] = _gpu(start, length) if kind == "gpu_time" else {
        "kind": kind, "node": "n", "start": start, "end": start + length,
        "quantity": draw(st.integers(0, 2**50)), "volume": "vol-1",
    }  # fmt: skip
    for key in draw(st.lists(st.sampled_from([*record, "gpu", "pod", "volume", "zz"]), max_size=2)):
        if draw(st.booleans()):
            record.pop(key, None)
        else:
            record[key] = draw(_values)
    return record


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(records=st.lists(_records(), min_size=1, max_size=4))
def test_fast_path_never_accepts_what_the_model_refuses(records: list[dict[str, Any]]) -> None:
    raw = json.dumps({"records": records}).encode()
    if parse_batch(raw) is not None:
        _same_rows(raw)  # the model accepts it too, with the same rows


def test_digests_are_those_of_stored_records() -> None:
    # Digests are stored: a re-send after an upgrade must still match (no false conflict).
    assert digest(gpu_record(T0_S)) == "56727008b8f5dd83293c35dcaf2d763a"
    assert digest(disk_record(T0_S, 3600, 2**30)) == "2836c4f11fd26c41d5a738595b762868"
