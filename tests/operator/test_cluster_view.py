"""The watch-fed table of instances and accounts (gpucloud_operator.cluster_view)."""

from __future__ import annotations

import threading
from typing import Any

from gpucloud_operator.cluster_view import ClusterView, newer
from hypothesis import given, settings
from hypothesis import strategies as st

Obj = dict[str, Any]


def obj(name: str, version: int, phase: str = "Running", ns: str = "team-a") -> Obj:
    return {
        "metadata": {"namespace": ns, "name": name, "resourceVersion": str(version)},
        "status": {"phase": phase},
    }


class Lister:
    """The API server's list: what exists now and the collection's version."""

    def __init__(self) -> None:
        self.items: list[Obj] = []
        self.version = 0
        self.calls = 0

    def __call__(self) -> tuple[list[Obj], str]:
        self.calls += 1
        return list(self.items), str(self.version)


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def names(view: ClusterView) -> dict[str, str]:
    return {o["metadata"]["name"]: o["metadata"]["resourceVersion"] for o in view.objects()}


def test_versions_compare_as_numbers():
    assert newer("10", "9")
    assert not newer("9", "10")
    assert not newer("7", "7")
    assert newer("abc", "7")  # opaque: the later arrival wins


def test_first_read_lists_then_events_keep_it_without_lists():
    lister, clock = Lister(), Clock()
    lister.items, lister.version = [obj("a", 5), obj("b", 6)], 6
    view = ClusterView("gpuinstances", lister, resync_s=60, monotonic=clock)
    assert names(view) == {"a": "5", "b": "6"}
    view.saw(obj("c", 7))
    view.saw(obj("a", 8, "Stopping"))
    view.gone(obj("b", 9))
    clock.t = 59.0
    assert names(view) == {"a": "8", "c": "7"}
    assert lister.calls == 1  # answered from memory


def test_an_older_event_never_undoes_a_newer_write():
    lister = Lister()
    view = ClusterView("gpuinstances", lister, monotonic=Clock())
    view.saw(obj("a", 12, "Stopping"))  # our own patch's answer
    view.saw(obj("a", 11, "Running"))  # the watch's event from before it, late
    assert view.objects()[0]["status"]["phase"] == "Stopping"


def test_a_late_event_of_a_deleted_object_does_not_bring_it_back():
    view = ClusterView("gpuinstances", Lister(), monotonic=Clock())
    view.saw(obj("a", 3))
    view.gone(obj("a", 9))
    view.saw(obj("a", 8))
    assert names(view) == {}
    view.saw(obj("a", 10))  # made again under the same name
    assert names(view) == {"a": "10"}


def test_resync_drops_what_the_watch_missed_and_keeps_what_came_after_the_list():
    lister, clock = Lister(), Clock()
    lister.items, lister.version = [obj("a", 1), obj("b", 2)], 2
    view = ClusterView("gpuinstances", lister, resync_s=60, monotonic=clock)
    assert names(view) == {"a": "1", "b": "2"}
    # "b" is deleted while the watch is down; "c" is created after the next list
    lister.items, lister.version = [obj("a", 1)], 20
    view.saw(obj("c", 21))
    clock.t = 61.0
    assert names(view) == {"a": "1", "c": "21"}
    assert lister.calls == 2


def test_resync_keeps_an_event_newer_than_the_list():
    lister, clock = Lister(), Clock()
    view = ClusterView("gpuinstances", lister, resync_s=60, monotonic=clock)
    view.objects()
    view.saw(obj("a", 30, "Stopping"))
    lister.items, lister.version = [obj("a", 25, "Running")], 29  # listed before the stop
    clock.t = 61.0
    assert view.objects()[0]["status"]["phase"] == "Stopping"


def test_readers_wait_only_for_the_first_fill():
    """A resync in progress does not hold readers up: they read the table as it is."""
    clock = Clock()
    release, listing = threading.Event(), threading.Event()
    calls = []

    def slow() -> tuple[list[Obj], str]:
        calls.append(1)
        if len(calls) > 1:
            listing.set()
            assert release.wait(10)
        return [obj("a", 1)], "1"

    view = ClusterView("gpuinstances", slow, resync_s=60, monotonic=clock)
    assert names(view) == {"a": "1"}
    clock.t = 61.0
    resyncing = threading.Thread(target=view.objects)
    resyncing.start()
    assert listing.wait(10)
    assert names(view) == {"a": "1"}  # while the other thread lists
    release.set()
    resyncing.join(10)
    assert len(calls) == 2


