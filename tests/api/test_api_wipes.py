"""Node wipes over HTTP: only the agent bound to a node sees and completes its wipes."""

from __future__ import annotations

from apihelpers import T0, auth
from fastapi.testclient import TestClient

from gpucloud.ledger import Ledger

PATH = "instances/acme-research/job"


def _request(ledger: Ledger, node: str = "node-a", subject: str = "instance-volume:u1:1") -> int:
    ledger.ensure_account("acme")
    return ledger.request_wipe(node, PATH, subject, "acme", T0).id


def test_the_nodes_agent_lists_and_completes_its_wipes(client: TestClient, ledger: Ledger) -> None:
    wid = _request(ledger)
    _request(ledger, "node-b", "instance-volume:u2:1")
    r = client.get("/v1/nodes/node-a/wipes", headers=auth("agent-node-a"))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["node"] == "node-a"
    assert [(w["id"], w["path"], w["done_at"]) for w in body["wipes"]] == [(wid, PATH, None)]
    r = client.post(
        f"/v1/nodes/node-a/wipes/{wid}/done",
        json={"bytes_freed": 4096},
        headers=auth("agent-node-a"),
    )
    assert r.status_code == 200, r.text
    assert r.json()["bytes_freed"] == 4096 and r.json()["done_at"] is not None
    # a retried report is answered with the first one
    again = client.post(
        f"/v1/nodes/node-a/wipes/{wid}/done", json={"bytes_freed": 0}, headers=auth("agent-node-a")
    )
    assert again.status_code == 200 and again.json()["bytes_freed"] == 4096
    assert client.get("/v1/nodes/node-a/wipes", headers=auth("agent-node-a")).json()["wipes"] == []
    assert ledger.get_wipe("instance-volume:u1:1").bytes_freed == 4096


def test_only_the_agent_bound_to_the_node_may_call(client: TestClient, ledger: Ledger) -> None:
    wid = _request(ledger)
    url = f"/v1/nodes/node-a/wipes/{wid}/done"
    r = client.get("/v1/nodes/node-a/wipes", headers=auth("agent-node-b"))
    assert r.status_code == 403 and "agent of node 'node-b', not of 'node-a'" in r.text
    r = client.post(url, json={"bytes_freed": 1}, headers=auth("agent-node-b"))
    assert r.status_code == 403
    # node-b's agent naming its own node in the URL still cannot complete node-a's wipe
    r = client.post(
        f"/v1/nodes/node-b/wipes/{wid}/done", json={"bytes_freed": 1}, headers=auth("agent-node-b")
    )
    assert r.status_code == 403 and "belongs to node 'node-a'" in r.text
    for token in ("admin-token", "tenant-token"):
        assert client.get("/v1/nodes/node-a/wipes", headers=auth(token)).status_code == 403
    assert client.get("/v1/nodes/node-a/wipes").status_code == 401
    assert ledger.get_wipe("instance-volume:u1:1").done_at is None


def test_bad_reports_are_refused_with_the_field(client: TestClient, ledger: Ledger) -> None:
    wid = _request(ledger)
    url = f"/v1/nodes/node-a/wipes/{wid}/done"
    h = auth("agent-node-a")
    for bad in ({"bytes_freed": -1}, {"bytes_freed": "10"}, {}, {"bytes_freed": 1, "x": 2}):
        r = client.post(url, json=bad, headers=h)
        assert r.status_code == 422, (bad, r.text)
    r = client.post("/v1/nodes/node-a/wipes/999/done", json={"bytes_freed": 0}, headers=h)
    assert r.status_code == 404 and "wipe 999" in r.text
    assert ledger.get_wipe("instance-volume:u1:1").done_at is None


def test_wipes_are_documented_in_openapi(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert "get" in paths["/v1/nodes/{node}/wipes"]
    done = paths["/v1/nodes/{node}/wipes/{wipe_id}/done"]["post"]
    assert {"200", "403", "404", "422"} <= set(done["responses"])
