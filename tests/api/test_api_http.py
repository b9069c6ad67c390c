"""End to end over real HTTP: the API as a uvicorn process on 127.0.0.1, on a real
SQLite file and on PostgreSQL, including a SIGKILL in the middle of ingestion."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from datetime import timedelta
from fractions import Fraction

import httpx
import pytest
from apihelpers import PRICE, T0, T0_S, auth, gpu_record, open_gpu_meter, wait_for

from gpucloud.api.testserver import ApiProcess, agent_token
from gpucloud.billing.money import to_minor
from gpucloud.clock import FileClock
from gpucloud.ledger import open_ledger
from gpucloud.recharge import SandboxProvider
from gpucloud.testing.postgres import create_database

NOW = T0 + timedelta(days=1)  # every record below ends before this: all rateable
TENANT = auth("tenant-token")
ADMIN = auth("admin-token")


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def db_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path_factory.mktemp('db') / 'ledger.db'}"
    server = request.getfixturevalue("postgres_url")
    return create_database(server, f"api_{uuid.uuid4().hex[:12]}")


@pytest.fixture(scope="module")
def file_clock(tmp_path_factory: pytest.TempPathFactory) -> FileClock:
    clock = FileClock(tmp_path_factory.mktemp("clock") / "clock")
    clock.set(NOW)
    return clock


@pytest.fixture(scope="module")
def api(
    tmp_path_factory: pytest.TempPathFactory, db_url: str, file_clock: FileClock
) -> Iterator[ApiProcess]:
    """One API process per backend for this module (startup is the slow part)."""
    nodes = [f"node-{i}" for i in range(5)]
    proc = ApiProcess(
        tmp_path_factory.mktemp("api"), db_url, nodes=nodes, clock=f"file:{file_clock.path}"
    )
    yield proc.start()
    proc.stop()


def node_batches(node: str, n_batches: int, windows: int = 5) -> list[dict]:
    """One pod per node holding its 8 GPUs; each batch covers ``windows`` 10 s windows."""
    out = []
    for b in range(n_batches):
        recs = [
            gpu_record(node=node, gpu=g, pod_uid=f"pod-{node}", start=T0_S + 10 * (b * windows + w))
            for w in range(windows)
            for g in range(8)
        ]
        out.append({"records": recs})
    return out


def expected_balance(gpu_seconds_per_meter: dict[str, int]) -> int:
    return -sum(
        to_minor(Fraction(s) * Fraction(PRICE) / 3600) for s in gpu_seconds_per_meter.values()
    )


def test_http_ingest_recharge_and_balance(
    api: ApiProcess, db_url: str, file_clock: FileClock
) -> None:
    with _ledger(db_url) as lg:
        open_gpu_meter(lg, "acme", "pod-node-0", T0, gpus=8)
    with httpx.Client(base_url=api.url, timeout=10) as c:
        batch = node_batches("node-0", 1, windows=3)[0]
        first = c.post("/v1/usage", json=batch, headers=auth(agent_token("node-0")))
        assert first.json() == {"accepted": 24, "duplicates": 0, "rejected": 0, "errors": []}
        again = c.post("/v1/usage", json=batch, headers=auth(agent_token("node-0")))
        assert again.json()["duplicates"] == 24
        want = expected_balance({"pod-node-0": 240})
        wait_for(
            lambda: (
                c.get("/v1/accounts/acme/balance", headers=TENANT).json()["balance_minor"] == want
            ),
            2.0,
            "usage rated into the balance",
        )
        order = c.post(
            "/v1/accounts/acme/recharges/online", json={"amount_minor": 2000}, headers=TENANT
        ).json()
        sandbox = SandboxProvider(b"sandbox-test-secret")
        paid = sandbox.pay(api.url, order["order_id"], 2000, "CNY", file_clock.now(), client=c)
        assert paid.status_code == 200 and paid.json()["credited"] is True
        replay = sandbox.paid_callback(
            order["order_id"], 2000, "CNY", file_clock.now(), txn_id="t1"
        )
        assert (
            c.post(
                "/v1/payments/sandbox/callback", content=replay[0], headers=replay[1]
            ).status_code
            == 409
        )
        bal = c.get("/v1/accounts/acme/balance", headers=TENANT).json()
        assert bal["balance_minor"] == want + 2000
        statement = c.get("/v1/accounts/acme/entries", headers=TENANT).json()["entries"]
        assert statement[-1]["balance_after_minor"] == want + 2000
        assert c.get("/openapi.json").json()["paths"]["/v1/usage"]


def test_meters_show_the_open_run_then_usage_that_came_after_its_settlement(
    api: ApiProcess, db_url: str
) -> None:
    """``/meters?state=open`` lists the running meter; after the run is settled, agent
    usage for it is stored but not charged, and ``/meters?state=late`` shows it."""
    opened = T0 + timedelta(hours=1)
    start = T0_S + 3600

    def windows(first: int, last: int) -> dict:
        recs = [
            gpu_record(node="node-0", gpu=g, pod_uid="pod-late", start=start + 10 * w)
            for w in range(first, last)
            for g in range(8)
        ]
        return {"records": recs}

    with _ledger(db_url) as lg:
        open_gpu_meter(lg, "late", "pod-late", opened, gpus=8)
    meter = "meter-pod-late"
    with httpx.Client(base_url=api.url, timeout=10) as c:
        agent = auth(agent_token("node-0"))
        assert c.post("/v1/usage", json=windows(0, 3), headers=agent).json()["accepted"] == 24
        url = "/v1/accounts/late/meters"
        running = c.get(url, params={"state": "open"}, headers=ADMIN).json()["meters"]
        assert [(m["meter_id"], m["closed_at"]) for m in running] == [(meter, None)]
        assert running[0]["quantity_rated"] == 240
        with _ledger(db_url) as lg:
            lg.close_meter(meter, opened + timedelta(seconds=60))
            lg.settle_meter(meter, NOW, fallback=True)
        balance = c.get("/v1/accounts/late/balance", headers=ADMIN).json()["balance_minor"]
        assert c.get(url, params={"state": "open"}, headers=ADMIN).json()["meters"] == []
        assert c.post("/v1/usage", json=windows(3, 6), headers=agent).json()["accepted"] == 24

        def late() -> list[dict]:
            got = c.get(url, params={"state": "late"}, headers=ADMIN).json()["meters"]
            return [m for m in got if m["late_records"] == 24]

        (m,) = wait_for(late, 5.0, "the late usage on the settled meter")
        assert m["late_quantity"] == 240 and m["settled_at"] is not None
        assert c.get("/v1/accounts/late/balance", headers=ADMIN).json()["balance_minor"] == (
            balance
        )
        again = c.get(url, params={"state": "late", "limit": 1}, headers=ADMIN).json()
        assert [x["meter_id"] for x in again["meters"]] == [meter]
        bad = c.get(url, params={"state": "closed"}, headers=ADMIN)
        assert bad.status_code == 422 and "state" in bad.text
        other = c.get(url, params={"state": "late"}, headers=TENANT)  # acme's tenant
        assert other.status_code == 403


class _ledger:
    """A context manager around open_ledger (the Ledger has close(), not __exit__)."""

    def __init__(self, url: str) -> None:
        self.lg = open_ledger(url)

    def __enter__(self):  # type: ignore[no-untyped-def]
        return self.lg

    def __exit__(self, *exc: object) -> None:
        self.lg.close()


@pytest.mark.slow
def test_sigkill_during_ingestion_loses_nothing_counts_nothing_twice(
    api: ApiProcess, db_url: str
) -> None:
    nodes = [f"node-{i}" for i in range(1, 5)]  # node-0 is the other test's
    n_batches = 30  # per node; 40 records (400 GPU-seconds) each
    with _ledger(db_url) as lg:
        for node in nodes:
            open_gpu_meter(lg, "crash", f"pod-{node}", T0, gpus=8)
    work = [(node, i, b) for node in nodes for i, b in enumerate(node_batches(node, n_batches))]
    acked: set[tuple[str, int]] = set()
    unsure: list[tuple[str, int]] = []
    lock = threading.Lock()
    killed = threading.Event()

    def sender(items: list[tuple[str, int, dict]]) -> None:
        with httpx.Client(base_url=api.url, timeout=10) as c:
            for node, i, batch in items:
                if killed.is_set():
                    return
                try:
                    resp = c.post("/v1/usage", json=batch, headers=auth(agent_token(node)))
                    ok = resp.status_code == 200
                except httpx.HTTPError:
                    ok = False
                with lock:
                    (acked.add((node, i)) if ok else unsure.append((node, i)))

    threads = [threading.Thread(target=sender, args=(work[k::3],)) for k in range(3)]
    for t in threads:
        t.start()
    wait_for(lambda: len(acked) >= 20, 60, "some batches to be acknowledged")
    api.kill()  # SIGKILL while the senders are mid-stream
    killed.set()
    for t in threads:
        t.join(30)
    assert len(acked) < len(work), "the kill came too late to interrupt the stream"
    api.start()
    # The client re-sends everything not acknowledged (in-flight and never sent).
    resend = [(node, i, b) for node, i, b in work if (node, i) not in acked]
    with httpx.Client(base_url=api.url, timeout=30) as c:
        dup = 0
        for node, _, batch in resend:
            resp = c.post("/v1/usage", json=batch, headers=auth(agent_token(node)))
            assert resp.status_code == 200, resp.text
            dup += resp.json()["duplicates"]
        per_meter = {f"pod-{node}": n_batches * 400 for node in nodes}
        want = expected_balance(per_meter)
        wait_for(
            lambda: (
                c.get("/v1/accounts/crash/balance", headers=ADMIN).json()["balance_minor"] == want
            ),
            10.0,
            f"balance {want}",
        )
        usage = c.get("/v1/accounts/crash/usage", headers=ADMIN).json()["rows"]
        assert sum(r["gpu_seconds"] for r in usage) == 4 * n_batches * 400
        charges = c.get("/v1/accounts/crash/charges", headers=ADMIN).json()["charges"]
        assert sum(ch["amount_minor"] for ch in charges) == -want
