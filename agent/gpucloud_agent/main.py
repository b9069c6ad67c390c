"""`gpucloud-agent`: the node agent, and `gpucloud-agent serve-podresources` for test beds.

Every flag has an environment variable (GPUCLOUD_AGENT_<FLAG>, e.g.
GPUCLOUD_AGENT_NODE_NAME); the flag wins. The clock comes from GPUCLOUD_CLOCK.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

from gpucloud.clock import clock_from_env

log = logging.getLogger("gpucloud_agent")


def _env(flag: str, default: Any = None) -> Any:
    return os.environ.get("GPUCLOUD_AGENT_" + flag.upper().replace("-", "_"), default)


def _add(p: argparse.ArgumentParser, flag: str, default: Any = None, **kw: Any) -> None:
    p.add_argument(f"--{flag}", default=_env(flag, default), **kw)


def build_parser() -> argparse.ArgumentParser:
    from gpucloud_agent.podresources.client import DEFAULT_SOCKET
    from gpucloud_agent.shipper import DEFAULT_TOKEN_FILE

    parser = argparse.ArgumentParser(prog="gpucloud-agent", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", help="run the agent (the default)")
    parser.set_defaults(command="run")
    for p in (parser, run):
        _add(p, "node-name", help="this node's name (required)")
        _add(
            p,
            "nvml",
            "real",
            choices=["real", "fake", "none"],
            help="NVML backend (none: meter no GPUs, e.g. the shared-storage meter)",
        )
        _add(p, "fake-config", help="fake NVML: JSON/YAML file {node, labels, capacity}")
        _add(p, "fake-from-kube", action="store_true", help="fake NVML: from the Node's labels")
        _add(p, "kubeconfig", help="kubeconfig (default: in-cluster config)")
        _add(
            p,
            "pod-uid-source",
            None,
            choices=["kube", "derived"],
            help="where pod UIDs come from (default: kube in-cluster or with --kubeconfig)",
        )
        _add(p, "pod-resources-socket", DEFAULT_SOCKET)
        _add(p, "api-url", help="metering API base URL (required)")
        _add(p, "token-file", DEFAULT_TOKEN_FILE)
        _add(p, "wal-dir", "/var/lib/gpucloud-agent/wal")
        _add(p, "wal-segment-bytes", 4 << 20, type=int)
        _add(p, "disk-root", help="root of instances/, disks/, images/ (unset: no disk metering)")
        _add(
            p,
            "disk-kinds",
            "instances,disks,images",
            help="folders under --disk-root this agent meters and wipes: a node's agent "
            "instances,images where disks/ is shared storage metered once elsewhere",
        )
        _add(p, "disk-metrics-interval", 300.0, type=float, help="seconds between disk gauges")
        _add(
            p,
            "wipe-interval",
            30.0,
            type=float,
            help="seconds between fetches of the node's image copies and wipes (needs --disk-root)",
        )
        _add(p, "metrics-address", "0.0.0.0")
        _add(p, "metrics-port", 9400, type=int)
        _add(p, "sample-period", 1.0, type=float, help="seconds between samples")
        _add(
            p,
            "series-retention",
            3600.0,
            type=float,
            help="seconds a gone pod's allocated-seconds series stays on /metrics",
        )
        _add(p, "batch-size", 500, type=int)
        _add(p, "backoff-base", 0.5, type=float)
        _add(p, "backoff-cap", 30.0, type=float)
        _add(p, "log-level", "INFO")
    srv = sub.add_parser("serve-podresources", help="fake pod-resources server for one node")
    srv.add_argument("--node-name", default=_env("node-name"), required=_env("node-name") is None)
    srv.add_argument("--socket", required=True, help="unix socket path to serve on")
    srv.add_argument("--kubeconfig", default=_env("kubeconfig"))
    srv.add_argument("--gpus", type=int, help="GPU count (default: the Node's capacity)")
    return parser


def _fail(msg: str) -> int:
    print(f"gpucloud-agent: {msg}", file=sys.stderr)
    return 2


def _wait_for_signal() -> threading.Event:
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    return done


def serve_podresources(args: argparse.Namespace) -> int:
    try:
        from gpucloud_agent.podresources.fake_server import (
            DeviceIds,
            KubePodSource,
            fake_device_ids,
            node_device_ids,
            serve,
        )
    except ModuleNotFoundError as exc:  # grpcio/protobuf: the dev install's, not the agent's
        return _fail(f"serve-podresources is a test-bed tool and needs {exc.name} "
                     "(pip install 'gpucloud[dev]')")  # fmt: skip

    ids: DeviceIds = (
        fake_device_ids(args.node_name, args.gpus)
        if args.gpus is not None
        else node_device_ids(args.node_name, args.kubeconfig)
    )
    source = KubePodSource(args.node_name, args.kubeconfig)
    server = serve(args.socket, source, ids)
    counts = ids if isinstance(ids, dict) else {"nvidia.com/gpu": ids}
    log.info("serving pod-resources for %s (%s) on %s", args.node_name,
             ", ".join(f"{len(v)} {k}" for k, v in counts.items()), args.socket)  # fmt: skip
    _wait_for_signal().wait()
    server.stop(grace=1).wait()
    return 0


def run_agent(args: argparse.Namespace) -> int:
    from gpucloud.usage_rules import UsageKind
    from gpucloud_agent.agent import Agent, AgentConfig
    from gpucloud_agent.disk import LAYOUT, parse_kinds
    from gpucloud_agent.httpclient import HTTPError
    from gpucloud_agent.kubeapi import KubeApi, KubeApiError
    from gpucloud_agent.metrics import AgentCollector, Collector, serve_http
    from gpucloud_agent.nvml import NoGpus, Nvml, NvmlBackend, NvmlError
    from gpucloud_agent.podresources.client import PodResourcesClient
    from gpucloud_agent.pods import DerivedUidResolver, KubeUidResolver, PodUidResolver
    from gpucloud_agent.shipper import Shipper
    from gpucloud_agent.wal import Wal

    if not args.node_name:
        return _fail("--node-name (or GPUCLOUD_AGENT_NODE_NAME) is required")
    if not args.api_url:
        return _fail("--api-url (or GPUCLOUD_AGENT_API_URL) is required")
    try:
        disk_kinds = parse_kinds(args.disk_kinds)
    except ValueError as exc:
        return _fail(str(exc))
    if args.series_retention < 0:
        return _fail("--series-retention must not be negative")
    clock = clock_from_env()
    nvml: Nvml
    if args.nvml == "none":
        nvml = NoGpus()
    elif args.nvml == "real":
        try:
            nvml = NvmlBackend()
        except NvmlError as exc:
            return _fail(str(exc))
    else:
        from gpucloud_agent.fake_nvml import FakeNvml

        if args.fake_config:
            nvml = FakeNvml.from_config(args.fake_config, clock)
        elif args.fake_from_kube:
            try:
                labels, capacity = KubeApi.from_flags(args.kubeconfig).node(args.node_name)
            except (KubeApiError, HTTPError) as exc:
                return _fail(f"--fake-from-kube: reading Node {args.node_name}: {exc}")
            nvml = FakeNvml.from_node_labels(args.node_name, labels, capacity, clock)
        else:
            return _fail("--nvml fake needs --fake-config or --fake-from-kube")
    uid_source = args.pod_uid_source or (
        "kube" if args.kubeconfig or os.environ.get("KUBERNETES_SERVICE_HOST") else "derived"
    )
    try:
        resolver: PodUidResolver = (
            KubeUidResolver(args.node_name, args.kubeconfig)
            if uid_source == "kube"
            else DerivedUidResolver()
        )
    except KubeApiError as exc:
        return _fail(f"--pod-uid-source kube: {exc}")
    podres = PodResourcesClient(args.pod_resources_socket)
    wal = Wal(args.wal_dir, args.wal_segment_bytes)
    agent = Agent(
        AgentConfig(
            node=args.node_name,
            sample_period_s=args.sample_period,
            disk_root=args.disk_root,
            disk_metrics_interval_s=args.disk_metrics_interval,
            disk_kinds=disk_kinds,
            series_retention_s=args.series_retention,
        ),
        nvml,
        podres.holders,
        resolver,
        wal,
        clock,
    )
    shipper = Shipper(
        wal,
        args.api_url,
        args.token_file,
        batch_size=args.batch_size,
        backoff_base_s=args.backoff_base,
        backoff_cap_s=args.backoff_cap,
    )
    collectors: list[Collector] = [
        AgentCollector(
            agent.stats,
            lambda: wal.backlog,
            lambda: shipper.errors_total,
            shipper.dead_letters.snapshot,
        )
    ]
    wiper = None
    if args.disk_root:
        # only nodes that keep instance volumes wipe and copy: the rest skip these imports
        from gpucloud_agent.imagecopy import ImageCopier, ImageCopyCollector
        from gpucloud_agent.wipe import WipeCollector, Wiper

        copier = None
        if {UsageKind.INSTANCE_VOLUME, UsageKind.IMAGE} <= disk_kinds:
            # images are copied from an instance's folder on the node that holds both
            copier = ImageCopier(
                args.node_name, args.api_url, args.disk_root, shipper.client, shipper.headers
            )
        try:
            wiper = Wiper(
                args.node_name,
                args.api_url,
                args.disk_root,
                shipper.client,
                shipper.headers,
                args.wipe_interval,
                copier,
                folders=tuple(LAYOUT[k] for k in LAYOUT if k in disk_kinds),
            )
        except ValueError as exc:
            return _fail(str(exc))
        collectors.append(WipeCollector(wiper))
        if copier is not None:
            collectors.append(ImageCopyCollector(copier))
    http = serve_http(
        args.metrics_address, args.metrics_port, collectors, agent.ready, agent.debug_state
    )
    done = _wait_for_signal()
    threading.Thread(target=shipper.run, name="shipper", daemon=True).start()
    loop = threading.Thread(target=agent.run, name="sampler", daemon=True)
    loop.start()
    if wiper is not None:
        threading.Thread(target=wiper.run, name="wiper", daemon=True).start()
    log.info("agent for node %s started, metrics on :%d", args.node_name, http.server_port)
    done.wait()
    agent.stop()
    loop.join(timeout=5)
    if wiper is not None:
        wiper.stop()
    shipper.stop()
    http.shutdown()
    http.server_close()
    wal.close()
    nvml.close()
    podres.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(args, "log_level", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.command == "serve-podresources":
        return serve_podresources(args)
    return run_agent(args)


if __name__ == "__main__":
    sys.exit(main())
