"""The payment provider interface the API talks to."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Literal, Protocol

import pydantic_core

from gpucloud.recharge.signing import (
    DEFAULT_TOLERANCE_S,
    SIGNATURE_HEADER,
    check_header,
    verify_signature,
)

MAX_NOTICE_BYTES = 16 * 1024  # a notice is a few hundred bytes
_LIMITS = {"order_id": 64, "status": 16, "currency": 8, "provider_txn_id": 128}


class CallbackError(ValueError):
    """A signed callback whose body is not a valid payment notice."""


@dataclass(frozen=True)
class PaymentRequest:
    """What the user is shown: a URL to open, also rendered as a QR code."""

    url: str


@dataclass(frozen=True)
class PaymentNotice:
    """A verified statement from the provider about one order."""

    order_id: str
    status: Literal["paid", "failed"]
    amount_minor: int
    currency: str
    provider_txn_id: str


class PaymentProvider(Protocol):
    name: str

    def create_payment(
        self, order_id: str, amount_minor: int, currency: str, expires_at: datetime
    ) -> PaymentRequest: ...

    def check_headers(self, headers: Mapping[str, str], now: datetime) -> None:
        """Before the body is read: raise SignatureError (-> 401) when the request cannot
        be a genuine callback (no signature, malformed, stale)."""
        ...

    def verify_callback(
        self, headers: Mapping[str, str], body: bytes, now: datetime
    ) -> PaymentNotice:
        """Raise SignatureError (-> 401) or CallbackError (-> 422), else return the notice."""
        ...


def parse_notice(body: bytes) -> PaymentNotice:
    """The JSON notice format shared by the built-in providers."""
    try:  # strict: no NaN or Infinity, bounded nesting
        data = pydantic_core.from_json(body, allow_inf_nan=False)
    except ValueError as exc:
        raise CallbackError(f"body: not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CallbackError("body: must be a JSON object")
    for field, typ in (
        ("order_id", str),
        ("status", str),
        ("amount_minor", int),
        ("currency", str),
        ("provider_txn_id", str),
    ):
        value = data.get(field)
        if not isinstance(value, typ) or isinstance(value, bool):
            raise CallbackError(f"{field}: required, must be {typ.__name__}")
        if isinstance(value, str) and not (
            0 < len(value) <= _LIMITS[field] and value.isprintable() and value.isascii()
        ):
            raise CallbackError(f"{field}: 1 to {_LIMITS[field]} printable ASCII characters")
    if data["status"] not in ("paid", "failed"):
        raise CallbackError("status: must be 'paid' or 'failed'")
    if not 0 < data["amount_minor"] <= 10**15:
        raise CallbackError("amount_minor: must be in 1..10^15")
    return PaymentNotice(
        order_id=data["order_id"],
        status=data["status"],
        amount_minor=data["amount_minor"],
        currency=data["currency"],
        provider_txn_id=data["provider_txn_id"],
    )


class HmacJsonProvider:
    """Base for providers that sign JSON notices with the shared scheme."""

    name = "hmac"

    def __init__(self, secret: bytes, tolerance_s: int = DEFAULT_TOLERANCE_S) -> None:
        if not secret:
            raise ValueError("secret: must not be empty")
        self.secret = secret
        self.tolerance_s = tolerance_s

    def check_headers(self, headers: Mapping[str, str], now: datetime) -> None:
        check_header(_get_header(headers, SIGNATURE_HEADER), now, self.tolerance_s)

    def verify_callback(
        self, headers: Mapping[str, str], body: bytes, now: datetime
    ) -> PaymentNotice:
        header = _get_header(headers, SIGNATURE_HEADER)
        verify_signature(self.secret, header, body, now, self.tolerance_s)
        return parse_notice(body)


def _get_header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is None:
        value = headers.get(name.lower())
    return value


class ProviderRegistry:
    def __init__(self, providers: list[PaymentProvider] | None = None) -> None:
        self._providers: dict[str, PaymentProvider] = {}
        for provider in providers or []:
            self.add(provider)

    def add(self, provider: PaymentProvider) -> None:
        self._providers[provider.name] = provider

    def get(self, name: str) -> PaymentProvider | None:
        return self._providers.get(name)

    def names(self) -> list[str]:
        return sorted(self._providers)
