"""The built-in ``sandbox`` payment provider: fake money, real signatures.

It lets the demo and the tests "pay" an order: :meth:`SandboxProvider.paid_callback`
builds the exact signed request a real provider would send, and
:meth:`SandboxProvider.pay` posts it to the API.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from urllib.parse import quote

import httpx

from gpucloud.recharge.provider import HmacJsonProvider, PaymentRequest
from gpucloud.recharge.signing import SIGNATURE_HEADER, signature_header


class SandboxProvider(HmacJsonProvider):
    name = "sandbox"

    def __init__(self, secret: bytes, pay_base_url: str = "https://sandbox.gpucloud.invalid/pay"):
        super().__init__(secret)
        self.pay_base_url = pay_base_url.rstrip("/")

    def create_payment(
        self, order_id: str, amount_minor: int, currency: str, expires_at: datetime
    ) -> PaymentRequest:
        return PaymentRequest(
            url=f"{self.pay_base_url}/{quote(order_id, safe='')}"
            f"?amount_minor={amount_minor}&currency={currency}"
            f"&expires={int(expires_at.timestamp())}"
        )

    def paid_callback(
        self,
        order_id: str,
        amount_minor: int,
        currency: str,
        now: datetime,
        txn_id: str | None = None,
        status: str = "paid",
    ) -> tuple[bytes, dict[str, str]]:
        """The raw body and headers of a correctly signed callback."""
        body = json.dumps(
            {
                "order_id": order_id,
                "status": status,
                "amount_minor": amount_minor,
                "currency": currency,
                "provider_txn_id": txn_id or f"sbx-{uuid.uuid4().hex}",
            },
            separators=(",", ":"),
        ).encode()
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: signature_header(self.secret, int(now.timestamp()), body),
        }
        return body, headers

    def pay(
        self,
        api_base_url: str,
        order_id: str,
        amount_minor: int,
        currency: str,
        now: datetime,
        client: httpx.Client | None = None,
    ) -> httpx.Response:
        body, headers = self.paid_callback(order_id, amount_minor, currency, now)
        url = f"{api_base_url.rstrip('/')}/v1/payments/{self.name}/callback"
        if client is not None:
            return client.post(url, content=body, headers=headers)
        with httpx.Client(timeout=10) as own:
            return own.post(url, content=body, headers=headers)
