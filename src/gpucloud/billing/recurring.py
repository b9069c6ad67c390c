"""Recurring charges settled window by window (instance storage every hour, ...).

A charge posted once per window must not round each window on its own: 50 GiB at
0.0005/GiB-hour is 0.025 an hour, and rounding every hour to the fen posts 0.02, losing
a fifth of the revenue (10 GiB, 0.005 an hour, would never be billed). ``RunningTotal``
keeps the exact total so far and what was posted; each window posts the delta of the
rounded cumulative totals (``next_posting``), so the postings always equal the exact
total rounded once: at most half a minor unit off at any window boundary, never drifting.
The caller persists the running total (``encode``/``decode``) beside its progress.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

from gpucloud.billing.errors import PriceError
from gpucloud.billing.money import DEFAULT_CURRENCY, Exact, as_fraction, next_posting


@dataclass(frozen=True)
class RunningTotal:
    exact: Fraction = Fraction(0)  # exact total so far, in major units
    posted_minor: int = 0  # what was posted for it, minor units

    def add(self, amount: Exact, currency: str = DEFAULT_CURRENCY) -> tuple[RunningTotal, int]:
        """Add one window's exact charge; returns the new total and what to post now."""
        value = as_fraction(amount, "window charge")
        if value < 0:
            raise PriceError(f"window charge: {value} is negative; a recurring charge only grows")
        total = self.exact + value
        delta = next_posting(total, self.posted_minor, currency)
        return RunningTotal(total, self.posted_minor + delta), delta

    def encode(self) -> str:
        """The exact total as ``numerator/denominator`` (a Decimal may not be exact)."""
        return f"{self.exact.numerator}/{self.exact.denominator}"

    @classmethod
    def decode(cls, exact: str | None, posted_minor: int | None) -> RunningTotal:
        """From what ``encode`` wrote and the posted minor units (None: nothing yet)."""
        if not exact:
            return cls(Fraction(0), int(posted_minor or 0))
        try:
            value = Fraction(exact)
        except (ValueError, ZeroDivisionError):
            raise PriceError(f"running total: {exact!r} is not a fraction such as 1/40") from None
        if value < 0:
            raise PriceError(f"running total: {exact!r} is negative")
        return cls(value, int(posted_minor or 0))
