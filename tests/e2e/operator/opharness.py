"""Runs the operator as a real process against the test bed, with its own SQLite ledger
and a file clock the test advances."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml

from gpucloud.api.testserver import ApiProcess, agent_token
from gpucloud.clock import FileClock
from gpucloud.ledger import EntryKind, Ledger, open_ledger
from gpucloud.testing.kube import get_json, wait_for
from gpucloud.testing.net import free_port
from gpucloud.testing.testbed import REPO, NodeSpec, Testbed, build_node

T0 = datetime(2026, 1, 1, tzinfo=UTC)


class Harness:
    def __init__(self, tb: Testbed, namespace: str, tmp: Path, **settings: Any) -> None:
        self.tb, self.ns, self.tmp = tb, namespace, tmp
        self.account = namespace  # one Account per test, named after its namespace
        self.clock = FileClock(tmp / "clock")
        self.clock.set(T0)
        self.ledger_url = f"sqlite:///{tmp / 'ledger.db'}"
        self.ledger: Ledger = open_ledger(self.ledger_url, clock=self.clock)
        self.settings = {
            "tick_interval_s": "0.5",
            # a pass at least every 2 s: a test that changes what no event announces
            # (a price book, an Account) sees it within its waits
            "sweep_max_interval_s": "2",
            "account_interval_s": "1",
            "recharge_interval_s": "0.5",
            "metering_grace_s": "60",
            "preemption_grace_s": "120",
            "namespaces": namespace,
            **{k: str(v) for k, v in settings.items()},
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = tmp / "operator.log"
        # Who the operator is: the test bed's admin, or (tests/chart) a ServiceAccount's
        # kubeconfig with its peering instead of --standalone.
        self.kubeconfig: Path = tb.kubeconfig
        self.mode_args: list[str] = ["--standalone"]

    # -- the operator process --------------------------------------------------------
    def start(self, crash_at: str | None = None) -> None:
        """Start the operator and wait until it is live. ``crash_at``: a crash point
        (gpucloud_operator.crash) where it SIGKILLs itself; then wait for that instead."""
        port = free_port()
        env = dict(os.environ)
        env.pop("GPUCLOUD_OPERATOR_CRASH_AT", None)
        if crash_at is not None:
            env["GPUCLOUD_OPERATOR_CRASH_AT"] = crash_at
        env |= {
            "KUBECONFIG": str(self.kubeconfig),
            "GPUCLOUD_LEDGER_URL": self.ledger_url,
            "GPUCLOUD_CLOCK": f"file:{self.clock.path}",
        }
        env |= {f"GPUCLOUD_OPERATOR_{k.upper()}": v for k, v in self.settings.items()}
        cmd = [
            sys.executable,
            "-m",
            "gpucloud_operator.main",
            *self.mode_args,
            "--all-namespaces",
            "--liveness",
            f"http://127.0.0.1:{port}/healthz",
        ]
        out = self.log.open("ab")
        self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        if crash_at is not None:
            self._wait_crash(crash_at)
            return

        def live() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"operator exited:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):
                    return True
            except OSError:
                return False

        wait_for(live, timeout=60, what="the operator's liveness endpoint")

    def _wait_crash(self, point: str, timeout: float = 60) -> None:
        proc = self.proc
        assert proc is not None
        wait_for(lambda: proc.poll() is not None, timeout=timeout, what=f"crash point {point}")
        self.proc = None
        assert proc.returncode == -signal.SIGKILL, self.log.read_text()[-3000:]
        assert f"crash point {point}: SIGKILL" in self.log.read_text()

    def kill(self) -> None:
        """SIGKILL: no cleanup, no final patches."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def close(self) -> None:
        self.stop()
        self.tb.kubectl("delete", "account", self.account, "--wait=false", check=False)
        self.ledger.close()

    # -- cluster objects --------------------------------------------------------------
    def setup(self, instance_limit: int = 5) -> None:
        self.tb.kubectl("apply", "-f", str(REPO / "examples" / "pricebook.yaml"))
        self.tb.apply(
            [
                {
                    "apiVersion": "gpucloud.dev/v1alpha1",
                    "kind": "Account",
                    "metadata": {"name": self.account},
                    "spec": {"namespaces": [self.ns], "instanceLimit": instance_limit},
                }
            ]
        )
        self.ledger.ensure_account(self.account, "CNY")

    def fund(self, minor: int, key: str = "fund") -> None:
        self.ledger.post_entry(
            self.account, EntryKind.RECHARGE, minor, f"{self.ns}:{key}", at=self.clock.now()
        )

    def instance(
        self,
        name: str,
        product: str,
        count: int = 1,
        *,
        spot: dict[str, Any] | None = None,
        **billing: Any,
    ) -> None:
        """Apply a GPUInstance; ``billing`` is spec.billing, ``spot`` spec.spot."""
        billing.setdefault("mode", "PayAsYouGo")
        doc: dict[str, Any] = {
            "apiVersion": "gpucloud.dev/v1alpha1",
            "kind": "GPUInstance",
            "metadata": {"name": name, "namespace": self.ns},
            "spec": {
                "gpu": {"product": product, "count": count},
                "billing": billing,
                "storage": {"quotaGi": 50},
                "state": "Running",
            },
        }
        if spot is not None:
            doc["spec"]["spot"] = spot
        self.tb.kubectl("apply", "-f", "-", input=yaml.safe_dump(doc))

    def patch_spec(self, name: str, spec: dict[str, Any]) -> None:
        self.tb.kubectl(
            "patch",
            "gpuinstance",
            name,
            "-n",
            self.ns,
            "--type=merge",
            "-p",
            json.dumps({"spec": spec}),
        )

    def get(self, name: str) -> dict[str, Any]:
        return get_json(self.tb, "gpuinstance", name, "-n", self.ns)

    def status(self, name: str) -> dict[str, Any]:
        return self.get(name).get("status") or {}

    def wait_phase(self, name: str, phase: str, timeout: float = 60) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            st = self.status(name)
            return st if st.get("phase") == phase else None

        return wait_for(check, timeout=timeout, what=f"{name} to be {phase}")  # type: ignore[return-value]

    def wait(self, predicate: Callable[[], object], what: str, timeout: float = 60) -> Any:
        return wait_for(predicate, timeout=timeout, what=what)

    def advance(self, seconds: float) -> datetime:
        return self.clock.advance(timedelta(seconds=seconds))

    def charges(self) -> int:
        return -sum(
            e.amount_minor
            for e in self.ledger.entries(self.account, limit=10_000)
            if e.amount_minor < 0
        )

    def entries(self, prefix: str) -> list[Any]:
        return [
            e for e in self.ledger.entries(self.account, limit=10_000) if e.key.startswith(prefix)
        ]

    def events(self, name: str) -> list[str]:
        out = get_json(
            self.tb, "events", "-n", self.ns, "--field-selector", f"involvedObject.name={name}"
        )
        return [e["reason"] for e in out["items"]]

    def pod(self, name: str) -> dict[str, Any] | None:
        proc = self.tb.kubectl(
            "get", "pod", f"{name}-gpu", "-n", self.ns, "-o", "json", check=False
        )
        return yaml.safe_load(proc.stdout) if proc.returncode == 0 else None


