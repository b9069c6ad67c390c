"""The gateway's only Kubernetes API access: EndpointSlices in, Deployment scale out.

Not exercised by the gateway's tests (pods on the test bed run no containers, so there
is nothing to proxy to); the local stand-ins are ``FileEndpoints`` and ``CommandScaler``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from gpucloud import ownership
from gpucloud.billing.model_charges import ModelPlan
from gpucloud.crd.account import AccountSpec
from gpucloud.kube_names import GROUP, VERSION
from gpucloud.model_manifests import MODEL_LABEL, MODEL_PORT, deployment_name
from gpucloud_gateway.callers import Directory

log = logging.getLogger(__name__)


def _api_client() -> Any:
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        # KUBECONFIG is read now, not when the kubernetes package was first imported.
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))
    return client


def ready_urls(slices: list[Any]) -> dict[str, list[str]]:
    """``ns/model`` -> ready replica URLs, from EndpointSlice objects (the Service's labels,
    including the model label, are mirrored onto its slices)."""
    out: dict[str, list[str]] = {}
    for sl in slices:
        labels = sl.metadata.labels or {}
        model = labels.get(MODEL_LABEL)
        if not model:
            continue
        port = next((p.port for p in sl.ports or [] if p.name == "http"), MODEL_PORT)
        urls = out.setdefault(f"{sl.metadata.namespace}/{model}", [])
        for ep in sl.endpoints or []:
            if ep.conditions is not None and ep.conditions.ready is False:
                continue
            host = ep.addresses[0]
            urls.append(f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}")
    return out


class EndpointSliceSource:
    """Polls model EndpointSlices in a thread (every ``interval`` s); lookups hit a cache."""

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self._map: dict[str, list[str]] = {}
        self.synced = False  # listed at least once (readiness)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="endpointslices")
        self._thread.start()

    def _run(self) -> None:
        api = _api_client().DiscoveryV1Api()
        while not self._stop.is_set():
            try:
                slices = api.list_endpoint_slice_for_all_namespaces(label_selector=MODEL_LABEL)
                self._map = ready_urls(slices.items)
                self.synced = True
            except Exception:  # keep the last good map through API hiccups
                log.exception("listing EndpointSlices failed")
            self._stop.wait(self.interval)

    def endpoints(self, namespace: str, model: str) -> list[str]:
        return self._map.get(f"{namespace}/{model}", [])

    def close(self) -> None:
        self._stop.set()


class KubeScaler:
    """Wakes a cold model by setting its Deployment's replicas to at least one. The
    operator's next autoscaling pass records the wake in the ModelDeployment's status."""

    def __init__(self) -> None:
        self._apps = _api_client().AppsV1Api()

    async def wake(self, namespace: str, model: str) -> None:
        name = deployment_name(model)

        def patch() -> None:
            scale = self._apps.read_namespaced_deployment_scale(name, namespace)
            if (scale.spec.replicas or 0) < 1:
                self._apps.patch_namespaced_deployment_scale(
                    name, namespace, {"spec": {"replicas": 1}}
                )

        await asyncio.to_thread(patch)

    async def close(self) -> None:
        return None


def plans_from_cluster(
    model_deployments: Iterable[Mapping[str, Any]], accounts: Iterable[Mapping[str, Any]]
) -> list[ModelPlan]:
    """The models to serve: every ModelDeployment whose namespace an Account lists (its
    charges go there; a namespace two Accounts list bills to the one created first, the
    operator's rule). One without an account, or with a spec billing cannot read, is
    left out (logged): serving traffic nobody can be billed for is refused with a 404."""
    owner = ownership.owners(accounts)
    plans = []
    for md in model_deployments:
        meta = md["metadata"]
        account = owner.get(meta["namespace"])
        if account is None:
            log.warning(
                "ModelDeployment %s/%s: no Account lists namespace %s; not served",
                meta["namespace"],
                meta["name"],
                meta["namespace"],
            )
            continue
        try:
            plans.append(ModelPlan.from_resource(md, account))
        except (ValueError, KeyError) as exc:
            log.warning(
                "ModelDeployment %s/%s: %s; not served", meta["namespace"], meta["name"], exc
            )
    return plans


DEFAULT_CURRENCY: str = AccountSpec.model_fields["currency"].default


def directory_from_accounts(accounts: Iterable[Mapping[str, Any]]) -> Directory:
    """Namespace -> account (``spec.namespaces``; the Account that claimed it first, as
    for model owners and in the operator) and account -> ``status.state`` (Active,
    LowBalance, Arrears) and -> ``spec.currency`` (its default when unset)."""
    listed = list(accounts)
    states: dict[str, str] = {}
    currencies: dict[str, str] = {}
    for acct in listed:
        name = acct["metadata"]["name"]
        state = (acct.get("status") or {}).get("state")
        if isinstance(state, str):
            states[name] = state
        currency = (acct.get("spec") or {}).get("currency", DEFAULT_CURRENCY)
        if isinstance(currency, str):
            currencies[name] = currency
    return Directory(ownership.owners(listed), states, currencies)


class GatewayPeers:
    """The replicas of the gateway's own Service (its EndpointSlices), polled in a
    thread: ``/v1/stats`` sums their counts. A replica that is not ready (restarting
    after a crash) stays listed until it terminates: it does not answer, so the sum is
    refused (503) and the operator holds, rather than scaling on a sum without its
    traffic; restarted, it counts its stored requests again."""

    def __init__(self, service: str, namespace: str, port: int, interval: float = 5.0) -> None:
        self.service, self.namespace, self.port = service, namespace, port
        self.interval = interval
        self._urls: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="gateway-peers")
        self._thread.start()

    def _run(self) -> None:
        api = _api_client().DiscoveryV1Api()
        selector = f"kubernetes.io/service-name={self.service}"
        while not self._stop.is_set():
            try:
                slices = api.list_namespaced_endpoint_slice(self.namespace, label_selector=selector)
                urls = []
                for sl in slices.items:
                    for ep in sl.endpoints or []:
                        if ep.conditions is not None and ep.conditions.terminating:
                            continue  # going away for good (scaled down, rolled)
                        host = ep.addresses[0]
                        host = f"[{host}]" if ":" in host else host
                        urls.append(f"http://{host}:{self.port}")
                self._urls = sorted(set(urls))
            except Exception:  # keep the last good list through API hiccups
                log.exception("listing the gateway's EndpointSlices failed")
            self._stop.wait(self.interval)

    def __call__(self) -> list[str]:
        return list(self._urls)

    def close(self) -> None:
        self._stop.set()


class ModelCatalog:
    """Polls ModelDeployments and Accounts in a thread; hands each changed model list and
    account directory to ``on_change`` on the gateway's event loop."""

    def __init__(
        self,
        on_change: Callable[[list[ModelPlan], Directory], None],
        loop: asyncio.AbstractEventLoop,
        interval: float = 2.0,
    ) -> None:
        self.on_change, self.loop, self.interval = on_change, loop, interval
        self._last: tuple[list[ModelPlan], Directory] | None = None
        self.synced = False  # listed at least once (readiness)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="model-catalog")
        self._thread.start()

    def _run(self) -> None:
        api = _api_client().CustomObjectsApi()
        while not self._stop.is_set():
            try:
                mds = api.list_cluster_custom_object(GROUP, VERSION, "modeldeployments")
                accts = api.list_cluster_custom_object(GROUP, VERSION, "accounts")
                plans = plans_from_cluster(mds["items"], accts["items"])
                directory = directory_from_accounts(accts["items"])
                if (plans, directory) != self._last:
                    self._last = (plans, directory)
                    self.loop.call_soon_threadsafe(self.on_change, plans, directory)
                self.synced = True
            except Exception:  # keep serving the last good list through API hiccups
                log.exception("listing ModelDeployments failed")
            self._stop.wait(self.interval)

    def close(self) -> None:
        self._stop.set()
