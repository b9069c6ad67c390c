"""The reconciler's locks and caches are written down in one place
(gpucloud_operator.instances.concurrency): a lock or cache added without its rule fails
here."""

from __future__ import annotations

import copy
import threading
from pathlib import Path

from gpucloud_operator.instances import InstanceReconciler, concurrency
from opworld import NS, make_world


def test_every_lock_and_cache_has_its_rule_written_down(tmp_path: Path) -> None:
    w = make_world(tmp_path)
    try:
        rec = InstanceReconciler(w.kube, w.ledger, w.clock, w.cfg)
        state = {k for k in vars(rec) if k.startswith("_") and k != "_later"}
        assert {"_locks", "_account_locks", "_placement_lock", "_guard"} <= state
        doc = concurrency.__doc__ or ""
        missing = sorted(k for k in state if f"``{k}" not in doc)
        assert not missing, f"not in the concurrency rules: {missing}"
        locks = [k for k, v in vars(rec).items() if isinstance(v, type(threading.Lock()))]
        assert sorted(locks) == ["_guard", "_placement_lock"]
    finally:
        w.ledger.close()


def test_a_tick_with_the_body_of_the_version_last_seen_skips_the_read(tmp_path: Path) -> None:
    """A timer tick's body of the very version the last pass read or left stands for a
    read (``_known_version``): no pass of this process changed it since. A change by
    someone else comes with its own event, whose body is of another version and is read
    again (so the pass acts on the change, not on an out-of-date body)."""
    w = make_world(tmp_path)
    versions = iter(range(1, 10_000))
    reads: list[str] = []
    patch, get = w.kube.patch_status, w.kube.get_namespaced_object

    def versioned(obj: dict) -> dict:  # a new resourceVersion per write, as the API server
        obj["metadata"]["resourceVersion"] = str(next(versions))
        return obj

    def patch_status(plural: str, namespace: str | None, name: str, status: dict) -> dict:
        patch(plural, namespace, name, status)
        return copy.deepcopy(versioned(w.kube.instance(NS, name)))

    def get_object(plural: str, namespace: str, name: str) -> dict | None:
        reads.append(name)
        return get(plural, namespace, name)

    w.kube.patch_status = patch_status  # type: ignore[method-assign]
    w.kube.get_namespaced_object = get_object  # type: ignore[method-assign]
    try:
        w.fund(100_000_00)
        versioned(w.instance("a", "NVIDIA-L40S"))
        w.tick()
        w.tick()
        assert w.status("a")["phase"] == "Running"
        current = copy.deepcopy(w.kube.instance(NS, "a"))
        reads.clear()
        w.rec.reconcile(current, wait=False)
        assert reads == []
        w.kube.update_spec("gpuinstances", NS, "a", {"state": "Stopped"})
        versioned(w.kube.instance(NS, "a"))
        # a tick that raced the change: as if it had run a moment before it
        w.rec.reconcile(current, wait=False)
        assert reads == [] and w.status("a")["phase"] == "Running"
        # the change's event: a new version, read under the lock, acted on
        event = copy.deepcopy(w.kube.instance(NS, "a"))
        event["status"] = current["status"]  # even with a body of an older status
        w.rec.reconcile(event)
        assert reads == ["a"]
        assert w.status("a")["phase"] == "Stopped"
    finally:
        w.ledger.close()
