"""``gpucloud-gateway``: run the model gateway from a YAML (or JSON) config file.

Config::

    models:                         # one entry per ModelDeployment served, or
                                    # {kind: kubernetes}: every ModelDeployment whose
                                    # namespace an Account lists (polled)
      - {namespace: team-a, name: llama, account: alice, visibility: Public,
         publisher: Official, task: TextGeneration, product: NVIDIA-A100, gpusPerReplica: 1}
    endpoints: {kind: file, path: endpoints.json}   # or {kind: static, map: {...}},
                                                    #    {kind: kubernetes}
    scaler: {kind: command, argv: [...]}            # or {kind: none}, {kind: kubernetes}
    wakeTimeoutSeconds: 120
    retryAfterSeconds: 30
    windowSeconds: 600
    payerHeader: X-Gpucloud-Account   # caller account of public models (set by an auth proxy)
    billing:                          # optional
      store: /var/lib/gpucloud/gateway-usage.db
      pricebook: pricebook.yaml       # a PriceBook resource or its spec
      ledger: sqlite:///var/lib/gpucloud/ledger.db   # post charges here (default:
                                                     # $GPUCLOUD_LEDGER_URL; neither: none)

The clock for usage timestamps comes from ``GPUCLOUD_CLOCK`` (see gpucloud.clock).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from gpucloud.billing import PriceBook
from gpucloud.clock import clock_from_env
from gpucloud_gateway.app import Gateway
from gpucloud_gateway.billing import BillingStore, ModelPlan
from gpucloud_gateway.discovery import (
    CommandScaler,
    EndpointSource,
    FileEndpoints,
    NoScaler,
    Scaler,
    StaticEndpoints,
)
from gpucloud_gateway.sink import LedgerSink


class ConfigError(ValueError):
    pass


def _plan(i: int, m: Any) -> ModelPlan:
    if not isinstance(m, dict):
        raise ConfigError(f"models[{i}]: expected a mapping")
    for req in ("namespace", "name", "account"):
        if not isinstance(m.get(req), str) or not m[req]:
            raise ConfigError(f"models[{i}].{req}: required string")
    try:
        return ModelPlan(
            namespace=m["namespace"],
            name=m["name"],
            account=m["account"],
            visibility=m.get("visibility", "Private"),
            publisher=m.get("publisher"),
            task=m.get("task"),
            product=m.get("product", ""),
            gpus_per_replica=m.get("gpusPerReplica", 1),
        )
    except ValueError as exc:
        raise ConfigError(f"models[{i}]: {exc}") from None


def _endpoints(cfg: Any, base: Path) -> EndpointSource:
    if not isinstance(cfg, dict) or "kind" not in cfg:
        raise ConfigError("endpoints: required, {kind: file|static|kubernetes, ...}")
    kind = cfg["kind"]
    if kind == "file":
        if not isinstance(cfg.get("path"), str):
            raise ConfigError("endpoints.path: required for kind file")
        return FileEndpoints(base / cfg["path"])
    if kind == "static":
        return StaticEndpoints(cfg.get("map") or {})
    if kind == "kubernetes":
        from gpucloud_gateway.kube import EndpointSliceSource

        return EndpointSliceSource(float(cfg.get("intervalSeconds", 1.0)))
    raise ConfigError(f"endpoints.kind: {kind!r} is not one of file, static, kubernetes")


def _scaler(cfg: dict[str, Any]) -> Scaler:
    kind = cfg.get("kind", "none")
    if kind == "none":
        return NoScaler()
    if kind == "command":
        argv = cfg.get("argv")
        if not isinstance(argv, list) or not argv:
            raise ConfigError("scaler.argv: a non-empty list of strings is required")
        return CommandScaler([str(a) for a in argv])
    if kind == "kubernetes":
        from gpucloud_gateway.kube import KubeScaler

        return KubeScaler()
    raise ConfigError(f"scaler.kind: {kind!r} is not one of none, command, kubernetes")


@dataclass
class Runtime:
    gateway: Gateway
    sink: LedgerSink | None
    models_from_cluster: bool


def build(config_path: Path) -> Runtime:
    cfg = yaml.safe_load(config_path.read_text()) or {}
    base = config_path.parent
    models = cfg.get("models")
    from_cluster = models == {"kind": "kubernetes"}
    if not from_cluster and not isinstance(models, list):
        raise ConfigError("models: a list of models, or {kind: kubernetes}, is required")
    plans = [] if from_cluster else [_plan(i, m) for i, m in enumerate(models)]
    sink = None
    billing = cfg.get("billing")
    if billing:
        for key in ("store", "pricebook"):
            if not isinstance(billing.get(key), str):
                raise ConfigError(f"billing.{key}: required (a file path)")
        pb_doc = yaml.safe_load((base / billing["pricebook"]).read_text())
        pb = PriceBook.from_resource(pb_doc) if "spec" in pb_doc else PriceBook.from_spec(pb_doc)
        store = BillingStore(base / billing["store"], pb)
        ledger = None
        ledger_url = billing.get("ledger") or os.environ.get("GPUCLOUD_LEDGER_URL")
        if ledger_url:
            from gpucloud.ledger import open_ledger

            ledger = open_ledger(ledger_url)
        sink = LedgerSink(store, ledger)
    gateway = Gateway(
        plans,
        _endpoints(cfg.get("endpoints"), base),
        scaler=_scaler(cfg.get("scaler") or {}),
        sink=sink,
        clock=clock_from_env(),
        wake_timeout_s=float(cfg.get("wakeTimeoutSeconds", 120)),
        retry_after_s=int(cfg.get("retryAfterSeconds", 30)),
        window_s=float(cfg.get("windowSeconds", 600)),
        payer_header=cfg.get("payerHeader"),
    )
    return Runtime(gateway, sink, from_cluster)


def _catalog_hooks(rt: Runtime) -> tuple[list[Any], list[Any]]:
    """Startup/shutdown hooks that keep the model list in step with the cluster."""
    if not rt.models_from_cluster:
        return [], []
    gateway = rt.gateway
    from gpucloud_gateway.kube import ModelCatalog

    catalogs: list[ModelCatalog] = []

    async def start() -> None:
        catalogs.append(ModelCatalog(gateway.set_models, asyncio.get_running_loop()))

    async def stop() -> None:
        for c in catalogs:
            c.close()

    return [start], [stop]


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    p = argparse.ArgumentParser(description="The gpucloud model gateway")
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--log-level", default="warning")
    args = p.parse_args(argv)
    try:
        rt = build(args.config)
    except (ConfigError, KeyError, OSError, ValueError) as exc:
        print(f"gpucloud-gateway: bad config {args.config}: {exc}", file=sys.stderr)
        return 2
    starts, stops = _catalog_hooks(rt)
    drain = [rt.sink.drain] if rt.sink is not None else []
    app = rt.gateway.app(on_shutdown=[*stops, *drain], on_startup=starts)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
