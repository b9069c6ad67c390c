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
    auth:                             # who calls (Authorization: Bearer <token>); default
      kind: tokenreview               # tokenreview: ServiceAccount tokens checked with the
      cacheSeconds: 5                 # API server (in-cluster, else $KUBECONFIG);
      audiences: []                   # {kind: static, tokens: {TOKEN: USERNAME}} (tests);
                                      # {kind: none}: no checks, the owner pays (dev only)
    accounts: {bob: [team-b]}         # namespace(s) of callers' accounts, besides the
                                      # models' owners (with models from the cluster:
                                      # read from the Accounts)
    stats:                            # /v1/stats sums every gateway replica's counts
      peers: {kind: static, urls: [http://10.0.0.1:9091, ...]}   # all replicas, this
      # one included, at their --ops-port; or {kind: kubernetes, service:
      # gpucloud-gateway, port: 9091, namespace: <default: this pod's>}: the endpoints
      # of the gateway's Service not terminating (ready or not), at the operational port
    billing:                          # optional
      queue: /var/lib/gpucloud/gateway-queue.db   # usage not yet in the ledger (local)
      pricebook: pricebook.yaml       # a PriceBook resource or its spec
      ledger: sqlite:///var/lib/gpucloud/ledger.db   # record and charge requests here
                                                     # (default: $GPUCLOUD_LEDGER_URL;
                                                     # one of the two is required)
      fsync: false                    # true: sync every queue commit to disk (survives
                                      # a power loss; ~3 ms a request); false: survives
                                      # a killed gateway, a host crash loses <= 1 s

The clock for usage timestamps comes from ``GPUCLOUD_CLOCK`` (see gpucloud.clock).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml

from gpucloud.billing import PriceBook
from gpucloud.billing.model_charges import ModelPlan
from gpucloud.clock import clock_from_env
from gpucloud.crd.pricebook import price_book
from gpucloud_gateway.app import Gateway
from gpucloud_gateway.callers import Callers, Directory, Funds, directory_from_plans
from gpucloud_gateway.discovery import (
    CommandScaler,
    EndpointSource,
    FileEndpoints,
    NoScaler,
    Scaler,
    StaticEndpoints,
)
from gpucloud_gateway.drain import DrainProcess
from gpucloud_gateway.outbox import Outbox, UsageQueue, restored_stats


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


def _accounts(cfg: Any) -> dict[str, list[str]]:
    if cfg is None:
        return {}
    if not isinstance(cfg, dict) or not all(
        isinstance(k, str) and isinstance(v, list) and all(isinstance(n, str) for n in v)
        for k, v in cfg.items()
    ):
        raise ConfigError("accounts: a map of account name to a list of namespaces")
    return cfg


def _callers(cfg: Any, directory: Directory, ledger: Any, currency: str | None) -> Callers | None:
    cfg = {"kind": "tokenreview"} if cfg is None else cfg
    if not isinstance(cfg, dict):
        raise ConfigError("auth: a mapping {kind: tokenreview|static|none, ...}")
    kind = cfg.get("kind")
    if kind == "none":
        return None
    ttl = cfg.get("cacheSeconds", 5)
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or ttl < 0:
        raise ConfigError(f"auth.cacheSeconds: a number >= 0, got {ttl!r}")
    from gpucloud.api.auth import Principal, StaticTokenAuthenticator

    checker: Any
    if kind == "static":
        tokens = cfg.get("tokens")
        if not isinstance(tokens, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in tokens.items()
        ):
            raise ConfigError("auth.tokens: a map of token to username is required")
        checker = StaticTokenAuthenticator({t: Principal(u) for t, u in tokens.items()})
    elif kind == "tokenreview":
        audiences = cfg.get("audiences") or []
        if not isinstance(audiences, list):
            raise ConfigError("auth.audiences: a list of strings")
        checker = LazyTokenReview(audiences, float(ttl))
    else:
        raise ConfigError(f"auth.kind: {kind!r} is not one of tokenreview, static, none")
    funds = None
    if ledger is not None:

        def funds(account: str) -> Funds | None:
            from gpucloud.ledger import NotFound

            try:
                acct = ledger.get_account(account)
            except NotFound:  # no such account in the ledger: nothing to pay with
                return Funds(0, None)
            except Exception as exc:  # ledger down: serve; usage is posted once it is back
                print(f"gpucloud-gateway: balance of {account!r} unknown: {exc}", file=sys.stderr)
                return None
            return Funds(acct.balance_minor, acct.currency)

    return Callers(checker, directory, funds, ttl_s=float(ttl), currency=currency)


class LazyTokenReview:
    """``TokenReviewAuthenticator`` built at the first token: the API server is found then
    (in a pod, else $KUBECONFIG); none found: every check fails (the caller gets 503)."""

    def __init__(self, audiences: list[str], ttl_s: float) -> None:
        self.audiences, self.ttl_s = audiences, ttl_s
        self._inner: Any = None

    async def authenticate(self, token: str) -> Any:
        if self._inner is None:
            from gpucloud.api.auth import ClusterAccess, TokenReviewAuthenticator

            if os.environ.get("KUBERNETES_SERVICE_HOST"):
                access = ClusterAccess.in_cluster()
            elif os.environ.get("KUBECONFIG"):
                access = ClusterAccess.from_kubeconfig(os.environ["KUBECONFIG"])
            else:
                raise RuntimeError(
                    "auth kind tokenreview: no cluster (not in a pod, no $KUBECONFIG)"
                )
            self._inner = TokenReviewAuthenticator(access, self.audiences, cache_ttl_s=self.ttl_s)
        return await self._inner.authenticate(token)

    async def aclose(self) -> None:
        if self._inner is not None:
            await self._inner.aclose()


def _peers(cfg: Any) -> Any:
    if cfg is None:
        return None
    peers = cfg.get("peers") if isinstance(cfg, dict) else None
    if peers is None:
        return None
    kind = peers.get("kind") if isinstance(peers, dict) else None
    if kind == "static":
        urls = peers.get("urls")
        if not isinstance(urls, list) or not urls or not all(isinstance(u, str) for u in urls):
            raise ConfigError("stats.peers.urls: a non-empty list of gateway base URLs")
        fixed = [u.rstrip("/") for u in urls]
        return lambda: fixed
    if kind == "kubernetes":
        service = peers.get("service")
        if not isinstance(service, str) or not service:
            raise ConfigError("stats.peers.service: the gateway's Service name is required")
        namespace = peers.get("namespace") or _own_namespace()
        from gpucloud_gateway.kube import GatewayPeers

        return GatewayPeers(service, namespace, int(peers.get("port", 8080)))
    raise ConfigError(f"stats.peers.kind: {kind!r} is not one of static, kubernetes")


def _own_namespace() -> str:
    path = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
    if os.environ.get("POD_NAMESPACE"):
        return os.environ["POD_NAMESPACE"]
    if path.exists():
        return path.read_text().strip()
    raise ConfigError("stats.peers.namespace: required outside a pod")


@dataclass
class Runtime:
    gateway: Gateway
    outbox: Outbox | None
    drain: DrainProcess | None
    models_from_cluster: bool


def build(config_path: Path) -> Runtime:
    cfg = yaml.safe_load(config_path.read_text()) or {}
    base = config_path.parent
    models = cfg.get("models")
    from_cluster = models == {"kind": "kubernetes"}
    if not from_cluster and not isinstance(models, list):
        raise ConfigError("models: a list of models, or {kind: kubernetes}, is required")
    plans = [] if from_cluster else [_plan(i, m) for i, m in enumerate(models)]
    if "payerHeader" in cfg:  # trusted a client-set header: gone, never honoured
        print(
            "gpucloud-gateway: payerHeader is ignored: callers authenticate with "
            "Authorization: Bearer <token> and pay for public models (see auth)",
            file=sys.stderr,
        )
    outbox = drain = pb = usage = ledger = None
    parts = _billing(cfg, base)
    if parts is not None:
        usage, ledger, pb = parts
        drain = DrainProcess(config_path.resolve())
        outbox = Outbox(usage)
    clock = clock_from_env()
    gateway = Gateway(
        plans,
        _endpoints(cfg.get("endpoints"), base),
        scaler=_scaler(cfg.get("scaler") or {}),
        recorder=outbox,
        clock=clock,
        wake_timeout_s=float(cfg.get("wakeTimeoutSeconds", 120)),
        retry_after_s=int(cfg.get("retryAfterSeconds", 30)),
        window_s=float(cfg.get("windowSeconds", 600)),
        callers=_callers(
            cfg.get("auth"),
            directory_from_plans(plans, _accounts(cfg.get("accounts"))),
            ledger,
            pb.currency if pb is not None else None,
        ),
        peers=_peers(cfg.get("stats")),
    )
    _readiness(gateway, outbox)
    if usage is not None:  # before any port is open: /v1/stats never reads 0 for a busy model
        since = clock.now() - timedelta(seconds=gateway.window_s)
        gateway.restore_stats(*restored_stats(usage, ledger, since))
    return Runtime(gateway, outbox, drain, from_cluster)


def _billing(cfg: dict[str, Any], base: Path) -> tuple[UsageQueue, Any, PriceBook] | None:
    """The usage queue, the ledger and the price book of ``billing`` (None: no billing)."""
    billing = cfg.get("billing")
    if not billing:
        return None
    if "store" in billing:
        raise ConfigError(
            "billing.store: replaced by billing.queue (model money lives in the ledger; "
            "import an old store with python -m gpucloud.ledger.import_model_store)"
        )
    for key in ("queue", "pricebook"):
        if not isinstance(billing.get(key), str):
            raise ConfigError(f"billing.{key}: required (a file path)")
    pb = price_book(yaml.safe_load((base / billing["pricebook"]).read_text()))
    fsync = billing.get("fsync", False)
    if not isinstance(fsync, bool):
        raise ConfigError(f"billing.fsync: true or false, got {fsync!r}")
    ledger_url = billing.get("ledger") or os.environ.get("GPUCLOUD_LEDGER_URL")
    if not ledger_url:
        raise ConfigError("billing.ledger: required (or $GPUCLOUD_LEDGER_URL)")
    from gpucloud.ledger import open_ledger

    ledger = open_ledger(ledger_url)
    return UsageQueue(base / billing["queue"], fsync=fsync), ledger, pb


def billing_parts(config_path: Path) -> tuple[UsageQueue, Any, PriceBook] | None:
    """What the drain process (``gpucloud_gateway.drain``) reads of the gateway's config."""
    return _billing(yaml.safe_load(config_path.read_text()) or {}, config_path.parent)


def _readiness(gateway: Gateway, outbox: Outbox | None) -> None:
    source = gateway.endpoints
    if hasattr(source, "synced"):
        gateway.readiness.append(lambda: None if source.synced else "EndpointSlices not listed yet")
    if outbox is not None:
        gateway.readiness.append(lambda: None if outbox.alive() else "usage outbox stopped")


def _catalog_hooks(rt: Runtime) -> tuple[list[Any], list[Any]]:
    """Startup/shutdown hooks that keep the model list in step with the cluster."""
    if not rt.models_from_cluster:
        return [], []
    gateway = rt.gateway
    from gpucloud_gateway.kube import ModelCatalog

    catalogs: list[ModelCatalog] = []

    def apply(plans: list[ModelPlan], directory: Directory) -> None:
        gateway.set_models(plans)
        if gateway.callers is not None:
            gateway.callers.directory = directory

    async def start() -> None:
        catalogs.append(ModelCatalog(apply, asyncio.get_running_loop()))

    gateway.readiness.append(
        lambda: None if catalogs and catalogs[0].synced else "ModelDeployments not listed yet"
    )

    async def stop() -> None:
        for c in catalogs:
            c.close()

    return [start], [stop]


async def _freeze_heap() -> None:
    """Leave what startup loaded (modules, the ledger's and Kubernetes' clients) out of
    the collector's full passes: with it in, each pass walked every object of the
    process while requests waited (a source of the overhead's p99)."""
    gc.collect()
    gc.freeze()


def main(argv: list[str] | None = None) -> int:
    from gpucloud.serving import serve

    p = argparse.ArgumentParser(description="The gpucloud model gateway")
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--ops-host", help="address of /metrics and /v1/stats (default: --host)")
    p.add_argument("--ops-port", type=int, default=9091, help="port of /metrics and /v1/stats")
    p.add_argument("--log-level", default="warning")
    args = p.parse_args(argv)
    try:
        rt = build(args.config)
    except (ConfigError, KeyError, OSError, ValueError) as exc:
        print(f"gpucloud-gateway: bad config {args.config}: {exc}", file=sys.stderr)
        return 2
    starts, stops = _catalog_hooks(rt)
    starts.append(_freeze_heap)
    if rt.drain is not None:
        starts.append(rt.drain.start)  # records a killed gateway left go to the ledger now
    finish = []
    if rt.outbox is not None and rt.drain is not None:
        outbox, drain = rt.outbox, rt.drain

        async def drain_usage() -> None:
            outbox.flush()
            await asyncio.to_thread(outbox.close)
            await drain.stop()

        finish.append(drain_usage)
    app = rt.gateway.app(on_shutdown=[*stops, *finish], on_startup=starts)
    serve(
        app, args.host, args.port, rt.gateway.ops_app(), args.ops_host or args.host,
        args.ops_port, args.log_level, uvloop=True, proxy_headers=False,
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
