"""Money: exact decimals, minor units and the one rounding rule.

Prices and exact amounts are ``Decimal`` (or ``Fraction`` inside the core); amounts
posted to the ledger are ``int`` minor units (fen for CNY). The one rounding rule is
ROUND_HALF_EVEN to the minor unit, applied once, when an amount is posted
(``to_minor``). A meter that grows over time posts the *delta of rounded cumulative
totals* (``next_posting``), so its postings always add up to the exact total rounded once.
"""

from __future__ import annotations

import re
from decimal import ROUND_HALF_EVEN, Context, Decimal, InvalidOperation
from fractions import Fraction
from typing import Final

from gpucloud.billing.errors import PriceError, UnknownCurrency

DEFAULT_CURRENCY: Final = "CNY"

# ISO 4217 minor-unit exponents of the currencies the project prices in.
CURRENCY_EXPONENTS: Final[dict[str, int]] = {"CNY": 2, "USD": 2, "EUR": 2, "JPY": 0}

# Prices have at most this many decimal places: enough for per-GB-hour storage prices
# (0.0004) while keeping every exact amount a short rational.
MAX_PRICE_PLACES: Final = 6

Exact = Decimal | Fraction | int
"""An exact amount in major units (yuan, dollars). Never a float."""

_PRICE_RE = re.compile(r"^(?P<int>\d+)(?:\.(?P<frac>\d+))?$")


def minor_exponent(currency: str) -> int:
    """Decimal places of the currency's minor unit (2 for CNY: 1 fen = 0.01 yuan)."""
    try:
        return CURRENCY_EXPONENTS[currency]
    except KeyError:
        known = ", ".join(sorted(CURRENCY_EXPONENTS))
        raise UnknownCurrency(f"currency {currency!r} is not supported (known: {known})") from None


def as_fraction(amount: Exact, what: str = "amount") -> Fraction:
    """The exact rational value of an amount; refuses floats, bools, NaN and infinities."""
    if isinstance(amount, bool) or not isinstance(amount, Decimal | Fraction | int):
        raise PriceError(
            f"{what} must be an exact Decimal, Fraction or int, not {type(amount).__name__}"
        )
    if isinstance(amount, Decimal) and not amount.is_finite():
        raise PriceError(f"{what} must be a finite number, not {amount}")
    return Fraction(amount)


def to_minor(amount: Exact, currency: str = DEFAULT_CURRENCY) -> int:
    """Round an exact amount to integer minor units, half to even. The one rounding rule."""
    scaled = as_fraction(amount) * 10 ** minor_exponent(currency)
    return round(scaled)  # Fraction.__round__ rounds exact halves to the even neighbour


def from_minor(minor: int, currency: str = DEFAULT_CURRENCY) -> Decimal:
    """Minor units back to an exact Decimal with the currency's places (1234 -> 12.34)."""
    if isinstance(minor, bool) or not isinstance(minor, int):
        raise PriceError(f"minor units must be an int, not {type(minor).__name__}")
    return _scaled(minor, minor_exponent(currency))


def format_money(minor: int, currency: str = DEFAULT_CURRENCY) -> str:
    """A posted amount for people: ``format_money(-1234, "CNY") == "-12.34 CNY"``."""
    return f"{from_minor(minor, currency)} {currency}"


def format_price(amount: Exact, currency: str = DEFAULT_CURRENCY) -> str:
    """An exact (unrounded) price for people, with at least the currency's places:
    ``format_price(Decimal("0.0004")) == "0.0004 CNY"``, ``Decimal("9.8") -> "9.80 CNY"``."""
    value = as_fraction(amount, "price")
    places = minor_exponent(currency)
    dec = to_decimal(value)
    if -dec.as_tuple().exponent < places:  # type: ignore[operator]
        dec = dec.quantize(Decimal(1).scaleb(-places))
    return f"{dec} {currency}"


def next_posting(
    exact_cumulative: Exact, posted_minor: int, currency: str = DEFAULT_CURRENCY
) -> int:
    """What to post now for a meter whose exact running total is ``exact_cumulative`` and of
    which ``posted_minor`` has already been posted: round(cumulative) - posted.

    Summed over any sequence of growing totals, the postings equal ``to_minor(final total)``.
    A meter never shrinks, so a negative result means the caller lost or double-counted
    usage; it is refused rather than posted as a silent credit.
    """
    if isinstance(posted_minor, bool) or not isinstance(posted_minor, int):
        raise PriceError(f"posted_minor must be an int, not {type(posted_minor).__name__}")
    delta = to_minor(exact_cumulative, currency) - posted_minor
    if delta < 0:
        raise PriceError(
            f"meter went backwards: {posted_minor} minor units already posted but the "
            f"cumulative total {exact_cumulative} rounds to {posted_minor + delta}"
        )
    return delta


