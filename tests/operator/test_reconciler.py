"""The instance reconciler against a real SQLite ledger and an in-memory API double:
every money figure is checked to the fen against the billing core's arithmetic."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

from opworld import NS, World

from gpucloud.billing import to_minor

L40S = "NVIDIA-L40S"
A100 = "NVIDIA-A100-SXM4-80GB"


def charges(w: World) -> int:
    return -sum(e.amount_minor for e in w.ledger.entries("acme", limit=1000) if e.amount_minor < 0)


def test_payg_start_stop_bills_control_plane_time_after_grace(world: World) -> None:
    w = world
    w.fund(100_00)
    w.instance("nb", L40S, 2)
    w.tick()
    st = w.status("nb")
    assert st["phase"] == "Running" and st["node"] == "gpu-l40s-0"
    assert st["gpuSummary"] == "NVIDIA-L40S x2" and st["billingMode"] == "PayAsYouGo"
    assert w.ledger.get_meter(st["meterId"]).closed_at is None
    assert charges(w) == 0  # nothing charged upfront
    w.clock.advance(1000)
    w.kube.update_spec("gpuinstances", NS, "nb", {"state": "Stopped"})
    w.tick()
    st = w.status("nb")
    assert st["phase"] == "Stopped" and ("team-a", "nb-gpu") not in w.kube.pods
    assert st["unsettledMeters"]  # waiting for agents' usage
    assert charges(w) == 0
    w.clock.advance(61)
    w.tick()
    expected = to_minor(Decimal("5.20") * 2 * 1000 / 3600)  # 2.888.. -> 2.89
    assert charges(w) == expected == 289
    entry = next(e for e in w.ledger.entries("acme") if e.key.startswith("meter-fallback:"))
    assert "control-plane timestamps" in entry.memo
    assert "unsettledMeters" not in w.status("nb")
    assert w.status("nb")["accruedCost"] == "2.89"
    # storage: the first clock hour is settled once it is complete, running or not
    w.clock.advance(3600)
    w.tick()
    w.tick()
    assert charges(w) == 289 + to_minor(Decimal("0.0004") * 50)
    assert w.ledger.balance("acme") == 100_00 - 291


def test_refusals_cost_nothing(world: World) -> None:
    w = world
    w.fund(10_00)  # one hour of 2 x A100 is 19.60 + storage
    w.instance("big", A100, 2)
    w.instance("odd", "NVIDIA-B200", 1)
    w.instance("shares", "NVIDIA-H100-80GB-HBM3-SHARED", 2)
    w.tick()
    st = w.status("big")
    assert st["phase"] == "Refused"
    cond = next(c for c in st["conditions"] if c["type"] == "Ready")
    assert cond["reason"] == "InsufficientBalance" and "19.62 CNY" in cond["message"]
    assert w.status("odd")["phase"] == "Refused"
    assert "NVIDIA-B200" in w.status("odd")["message"]
    shares = w.status("shares")
    assert shares["phase"] == "Refused" and "SharedGPUCount" in w.kube.reasons("shares")
    assert shares["message"] == (
        "spec.gpu.count: NVIDIA-H100-80GB-HBM3-SHARED is a time-sliced share of a GPU; an "
        "instance takes exactly 1, not 2"
    )
    assert not w.kube.pods and charges(w) == 0


def test_instance_limit(world: World) -> None:
    w = world
    w.kube.cluster[("accounts", "acme")]["spec"]["instanceLimit"] = 1
    w.fund(1000_00)
    w.instance("one", L40S)
    w.tick("one")
    w.instance("two", L40S)
    w.tick("two")
    assert w.status("one")["phase"] == "Running"
    st = w.status("two")
    assert st["phase"] == "Refused" and "instanceLimit is 1" in st["message"]


def test_package_purchase_reminder_expiry(world: World) -> None:
    w = world
    w.fund(300_00)
    w.instance("pkg", L40S, 1, mode="Package", period="Day")
    w.tick()
    st = w.status("pkg")
    assert st["phase"] == "Running" and charges(w) == 112_00
    assert st["packageExpiresAt"] == "2026-01-02T00:00:00Z"
    assert "PackageExpiring" in w.kube.reasons("pkg")  # a day package: 7 days or less left
    w.tick()
    assert w.kube.reasons("pkg").count("PackageExpiring") == 1  # once per term
    w.clock.advance(timedelta(hours=24))
    w.tick()
    st = w.status("pkg")
    assert st["phase"] == "Expired" and ("team-a", "pkg-gpu") not in w.kube.pods
    assert charges(w) == 112_00  # storage was included in the term
    w.clock.advance(timedelta(hours=2))
    w.tick()
    assert charges(w) == 112_00 + 2 * 2  # then billed hourly by quota
    assert w.status("pkg")["phase"] == "Expired"  # stays down until the spec changes


def test_package_auto_renew_then_failure(world: World) -> None:
    w = world
    w.fund(300_00)
    w.instance("pkg", L40S, 1, mode="Package", period="Day", autoRenew=True)
    w.tick()
    w.clock.advance(timedelta(hours=24))
    w.tick()
    st = w.status("pkg")
    assert st["phase"] == "Running" and len(st["packageTerms"]) == 2
    assert st["packageTerms"][1]["start"] == "2026-01-02T00:00:00Z"
    assert charges(w) == 224_00
    w.clock.advance(timedelta(hours=24))
    w.tick()
    st = w.status("pkg")
    assert st["phase"] == "Expired" and "RenewalFailed" in w.kube.reasons("pkg")
    assert charges(w) == 224_00


def test_switch_package_to_payg_refunds_the_rest(world: World) -> None:
    w = world
    w.fund(300_00)
    w.instance("pkg", L40S, 1, mode="Package", period="Day")
    w.tick()
    w.clock.advance(timedelta(hours=2))
    w.kube.update_spec("gpuinstances", NS, "pkg", {"billing": {"mode": "PayAsYouGo"}})
    w.tick()
    st = w.status("pkg")
    assert st["billingMode"] == "PayAsYouGo" and st["meterId"]
    refund = next(e for e in w.ledger.entries("acme") if e.key.startswith("package-refund:"))
    assert refund.amount_minor == 112_00 - to_minor(Decimal("5.20") * 2)


def test_spot_preempted_after_grace_by_payg(world: World) -> None:
    w = world
    w.fund(1000_00)
    w.instance("spot", L40S, 4, mode="Spot")
    w.tick()
    assert w.status("spot")["phase"] == "Running"
    w.clock.advance(600)
    w.instance("payg", L40S, 2)
    w.tick()
    assert w.status("payg")["phase"] == "Pending"
    spot = w.status("spot")
    assert spot["phase"] == "Running" and spot["preemptAt"] == "2026-01-01T00:12:00Z"
    assert "PreemptionNotice" in w.kube.reasons("spot")
    w.clock.advance(119)
    w.tick()
    assert w.status("spot")["phase"] == "Running"  # the grace period is honoured
    w.clock.advance(1)
    w.tick()
    assert w.status("spot")["phase"] == "Preempted"
    assert w.status("payg")["phase"] == "Running"
    w.clock.advance(60)
    w.tick()
    # spot billed 720 s x 4 GPUs at 2.60, nothing after the stop
    assert charges(w) == to_minor(Decimal("2.60") * 4 * 720 / 3600) == 208


def test_restart_mid_stop_and_mid_settlement_charges_once(world: World) -> None:
    w = world
    w.fund(100_00)
    w.instance("nb", L40S, 1)
    w.tick()
    w.clock.advance(500)
    # a stop interrupted right after it was persisted (SIGKILL): the pod still exists
    w.kube.patch_status(
        "gpuinstances", NS, "nb", {"phase": "Stopping", "stoppedAt": "2026-01-01T00:08:20Z"}
    )
    w.kube.update_spec("gpuinstances", NS, "nb", {"state": "Stopped"})
    w.clock.advance(100)  # the restart happens later; the stop instant must not move
    w.restart()
    w.tick()
    assert w.status("nb")["phase"] == "Stopped"
    w.clock.advance(60)
    w.tick()
    first = charges(w)
    assert first == to_minor(Decimal("5.20") * 500 / 3600) == 72
    # the settlement was posted but its status patch lost: replays post nothing new
    meter = w.ledger.meters("acme")[0].meter_id
    w.kube.patch_status("gpuinstances", NS, "nb", {"unsettledMeters": [meter]})
    w.restart()
    w.tick()
    assert charges(w) == first


def test_release_settles_then_deletes_everything(world: World) -> None:
    w = world
    w.fund(100_00)
    w.instance("nb", L40S, 1)
    w.tick()
    node = w.status("nb")["node"]
    w.clock.advance(1800)
    inst = w.kube.instance(NS, "nb")
    assert w.rec.release(inst) is False  # the last run waits for agents' usage
    assert ("team-a", "nb-gpu") not in w.kube.pods
    w.clock.advance(60)
    assert w.rec.release(w.kube.instance(NS, "nb")) is True
    assert not w.kube.pvs and not w.kube.pvcs
    gpu = to_minor(Decimal("5.20") * 1800 / 3600)
    storage = to_minor(Decimal("0.0004") * 50 * Decimal(1800) / 3600)  # 0.01
    assert charges(w) == gpu + storage
    st = w.status("nb")
    assert st["phase"] == "Released"
    # the data: the agent of the volume's node is asked to remove the folder
    (wipe,) = w.ledger.pending_wipes(node)
    assert wipe.path == "instances/team-a/nb" and node in st["message"]
    # a new instance of the same name waits for that wipe before placing a volume there
    del w.kube.namespaced[("gpuinstances", NS, "nb")]
    w.instance("nb", L40S, 1)
    w.tick()
    assert ("team-a", "nb-gpu") not in w.kube.pods and not w.kube.pvs
    assert "waiting for the agent" in w.status("nb")["message"]
    w.ledger.complete_wipe(wipe.id, wipe.node, 0, w.clock.now())
    w.tick()
    assert ("team-a", "nb-gpu") in w.kube.pods


def test_restart_while_running_reopens_the_same_meter(world: World) -> None:
    w = world
    w.fund(100_00)
    w.instance("nb", L40S, 1)
    w.tick()
    meter = w.status("nb")["meterId"]
    w.clock.advance(100)
    w.restart()
    w.tick()  # open_meter again with the same terms: the same meter
    assert w.status("nb")["meterId"] == meter and len(w.ledger.meters("acme")) == 1
    assert w.status("nb")["accruedCost"] == "0.14"  # 5.20 x 100 s, still unposted


def test_switch_of_a_stopped_package_refunds_at_once(world: World) -> None:
    w = world
    w.fund(300_00)
    w.instance("pkg", L40S, 1, mode="Package", period="Day")
    w.tick()
    w.kube.update_spec("gpuinstances", NS, "pkg", {"state": "Stopped"})
    w.clock.advance(3600)
    w.tick()
    w.kube.update_spec("gpuinstances", NS, "pkg", {"billing": {"mode": "Spot"}})
    w.tick()
    refund = next(e for e in w.ledger.entries("acme") if e.key.startswith("package-refund:"))
    assert refund.amount_minor == 112_00 - 5_20  # one hour used, at the pay-as-you-go rate
    assert w.status("pkg")["billingMode"] == "Spot" and w.status("pkg")["phase"] == "Stopped"


def test_modes_a_product_is_not_offered_in_are_refused_not_crashed(world: World) -> None:
    """PriceBook products may leave out spot, packages and the model price (docs and
    CRD agree): a start in a mode not offered is refused naming the rule; a switch to
    one leaves the running instance billed as it was, saying why."""
    w = world
    pb = w.kube.cluster[("pricebooks", "default")]
    l40s = next(g for g in pb["spec"]["gpus"] if g["product"] == L40S)
    for field in ("spotPerHour", "packages", "modelOnlinePerHour"):
        del l40s[field]
    w.fund(1000_00)
    w.instance("spot", L40S, 1, mode="Spot")
    w.instance("pkg", L40S, 1, mode="Package", period="Week")
    w.instance("nb", L40S, 1)
    w.tick()
    assert w.status("spot")["phase"] == "Refused"
    assert w.status("spot")["message"] == (
        "spec.billing: spot is not offered for GPU product 'NVIDIA-L40S'"
    )
    assert w.status("pkg")["phase"] == "Refused"
    assert "a week package is not offered" in w.status("pkg")["message"]
    assert w.status("nb")["phase"] == "Running"
    w.kube.update_spec("gpuinstances", NS, "nb", {"billing": {"mode": "Spot"}})
    w.tick()
    st = w.status("nb")
    assert st["phase"] == "Running" and st["billingMode"] == "PayAsYouGo"
    billing = next(c for c in st["conditions"] if c["type"] == "Billing")
    assert billing["status"] == "False" and billing["reason"] == "NotOffered"
    assert w.kube.reasons("nb").count("NotOffered") == 1  # said once


def test_a_lagging_pods_view_never_stops_a_running_instance(world: World) -> None:
    """The tick asks the pods' watch-fed view; a pod the view has not seen yet is read
    again, not taken for gone. A pod really gone stops the run."""
    w = world
    w.fund(100_00)
    w.instance("nb", L40S, 1)
    w.tick()
    assert w.status("nb")["phase"] == "Running"
    w.kube.unseen_pods.add((NS, "nb-gpu"))
    w.clock.advance(30)
    w.tick()
    assert w.status("nb")["phase"] == "Running" and (NS, "nb-gpu") in w.kube.pods
    assert "PodGone" not in w.kube.reasons("nb")
    meter = w.status("nb")["meterId"]
    del w.kube.pods[(NS, "nb-gpu")]
    w.tick()
    assert "PodGone" in w.kube.reasons("nb")
    assert w.ledger.get_meter(meter).closed_at is not None  # that run is over
