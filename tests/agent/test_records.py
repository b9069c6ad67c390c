"""The agent's plain records (gpucloud_agent.records) against the API's pydantic model
(gpucloud.usage): the same verdict on every input, and for a valid one the same JSON,
byte for byte, and the same ledger digest. The agent process never loads pydantic."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
from gpucloud_agent import records as agent
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from gpucloud import usage as api
from gpucloud.ledger.ingest import digest
from gpucloud.ledger.wire import parse_batch
from gpucloud.usage_rules import MAX_POSIX_S, MAX_VOLUME_BYTES, UsageKind

# near the edges of every rule, and past them
_texts = st.one_of(
    st.text(min_size=1, max_size=12),
    st.sampled_from(["", "a\n", "\x7f", "x" * 253, "x" * 254, "ns-1", "ünïcødé 名前"]),
)
_uids = st.one_of(_texts, st.sampled_from(["u" * 64, "u" * 65]))
_device_ids = st.one_of(
    st.from_regex(api.DEVICE_ID_PATTERN, fullmatch=True),
    st.sampled_from(["GPU-0\n", "GPU-", "MIG-x y", "GPU-a::12345", "gpu-0", "T4"]),
)
_seconds = st.one_of(st.integers(0, 40), st.sampled_from([-1, MAX_POSIX_S, MAX_POSIX_S + 1]))
_quantities = st.one_of(
    st.integers(0, 40), st.sampled_from([-1, 3600, MAX_VOLUME_BYTES, MAX_VOLUME_BYTES + 1])
)
_gpus = st.none() | st.fixed_dictionaries({"uuid": _device_ids, "product": _texts})
_pods = st.none() | st.fixed_dictionaries({"namespace": _texts, "name": _texts, "uid": _uids})
_activities = st.none() | st.fixed_dictionaries(
    {
        "util_max_percent": st.integers(-1, 101),
        "memory_max_bytes": st.sampled_from([-1, 0, 7, MAX_VOLUME_BYTES, MAX_VOLUME_BYTES + 1]),
        "samples": st.integers(0, 11),
    }
)


@st.composite
def _inputs(draw: st.DrawFn) -> dict[str, Any]:
    start = draw(_seconds)
    return {
        "kind": draw(st.sampled_from(list(UsageKind))),
        "node": draw(_texts),
        "start": start,
        # mostly a plausible window, sometimes anything
        "end": draw(st.one_of(st.integers(start - 1, start + 3601), _seconds)),
        "quantity": draw(_quantities),
        "gpu": draw(_gpus),
        "pod": draw(_pods),
        "volume": draw(st.none() | _texts),
        "activity": draw(_activities),
    }


def _agent_record(data: dict[str, Any]) -> agent.UsageRecord:
    nested = {
        "gpu": agent.GPURef,
        "pod": agent.PodRef,
        "activity": agent.Activity,
    }
    kw = {k: (nested[k](**v) if k in nested and v is not None else v) for k, v in data.items()}
    return agent.UsageRecord(**kw)


def _wire(record: dict[str, Any]) -> bytes:
    # as the WAL writes a record and the shipper sends it
    return json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode()


@settings(max_examples=600, deadline=None)
@given(_inputs())
def test_the_agent_record_agrees_with_the_api_model(data: dict[str, Any]) -> None:
    try:
        model = api.UsageRecord.model_validate(data)
    except ValidationError:
        model = None
    try:
        mine = _agent_record(data)
    except ValueError:
        mine = None
    assert (mine is None) == (model is None), (data, model, mine)
    if mine is None or model is None:
        return
    assert _wire(mine.to_json()) == model.model_dump_json().encode()
    assert _wire(mine.to_json()) == _wire(model.model_dump(mode="json"))
    # the ledger's digest of what the agent sends, by both of the API's paths
    fast = parse_batch(b'{"records":[' + _wire(mine.to_json()) + b"]}")
    assert fast is not None and fast.digests == [digest(model)]
    assert digest(api.UsageRecord.model_validate_json(_wire(mine.to_json()))) == digest(model)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"node": ""}, r"node: must be 1 to 253 characters"),
        ({"node": "n\x00"}, r"node: must not contain control characters"),
        ({"start": True}, r"start: must be an integer, got bool"),
        ({"quantity": 10.0}, r"quantity: must be an integer, got float"),
        ({"end": 5}, r"end must be after start"),
        ({"gpu": None}, r"gpu_time records need gpu and pod"),
        ({"kind": "gpu_time"}, r"kind: must be one of gpu_time"),
    ],
)
def test_a_bad_field_is_named(kwargs: dict[str, Any], message: str) -> None:
    good: dict[str, Any] = {
        "kind": UsageKind.GPU_TIME,
        "node": "n",
        "start": 10,
        "end": 20,
        "quantity": 10,
        "gpu": agent.GPURef("GPU-1", "T4"),
        "pod": agent.PodRef("t", "p", "u"),
    }
    with pytest.raises(ValueError, match=message):
        agent.UsageRecord(**{**good, **kwargs})
    with pytest.raises(ValueError, match=r"gpu\.uuid: 'GPU-1\\n' must match"):
        agent.GPURef("GPU-1\n", "T4")
    with pytest.raises(ValueError, match=r"pod\.uid: must be 1 to 64 characters"):
        agent.PodRef("t", "p", "u" * 65)


# What the agent process must never load (issue 20: each costs megabytes of its memory).
HEAVY = ("pydantic", "pydantic_core", "httpx", "tenacity", "grpc", "google.protobuf",
         "prometheus_client", "kubernetes")  # fmt: skip


def test_the_agent_process_loads_no_heavy_library() -> None:
    """Every module `gpucloud-agent run` imports (main.run_agent's, and those it imports
    only with --disk-root, --nvml fake or --fake-from-kube), in a fresh interpreter."""
    code = (
        "import sys\n"
        "import gpucloud_agent.main as m\n"
        "assert m.main(['run']) == 2  # run_agent's imports, then: --node-name is required\n"
        "import gpucloud_agent.wipe, gpucloud_agent.imagecopy, gpucloud_agent.fake_nvml\n"
        "import gpucloud_agent.podresources.client, gpucloud_agent.records\n"
        "import gpucloud_agent.kubeapi, gpucloud_agent.pods\n"
        "print(' '.join(sorted(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    loaded = set(out.stdout.split())
    assert "gpucloud_agent.shipper" in loaded and "gpucloud_agent.metrics" in loaded
    heavy = sorted(m for m in loaded if m.split(".")[0] in HEAVY or m.startswith(HEAVY))
    assert heavy == []
