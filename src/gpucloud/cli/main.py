"""gpucloud: the tenant and admin command line for the metering/billing API.

Credentials come from the current kubeconfig context (its token, tokenFile or exec
plugin), which the API checks with a TokenReview; --token-file (GPUCLOUD_TOKEN_FILE) or
GPUCLOUD_TOKEN override it. Secrets are never taken as arguments. --api-url
(GPUCLOUD_API_URL) is gpucloud's API; --server overrides the kubeconfig's Kubernetes API
server (for `wait`). --account (GPUCLOUD_ACCOUNT) picks the account.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
import yaml
from rich.console import Group
from typer.completion import completion_init, get_completion_script

from gpucloud.billing.errors import BillingError
from gpucloud.billing.money import format_money, format_price, from_minor
from gpucloud.billing.money import parse_amount as billing_parse_amount
from gpucloud.cli import kubeconfig
from gpucloud.cli.client import ApiClient, ApiError
from gpucloud.cli.estimate import (
    MODE_NAMES,
    UNITS,
    ManifestError,
    estimate,
    human_duration,
    parse_manifest,
)
from gpucloud.cli.exitcodes import HELP as EXIT_HELP
from gpucloud.cli.exitcodes import ExitCode, for_status
from gpucloud.cli.output import Format, OutputOpt, console, emit, err_console
from gpucloud.cli.output import table as _table
from gpucloud.cli.progress import progress_reporter
from gpucloud.cli.wait import KINDS, KubeReader, WaitError, Want, parse_duration, wait_for
from gpucloud.crd.pricebook import price_book
from gpucloud.recharge.qr import qr_text
from gpucloud.recharge.sandbox import SandboxProvider

app = typer.Typer(help=f"{__doc__}\n\n{EXIT_HELP}.", no_args_is_help=True, add_completion=False)
recharge_app = typer.Typer(help="Add money to an account.", no_args_is_help=True)
review_app = typer.Typer(help="Admins: review bank-transfer vouchers.", no_args_is_help=True)
app.add_typer(recharge_app, name="recharge")
app.add_typer(review_app, name="review")

COMPLETE_VAR = "_GPUCLOUD_COMPLETE"


def fail(message: str, code: ExitCode = ExitCode.ERROR) -> NoReturn:
    """The error on stderr, and the exit code that says what kind of failure it was."""
    err_console.print(f"[red]error:[/red] {message}", markup=True)
    raise typer.Exit(int(code))


def refuse_secret_argument(ctx: typer.Context, param: str, flag: str, instead: str) -> None:
    """A secret given as an argument is visible in ``ps`` and shell history: refuse it."""
    source = ctx.get_parameter_source(param)
    if source is not None and source.name == "COMMANDLINE":  # typer vendors click's enum
        fail(
            f"{flag}: secrets are not accepted on the command line (visible in ps and shell "
            f"history); use {instead}",
            ExitCode.USAGE,
        )


def read_secret_file(path: Path, flag: str) -> str:
    try:
        text = path.read_text().strip()
    except OSError as exc:
        fail(f"{flag}: cannot read {path}: {exc.strerror or exc}", ExitCode.USAGE)
    if not text:
        fail(f"{flag}: {path} is empty", ExitCode.USAGE)
    return text


@dataclass
class Ctx:
    api_url: str
    account: str | None
    currency: str
    token_file: Path | None = None
    env_token: str | None = None
    kubeconfig_path: Path | None = None
    context: str | None = None
    server: str | None = None
    _kube: kubeconfig.KubeContext | None = field(default=None, repr=False)
    _kube_loaded: bool = field(default=False, repr=False)

    def kube(self) -> kubeconfig.KubeContext | None:
        """The kubeconfig context, read once, only by commands that need it."""
        if not self._kube_loaded:
            try:
                self._kube = kubeconfig.load(self.kubeconfig_path, self.context)
            except kubeconfig.KubeconfigError as exc:
                fail(str(exc), ExitCode.AUTH)
            self._kube_loaded = True
        return self._kube

    def token(self) -> str | None:
        """--token-file, then GPUCLOUD_TOKEN, then the kubeconfig's credentials."""
        if self.token_file is not None:
            return read_secret_file(self.token_file, "--token-file")
        if self.env_token:
            return self.env_token
        kube = self.kube()
        return kube.token if kube else None

    def client(self) -> ApiClient:
        return ApiClient(self.api_url, self.token())

    def need_account(self) -> str:
        if not self.account:
            fail("--account (or GPUCLOUD_ACCOUNT) is required", ExitCode.USAGE)
        return self.account


def call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except ApiError as exc:
        hint = ""
        if exc.status == 401:
            hint = (
                " (credentials: the kubeconfig's current context, --token-file or GPUCLOUD_TOKEN)"
            )
        fail(f"{exc}{hint}", for_status(exc.status))


@app.callback()
def _global(
    ctx: typer.Context,
    api_url: Annotated[
        str, typer.Option(envvar="GPUCLOUD_API_URL", help="base URL of gpucloud's API")
    ] = "http://127.0.0.1:8080",
    token_file: Annotated[
        Path | None,
        typer.Option(envvar="GPUCLOUD_TOKEN_FILE", help="file holding the bearer token"),
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(envvar="GPUCLOUD_TOKEN", hidden=True, help="refused: use --token-file"),
    ] = None,
    kubeconfig_path: Annotated[
        Path | None,
        typer.Option("--kubeconfig", help="default: $KUBECONFIG, then ~/.kube/config"),
    ] = None,
    context: Annotated[
        str | None, typer.Option(help="kubeconfig context (default: the current one)")
    ] = None,
    server: Annotated[
        str | None, typer.Option(help="Kubernetes API server (default: the kubeconfig's)")
    ] = None,
    account: Annotated[str | None, typer.Option(envvar="GPUCLOUD_ACCOUNT")] = None,
    currency: Annotated[
        str, typer.Option(envvar="GPUCLOUD_CURRENCY", help="for parsing amounts")
    ] = "CNY",
) -> None:
    refuse_secret_argument(ctx, "token", "--token", "--token-file or GPUCLOUD_TOKEN")
    ctx.obj = Ctx(api_url, account, currency, token_file, token, kubeconfig_path, context, server)


def parse_amount(text: str, currency: str) -> int:
    """ "100.00" -> 10000 minor units (the billing core's rule: nothing finer than the
    currency's minor unit, never rounded); an error names the argument."""
    try:
        return billing_parse_amount(text, currency, "amount")
    except BillingError as exc:
        fail(str(exc))


@app.command()
def balance(ctx: typer.Context, output: OutputOpt = Format.table) -> None:
    """The balance and the available balance (minus accrued, not yet posted usage)."""
    c: Ctx = ctx.obj
    body = call(c.client().get, f"/v1/accounts/{c.need_account()}/balance")
    emit(body, output, lambda: (
        f"account:   {body['account']}\n"
        f"balance:   {body['balance']}\n"
        f"available: {body['available']}"
    ))  # fmt: skip


@app.command()
def statement(
    ctx: typer.Context,
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 100,
    all_pages: Annotated[bool, typer.Option("--all", help="follow every page")] = False,
    resource: str | None = None,
    period: Annotated[
        str | None, typer.Option(help="a month (YYYY-MM, UTC): its statement instead")
    ] = None,
    doc_format: Annotated[
        DocFormat | None,
        typer.Option("--format", help="with --period: the statement as a csv or pdf document"),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="where to write it (csv: stdout by default)")
    ] = None,
    output: OutputOpt = Format.table,
) -> None:
    """Entries, oldest first, with the running balance after each; with --period, the
    month's statement (opening balance, payments, refunds, charges by resource with
    GPU-seconds and rates, closing balance)."""
    c: Ctx = ctx.obj
    client = c.client()
    account = c.need_account()
    if period is not None:
        _period_statement(client, account, period, doc_format, out, output)
        return
    if doc_format is not None:
        fail("--format: needs --period (a month's statement)", ExitCode.USAGE)
    entries: list[dict[str, Any]] = []
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
        entries += page["entries"]
        after = page["next_after_id"]
        if not all_pages or after is None:
            break

    def human() -> Any:
        t = _table("id", "at", "kind", "amount", "balance", "resource", "memo")
        for e in entries:
            t.add_row(
                str(e["id"]), e["at"], e["kind"],
                format_money(e["amount_minor"], currency),
                format_money(e["balance_after_minor"], currency),
                e["resource"] or "", e["memo"],
            )  # fmt: skip
        return t

    data = {"account": account, "currency": currency, "entries": entries, "next_after_id": after}
    emit(data, output, human)
    if after is not None and output is Format.table:
        err_console.print(f"more: --all, or the API's after_id={after}")


