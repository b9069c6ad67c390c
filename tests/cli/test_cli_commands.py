"""The ``gpucloud`` CLI against a real API process on 127.0.0.1."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from gpucloud.api.testserver import SANDBOX_SECRET, ApiProcess
from gpucloud.cli.main import app
from gpucloud.recharge import SandboxProvider

ROOT = Path(__file__).resolve().parents[2]
PRICEBOOK = ROOT / "examples" / "pricebook.yaml"
PAYG = ROOT / "examples" / "gpuinstance-payg.yaml"
PACKAGE = ROOT / "examples" / "gpuinstance-package.yaml"

# wide enough for whole ids in tables; no kubeconfig of the machine running the tests
runner = CliRunner(env={"COLUMNS": "200", "KUBECONFIG": "/nonexistent", "GPUCLOUD_TOKEN": None})


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiProcess]:
    proc = ApiProcess(
        tmp_path_factory.mktemp("cli-api"), extra_args=["--pricebook", str(PRICEBOOK)]
    )
    with proc:
        yield proc


def cli(api: ApiProcess | None, token: str, *args: str) -> tuple[int, str]:
    """The token travels as tenants' scripts pass it: in GPUCLOUD_TOKEN, never an argument."""
    base = ["--api-url", api.url if api else "http://127.0.0.1:9"]
    result = runner.invoke(
        app, [*base, "--account", "acme", *args], env={"GPUCLOUD_TOKEN": token},
        catch_exceptions=False,
    )  # fmt: skip
    return result.exit_code, result.output


def test_estimate_from_files_needs_no_api() -> None:
    code, out = cli(
        None, "x", "estimate", "-f", str(PAYG), "--pricebook", str(PRICEBOOK), "--balance", "100"
    )
    assert code == 0, out
    assert "9.80 CNY" in out and "0.02 CNY" in out  # GPUs and 50 GiB of storage per hour
    assert "PayAsYouGo: 9.82 CNY per hour" in out
    assert "lasts 10 h 10 min" in out  # 100 / 9.82 = 10.18 h
    code, out = cli(
        None,
        "x",
        "estimate",
        "-f",
        str(PACKAGE),
        "--pricebook",
        str(PRICEBOOK),
        "--balance",
        "100000",
    )
    assert code == 0, out
    assert "43200.00 CNY upfront, renewed automatically" in out
    assert "pays for 2 month term(s)" in out


def test_estimate_rejects_bad_manifests(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        yaml.safe_dump({"kind": "GPUInstance", "spec": {"gpu": {"product": "X", "count": 0}}})
    )
    code, out = cli(None, "x", "estimate", "-f", str(bad), "--pricebook", str(PRICEBOOK))
    assert code == 1 and "spec.gpu.count" in out
    bad.write_text(
        yaml.safe_dump({"kind": "GPUInstance", "spec": {"gpu": {"product": "NoSuchGPU"}}})
    )
    code, out = cli(
        None, "x", "estimate", "-f", str(bad), "--pricebook", str(PRICEBOOK), "--balance", "1"
    )
    assert code == 1 and "NoSuchGPU" in out


def test_recharge_online_prints_qr_writes_png_and_credits(api: ApiProcess, tmp_path: Path) -> None:
    png = tmp_path / "qr.png"
    code, out = cli(api, "tenant-token", "recharge", "online", "100.00", "--png", str(png))
    assert code == 0, out
    assert "▀" in out or "▄" in out  # the QR code, drawn with half blocks
    assert png.read_bytes().startswith(b"\x89PNG")
    order_id = re.search(r"order:\s+(\S+)", out).group(1)
    paid = SandboxProvider(SANDBOX_SECRET.encode()).pay(
        api.url, order_id, 10_000, "CNY", datetime.now(UTC)
    )
    assert paid.status_code == 200 and paid.json()["credited"] is True
    code, out = cli(api, "tenant-token", "balance")
    assert code == 0 and "balance:   100.00 CNY" in out
    # The price book and the balance both come from the API now.
    code, out = cli(api, "tenant-token", "estimate", "-f", str(PAYG))
    assert code == 0 and "balance 100.00 CNY lasts 10 h 10 min" in out, out


def test_bank_transfer_review_and_statement(api: ApiProcess, tmp_path: Path) -> None:
    receipt = tmp_path / "receipt.pdf"
    receipt.write_bytes(b"%PDF-1.4 receipt")
    code, out = cli(
        api, "tenant-token", "recharge", "bank-transfer", "5000.00",
        "--payer", "ACME Ltd", "--bank", "ICBC", "--transfer-no", "TX-1", "--voucher", str(receipt),
    )  # fmt: skip
    assert code == 0, out
    assert hashlib.sha256(receipt.read_bytes()).hexdigest() in out
    voucher_id = re.search(r"voucher: (\S+)", out).group(1)
    code, out = cli(api, "tenant-token", "review", "approve", voucher_id)
    assert code == 3 and "403" in out  # auth  # tenants cannot review
    code, out = cli(api, "admin-token", "review", "list")
    assert code == 0 and voucher_id in out
    assert hashlib.sha256(receipt.read_bytes()).hexdigest() in out  # the admin sees the file
    copy = tmp_path / "check.pdf"
    code, out = cli(api, "admin-token", "review", "file", voucher_id, "-o", str(copy))
    assert code == 0 and copy.read_bytes() == receipt.read_bytes(), out
    code, out = cli(api, "admin-token", "review", "approve", voucher_id)
    assert code == 0 and "approved by alice-admin" in out
    code, out = cli(api, "admin-token", "review", "reject", voucher_id, "--reason", "twice")
    assert code == 5 and "409" in out  # conflict
    code, out = cli(api, "tenant-token", "statement")
    assert code == 0 and "5000.00 CNY" in out, out


def test_a_bank_transfer_needs_its_voucher(api: ApiProcess) -> None:
    code, out = cli(
        api, "tenant-token", "recharge", "bank-transfer", "5000.00",
        "--payer", "ACME Ltd", "--bank", "ICBC", "--transfer-no", "TX-2",
    )  # fmt: skip
    assert code == 2 and "--voucher" in out


def test_cli_errors_are_readable(api: ApiProcess) -> None:
    code, out = cli(api, "tenant-token", "recharge", "online", "1.001")
    assert code == 1 and "amount: '1.001' is finer than the minor unit of CNY" in out
    assert "at most 2 decimal places" in out
    code, out = cli(api, "stranger-token", "balance")
    assert code == 3 and "403" in out
    code, out = cli(None, "x", "balance")
    assert code == 7 and "cannot reach the API" in out
