"""``gpucloud wait``: the pure decisions, and the command against a small fake API server
that serves one GPUInstance whose phase moves on with every read."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from gpucloud.cli.main import app
from gpucloud.cli.wait import KINDS, WaitError, Want, parse_duration, verdict, wait_for

GI = KINDS["gi"]


def test_durations() -> None:
    assert parse_duration("5m") == 300
    assert parse_duration("1h30m") == 5400
    assert parse_duration("90s") == parse_duration("90") == 90
    for bad in ("", "5x", "m", "1.5m"):
        with pytest.raises(ValueError, match="--timeout"):
            parse_duration(bad)


def test_want_and_verdict() -> None:
    assert Want.parse("Running") == Want(phase="Running")
    assert Want.parse("condition=Ready") == Want(condition="Ready")
    with pytest.raises(ValueError, match="--for"):
        Want.parse("state=Running")
    running = {"status": {"phase": "Running"}}
    assert verdict(running, GI, Want(phase="Running")) is True
    assert verdict({"status": {"phase": "Pending"}}, GI, Want(phase="Running")) is None
    assert verdict({"status": {"phase": "Refused"}}, GI, Want(phase="Running")) is False
    assert verdict({}, GI, Want(phase="Running")) is None
    ready = {"status": {"conditions": [{"type": "Ready", "status": "True"}]}}
    assert verdict(ready, GI, Want(condition="Ready")) is True
    assert verdict(running, GI, Want(condition="Ready")) is None
    # a model deployment's --for reads status.state
    assert verdict({"status": {"state": "Serving"}}, KINDS["md"], Want("Serving")) is True


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += s


def test_wait_for_reports_progress_and_times_out_with_what_it_saw() -> None:
    clock, seen = FakeClock(), []
    with pytest.raises(WaitError) as err:
        wait_for(
            lambda: {"status": {"phase": "Pending"}}, GI, Want("Running"), 10,
            lambda o, e: seen.append((o, e)), 4, clock, clock.sleep,
        )  # fmt: skip
    assert err.value.code == "TIMEOUT" and "still Pending" in str(err.value)
    assert seen == [("Pending", 0), ("Pending", 4), ("Pending", 8), ("Pending", 10)]
    with pytest.raises(WaitError) as err:
        wait_for(lambda: None, GI, Want("Running"), 1, lambda o, e: None, 1, clock, clock.sleep)
    assert err.value.code == "NOT_FOUND"


# --- the command, against a fake API server ------------------------------------------
class Server:
    def __init__(self, phases: list[str | None]) -> None:
        self.phases = phases
        self.reads = 0
        self.auth: list[str | None] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.auth.append(self.headers.get("Authorization"))
                want = "/apis/gpucloud.dev/v1alpha1/namespaces/acme/gpuinstances/nb"
                if self.path != want:
                    self.send_response(404)
                    self.end_headers()
                    return
                phase = outer.phases[min(outer.reads, len(outer.phases) - 1)]
                outer.reads += 1
                obj: dict[str, Any] = {"kind": "GPUInstance", "metadata": {"name": "nb"}}
                if phase:
                    obj["status"] = {"phase": phase}
                body = json.dumps(obj).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> Server:
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *_: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def kubeconfig_file(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "config"
    path.write_text(yaml.safe_dump({
        "current-context": "dev",
        "contexts": [
            {"name": "dev", "context": {"cluster": "c", "user": "u", "namespace": "acme"}}
        ],
        "clusters": [{"name": "c", "cluster": {"server": "http://127.0.0.1:9"}}],
        "users": [{"name": "u", "user": {"token": "kube-token"}}],
    }))  # fmt: skip
    yield path


def run(server: Server, kubeconfig_file: Path, *args: str) -> Any:
    runner = CliRunner(env={"KUBECONFIG": str(kubeconfig_file), "GPUCLOUD_TOKEN": None})
    return runner.invoke(app, ["--server", server.url, "wait", "gi", "nb", *args])


def test_wait_until_running_shows_progress_on_stderr(kubeconfig_file: Path) -> None:
    with Server([None, "Pending", "Starting", "Running"]) as srv:
        result = run(srv, kubeconfig_file, "--for", "Running", "--interval", "0.1", "-o", "json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["status"]["phase"] == "Running"  # stdout: the object
    for step in ("(no status yet)", "Pending", "Starting", "Running"):
        assert f"gpuinstances/nb to be Running: {step}" in result.stderr
    assert srv.auth == ["Bearer kube-token"] * 4  # the kubeconfig context's credentials


def test_wait_exit_codes(kubeconfig_file: Path) -> None:
    with Server(["Pending"]) as srv:
        result = run(
            srv, kubeconfig_file, "--for", "Running", "--timeout", "1", "--interval", "0.2"
        )
    assert result.exit_code == 8 and "timed out after 1s" in result.stderr
    assert "still Pending" in result.stderr and result.stdout == ""
    with Server(["Pending", "Refused"]) as srv:
        result = run(srv, kubeconfig_file, "--for", "Running", "--interval", "0.1")
    assert result.exit_code == 9 and "Refused is final" in result.stderr
    with Server(["Running"]) as srv:
        result = run(srv, kubeconfig_file, "--for", "Running", "-n", "elsewhere", "--timeout", "0")
    assert result.exit_code == 4 and "elsewhere" in result.stderr
    with Server(["Running"]) as srv:
        result = run(srv, kubeconfig_file, "--for", "Running", "--timeout", "soon")
    assert result.exit_code == 2 and "--timeout: 'soon'" in result.stderr
    runner = CliRunner(env={"KUBECONFIG": str(kubeconfig_file)})
    result = runner.invoke(app, ["--server", "http://127.0.0.1:9", "wait", "gi", "nb",
                                 "--for", "Running"])  # fmt: skip
    assert result.exit_code == 7 and "cannot reach the API server" in result.stderr
    result = runner.invoke(app, ["wait", "pods", "nb", "--for", "Running"])
    assert result.exit_code == 2 and "KIND: 'pods'" in result.stderr
