"""The ledger's side of a statement: every entry, the period's GPU-seconds, the rates."""

from __future__ import annotations

from gpucloud.billing.money import format_price
from gpucloud.billing.statement import Line, Period, Statement, build
from gpucloud.ledger import Ledger
from gpucloud.ledger.types import Meter, MeterUnit

_PAGE = 10_000
_UNITS = {MeterUnit.GPU_HOUR: "GPU-hour", MeterUnit.GB_HOUR: "GiB-hour"}


def rate_text(meter: Meter, currency: str) -> str:
    """The meter's exact price, unrounded: "19.80 CNY / GPU-hour"."""
    unit = _UNITS.get(MeterUnit(meter.unit), str(meter.unit))
    return f"{format_price(meter.unit_price, currency)} / {unit}"


def collect(ledger: Ledger, account: str, period: Period) -> Statement:
    acct = ledger.get_account(account)  # NotFound for an unknown account
    lines: list[Line] = []
    after: int | None = None
    while True:
        page = ledger.entries(account, after_id=after, limit=_PAGE)
        lines += [Line(e.at, str(e.kind), e.amount_minor, e.resource, e.memo) for e in page]
        if len(page) < _PAGE:
            break
        after = page[-1].id
    usage = ledger.usage_summary(
        account=account, kind="gpu_time", since=period.start, until=period.end
    )
    gpu_seconds = {row.resource or "": row.gpu_seconds for row in usage}
    rates: dict[str, list[str]] = {}
    for meter in ledger.meters(account):
        text = rate_text(meter, acct.currency)
        if text not in rates.setdefault(meter.resource, []):
            rates[meter.resource].append(text)
    return build(account, acct.currency, period, lines, gpu_seconds, rates)
