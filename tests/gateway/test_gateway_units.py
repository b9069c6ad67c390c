"""Manifests and the usage tap, as pure functions."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from gpucloud_gateway.app import ModelStats
from gpucloud_gateway.callers import Funds
from gpucloud_gateway.discovery import FileEndpoints
from gpucloud_gateway.kube import plans_from_cluster
from gpucloud_gateway.main import main as gateway_main
from gpucloud_gateway.metering import Counts, UsageTap

from gpucloud.billing.model_charges import ModelPlan, Rule
from gpucloud.clock import ManualClock
from gpucloud.model_manifests import (
    ManifestError,
    build_model_deployment,
    build_model_service,
)

EXAMPLE = Path(__file__).parents[2] / "examples" / "modeldeployment-public.yaml"


def md(**spec: Any) -> dict[str, Any]:
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["metadata"]["uid"] = "uid-123"
    doc["spec"].update(spec)
    return doc


def test_deployment_holds_gpus_on_the_product_and_is_owned() -> None:
    dep = build_model_deployment(md(gpu={"product": "NVIDIA-L40S", "count": 2}), replicas=3)
    assert dep["kind"] == "Deployment" and dep["spec"]["replicas"] == 3
    assert dep["metadata"]["namespace"] == "acme-research"
    owner = dep["metadata"]["ownerReferences"][0]
    assert owner == {
        "apiVersion": "gpucloud.dev/v1alpha1",
        "kind": "ModelDeployment",
        "name": "llama-official",
        "uid": "uid-123",
        "controller": True,
        "blockOwnerDeletion": True,
    }
    pod = dep["spec"]["template"]
    container = pod["spec"]["containers"][0]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": "2"}
    assert container["image"] == "vllm/vllm-openai:v0.6.3"
    assert pod["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-L40S"}
    sel = dep["spec"]["selector"]["matchLabels"]
    assert sel.items() <= pod["metadata"]["labels"].items()
    assert pod["metadata"]["labels"]["gpucloud.dev/visibility"] == "Public"
    # Default replicas: the status, else minReplicas.
    assert build_model_deployment(md())["spec"]["replicas"] == 1
    with_status = {**md(), "status": {"replicas": 0}}
    assert build_model_deployment(with_status)["spec"]["replicas"] == 0


def test_service_selects_the_deployment_pods() -> None:
    doc = md()
    svc = build_model_service(doc)
    pod_labels = build_model_deployment(doc)["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert svc["spec"]["ports"][0]["targetPort"] == "http"
    assert svc["metadata"]["ownerReferences"][0]["uid"] == "uid-123"
    assert len(svc["metadata"]["name"]) <= 63


def test_manifest_errors_name_the_field() -> None:
    doc = md()
    del doc["metadata"]["uid"]
    with pytest.raises(ManifestError, match=r"metadata\.uid: required"):
        build_model_deployment(doc)
    with pytest.raises(ManifestError, match=r"spec\.gpu\.count: must be an int >= 1"):
        build_model_deployment(md(gpu={"product": "X", "count": 0}))
    with pytest.raises(ManifestError, match="replicas: must be an int >= 0"):
        build_model_deployment(md(), replicas=-1)


def feed_in_pieces(tap: UsageTap, data: bytes, size: int) -> None:
    for i in range(0, len(data), size):
        tap.feed(data[i : i + size])


@pytest.mark.parametrize("size", [1, 7, 4096])
def test_tap_reads_usage_from_the_final_sse_chunk_split_anywhere(size: int) -> None:
    chunks = [{"choices": [{"delta": {"content": "hi"}}]}] * 3
    final = {"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 3}}
    body = b"".join(f"data: {json.dumps(c)}\r\n\r\n".encode() for c in [*chunks, final])
    tap = UsageTap("/v1/chat/completions", "text/event-stream; charset=utf-8")
    feed_in_pieces(tap, body + b"data: [DONE]\n\n", size)
    got = tap.result()
    assert (got.prompt_tokens, got.completion_tokens) == (11, 3)


@pytest.mark.parametrize(
    ("path", "body", "expect"),
    [
        (
            "/v1/chat/completions",
            {"usage": {"prompt_tokens": 5, "completion_tokens": 9}},
            (5, 9, 0, 0),
        ),
        ("/v1/images/generations", {"data": [{}, {}, {}]}, (0, 0, 3, 0)),
        ("/v1/videos/generations", {"data": [{}]}, (0, 0, 0, 1)),
        (
            "/v1/chat/completions",
            {"usage": {"prompt_tokens": -4, "completion_tokens": "x"}},
            (0, 0, 0, 0),
        ),
    ],
)
def test_tap_reads_json_bodies(path: str, body: Any, expect: tuple[int, ...]) -> None:
    tap = UsageTap(path, "application/json")
    feed_in_pieces(tap, json.dumps(body).encode(), 3)
    got = tap.result()
    assert (got.prompt_tokens, got.completion_tokens, got.images, got.videos) == expect


def test_tap_ignores_garbage_and_other_types() -> None:
    tap = UsageTap("/v1/chat/completions", "application/json")
    tap.feed(b"{not json")
    assert tap.result().prompt_tokens == 0
    plain = UsageTap("/v1/chat/completions", "text/plain")
    plain.feed(b'{"usage": {"prompt_tokens": 1}}')
    assert plain.result().prompt_tokens == 0


def test_models_from_the_cluster_need_an_account() -> None:
    billed = md()
    orphan = md()
    orphan["metadata"] = {**orphan["metadata"], "namespace": "nobody", "name": "x"}
    broken = md(visibility="Public", pricing={"publisher": "Official"})  # no task
    broken["metadata"] = {**broken["metadata"], "name": "broken"}
    accounts = [{"metadata": {"name": "acme"}, "spec": {"namespaces": ["acme-research"]}}]
    plans = plans_from_cluster([billed, orphan, broken], accounts)
    assert [(p.key, p.account, p.rule, p.task) for p in plans] == [
        ("acme-research/llama-official", "acme", Rule.OFFICIAL, "TextGeneration")
    ]


def test_request_volume_counts_the_last_window_only() -> None:
    clock = ManualClock(datetime(2026, 3, 1, tzinfo=UTC))
    stats = ModelStats(600)
    for _ in range(3):
        stats.arrive(clock.now())
    clock.advance(300)
    stats.arrive(clock.now())
    assert stats.in_window(clock.now()) == 4
    clock.advance(300)  # the first three are exactly one window old: out
    assert stats.in_window(clock.now()) == 1
    clock.advance(299)
    assert stats.in_window(clock.now()) == 1
    clock.advance(1)
    assert stats.in_window(clock.now()) == 0
    assert stats.total == 4 and stats.last_request_at is not None


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"models": [{"namespace": "n", "name": "m"}]}, "models[0].account: required string"),
        (
            {"models": [{"namespace": "n", "name": "m", "account": "a", "visibility": "Public"}]},
            "models[0]: pricing.publisher: must be Official or Personal",
        ),
        ({"models": "all"}, "models: a list of models, or {kind: kubernetes}, is required"),
        ({"models": []}, "endpoints: required, {kind: file|static|kubernetes, ...}"),
        (
            {"models": [], "endpoints": {"kind": "static"}, "scaler": {"kind": "magic"}},
            "scaler.kind: 'magic' is not one of",
        ),
        (
            {"models": [], "endpoints": {"kind": "static"}, "billing": {"queue": "x.db"}},
            "billing.pricebook: required",
        ),
        (
            {"models": [], "endpoints": {"kind": "static"}, "billing": {"store": "x.db"}},
            "billing.store: replaced by billing.queue",
        ),
        (
            {"models": [], "endpoints": {"kind": "static"}, "auth": {"kind": "magic"}},
            "auth.kind: 'magic' is not one of tokenreview, static, none",
        ),
        (
            {"models": [], "endpoints": {"kind": "static"}, "auth": {"kind": "static"}},
            "auth.tokens: a map of token to username is required",
        ),
        (
            {"models": [], "endpoints": {"kind": "static"}, "accounts": {"bob": "team-b"}},
            "accounts: a map of account name to a list of namespaces",
        ),
        (
            {
                "models": [],
                "endpoints": {"kind": "static"},
                "auth": {"kind": "none"},
                "stats": {"peers": {"kind": "static", "urls": []}},
            },
            "stats.peers.urls: a non-empty list of gateway base URLs",
        ),
    ],
)
def test_bad_config_exits_2_naming_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], config: dict[str, Any], message: str
) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    assert gateway_main(["--config", str(path)]) == 2
    assert message in capsys.readouterr().err


def test_tap_reads_a_cut_stream_as_the_content_deltas_delivered() -> None:
    def chunk(content: str | None, usage: dict[str, int] | None = None) -> bytes:
        doc: dict[str, Any] = {
            "choices": [] if content is None else [{"delta": {"content": content}}]
        }
        if usage:
            doc["usage"] = usage
        return f"data: {json.dumps(doc)}\n\n".encode()

    role = b'data: {"choices": [{"delta": {"role": "assistant", "content": ""}}]}\n\n'
    cut = UsageTap("/v1/chat/completions", "text/event-stream")
    for data in [role, chunk("a"), chunk("b"), chunk("c")]:
        cut.feed(data)
    assert cut.result() == Counts(prompt_tokens=0, completion_tokens=3)
    whole = UsageTap("/v1/chat/completions", "text/event-stream")
    usage = {"prompt_tokens": 9, "completion_tokens": 3}
    for data in [role, chunk("a"), chunk("b"), chunk("c"), chunk(None, usage), b"data: [DONE]\n\n"]:
        whole.feed(data)
    assert whole.result() == Counts(prompt_tokens=9, completion_tokens=3)


def public_caller(directory: Any, funds: dict[str, Funds]) -> Callable[[str], str]:
    """Checks a token against a public model: the paying account, or "status: message"."""
    import asyncio

    from gpucloud_gateway.callers import CallerError, Callers

    from gpucloud.api.auth import Principal, StaticTokenAuthenticator

    namespaces = set(directory.owners)
    tokens = {f"t-{ns}": Principal(f"system:serviceaccount:{ns}:default") for ns in namespaces}
    callers = Callers(StaticTokenAuthenticator(tokens), directory, funds.get, currency="CNY")
    public = ModelPlan("x", "m", "owner", visibility="Public", publisher="Personal")

    async def check(token: str) -> str:
        try:
            return (await callers.check(public, f"Bearer {token}")).account
        except CallerError as exc:
            return f"{exc.status}: {exc.message}"

    return lambda token: asyncio.run(check(token))


def test_an_account_in_arrears_by_its_status_gets_402_even_with_balance() -> None:
    from gpucloud_gateway.kube import directory_from_accounts

    accounts = [
        {"metadata": {"name": "ok"}, "spec": {"namespaces": ["a"]}, "status": {"state": "Active"}},
        {
            "metadata": {"name": "late"},
            "spec": {"namespaces": ["b"]},
            "status": {"state": "Arrears"},
        },
    ]
    directory = directory_from_accounts(accounts)
    assert directory.owners == {"a": "ok", "b": "late"}
    check = public_caller(directory, {"ok": Funds(500, "CNY"), "late": Funds(500, "CNY")})
    assert check("t-a") == "ok"
    assert check("t-b").startswith("402: account 'late' is in arrears")


def test_a_public_model_refuses_a_caller_whose_money_is_in_another_currency() -> None:
    """Requests are charged in the price book's currency; an account kept in USD would
    pay CNY figures as dollars. Nothing converts: 402 naming both currencies. An account
    the ledger does not know yet has nothing to pay with."""
    from gpucloud_gateway.callers import Directory

    owners = {"us": "dollars", "cn": "yuan", "new": "fresh"}
    funds = {"dollars": Funds(10_000, "USD"), "yuan": Funds(10_000, "CNY"),
             "fresh": Funds(0, None)}  # fmt: skip
    check = public_caller(Directory(owners, {}), funds)
    assert check("t-cn") == "yuan"
    assert check("t-us") == (
        "402: account 'dollars' keeps its balance in USD but public models here are priced "
        "in CNY: nothing is billed across currencies"
    )
    assert check("t-new").startswith("402: account 'fresh' has no balance (0 ")


def test_while_the_ledger_cannot_answer_the_account_s_own_currency_decides() -> None:
    """A request served while the ledger is unreachable is posted when the drain runs,
    in the price book's currency: an Account kept in USD is refused by its spec.currency
    (the gateway reads Accounts from the cluster), not served and billed in yuan."""
    from gpucloud_gateway.kube import directory_from_accounts

    accounts = [
        {"metadata": {"name": "dollars"}, "spec": {"namespaces": ["us"], "currency": "USD"}},
        {"metadata": {"name": "yuan"}, "spec": {"namespaces": ["cn"]}},  # the default: CNY
    ]
    directory = directory_from_accounts(accounts)
    assert directory.currencies == {"dollars": "USD", "yuan": "CNY"}
    check = public_caller(directory, {})  # funds unknown for everyone
    assert check("t-cn") == "yuan"
    assert check("t-us").startswith("402: account 'dollars' keeps its balance in USD")


def test_only_the_streams_own_done_line_settles_it_not_generated_text() -> None:
    """The gateway records a stream's usage (durably) just before the chunk that ends it:
    a model tricked into writing "[DONE]" must not end the metering early."""
    tap = UsageTap("/v1/chat/completions", "text/event-stream")
    sneaky = f"data: {json.dumps({'choices': [{'delta': {'content': 'data: [DONE]'}}]})}\n\n"
    assert not tap.ends_stream(sneaky.encode())
    tap.feed(sneaky.encode())
    assert tap.ends_stream(b"data: [DONE]\n\n")
    tap.feed(b"data: [DO")  # the real end, split across two chunks
    assert tap.ends_stream(b"NE]\n\n")
    assert not UsageTap("/v1/x", "application/json").ends_stream(b"data: [DONE]\n\n")


def test_a_namespace_two_accounts_list_bills_to_the_one_created_first() -> None:
    """The gateway applies the operator's rule (gpucloud.ownership), not the list order."""
    from gpucloud_gateway.kube import directory_from_accounts

    def account(name: str, created: str) -> dict:
        meta = {"name": name, "creationTimestamp": created}
        return {"metadata": meta, "spec": {"namespaces": ["acme-research"]}}

    accounts = [
        account("aaa-late", "2026-02-01T00:00:00Z"),
        account("acme", "2026-01-01T00:00:00Z"),
    ]
    assert directory_from_accounts(accounts).owners == {"acme-research": "acme"}
    (plan,) = plans_from_cluster([md()], accounts)
    assert plan.account == "acme"


