"""A statement as JSON (a dict), CSV and PDF. Amounts are the ledger's minor units shown
with the currency's places; nothing is rounded here."""

from __future__ import annotations

import csv
import io
from typing import Any

from gpucloud.billing.money import from_minor
from gpucloud.billing.statement import Line, Statement

_TITLES = {"recharge": "Payments", "refund": "Refunds", "adjustment": "Adjustments"}


def _amount(minor: int, st: Statement) -> str:
    return str(from_minor(minor, st.currency))


def _line(line: Line, st: Statement) -> dict[str, Any]:
    return {
        "at": line.at.isoformat(),
        "kind": line.kind,
        "resource": line.resource,
        "memo": line.memo,
        "amount_minor": line.amount_minor,
        "amount": _amount(line.amount_minor, st),
    }


def to_dict(st: Statement) -> dict[str, Any]:
    return {
        "account": st.account,
        "currency": st.currency,
        "period": str(st.period),
        "opening_minor": st.opening_minor,
        "opening": _amount(st.opening_minor, st),
        "payments": [_line(x, st) for x in st.payments],
        "refunds": [_line(x, st) for x in st.refunds],
        "adjustments": [_line(x, st) for x in st.adjustments],
        "charges": [
            {
                "resource": g.resource or None,
                "gpu_seconds": g.gpu_seconds,
                "rates": list(g.rates),
                "total_minor": g.total_minor,
                "total": _amount(g.total_minor, st),
                "entries": [_line(x, st) for x in g.lines],
            }
            for g in st.charges
        ],
        "closing_minor": st.closing_minor,
        "closing": _amount(st.closing_minor, st),
    }


CSV_COLUMNS = ["section", "at", "kind", "resource", "memo", "amount", "gpu_seconds", "rates"]


def to_csv(st: Statement) -> str:
    """One table: a row per entry, a total row per resource, opening and closing rows."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["# account", st.account, "period", str(st.period), "currency", st.currency])
    w.writerow(CSV_COLUMNS)
    w.writerow(["opening balance", st.period.start.isoformat(), "", "", "", _amount(
        st.opening_minor, st), "", ""])  # fmt: skip
    for lines in (st.payments, st.refunds, st.adjustments):
        for x in lines:
            w.writerow([_TITLES[x.kind].lower(), x.at.isoformat(), x.kind, x.resource or "",
                        x.memo, _amount(x.amount_minor, st), "", ""])  # fmt: skip
    for g in st.charges:
        for x in g.lines:
            w.writerow(["charges", x.at.isoformat(), x.kind, g.resource, x.memo,
                        _amount(x.amount_minor, st), "", ""])  # fmt: skip
        w.writerow(["resource total", "", "", g.resource, "", _amount(g.total_minor, st),
                    g.gpu_seconds, "; ".join(g.rates)])  # fmt: skip
    w.writerow(["closing balance", st.period.end.isoformat(), "", "", "", _amount(
        st.closing_minor, st), "", ""])  # fmt: skip
    return out.getvalue()


def _latin1(text: str) -> str:
    """The PDF's core font is Latin-1: other characters become '?', never an error."""
    return text.encode("latin-1", "replace").decode("latin-1")


def to_pdf(st: Statement) -> bytes:
    from fpdf import FPDF  # imported here: only the API's statement route needs it

    pdf = FPDF(format="A4")
    pdf.set_auto_page_break(auto=True, margin=15)
    pdf.add_page()
    pdf.set_font("Helvetica", "B", 14)
    pdf.cell(0, 8, _latin1(f"Statement {st.period}: account {st.account}"),
             new_x="LMARGIN", new_y="NEXT")  # fmt: skip
    pdf.set_font("Helvetica", size=9)
    pdf.cell(0, 6, f"Currency {st.currency}; {st.period.start:%Y-%m-%d} to {st.period.end:%Y-%m-%d}"
             " (UTC, end exclusive)", new_x="LMARGIN", new_y="NEXT")  # fmt: skip

    def row(*cells: str, bold: bool = False) -> None:
        pdf.set_font("Helvetica", "B" if bold else "", 9)
        widths = (40, 95, 45)
        for width, text in zip(widths, cells, strict=False):
            align = "R" if width == widths[-1] else "L"
            pdf.cell(width, 6, _latin1(text)[:70], align=align)
        pdf.ln(6)

    pdf.ln(2)
    row("Opening balance", "", f"{_amount(st.opening_minor, st)} {st.currency}", bold=True)
    for lines in (st.payments, st.refunds, st.adjustments):
        if lines:
            row(_TITLES[lines[0].kind], bold=True)
            for x in lines:
                row(f"{x.at:%Y-%m-%d %H:%M:%S}", x.memo, _amount(x.amount_minor, st))
    if st.charges:
        row("Charges by resource", bold=True)
    for g in st.charges:
        rates = ", ".join(g.rates) or "-"
        row(g.resource or "(no resource)", f"{g.gpu_seconds} GPU-seconds at {rates}",
            _amount(g.total_minor, st), bold=True)  # fmt: skip
        for x in g.lines:
            row(f"  {x.at:%Y-%m-%d %H:%M:%S}", x.memo, _amount(x.amount_minor, st))
    row("Closing balance", "", f"{_amount(st.closing_minor, st)} {st.currency}", bold=True)
    return bytes(pdf.output())
