"""The ``gpucloud`` CLI against a real API process on 127.0.0.1."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

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


def test_estimate_knows_mig_slices_and_time_sliced_shares(tmp_path: Path) -> None:
    mig = ROOT / "examples" / "gpuinstance-mig.yaml"
    code, out = cli(None, "x", "estimate", "-f", str(mig), "--pricebook", str(PRICEBOOK),
                    "--balance", "100", "-o", "json")  # fmt: skip
    assert code == 0, out
    data = json.loads(out)
    assert (data["kind"], data["resource"]) == ("mig", "nvidia.com/mig-1g.10gb")
    # 2.83 per slice-hour + 20 GiB x 0.0004 = 2.838; 100 / 2.838 h = 35 h 14 min
    assert (data["payg_gpu_per_hour"], data["selected_per_hour"]) == ("2.83", "2.838")
    assert data["lasts_seconds"] == 126849
    code, out = cli(None, "x", "estimate", "-f", str(mig), "--pricebook", str(PRICEBOOK),
                    "--balance", "100")  # fmt: skip
    assert code == 0 and "pay-as-you-go MIG slices / hour" in out
    shared = yaml.safe_load(mig.read_text())
    shared["spec"]["gpu"] = {"product": "NVIDIA-H100-80GB-HBM3-SHARED", "count": 2}
    (tmp_path / "shared.yaml").write_text(yaml.safe_dump(shared))
    code, out = cli(None, "x", "estimate", "-f", str(tmp_path / "shared.yaml"),
                    "--pricebook", str(PRICEBOOK), "--balance", "100")  # fmt: skip
    assert code == 1 and "spec.gpu.count" in out and "time-sliced share" in out
    shared["spec"]["gpu"]["count"] = 1
    (tmp_path / "shared.yaml").write_text(yaml.safe_dump(shared))
    code, out = cli(None, "x", "estimate", "-f", str(tmp_path / "shared.yaml"),
                    "--pricebook", str(PRICEBOOK), "--balance", "100")  # fmt: skip
    assert code == 0 and "pay-as-you-go time-sliced shares / hour" in out and "4.95 CNY" in out


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


def invoke(api: ApiProcess | None, args: list[str], **env: str | None) -> Any:
    """The raw result, stdout and stderr apart."""
    base = ["--api-url", api.url if api else "http://127.0.0.1:9", "--account", "acme"]
    return runner.invoke(app, [*base, *args], env=env, catch_exceptions=False)


def test_every_listing_speaks_json_and_yaml(api: ApiProcess) -> None:
    token = {"GPUCLOUD_TOKEN": "tenant-token"}
    for args in (["balance"], ["statement"], ["usage"], ["charges"]):
        as_json = invoke(api, [*args, "-o", "json"], **token)
        assert as_json.exit_code == 0, as_json.output
        data = json.loads(as_json.stdout)
        as_yaml = invoke(api, [*args, "--output", "yaml"], **token)
        assert yaml.safe_load(as_yaml.stdout) == data, args
    balance = json.loads(invoke(api, ["balance", "-o", "json"], **token).stdout)
    assert balance["account"] == "acme" and "available_minor" in balance
    listed = invoke(api, ["review", "list", "-o", "json"], GPUCLOUD_TOKEN="admin-token")
    assert isinstance(json.loads(listed.stdout)["vouchers"], list)
    bad = invoke(api, ["balance", "-o", "xml"], **token)
    assert bad.exit_code == 2 and "xml" in bad.stderr


def test_estimate_as_json_keeps_exact_prices(tmp_path: Path) -> None:
    # 19.80/h does not divide into seconds evenly: the price stays an exact decimal string
    pb = yaml.safe_load(PRICEBOOK.read_text())
    pb["spec"]["gpus"][0]["payAsYouGoPerHour"] = "19.80"
    product = pb["spec"]["gpus"][0]["product"]
    pb_file = tmp_path / "pb.yaml"
    pb_file.write_text(yaml.safe_dump(pb))
    inst = yaml.safe_load(PAYG.read_text())
    inst["spec"]["gpu"] = {"product": product, "count": 1}
    inst_file = tmp_path / "gi.yaml"
    inst_file.write_text(yaml.safe_dump(inst))
    result = invoke(
        None, ["estimate", "-f", str(inst_file), "--pricebook", str(pb_file), "--balance", "100",
               "-o", "json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["payg_gpu_per_hour"] == "19.80" and data["balance"] == "100.00"
    assert data["mode"] == "PayAsYouGo" and isinstance(data["lasts_seconds"], int)


def test_errors_go_to_stderr_with_their_exit_code(api: ApiProcess) -> None:
    denied = invoke(api, ["balance", "-o", "json"], GPUCLOUD_TOKEN="stranger-token")
    assert denied.exit_code == 3 and denied.stdout == "" and "403" in denied.stderr
    nobody = invoke(api, ["balance"])
    assert nobody.exit_code == 3 and "401" in nobody.stderr and "--token-file" in nobody.stderr
    missing = invoke(api, ["review", "approve", "no-such-voucher"], GPUCLOUD_TOKEN="admin-token")
    assert missing.exit_code == 4 and "404" in missing.stderr
    help_text = runner.invoke(app, ["--help"]).stdout
    assert "4 not found" in help_text and "5 conflict" in help_text


def test_credentials_from_the_kubeconfig_context_or_a_token_file(
    api: ApiProcess, tmp_path: Path
) -> None:
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(yaml.safe_dump({
        "current-context": "dev",
        "contexts": [{"name": "dev", "context": {"cluster": "c", "user": "bob"}}],
        "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:9"}}],
        "users": [{"name": "bob", "user": {"token": "tenant-token"}}],
    }))  # fmt: skip
    result = invoke(api, ["balance", "-o", "json"], KUBECONFIG=str(kubeconfig))
    assert result.exit_code == 0 and json.loads(result.stdout)["account"] == "acme"
    token_file = tmp_path / "token"
    token_file.write_text("stranger-token\n")
    result = invoke(api, ["--token-file", str(token_file), "balance"], KUBECONFIG=str(kubeconfig))
    assert result.exit_code == 3  # the file wins over the kubeconfig
    result = invoke(api, ["--token-file", str(tmp_path / "nope"), "balance"])
    assert result.exit_code == 2 and "--token-file: cannot read" in result.stderr


def test_secrets_are_refused_as_arguments(api: ApiProcess, tmp_path: Path) -> None:
    result = invoke(api, ["--token", "tenant-token", "balance"])
    assert result.exit_code == 2
    assert "--token: secrets are not accepted on the command line" in result.stderr
    assert "--token-file" in result.stderr
    result = invoke(api, ["recharge", "sandbox-pay", "o-1", "1.00", "--secret", SANDBOX_SECRET])
    assert result.exit_code == 2 and "--secret: secrets are not accepted" in result.stderr
    assert "--secret-file" in result.stderr and "GPUCLOUD_SANDBOX_SECRET" in result.stderr
    result = invoke(api, ["recharge", "sandbox-pay", "o-1", "1.00"])
    assert result.exit_code == 2 and "sandbox HMAC secret is required" in result.stderr


def test_sandbox_pay_takes_its_secret_from_a_file_or_the_environment(
    api: ApiProcess, tmp_path: Path
) -> None:
    token = {"GPUCLOUD_TOKEN": "tenant-token"}
    secret = tmp_path / "sandbox-secret"
    secret.write_text(SANDBOX_SECRET + "\n")
    for how in (["--secret-file", str(secret)], []):
        args = ["recharge", "online", "19.80", "--png", str(tmp_path / "q.png"), "-o", "json"]
        order = json.loads(invoke(api, args, **token).stdout)
        env = {} if how else {"GPUCLOUD_SANDBOX_SECRET": SANDBOX_SECRET}
        paid = invoke(api, ["recharge", "sandbox-pay", order["order_id"], "19.80", *how],
                      **token, **env)  # fmt: skip
        assert paid.exit_code == 0, paid.output
        assert "credited: True" in paid.stdout


def test_completion_scripts_and_answers() -> None:
    for shell in ("bash", "zsh", "fish"):
        result = runner.invoke(app, ["completion", shell])
        assert result.exit_code == 0 and "_GPUCLOUD_COMPLETE" in result.stdout, shell
    bad = runner.invoke(app, ["completion", "tcsh"])
    assert bad.exit_code == 2
    env = {**os.environ, "_GPUCLOUD_COMPLETE": "complete_bash",
           "COMP_WORDS": "gpucloud rech", "COMP_CWORD": "1"}  # fmt: skip
    code = "from gpucloud.cli.main import main; main()"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.stdout.split() == ["recharge"], done.stderr
    env.update({"COMP_WORDS": "gpucloud balance --out", "COMP_CWORD": "2"})
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert "--output" in done.stdout.split(), done.stderr


def test_a_months_statement_as_json_csv_and_pdf(api: ApiProcess, tmp_path: Path) -> None:
    from pypdf import PdfReader

    from gpucloud.ledger import open_ledger

    march = datetime(2025, 3, 10, tzinfo=UTC)  # long before the other tests' entries
    ledger = open_ledger(api.database_url)
    try:
        ledger.ensure_account("acme", "CNY")
        ledger.post_entry("acme", "recharge", 100_00, "st-r", memo="March top-up", at=march)
        # 19.80/h for 3702 s = 20.361: the ledger posted 20.36, the statement shows that
        ledger.post_entry("acme", "charge", -20_36, "st-c", resource="team-a/nb",
                          memo="GPU time", at=march)  # fmt: skip
    finally:
        ledger.close()
    token = {"GPUCLOUD_TOKEN": "tenant-token"}
    as_json = invoke(api, ["statement", "--period", "2025-03", "-o", "json"], **token)
    assert as_json.exit_code == 0, as_json.output
    st = json.loads(as_json.stdout)
    assert (st["opening_minor"], st["closing_minor"], st["closing"]) == (0, 79_64, "79.64")
    assert st["charges"][0]["resource"] == "team-a/nb" and st["charges"][0]["total"] == "-20.36"
    table = invoke(api, ["statement", "--period", "2025-03"], **token)
    assert "closing balance" in table.stdout and "79.64 CNY" in table.stdout
    as_csv = invoke(api, ["statement", "--period", "2025-03", "--format", "csv"], **token)
    assert as_csv.exit_code == 0 and "closing balance" in as_csv.stdout
    assert "resource total,,,team-a/nb,,-20.36" in as_csv.stdout
    pdf = tmp_path / "march.pdf"
    as_pdf = invoke(api, ["statement", "--period", "2025-03", "--format", "pdf", "--out",
                          str(pdf)], **token)  # fmt: skip
    assert as_pdf.exit_code == 0 and str(pdf) in as_pdf.stderr
    text = "".join(p.extract_text() for p in PdfReader(pdf).pages)
    assert "March top-up" in text and "79.64 CNY" in text
    bad = invoke(api, ["statement", "--period", "2025-3"], **token)
    assert bad.exit_code == 1 and "period: '2025-3' is not a month written YYYY-MM" in bad.stderr
    other = invoke(api, ["statement", "--period", "2025-03"], GPUCLOUD_TOKEN="stranger-token")
    assert other.exit_code == 3
    lone = invoke(api, ["statement", "--format", "pdf"], **token)
    assert lone.exit_code == 2 and "--format: needs --period" in lone.stderr