def parse_price(text: str, field: str = "price") -> Decimal:
    """Parse a price written as a decimal string ("9.80", "0.0004").

    Refuses floats (a YAML ``9.8`` is a binary float: quote it), NaN and infinities,
    negatives, exponents, and more than ``MAX_PRICE_PLACES`` decimal places.
    """
    if isinstance(text, float):
        raise PriceError(
            f"{field}: {text!r} is a floating-point number; write prices as quoted decimal "
            f'strings, e.g. "{text}"'
        )
    if isinstance(text, bool) or not isinstance(text, str):
        raise PriceError(f"{field}: expected a decimal string, got {type(text).__name__}")
    stripped = text.strip()
    match = _PRICE_RE.match(stripped)
    if match is None:
        raise PriceError(f'{field}: {text!r} is not a non-negative decimal such as "9.80"')
    places = len(match.group("frac") or "")
    if places > MAX_PRICE_PLACES:
        raise PriceError(
            f"{field}: {text!r} has {places} decimal places; at most {MAX_PRICE_PLACES} are allowed"
        )
    try:
        return Decimal(stripped)
    except InvalidOperation:  # pragma: no cover - the regex admits only valid literals
        raise PriceError(f"{field}: {text!r} is not a decimal number") from None


def parse_amount(text: str, currency: str = DEFAULT_CURRENCY, field: str = "amount") -> int:
    """An amount of money a person typed ("100.00", a recharge) as integer minor units.

    Refuses floats, signs, exponents, zero, and anything finer than the currency's minor
    unit: "10.123" is refused for CNY (at most 2 decimal places), never rounded to 10.12;
    "100.5" is refused for JPY (no decimal places). The rule is on the digits written, so
    "10.120" is refused too (the same rule as the Recharge CRD's)."""
    if isinstance(text, float):
        raise PriceError(
            f"{field}: {text!r} is a floating-point number; write amounts as quoted decimal "
            f'strings, e.g. "{text}"'
        )
    if isinstance(text, bool) or not isinstance(text, str):
        raise PriceError(f"{field}: expected a decimal string, got {type(text).__name__}")
    match = _PRICE_RE.match(text.strip())
    if match is None:
        raise PriceError(f'{field}: {text!r} is not a positive decimal such as "100.00"')
    places = minor_exponent(currency)
    written = len(match.group("frac") or "")
    if written > places:
        unit = "whole units" if places == 0 else f"at most {places} decimal places"
        raise PriceError(
            f"{field}: {text!r} is finer than the minor unit of {currency} ({unit}); "
            "amounts are never rounded"
        )
    minor = int(match.group("int") + (match.group("frac") or "").ljust(places, "0"))
    if minor <= 0:
        raise PriceError(f"{field}: must be greater than zero, got {text!r}")
    return minor


# Exact rationals become Decimals here. A quotient that does not terminate (a price per
# hour divided by 3600 s has a factor 1/9) is rounded at 80 significant digits. The
# denominators the core produces are at most 3600 * 10**6 (microseconds) * 2**30 (GiB)
# * 10**6 (price places) < 10**26, so an amount that is not exactly a half minor unit is
# at least 10**-29 away from one, while 80 digits err by under 10**-50 for any amount
# below 10**30: the Decimal always rounds (to_minor) to the same posting as the rational.
_CONTEXT: Final = Context(prec=80, rounding=ROUND_HALF_EVEN)


def _scaled(units: int, places: int) -> Decimal:
    """units x 10**-places, exactly (Decimal.scaleb would round to the context's precision)."""
    sign = 1 if units < 0 else 0
    return Decimal((sign, tuple(int(c) for c in str(abs(units))), -places))


def to_decimal(value: Fraction | int) -> Decimal:
    """An exact rational as a Decimal (exact whenever its decimal expansion terminates)."""
    value = Fraction(value)
    num, den = value.numerator, value.denominator
    if den == 1:
        return Decimal(num)
    # Terminating iff den has no prime factors but 2 and 5; scale to an exact integer then.
    rest, twos, fives = den, 0, 0
    while rest % 2 == 0:
        rest //= 2
        twos += 1
    while rest % 5 == 0:
        rest //= 5
        fives += 1
    if rest == 1:
        places = max(twos, fives)
        return _scaled(num * 10**places // den, places)
    return _CONTEXT.divide(Decimal(num), Decimal(den))
