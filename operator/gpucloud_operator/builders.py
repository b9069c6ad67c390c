"""Pure manifest builders: dicts in, dicts out, no API calls.

An instance owns a pod (while it runs) and a PersistentVolumeClaim (until it is
released); both carry an owner reference so Kubernetes' garbage collector removes them
with the instance. The PersistentVolume is cluster-scoped (a namespaced owner is not
allowed) and is deleted by the release finalizer. The test bed runs no storage
provisioner, so the volume is a *local* PersistentVolume pinned to the node chosen at the
first placement; the claim is pre-bound to it, which makes the scheduler keep the
instance on the node that holds its data.

A CloudDisk is network storage under the operator's shared data root
(``<data_root>/disks/<ns>/<name>``): a ReadWriteMany PersistentVolume without node
affinity (hostPath of the shared root on the single-host test bed, NFS on a real cluster)
and a claim pre-bound to it in the tenant's namespace, mounted into the pods of the
instances that list the disk in ``spec.cloudDisks``.
"""

from __future__ import annotations

from typing import Any

from gpucloud import kube_names
from gpucloud.crd.gpuinstance import Checkpoint
from gpucloud.gpu_kinds import node_product
from gpucloud.kube_names import GPU_RESOURCE, MANAGED_BY, PRODUCT_LABEL

INSTANCE_LABEL = "gpucloud.dev/instance"
MODE_LABEL = "gpucloud.dev/billing-mode"
RUN_LABEL = "gpucloud.dev/run"
STORAGE_CLASS = "gpucloud-local"
# The agent measures <disk-root>/instances/<namespace>/<name> (agent/gpucloud_agent/disk.py)
# with disk-root /var/lib/gpucloud: the volume path must be exactly that.
DATA_ROOT = "/var/lib/gpucloud/instances"
DATA_MOUNT = "/root/data"
DISK_MOUNT = "/root/disks"  # each attached cloud disk at /root/disks/<name>
DISK_LABEL = "gpucloud.dev/clouddisk"
# The preemption notice inside the pod (docs/spot.md): a downward-API file that shows the
# pod's annotation, empty until a notice, then the RFC 3339 stop time. The kubelet
# refreshes such files when the annotation changes (env vars would stay as they were).
NOTICE_ANNOTATION = "gpucloud.dev/preempt-at"
NOTICE_DIR = "/etc/gpucloud/notice"
NOTICE_FILE = "preempt-at"
NOTICE_ENV = "GPUCLOUD_PREEMPT_NOTICE_FILE"
NOTICE_VOLUME = "preemption-notice"
DEFAULT_TERMINATION_GRACE_S = 30
DISK_STORAGE_CLASS = "gpucloud-disk"

Manifest = dict[str, Any]


def owner_reference(owner: Manifest) -> Manifest:
    return kube_names.owner_reference(owner, "GPUInstance")


def pod_name(instance_name: str) -> str:
    return f"{instance_name}-gpu"[:253]


def pvc_name(instance_name: str) -> str:
    return f"{instance_name}-data"[:253]


def pv_name(instance_uid: str) -> str:
    """Cluster-unique: instance names repeat across namespaces, UIDs do not."""
    return f"gpucloud-{instance_uid}"


def label_value(name: str) -> str:
    """A label value holds 63 characters and ends alphanumeric; object names may be longer."""
    return name[:63].rstrip("-.")


def disk_pvc_name(disk_name: str) -> str:
    """ "-clouddisk" never collides with an instance claim ("-data")."""
    return f"{disk_name}-clouddisk"[:253]


def disk_pv_name(disk_uid: str) -> str:
    return f"gpucloud-disk-{disk_uid}"


def instance_labels(instance: Manifest) -> dict[str, str]:
    spec = instance["spec"]
    return {
        **MANAGED_BY,
        INSTANCE_LABEL: instance["metadata"]["name"],
        MODE_LABEL: spec["billing"]["mode"],
    }


def gpu_summary(product: str, count: int) -> str:
    """What ``kubectl get`` shows in the GPU column: "NVIDIA-L40S x2"."""
    return f"{product} x{count}"


