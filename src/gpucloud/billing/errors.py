"""Errors of the billing core. Every one is a ValueError (bad input), so callers that
turn bad input into a 4xx or a Kubernetes event need catch only one type."""

from __future__ import annotations


class BillingError(ValueError):
    """Base of every error the billing core raises on bad input."""


class PriceError(BillingError):
    """A price or amount that is not an exact, non-negative decimal."""


class UnknownCurrency(BillingError):
    """A currency code the core has no minor-unit exponent for."""


class PriceBookError(BillingError):
    """A PriceBook resource whose spec does not validate; the message names every field."""


class UnknownProduct(BillingError, LookupError):
    """A GPU product the price book has no entry for."""

    def __init__(self, product: str, known: list[str]) -> None:
        self.product = product
        self.known = known
        listed = ", ".join(known) if known else "none"
        super().__init__(f"GPU product {product!r} is not in the price book (known: {listed})")

    def __str__(self) -> str:  # LookupError would otherwise quote the message like a key
        return self.args[0]


class NotOffered(BillingError):
    """The price book does not offer this (spot, or a package period) for the product."""


class TermError(BillingError):
    """An instant outside the package term it is applied to, or a reversed interval."""
