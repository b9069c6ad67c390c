"""Image copies over HTTP: only the agent bound to a node sees, completes or fails its
copies; nobody else (another node's agent, a tenant, an admin) can."""

from __future__ import annotations

from apihelpers import T0, auth
from fastapi.testclient import TestClient

from gpucloud.ledger import Ledger

SRC, DST = "instances/acme-research/job", "images/acme-research/job-backup"


def _request(ledger: Ledger, node: str = "node-a", subject: str = "image:u1") -> int:
    ledger.ensure_account("acme")
    return ledger.request_image_copy(node, SRC, DST, subject, "acme", T0).id


def test_the_nodes_agent_lists_and_completes_its_copies(client: TestClient, ledger: Ledger) -> None:
    cid = _request(ledger)
    _request(ledger, "node-b", "image:u2")
    h = auth("agent-node-a")
    body = client.get("/v1/nodes/node-a/image-copies", headers=h).json()
    assert body["node"] == "node-a"
    assert [(c["id"], c["source"], c["path"], c["outcome"]) for c in body["image_copies"]] == [
        (cid, SRC, DST, None)
    ]
    r = client.post(
        f"/v1/nodes/node-a/image-copies/{cid}/done", json={"bytes_used": 123_457}, headers=h
    )
    assert r.status_code == 200, r.text
    assert (r.json()["outcome"], r.json()["bytes_used"]) == ("copied", 123_457)
    # a retried report (or a late failure) is answered with the first one
    again = client.post(
        f"/v1/nodes/node-a/image-copies/{cid}/failed", json={"message": "late"}, headers=h
    )
    assert again.status_code == 200 and again.json()["outcome"] == "copied"
    assert client.get("/v1/nodes/node-a/image-copies", headers=h).json()["image_copies"] == []
    done = ledger.get_image_copy("image:u1")
    assert done is not None and (done.outcome, done.bytes_used) == ("copied", 123_457)
    audit = [(a.action, a.actor) for a in ledger.audit_events("acme")]
    assert ("image.copied", "node-a") in audit and (
        "image.copy_requested",
        "gpucloud-operator",
    ) in audit


def test_another_nodes_copy_is_refused(client: TestClient, ledger: Ledger) -> None:
    cid = _request(ledger)
    b = auth("agent-node-b")
    r = client.get("/v1/nodes/node-a/image-copies", headers=b)
    assert r.status_code == 403 and "agent of node 'node-b', not of 'node-a'" in r.text
    for what, body in (("done", {"bytes_used": 1}), ("failed", {"message": "x"})):
        r = client.post(f"/v1/nodes/node-a/image-copies/{cid}/{what}", json=body, headers=b)
        assert r.status_code == 403, r.text
        # naming its own node in the URL does not make node-a's copy its own
        r = client.post(f"/v1/nodes/node-b/image-copies/{cid}/{what}", json=body, headers=b)
        assert r.status_code == 403 and "belongs to node 'node-a'" in r.text
    assert client.get("/v1/nodes/node-b/image-copies", headers=b).json()["image_copies"] == []
    for token in ("admin-token", "tenant-token"):
        assert client.get("/v1/nodes/node-a/image-copies", headers=auth(token)).status_code == 403
        r = client.post(
            f"/v1/nodes/node-a/image-copies/{cid}/done",
            json={"bytes_used": 1},
            headers=auth(token),
        )
        assert r.status_code == 403
    assert client.get("/v1/nodes/node-a/image-copies").status_code == 401
    copy = ledger.get_image_copy("image:u1")
    assert copy is not None and copy.done_at is None and copy.outcome is None


def test_bad_reports_are_refused_with_the_field(client: TestClient, ledger: Ledger) -> None:
    cid = _request(ledger)
    h = auth("agent-node-a")
    url = f"/v1/nodes/node-a/image-copies/{cid}"
    for bad in (
        {"bytes_used": -1},
        {"bytes_used": "10"},
        {"bytes_used": 1.5},
        {},
        {"bytes_used": 1, "x": 2},
    ):
        r = client.post(f"{url}/done", json=bad, headers=h)
        assert r.status_code == 422, (bad, r.text)
    for bad in ({"message": ""}, {"message": "x" * 1025}, {"message": 3}):
        r = client.post(f"{url}/failed", json=bad, headers=h)
        assert r.status_code == 422, (bad, r.text)
    r = client.post("/v1/nodes/node-a/image-copies/999/done", json={"bytes_used": 0}, headers=h)
    assert r.status_code == 404 and "image copy 999" in r.text
    assert client.get("/v1/nodes/node-a/image-copies/x", headers=h).status_code in (404, 405)
    copy = ledger.get_image_copy("image:u1")
    assert copy is not None and copy.done_at is None


def test_a_failure_and_a_cancelled_copy(client: TestClient, ledger: Ledger) -> None:
    cid = _request(ledger)
    h = auth("agent-node-a")
    r = client.post(
        f"/v1/nodes/node-a/image-copies/{cid}/failed",
        json={"message": "source 'instances/acme-research/job': no such folder on this node"},
        headers=h,
    )
    assert r.status_code == 200 and r.json()["outcome"] == "failed"
    other = _request(ledger, subject="image:u3")
    cancelled = ledger.cancel_image_copy("image:u3", "the Image was deleted", T0)
    assert cancelled is not None and cancelled.outcome == "cancelled"
    assert client.get("/v1/nodes/node-a/image-copies", headers=h).json()["image_copies"] == []
    r = client.post(
        f"/v1/nodes/node-a/image-copies/{other}/done", json={"bytes_used": 5}, headers=h
    )
    assert r.json()["outcome"] == "cancelled" and r.json()["bytes_used"] is None


def test_image_copies_are_documented_in_openapi(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert "get" in paths["/v1/nodes/{node}/image-copies"]
    for what in ("done", "failed"):
        post = paths[f"/v1/nodes/{{node}}/image-copies/{{copy_id}}/{what}"]["post"]
        assert {"200", "403", "404", "422"} <= set(post["responses"])
