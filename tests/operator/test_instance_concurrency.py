"""The reconciler's locks and caches are written down in one place
(gpucloud_operator.instances.concurrency): a lock or cache added without its rule fails
here."""

from __future__ import annotations

import threading
from pathlib import Path

from gpucloud_operator.instances import InstanceReconciler, concurrency
from opworld import make_world


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
