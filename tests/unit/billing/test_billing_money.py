from decimal import Decimal
from fractions import Fraction

import pytest
from billing_oracles import PROPS, minor_of
from hypothesis import given
from hypothesis import strategies as st

from gpucloud.billing import (
    PriceError,
    UnknownCurrency,
    format_money,
    format_price,
    from_minor,
    next_posting,
    parse_amount,
    parse_price,
    to_decimal,
    to_minor,
)


@pytest.mark.parametrize(
    ("amount", "currency", "minor"),
    [
        ("0.005", "CNY", 0),  # tie -> even (0)
        ("0.015", "CNY", 2),  # tie -> even (2)
        ("0.025", "CNY", 2),
        ("0.0250001", "CNY", 3),
        ("12.344999", "CNY", 1234),
        ("-0.015", "CNY", -2),
        ("2.5", "JPY", 2),
        ("3.5", "JPY", 4),
        ("9.80", "USD", 980),
        ("0", "EUR", 0),
    ],
)
def test_to_minor_half_even(amount: str, currency: str, minor: int) -> None:
    assert to_minor(Decimal(amount), currency) == minor


def test_to_minor_refuses_floats_nan_and_unknown_currency() -> None:
    with pytest.raises(PriceError, match="float"):
        to_minor(0.1)  # type: ignore[arg-type]
    with pytest.raises(PriceError, match="finite"):
        to_minor(Decimal("NaN"))
    with pytest.raises(UnknownCurrency, match=r"GBP.*known: CNY, EUR, JPY, USD"):
        to_minor(Decimal(1), "GBP")


def test_from_minor_and_format() -> None:
    assert from_minor(1234) == Decimal("12.34")
    assert str(from_minor(1200, "CNY")) == "12.00"
    assert str(from_minor(1200, "JPY")) == "1200"
    assert format_money(-1234, "CNY") == "-12.34 CNY"
    assert format_money(5, "USD") == "0.05 USD"
    assert format_price(Decimal("0.0004")) == "0.0004 CNY"
    assert format_price(Decimal("9.8")) == "9.80 CNY"
    assert format_price(Fraction(49, 18000)).startswith("0.0027222")


@pytest.mark.parametrize("text", ["9.80", "0", "0.000001", " 12 ", "4599.00"])
def test_parse_price_accepts_plain_decimals(text: str) -> None:
    assert parse_price(text) == Decimal(text.strip())


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (9.8, "floating-point.*quoted"),
        ("NaN", "not a non-negative decimal"),
        ("inf", "not a non-negative decimal"),
        ("-1.00", "not a non-negative decimal"),
        ("1e3", "not a non-negative decimal"),
        ("0.0000001", "7 decimal places; at most 6"),
        ("", "not a non-negative decimal"),
        (None, "expected a decimal string"),
    ],
)
def test_parse_price_refuses(value: object, message: str) -> None:
    with pytest.raises(PriceError, match=message):
        parse_price(value, "spotPerHour")  # type: ignore[arg-type]
    with pytest.raises(PriceError, match=r"^spotPerHour: "):
        parse_price(value, "spotPerHour")  # type: ignore[arg-type]


def test_next_posting_example_and_backwards_meter() -> None:
    # 9.80/h for 1, 1, 1 s: exact 0.002722.. per second; postings 0, 1, 0 (cumulative
    # rounds to 0.00, 0.01, 0.01) instead of three separately rounded zeros.
    per_s = Fraction(Decimal("9.80")) / 3600
    posted = 0
    deltas = []
    for s in (1, 2, 3):
        d = next_posting(to_decimal(per_s * s), posted)
        deltas.append(d)
        posted += d
    assert deltas == [0, 1, 0]
    with pytest.raises(PriceError, match="backwards"):
        next_posting(Decimal("0.01"), 5)


@PROPS
@given(
    st.integers(-(10**12), 10**12),
    st.integers(1, 10**9),
    st.sampled_from(["CNY", "USD", "EUR", "JPY"]),
)
def test_to_minor_matches_integer_oracle(num: int, den: int, currency: str) -> None:
    value = Fraction(num, den)
    assert to_minor(value, currency) == minor_of(value, currency)
    assert to_minor(to_decimal(value), currency) == minor_of(value, currency)


@PROPS
@given(
    st.lists(st.integers(0, 10**9), min_size=1, max_size=40),
    st.integers(1, 10**7),
    st.sampled_from(["CNY", "JPY"]),
)
def test_next_posting_deltas_sum_to_rounded_total(
    increments: list[int], den: int, currency: str
) -> None:
    """Any split of a meter's growth posts, in total, the exact total rounded once."""
    cumulative, posted = Fraction(0), 0
    for inc in increments:
        cumulative += Fraction(inc, den)
        delta = next_posting(to_decimal(cumulative), posted, currency)
        assert delta >= 0
        posted += delta
    assert posted == to_minor(cumulative, currency) == minor_of(cumulative, currency)


@PROPS
@given(st.integers(0, 10**15), st.integers(0, 6))
def test_parse_price_roundtrip(units: int, places: int) -> None:
    d = Decimal(units).scaleb(-places)
    assert parse_price(str(d) if "E" not in str(d) else f"{d:f}") == d


@PROPS
@given(st.integers(-(10**15), 10**15), st.sampled_from(["CNY", "JPY"]))
def test_from_minor_roundtrip(minor: int, currency: str) -> None:
    assert to_minor(from_minor(minor, currency), currency) == minor


@pytest.mark.parametrize(
    ("text", "currency", "minor"),
    [("10.12", "CNY", 1012), ("10.1", "CNY", 1010), ("10", "CNY", 1000), ("100", "JPY", 100)],
)
def test_parse_amount(text: str, currency: str, minor: int) -> None:
    assert parse_amount(text, currency) == minor


@pytest.mark.parametrize(
    ("text", "currency", "message"),
    [
        ("10.123", "CNY", "finer than the minor unit of CNY (at most 2 decimal places)"),
        ("10.120", "CNY", "finer than the minor unit of CNY"),  # the digits written count
        ("100.5", "JPY", "finer than the minor unit of JPY (whole units)"),
        ("0.00", "CNY", "must be greater than zero"),
        ("-5", "CNY", "not a positive decimal"),
        ("1e3", "CNY", "not a positive decimal"),
        (10.5, "CNY", "floating-point"),
    ],
)
def test_parse_amount_refuses_and_never_rounds(text: object, currency: str, message: str) -> None:
    with pytest.raises(PriceError, match=r"^spec\.amount: ") as err:
        parse_amount(text, currency, "spec.amount")  # type: ignore[arg-type]
    assert message in str(err.value)


@PROPS
@given(st.integers(1, 10**12), st.sampled_from(["CNY", "USD", "JPY"]))
def test_parse_amount_roundtrip(minor: int, currency: str) -> None:
    assert parse_amount(str(from_minor(minor, currency)), currency) == minor
