"""Helpers shared by the API tests (a uniquely named module: test dirs have no packages)."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from fastapi.testclient import TestClient

from gpucloud.api.app import ops_app
from gpucloud.api.auth import Principal
from gpucloud.api.testserver import AGENT_SA
from gpucloud.ledger import Ledger

T0 = datetime(2026, 3, 1, tzinfo=UTC)
T0_S = int(T0.timestamp())
PRICE = Decimal("9.80")  # per GPU-hour

TOKENS = {
    "agent-node-a": Principal(AGENT_SA, node="node-a"),
    "agent-node-b": Principal(AGENT_SA, node="node-b"),
    "admin-token": Principal("alice-admin", groups=frozenset({"gpucloud:admins"})),
    "tenant-token": Principal("bob", accounts=frozenset({"acme"})),
    "stranger-token": Principal("mallory", accounts=frozenset({"evil"})),
}


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def gpu_record(
    node: str = "node-a", gpu: int = 0, pod_uid: str = "pod-1", start: int = T0_S, length: int = 10
) -> dict[str, Any]:
    return {
        "kind": "gpu_time",
        "node": node,
        "start": start,
        "end": start + length,
        "quantity": length,
        "gpu": {"uuid": f"GPU-{node}-{gpu}", "product": "NVIDIA-A100-SXM4-80GB"},
        "pod": {"namespace": "acme-research", "name": "inst-1", "uid": pod_uid},
    }


def open_gpu_meter(
    ledger: Ledger,
    account: str,
    pod_uid: str,
    opened_at: datetime,
    gpus: int = 1,
    node: str | None = None,
) -> None:
    """A meter for a pod holding ``gpus`` GPUs (on ``node``, when given)."""
    ledger.ensure_account(account)
    ledger.open_meter(
        f"meter-{pod_uid}",
        account=account,
        resource=f"acme-research/{pod_uid}",
        kind="gpu_time",
        subject=pod_uid,
        unit_price=PRICE,
        unit="gpu_hour",
        opened_at=opened_at,
        gpus=gpus,
        node=node,
    )


def ops_client(client: TestClient) -> TestClient:
    """The operational port (/metrics) of the app ``client`` talks to."""
    return TestClient(ops_app(client.app))  # type: ignore[arg-type]


def wait_for(predicate: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.02)
