"""Recharge: a request to add money to an account (online payment or bank transfer)."""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Literal

from pydantic import Field

from gpucloud.crd.common import (
    DNS_LABEL,
    MINOR_UNIT,
    POSITIVE,
    DecimalStr,
    Name,
    StatusBase,
    Timestamp,
    money,
    optional,
)
from gpucloud.crd.k8s import Cel, Spec
from gpucloud.crd.schema import Column, Definition

Amount = Annotated[
    DecimalStr,
    POSITIVE,
    Cel(
        "double(self) <= 1000000.0",
        "must be at most 1000000",
        check=lambda v: Decimal(v) <= 1_000_000,
    ),
    MINOR_UNIT,
]


class Online(Spec):
    provider: str = Field(default="sandbox", description="Payment provider.", pattern=DNS_LABEL)


class BankTransfer(Spec):
    payer: str = Field(description="Paying company.", min_length=1, max_length=256)
    bank: str = Field(description="Paying bank.", min_length=1, max_length=256)
    transfer_number: str = Field(
        description="Bank transfer reference number.", min_length=1, max_length=128
    )
    voucher_ref: str = Field(
        description="Reference of the uploaded transfer voucher (sha256:<hex> of the file): "
        "required, the admin reviews it before crediting.",
        pattern=r"^sha256:[0-9a-f]{64}$",
    )


class RechargeSpec(Spec):
    cel = (
        Cel("self == oldSelf", "spec is immutable once submitted"),
        Cel(
            "self.method != 'BankTransfer' || has(self.bankTransfer)",
            "bankTransfer is required when method is BankTransfer",
            ".bankTransfer",
            lambda s: s.method != "BankTransfer" or s.bank_transfer is not None,
        ),
        Cel(
            "self.method != 'Online' || !has(self.bankTransfer)",
            "bankTransfer is only allowed when method is BankTransfer",
            ".bankTransfer",
            lambda s: s.method != "Online" or s.bank_transfer is None,
        ),
        Cel(
            "self.method != 'BankTransfer' || !has(self.online)",
            "online is only allowed when method is Online",
            ".online",
            lambda s: s.method != "BankTransfer" or s.online is None,
        ),
    )
    account: Name = Field(description="Account to credit.")
    method: Literal["Online", "BankTransfer"] = Field(
        description="Online payment or corporate bank transfer."
    )
    amount: Amount = Field(description=money("Amount to credit, in the account currency."))
    online: Online | None = None
    bank_transfer: BankTransfer | None = None


class RechargeStatus(StatusBase):
    phase: (
        Literal[
            "Pending",
            "AwaitingPayment",
            "AwaitingReview",
            "Credited",
            "Rejected",
            "Expired",
            "Failed",
        ]
        | None
    ) = optional("Where the recharge stands.")
    order_id: str | None = optional("Payment order or voucher id.")
    payment_url: str | None = Field(
        default=None, alias="paymentURL", description="URL the QR code encodes."
    )
    expires_at: Timestamp | None = optional("When an unpaid order expires.")
    credited_at: Timestamp | None = optional("When the amount was credited.")
    reason: str | None = optional("Why it was rejected or failed.")


DEFINITION = Definition(
    kind="Recharge",
    plural="recharges",
    scope="Namespaced",
    short_names=["rch"],  # not "rc": ReplicationControllers have it
    description="A request to add money to an account: online payment or bank transfer.",
    spec=RechargeSpec,
    status=RechargeStatus,
    columns=[
        Column("Account", ".spec.account"),
        Column("Method", ".spec.method"),
        Column("Amount", ".spec.amount"),
        Column("Phase", ".status.phase"),
    ],
)
