"""Test helpers: a sample price book, hypothesis strategies, and plain independent oracles
(integer and Fraction arithmetic only, never the code under test)."""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st

from gpucloud.billing import PriceBook
from gpucloud.crd.pricebook import price_book

PROPS = settings(max_examples=200, deadline=None)

A100 = "NVIDIA-A100-SXM4-80GB"
H100 = "NVIDIA-H100-80GB-HBM3"


def sample_spec() -> dict[str, Any]:
    return {
        "currency": "CNY",
        "gpus": [
            {
                "product": A100,
                "payAsYouGoPerHour": "9.80",
                "spotPerHour": "3.90",
                "packages": {"day": "199.00", "week": "1199.00", "month": "4599.00"},
                "modelOnlinePerHour": "9.80",
            },
            {"product": H100, "payAsYouGoPerHour": "19.99"},
        ],
        "storage": {
            "instancePerGBHour": "0.0004",
            "cloudDiskPerGBHour": "0.0003",
            "imagePerGBHour": "0.0002",
        },
        "models": {
            "per1KTokens": "0.0020",
            "perImage": "0.0800",
            "perVideo": "1.2000",
            "personalPerRequestSecond": "0.0030",
        },
    }


def sample_pricebook() -> PriceBook:
    return price_book(sample_spec())


# Prices: up to 6 places, from zero to a few thousand, with round and ragged values,
# written as the PriceBook CRD takes them (plain decimal strings, no exponent).
price_strings = st.one_of(
    st.integers(0, 10**10).map(lambda n: format(Decimal(n).scaleb(-6), "f")),
    st.integers(0, 10**6).map(lambda n: format(Decimal(n).scaleb(-2), "f")),
    st.sampled_from(["0", "0.005", "0.015", "0.000001", "9.80", "3.90", "0.0004", "12.345"]),
)
# GPU, spot, package and model-online prices must be greater than zero (the CRD's rule).
positive_price_strings = price_strings.filter(lambda s: Decimal(s) > 0)


@st.composite
def pricebooks(draw: st.DrawFn, currency: str | None = None) -> PriceBook:
    payg = draw(positive_price_strings)
    spot = draw(positive_price_strings)
    if Decimal(spot) > Decimal(payg):
        spot = payg
    spec = {
        "currency": currency or draw(st.sampled_from(["CNY", "USD", "EUR", "JPY"])),
        "gpus": [
            {
                "product": A100,
                "payAsYouGoPerHour": payg,
                "spotPerHour": spot,
                "packages": {p: draw(positive_price_strings) for p in ("day", "week", "month")},
                "modelOnlinePerHour": draw(positive_price_strings),
            }
        ],
        "storage": {
            k: draw(price_strings)
            for k in ("instancePerGBHour", "cloudDiskPerGBHour", "imagePerGBHour")
        },
        "models": {
            k: draw(price_strings)
            for k in ("per1KTokens", "perImage", "perVideo", "personalPerRequestSecond")
        },
    }
    return price_book(spec)


EXP = {"CNY": 2, "USD": 2, "EUR": 2, "JPY": 0}


def round_half_even(value: Fraction) -> int:
    """Round a rational to an integer, ties to even, with integer divmod only."""
    q, r = divmod(value.numerator, value.denominator)  # floor division, 0 <= r < den
    twice = 2 * r
    if twice > value.denominator or (twice == value.denominator and q % 2 == 1):
        q += 1
    return q


def minor_of(value: Fraction, currency: str) -> int:
    return round_half_even(value * 10 ** EXP[currency])


def assert_exact(result: Decimal, oracle: Fraction, currency: str = "CNY") -> None:
    """The Decimal equals the rational (to 60 places where it cannot terminate) and rounds
    to the same posting."""
    assert isinstance(result, Decimal)
    assert abs(Fraction(result) - oracle) < Fraction(1, 10**60), (result, oracle)
    den = oracle.denominator
    while den % 2 == 0:
        den //= 2
    while den % 5 == 0:
        den //= 5
    if den == 1:
        assert Fraction(result) == oracle
    assert minor_of(Fraction(result), currency) == minor_of(oracle, currency)
