"""RechargeReview: an admin's approval or rejection of a bank-transfer recharge."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from gpucloud.crd.common import DNS_LABEL, PositiveDecimal, StatusBase, Timestamp, money, optional
from gpucloud.crd.k8s import Cel, Spec
from gpucloud.crd.schema import Column, Definition


class RechargeRef(Spec):
    namespace: str = Field(description="Namespace of the Recharge.", pattern=DNS_LABEL)
    name: str = Field(description="Name of the Recharge.", max_length=253)
    uid: str = Field(
        description="metadata.uid of the Recharge the admin looked at: a Recharge deleted and "
        "created again under the same name is refused.",
        min_length=1,
        max_length=64,
    )


class RechargeReviewSpec(Spec):
    cel = (
        Cel("self == oldSelf", "a review is final: spec is immutable"),
        Cel(
            "self.decision != 'Reject' || (has(self.reason) && size(self.reason) > 0)",
            "reason is required when decision is Reject",
            ".reason",
            lambda s: s.decision != "Reject" or bool(s.reason),
        ),
    )
    recharge_ref: RechargeRef
    amount: PositiveDecimal = Field(
        description=money("The Recharge's amount as the admin saw it (refused if it differs).")
    )
    voucher_id: str = Field(
        description="The voucher the admin checked (the Recharge's status.orderId).",
        min_length=1,
        max_length=64,
    )
    decision: Literal["Approve", "Reject"] = Field(
        description="Approve credits the amount once; Reject needs a reason."
    )
    reason: str | None = Field(
        default=None, description="Why (required to reject).", max_length=1024
    )


class RechargeReviewStatus(StatusBase):
    applied: bool = Field(default=False, description="Whether the decision was carried out.")
    applied_at: Timestamp | None = optional("When it was carried out.")
    reviewer: str | None = optional("Who reviewed it.")
    voucher_ref: str | None = optional("The voucher file the decision was made on (sha256:<hex>).")


DEFINITION = Definition(
    kind="RechargeReview",
    plural="rechargereviews",
    scope="Cluster",
    short_names=["rcr"],
    description="An admin's approval or rejection of a bank-transfer recharge.",
    spec=RechargeReviewSpec,
    status=RechargeReviewStatus,
    columns=[
        Column("Namespace", ".spec.rechargeRef.namespace"),
        Column("Recharge", ".spec.rechargeRef.name"),
        Column("Amount", ".spec.amount"),
        Column("Decision", ".spec.decision"),
        Column("Applied", ".status.applied", "boolean"),
    ],
)
