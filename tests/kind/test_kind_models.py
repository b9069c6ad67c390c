"""An official public model on the kind tier, through real pods: our fake model server
image runs as its replica on a GPU node, a tenant's client calls it through the
gateway's Service with its ServiceAccount token, and the tenant's account pays per token,
rated once from the gateway's durable usage and posted to the ledger to the fen."""

from __future__ import annotations

from decimal import Decimal

from gpucloud.billing import to_minor
from gpucloud.testing.kindrelease import KIND_VALUES, KindHarness

L40S = "NVIDIA-L40S"


def test_official_model_is_billed_per_token_to_the_caller(h: KindHarness) -> None:
    _serve_public_model(h, "llm", {"publisher": "Official", "task": "TextGeneration"})
    token = h.token()
    # three words of prompt and 997 generated: 1,000 tokens a request
    for _ in range(3):
        code, answer = h.model_request("llm", token, max_tokens=997)
        assert code == 200 and answer["usage"]["total_tokens"] == 1000, answer
    per_1k = Decimal(KIND_VALUES["pricebook"]["models"]["per1KTokens"])
    expected = to_minor(per_1k * 3)  # 3,000 tokens at 0.0137 per 1K: 0.0411 -> 4 fen
    assert expected == 4
    resource = f"model/{h.ns}/llm"
    h.wait(lambda: h.charges(resource) == expected, "the tokens charged", timeout=60)
    # the caller is refused without a token, and nothing more is charged
    code, _ = h.model_request("llm", "not-a-token")
    assert code == 401
    assert h.charges(resource) == expected
    h.kind.kubectl("delete", "modeldeployment", "llm", "-n", h.ns, "--wait=false")


def test_personal_model_is_billed_per_second_of_runtime(h: KindHarness) -> None:
    """A personal public model: the caller pays for each request's runtime only (not the
    model's start or idle time), measured by the gateway pod and rated once."""
    _serve_public_model(h, "mine", {"publisher": "Personal"})
    token = h.token()
    for _ in range(2):  # the model works 1.7 s on each
        code, answer = h.model_request("mine", token, latency_ms=1700)
        assert code == 200, answer
    query = "SELECT runtime_ms, cumulative FROM ledger_model_requests WHERE model = ? ORDER BY id"
    # The gateway queues each request's usage, then records it (and its charge) in the
    # ledger: the rows appear there with their charges, in one transaction.
    rows = h.wait(
        lambda: (r := h.sql(query, f"{h.ns}/mine")) and len(r) == 2 and r,
        "the requests recorded in the ledger",
        timeout=60,
    )
    assert all(ms >= 1700 for ms, _ in rows)
    per_second = Decimal(KIND_VALUES["pricebook"]["models"]["personalPerRequestSecond"])
    exact = per_second * sum(ms for ms, _ in rows) / 1000
    assert Decimal(rows[-1][1]) == exact  # the request meter's running total, unrounded
    resource = f"model/{h.ns}/mine"
    h.wait(lambda: h.charges(resource) == to_minor(exact), "the runtime charged", timeout=60)
    assert to_minor(exact) >= 1  # about 3.4 s x 0.0031/s = 0.0105 CNY: not nothing
    h.kind.kubectl("delete", "modeldeployment", "mine", "-n", h.ns, "--wait=false")


def _serve_public_model(h: KindHarness, name: str, pricing: dict[str, str]) -> None:
    """The tenant (with money) deploys a public model on an L40S; its one replica is
    ready and the gateway lists it."""
    h.pay_online("topup", "10.00")
    h.apply(
        "ModelDeployment",
        name,
        {"model": "tiny-llm", "image": h.kind.images().ref("fake-model-server"),
         "gpu": {"product": L40S, "count": 1}, "visibility": "Public",
         "pricing": pricing, "minReplicas": 1, "maxReplicas": 1},
    )  # fmt: skip
    h.wait(
        lambda: h.status("modeldeployments", name).get("readyReplicas") == 1,
        "the model's replica ready",
        timeout=180,
    )
    h.wait(lambda: h.gateway_serves(name), "the gateway to list the model")
