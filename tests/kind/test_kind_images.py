"""An Image on the kind tier, through real pods: a stopped instance's data (a file its
pod wrote) is copied into ``images/<ns>/<name>`` on the node that ran it, by that
node's agent pod, and the Image is Ready with the agent's measured bytes and an open
image meter bound to that node; deleting it has the same agent remove the folder."""

from __future__ import annotations

from gpucloud.testing.kindrelease import KindHarness

L40S = "NVIDIA-L40S"
GI = "gpuinstances"


def _sh(h: KindHarness, node: str, script: str) -> str:
    return h.kind.docker_exec(node, "sh", "-c", script).strip()


def test_image_of_a_stopped_instance_is_made_on_its_node(h: KindHarness) -> None:
    h.pay_online("topup", "20.00")
    h.instance("nb", L40S, 1, ["sh", "-c", "echo mine > /root/data/f; exec sleep 86400"])
    node = h.wait_phase(GI, "nb", "Running")["node"]
    data = f"/var/lib/gpucloud/instances/{h.ns}/nb"
    h.wait(lambda: _sh(h, node, f"cat {data}/f 2>/dev/null || true") == "mine", "the file")
    h.patch_spec("GPUInstance", "nb", {"state": "Stopped"})
    h.wait_phase(GI, "nb", "Stopped")
    h.wait(lambda: h.pod("nb") is None, "the pod to go")
    h.apply("Image", "bak", {"sourceInstance": "nb"})
    st = h.wait_phase("images", "bak", "Ready", timeout=240)
    assert st["node"] == node and st["usedBytes"] > 0 and "ImageCreated" in h.events("bak")
    image = f"/var/lib/gpucloud/images/{h.ns}/bak"
    assert _sh(h, node, f"cat {image}/f") == "mine"
    assert _sh(h, node, f"ls -A /var/lib/gpucloud/images/{h.ns}") == "bak"  # no partial
    nodes = h.kind.kubectl("get", "nodes", "-o", "jsonpath={.items[*].metadata.name}").stdout
    for other in set(nodes.split()) - {node}:  # made only where the data was
        assert _sh(h, other, f"test -e {image} && echo yes || echo no") == "no"
    ((kind, meter_node, max_bytes, closed),) = h.sql(
        "SELECT kind, node, max_bytes, closed_at FROM ledger_meters WHERE meter_id = ?",
        st["meterId"],
    )
    assert (kind, meter_node, closed) == ("image", node, None) and max_bytes >= st["usedBytes"]
    ((outcome, used),) = h.sql(
        "SELECT outcome, bytes_used FROM ledger_image_copies WHERE path = ?",
        f"images/{h.ns}/bak",
    )
    assert (outcome, used) == ("copied", st["usedBytes"])
    # deleted: the same node's agent removes the folder, the instance's data stays
    h.tenant_kubectl("delete", "image", "bak", "-n", h.ns)
    h.wait(
        lambda: _sh(h, node, f"test -e {image} && echo yes || echo no") == "no",
        "the agent to remove the image folder",
        timeout=180,
    )
    assert _sh(h, node, f"cat {data}/f") == "mine"
