"""Names every component's manifests and API calls share: our API group and version,
NVIDIA's GPU resource and product label, the label on what the operator manages, and
the owner reference that lets Kubernetes' garbage collector remove a child with its
owner. One place, so the operator, the gateway and the API cannot drift apart."""

from __future__ import annotations

from typing import Any

from gpucloud.gpu_kinds import GPU_RESOURCE as GPU_RESOURCE  # its home; re-exported

GROUP = "gpucloud.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
PRODUCT_LABEL = "nvidia.com/gpu.product"
MANAGED_BY = {"app.kubernetes.io/managed-by": "gpucloud-operator"}


def owner_reference(owner: dict[str, Any], default_kind: str) -> dict[str, Any]:
    """The controlling owner reference to ``owner`` (kind ``default_kind`` unless the
    object names its own)."""
    meta = owner["metadata"]
    return {
        "apiVersion": owner.get("apiVersion", API_VERSION),
        "kind": owner.get("kind", default_kind),
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }
