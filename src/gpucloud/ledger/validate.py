"""Argument checks shared by the ledger: each error names the field and the rule."""

from __future__ import annotations

import re
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import TypeVar

from gpucloud.ledger.errors import InvalidInput

E = TypeVar("E", bound=StrEnum)
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def instant(value: object, field: str) -> datetime:
    if not isinstance(value, datetime) or value.tzinfo is None or value.utcoffset() is None:
        raise InvalidInput(f"{field}: must be a timezone-aware datetime, got {value!r}")
    return value


def integer(value: object, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"{field}: must be an int (minor units), got {type(value).__name__}")
    return value


def positive(value: object, field: str) -> int:
    number = integer(value, field)
    if number <= 0:
        raise InvalidInput(f"{field}: must be > 0, got {number}")
    return number


def text(value: object, field: str, *, max_len: int = 253, empty: bool = False) -> str:
    if not isinstance(value, str):
        raise InvalidInput(f"{field}: must be a string, got {type(value).__name__}")
    if not empty and not value.strip():
        raise InvalidInput(f"{field}: must not be empty")
    if len(value) > max_len:
        raise InvalidInput(f"{field}: at most {max_len} characters, got {len(value)}")
    if "\x00" in value:  # PostgreSQL cannot store it; nothing legitimate holds one
        raise InvalidInput(f"{field}: must not contain NUL characters")
    return value


def choice(value: object, enum: type[E], field: str) -> E:
    try:
        return enum(value)
    except ValueError:
        allowed = ", ".join(m.value for m in enum)
        raise InvalidInput(f"{field}: {value!r} is not one of {allowed}") from None


def price(value: object, field: str) -> Decimal:
    if isinstance(value, float | bool) or not isinstance(value, Decimal | int | str):
        raise InvalidInput(f"{field}: must be an exact Decimal, got {type(value).__name__}")
    try:
        dec = Decimal(value)
    except ArithmeticError:
        raise InvalidInput(f"{field}: {value!r} is not a decimal number") from None
    if not dec.is_finite() or dec < 0:
        raise InvalidInput(f"{field}: must be a finite decimal >= 0, got {value}")
    return dec


def sha256_hex(value: object, field: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _SHA256.match(value):
        raise InvalidInput(f"{field}: must be 64 lowercase hex digits (SHA-256), got {value!r}")
    return value
