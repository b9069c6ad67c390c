"""Kopf wiring: thin handlers that hand the body to a reconciler.

Handlers are registered on an explicit registry by ``register()`` because their
intervals come from the configuration. Every handler is synchronous (Kopf runs it in
its thread pool); the reconcilers lock per object, so a sweeper's or timer's pass and a
watch event for the same object never interleave.
"""

from __future__ import annotations

import random
from typing import Any

import kopf

from gpucloud.kube_names import GROUP, MANAGED_BY, VERSION
from gpucloud.model_manifests import MODEL_LABEL
from gpucloud_operator.accounts import AccountReconciler
from gpucloud_operator.cluster_view import ClusterView
from gpucloud_operator.config import OperatorConfig
from gpucloud_operator.instances import InstanceReconciler
from gpucloud_operator.models import ModelReconciler
from gpucloud_operator.storage_items import StorageItems


def namespace_filter(cfg: OperatorConfig) -> Any:
    """Kopf ``when=`` filter: the object's namespace is one this operator serves."""

    def served(namespace: str | None, **_: Any) -> bool:
        return cfg.serves(namespace)

    return served


def register(
    registry: kopf.OperatorRegistry,
    cfg: OperatorConfig,
    instances: InstanceReconciler,
    accounts: AccountReconciler,
    views: dict[str, ClusterView] | None = None,
) -> None:
    gi = (GROUP, VERSION, "gpuinstances")

    served = namespace_filter(cfg)

    def working() -> None:
        """Kopf runs this process's handlers: it is not a paused standby (the sweeper
        sweeps only then, sweeper.py rule 7)."""
        if instances.sweeper is not None:
            instances.sweeper.alive()

    @kopf.on.resume(*gi, registry=registry, when=served)
    @kopf.on.create(*gi, registry=registry, when=served)
    @kopf.on.update(*gi, registry=registry, when=served)
    def instance_changed(body: kopf.Body, **_: Any) -> None:
        working()
        instances.reconcile(dict(body))

    # No timer: the sweeper (instances/sweeper.py, started in main.py) runs a pass when
    # one of the instance's time rules is due; these events run the others.

    @kopf.on.delete(*gi, registry=registry, when=served)
    def instance_released(body: kopf.Body, **_: Any) -> None:
        if not instances.release(dict(body)):
            raise kopf.TemporaryError("waiting for the last usage to settle", delay=1)

    @kopf.on.event("", "v1", "pods", labels=MANAGED_BY, registry=registry, when=served)
    def pod_event(body: kopf.Body, type: str | None, **_: Any) -> None:
        working()
        instances.pod_changed(dict(body), deleted=type == "DELETED")

    @kopf.on.event(
        "", "v1", "persistentvolumeclaims", labels=MANAGED_BY, registry=registry, when=served
    )
    def claim_event(body: kopf.Body, type: str | None, **_: Any) -> None:
        instances.claim_changed(dict(body), deleted=type == "DELETED")

    acct = (GROUP, VERSION, "accounts")

    # Cluster-scoped kinds: an operator limited to some namespaces serves only the
    # accounts and reviews of those namespaces (several test operators share one cluster).
    # Routing only, so read leniently: an object its model refuses must still reach the
    # reconciler, which says why (InvalidSpec).
    def account_served(spec: kopf.Spec, **_: Any) -> bool:
        return any(cfg.serves(ns) for ns in (spec.get("namespaces") or [None]))

    def review_served(spec: kopf.Spec, **_: Any) -> bool:
        return cfg.serves((spec.get("rechargeRef") or {}).get("namespace"))

    @kopf.on.resume(*acct, registry=registry, when=account_served)
    @kopf.on.create(*acct, registry=registry, when=account_served)
    @kopf.on.update(*acct, registry=registry, when=account_served)
    @kopf.timer(*acct, interval=cfg.account_interval_s, registry=registry, when=account_served)
    def account(body: kopf.Body, **_: Any) -> None:
        working()
        accounts.refresh_account(dict(body))

    rc = (GROUP, VERSION, "recharges")

    @kopf.on.resume(*rc, registry=registry, when=served)
    @kopf.on.create(*rc, registry=registry, when=served)
    @kopf.timer(*rc, interval=cfg.recharge_interval_s, registry=registry, when=served)
    def recharge(body: kopf.Body, **_: Any) -> None:
        accounts.reconcile_recharge(dict(body))

    review = (GROUP, VERSION, "rechargereviews")

    @kopf.on.resume(*review, registry=registry, when=review_served)
    @kopf.on.create(*review, registry=registry, when=review_served)
    @kopf.timer(*review, interval=cfg.recharge_interval_s, registry=registry, when=review_served)
    def recharge_review(body: kopf.Body, **_: Any) -> None:
        accounts.reconcile_review(dict(body))

    register_storage(registry, cfg, instances)
    register_views(registry, views or {})


