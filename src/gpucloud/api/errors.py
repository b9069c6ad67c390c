"""The HTTP status of each refusal the ledger and the billing core raise (one table for
the JSON API's error bodies and the console's error pages)."""

from __future__ import annotations

from fastapi import HTTPException

from gpucloud.billing.errors import BillingError
from gpucloud.ledger import (
    IdempotencyConflict,
    InvalidInput,
    LedgerError,
    NotFound,
    OrderRefused,
    ReviewRefused,
)

STATUS: list[tuple[type[Exception], int]] = [
    (NotFound, 404),
    (InvalidInput, 422),
    (IdempotencyConflict, 409),
    (OrderRefused, 409),
    (ReviewRefused, 409),
    (LedgerError, 409),
    (BillingError, 422),
]
REFUSALS: tuple[type[Exception], ...] = (HTTPException, *(cls for cls, _ in STATUS))


def refusal(exc: Exception) -> tuple[int, str]:
    """(status, detail) of a refusal in ``REFUSALS``."""
    if isinstance(exc, HTTPException):
        return exc.status_code, str(exc.detail)
    return next(code for cls, code in STATUS if isinstance(exc, cls)), str(exc)