def test_the_endpoints_file_is_looked_at_once_per_interval_and_for_every_cold_model(
    tmp_path: Path,
) -> None:
    path = tmp_path / "endpoints.json"

    def write(mapping: dict[str, list[str]]) -> None:  # atomically, as writers must
        (tmp_path / "new.json").write_text(json.dumps(mapping))
        (tmp_path / "new.json").replace(path)

    source = FileEndpoints(path, check_s=3600)
    assert source.endpoints("team", "a") == []  # no file yet
    write({"team/a": ["http://a1"]})
    assert source.endpoints("team", "a") == ["http://a1"]  # was cold: looked at once
    write({"team/a": ["http://a2"], "team/b": ["http://b1"]})
    assert source.endpoints("team", "a") == ["http://a1"]  # within the interval: kept
    assert source.endpoints("team", "b") == ["http://b1"]  # cold: read again
    assert source.endpoints("team", "a") == ["http://a2"]  # the same read
    write({"team/a": ["http://a2"]})
    fresh = FileEndpoints(path, check_s=0.0)
    assert fresh.endpoints("team", "a") == ["http://a2"]
    write({"team/a": ["http://a3"]})
    assert fresh.endpoints("team", "a") == ["http://a3"]  # interval over: read again
    path.unlink()
    assert fresh.endpoints("team", "a") == []