@contextmanager
def fake_node(tb: Testbed, spec: NodeSpec) -> Iterator[str]:
    """A kwok node of this test only (its GPUs are no other test's), removed after."""
    tb.apply([build_node(spec)])
    try:
        tb.kubectl("wait", "--for=condition=Ready", f"node/{spec.name}", "--timeout=60s")
        yield spec.name
    finally:
        tb.kubectl("delete", "node", spec.name, "--wait=false", check=False)


@contextmanager
def node_agent(h: Harness, node: str, *, gpus: bool = False) -> Iterator[str]:
    """The metering API on the operator's ledger and a real agent process for ``node``
    whose disk root is the data root: it makes the images and removes the node-local
    folders the operator asks for. It records disk use only once an hour of the test's
    file clock ends. It meters no GPU unless ``gpus``: then a fake pod-resources server
    (``serve-podresources``) hands the node's device IDs (whole GPUs, MIG devices,
    time-slicing replicas, from its capacity) to the pods the scheduler bound there, and
    the agent samples every 0.2 s and names pods by their real UIDs. Yields the agent's
    metrics URL (``/debug/state``)."""
    tmp = h.tmp / f"agent-{node}"
    tmp.mkdir(exist_ok=True)
    api = ApiProcess(
        tmp / "api", database_url=h.ledger_url, nodes=[node], clock=f"file:{h.clock.path}"
    ).start()
    token = tmp / "agent-token"
    token.write_text(agent_token(node))
    log = (tmp / "agent.log").open("ab")
    port = free_port()
    sock = tmp / ("kubelet.sock" if gpus else "no-pod-resources.sock")
    podres: subprocess.Popen[bytes] | None = None
    extra: list[str] = ["--pod-uid-source", "derived"]
    if gpus:
        podres = subprocess.Popen(
            [sys.executable, "-m", "gpucloud_agent.main", "serve-podresources", "--node-name",
             node, "--socket", str(sock), "--kubeconfig", str(h.tb.kubeconfig)],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        wait_for(sock.exists, timeout=30, what=f"the pod-resources socket of {node}")
        extra = ["--pod-uid-source", "kube", "--sample-period", "0.2"]
    # fmt: off
    agent = subprocess.Popen(
        [
            sys.executable, "-m", "gpucloud_agent.main", "run", "--node-name", node,
            "--nvml", "fake", "--fake-from-kube", "--kubeconfig", str(h.tb.kubeconfig),
            *extra, "--pod-resources-socket", str(sock),
            "--api-url", api.url, "--token-file", str(token),
            "--wal-dir", str(tmp / "agent-wal"), "--disk-root", str(h.tmp / "data"),
            "--wipe-interval", "0.5",
            "--metrics-address", "127.0.0.1", "--metrics-port", str(port),
        ],
        env={**os.environ, "GPUCLOUD_CLOCK": f"file:{h.clock.path}"},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    # fmt: on
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        agent.terminate()
        agent.wait(10)
        if podres is not None:
            podres.terminate()
            podres.wait(10)
        log.close()
        api.stop()
