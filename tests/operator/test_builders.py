from __future__ import annotations

import pytest
from gpucloud_operator.builders import (
    build_disk_pv,
    build_disk_pvc,
    build_instance_pod,
    build_instance_pvc,
    build_local_pv,
    condition,
    gpu_summary,
    merge_conditions,
    pod_checkpoint_seconds,
    pv_name,
)
from gpucloud_operator.config import OperatorConfig

INST = {
    "apiVersion": "gpucloud.dev/v1alpha1",
    "kind": "GPUInstance",
    "metadata": {"name": "nb", "namespace": "team-a", "uid": "u-1"},
    "spec": {
        "gpu": {"product": "NVIDIA-L40S", "count": 2},
        "image": "img:1",
        "command": ["python", "train.py"],
        "billing": {"mode": "Spot"},
        "storage": {"quotaGi": 80},
    },
}


def test_pod_requests_gpus_of_the_product_and_is_owned() -> None:
    pod = build_instance_pod(INST, run=3)
    c = pod["spec"]["containers"][0]
    assert c["resources"]["limits"] == {"nvidia.com/gpu": "2"}
    assert c["command"] == ["python", "train.py"] and c["image"] == "img:1"
    assert pod["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-L40S"}
    assert pod["metadata"]["labels"]["gpucloud.dev/billing-mode"] == "Spot"
    assert pod["metadata"]["labels"]["gpucloud.dev/run"] == "3"
    owner = pod["metadata"]["ownerReferences"][0]
    assert owner["uid"] == "u-1" and owner["kind"] == "GPUInstance" and owner["controller"]
    assert pod["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == "nb-data"


def test_every_pod_has_the_preemption_notice_file_empty_until_a_notice() -> None:
    """The downward-API file shows the pod's annotation: "" at creation (a key that
    exists, so the file exists and is empty), the stop time once the operator annotates
    the pod; its path is in the container's environment."""
    pod = build_instance_pod(INST, run=1)
    assert pod["metadata"]["annotations"] == {"gpucloud.dev/preempt-at": ""}
    (notice,) = [v for v in pod["spec"]["volumes"] if "downwardAPI" in v]
    assert notice["downwardAPI"]["items"] == [
        {
            "path": "preempt-at",
            "fieldRef": {"fieldPath": "metadata.annotations['gpucloud.dev/preempt-at']"},
        }
    ]
    c = pod["spec"]["containers"][0]
    mount = next(m for m in c["volumeMounts"] if m["name"] == notice["name"])
    assert mount == {
        "name": "preemption-notice",
        "mountPath": "/etc/gpucloud/notice",
        "readOnly": True,
    }
    assert {"name": "GPUCLOUD_PREEMPT_NOTICE_FILE", "value": "/etc/gpucloud/notice/preempt-at"} in (
        c["env"]
    )
    # no checkpoint: no hook, the default grace, nothing to stop early for
    assert "lifecycle" not in c and pod["spec"]["terminationGracePeriodSeconds"] == 30
    assert pod_checkpoint_seconds(pod) == 0


def test_a_spot_checkpoint_is_the_prestop_hook_and_its_timeout_the_grace() -> None:
    spot = {"checkpoint": {"command": ["python", "save.py"], "timeoutSeconds": 45}}
    pod = build_instance_pod({**INST, "spec": {**INST["spec"], "spot": spot}}, run=1)
    c = pod["spec"]["containers"][0]
    assert c["lifecycle"] == {"preStop": {"exec": {"command": ["python", "save.py"]}}}
    assert pod["spec"]["terminationGracePeriodSeconds"] == 45
    assert pod_checkpoint_seconds(pod) == 45
    # the CRD's default timeout when the object was written around the API server
    spot = {"checkpoint": {"command": ["sync"]}, "resume": True}
    pod = build_instance_pod({**INST, "spec": {**INST["spec"], "spot": spot}}, run=1)
    assert pod["spec"]["terminationGracePeriodSeconds"] == 30 == pod_checkpoint_seconds(pod)


def test_claim_is_prebound_to_a_local_volume_on_the_node() -> None:
    pvc = build_instance_pvc(INST)
    pv = build_local_pv(INST, "gpu-l40s-0")
    assert pvc["spec"]["volumeName"] == pv["metadata"]["name"] == pv_name("u-1")
    assert pvc["spec"]["resources"]["requests"]["storage"] == "80Gi"
    assert pv["spec"]["capacity"]["storage"] == "80Gi"
    assert pv["spec"]["claimRef"] == {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "namespace": "team-a",
        "name": "nb-data",
    }
    term = pv["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"][0]
    assert term["matchExpressions"][0]["values"] == ["gpu-l40s-0"]
    assert "ownerReferences" not in pv["metadata"]  # cluster-scoped: the finalizer deletes it
    assert pvc["metadata"]["ownerReferences"][0]["uid"] == "u-1"


def test_summary_and_conditions() -> None:
    assert gpu_summary("NVIDIA-L40S", 2) == "NVIDIA-L40S x2"
    old = [condition("Ready", False, "Pending", "x", "2026-01-01T00:00:00Z")]
    same = merge_conditions(old, [condition("Ready", False, "Other", "y", "2026-01-02T00:00:00Z")])
    assert same[0]["lastTransitionTime"] == "2026-01-01T00:00:00Z" and same[0]["reason"] == "Other"
    flip = merge_conditions(old, [condition("Ready", True, "Running", "z", "2026-01-02T00:00:00Z")])
    assert flip[0]["lastTransitionTime"] == "2026-01-02T00:00:00Z"


DISK = {
    "apiVersion": "gpucloud.dev/v1alpha1",
    "kind": "CloudDisk",
    "metadata": {"name": "scratch", "namespace": "team-a", "uid": "d-1"},
    "spec": {"capacityGi": 20},
}


def test_attached_disks_are_mounted_under_root_disks() -> None:
    pod = build_instance_pod({**INST, "spec": {**INST["spec"], "cloudDisks": ["scratch", "ds"]}}, 1)
    vols = pod["spec"]["volumes"]
    assert [v["persistentVolumeClaim"]["claimName"] for v in vols[:-1]] == [
        "nb-data",
        "scratch-clouddisk",
        "ds-clouddisk",
    ]
    mounts = {m["name"]: m["mountPath"] for m in pod["spec"]["containers"][0]["volumeMounts"]}
    assert mounts == {
        "data": "/root/data",
        "cloud-disk-0": "/root/disks/scratch",
        "cloud-disk-1": "/root/disks/ds",
        "preemption-notice": "/etc/gpucloud/notice",
    }
    assert {v["name"] for v in vols} == set(mounts)  # every volume mounted, names unique
    assert len(build_instance_pod(INST, 1)["spec"]["volumes"]) == 2  # none attached


def test_disk_volume_is_shared_hostpath_of_the_data_root_prebound_to_its_claim() -> None:
    pv = build_disk_pv(DISK, data_root="/srv/gpucloud/")
    spec = pv["spec"]
    assert pv["metadata"]["name"] == "gpucloud-disk-d-1"
    assert spec["hostPath"]["path"] == "/srv/gpucloud/disks/team-a/scratch"
    assert spec["accessModes"] == ["ReadWriteMany"] and "nodeAffinity" not in spec
    assert spec["capacity"] == {"storage": "20Gi"}
    assert spec["persistentVolumeReclaimPolicy"] == "Retain" and "nfs" not in spec
    assert spec["claimRef"]["namespace"] == "team-a"
    pvc = build_disk_pvc(DISK)
    assert spec["claimRef"]["name"] == pvc["metadata"]["name"] == "scratch-clouddisk"
    assert pvc["spec"]["volumeName"] == pv["metadata"]["name"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["spec"]["storageClassName"] == spec["storageClassName"]
    assert pvc["spec"]["resources"]["requests"]["storage"] == "20Gi"
    owner = pvc["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["uid"]) == ("CloudDisk", "d-1")


def test_disk_volume_on_nfs_and_its_settings() -> None:
    pv = build_disk_pv(DISK, data_root="/var/lib/gpucloud", nfs_server="10.0.0.5")
    assert pv["spec"]["nfs"] == {
        "server": "10.0.0.5",
        "path": "/var/lib/gpucloud/disks/team-a/scratch",
    }
    assert "hostPath" not in pv["spec"]
    pv = build_disk_pv(DISK, data_root="/x", nfs_server="nas", nfs_path="/export/gpucloud")
    assert pv["spec"]["nfs"]["path"] == "/export/gpucloud/disks/team-a/scratch"
    cfg = OperatorConfig.from_env({"GPUCLOUD_OPERATOR_DISK_NFS_SERVER": "nas"})
    assert (cfg.disk_nfs_server, cfg.disk_nfs_path) == ("nas", "")
    with pytest.raises(ValueError, match="unknown operator setting"):
        OperatorConfig().with_overrides({"disk_nfs": "nas"})


def test_long_disk_names_make_valid_labels() -> None:
    long = "a" * 62 + ".b" + "c" * 30
    pv = build_disk_pv({**DISK, "metadata": {**DISK["metadata"], "name": long}}, data_root="/d")
    value = pv["metadata"]["labels"]["gpucloud.dev/clouddisk"]
    assert len(value) <= 63 and value[-1].isalnum()


@pytest.mark.parametrize(
    ("product", "resource", "label"),
    [
        # mixed strategy: the MIG resource; nodes keep the GPU's own product label
        ("NVIDIA-H100-80GB-HBM3-MIG-1g.10gb", "nvidia.com/mig-1g.10gb", "NVIDIA-H100-80GB-HBM3"),
        # single strategy: nvidia.com/gpu on nodes labelled with the profile
        ("NVIDIA-H100-80GB-HBM3-MIG-1g.10gb", "nvidia.com/gpu",
         "NVIDIA-H100-80GB-HBM3-MIG-1g.10gb"),
        # time-slicing, renameByDefault: nodes labelled <GPU>-SHARED
        ("NVIDIA-H100-80GB-HBM3-SHARED", "nvidia.com/gpu.shared", "NVIDIA-H100-80GB-HBM3-SHARED"),
    ],
)  # fmt: skip
def test_a_fractional_product_requests_its_resource_on_its_nodes(
    product: str, resource: str, label: str
) -> None:
    inst = {**INST, "spec": {**INST["spec"], "gpu": {"product": product, "count": 1}}}
    pod = build_instance_pod(inst, run=1, resource=resource)
    res = pod["spec"]["containers"][0]["resources"]
    assert res["limits"] == res["requests"] == {resource: "1"}
    assert pod["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": label}
