"""Request and response bodies of the HTTP API (the OpenAPI spec is generated from these)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_AMOUNT_MINOR = 10**12  # a sanity bound on one recharge (10 billion yuan)

AmountMinor = Annotated[int, Field(gt=0, le=MAX_AMOUNT_MINOR, description="minor units (fen)")]
AmountText = Annotated[
    str,
    Field(
        min_length=1,
        max_length=24,
        description='a decimal string in the account currency, e.g. "100.00"; nothing finer '
        "than its minor unit (never rounded)",
    ),
]
Text = Annotated[str, Field(min_length=1, max_length=200)]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RecordErrorOut(BaseModel):
    index: int = Field(description="position of the record in the batch")
    field: str = Field(description="dotted path inside the record; empty for the whole record")
    rule: str = Field(description="the rule broken, e.g. missing, greater_than_equal, conflict")
    message: str


class IngestOut(BaseModel):
    accepted: int
    duplicates: int
    rejected: int
    errors: list[RecordErrorOut] = []


class Problem(BaseModel):
    detail: Any


class BalanceOut(BaseModel):
    account: str
    currency: str
    balance_minor: int
    available_minor: int = Field(
        description="balance minus accrued, not yet posted usage and what stopped runs "
        "owe until settled"
    )
    balance: str
    available: str


class EntryOut(BaseModel):
    id: int
    kind: str
    amount_minor: int
    balance_after_minor: int
    key: str
    resource: str | None
    memo: str
    at: datetime


class StatementOut(BaseModel):
    account: str
    currency: str
    entries: list[EntryOut]
    next_after_id: int | None = Field(description="pass as after_id for the next page")


class UsageRowOut(BaseModel):
    resource: str | None
    kind: str
    gpu_seconds: int
    byte_seconds: int
    records: int


class UsageOut(BaseModel):
    account: str
    rows: list[UsageRowOut]


class ChargeOut(BaseModel):
    resource: str | None
    amount_minor: int
    amount: str


class ChargesOut(BaseModel):
    account: str
    currency: str
    charges: list[ChargeOut]


class MeterOut(BaseModel):
    """A billing meter (one run of an instance, one replica, one disk...). Quantities are
    GPU-seconds (gpu_time) or byte-seconds. Read from the ledger's ``Meter``."""

    model_config = ConfigDict(from_attributes=True)

    meter_id: str
    resource: str
    kind: str
    opened_at: datetime
    closed_at: datetime | None
    settled_at: datetime | None
    gpus: int
    quantity_rated: int
    posted_minor: int
    fallback_quantity: int  # billed from control-plane timestamps (no agent usage)
    fallback_minor: int
    late_records: int  # usage that arrived after the settlement: stored, never charged
    late_quantity: int


class MetersOut(BaseModel):
    account: str
    currency: str
    meters: list[MeterOut]


class _AmountIn(_In):
    """A recharge amount: exactly one of ``amount`` (decimal text, checked against the
    account's currency) or ``amount_minor``."""

    amount_minor: AmountMinor | None = None
    amount: AmountText | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> _AmountIn:
        if (self.amount_minor is None) == (self.amount is None):
            raise ValueError("amount, amount_minor: give exactly one of them")
        return self


class OnlineRechargeIn(_AmountIn):
    provider: Annotated[str, Field(min_length=1, max_length=64)] = "sandbox"
    client_order_id: Annotated[
        str | None,
        Field(
            default=None,
            min_length=1,
            max_length=64,
            pattern=r"^[A-Za-z0-9_.-]+$",
            description="optional id of the client's: makes the request idempotent within "
            "the account (the order_id is the ledger's own)",
        ),
    ] = None


class OrderOut(BaseModel):
    order_id: str = Field(description="the ledger's id of the order, what the provider sees")
    client_order_id: str | None = None
    account: str
    amount_minor: int
    amount: str
    provider: str
    status: str
    created_at: datetime
    expires_at: datetime
    paid_at: datetime | None
    payment_url: str
    qr_png_url: str


class VoucherFileIn(_In):
    name: Annotated[str, Field(min_length=1, max_length=255)]
    content_base64: Annotated[str, Field(min_length=1, description="the file, base64")]


class BankTransferIn(_AmountIn):
    payer: Text
    bank: Text
    transfer_no: Annotated[str, Field(min_length=1, max_length=100)]
    file: VoucherFileIn = Field(
        description="the transfer voucher (receipt) the admin reviews: required, as the "
        "seed has the payer upload it"
    )


class VoucherOut(BaseModel):
    voucher_id: str
    account: str
    amount_minor: int
    amount: str
    payer: str
    bank: str
    transfer_no: str
    file_sha256: str | None
    status: str
    submitted_at: datetime
    submitter: str | None
    reviewer: str | None
    reason: str | None
    reviewed_at: datetime | None


class VouchersOut(BaseModel):
    vouchers: list[VoucherOut]


class ReviewIn(_In):
    decision: Literal["approve", "reject"]
    reason: Annotated[str, Field(max_length=1000)] = ""


class CallbackOut(BaseModel):
    order_id: str
    status: str
    credited: bool = Field(description="true only for the callback that credited the order")


class AuditEventOut(BaseModel):
    id: int
    account: str | None
    at: datetime
    actor: str
    action: str
    subject: str
    detail: dict[str, Any]


class AuditOut(BaseModel):
    account: str
    events: list[AuditEventOut]


class WipeOut(BaseModel):
    """Read from the ledger's ``NodeWipe``."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    path: str = Field(description="relative to the node's data root, e.g. instances/<ns>/<name>")
    subject: str
    requested_at: datetime
    done_at: datetime | None = None
    bytes_freed: int | None = None


class WipesOut(BaseModel):
    node: str
    wipes: list[WipeOut]


class WipeDoneIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    bytes_freed: int = Field(
        ge=0,
        le=2**63 - 1,
        strict=True,
        description="bytes the removed folder held (0: already gone)",
    )


class ImageCopyOut(BaseModel):
    """Read from the ledger's ``ImageCopy``."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    source: str = Field(description="the instance folder to copy, instances/<ns>/<name>")
    path: str = Field(description="the image folder to make, images/<ns>/<name>")
    subject: str
    requested_at: datetime
    done_at: datetime | None = None
    outcome: Literal["copied", "failed", "cancelled"] | None = None
    bytes_used: int | None = None
    message: str | None = None


class ImageCopiesOut(BaseModel):
    node: str
    image_copies: list[ImageCopyOut]


class ImageCopyDoneIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    bytes_used: int = Field(
        ge=0,
        le=2**63 - 1,
        strict=True,
        description="allocated bytes of the finished image folder, as the agent measured them",
    )


class ImageCopyFailedIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    message: str = Field(min_length=1, max_length=1024, description="why it cannot be copied")
