"""What a GPU product is (a whole GPU, a MIG slice, a time-sliced share) and how NVIDIA's
device plugin and GPU Feature Discovery name each, in one place: the price book, the
operator, the agent and the ledger's admission all read them from here.

- whole: resource ``nvidia.com/gpu``, device IDs are GPU UUIDs (``GPU-...``), the node
  label ``nvidia.com/gpu.product`` is the product.
- mig: a MIG profile, e.g. product ``NVIDIA-H100-80GB-HBM3-MIG-1g.10gb``. The ``mixed``
  strategy exposes it as ``nvidia.com/mig-1g.10gb`` and keeps the GPU's own product label;
  the ``single`` strategy as ``nvidia.com/gpu`` with the product label naming the profile.
  Device IDs are MIG UUIDs (``MIG-...``).
- shared: a time-sliced replica of a GPU: ``nvidia.com/gpu.shared`` (``renameByDefault``)
  or ``nvidia.com/gpu``, product label ``<GPU>-SHARED``; device IDs ``<GPU UUID>::<n>``.

Pure names, no imports beyond the standard library (the agent loads it too).
"""

from __future__ import annotations

import re
from enum import StrEnum

GPU_RESOURCE = "nvidia.com/gpu"
SHARED_RESOURCE = "nvidia.com/gpu.shared"
MIG_RESOURCE_PREFIX = "nvidia.com/mig-"
SHARED_SUFFIX = "-SHARED"
MIG_INFIX = "-MIG-"
REPLICA_SEP = "::"
# a MIG profile as the device plugin spells it in a resource name: 1g.10gb, 3g.40gb
PROFILE_PATTERN = r"[1-7]g\.[0-9]{1,4}gb"
RESOURCE_PATTERN = rf"^nvidia\.com/(gpu|gpu\.shared|mig-{PROFILE_PATTERN})$"
_RESOURCE = re.compile(RESOURCE_PATTERN)
MIG_SLICES = 7  # compute slices of an A100/H100 in MIG mode


class GPUKind(StrEnum):
    WHOLE = "whole"
    MIG = "mig"
    SHARED = "shared"


def is_gpu_resource(name: str) -> bool:
    """Whether a pod-resources / capacity resource name is one of NVIDIA's GPU resources."""
    return _RESOURCE.match(name) is not None


def mig_profile(resource: str) -> str | None:
    """``nvidia.com/mig-1g.10gb`` -> ``1g.10gb``; None for other resources."""
    return (
        resource[len(MIG_RESOURCE_PREFIX) :] if resource.startswith(MIG_RESOURCE_PREFIX) else None
    )


def mig_product(parent: str, profile: str) -> str:
    """The product of a MIG profile of a GPU, as GPU Feature Discovery labels it."""
    return f"{parent}{MIG_INFIX}{profile}"


def shared_product(parent: str) -> str:
    return f"{parent}{SHARED_SUFFIX}"


def node_product(product: str, resource: str) -> str:
    """The ``nvidia.com/gpu.product`` label of the nodes that sell ``product`` through
    ``resource``: the GPU's own name for a mixed-strategy MIG resource, else the product."""
    profile = mig_profile(resource)
    suffix = None if profile is None else MIG_INFIX + profile
    if suffix is not None and product.endswith(suffix):
        return product[: -len(suffix)]
    return product


def offered_product(label: str, resource: str) -> str:
    """The product a node labelled ``label`` sells through ``resource`` (the reverse of
    ``node_product``)."""
    profile = mig_profile(resource)
    return label if profile is None else mig_product(label, profile)


def device_kind(device_id: str) -> GPUKind:
    """What a device ID names: a MIG UUID, a time-slicing replica, or a whole GPU."""
    if device_id.startswith("MIG-"):
        return GPUKind.MIG
    if REPLICA_SEP in device_id:
        return GPUKind.SHARED
    return GPUKind.WHOLE


def _slices(profile: str) -> int:
    return int(profile.split("g.", 1)[0])


def pack_mig(profiles: list[str]) -> list[list[str]]:
    """MIG profiles packed first-fit into GPUs of 7 compute slices, largest first."""
    gpus: list[list[str]] = []
    for profile in sorted(profiles, key=_slices, reverse=True):
        for layout in gpus:
            if sum(map(_slices, layout)) + _slices(profile) <= MIG_SLICES:
                layout.append(profile)
                break
        else:
            gpus.append([profile])
    return gpus


def gpu_kind(product: str) -> GPUKind:
    """What a product is, from its name (the price book's rules make names and kinds agree)."""
    if MIG_INFIX in product:
        return GPUKind.MIG
    if product.endswith(SHARED_SUFFIX):
        return GPUKind.SHARED
    return GPUKind.WHOLE


def shared_count_refusal(product: str, kind: str, count: int, taker: str) -> str | None:
    """Why ``count`` units of ``product`` cannot be taken at once, naming the field, or
    None. A time-sliced share is taken one at a time: NVIDIA's device plugin refuses a pod
    asking for more than one replica (``failRequestsGreaterThanOne``), and two shares of
    one GPU are not twice the GPU. ``taker`` says who takes them ("an instance")."""
    if kind != GPUKind.SHARED or count == 1:
        return None
    return (
        f"spec.gpu.count: {product} is a time-sliced share of a GPU; {taker} takes exactly 1, "
        f"not {count}"
    )


def replica_parent(device_id: str) -> str:
    """``GPU-x::3`` -> ``GPU-x`` (the physical GPU a replica runs on); others unchanged."""
    return device_id.split(REPLICA_SEP, 1)[0]
