"""Pure manifest builders for a ModelDeployment: a Deployment and a Service.

Dicts in, dicts out, no API calls. Both carry an owner reference to the
ModelDeployment, so Kubernetes' garbage collector removes them with it. The gateway
finds the replicas through the Service's EndpointSlices (label
``kubernetes.io/service-name``), and reaches them on ``MODEL_PORT``.
"""

from __future__ import annotations

from typing import Any

from gpucloud import kube_names
from gpucloud.gpu_kinds import node_product
from gpucloud.kube_names import GPU_RESOURCE, MANAGED_BY, PRODUCT_LABEL

MODEL_LABEL = "gpucloud.dev/model-deployment"
VISIBILITY_LABEL = "gpucloud.dev/visibility"
MODEL_PORT = 8000

Manifest = dict[str, Any]


class ManifestError(ValueError):
    """A ModelDeployment that cannot be turned into manifests, naming the field."""


def _field(md: Manifest, path: str) -> Any:
    node: Any = md
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ManifestError(f"ModelDeployment {path}: required")
        node = node[part]
    return node


def owner_reference(md: Manifest) -> Manifest:
    _field(md, "metadata.uid")  # missing: a ManifestError naming the field
    return kube_names.owner_reference(md, "ModelDeployment")


def deployment_name(md_name: str) -> str:
    return f"{md_name}-model"[:253]


def service_name(md_name: str) -> str:
    """A Service name is a DNS label: 63 characters at most."""
    return f"{md_name}-model"[:63].rstrip("-")


def selector_labels(md: Manifest) -> dict[str, str]:
    return {MODEL_LABEL: _field(md, "metadata.name")}


def model_labels(md: Manifest) -> dict[str, str]:
    return {
        **MANAGED_BY,
        "app.kubernetes.io/name": "gpucloud-model",
        **selector_labels(md),
        VISIBILITY_LABEL: md["spec"].get("visibility", "Private"),
    }


def _gpu_count(md: Manifest) -> int:
    count = _field(md, "spec.gpu").get("count", 1)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ManifestError(f"ModelDeployment spec.gpu.count: must be an int >= 1, got {count!r}")
    return count


def build_model_deployment(
    md: Manifest, replicas: int | None = None, resource: str = GPU_RESOURCE
) -> Manifest:
    """The Deployment serving the model. ``replicas`` is the autoscaler's decision
    (``Decision.desired``); by default ``status.replicas``, else ``spec.minReplicas``.
    Each replica requests ``spec.gpu.count`` of ``resource``, the extended resource the
    price book sells the product as (whole GPUs, a MIG profile, time-sliced shares: the
    operator resolves it as for an instance), on the nodes labelled for it
    (``gpu_kinds.node_product``: the GPU's own name for a mixed-strategy MIG resource)."""
    meta, spec = md["metadata"], _field(md, "spec")
    product = _field(md, "spec.gpu.product")
    gpus = str(_gpu_count(md))
    if replicas is None:
        replicas = (md.get("status") or {}).get("replicas", spec.get("minReplicas", 0))
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 0:
        raise ManifestError(f"replicas: must be an int >= 0, got {replicas!r}")
    labels = model_labels(md)
    container: Manifest = {
        "name": "model",
        "image": _field(md, "spec.image"),
        "env": [
            {"name": "MODEL_NAME", "value": _field(md, "spec.model")},
            {"name": "PORT", "value": str(MODEL_PORT)},
        ],
        "ports": [{"name": "http", "containerPort": MODEL_PORT, "protocol": "TCP"}],
        "resources": {"limits": {resource: gpus}, "requests": {resource: gpus}},
        "readinessProbe": {
            "httpGet": {"path": "/healthz", "port": "http"},
            "periodSeconds": 2,
            "failureThreshold": 3,
        },
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": deployment_name(meta["name"]),
            "namespace": _field(md, "metadata.namespace"),
            "labels": labels,
            "ownerReferences": [owner_reference(md)],
        },
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": selector_labels(md)},
            # A replica is billed while online: never run two for one during a rollout.
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1},
            },
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "nodeSelector": {PRODUCT_LABEL: node_product(product, resource)},
                    "tolerations": [
                        {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"},
                        {"key": "kwok.x-k8s.io/node", "operator": "Exists", "effect": "NoSchedule"},
                    ],
                    "containers": [container],
                    "terminationGracePeriodSeconds": 30,
                },
            },
        },
    }


def build_model_service(md: Manifest) -> Manifest:
    """The ClusterIP Service in front of the replicas (the gateway reads its
    EndpointSlices to route to ready replicas)."""
    meta = md["metadata"]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": service_name(meta["name"]),
            "namespace": _field(md, "metadata.namespace"),
            "labels": model_labels(md),
            "ownerReferences": [owner_reference(md)],
        },
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(md),
            "ports": [
                {"name": "http", "port": MODEL_PORT, "targetPort": "http", "protocol": "TCP"}
            ],
        },
    }