class DocFormat(StrEnum):
    csv = "csv"
    pdf = "pdf"


def _period_statement(
    client: ApiClient,
    account: str,
    period: str,
    doc_format: DocFormat | None,
    out: Path | None,
    output: Format,
) -> None:
    path = f"/v1/accounts/{account}/statement"
    if doc_format is None:
        st = call(client.get, path, params={"period": period, "format": "json"})
        emit(st, output, lambda: _statement_table(st))
        return
    resp = call(client.request, "GET", path, params={"period": period, "format": doc_format})
    if out is None and doc_format is DocFormat.csv:
        typer.echo(resp.text, nl=False)
        return
    target = out or Path(f"statement-{account}-{period}.{doc_format}")
    target.write_bytes(resp.content)
    err_console.print(f"statement {period} of {account}: {len(resp.content)} bytes -> {target}")


def _statement_table(st: dict[str, Any]) -> Any:
    cur = st["currency"]
    t = _table("at", "kind", "resource", "memo", "amount")
    t.add_row("", "opening balance", "", "", f"{st['opening']} {cur}")
    for key in ("payments", "refunds", "adjustments"):
        for x in st[key]:
            t.add_row(x["at"], x["kind"], x["resource"] or "", x["memo"], x["amount"])
    for g in st["charges"]:
        rates = "; ".join(g["rates"])
        t.add_row("", "charges", g["resource"] or "", f"{g['gpu_seconds']} GPU-s at {rates}",
                  g["total"])  # fmt: skip
        for x in g["entries"]:
            t.add_row(x["at"], x["kind"], "", x["memo"], x["amount"])
    t.add_row("", "closing balance", "", "", f"{st['closing']} {cur}")
    return t


@app.command()
def usage(ctx: typer.Context, output: OutputOpt = Format.table) -> None:
    """GPU-hours and GiB-hours per resource."""
    c: Ctx = ctx.obj
    body = call(c.client().get, f"/v1/accounts/{c.need_account()}/usage")

    def human() -> Any:
        t = _table("resource", "kind", "GPU-hours", "GiB-hours", "records")
        for r in body["rows"]:
            t.add_row(
                r["resource"] or "(unrated)",
                r["kind"],
                f"{Decimal(r['gpu_seconds']) / 3600:.4f}",
                f"{Decimal(r['byte_seconds']) / (3600 * 2**30):.4f}",
                str(r["records"]),
            )
        return t

    emit(body, output, human)


@app.command()
def charges(ctx: typer.Context, output: OutputOpt = Format.table) -> None:
    """Amounts charged per resource."""
    c: Ctx = ctx.obj
    body = call(c.client().get, f"/v1/accounts/{c.need_account()}/charges")

    def human() -> Any:
        t = _table("resource", "charged")
        for ch in body["charges"]:
            t.add_row(ch["resource"] or "", ch["amount"])
        return t

    emit(body, output, human)


@recharge_app.command("online")
def recharge_online(
    ctx: typer.Context,
    amount: Annotated[str, typer.Argument(help="e.g. 100.00")],
    provider: str = "sandbox",
    png: Annotated[Path, typer.Option(help="where to write the QR code")] = Path("recharge-qr.png"),
    output: OutputOpt = Format.table,
) -> None:
    """Create a payment order: prints its QR code (scan it to pay) and writes it as a PNG."""
    c: Ctx = ctx.obj
    client = c.client()
    account = c.need_account()
    # the decimal text: the API checks it against the account's own currency
    body = {"amount": amount, "provider": provider}
    order = call(client.post, f"/v1/accounts/{account}/recharges/online", body)
    qr = call(client.request, "GET", f"/v1/accounts/{account}/orders/{order['order_id']}/qr.png")
    png.write_bytes(qr.content)
    emit({**order, "qr_png": str(png)}, output, lambda: (
        f"{qr_text(order['payment_url'])}\n"
        f"order:   {order['order_id']} ({order['status']})\n"
        f"amount:  {order['amount']}\n"
        f"pay at:  {order['payment_url']}\n"
        f"expires: {order['expires_at']}\n"
        f"QR code: {png}"
    ))  # fmt: skip


