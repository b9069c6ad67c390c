"""Time rules through real pods on a file clock: the chart's ``testing.fileClock`` is
mounted into the operator, API and gateway pods, and the test moves it. Packages expire
and renew by the day; arrears shut instances down and, after 7 days, the agent of the
node that held the data deletes it there; a recharge in time saves it. The release goes
back to the system clock at the end of the module."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from gpucloud.billing import to_minor
from gpucloud.testing.kind import KindCluster, KindFileClock
from gpucloud.testing.kindrelease import PRICES, KindHarness, install_release

L40S = "NVIDIA-L40S"
MODEL_PODS = "gpucloud.dev/model-deployment=chat"
GI = "gpuinstances"
DAY = 24 * 3600


@pytest.fixture(scope="module")
def clock(
    kind: KindCluster, gpucloud_release: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[KindFileClock]:
    tmp = tmp_path_factory.mktemp("timed")
    clock = KindFileClock(kind)
    clock.set(datetime.now(UTC).replace(microsecond=0))
    install_release(kind, tmp, {"testing": {"fileClock": clock.path}})
    yield clock
    install_release(kind, tmp)


@pytest.fixture
def h(kind: KindCluster, clock: KindFileClock, kind_namespace: str) -> Iterator[KindHarness]:
    harness = KindHarness(kind, kind_namespace, "gpucloud-system")
    harness.setup()
    yield harness
    harness.close()


def _fmt(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def test_day_package_reminder_renewal_and_expiry(h: KindHarness, clock: KindFileClock) -> None:
    h.pay_online("topup", "300.00", now=clock.now())
    h.instance("day", L40S, 1, ["sleep", "86400"], mode="Package", period="Day", autoRenew=True)
    st = h.wait_phase(GI, "day", "Running")
    bought = clock.now()
    assert st["packageExpiresAt"] == _fmt(bought + timedelta(days=1))
    assert h.charges() == 112_37  # the day package, storage included
    h.wait(lambda: "PackageExpiring" in h.events("day"), "the expiry reminder")
    clock.advance(DAY)
    h.wait(lambda: len(h.status(GI, "day").get("packageTerms", [])) == 2, "the renewal")
    assert h.charges() == 2 * 112_37 and h.status(GI, "day")["phase"] == "Running"
    clock.advance(DAY)  # 75.26 left: the third day cannot be paid
    h.wait_phase(GI, "day", "Expired")
    assert "RenewalFailed" in h.events("day")
    h.wait(lambda: h.pod("day") is None, "the GPUs to be released")
    assert h.charges() == 2 * 112_37
    assert h.balance() == 300_00 - 2 * 112_37


def _folder(h: KindHarness, node: str, name: str) -> bool:
    path = f"/var/lib/gpucloud/instances/{h.ns}/{name}"
    return (
        h.kind.docker_exec(node, "sh", "-c", f"test -d {path} && echo yes || echo no").strip()
        == "yes"
    )


def _run_into_arrears(h: KindHarness, clock: KindFileClock) -> str:
    """An L40S instance funded for about two hours, run for three: arrears, shutdown."""
    h.pay_online("topup", "12.00", now=clock.now())
    h.instance("nb", L40S, 1, ["sh", "-c", "echo mine > /root/data/f; exec sleep 86400"])
    node = h.wait_phase(GI, "nb", "Running")["node"]
    h.wait(lambda: _folder(h, node, "nb"), "the instance's folder on its node")
    clock.advance(3 * 3600)
    h.wait(lambda: h.status("accounts", h.account).get("arrearsSince"), "arrears")
    st = h.wait_phase(GI, "nb", "Stopped")
    assert "ArrearsShutdown" in h.events("nb") or "Arrears" in str(st.get("conditions"))
    h.wait(lambda: h.pod("nb") is None, "the pod to be deleted")
    return node


def test_arrears_shutdown_then_data_deleted_on_its_node_after_7_days(
    h: KindHarness, clock: KindFileClock
) -> None:
    node = _run_into_arrears(h, clock)
    deletion_at = h.status("accounts", h.account)["dataDeletionAt"]
    clock.advance(6 * DAY)
    assert _folder(h, node, "nb")  # day 6: still kept
    clock.set(datetime.fromisoformat(deletion_at) + timedelta(seconds=1))
    h.wait(lambda: not _folder(h, node, "nb"), "the node's agent to delete the folder", timeout=180)
    h.wait(lambda: "DataDeleted" in h.events("nb"), "the DataDeleted event")
    assert h.balance() < 0  # the debt stays: storage was billed until the deletion


def test_a_recharge_in_time_ends_arrears_and_saves_the_data(
    h: KindHarness, clock: KindFileClock
) -> None:
    node = _run_into_arrears(h, clock)
    deletion_at = h.status("accounts", h.account)["dataDeletionAt"]
    clock.advance(6 * DAY)
    h.pay_online("rescue", "100.00", now=clock.now())
    h.wait(lambda: not h.status("accounts", h.account).get("arrearsSince"), "arrears to end")
    assert h.balance() > 0
    clock.advance(2 * DAY)

    def billed_past_the_old_deadline() -> bool:
        return any(e["meta"]["end"] > deletion_at for e in h.entries("storage:"))

    # the operator has run past the old deletion instant (it billed storage beyond it)
    h.wait(billed_past_the_old_deadline, "storage billed past the old deletion instant")
    assert _folder(h, node, "nb")
    assert "DataDeleted" not in h.events("nb")


def test_private_model_wakes_from_traffic_goes_cold_and_wakes_again(
    h: KindHarness, clock: KindFileClock
) -> None:
    """A private ModelDeployment served by our fake model server image through the
    gateway's pod: the first request wakes it from cold (no request lost), the replica
    holds a GPU of an L40S node, it goes cold after the idle time on the file clock, the
    next request wakes it again, and its online time is billed to the fen."""
    h.pay_online("topup", "100.00", now=clock.now())
    image = h.kind.images().ref("fake-model-server")
    h.apply(
        "ModelDeployment",
        "chat",
        {"model": "tiny-chat", "image": image, "gpu": {"product": L40S, "count": 1},
         "visibility": "Private", "minReplicas": 0, "maxReplicas": 2,
         "scaling": {"targetRequestsPerReplica": 600, "windowSeconds": 600,
                     "coldAfterSeconds": 600}},
    )  # fmt: skip
    md = lambda: h.status("modeldeployments", "chat")  # noqa: E731
    h.wait(lambda: md().get("state") == "Cold", "the model to be created cold")
    token = h.token()
    h.wait(lambda: h.gateway_serves("chat"), "the gateway to list the model")

    woke = clock.now()
    code, answer = h.model_request("chat", token, max_tokens=7)
    assert code == 200 and answer["usage"]["completion_tokens"] == 7, answer
    pods = lambda: h.kind.get_json("pods", "-n", h.ns, "-l", MODEL_PODS)["items"]  # noqa: E731
    (pod,) = pods()
    node = pod["spec"]["nodeName"]
    gpus = h.kind.kubectl(
        "exec", "-n", h.ns, pod["metadata"]["name"], "--", "printenv", "NVIDIA_VISIBLE_DEVICES"
    ).stdout.split(",")
    devices = h.kind.node_devices(node)
    assert devices["labels"]["nvidia.com/gpu.product"] == L40S and len(gpus) == 1
    assert {g.strip() for g in gpus} <= set(devices["uuids"])
    h.wait(lambda: md().get("state") == "Serving", "the model serving")

    # idle past coldAfterSeconds on the file clock: the operator sends it cold
    clock.advance(601)
    h.wait(
        lambda: md().get("state") == "Cold" and not pods(),
        "the model to go cold",
        timeout=120,
    )
    # 601 s online on one L40S at 5.17/h: 0.8631 -> 86 fen
    online = f"model/{h.ns}/chat#online"
    expected = to_minor(PRICES[L40S]["payg"] * 601 / 3600)
    assert expected == 86
    h.wait(lambda: h.charges(online) == expected, "the online time charged", timeout=60)

    # the next request wakes it again and is answered
    code, answer = h.model_request("chat", token, max_tokens=3)
    assert code == 200 and answer["usage"]["completion_tokens"] == 3, answer
    assert woke <= clock.now()
    h.kind.kubectl("delete", "modeldeployment", "chat", "-n", h.ns, "--wait=false")
