"""The ModelDeployment reconciler: manifests, autoscaling and online-time billing.

Every scaling pass (``model_interval_s``, about a window) observes the model (its pods
and the gateway's ``/v1/stats``), asks the pure ``gpucloud.autoscale.decide``
what to do, applies it through the edge module (``kube.py``: scale, lowest
pod-deletion-cost on the victims), posts an Event per scaling action and writes status.

Private models (and deployments) are billed for the online time of each replica: a pod
is online from the pass or pod event that first sees it Running until one sees it gone
(instants from the injected clock). Intervals live in the ledger (``replica_online``,
``replica_offline``) keyed by pod UID, and ``settle_model_online`` posts the delta of the
rounded cumulative total with a key naming the total, so a repeated pass (or another
operator replica) posts nothing twice. Nothing is recorded while cold. Public models are
billed per use by the gateway, not here.

What must survive a restart and is not in the CRD's status schema is kept in two
conditions: ``Ready`` (its lastTransitionTime is when the model last became ready) and
``ScaledDown`` (when it last scaled down).
"""

from __future__ import annotations

import json
import logging
import threading
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from gpucloud import ownership
from gpucloud.autoscale import (
    Action,
    AutoscaleError,
    Decision,
    ModelState,
    Observation,
    Replica,
    ScalingPolicy,
    decide,
    hold,
)
from gpucloud.billing import PriceBook, UnknownProduct
from gpucloud.billing.model_charges import ModelBillingError, ModelPlan, Rule
from gpucloud.clock import Clock
from gpucloud.crd import SpecError, parse
from gpucloud.crd.modeldeployment import ModelDeploymentSpec
from gpucloud.crd.pricebook import price_book
from gpucloud.gpu_kinds import shared_count_refusal
from gpucloud.ledger import Ledger
from gpucloud.model_manifests import (
    MODEL_LABEL,
    ManifestError,
    build_model_deployment,
    build_model_service,
    deployment_name,
)
from gpucloud_operator.accounts import money
from gpucloud_operator.config import OperatorConfig
from gpucloud_operator.currency import account_currency, mismatch
from gpucloud_operator.rules import resource_of

log = logging.getLogger("gpucloud.operator.models")

Obj = dict[str, Any]
PLURAL = "modeldeployments"
DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"
VICTIM_COST = "-1000"  # below every replica's default of 0: removed first
EVENT_REASONS = {
    Action.UP: "ScaledUp",
    Action.DOWN: "ScaledDown",
    Action.COLD: "WentCold",
    Action.WAKE: "Woke",
}


class ModelKube(Protocol):
    """The part of ``gpucloud_operator.kube.Kube`` this reconciler uses."""

    def list_cluster_objects(self, plural: str, ttl: float = 0.0) -> list[Obj]: ...
    def get_namespaced_object(self, plural: str, namespace: str, name: str) -> Obj | None: ...
    def get_pricebook(self, name: str, ttl: float = 2.0) -> Obj | None: ...
    def patch_status(self, plural: str, namespace: str | None, name: str, status: Obj) -> Obj: ...
    def get_deployment(self, namespace: str, name: str) -> Obj | None: ...
    def apply_deployment(self, dep: Obj) -> Obj: ...
    def apply_service(self, svc: Obj) -> None: ...
    def scale_deployment(self, namespace: str, name: str, replicas: int) -> None: ...
    def list_pods(self, namespace: str, selector: str) -> list[Obj]: ...
    def patch_pod_annotations(
        self, namespace: str, name: str, annotations: dict[str, str]
    ) -> None: ...
    def event(
        self, obj: Obj, type_: str, reason: str, message: str, now: datetime | None = None
    ) -> None: ...


# -- the gateway's stats ----------------------------------------------------------------


class StatsError(ValueError):
    """Stats that cannot be read or parsed; the pass holds its replicas."""


def _when(value: Any, where: str) -> datetime | None:
    if value is None:
        return None
    try:
        when = datetime.fromisoformat(str(value))
    except ValueError:
        raise StatsError(f"{where}: not an ISO 8601 time: {value!r}") from None
    if when.tzinfo is None:
        raise StatsError(f"{where}: must carry a time zone, got {value!r}")
    return when


