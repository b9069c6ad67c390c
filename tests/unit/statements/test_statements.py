"""Monthly statements: the pure builder, and a real SQLite ledger rendered as CSV and PDF
(read back with pypdf). The GPU price, 19.80 per GPU-hour, does not divide into seconds:
the statement shows the ledger's own postings, so the closing balance is the ledger's to
the fen."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import pytest
from pypdf import PdfReader

from gpucloud.billing.money import to_minor
from gpucloud.billing.statement import Line, Period, PeriodError, build
from gpucloud.ledger import Ledger, open_ledger
from gpucloud.statements import collect, to_csv, to_dict, to_pdf
from gpucloud.usage import GPURef, PodRef, UsageKind, UsageRecord

NOV = Period(2026, 11)


def test_periods() -> None:
    assert Period.parse("2026-11") == NOV and str(NOV) == "2026-11"
    assert NOV.start == datetime(2026, 11, 1, tzinfo=UTC)
    assert NOV.end == datetime(2026, 12, 1, tzinfo=UTC)
    assert Period.parse("2026-12").end == datetime(2027, 1, 1, tzinfo=UTC)
    for bad in ("2026-13", "2026-1", "11-2026", "2026-00", ""):
        with pytest.raises(PeriodError, match=r"period: .* is not a month written YYYY-MM"):
            Period.parse(bad)


def at(day: int, month: int = 11, second: int = 0) -> datetime:
    return datetime(2026, month, day, tzinfo=UTC) + timedelta(seconds=second)


def test_build_splits_at_the_period_edges_and_groups_charges() -> None:
    lines = [
        Line(at(31, 10, 86399), "recharge", 100_00, None, "before"),  # last second of October
        Line(at(1), "charge", -1_99, "team-a/b", "first second of November"),
        Line(at(2), "recharge", 50_00, None, "top-up"),
        Line(at(3), "charge", -3_01, "team-a/a", ""),
        Line(at(4), "refund", 1_00, "team-a/a", "package refund"),
        Line(at(5), "charge", -1, "team-a/a", ""),
        Line(at(6), "adjustment", -50, None, "correction"),
        Line(at(1, 12), "charge", -7_00, "team-a/a", "December: not in it"),
    ]
    rates = {"team-a/a": ["19.80 CNY / GPU-hour"]}
    st = build("acme", "CNY", NOV, lines, {"team-a/a": 3702}, rates)
    assert st.opening_minor == 100_00
    assert [x.memo for x in st.payments] == ["top-up"]
    assert [x.memo for x in st.refunds] == ["package refund"]
    assert [x.memo for x in st.adjustments] == ["correction"]
    assert [(g.resource, g.total_minor, g.gpu_seconds) for g in st.charges] == [
        ("team-a/a", -3_02, 3702), ("team-a/b", -1_99, 0),
    ]  # fmt: skip
    assert st.charges[0].rates == ("19.80 CNY / GPU-hour",)
    assert st.closing_minor == 100_00 - 1_99 + 50_00 - 3_01 + 1_00 - 1 - 50
    assert st.closing_minor == st.opening_minor + sum(x.amount_minor for x in st.lines)
    empty = build("acme", "CNY", Period(2026, 9), lines)
    assert (empty.opening_minor, empty.closing_minor, empty.lines) == (0, 0, [])


# --- against a real ledger --------------------------------------------------------------
PRICE = "19.80"
NOV_S = int(at(3).timestamp())


def gpu(start: int, length: int) -> UsageRecord:
    return UsageRecord(
        kind=UsageKind.GPU_TIME, node="node-1", start=start, end=start + length,
        quantity=length, gpu=GPURef(uuid="GPU-a", product="NVIDIA-H100"),
        pod=PodRef(namespace="team-a", name="nb", uid="pod-1"),
    )  # fmt: skip


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    lg = open_ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    lg.ensure_account("acme", "CNY")
    lg.post_entry("acme", "recharge", 1000_00, "oct", memo="October top-up", at=at(15, 10))
    lg.post_entry("acme", "recharge", 500_00, "nov", memo="November top-up", at=at(2))
    lg.open_meter(
        "m1", account="acme", resource="team-a/nb", kind="gpu_time", subject="pod-1",
        unit_price=Decimal(PRICE), unit="gpu_hour", opened_at=at(3),
    )  # fmt: skip
    for i in range(3):  # 3 x 1234 = 3702 GPU-seconds, in the agent's 10 s windows
        base = NOV_S + 2000 * i
        batch = [gpu(base + 10 * k, 10) for k in range(123)] + [gpu(base + 1230, 4)]
        lg.ingest_usage(batch, received_at=at(4))
        lg.rate_pending(at(4) + timedelta(seconds=i))
    lg.post_entry("acme", "refund", 3_33, "refund-1", resource="team-a/nb", memo="refund",
                  at=at(20))  # fmt: skip
    lg.post_entry("acme", "charge", -7_00, "dec-1", resource="team-a/nb", memo="December",
                  at=at(1, 12))  # fmt: skip
    yield lg
    lg.close()


def test_the_closing_balance_is_the_ledgers_to_the_fen(ledger: Ledger) -> None:
    nov = collect(ledger, "acme", NOV)
    exact = Fraction(3702) * Fraction(PRICE) / 3600  # 20.361 yuan
    (group,) = nov.charges
    assert group.resource == "team-a/nb" and group.gpu_seconds == 3702
    assert group.total_minor == -to_minor(exact) == -20_36
    assert group.rates == ("19.80 CNY / GPU-hour",)
    assert nov.opening_minor == 1000_00
    # the ledger's balance without December's entry
    assert nov.closing_minor == ledger.balance("acme") + 7_00 == 1000_00 + 500_00 - 20_36 + 3_33
    dec = collect(ledger, "acme", Period(2026, 12))
    assert dec.opening_minor == nov.closing_minor
    assert dec.closing_minor == ledger.balance("acme") == ledger.entries_sum("acme")


def test_csv_and_json_carry_every_line(ledger: Ledger) -> None:
    st = collect(ledger, "acme", NOV)
    rows = list(csv.reader(io.StringIO(to_csv(st))))
    assert rows[0] == ["# account", "acme", "period", "2026-11", "currency", "CNY"]
    table = [dict(zip(rows[1], r, strict=True)) for r in rows[2:]]
    by_section = {r["section"]: r for r in table}
    assert by_section["opening balance"]["amount"] == "1000.00"
    assert by_section["closing balance"]["amount"] == "1482.97"
    assert by_section["payments"]["memo"] == "November top-up"
    assert by_section["refunds"]["amount"] == "3.33"
    total = by_section["resource total"]
    assert (total["resource"], total["amount"]) == ("team-a/nb", "-20.36")
    assert total["gpu_seconds"] == "3702"
    assert total["rates"] == "19.80 CNY / GPU-hour"
    charges = [r for r in table if r["section"] == "charges"]
    assert sum(Decimal(r["amount"]) for r in charges) == Decimal("-20.36")
    data = to_dict(st)
    assert data["closing_minor"] == st.closing_minor and data["closing"] == "1482.97"
    assert data["charges"][0]["total"] == "-20.36"


def test_the_pdf_reads_back(ledger: Ledger) -> None:
    pdf = to_pdf(collect(ledger, "acme", NOV))
    assert pdf.startswith(b"%PDF")
    text = "\n".join(page.extract_text() for page in PdfReader(io.BytesIO(pdf)).pages)
    for words in (
        "Statement 2026-11: account acme", "Opening balance", "1000.00 CNY", "November top-up",
        "team-a/nb", "3702 GPU-seconds at 19.80 CNY / GPU-hour", "-20.36", "3.33",
        "Closing balance", "1482.97 CNY",
    ):  # fmt: skip
        assert words in text, (words, text)
    assert "December" not in text