# -- against an oracle: any interleaving of watch events, own writes and resyncs --------
# The cluster is a sequence of writes (create/update/delete of a few names) with rising
# versions. The view sees some of them (the watch drops some; own writes arrive early or
# late) and lists at random points; after a final resync it must equal the cluster's
# state, and at every read it must hold no object older than one it already showed.

Write = tuple[str, str]  # (name, "put" | "delete")

writes = st.lists(
    st.tuples(st.sampled_from(["a", "b", "c"]), st.sampled_from(["put", "put", "delete"])),
    min_size=1,
    max_size=30,
)


@settings(max_examples=300, deadline=None)
@given(writes, st.data())
def test_view_converges_to_the_cluster_whatever_the_event_order(ops: list[Write], data: Any):
    cluster: dict[str, Obj] = {}
    history: list[tuple[str, Obj, int]] = []  # (name, object as written, version)
    for version, (name, op) in enumerate(ops, start=1):
        if op == "put":
            cluster[name] = obj(name, version)
            history.append((name, cluster[name], version))
        elif name in cluster:
            del cluster[name]
            history.append((name, obj(name, version) | {"deleted": True}, version))

    lister, clock = Lister(), Clock()
    view = ClusterView("gpuinstances", lister, resync_s=10, monotonic=clock)
    lister.items, lister.version = [], 0
    view.objects()  # filled empty before the first write
    # events delivered in an order that may swap neighbours (own writes vs the watch),
    # some dropped (a watch gap)
    order = list(range(len(history)))
    for i in range(len(order) - 1):
        if data.draw(st.booleans(), label=f"swap{i}"):
            order[i], order[i + 1] = order[i + 1], order[i]
    shown: dict[str, int] = {}
    for i in order:
        name, body, _ = history[i]
        if data.draw(st.integers(0, 4), label=f"drop{i}") == 0:
            continue
        if body.get("deleted"):
            view.gone(body)
        else:
            view.saw(body)
        for o in view.objects():
            n, v = o["metadata"]["name"], int(o["metadata"]["resourceVersion"])
            assert v >= shown.get(n, 0), "a row went back in time"
            shown[n] = v
    lister.items, lister.version = list(cluster.values()), len(ops)
    clock.t += 11
    assert names(view) == {n: o["metadata"]["resourceVersion"] for n, o in cluster.items()}


def test_rows_leave_out_managed_fields_and_share_the_rest():
    body = obj("a", 3)
    body["metadata"]["managedFields"] = [{"manager": "kubectl", "fieldsV1": {"f:spec": {}}}]
    view = ClusterView("gpuinstances", Lister(), monotonic=Clock())
    view.saw(body)
    (row,) = view.objects()
    assert "managedFields" not in row["metadata"] and row["status"] is body["status"]
    assert "managedFields" in body["metadata"]  # the event's own body is left as it was


def test_the_pods_view_keeps_only_what_its_reader_reads():
    """``pod_row``: the run label, uid, node and phase that ``_observe_running`` reads,
    and the key and version; a pod built as the operator builds it, with a status as a
    node would give it, keeps nothing else."""
    from gpucloud_operator import builders as b
    from gpucloud_operator.cluster_view import pod_row

    inst = {
        "apiVersion": "gpucloud.dev/v1alpha1",
        "kind": "GPUInstance",
        "metadata": {"name": "nb", "namespace": "team-a", "uid": "u-1"},
        "spec": {
            "gpu": {"product": "NVIDIA-L40S", "count": 2},
            "billing": {"mode": "PayAsYouGo"},
            "storage": {"quotaGi": 20},
            "state": "Running",
        },
    }
    pod = b.build_instance_pod(inst, 3)
    pod["metadata"] |= {"uid": "p-1", "resourceVersion": "42", "managedFields": [{}]}
    pod["spec"]["nodeName"] = "gpu-0"
    pod["status"] = {"phase": "Running", "conditions": [{"type": "Ready"}], "podIP": "10.0.0.1"}
    row = pod_row(pod)
    assert row == {
        "metadata": {
            "name": "nb-gpu",
            "namespace": "team-a",
            "uid": "p-1",
            "resourceVersion": "42",
            "labels": pod["metadata"]["labels"],
        },
        "spec": {"nodeName": "gpu-0"},
        "status": {"phase": "Running"},
    }
    assert row["metadata"]["labels"][b.RUN_LABEL] == "3"
    view = ClusterView("pods", Lister(), monotonic=Clock(), row=pod_row)
    view.saw(pod)
    assert view.get("team-a", "nb-gpu") == row
    view.saw({**pod, "metadata": {**pod["metadata"], "resourceVersion": "41"}})
    assert view.get("team-a", "nb-gpu") == row  # an older event: the version rule holds