def _count(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise StatsError(f"{where}: must be an int >= 0, got {value!r}")
    return value


@dataclass(frozen=True)
class ModelStats:
    """One model's entry of the gateway's ``GET /v1/stats``."""

    requests_last_window: int = 0
    last_request_at: datetime | None = None
    in_flight: int = 0
    queued: int = 0
    replicas: Mapping[str, int] = field(default_factory=dict)  # replica URL -> in flight

    @classmethod
    def from_json(cls, doc: Mapping[str, Any], where: str) -> ModelStats:
        reps = doc.get("replicas") or {}
        if not isinstance(reps, dict):
            raise StatsError(f"{where}.replicas: must be a map of URL to count")
        return cls(
            requests_last_window=_count(
                doc.get("requestsLastWindow", 0), f"{where}.requestsLastWindow"
            ),
            last_request_at=_when(doc.get("lastRequestAt"), f"{where}.lastRequestAt"),
            in_flight=_count(doc.get("inFlight", 0), f"{where}.inFlight"),
            queued=_count(doc.get("queued", 0), f"{where}.queued"),
            replicas={u: _count(n, f"{where}.replicas[{u}]") for u, n in reps.items()},
        )


def parse_stats(doc: Any) -> dict[str, ModelStats]:
    """``{"ns/model": {...}}`` as the gateway serves it."""
    if not isinstance(doc, dict):
        raise StatsError("stats: must be a JSON object keyed by 'namespace/model'")
    return {key: ModelStats.from_json(entry, f"stats[{key}]") for key, entry in doc.items()}


class StatsSource(Protocol):
    def fetch(self) -> dict[str, ModelStats]: ...


class NoStats:
    """No gateway: no traffic is ever seen (models scale on minReplicas only)."""

    def fetch(self) -> dict[str, ModelStats]:
        return {}


class CallableStats:
    """Stats from a function returning the gateway's JSON (tests)."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn

    def fetch(self) -> dict[str, ModelStats]:
        return parse_stats(self.fn())


class FileStats:
    """Stats from a JSON file of the gateway's shape (tests on the test bed); a missing
    file means no traffic."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def fetch(self) -> dict[str, ModelStats]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}
        try:
            return parse_stats(json.loads(text))
        except json.JSONDecodeError as exc:
            raise StatsError(f"{self.path}: not JSON: {exc}") from None


class HttpStats:
    """``GET /v1/stats`` of the gateway (production)."""

    def __init__(self, url: str, timeout_s: float = 5.0) -> None:
        self.url, self.timeout_s = url, timeout_s

    def fetch(self) -> dict[str, ModelStats]:
        try:
            with urllib.request.urlopen(self.url, timeout=self.timeout_s) as resp:
                return parse_stats(json.loads(resp.read()))
        except (OSError, json.JSONDecodeError) as exc:
            raise StatsError(f"{self.url}: {exc}") from None


def stats_source(spec: str) -> StatsSource:
    """From ``model_stats_url``: ``http(s)://...``, ``file:PATH`` or ``none``."""
    if spec == "none":
        return NoStats()
    if spec.startswith("file:"):
        return FileStats(spec[len("file:") :])
    if spec.startswith(("http://", "https://")):
        return HttpStats(spec)
    raise ValueError(f"model_stats_url: must be http(s)://..., file:PATH or none, got {spec!r}")


# -- pure observation -------------------------------------------------------------------


@dataclass(frozen=True)
class PodView:
    name: str
    uid: str
    ip: str | None
    running: bool  # holds its GPUs: billed
    ready: bool
    pending: bool  # not scheduled: waiting for GPU capacity
    deleting: bool
    done: bool  # Succeeded / Failed: released its GPUs


def pod_view(pod: Obj) -> PodView:
    meta, spec, st = pod["metadata"], pod.get("spec") or {}, pod.get("status") or {}
    phase = st.get("phase", "Pending")
    conds = {c.get("type"): c.get("status") for c in st.get("conditions") or []}
    return PodView(
        name=meta["name"],
        uid=meta["uid"],
        ip=st.get("podIP"),
        running=phase == "Running",
        ready=phase == "Running" and conds.get("Ready") == "True",
        pending=phase == "Pending" and not spec.get("nodeName"),
        deleting=meta.get("deletionTimestamp") is not None,
        done=phase in ("Succeeded", "Failed"),
    )


def in_flight_by_pod(pods: list[PodView], stats: ModelStats) -> dict[str, int]:
    """The gateway counts in-flight requests per replica URL; match them to pod IPs."""
    by_ip: dict[str, int] = defaultdict(int)
    for url, n in stats.replicas.items():
        host = urlsplit(url).hostname
        if host:
            by_ip[host] += n
    return {p.name: by_ip.get(p.ip or "", 0) for p in pods}


def observe(
    pods: list[PodView],
    stats: ModelStats,
    desired: int,
    ready_since: datetime | None,
    last_scale_down_at: datetime | None,
) -> Observation:
    """The autoscaler's view: live pods (not terminating, not finished) with their
    in-flight requests, and the model's traffic."""
    live = [p for p in pods if not p.deleting and not p.done]
    flights = in_flight_by_pod(live, stats)
    return Observation(
        replicas=[
            Replica(p.name, ready=p.ready, pending=p.pending, in_flight=flights[p.name])
            for p in live
        ],
        desired=desired,
        requests_last_window=stats.requests_last_window,
        last_request_at=stats.last_request_at,
        ready_since=ready_since,
        last_scale_down_at=last_scale_down_at,
        queued=stats.queued,
    )


def condition(md: Obj, type_: str) -> Obj | None:
    return next(
        (c for c in (md.get("status") or {}).get("conditions") or [] if c.get("type") == type_),
        None,
    )


def condition_time(md: Obj, type_: str, status: str = "True") -> datetime | None:
    c = condition(md, type_)
    if c is None or c.get("status") != status or not c.get("lastTransitionTime"):
        return None
    return datetime.fromisoformat(c["lastTransitionTime"])


def set_condition(
    conds: list[Obj], type_: str, status: str, reason: str, message: str, now: datetime
) -> list[Obj]:
    """Conditions with ``type_`` set; its transition time moves only when status does."""
    old = next((c for c in conds if c["type"] == type_), None)
    since = old["lastTransitionTime"] if old and old["status"] == status else now.isoformat()
    new = {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": since,
    }
    return [c for c in conds if c["type"] != type_] + [new]


def _gpu_request(dep: Obj) -> tuple[Any, ...]:
    """What a Deployment's replicas ask for: node selector and container resources."""
    pod = ((dep.get("spec") or {}).get("template") or {}).get("spec") or {}
    return (
        pod.get("nodeSelector"),
        [c.get("resources") for c in pod.get("containers") or []],
    )


# -- the reconciler ---------------------------------------------------------------------


class Refusal(Exception):
    """The model cannot run now (no account, no price); it is held cold."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class ModelReconciler:
    def __init__(
        self,
        kube: ModelKube,
        ledger: Ledger,
        clock: Clock,
        cfg: OperatorConfig,
        stats: StatsSource | None = None,
    ) -> None:
        self.kube, self.ledger, self.clock, self.cfg = kube, ledger, clock, cfg
        self.stats = stats or stats_source(cfg.model_stats_url)
        self._locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)
        self._guard = threading.Lock()
        self._pb: tuple[str, PriceBook] | None = None
        self._ledger_accounts: set[str] = set()

    # -- entry points -------------------------------------------------------------------
    def reconcile(self, md: Obj, ensure: bool = False) -> Decision | None:
        """One scaling pass. ``ensure``: also (re)apply the Deployment's template and the
        Service (create and spec updates); a timer pass only scales."""
        meta = md["metadata"]
        with self._lock(meta["namespace"], meta["name"]):
            fresh = self.kube.get_namespaced_object(PLURAL, meta["namespace"], meta["name"])
            if fresh is None or fresh["metadata"].get("deletionTimestamp"):
                return None
            return self._pass(fresh, ensure)

    def reconcile_named(self, namespace: str, name: str, ensure: bool = False) -> Decision | None:
        return self.reconcile({"metadata": {"namespace": namespace, "name": name}}, ensure)

    def pod_changed(self, pod: Obj) -> None:
        """A replica changed (ran, ended, vanished): bill its online time at once rather
        than at the next scaling pass."""
        meta = pod.get("metadata") or {}
        name = (meta.get("labels") or {}).get(MODEL_LABEL)
        if not name:
            return
        ns = meta["namespace"]
        with self._lock(ns, name):
            md = self.kube.get_namespaced_object(PLURAL, ns, name)
            if md is None:
                return
            try:
                plan, pb = self._plan(md)
            except Refusal:
                return
            if plan.rule is Rule.ONLINE:
                views = [pod_view(p) for p in self.kube.list_pods(ns, self._selector(md))]
                posted = self._bill(plan, pb, views, self.clock.now())
                self.kube.patch_status(PLURAL, ns, name, {"cost": money(posted, pb.currency)})

    def deleted(self, md: Obj) -> None:
        """The ModelDeployment is being deleted: its replicas stop being billed now
        (Kubernetes collects the Deployment and Service through owner references)."""
        meta = md["metadata"]
        with self._lock(meta["namespace"], meta["name"]):
            try:
                plan, pb = self._plan(md)
            except Refusal:
                return
            if plan.rule is Rule.ONLINE:
                self._bill(plan, pb, [], self.clock.now())

    # -- one pass -----------------------------------------------------------------------
    def _pass(self, md: Obj, ensure: bool) -> Decision | None:
        meta, spec = md["metadata"], md["spec"]
        ns, name = meta["namespace"], meta["name"]
        now = self.clock.now().replace(microsecond=0)
        status: Obj = {"observedGeneration": meta.get("generation")}
        conds = list((md.get("status") or {}).get("conditions") or [])
        try:
            policy = self._policy(parse(ModelDeploymentSpec, spec))
            plan, pb = self._plan(md)
        except (SpecError, AutoscaleError, ManifestError, ModelBillingError) as exc:
            return self._refused(md, status, conds, "InvalidSpec", str(exc), now, ensure)
        except Refusal as exc:
            return self._refused(md, status, conds, exc.reason, str(exc), now, ensure)

        dep = self.kube.get_deployment(ns, deployment_name(name))
        current = int((dep or {}).get("spec", {}).get("replicas") or 0)
        views = [pod_view(p) for p in self.kube.list_pods(ns, self._selector(md))]
        cost: int | None = None
        if plan.rule is Rule.ONLINE:
            cost = self._bill(plan, pb, views, now)

        try:
            stats: ModelStats | None = self.stats.fetch().get(plan.key, ModelStats())
        except StatsError as exc:
            log.warning("model %s: stats unavailable, holding: %s", plan.key, exc)
            stats = None

        ready = sum(1 for v in views if v.ready and not v.deleting)
        # ready_since: when the model last went from no ready replica to some.
        was_ready = condition_time(md, "Ready")
        ready_since = (was_ready or now) if ready else None
        obs_stats = stats or ModelStats()
        obs = observe(views, obs_stats, current, ready_since, condition_time(md, "ScaledDown"))
        if stats is None:  # never scale on missing data; billing above still ran
            decision = hold(obs, "gateway stats unavailable")
        else:
            decision = decide(policy, obs, now)

        built = self._deployment(md, decision.desired)
        if ensure or dep is None or _gpu_request(dep) != _gpu_request(built):
            # also when the price book sells the product as another resource now (or the
            # Deployment predates fractional GPUs): its replicas must ask for that one
            self.kube.apply_deployment(built)
            self.kube.apply_service(build_model_service(md))
        elif decision.desired != current:
            for victim in decision.victims:
                self.kube.patch_pod_annotations(ns, victim, {DELETION_COST: VICTIM_COST})
            self.kube.scale_deployment(ns, deployment_name(name), decision.desired)
        if decision.action is not Action.HOLD:
            self.kube.event(
                md,
                "Normal",
                EVENT_REASONS[decision.action],
                f"{current} -> {decision.desired} replica(s): {decision.reason}",
                now,
            )
            log.info(
                "model %s: %s %s -> %s: %s",
                plan.key,
                decision.action,
                current,
                decision.desired,
                decision.reason,
            )

        conds = set_condition(
            conds,
            "Ready",
            "True" if ready else "False",
            "ReplicaReady" if ready else ("Cold" if not decision.desired else "NoReadyReplica"),
            f"{ready} of {decision.desired} replica(s) ready",
            now,
        )
        if decision.action in (Action.DOWN, Action.COLD):
            conds = [c for c in conds if c["type"] != "ScaledDown"]
            conds = set_condition(conds, "ScaledDown", "True", "ScaledDown", decision.reason, now)
        status |= {
            "state": decision.state.value,
            "replicas": decision.desired,
            "readyReplicas": ready,
            "requestsLastWindow": obs_stats.requests_last_window,
            "lastRequestAt": (
                obs_stats.last_request_at.isoformat() if obs_stats.last_request_at else None
            ),
            "currency": pb.currency,
            "conditions": conds,
        }
        if cost is not None:
            status["cost"] = money(cost, pb.currency)
        self.kube.patch_status(PLURAL, ns, name, status)
        return decision

    def _refused(
        self,
        md: Obj,
        status: Obj,
        conds: list[Obj],
        reason: str,
        message: str,
        now: datetime,
        ensure: bool,
    ) -> None:
        """Nobody can be billed (or the spec is wrong): hold the model at zero."""
        meta = md["metadata"]
        ns, name = meta["namespace"], meta["name"]
        old = condition(md, "Ready")
        if not old or old.get("reason") != reason:
            self.kube.event(md, "Warning", reason, message, now)
        dep = self.kube.get_deployment(ns, deployment_name(name))
        if reason != "InvalidSpec":
            if ensure or dep is None:
                self.kube.apply_deployment(self._deployment(md, 0))
                self.kube.apply_service(build_model_service(md))
            elif (dep.get("spec") or {}).get("replicas"):
                self.kube.scale_deployment(ns, deployment_name(name), 0)
        conds = set_condition(conds, "Ready", "False", reason, message, now)
        status |= {"state": ModelState.COLD.value, "replicas": 0, "conditions": conds}
        self.kube.patch_status(PLURAL, ns, name, status)
        return None

    # -- billing ------------------------------------------------------------------------
    def _bill(self, plan: ModelPlan, pb: PriceBook, pods: list[PodView], now: datetime) -> int:
        """Open an interval for each newly running replica, close those of replicas gone,
        post the online charge up to ``now``; returns the total posted for the model."""
        led = self.ledger
        now = now.replace(microsecond=0)
        known = {iv.replica: iv for iv in led.replica_intervals(plan.key)}
        online = {p.uid for p in pods if p.running and not p.done}
        for uid in sorted(online - known.keys()):
            led.replica_online(plan.key, uid, now)
        for uid, iv in known.items():
            if iv.end is None and uid not in online:
                led.replica_offline(plan.key, uid, now)
        led.settle_model_online(plan, pb, now)
        return led.charges_by_resource(plan.account).get(f"{plan.resource}#online", 0)

    # -- helpers ------------------------------------------------------------------------
    def _policy(self, spec: ModelDeploymentSpec) -> ScalingPolicy:
        """Without spec.scaling, the installation's idle time before going cold."""
        scaling = spec.scaling
        return ScalingPolicy(
            min_replicas=spec.min_replicas,
            max_replicas=spec.max_replicas,
            target_requests_per_replica=scaling.target_requests_per_replica if scaling else 600,
            window_seconds=scaling.window_seconds if scaling else 600,
            cold_after_seconds=(
                scaling.cold_after_seconds if scaling else self.cfg.model_cold_after_s
            ),
        )

    def _plan(self, md: Obj) -> tuple[ModelPlan, PriceBook]:
        ns = md["metadata"]["namespace"]
        accounts = self.kube.list_cluster_objects("accounts", ttl=2.0)
        acct = ownership.account_for(accounts, ns)
        if acct is None:
            raise Refusal("NoAccount", f"no Account lists namespace {ns!r}")
        pb_obj = self.kube.get_pricebook(self.cfg.pricebook)
        if pb_obj is None:
            raise Refusal("NoPriceBook", f"PriceBook {self.cfg.pricebook!r} does not exist")
        version = pb_obj["metadata"].get("resourceVersion", "")
        if self._pb is None or self._pb[0] != version:
            self._pb = (version, price_book(pb_obj))
        pb = self._pb[1]
        plan = ModelPlan.from_resource(md, account=acct["metadata"]["name"])
        try:
            price = pb.gpu_price(plan.product)
        except UnknownProduct as exc:
            raise Refusal("UnknownProduct", f"spec.gpu.product: {exc}") from None
        # a replica takes one time-sliced share, as an instance does (the device plugin
        # refuses a pod asking for more)
        why = shared_count_refusal(
            plan.product, price.unit_kind, plan.gpus_per_replica, "a model replica"
        )
        if why is not None:
            raise Refusal("SharedGPUCount", why)
        currency = account_currency(self.ledger, acct)
        if currency is None:
            msg = f"Account {plan.account!r} has a spec the models refuse"
            raise Refusal("InvalidAccount", msg)
        if wrong := mismatch(plan.account, currency, self.cfg.pricebook, pb.currency):
            raise Refusal("CurrencyMismatch", wrong)
        if plan.account not in self._ledger_accounts:
            self.ledger.ensure_account(plan.account, currency)
            self._ledger_accounts.add(plan.account)
        return plan, pb

    def _deployment(self, md: Obj, replicas: int) -> Obj:
        """The Deployment, its replicas requesting the resource the price book sells the
        product as (``rules.resource_of``, as for an instance's pod; nvidia.com/gpu
        before a price book is read)."""
        pb = self._pb[1] if self._pb is not None else None
        product = ((md.get("spec") or {}).get("gpu") or {}).get("product")
        return build_model_deployment(md, replicas, resource_of(pb, product))

    @staticmethod
    def _selector(md: Obj) -> str:
        return f"{MODEL_LABEL}={md['metadata']['name']}"

    def _lock(self, namespace: str, name: str) -> threading.Lock:
        with self._guard:
            return self._locks[f"{namespace}/{name}"]
