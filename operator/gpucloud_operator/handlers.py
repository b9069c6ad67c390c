"""Kopf wiring: thin handlers that hand the body to a reconciler.

Handlers are registered on an explicit registry by ``register()`` because their
intervals come from the configuration. Every handler is synchronous (Kopf runs it in
its thread pool); the reconcilers lock per object, so a timer and a watch event for the
same instance never interleave.
"""

from __future__ import annotations

from typing import Any

import kopf

from gpucloud_operator.accounts import AccountReconciler
from gpucloud_operator.builders import GROUP, MANAGED_BY, VERSION
from gpucloud_operator.config import OperatorConfig
from gpucloud_operator.instances import InstanceReconciler


def register(
    registry: kopf.OperatorRegistry,
    cfg: OperatorConfig,
    instances: InstanceReconciler,
    accounts: AccountReconciler,
) -> None:
    gi = (GROUP, VERSION, "gpuinstances")

    def served(namespace: str | None, **_: Any) -> bool:
        return cfg.serves(namespace)

    @kopf.on.resume(*gi, registry=registry, when=served)
    @kopf.on.create(*gi, registry=registry, when=served)
    @kopf.on.update(*gi, registry=registry, when=served)
    def instance_changed(body: kopf.Body, **_: Any) -> None:
        instances.reconcile(dict(body))

    @kopf.timer(*gi, interval=cfg.tick_interval_s, registry=registry, when=served)
    def instance_tick(body: kopf.Body, **_: Any) -> None:
        instances.reconcile(dict(body))

    @kopf.on.delete(*gi, registry=registry, when=served)
    def instance_released(body: kopf.Body, **_: Any) -> None:
        if not instances.release(dict(body)):
            raise kopf.TemporaryError("waiting for the last usage to settle", delay=1)

    @kopf.on.event("", "v1", "pods", labels=MANAGED_BY, registry=registry, when=served)
    def pod_event(body: kopf.Body, type: str | None, **_: Any) -> None:
        instances.pod_changed(dict(body), deleted=type == "DELETED")

    acct = (GROUP, VERSION, "accounts")

    @kopf.on.resume(*acct, registry=registry)
    @kopf.on.create(*acct, registry=registry)
    @kopf.on.update(*acct, registry=registry)
    @kopf.timer(*acct, interval=cfg.account_interval_s, registry=registry)
    def account(body: kopf.Body, **_: Any) -> None:
        accounts.refresh_account(dict(body))

    rc = (GROUP, VERSION, "recharges")

    @kopf.on.resume(*rc, registry=registry, when=served)
    @kopf.on.create(*rc, registry=registry, when=served)
    @kopf.timer(*rc, interval=cfg.recharge_interval_s, registry=registry, when=served)
    def recharge(body: kopf.Body, **_: Any) -> None:
        accounts.reconcile_recharge(dict(body))

    review = (GROUP, VERSION, "rechargereviews")

    @kopf.on.resume(*review, registry=registry)
    @kopf.on.create(*review, registry=registry)
    @kopf.timer(*review, interval=cfg.recharge_interval_s, registry=registry)
    def recharge_review(body: kopf.Body, **_: Any) -> None:
        accounts.reconcile_review(dict(body))


def configure(settings: kopf.OperatorSettings, cfg: OperatorConfig) -> None:
    """Kopf settings: progress in annotations (status is schema-pruned), our finalizer,
    events at warning level and up from Kopf itself, a thread pool big enough for
    hundreds of instances."""
    settings.persistence.finalizer = cfg.finalizer
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="gpucloud.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="gpucloud.dev", key="last-handled-configuration"
    )
    settings.posting.level = 30  # logging.WARNING
    settings.execution.max_workers = 16
    settings.watching.server_timeout = 300
    settings.queueing.error_delays = [1, 2, 5, 10]
