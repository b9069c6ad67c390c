"""Our agent, in our image, as the chart installs it: it reads the kubelet's real
pod-resources socket and ships per-pod GPU-seconds to the metering API's pod."""

from __future__ import annotations

from datetime import datetime

from gpucloud.testing.kind import KindCluster
from gpucloud.testing.kindrelease import ledger_sql
from gpucloud.testing.kube import wait_for


def test_agent_meters_a_gpu_pod_through_pod_resources(
    kind: KindCluster, gpucloud_release: str, kind_namespace: str
) -> None:
    script = (
        "import os, time\nprint(os.environ['NVIDIA_VISIBLE_DEVICES'], flush=True)\ntime.sleep(20)\n"
    )
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "metered"},
        "spec": {
            "restartPolicy": "Never",
            "containers": [{
                "name": "main", "image": kind.images().ref("agent"),
                "command": ["python3", "-c", script],
                "resources": {"limits": {"nvidia.com/gpu": "2"}},
            }],
        },
    }  # fmt: skip
    kind.apply([pod], "-n", kind_namespace)

    def finished() -> bool:
        status = kind.get_json("pod", "metered", "-n", kind_namespace)["status"]
        return status.get("phase") == "Succeeded"

    wait_for(finished, timeout=120, what="the metered pod to finish")
    got = kind.get_json("pod", "metered", "-n", kind_namespace)
    uid, node = got["metadata"]["uid"], got["spec"]["nodeName"]
    allocated = set(
        kind.kubectl("logs", "metered", "-n", kind_namespace).stdout.split()[0].split(",")
    )
    running = got["status"]["containerStatuses"][0]["state"]["terminated"]
    sql = (
        "SELECT subject, node, namespace, pod_name, SUM(measure) FROM ledger_usage "
        "WHERE kind = 'gpu_time' AND owner = ? GROUP BY subject, node, namespace, pod_name"
    )

    def shipped() -> list[list]:
        rows = ledger_sql(kind, sql, uid)
        # the agent ships every few seconds: wait until both GPUs cover the run
        return rows if len(rows) == 2 and all(r[4] >= 20 for r in rows) else []

    rows = wait_for(shipped, timeout=90, interval=2, what="the agent's usage in the ledger")
    assert {r[0] for r in rows} == allocated  # the UUIDs the device plugin handed out
    assert {(r[1], r[2], r[3]) for r in rows} == {(node, kind_namespace, "metered")}
    # At least the container's life, and no more than the kubelet held the GPUs for the
    # pod: pod-resources lists a pod from its admission (scheduled, before its sandbox and
    # container start) until the kubelet records it finished (Ready turns False), and the
    # agent samples once a second on each side. Under load the sandbox alone takes seconds.
    lived = _seconds(running["startedAt"], running["finishedAt"])
    conditions = {c["type"]: c for c in got["status"]["conditions"]}
    held = _seconds(
        conditions["PodScheduled"]["lastTransitionTime"],
        conditions["Ready"]["lastTransitionTime"],
    )
    assert conditions["Ready"]["status"] == "False"
    for r in rows:
        assert lived <= r[4] + 1 and 20 <= r[4] <= held + 2, (r, lived, held)


def _seconds(start: str, end: str) -> float:
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()
