"""The agent's pod-resources client against gRPC-Go and the kubelet's own API package
(tests/agent/kubelet_go): the server stack a real kubelet runs, with every field a
kubelet fills in. Skipped where Go, or its module cache, is not at hand."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from gpucloud_agent.podresources.client import DeviceHolder, PodResourcesClient, PodResourcesError

SOURCE = Path(__file__).parent / "kubelet_go"
GO = shutil.which("go")


@pytest.fixture(scope="module")
def kubelet_go(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if GO is None:
        pytest.skip("go is not installed")
    binary = tmp_path_factory.mktemp("kubelet-go") / "kubelet_go"
    env = {**os.environ, "GOFLAGS": "-mod=mod", "GOPROXY": os.environ.get("GOPROXY", "off")}
    built = subprocess.run([GO, "build", "-o", str(binary), "."], cwd=SOURCE, env=env,
                           capture_output=True, text=True, timeout=600)  # fmt: skip
    if built.returncode != 0:
        pytest.skip(f"cannot build tests/agent/kubelet_go offline: {built.stderr[-500:]}")
    return binary


class Kubelet:
    def __init__(self, binary: Path, sock: Path, *args: str) -> None:
        self.proc = subprocess.Popen(
            [str(binary), str(sock), *args], stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None and self.proc.stdout.readline() == "ready\n"

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def sock(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "kubelet.sock"


def test_reads_a_go_kubelets_answer_and_follows_its_restart(kubelet_go: Path, sock: Path) -> None:
    kubelet = Kubelet(kubelet_go, sock, "3")
    client = PodResourcesClient(str(sock))
    try:
        for _ in range(3):
            held = client.holders()
            assert len(held) == 6
            assert held["GPU-00000005-0000-0000-0000-000000000000"] == DeviceHolder(
                "team", "pod-2", "main"
            )
        kubelet.stop()
        kubelet = Kubelet(kubelet_go, sock, "3")
        assert len(client.holders()) == 6  # the closed connection replaced, no error
    finally:
        kubelet.stop()
        client.close()


def test_a_large_answer_and_an_error_status(kubelet_go: Path, sock: Path) -> None:
    kubelet = Kubelet(kubelet_go, sock, "8000")  # about 1.5 MB: far past HTTP/2's 64 KiB
    client = PodResourcesClient(str(sock))
    try:
        assert len(client.holders()) == 16_000
        kubelet.stop()
        kubelet = Kubelet(kubelet_go, sock, "0", "fail")
        with pytest.raises(PodResourcesError, match=r"UNAVAILABLE: kubelet says no: 100% busy"):
            client.holders()
    finally:
        kubelet.stop()
        client.close()