def build_instance_pod(instance: Manifest, run: int, resource: str = GPU_RESOURCE) -> Manifest:
    """The pod of one run of an instance: its product's ``resource`` (whole GPUs, a MIG
    profile, time-sliced shares) as limits, its nodes' product label as a node selector,
    the instance volume and the preemption notice file mounted, a spot checkpoint as the
    container's preStop hook (its timeout as the pod's termination grace period), and no
    restarts of a finished container (a stop is decided by the operator, not by the
    kubelet)."""
    meta, spec = instance["metadata"], instance["spec"]
    gpu = spec["gpu"]
    notice_path = f"{NOTICE_DIR}/{NOTICE_FILE}"
    container: Manifest = {
        "name": "main",
        "image": spec.get("image") or "nvcr.io/nvidia/pytorch:24.08-py3",
        "resources": {
            "limits": {resource: str(gpu.get("count", 1))},
            "requests": {resource: str(gpu.get("count", 1))},
        },
        "volumeMounts": [{"name": "data", "mountPath": DATA_MOUNT}],
        "env": [{"name": NOTICE_ENV, "value": notice_path}],
    }
    if spec.get("command"):
        container["command"] = list(spec["command"])
    grace_s = DEFAULT_TERMINATION_GRACE_S
    checkpoint = (spec.get("spot") or {}).get("checkpoint")
    if checkpoint:
        container["lifecycle"] = {"preStop": {"exec": {"command": list(checkpoint["command"])}}}
        grace_s = checkpoint_seconds(spec)
    volumes: list[Manifest] = [
        {"name": "data", "persistentVolumeClaim": {"claimName": pvc_name(meta["name"])}}
    ]
    # volume names are DNS labels of at most 63 characters: numbered, not named after the disk
    for i, disk in enumerate(spec.get("cloudDisks") or []):
        volumes.append(
            {"name": f"cloud-disk-{i}", "persistentVolumeClaim": {"claimName": disk_pvc_name(disk)}}
        )
        container["volumeMounts"].append(
            {"name": f"cloud-disk-{i}", "mountPath": f"{DISK_MOUNT}/{disk}"}
        )
    volumes.append(notice_volume())
    container["volumeMounts"].append(
        {"name": NOTICE_VOLUME, "mountPath": NOTICE_DIR, "readOnly": True}
    )
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod_name(meta["name"]),
            "namespace": meta["namespace"],
            "labels": {**instance_labels(instance), RUN_LABEL: str(run)},
            # empty until a preemption notice: the notice file reads "" (not a missing key)
            "annotations": {NOTICE_ANNOTATION: ""},
            "ownerReferences": [owner_reference(instance)],
        },
        "spec": {
            "restartPolicy": "Always",
            "nodeSelector": {PRODUCT_LABEL: node_product(gpu["product"], resource)},
            "tolerations": [
                {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"},
                # kwok's fake nodes carry this taint in some setups
                {"key": "kwok.x-k8s.io/node", "operator": "Exists", "effect": "NoSchedule"},
            ],
            "containers": [container],
            "volumes": volumes,
            "terminationGracePeriodSeconds": grace_s,
        },
    }


def notice_volume() -> Manifest:
    """The downward-API volume holding the preemption notice file."""
    field = f"metadata.annotations['{NOTICE_ANNOTATION}']"
    return {
        "name": NOTICE_VOLUME,
        "downwardAPI": {"items": [{"path": NOTICE_FILE, "fieldRef": {"fieldPath": field}}]},
    }


def pod_checkpoint_seconds(pod: Manifest) -> int:
    """How long before its stop time a run's pod must be asked to stop: its termination
    grace period when a container has a preStop hook (the checkpoint), else 0. Read from
    the pod, not the spec: spec changes apply at the next start."""
    spec = pod.get("spec") or {}
    if not any((c.get("lifecycle") or {}).get("preStop") for c in spec.get("containers") or []):
        return 0
    return int(spec.get("terminationGracePeriodSeconds") or 0)


def checkpoint_seconds(spec: Manifest) -> int:
    """The spot checkpoint's timeout in seconds (the CRD's default when not given); 0
    without a checkpoint."""
    checkpoint = (spec.get("spot") or {}).get("checkpoint")
    if not checkpoint:
        return 0
    return int(checkpoint.get("timeoutSeconds", Checkpoint.model_fields["timeout_seconds"].default))


def _prebound_pvc(
    name: str,
    namespace: str,
    labels: Manifest,
    owner: Manifest,
    *,
    pv: str,
    gi: int,
    mode: str,
    storage_class: str,
) -> Manifest:
    """A claim pre-bound to the volume ``pv`` (the operator makes both, no provisioner)."""
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": labels,
            "ownerReferences": [owner],
        },
        "spec": {
            "accessModes": [mode],
            "storageClassName": storage_class,
            "volumeName": pv,
            "resources": {"requests": {"storage": f"{gi}Gi"}},
        },
    }


def _prebound_pv(
    name: str,
    labels: Manifest,
    source: Manifest,
    *,
    claim: tuple[str, str],
    gi: int,
    mode: str,
    storage_class: str,
) -> Manifest:
    """A Retain volume of ``gi`` GiB reserved for the claim ``(namespace, name)``;
    ``source`` holds the volume source (and node affinity, for local volumes)."""
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "capacity": {"storage": f"{gi}Gi"},
            "accessModes": [mode],
            "persistentVolumeReclaimPolicy": "Retain",
            "storageClassName": storage_class,
            "volumeMode": "Filesystem",
            **source,
            "claimRef": {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "namespace": claim[0],
                "name": claim[1],
            },
        },
    }