def register_views(registry: kopf.OperatorRegistry, views: dict[str, ClusterView]) -> None:
    """Every event of a viewed kind, of every namespace (placement and admission count
    what other operators' namespaces hold on the same nodes), into its view; of pods,
    those this operator made. Async: a dictionary update needs no worker thread."""
    for plural, view in views.items():
        group, version, labels = (
            ("", "v1", MANAGED_BY) if plural == "pods" else (GROUP, VERSION, None)
        )

        async def seen(
            body: kopf.Body, type: str | None, view: ClusterView = view, **_: Any
        ) -> None:
            if type == "DELETED":
                view.gone(dict(body))
            else:
                view.saw(dict(body))

        kopf.on.event(
            group, version, plural, labels=labels, registry=registry, id=f"view-{plural}"
        )(seen)


# --- arrears, cloud disks and images (docs/arrears.md) ---------------------------------
def register_storage(
    registry: kopf.OperatorRegistry, cfg: OperatorConfig, instances: InstanceReconciler
) -> None:
    """CloudDisk and Image handlers. Arrears shutdown and deletion of instances run in
    the instance and account handlers above (they read the Account's status)."""
    made: list[StorageItems] = []

    def items() -> StorageItems:  # built on first use: shares the instances' clients
        if not made:
            made.append(StorageItems(instances.kube, instances.ledger, instances.clock, cfg))
        return made[0]

    served = namespace_filter(cfg)

    for plural in ("clouddisks", "images"):
        res = (GROUP, VERSION, plural)

        def changed(body: kopf.Body, plural: str = plural, **_: Any) -> None:
            items().reconcile(plural, dict(body))

        def deleted(body: kopf.Body, plural: str = plural, **_: Any) -> None:
            if not items().delete(plural, dict(body)):  # a disk still attached: held
                raise kopf.TemporaryError("attached", delay=cfg.storage_interval_s)

        kopf.on.resume(*res, registry=registry, when=served, id=f"{plural}-resume")(changed)
        kopf.on.create(*res, registry=registry, when=served, id=f"{plural}-create")(changed)
        kopf.timer(
            *res,
            interval=cfg.storage_interval_s,
            registry=registry,
            when=served,
            id=f"{plural}-tick",
        )(changed)
        kopf.on.delete(*res, registry=registry, when=served, id=f"{plural}-delete")(deleted)


# -- ModelDeployments (gpucloud_operator.models) ----------------------------------------
def register_models(
    registry: kopf.OperatorRegistry, cfg: OperatorConfig, models: ModelReconciler
) -> None:
    """ModelDeployment handlers: manifests on create/update, a scaling pass every
    ``model_interval_s``, replica online time billed on pod events, settled on delete."""
    md = (GROUP, VERSION, "modeldeployments")

    served = namespace_filter(cfg)

    @kopf.on.resume(*md, registry=registry, when=served)
    @kopf.on.create(*md, registry=registry, when=served)
    @kopf.on.update(*md, registry=registry, when=served)
    def model_changed(body: kopf.Body, **_: Any) -> None:
        models.reconcile(dict(body), ensure=True)

    @kopf.timer(*md, interval=cfg.model_interval_s, registry=registry, when=served)
    def model_tick(body: kopf.Body, **_: Any) -> None:
        models.reconcile(dict(body))

    @kopf.on.delete(*md, registry=registry, when=served)
    def model_deleted(body: kopf.Body, **_: Any) -> None:
        models.deleted(dict(body))

    @kopf.on.event(
        "", "v1", "pods", labels={MODEL_LABEL: kopf.PRESENT}, registry=registry, when=served
    )
    def model_pod_event(body: kopf.Body, **_: Any) -> None:
        models.pod_changed(dict(body))


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
    settings.peering.priority = cfg.peering_priority or random.randint(1, 2**31 - 1)
    settings.peering.lifetime = cfg.peering_lifetime_s
