"""The edge: every Kubernetes API call of the operator lives here (import-linter checks
that no other module of the package imports ``kubernetes``).

``Kube`` wraps the official client. Methods return plain dicts (the JSON the API
server sent), so the rest of the operator never sees client model classes. A missing
object is ``None`` on reads and not an error on deletes.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import threading
import time
import uuid
from datetime import datetime
from typing import Any

import kubernetes
from kubernetes.client.rest import ApiException

from gpucloud.gpu_kinds import offered_product
from gpucloud.kube_names import GPU_RESOURCE, GROUP, MANAGED_BY, PRODUCT_LABEL, VERSION
from gpucloud_operator.cluster_view import ClusterView, pod_row
from gpucloud_operator.placement import NodeGPUs

Obj = dict[str, Any]
MERGE_PATCH = "application/merge-patch+json"
MANAGED_SELECTOR = ",".join(f"{k}={v}" for k, v in MANAGED_BY.items())


class Kube:
    def __init__(self, kubeconfig: str | None = None) -> None:
        try:
            kubernetes.config.load_incluster_config()
        except kubernetes.config.ConfigException:
            kubernetes.config.load_kube_config(config_file=kubeconfig)
        cfg = kubernetes.client.Configuration.get_default_copy()
        cfg.connection_pool_maxsize = 32
        self.client = kubernetes.client.ApiClient(cfg)
        self.core = kubernetes.client.CoreV1Api(self.client)
        self.custom = kubernetes.client.CustomObjectsApi(self.client)
        self.apps = kubernetes.client.AppsV1Api(self.client)
        self._init_cache()

    def _init_cache(self) -> None:
        """The empty cache of ``_cached`` (tests use it without a cluster)."""
        self._cache: dict[str, tuple[float, Any]] = {}
        self._cache_lock = threading.Lock()
        self._forgotten: dict[str, float] = {}  # key -> when forget() dropped it
        self._loading: dict[str, threading.Lock] = {}
        self.views: dict[str, ClusterView] = {}  # plural -> its watch-fed table

    def keep_view(self, plural: str, resync_s: float = 60.0) -> ClusterView:
        """Answer cached lists of ``plural`` from a table fed by watch events
        (``ClusterView``); the caller routes the events of its watch to the view.
        ``pods``: the pods this operator made (``MANAGED_BY``), for ``seen_pod``."""
        if plural == "pods":
            view = ClusterView(plural, self._list_managed_pods, resync_s, row=pod_row)
        else:
            view = ClusterView(plural, lambda: self._list_with_version(plural), resync_s)
        self.views[plural] = view
        return view

    def _list_managed_pods(self) -> tuple[list[Obj], str]:
        out = self._request("GET", "/api/v1/pods", query=[("labelSelector", MANAGED_SELECTOR)])
        return list(out.get("items", [])), str(out.get("metadata", {}).get("resourceVersion", ""))

    # -- helpers ------------------------------------------------------------------
    def _json(self, call: Any, *args: Any, **kwargs: Any) -> Obj | None:
        """The object as JSON, or None when it does not exist."""
        try:
            return self._raw(call, *args, **kwargs)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def _request(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: list[tuple[str, str]] | None = None,
        content_type: str | None = None,
    ) -> Obj:
        """One request on the hot paths of a pass, answered as JSON. The generated API
        methods validate their arguments with pydantic (a whole pod body is built into a
        model and back), which took a third of the operator's CPU in a burst of starts;
        this goes through the same client (auth, TLS, retries) without it."""
        headers = {"Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        request = self.client.param_serialize(
            method=method,
            resource_path=path,
            query_params=query or [],
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        resp = self.client.call_api(*request)
        data = resp.read()
        if not 200 <= resp.status <= 299:
            raise ApiException.from_response(
                http_resp=resp, body=data.decode("utf-8", "replace"), data=None
            )
        return json.loads(data)

    def _get(self, path: str) -> Obj | None:
        try:
            return self._request("GET", path)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def _create(self, path: str, body: Obj) -> Obj | None:
        """Create; None when it exists already."""
        try:
            return self._request("POST", path, body)
        except ApiException as exc:
            if exc.status == 409:
                return None
            raise

    def _cached(self, key: str, ttl: float, load: Any) -> Any:
        """``load()``'s value, reused for ``ttl`` seconds. One thread loads a key at a
        time: the others wait for its answer instead of all asking the API server at
        once when the entry expires (a burst of passes would multiply every list)."""
        with self._cache_lock:
            hit = self._fresh(key, ttl, time.monotonic())
            if hit is not None:
                return hit[1]
            loading = self._loading.setdefault(key, threading.Lock())
        with loading:
            now = time.monotonic()
            with self._cache_lock:
                hit = self._fresh(key, ttl, now)
            if hit is not None:
                return hit[1]
            value = load()
            with self._cache_lock:
                self._cache[key] = (now, value)
            return value

    def _fresh(self, key: str, ttl: float, now: float) -> tuple[float, Any] | None:
        """The cache entry of ``key`` if younger than ``ttl`` and loaded after the last
        ``forget`` of it (a load that began before is as stale as the entry). Under
        ``_cache_lock``."""
        hit = self._cache.get(key)
        if hit is None or now - hit[0] >= ttl or hit[0] <= self._forgotten.get(key, -1.0):
            return None
        return hit

    def forget(self, plural: str) -> None:
        """Drop the cached list of ``plural``: this process just wrote something the
        next reader must see (an Account entering arrears, read by its instances). A
        view needs no forgetting: ``patch_status`` feeds it the write's answer."""
        with self._cache_lock:
            self._forgotten[f"list:{plural}"] = time.monotonic()

    # -- custom resources -----------------------------------------------------------
    def get_cluster_object(self, plural: str, name: str) -> Obj | None:
        return self._json(self.custom.get_cluster_custom_object, GROUP, VERSION, plural, name)

    def list_cluster_objects(self, plural: str, ttl: float = 0.0) -> list[Obj]:
        """Every object of ``plural``. ``ttl`` > 0: an answer that old will do, from the
        kind's view if it has one (as fresh as the watch), else a list cached that long;
        0: a list read now."""
        if ttl:
            view = self.views.get(plural)
            if view is not None:
                return view.objects()
            return self._cached(f"list:{plural}", ttl, lambda: self._list_with_version(plural)[0])
        return self._list_with_version(plural)[0]

    def _list_with_version(self, plural: str) -> tuple[list[Obj], str]:
        out = self._request("GET", f"/apis/{GROUP}/{VERSION}/{plural}")
        return list(out.get("items", [])), str(out.get("metadata", {}).get("resourceVersion", ""))

    def get_namespaced_object(self, plural: str, namespace: str, name: str) -> Obj | None:
        return self._get(f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{plural}/{name}")

    def get_pricebook(self, name: str, ttl: float = 2.0) -> Obj | None:
        return self._cached(
            f"pricebook:{name}", ttl, lambda: self.get_cluster_object("pricebooks", name)
        )

    def patch_status(self, plural: str, namespace: str | None, name: str, status: Obj) -> Obj:
        """A JSON merge patch of .status (None values delete fields)."""
        scope = "" if namespace is None else f"namespaces/{namespace}/"
        path = f"/apis/{GROUP}/{VERSION}/{scope}{plural}/{name}/status"
        obj = self._request("PATCH", path, {"status": status}, content_type=MERGE_PATCH)
        self._saw(plural, obj)
        return obj

    def _saw(self, plural: str, obj: Obj | None) -> None:
        """A write's answer or a fresh read into the kind's view, if it has one: readers
        after it see it without waiting for the watch."""
        view = self.views.get(plural)
        if view is not None and obj is not None:
            view.saw(obj)

    # -- pods, volumes ------------------------------------------------------------
    def get_pod(self, namespace: str, name: str) -> Obj | None:
        pod = self._get(f"/api/v1/namespaces/{namespace}/pods/{name}")
        self._saw("pods", pod)
        return pod

    def seen_pod(self, namespace: str, name: str) -> Obj | None:
        """The pod as the watch last showed it (``get_pod`` without a pods view), as
        the view keeps it: only ``cluster_view.pod_row``'s fields. For a check repeated on
        every tick; what it says is gone, ask ``get_pod`` again."""
        view = self.views.get("pods")
        return self.get_pod(namespace, name) if view is None else view.get(namespace, name)

    def create_pod(self, pod: Obj) -> Obj:
        ns = pod["metadata"]["namespace"]
        created = self._create(f"/api/v1/namespaces/{ns}/pods", pod)
        if created is not None:
            self._saw("pods", created)
            return created
        existing = self.get_pod(ns, pod["metadata"]["name"])  # an earlier, interrupted attempt
        if existing is None:
            raise ApiException(status=409, reason=f"pod {ns}/{pod['metadata']['name']} conflict")
        return existing

    def delete_pod(self, namespace: str, name: str, grace_s: int | None = None) -> None:
        try:
            self.core.delete_namespaced_pod(name, namespace, grace_period_seconds=grace_s)
        except ApiException as exc:
            if exc.status != 404:
                raise

    def patch_pod_labels(self, namespace: str, name: str, labels: dict[str, str]) -> None:
        try:
            self.core.patch_namespaced_pod(name, namespace, {"metadata": {"labels": labels}})
        except ApiException as exc:
            if exc.status != 404:
                raise

    def ensure_pvc(self, pvc: Obj) -> Obj | None:
        """Create the claim if missing; the claim as it is now (None: gone meanwhile)."""
        ns, name = pvc["metadata"]["namespace"], pvc["metadata"]["name"]
        path = f"/api/v1/namespaces/{ns}/persistentvolumeclaims"
        return self._create(path, pvc) or self._get(f"{path}/{name}")

    def annotate_pvc(self, namespace: str, name: str, annotations: dict[str, str]) -> None:
        path = f"/api/v1/namespaces/{namespace}/persistentvolumeclaims/{name}"
        body = {"metadata": {"annotations": annotations}}
        try:
            self._request("PATCH", path, body, content_type=MERGE_PATCH)
        except ApiException as exc:
            if exc.status != 404:
                raise

    def ensure_pv(self, pv: Obj) -> None:
        self._create("/api/v1/persistentvolumes", pv)

    def pvc_bound(self, namespace: str, name: str) -> bool:
        pvc = self._get(f"/api/v1/namespaces/{namespace}/persistentvolumeclaims/{name}")
        return bool(pvc) and (pvc.get("status") or {}).get("phase") == "Bound"

    def get_pv(self, name: str) -> Obj | None:
        return self._json(self.core.read_persistent_volume, name)

    def delete_pvc(self, namespace: str, name: str) -> None:
        try:
            self.core.delete_namespaced_persistent_volume_claim(name, namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise

    def delete_pv(self, name: str) -> None:
        try:
            self.core.delete_persistent_volume(name)
        except ApiException as exc:
            if exc.status != 404:
                raise

    # -- capacity -----------------------------------------------------------------
    def _raw(self, call: Any, *args: Any, **kwargs: Any) -> Obj:
        """The response as JSON, skipping the client's model classes (10x cheaper on
        lists of hundreds of pods)."""
        resp = call(*args, _preload_content=False, **kwargs)
        return json.loads(resp.data)

    def gpu_nodes(self, resource: str = GPU_RESOURCE) -> list[NodeGPUs]:
        """The nodes' units of ``resource`` (whole GPUs, one MIG profile, time-sliced
        shares: each its own pool), with the product each node sells through it."""

        def load() -> list[NodeGPUs]:
            nodes = self._raw(self.core.list_node, label_selector=PRODUCT_LABEL)["items"]
            out = []
            for n in nodes:
                label = (n["metadata"].get("labels") or {}).get(PRODUCT_LABEL)
                allocatable = (n.get("status", {}).get("allocatable") or {}).get(resource, "0")
                out.append(
                    NodeGPUs(
                        name=n["metadata"]["name"],
                        product=None if label is None else offered_product(label, resource),
                        allocatable=int(allocatable),
                        schedulable=not n.get("spec", {}).get("unschedulable", False),
                    )
                )
            return out

        return self._cached(f"nodes:{resource}", 5.0, load)

    def gpu_pods(self, ttl: float = 0.0, resource: str = GPU_RESOURCE) -> list[Obj]:
        """Every scheduled, unfinished pod that requests ``resource``, as JSON (all
        namespaces)."""
        load = functools.partial(self._gpu_pods, resource)
        return self._cached(f"gpu_pods:{resource}", ttl, load) if ttl else load()

    def _gpu_pods(self, resource: str) -> list[Obj]:
        pods = self._raw(
            self.core.list_pod_for_all_namespaces,
            field_selector="status.phase!=Succeeded,status.phase!=Failed",
        )["items"]
        out = []
        for p in pods:
            meta, spec = p["metadata"], p.get("spec") or {}
            if not spec.get("nodeName"):
                continue
            gpus = sum(
                int(((c.get("resources") or {}).get("limits") or {}).get(resource, "0"))
                for c in spec.get("containers") or []
            )
            if gpus:
                out.append(
                    {
                        "namespace": meta["namespace"],
                        "name": meta["name"],
                        "labels": meta.get("labels") or {},
                        "node": spec["nodeName"],
                        "gpus": gpus,
                        "deleting": meta.get("deletionTimestamp") is not None,
                    }
                )
        return out

    # -- model deployments (gpucloud_operator.models) ------------------------------
    def get_deployment(self, namespace: str, name: str) -> Obj | None:
        try:
            return self._raw(self.apps.read_namespaced_deployment, name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def apply_deployment(self, dep: Obj) -> Obj:
        """Create the Deployment, or merge-patch an existing one to match ``dep``. A
        strategic merge patch merges maps key by key, so each container's ``resources``
        is replaced whole (``$patch: replace``): a product now sold as another resource
        (a MIG profile instead of nvidia.com/gpu) must not keep asking for the old one."""
        ns, name = dep["metadata"]["namespace"], dep["metadata"]["name"]
        try:
            return self._raw(self.apps.create_namespaced_deployment, ns, dep)
        except ApiException as exc:
            if exc.status != 409:
                raise
        patch = copy.deepcopy(dep)
        for c in patch["spec"]["template"]["spec"]["containers"]:
            if "resources" in c:
                c["resources"] = {"$patch": "replace", **c["resources"]}
        return self._raw(self.apps.patch_namespaced_deployment, name, ns, patch)

    def apply_service(self, svc: Obj) -> None:
        """Create the Service if missing (its spec is fixed by the ModelDeployment's name)."""
        try:
            self.core.create_namespaced_service(svc["metadata"]["namespace"], svc)
        except ApiException as exc:
            if exc.status != 409:
                raise

    def scale_deployment(self, namespace: str, name: str, replicas: int) -> None:
        """Set spec.replicas through the scale subresource (as the gateway's wake does)."""
        self.apps.patch_namespaced_deployment_scale(
            name, namespace, {"spec": {"replicas": replicas}}
        )

    def list_pods(self, namespace: str, selector: str) -> list[Obj]:
        return list(
            self._raw(self.core.list_namespaced_pod, namespace, label_selector=selector)["items"]
        )

    def patch_pod_annotations(
        self, namespace: str, name: str, annotations: dict[str, str]
    ) -> Obj | None:
        """Merge ``annotations`` into the pod's; the pod as patched (None: no such pod)."""
        path = f"/api/v1/namespaces/{namespace}/pods/{name}"
        body = {"metadata": {"annotations": annotations}}
        try:
            return self._request("PATCH", path, body, content_type=MERGE_PATCH)
        except ApiException as exc:
            if exc.status != 404:
                raise
            return None

    # -- events -------------------------------------------------------------------
    def event(
        self, obj: Obj, type_: str, reason: str, message: str, now: datetime | None = None
    ) -> None:
        """A core/v1 Event on ``obj`` (kubectl describe shows it). Best effort."""
        meta = obj["metadata"]
        ns = meta.get("namespace") or "default"
        stamp = (now or datetime.now().astimezone()).isoformat()
        body = {
            "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:16]}", "namespace": ns},
            "involvedObject": {
                "apiVersion": obj.get("apiVersion", f"{GROUP}/{VERSION}"),
                "kind": obj.get("kind"),
                "name": meta["name"],
                "namespace": meta.get("namespace"),
                "uid": meta.get("uid"),
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": "gpucloud-operator"},
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
            "reportingComponent": "gpucloud-operator",
        }
        # an event is a notification; losing one must not break billing
        with contextlib.suppress(ApiException):
            self._request("POST", f"/api/v1/namespaces/{ns}/events", body)
