"""The Kopf wiring: every kind has its handlers, timers use the configured intervals
(instances have none: the sweeper runs their passes),
and the settings keep Kopf's bookkeeping out of the (schema-pruned) status."""

from __future__ import annotations

import asyncio

import kopf
from gpucloud_operator.cluster_view import ClusterView
from gpucloud_operator.config import OperatorConfig
from gpucloud_operator.handlers import configure, register
from gpucloud_operator.main import parse_args


def test_handlers_are_registered_for_every_kind() -> None:
    registry = kopf.OperatorRegistry()
    cfg = OperatorConfig(account_interval_s=0.5)
    register(registry, cfg, object(), object())  # type: ignore[arg-type]
    handlers = [
        *registry._spawning.get_all_handlers(),
        *registry._changing.get_all_handlers(),
        *registry._watching.get_all_handlers(),
    ]
    names = {h.selector.any_name for h in handlers if h.selector is not None}
    assert {"gpuinstances", "accounts", "recharges", "rechargereviews", "pods"} <= names
    timers = [h for h in handlers if type(h).__name__ == "TimerHandler"]
    intervals = {h.selector.any_name: h.interval for h in timers}
    assert intervals["accounts"] == 0.5
    assert "gpuinstances" not in intervals  # the sweeper runs their passes, no Kopf timer
    reasons = {h.reason for h in registry._changing.get_all_handlers()}
    assert "delete" in {str(r) for r in reasons}  # the release finalizer


def test_watch_events_of_every_namespace_feed_the_views() -> None:
    registry = kopf.OperatorRegistry()
    view = ClusterView("gpuinstances", lambda: ([], "1"))
    register(
        registry, OperatorConfig(namespaces="team-a"), object(), object(), {"gpuinstances": view}
    )  # type: ignore[arg-type]
    (handler,) = [h for h in registry._watching.get_all_handlers() if h.id == "view-gpuinstances"]
    assert handler.when is None  # not only the served namespaces: they share the nodes
    body = {"metadata": {"namespace": "team-b", "name": "x", "resourceVersion": "5"}}
    asyncio.run(handler.fn(body=kopf.Body(body), type="ADDED"))
    assert [o["metadata"]["name"] for o in view.objects()] == ["x"]
    asyncio.run(
        handler.fn(
            body=kopf.Body(body | {"metadata": body["metadata"] | {"resourceVersion": "6"}}),
            type="DELETED",
        )
    )
    assert view.objects() == []


def test_settings_and_flags() -> None:
    settings = kopf.OperatorSettings()
    configure(settings, OperatorConfig())
    assert settings.persistence.finalizer == "gpucloud.dev/release"
    assert isinstance(settings.persistence.progress_storage, kopf.AnnotationsProgressStorage)
    args, cfg = parse_args(["--standalone", "-n", "a", "-n", "b", "--metering-grace-s", "7"])
    assert args.standalone and cfg.metering_grace_s == 7
    assert cfg.serves("a") and cfg.serves("b") and not cfg.serves("c")
    assert OperatorConfig().serves("anything")
