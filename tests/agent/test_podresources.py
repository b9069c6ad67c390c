from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from gpucloud_agent.fake_nvml import fake_gpu_uuid
from gpucloud_agent.podresources import api_pb2, api_pb2_grpc
from gpucloud_agent.podresources.client import DeviceHolder, PodResourcesClient, PodResourcesError
from gpucloud_agent.podresources.fake_server import DeviceAllocator, FakePod, fake_device_ids, serve
from gpucloud_agent.podresources.proto import ProtobufError, parse_list_response
from hypothesis import given, settings
from hypothesis import strategies as st


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


# --- the client's gRPC and protobuf, against grpcio's own server and protobuf's parser ---


class Servicer(api_pb2_grpc.PodResourcesListerServicer):
    """Answers with ``answer()``: a response; or (status, message) to fail with before
    any message (trailers-only); or (response, status, message) to send the response and
    then fail in the trailers."""

    def __init__(self) -> None:
        self.answer: Callable[[], Any] = api_pb2.ListPodResourcesResponse
        self.calls = 0

    def List(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.calls += 1
        out = self.answer()
        if isinstance(out, tuple) and len(out) == 3:
            out, code, details = out
            context.set_code(code)
            context.set_details(details)
        elif isinstance(out, tuple):
            context.abort(*out)
        return out


def start(sock: str, servicer: Servicer) -> grpc.Server:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    api_pb2_grpc.add_PodResourcesListerServicer_to_server(servicer, server)
    server.add_insecure_port(f"unix://{sock}")
    server.start()
    return server


@pytest.fixture
def grpc_server(tmp_path: Path) -> Iterator[tuple[str, Servicer]]:
    sock, servicer = str(tmp_path / "kubelet.sock"), Servicer()
    server = start(sock, servicer)
    yield sock, servicer
    server.stop(None)


def response(pods: int, devices_each: int) -> api_pb2.ListPodResourcesResponse:
    resp = api_pb2.ListPodResourcesResponse()
    for i in range(pods):
        pr = resp.pod_resources.add(name=f"pod-{i}", namespace="team")
        c = pr.containers.add(name="main")
        ids = [f"GPU-{i:08d}-{j:04d}-0000-0000-000000000000" for j in range(devices_each)]
        c.devices.add(resource_name="nvidia.com/gpu", device_ids=ids)
    return resp


def test_a_large_answer_flows_past_the_default_window(grpc_server) -> None:  # type: ignore[no-untyped-def]
    """HTTP/2's default window is 64 KiB; this answer is 1.9 MB in many DATA frames."""
    sock, servicer = grpc_server
    servicer.answer = lambda: response(5000, 8)
    assert servicer.answer().ByteSize() > 1_800_000
    client = PodResourcesClient(sock)
    for _ in range(3):  # the connection's window is given back after each call
        held = client.holders()
        assert len(held) == 40_000
        last = held["GPU-00004999-0007-0000-0000-000000000000"]
        assert last == DeviceHolder("team", "pod-4999", "main")
    client.close()


def test_a_grpc_error_status_is_a_clear_error_and_the_connection_stays(grpc_server) -> None:  # type: ignore[no-untyped-def]
    sock, servicer = grpc_server
    client = PodResourcesClient(sock)
    assert client.holders() == {}
    servicer.answer = lambda: (grpc.StatusCode.UNAVAILABLE, "kubelet is restarting: 100% busy")
    with pytest.raises(PodResourcesError, match=r"UNAVAILABLE: kubelet is restarting: 100% busy"):
        client.holders()
    # a message, then a failure in the trailers: the message is not used
    servicer.answer = lambda: (response(1, 1), grpc.StatusCode.INTERNAL, "late failure")
    with pytest.raises(PodResourcesError, match=r"List on .*kubelet\.sock failed: INTERNAL: late"):
        client.holders()
    conn = client._channel._conn
    servicer.answer = lambda: response(1, 1)
    assert list(client.holders()) == ["GPU-00000000-0000-0000-0000-000000000000"]
    assert client._channel._conn is conn  # one connection for all four calls
    client.close()


def test_the_client_reconnects_when_the_kubelet_restarts(tmp_path: Path) -> None:
    sock = str(tmp_path / "kubelet.sock")
    servicer = Servicer()
    servicer.answer = lambda: response(2, 1)
    server = start(sock, servicer)
    client = PodResourcesClient(sock)
    assert len(client.holders()) == 2
    server.stop(None)
    with pytest.raises(PodResourcesError, match=r"kubelet\.sock failed"):
        client.holders()  # down: an error, and the sample is skipped
    server = start(sock, servicer)
    assert len(client.holders()) == 2
    # restarted between two calls: the stale connection is replaced without an error
    server.stop(None)
    server = start(sock, servicer)
    assert len(client.holders()) == 2
    assert servicer.calls == 3
    server.stop(None)
    client.close()


def test_a_silent_server_is_a_timeout(tmp_path: Path) -> None:
    sock = str(tmp_path / "silent.sock")
    with socket.socket(socket.AF_UNIX) as silent:
        silent.bind(sock)
        silent.listen()
        client = PodResourcesClient(sock, timeout_s=0.3)
        with pytest.raises(PodResourcesError, match=r"no answer within 0\.3 s"):
            client.holders()
        client.close()


def _unknown_fields(draw: st.DrawFn) -> bytes:
    """Fields numbered 50+ of every wire type, a group holding fields among them."""
    out = b""
    for number in draw(st.lists(st.integers(50, 2000), max_size=4)):
        wire = draw(st.sampled_from([0, 1, 2, 3, 5]))
        key = _varint(number << 3 | wire)
        if wire == 0:
            out += key + _varint(draw(st.integers(0, 2**64 - 1)))
        elif wire == 1:
            out += key + draw(st.binary(min_size=8, max_size=8))
        elif wire == 2:
            data = draw(st.binary(max_size=40))
            out += key + _varint(len(data)) + data
        elif wire == 3:
            inner = _varint(7 << 3 | 0) + _varint(300)
            out += key + inner + _varint(number << 3 | 4)
        else:
            out += key + draw(st.binary(min_size=4, max_size=4))
    return out


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


@st.composite
def _encoded(draw: st.DrawFn) -> bytes:
    """A ListPodResourcesResponse as the kubelet might send it: fields we skip
    (topology) and fields this proto does not know, at every level."""
    names = st.text(max_size=10)

    def with_unknown(msg: Any) -> bytes:
        return msg.SerializeToString() + _unknown_fields(draw)

    pods = b""
    for _ in range(draw(st.integers(0, 3))):
        containers = b""
        for _ in range(draw(st.integers(0, 3))):
            devices = b""
            for _ in range(draw(st.integers(0, 2))):
                ids = draw(st.lists(names, max_size=3))
                d = api_pb2.ContainerDevices(resource_name=draw(names), device_ids=ids)
                for n in draw(st.lists(st.integers(-(2**63), 2**63 - 1), max_size=2)):
                    d.topology.nodes.add(ID=n)
                devices += _field(2, with_unknown(d))
            c = with_unknown(api_pb2.ContainerResources(name=draw(names))) + devices
            containers += _field(3, c)
        p = api_pb2.PodResources(name=draw(names), namespace=draw(names))
        pods += _field(1, with_unknown(p) + containers)
    return pods + _unknown_fields(draw)


def _field(number: int, data: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(data)) + data


@settings(max_examples=300, deadline=None)
@given(_encoded())
def test_the_decoder_reads_what_protobuf_reads(data: bytes) -> None:
    theirs = api_pb2.ListPodResourcesResponse.FromString(data)
    ours = parse_list_response(data)
    assert [(p.name, p.namespace) for p in ours.pod_resources] == [
        (p.name, p.namespace) for p in theirs.pod_resources
    ]
    assert [
        [(c.name, [(d.resource_name, d.device_ids) for d in c.devices]) for c in p.containers]
        for p in ours.pod_resources
    ] == [
        [(c.name, [(d.resource_name, list(d.device_ids)) for d in c.devices]) for c in p.containers]
        for p in theirs.pod_resources
    ]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x0a\x05ab", r"field 1: truncated"),
        (b"\x0a", r"truncated varint"),
        (b"\x08" + b"\xff" * 11, r"varint longer than 10 bytes"),
        (b"\x00\x00", r"field number 0"),
        (b"\x0f", r"field 1: unexpected wire type 7"),
        (b"\x0b\x14", r"group 1 closed by an end tag of 2"),
        (b"\x0a\x04\x0a\x02\xff\xfe", r"not UTF-8"),
    ],
)
def test_a_malformed_answer_is_refused(data: bytes, message: str) -> None:
    with pytest.raises(ProtobufError, match=message):
        parse_list_response(data)
