"""The kubelet's ``ListPodResourcesResponse``, decoded from protobuf's wire format by hand.

The agent reads four fields of it (``api.proto``: pods' name and namespace, containers'
name, devices' resource name and IDs); grpcio and protobuf cost it 13 MiB of memory and
most of its CPU (issue 20). Every other field, those a newer kubelet adds included
(CPU IDs, memory, dynamic resources, topology), is skipped by its wire type, as any
protobuf parser skips unknown fields. A truncated or malformed message raises
ProtobufError.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

VARINT, I64, LEN, SGROUP, EGROUP, I32 = 0, 1, 2, 3, 4, 5


class ProtobufError(ValueError):
    pass


@dataclass
class ContainerDevices:
    resource_name: str = ""
    device_ids: list[str] = field(default_factory=list)


@dataclass
class ContainerResources:
    name: str = ""
    devices: list[ContainerDevices] = field(default_factory=list)


@dataclass
class PodResources:
    name: str = ""
    namespace: str = ""
    containers: list[ContainerResources] = field(default_factory=list)


@dataclass
class ListPodResourcesResponse:
    pod_resources: list[PodResources] = field(default_factory=list)


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    b = buf[pos] if pos < len(buf) else 0x100
    if b < 0x80:  # tags and short lengths: one byte
        return b, pos + 1
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise ProtobufError("truncated varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7
        if shift >= 70:
            raise ProtobufError("varint longer than 10 bytes")


def _skip(buf: bytes, pos: int, number: int, wire: int) -> int:
    """The position after a value of this wire type (a group: after its end tag)."""
    if wire == VARINT:
        return _varint(buf, pos)[1]
    if wire == I64:
        return pos + 8
    if wire == I32:
        return pos + 4
    if wire == LEN:
        length, pos = _varint(buf, pos)
        return pos + length
    if wire == SGROUP:  # deprecated, but a parser must still step over one
        while True:
            key, pos = _varint(buf, pos)
            if key & 7 == EGROUP:
                if key >> 3 != number:
                    raise ProtobufError(f"group {number} closed by an end tag of {key >> 3}")
                return pos
            pos = _skip(buf, pos, key >> 3, key & 7)
    raise ProtobufError(f"field {number}: unexpected wire type {wire}")


def fields(buf: bytes, pos: int, end: int) -> Iterator[tuple[int, int, int]]:
    """The length-delimited fields of the message in ``buf[pos:end]``, as (number, start,
    end of its bytes): every field the agent reads is one. Any other is skipped, as is a
    field whose wire type is not the one its number declares (protobuf's own parsers
    treat it as unknown too)."""
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise ProtobufError("field number 0")
        if wire == LEN:
            length, pos = _varint(buf, pos)
            if pos + length > end:
                raise ProtobufError(f"field {number}: truncated")
            yield number, pos, pos + length
            pos += length
        else:
            pos = _skip(buf, pos, number, wire)
            if pos > end:
                raise ProtobufError(f"field {number}: truncated")


def _text(buf: bytes, start: int, end: int) -> str:
    try:
        return buf[start:end].decode()
    except UnicodeDecodeError as exc:
        raise ProtobufError("a string field is not UTF-8") from exc


def _devices(buf: bytes, pos: int, end: int) -> ContainerDevices:
    out = ContainerDevices()
    for number, start, stop in fields(buf, pos, end):
        if number == 1:
            out.resource_name = _text(buf, start, stop)
        elif number == 2:
            out.device_ids.append(_text(buf, start, stop))
    return out


def _container(buf: bytes, pos: int, end: int) -> ContainerResources:
    out = ContainerResources()
    for number, start, stop in fields(buf, pos, end):
        if number == 1:
            out.name = _text(buf, start, stop)
        elif number == 2:
            out.devices.append(_devices(buf, start, stop))
    return out


def _pod(buf: bytes, pos: int, end: int) -> PodResources:
    out = PodResources()
    for number, start, stop in fields(buf, pos, end):
        if number == 1:
            out.name = _text(buf, start, stop)
        elif number == 2:
            out.namespace = _text(buf, start, stop)
        elif number == 3:
            out.containers.append(_container(buf, start, stop))
    return out


def parse_list_response(data: bytes) -> ListPodResourcesResponse:
    pods = [_pod(data, start, stop) for number, start, stop in fields(data, 0, len(data))
            if number == 1]  # fmt: skip
    return ListPodResourcesResponse(pods)
