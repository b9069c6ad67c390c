"""``gpucloud-operator``: run the Kopf operator.

    gpucloud-operator --standalone --all-namespaces
    gpucloud-operator --namespace team-a --ledger-url sqlite:////var/lib/gpucloud/ledger.db

Every setting of ``OperatorConfig`` can also be set by environment variable
(``GPUCLOUD_OPERATOR_<NAME>``, ``GPUCLOUD_LEDGER_URL``, ``GPUCLOUD_CLOCK``); flags win.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import sys
from typing import Any

import kopf

from gpucloud.clock import clock_from_env
from gpucloud.ledger import open_ledger
from gpucloud_operator.accounts import AccountReconciler
from gpucloud_operator.config import OperatorConfig
from gpucloud_operator.handlers import configure, register, register_models
from gpucloud_operator.instances import InstanceReconciler
from gpucloud_operator.instances.sweeper import Sweeper
from gpucloud_operator.kube import Kube
from gpucloud_operator.metrics import OperatorMetrics
from gpucloud_operator.models import ModelReconciler
from gpucloud_operator.notify import Notifier
from gpucloud_operator.runout import Alarms, background


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, OperatorConfig]:
    parser = argparse.ArgumentParser(prog="gpucloud-operator", description=__doc__.splitlines()[0])
    parser.add_argument("--standalone", action="store_true", help="no peering (one replica)")
    parser.add_argument("--peering", default=None, help="peering object name (HA)")
    parser.add_argument(
        "--namespace", "-n", action="append", default=[], help="serve only these namespaces"
    )
    parser.add_argument("--all-namespaces", "-A", action="store_true", help="the default")
    parser.add_argument("--kubeconfig", default=None)
    parser.add_argument("--liveness", default=None, help="e.g. http://0.0.0.0:8080/healthz")
    parser.add_argument("--verbose", "-v", action="store_true")
    for name in OperatorConfig.model_fields:
        parser.add_argument(f"--{name.replace('_', '-')}", dest=f"cfg_{name}", default=None)
    args = parser.parse_args(argv)
    overrides = {
        name: getattr(args, f"cfg_{name}")
        for name in OperatorConfig.model_fields
        if getattr(args, f"cfg_{name}") is not None
    }
    if args.namespace:
        overrides["namespaces"] = ",".join(args.namespace)
    try:  # a bad variable or flag is a usage error naming the field, not a traceback
        cfg = OperatorConfig.from_env().with_overrides(overrides)
    except ValueError as exc:
        parser.error(str(exc))
    return args, cfg


def main(argv: list[str] | None = None) -> int:
    args, cfg = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:  # one line per handler call is noise at hundreds of instances
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    clock = clock_from_env(cfg.clock)
    ledger = open_ledger(cfg.ledger_url, clock=clock)
    kube = Kube(args.kubeconfig)
    for plural in ("gpuinstances", "accounts", "pods"):  # read by every pass: watch-fed
        kube.keep_view(plural, resync_s=cfg.view_resync_s)
    metrics = OperatorMetrics(stale_after_s=4 * cfg.account_interval_s + 60)
    notifier = Notifier()  # one webhook queue: account notices and preemption notices
    instances = InstanceReconciler(
        kube, ledger, clock, cfg, notifier, metrics.spot, counters=metrics.notices
    )
    # one schedule of instance passes, run when something is due (instances/sweeper.py)
    view = kube.views["gpuinstances"]
    instances.sweeper = Sweeper(
        clock,
        lambda ns, name, uid: instances.sweep_pass(ns, name, uid, view.get(ns, name)),
        retry_s=cfg.tick_interval_s,
        refresh=instances.refresh_shown,  # the accruedCost and GPU refreshes, batched
        # with peering, only while Kopf works here (not a paused standby): the account
        # timer alone says so every account_interval_s
        lease_s=None if args.standalone else 4 * cfg.account_interval_s + 10,
    )
    alarms = Alarms(clock)  # account passes at each account's run-out instant
    # instance passes of an account just in arrears: their own pool, so that they never
    # queue behind (or hold up) the account passes of the alarms
    wake = background(8, "gpucloud-wake")
    accounts = AccountReconciler(
        kube,
        ledger,
        clock,
        cfg,
        notifier,
        metrics=metrics.accounts,
        counters=metrics.notices,
        alarms=alarms,
        wake_instance=lambda ns, name, uid: wake(lambda: instances.reconcile_named(ns, name, uid)),
    )
    alarms.start()
    instances.sweeper.start(background(8, "gpucloud-sweep"))
    if cfg.metrics_port:
        metrics.count_instances(lambda: kube.list_cluster_objects("gpuinstances", 5.0), cfg.serves)
        metrics.serve(cfg.metrics_port)
    registry = kopf.OperatorRegistry()
    register(registry, cfg, instances, accounts, kube.views)
    register_models(registry, cfg, ModelReconciler(kube, ledger, clock, cfg))

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        # an explicit registry has none of Kopf's default login handlers
        return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)

    @kopf.on.startup(registry=registry)
    def startup(settings: kopf.OperatorSettings, **_: object) -> None:
        configure(settings, cfg)
        # what importing and starting made (modules, schemas, clients) lives as long as
        # the process: out of the collector's sight, so full collections skip it
        gc.freeze()

    # Cluster-scoped kinds (Account, PriceBook, RechargeReview) need cluster-wide watching;
    # --namespace narrows the namespaced kinds through a filter (cfg.namespaces).
    try:
        kopf.run(
            registry=registry,
            standalone=args.standalone,
            peering_name=args.peering,
            clusterwide=True,
            liveness_endpoint=args.liveness,
        )
    except (KeyboardInterrupt, asyncio.CancelledError):
        pass
    finally:
        ledger.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