@recharge_app.command("sandbox-pay")
def recharge_sandbox_pay(
    ctx: typer.Context,
    order_id: str,
    amount: Annotated[str, typer.Argument(help="the order's amount, e.g. 100.00")],
    secret_file: Annotated[
        Path | None,
        typer.Option(
            envvar="GPUCLOUD_SANDBOX_SECRET_FILE",
            help="file holding the sandbox HMAC secret (or set GPUCLOUD_SANDBOX_SECRET)",
        ),
    ] = None,
    secret: Annotated[
        str | None,
        typer.Option(envvar="GPUCLOUD_SANDBOX_SECRET", hidden=True, help="refused: see above"),
    ] = None,
) -> None:
    """Demo/test only: pay an order of the ``sandbox`` provider by sending the signed
    callback a real provider would send. Moves no real money."""
    c: Ctx = ctx.obj
    refuse_secret_argument(
        ctx, "secret", "--secret", "--secret-file or the GPUCLOUD_SANDBOX_SECRET variable"
    )
    if secret_file is not None:
        secret = read_secret_file(secret_file, "--secret-file")
    if not secret:
        fail("the sandbox HMAC secret is required: --secret-file or GPUCLOUD_SANDBOX_SECRET",
             ExitCode.USAGE)  # fmt: skip
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
    output: OutputOpt = Format.table,
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
    sha = f"\nfile sha256: {v['file_sha256']}" if v["file_sha256"] else ""
    emit(v, output, lambda: f"voucher: {v['voucher_id']} ({v['status']}), {v['amount']}{sha}")


@review_app.command("list")
def review_list(
    ctx: typer.Context, status: str = "pending", output: OutputOpt = Format.table
) -> None:
    """Vouchers waiting for review."""
    c: Ctx = ctx.obj
    body = call(c.client().get, "/v1/vouchers", params={"status": status})

    def human() -> Any:
        t = _table(
            "voucher", "account", "amount", "payer", "bank", "transfer", "submitted", "file sha256"
        )
        for v in body["vouchers"]:
            t.add_row(
                v["voucher_id"], v["account"], v["amount"], v["payer"], v["bank"],
                v["transfer_no"], v["submitted_at"], v["file_sha256"] or "(none)",
            )  # fmt: skip
        return t

    emit(body, output, human)


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
    output: OutputOpt = Format.table,
) -> None:
    """Price of a GPUInstance manifest and how long the balance lasts."""
    c: Ctx = ctx.obj
    try:
        spec = parse_manifest(yaml.safe_load(file.read_text()))
        if pricebook is not None:
            pb = price_book(yaml.safe_load(pricebook.read_text()))
        else:
            pb = price_book(call(c.client().get, "/v1/pricebook"))
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
    data = {
        "instance": spec.name, "product": spec.product, "gpus": spec.gpus,
        "kind": est.kind, "resource": est.resource,
        "storage_gib": spec.quota_gib, "mode": MODE_NAMES[spec.mode], "currency": cur,
        "payg_gpu_per_hour": _plain(est.payg_gpu_per_hour, cur),
        "spot_gpu_per_hour": _plain(est.spot_gpu_per_hour, cur),
        "storage_per_hour": _plain(est.storage_per_hour, cur),
        "packages": {str(k): _plain(v, cur) for k, v in est.packages.items()},
        "selected_per_hour": _plain(est.selected_per_hour, cur),
        "selected_package": _plain(est.selected_package, cur),
        "balance": None if est.balance_minor is None else str(from_minor(est.balance_minor, cur)),
        "lasts_seconds": est.lasts_seconds,
        "terms_covered": est.terms_covered,
    }  # fmt: skip
    emit(data, output, lambda: _estimate_text(spec, est))


def _plain(amount: Any, currency: str) -> str | None:
    """An exact price as a decimal string for json/yaml (never a float)."""
    return None if amount is None else format_price(amount, currency).split()[0]


def _estimate_text(spec: Any, est: Any) -> Any:
    cur = est.currency
    units = UNITS[est.kind]
    lines: list[Any] = [
        f"instance: {spec.name or '(unnamed)'}: {spec.gpus} x {spec.product} "
        f"({units}, {est.resource}), {spec.quota_gib} GiB storage"
    ]
    table = _table("price", "amount")
    table.add_row(f"pay-as-you-go {units} / hour", format_price(est.payg_gpu_per_hour, cur))
    if est.spot_gpu_per_hour is not None:
        table.add_row(f"spot {units} / hour", format_price(est.spot_gpu_per_hour, cur))
    table.add_row("instance storage / hour", format_price(est.storage_per_hour, cur))
    for period, price in est.packages.items():
        table.add_row(f"{period} package (storage included)", format_price(price, cur))
    lines.append(table)
    if est.selected_per_hour is not None:
        lines.append(
            f"{MODE_NAMES[spec.mode]}: {format_price(est.selected_per_hour, cur)} per hour"
        )
    if est.selected_package is not None:
        renew = ", renewed automatically" if spec.auto_renew else ""
        lines.append(
            f"{spec.period} package: {format_price(est.selected_package, cur)} upfront{renew}"
        )
    if est.balance_minor is None:
        lines.append("balance: unknown (give --account or --balance)")
    elif est.lasts_seconds is not None:
        lines.append(f"balance {format_money(est.balance_minor, cur)} lasts "
                     f"{human_duration(est.lasts_seconds)}")  # fmt: skip
    elif est.terms_covered is not None:
        lines.append(f"balance {format_money(est.balance_minor, cur)} pays for "
                     f"{est.terms_covered} {spec.period} term(s)")  # fmt: skip
    return Group(*lines)


@app.command("wait")
def wait_cmd(
    ctx: typer.Context,
    kind: Annotated[str, typer.Argument(help="gi, md, rch, cdisk or img (or the full name)")],
    name: str,
    for_: Annotated[
        str, typer.Option("--for", help="a phase (Running; md: its state) or condition=TYPE")
    ],
    timeout: Annotated[str, typer.Option(help="e.g. 90s, 5m, 1h30m")] = "5m",
    namespace: Annotated[
        str | None, typer.Option("-n", "--namespace", help="default: the kubeconfig context's")
    ] = None,
    interval: Annotated[float, typer.Option(min=0.1, help="seconds between polls")] = 2.0,
    output: OutputOpt = Format.table,
) -> None:
    """Wait until an object reaches a phase or condition, polling the Kubernetes API
    server with the kubeconfig's credentials; progress on stderr."""
    c: Ctx = ctx.obj
    k = KINDS.get(kind.lower())
    if k is None:
        fail(f"KIND: {kind!r} is not one of {', '.join(sorted(KINDS))}", ExitCode.USAGE)
    try:
        want = Want.parse(for_)
        timeout_s = parse_duration(timeout)
    except ValueError as exc:
        fail(str(exc), ExitCode.USAGE)
    kube = c.kube()
    server = c.server or (kube.server if kube else None)
    if not server:
        fail("no Kubernetes API server: no kubeconfig context has one; give --server",
             ExitCode.USAGE)  # fmt: skip
    ns = namespace or (kube.namespace if kube else "default")
    reader = KubeReader(
        server, c.token(), kube.verify if kube else True, kube.cert if kube else None
    )
    try:
        with progress_reporter(err_console, f"{k.plural}/{name} to be {want.describe()}") as rep:
            obj = wait_for(
                lambda: reader.get(k.plural, ns, name), k, want, timeout_s, rep, interval
            )
    except WaitError as exc:
        fail(f"{k.plural}/{name} in {ns}: {exc}", ExitCode[exc.code])
    emit(obj, output, lambda: f"{k.plural}/{name}: {want.describe()}")


class Shell(StrEnum):
    bash = "bash"
    zsh = "zsh"
    fish = "fish"


@app.command()
def completion(shell: Shell) -> None:
    """Print a shell completion script; e.g. in ~/.bashrc: eval "$(gpucloud completion bash)"."""
    typer.echo(get_completion_script(prog_name="gpucloud", complete_var=COMPLETE_VAR, shell=shell))


def main() -> None:
    """The console script; completion requests (``_GPUCLOUD_COMPLETE``, set by the script
    ``completion`` prints) are answered by typer's completion classes."""
    completion_init()
    app(prog_name="gpucloud", complete_var=COMPLETE_VAR)


if __name__ == "__main__":
    main()
