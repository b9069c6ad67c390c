"""gpucloud: the tenant and admin command line for the metering/billing API.

Connection: --api-url (GPUCLOUD_API_URL), --token (GPUCLOUD_TOKEN),
--account (GPUCLOUD_ACCOUNT).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
import yaml
from rich.console import Console
from rich.table import Table

from gpucloud.billing.errors import BillingError
from gpucloud.billing.money import format_money, format_price
from gpucloud.billing.money import parse_amount as billing_parse_amount
from gpucloud.billing.pricebook import PriceBook
from gpucloud.cli.client import ApiClient, ApiError
from gpucloud.cli.estimate import (
    MODE_NAMES,
    ManifestError,
    estimate,
    human_duration,
    parse_manifest,
)
from gpucloud.recharge.qr import qr_text
from gpucloud.recharge.sandbox import SandboxProvider

app = typer.Typer(help=__doc__, no_args_is_help=True, add_completion=False)
recharge_app = typer.Typer(help="Add money to an account.", no_args_is_help=True)
review_app = typer.Typer(help="Admins: review bank-transfer vouchers.", no_args_is_help=True)
app.add_typer(recharge_app, name="recharge")
app.add_typer(review_app, name="review")

console = Console(highlight=False, soft_wrap=True)


@dataclass
class Ctx:
    api_url: str
    token: str | None
    account: str | None
    currency: str

    def client(self) -> ApiClient:
        return ApiClient(self.api_url, self.token)

    def need_account(self) -> str:
        if not self.account:
            fail("--account (or GPUCLOUD_ACCOUNT) is required")
        return self.account


def _table(*columns: str) -> Table:
    """A table that folds long cells instead of cutting them (ids must stay whole)."""
    table = Table()
    for name in columns:
        table.add_column(name, overflow="fold")
    return table


def fail(message: str) -> NoReturn:
    console.print(f"[red]error:[/red] {message}", markup=True)
    raise typer.Exit(1)


def call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except ApiError as exc:
        fail(str(exc))


@app.callback()
def _global(
    ctx: typer.Context,
    api_url: Annotated[
        str, typer.Option(envvar="GPUCLOUD_API_URL", help="base URL of the API")
    ] = "http://127.0.0.1:8080",
    token: Annotated[str | None, typer.Option(envvar="GPUCLOUD_TOKEN", help="bearer token")] = None,
    account: Annotated[str | None, typer.Option(envvar="GPUCLOUD_ACCOUNT")] = None,
    currency: Annotated[
        str, typer.Option(envvar="GPUCLOUD_CURRENCY", help="for parsing amounts")
    ] = "CNY",
) -> None:
    ctx.obj = Ctx(api_url, token, account, currency)


def parse_amount(text: str, currency: str) -> int:
    """ "100.00" -> 10000 minor units (the billing core's rule: nothing finer than the
    currency's minor unit, never rounded); an error names the argument."""
    try:
        return billing_parse_amount(text, currency, "amount")
    except BillingError as exc:
        fail(str(exc))


@app.command()
def balance(ctx: typer.Context) -> None:
    """The balance and the available balance (minus accrued, not yet posted usage)."""
    c: Ctx = ctx.obj
    body = call(c.client().get, f"/v1/accounts/{c.need_account()}/balance")
    console.print(f"account:   {body['account']}")
    console.print(f"balance:   {body['balance']}")
    console.print(f"available: {body['available']}")


@app.command()
def statement(
    ctx: typer.Context,
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 100,
    all_pages: Annotated[bool, typer.Option("--all", help="follow every page")] = False,
    resource: str | None = None,
) -> None:
    """Entries, oldest first, with the running balance after each."""
    c: Ctx = ctx.obj
    client = c.client()
    account = c.need_account()
    table = _table("id", "at", "kind", "amount", "balance", "resource", "memo")
    after: int | None = None
    currency = c.currency
    while True:
        params: dict[str, Any] = {"limit": limit}
        if after is not None:
            params["after_id"] = after
        if resource:
            params["resource"] = resource
        page = call(client.get, f"/v1/accounts/{account}/entries", params=params)
        currency = page["currency"]
        for e in page["entries"]:
            table.add_row(
                str(e["id"]),
                e["at"],
                e["kind"],
                format_money(e["amount_minor"], currency),
                format_money(e["balance_after_minor"], currency),
                e["resource"] or "",
                e["memo"],
            )
        after = page["next_after_id"]
        if not all_pages or after is None:
            break
    console.print(table)
    if after is not None:
        console.print(f"more: --all, or the API's after_id={after}")


@app.command()
def usage(ctx: typer.Context) -> None:
    """GPU-hours and GiB-hours per resource."""
    c: Ctx = ctx.obj
    body = call(c.client().get, f"/v1/accounts/{c.need_account()}/usage")
    table = _table("resource", "kind", "GPU-hours", "GiB-hours", "records")
    for r in body["rows"]:
        table.add_row(
            r["resource"] or "(unrated)",
            r["kind"],
            f"{Decimal(r['gpu_seconds']) / 3600:.4f}",
            f"{Decimal(r['byte_seconds']) / (3600 * 2**30):.4f}",
            str(r["records"]),
        )
    console.print(table)


@app.command()
def charges(ctx: typer.Context) -> None:
    """Amounts charged per resource."""
    c: Ctx = ctx.obj
    body = call(c.client().get, f"/v1/accounts/{c.need_account()}/charges")
    table = _table("resource", "charged")
    for ch in body["charges"]:
        table.add_row(ch["resource"] or "", ch["amount"])
    console.print(table)


@recharge_app.command("online")
def recharge_online(
    ctx: typer.Context,
    amount: Annotated[str, typer.Argument(help="e.g. 100.00")],
    provider: str = "sandbox",
    png: Annotated[Path, typer.Option(help="where to write the QR code")] = Path("recharge-qr.png"),
) -> None:
    """Create a payment order: prints its QR code (scan it to pay) and writes it as a PNG."""
    c: Ctx = ctx.obj
    client = c.client()
    account = c.need_account()
    # the decimal text: the API checks it against the account's own currency
    body = {"amount": amount, "provider": provider}
    order = call(client.post, f"/v1/accounts/{account}/recharges/online", body)
    typer.echo(qr_text(order["payment_url"]))
    qr = call(client.request, "GET", f"/v1/accounts/{account}/orders/{order['order_id']}/qr.png")
    png.write_bytes(qr.content)
    console.print(f"order:   {order['order_id']} ({order['status']})")
    console.print(f"amount:  {order['amount']}")
    console.print(f"pay at:  {order['payment_url']}")
    console.print(f"expires: {order['expires_at']}")
    console.print(f"QR code: {png}")


@recharge_app.command("sandbox-pay")
def recharge_sandbox_pay(
    ctx: typer.Context,
    order_id: str,
    amount: Annotated[str, typer.Argument(help="the order's amount, e.g. 100.00")],
    secret: Annotated[
        str, typer.Option(envvar="GPUCLOUD_SANDBOX_SECRET", help="sandbox HMAC secret")
    ],
) -> None:
    """Demo/test only: pay an order of the ``sandbox`` provider by sending the signed
    callback a real provider would send. Moves no real money."""
    c: Ctx = ctx.obj
    provider = SandboxProvider(secret.encode())
    body, headers = provider.paid_callback(
        order_id, parse_amount(amount, c.currency), c.currency, datetime.now(UTC)
    )
    resp = call(
        c.client().request, "POST", "/v1/payments/sandbox/callback", content=body, headers=headers
    )
    out = resp.json()
    console.print(f"order {out['order_id']}: {out['status']}, credited: {out['credited']}")


@recharge_app.command("bank-transfer")
def recharge_bank_transfer(
    ctx: typer.Context,
    amount: Annotated[str, typer.Argument(help="the amount transferred, e.g. 5000.00")],
    payer: Annotated[str, typer.Option(help="the paying company")],
    bank: Annotated[str, typer.Option(help="the paying bank")],
    transfer_no: Annotated[str, typer.Option(help="the bank's transfer number")],
    voucher: Annotated[
        Path,
        typer.Option(
            exists=True, dir_okay=False, help="the transfer voucher (receipt) to upload: required"
        ),
    ],
) -> None:
    """Submit a bank-transfer voucher for an admin to review."""
    c: Ctx = ctx.obj
    body: dict[str, Any] = {
        "amount": amount,  # checked against the account's currency by the API
        "payer": payer,
        "bank": bank,
        "transfer_no": transfer_no,
        "file": {
            "name": voucher.name,
            "content_base64": base64.b64encode(voucher.read_bytes()).decode(),
        },
    }
    v = call(c.client().post, f"/v1/accounts/{c.need_account()}/recharges/bank-transfer", body)
    console.print(f"voucher: {v['voucher_id']} ({v['status']}), {v['amount']}")
    if v["file_sha256"]:
        console.print(f"file sha256: {v['file_sha256']}")


@review_app.command("list")
def review_list(ctx: typer.Context, status: str = "pending") -> None:
    """Vouchers waiting for review."""
    c: Ctx = ctx.obj
    body = call(c.client().get, "/v1/vouchers", params={"status": status})
    table = _table(
        "voucher", "account", "amount", "payer", "bank", "transfer", "submitted", "file sha256"
    )
    for v in body["vouchers"]:
        table.add_row(
            v["voucher_id"], v["account"], v["amount"], v["payer"], v["bank"],
            v["transfer_no"], v["submitted_at"], v["file_sha256"] or "(none)",
        )  # fmt: skip
    console.print(table)


@review_app.command("file")
def review_file(
    ctx: typer.Context,
    voucher_id: str,
    out: Annotated[Path, typer.Option("-o", "--out", help="where to write the voucher file")],
) -> None:
    """Download a voucher's uploaded file, to check it before approving."""
    c: Ctx = ctx.obj
    resp = call(c.client().request, "GET", f"/v1/vouchers/{voucher_id}/file")
    out.write_bytes(resp.content)
    console.print(f"voucher {voucher_id}: {len(resp.content)} bytes written to {out}")


def _review(ctx: typer.Context, voucher_id: str, decision: str, reason: str) -> None:
    c: Ctx = ctx.obj
    body = {"decision": decision, "reason": reason}
    v = call(c.client().post, f"/v1/vouchers/{voucher_id}/review", body)
    console.print(f"voucher {v['voucher_id']}: {v['status']} by {v['reviewer']}")


@review_app.command("approve")
def review_approve(ctx: typer.Context, voucher_id: str, reason: str = "") -> None:
    """Approve a voucher: credits its amount, exactly once."""
    _review(ctx, voucher_id, "approve", reason)


@review_app.command("reject")
def review_reject(
    ctx: typer.Context,
    voucher_id: str,
    reason: Annotated[str, typer.Option(help="why (required, shown to the tenant)")],
) -> None:
    """Reject a voucher, with a reason."""
    _review(ctx, voucher_id, "reject", reason)


@app.command("estimate")
def estimate_cmd(
    ctx: typer.Context,
    file: Annotated[Path, typer.Option("-f", "--file", exists=True, dir_okay=False)],
    pricebook: Annotated[
        Path | None, typer.Option(exists=True, dir_okay=False, help="PriceBook YAML file")
    ] = None,
    balance_amount: Annotated[
        str | None, typer.Option("--balance", help="assume this balance instead of asking")
    ] = None,
) -> None:
    """Price of a GPUInstance manifest and how long the balance lasts."""
    c: Ctx = ctx.obj
    try:
        spec = parse_manifest(yaml.safe_load(file.read_text()))
        if pricebook is not None:
            doc = yaml.safe_load(pricebook.read_text())
            pb = PriceBook.from_resource(doc) if "spec" in doc else PriceBook.from_spec(doc)
        else:
            pb = PriceBook.from_spec(call(c.client().get, "/v1/pricebook"))
        balance_minor = None
        if balance_amount is not None:
            balance_minor = parse_amount(balance_amount, pb.currency)
        elif c.account:
            bal = call(c.client().get, f"/v1/accounts/{c.account}/balance")
            balance_minor = bal["available_minor"]
        est = estimate(spec, pb, balance_minor)
    except (ManifestError, BillingError, yaml.YAMLError) as exc:
        fail(str(exc))
    cur = est.currency
    console.print(f"instance: {spec.name or '(unnamed)'}: {spec.gpus} x {spec.product}, "
                  f"{spec.quota_gib} GiB storage")  # fmt: skip
    table = _table("price", "amount")
    table.add_row("pay-as-you-go GPUs / hour", format_price(est.payg_gpu_per_hour, cur))
    if est.spot_gpu_per_hour is not None:
        table.add_row("spot GPUs / hour", format_price(est.spot_gpu_per_hour, cur))
    table.add_row("instance storage / hour", format_price(est.storage_per_hour, cur))
    for period, price in est.packages.items():
        table.add_row(f"{period} package (storage included)", format_price(price, cur))
    console.print(table)
    if est.selected_per_hour is not None:
        console.print(
            f"{MODE_NAMES[spec.mode]}: {format_price(est.selected_per_hour, cur)} per hour"
        )
    if est.selected_package is not None:
        renew = ", renewed automatically" if spec.auto_renew else ""
        console.print(
            f"{spec.period} package: {format_price(est.selected_package, cur)} upfront{renew}"
        )
    if est.balance_minor is None:
        console.print("balance: unknown (give --account or --balance)")
    elif est.lasts_seconds is not None:
        console.print(f"balance {format_money(est.balance_minor, cur)} lasts "
                      f"{human_duration(est.lasts_seconds)}")  # fmt: skip
    elif est.terms_covered is not None:
        console.print(f"balance {format_money(est.balance_minor, cur)} pays for "
                      f"{est.terms_covered} {spec.period} term(s)")  # fmt: skip


if __name__ == "__main__":
    app()
