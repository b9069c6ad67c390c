from __future__ import annotations

from gpucloud_operator.builders import (
    build_instance_pod,
    build_instance_pvc,
    build_local_pv,
    condition,
    gpu_summary,
    merge_conditions,
    pv_name,
)

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