def _quota_gi(instance: Manifest) -> int:
    return int(instance["spec"].get("storage", {}).get("quotaGi", 50))


def build_instance_pvc(instance: Manifest) -> Manifest:
    """The claim on the instance's storage quota, pre-bound to its local volume."""
    meta = instance["metadata"]
    return _prebound_pvc(
        pvc_name(meta["name"]),
        meta["namespace"],
        {**MANAGED_BY, INSTANCE_LABEL: meta["name"]},
        owner_reference(instance),
        pv=pv_name(meta["uid"]),
        gi=_quota_gi(instance),
        mode="ReadWriteOnce",
        storage_class=STORAGE_CLASS,
    )


def build_local_pv(instance: Manifest, node: str) -> Manifest:
    """A node-local PersistentVolume of the quota on ``node``, reserved for the instance's
    claim. Retain: the operator deletes it (and the data) only on release.

    A hostPath volume pinned to the node, not a ``local`` one: the kubelet creates the
    folder on the first mount (DirectoryOrCreate), where a ``local`` volume needs it to
    exist already and nothing of ours runs on the node before the pod to make it. Only
    the operator creates PersistentVolumes; tenants cannot name a host path."""
    meta = instance["metadata"]
    on_node = {"key": "kubernetes.io/hostname", "operator": "In", "values": [node]}
    source = {
        "hostPath": {
            "path": f"{DATA_ROOT}/{meta['namespace']}/{meta['name']}",
            "type": "DirectoryOrCreate",
        },
        "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [on_node]}]}},
    }
    labels = {
        **MANAGED_BY,
        INSTANCE_LABEL: meta["name"],
        "gpucloud.dev/namespace": meta["namespace"],
    }
    return _prebound_pv(
        pv_name(meta["uid"]),
        labels,
        source,
        claim=(meta["namespace"], pvc_name(meta["name"])),
        gi=_quota_gi(instance),
        mode="ReadWriteOnce",
        storage_class=STORAGE_CLASS,
    )


def build_disk_pv(
    disk: Manifest, *, data_root: str, nfs_server: str = "", nfs_path: str = ""
) -> Manifest:
    """The ReadWriteMany volume of a CloudDisk: ``<data_root>/disks/<ns>/<name>`` as a
    hostPath (the operator's shared data root on a single host), or, with ``nfs_server``,
    the same folder under the NFS export ``nfs_path`` of that root. No node affinity:
    network storage attaches on any node. Retain: the operator deletes it with the disk."""
    meta = disk["metadata"]
    rel = f"disks/{meta['namespace']}/{meta['name']}"
    source: Manifest
    if nfs_server:
        root = (nfs_path or data_root).rstrip("/")
        source = {"nfs": {"server": nfs_server, "path": f"{root}/{rel}"}}
    else:
        source = {
            "hostPath": {"path": f"{data_root.rstrip('/')}/{rel}", "type": "DirectoryOrCreate"}
        }
    labels = {
        **MANAGED_BY,
        DISK_LABEL: label_value(meta["name"]),
        "gpucloud.dev/namespace": meta["namespace"],
    }
    return _prebound_pv(
        disk_pv_name(meta["uid"]),
        labels,
        source,
        claim=(meta["namespace"], disk_pvc_name(meta["name"])),
        gi=int(disk["spec"]["capacityGi"]),
        mode="ReadWriteMany",
        storage_class=DISK_STORAGE_CLASS,
    )


def build_disk_pvc(disk: Manifest) -> Manifest:
    """The tenant's claim on a CloudDisk, pre-bound to its volume and owned by the disk."""
    meta = disk["metadata"]
    return _prebound_pvc(
        disk_pvc_name(meta["name"]),
        meta["namespace"],
        {**MANAGED_BY, DISK_LABEL: label_value(meta["name"])},
        owner_reference({"kind": "CloudDisk", **disk}),
        pv=disk_pv_name(meta["uid"]),
        gi=int(disk["spec"]["capacityGi"]),
        mode="ReadWriteMany",
        storage_class=DISK_STORAGE_CLASS,
    )


def condition(type_: str, status: bool | str, reason: str, message: str, now_iso: str) -> Manifest:
    value = status if isinstance(status, str) else ("True" if status else "False")
    return {
        "type": type_,
        "status": value,
        "reason": reason,
        "message": message,
        "lastTransitionTime": now_iso,
    }


def merge_conditions(old: list[Manifest] | None, new: list[Manifest]) -> list[Manifest]:
    """Replace conditions by type, keeping lastTransitionTime when the status is unchanged."""
    by_type = {c["type"]: c for c in old or []}
    for cond in new:
        prev = by_type.get(cond["type"])
        if prev is not None and prev.get("status") == cond["status"]:
            cond = {**cond, "lastTransitionTime": prev["lastTransitionTime"]}
        by_type[cond["type"]] = cond
    return sorted(by_type.values(), key=lambda c: c["type"])
