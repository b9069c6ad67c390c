from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from gpucloud_agent.fake_nvml import fake_gpu_uuid
from gpucloud_agent.podresources.client import DeviceHolder, PodResourcesClient, PodResourcesError
from gpucloud_agent.podresources.fake_server import DeviceAllocator, FakePod, fake_device_ids, serve


def pod(name: str, *containers: tuple[str, int]) -> FakePod:
    return FakePod("team", name, f"uid-{name}", tuple(containers))


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[list[FakePod], PodResourcesClient]]:
    pods: list[FakePod] = []
    sock = str(tmp_path / "kubelet.sock")
    server = serve(sock, lambda: pods, fake_device_ids("node-a", 4))
    client = PodResourcesClient(sock)
    yield pods, client
    client.close()
    server.stop(None)


def test_client_reads_assignments_over_the_unix_socket(served) -> None:  # type: ignore[no-untyped-def]
    pods, client = served
    assert client.holders() == {}
    pods.append(pod("a", ("main", 2), ("sidecar", 0)))
    pods.append(pod("b", ("main", 1)))
    held = client.holders()
    gpu = [fake_gpu_uuid("node-a", i) for i in range(4)]
    assert held == {
        gpu[0]: DeviceHolder("team", "a", "main"),
        gpu[1]: DeviceHolder("team", "a", "main"),
        gpu[2]: DeviceHolder("team", "b", "main"),
    }
    raw = client.list_raw()
    assert [p.name for p in raw.pod_resources] == ["a", "b"]
    assert raw.pod_resources[0].containers[1].name == "sidecar"


def test_pods_keep_their_gpus_and_freed_ones_are_reused() -> None:
    alloc = DeviceAllocator(["g0", "g1", "g2"])
    a, b, c = pod("a", ("m", 1)), pod("b", ("m", 1)), pod("c", ("m", 2))
    assert dict((p.name, d["m"]) for p, d in alloc.assign([a, b])) == {"a": ["g0"], "b": ["g1"]}
    # a leaves; c needs 2 GPUs: gets the freed g0 and g2; b keeps g1
    got = {p.name: d["m"] for p, d in alloc.assign([b, c])}
    assert got == {"b": ["g1"], "c": ["g0", "g2"]}
    # a pod that does not fit gets nothing (a kubelet would not admit it)
    assert [p.name for p, _ in alloc.assign([b, c, pod("d", ("m", 1))])] == ["b", "c"]


def test_unreachable_socket_is_a_clear_error(tmp_path: Path) -> None:
    client = PodResourcesClient(str(tmp_path / "nothing.sock"), timeout_s=0.5)
    with pytest.raises(PodResourcesError, match=r"nothing\.sock"):
        client.holders()
    client.close()
