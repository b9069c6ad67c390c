"""A spec the CRD models refuse is refused like any other: Ready False, reason
InvalidSpec, a message naming the field and the rule, a Warning event."""

from __future__ import annotations

from opworld import World


def test_instance_with_a_spec_the_model_refuses_is_refused(world: World) -> None:
    world.fund(100_000)
    world.instance("bad", "NVIDIA-A100-SXM4-80GB", mode="Package")  # no period
    world.tick("bad")
    st = world.status("bad")
    assert st["phase"] == "Refused"
    assert st["message"].startswith("spec.billing.period: period is required when mode")
    (ready,) = [c for c in st["conditions"] if c["type"] == "Ready"]
    assert (ready["status"], ready["reason"]) == ("False", "InvalidSpec")
    assert "InvalidSpec" in world.kube.reasons("bad")
