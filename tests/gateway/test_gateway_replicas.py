"""Several gateway replicas share the load: the autoscaler decides on their sum.

Two real gateway processes (each listing both as peers, each with its own usage queue,
both recording into one ledger)
in front of one real model server; the operator's own stats reader (``HttpStats``) and
observation feed ``decide``. One replica is killed with SIGKILL and restarted: the sum
is refused while it is down and whole again once it is back.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
import yaml
from gateway_testkit import (
    PRICEBOOK_SPEC,
    PRODUCT,
    Proc,
    free_port,
    start_gateway,
    start_model_server,
    write_endpoints,
)
from gpucloud_operator.models import HttpStats, ModelStats, PodView, StatsError, observe

from gpucloud.autoscale import ScalingPolicy, decide

T0 = datetime(2026, 3, 1, tzinfo=UTC)
SPEC = {
    "minReplicas": 1,
    "maxReplicas": 8,
    "scaling": {"targetRequestsPerReplica": 10, "windowSeconds": 600},
}


Gateways = tuple[list[Proc], list[str], Callable[[int], Proc]]


@pytest.fixture
def gateways(tmp_path: Path) -> Iterator[Gateways]:
    """Two gateways; yields their processes, main URLs (``proc.ops_url``: stats) and a
    function that starts replica ``i`` again on its ports."""
    server, server_url = start_model_server(tmp_path, "m")
    write_endpoints(tmp_path / "endpoints.json", {"team/m": [server_url]})
    ports = [free_port(), free_port()]
    ops_ports = [free_port(), free_port()]
    urls = [f"http://127.0.0.1:{p}" for p in ops_ports]  # peers read each other's stats
    (tmp_path / "pricebook.yaml").write_text(yaml.safe_dump(PRICEBOOK_SPEC))
    runs = [0]

    def start(i: int) -> Proc:
        runs[0] += 1
        config = {
            "models": [{"namespace": "team", "name": "m", "account": "alice", "product": PRODUCT}],
            "endpoints": {"kind": "file", "path": "endpoints.json"},
            "auth": {"kind": "none"},
            "stats": {"peers": {"kind": "static", "urls": urls}},
            "billing": {
                "queue": f"usage{i}.db",
                "pricebook": "pricebook.yaml",
                "ledger": f"sqlite:///{tmp_path / 'ledger.db'}",
            },
        }
        name = f"gateway{i}-{runs[0]}"
        return start_gateway(tmp_path, config, ports[i], name, ops_port=ops_ports[i])[0]

    procs: list[Proc] = []
    try:
        procs += [start(0), start(1)]
        yield procs, [f"http://127.0.0.1:{p}" for p in ports], start
    finally:
        for p in procs:
            p.stop()
        server.stop()


def send(url: str, n: int) -> None:
    async def go() -> list[int]:
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            rs = await asyncio.gather(
                *[c.post("/team/m/v1/chat/completions", json={"max_tokens": 1}) for _ in range(n)]
            )
        return [r.status_code for r in rs]

    assert asyncio.run(go()) == [200] * n


def desired_for(requests: int, last: datetime | None) -> int:
    """What the operator's pass decides for 2 ready replicas and this much traffic."""
    pods = [
        PodView(f"p{i}", f"u{i}", f"10.0.0.{i}", True, True, False, False, False) for i in (1, 2)
    ]
    obs = observe(pods, ModelStats(requests, last), 2, T0, None)
    return decide(ScalingPolicy.from_spec(SPEC), obs, datetime.now(UTC)).desired


def test_scaling_sees_the_load_of_every_gateway_replica(gateways: Gateways) -> None:
    procs, (main0, main1), start = gateways
    send(main0, 37)
    send(main1, 24)
    g0, g1 = procs[0].ops_url, procs[1].ops_url  # /v1/stats is on the operational port
    local = [httpx.get(u + "/v1/stats?scope=local").json()["team/m"] for u in (g0, g1)]
    assert [s["requestsLastWindow"] for s in local] == [37, 24]
    for url in (g0, g1):  # whichever replica the operator's request lands on
        r = httpx.get(url + "/v1/stats")
        assert r.headers["x-gpucloud-gateways"] == "2"
        stats = HttpStats(url + "/v1/stats").fetch()["team/m"]
        assert stats.requests_last_window == 61
        assert stats.last_request_at == max(
            datetime.fromisoformat(s["lastRequestAt"]) for s in local
        )
        assert desired_for(stats.requests_last_window, stats.last_request_at) == 7
    # The decision for the whole load; one replica's share alone would under-scale.
    assert desired_for(61, stats.last_request_at) == 7
    assert desired_for(37, stats.last_request_at) == 4

    # A replica killed: no partial sum while it is down (the operator holds on StatsError).
    procs[1].stop(signal.SIGKILL)
    r = httpx.get(g0 + "/v1/stats")
    assert r.status_code == 503 and g1 in r.json()["error"]["message"]
    with pytest.raises(StatsError):
        HttpStats(g0 + "/v1/stats").fetch()
    # Restarted, it counts its stored requests again: the same sum from either replica.
    procs[1] = start(1)
    for url in (g0, g1):
        stats = HttpStats(url + "/v1/stats").fetch()["team/m"]
        assert stats.requests_last_window == 61
        assert desired_for(stats.requests_last_window, stats.last_request_at) == 7
    local = httpx.get(g1 + "/v1/stats?scope=local").json()["team/m"]
    assert (local["requestsLastWindow"], local["requestsTotal"]) == (24, 24)
