"""GPUInstance: a container with GPUs and its own storage, billed per the chosen mode."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from gpucloud.crd.common import (
    DNS_LABEL,
    GPUSelector,
    Int64,
    StatusBase,
    Timestamp,
    optional,
)
from gpucloud.crd.k8s import LISTED, Cel, ListType, Spec
from gpucloud.crd.schema import Column, Definition

Mode = Literal["PayAsYouGo", "Package", "Spot"]
Period = Literal["Day", "Week", "Month"]


class InstanceGPU(GPUSelector):
    count: int = Field(default=1, description="GPUs for the instance.", ge=1, le=8)


class Billing(Spec):
    cel = (
        Cel(
            "(self.mode == 'Package') == has(self.period)",
            "period is required when mode is Package and forbidden otherwise",
            ".period",
            lambda s: (s.mode == "Package") == (s.period is not None),
        ),
        Cel(
            "self.mode == 'Package' || !self.autoRenew",
            "autoRenew is only allowed when mode is Package",
            ".autoRenew",
            lambda s: s.mode == "Package" or not s.auto_renew,
        ),
    )
    mode: Annotated[Mode, LISTED] = Field(
        default="PayAsYouGo", description="How the instance is billed."
    )
    period: Period | None = Field(
        default=None, description="Package length: Day 24 h, Week 7x24 h, Month 30x24 h."
    )
    auto_renew: bool = Field(
        default=False, description="Charge the next period at expiry instead of shutting down."
    )


class Storage(Spec):
    quota_gi: Annotated[int, Cel("self >= oldSelf", "quotaGi cannot shrink")] = Field(
        default=50, description="Instance storage quota in GiB (billed by quota).", ge=1, le=10240
    )


class Checkpoint(Spec):
    command: list[Annotated[str, Field(max_length=4096)]] = Field(
        description="Run in the container as its preStop hook when a preemption notice "
        "runs out (and on any other stop of the pod): save your work under /root/data.",
        min_length=1,
        max_length=64,
    )
    timeout_seconds: int = Field(
        default=30,
        description="How long the checkpoint may run: the pod is asked to stop this long "
        "before the notice's stop time, and billing ends then. At most the operator's "
        "preemption grace period (preemption_grace_s, 120 s by default): a longer one "
        "refuses the start.",
        ge=1,
        le=3600,
    )


class SpotOptions(Spec):
    checkpoint: Checkpoint | None = Field(
        default=None, description="A command the container runs before a preemption stop."
    )
    resume: bool = Field(
        default=False,
        description="After a preemption, queue the instance (phase Queued) and start it "
        "again on its node, with its data, when GPUs there free up.",
    )


CloudDiskName = Annotated[
    str, Field(description="CloudDisk name in this namespace.", pattern=DNS_LABEL, max_length=63)
]


class GPUInstanceSpec(Spec):
    cel = (
        Cel(
            "!has(self.spot) || self.billing.mode == 'Spot'",
            "spot is only allowed when billing.mode is Spot",
            ".spot",
            lambda s: s.spot is None or s.billing.mode == "Spot",
        ),
    )
    gpu: InstanceGPU = Field(description="Which GPUs and how many for the instance.")
    image: str = Field(
        default="nvcr.io/nvidia/pytorch:24.08-py3",
        description="Container image.",
        min_length=1,
        max_length=512,
    )
    command: list[Annotated[str, Field(max_length=4096)]] | None = Field(
        default=None, description="Entrypoint override.", max_length=64
    )
    billing: Billing
    storage: Storage | None = None
    state: Literal["Running", "Stopped"] = Field(
        default="Running", description="Desired state; deleting the instance releases it."
    )
    cloud_disks: Annotated[list[CloudDiskName] | None, ListType("set")] = Field(
        default=None,
        description="Cloud disks to attach, mounted at /root/disks/<name>; each must exist and "
        "be Ready when the instance starts (changes apply at the next start).",
        max_length=16,
    )
    spot: SpotOptions | None = Field(
        default=None,
        description="What a spot instance does when it is preempted (only with billing.mode "
        "Spot; changes apply at the next start). See docs/spot.md.",
    )

    @property
    def quota_gi(self) -> int:
        """The storage quota (the API server defaults it inside a given storage only)."""
        return self.storage.quota_gi if self.storage else 50


class PackageTerm(Spec):
    seq: int = Field(description="Term number.", ge=1)
    period: str = Field(description="Day, Week or Month.")
    start: Timestamp = Field(description="Term start.")
    end: Timestamp = Field(description="Expiry, or when the term was left early.")
    prepaid_minor: Annotated[Int64, Field(ge=0)]


Phase = Literal[
    "Pending",
    "Starting",
    "Running",
    "Stopping",
    "Stopped",
    "Preempted",
    "Queued",
    "Expired",
    "Refused",
    "Released",
]


class GPUInstanceStatus(StatusBase):
    phase: Phase | None = optional("Lifecycle phase.")
    node: str | None = optional("Node the instance runs on.")
    gpus: list[str] | None = optional(
        "UUIDs of the GPUs the node agents reported for the current run's pod (empty until "
        "the first usage arrives)."
    )
    gpu_summary: str | None = optional("Product x count, for kubectl get.")
    billing_mode: str | None = optional("Billing mode in force.")
    started_at: Timestamp | None = optional("Start of the current run.")
    stopped_at: Timestamp | None = optional("End of the last run.")
    accrued_cost: str | None = optional("Cost so far, in the account currency.")
    currency: str | None = optional("Currency.")
    package_expires_at: Timestamp | None = optional("End of the prepaid package period.")
    message: str | None = optional("Latest human-readable detail.")
    # What the operator persists so that a restart (even after SIGKILL) repeats every
    # posting with the same idempotency key and amount.
    account: str | None = optional("Account the instance bills to.")
    runs: int | None = Field(
        default=None, description="Runs started so far (numbers the pods and meters).", ge=0
    )
    meter_id: str | None = optional("Ledger meter of the current run's GPU time.")
    meter_since: Timestamp | None = optional(
        "Start of the current meter (run start or mode switch)."
    )
    unsettled_meters: list[str] | None = optional(
        "Closed meters whose missing agent usage is still to be billed."
    )
    pod_created_at: Timestamp | None = optional(
        "Operator's clock just before the current run's pod was created: the anchor its "
        "billed start is measured from (docs/billing.md)."
    )
    pod_waiting_at: Timestamp | None = optional(
        "Last instant the operator saw the current run's pod unscheduled: billing does not "
        "start before it."
    )
    volume_node: str | None = optional("Node holding the instance's local volume.")
    storage_since: Timestamp | None = optional(
        "Start of storage billing (the first run of the pod)."
    )
    storage_billed_until: Timestamp | None = optional("End of the last settled storage window.")
    storage_exact: str | None = Field(
        default=None,
        description="Exact storage charge up to storageBilledUntil, a fraction num/den in "
        "currency units: the postings are its delta of rounded cumulative totals.",
        pattern=r"^[0-9]+/[1-9][0-9]*$",
    )
    storage_posted_minor: Annotated[Int64 | None, Field(ge=0)] = optional(
        "Minor units posted for storage up to storageBilledUntil."
    )
    released_at: Timestamp | None = optional("When the release began.")
    stop_target: str | None = optional("Phase an interrupted stop ends in.")
    preempt_at: Timestamp | None = optional("When a preempted spot instance is stopped.")
    preempted_for: str | None = optional("Instance (namespace/name) the preemption frees GPUs for.")
    preempt_notice_at: Timestamp | None = optional("When the preemption notice was given.")
    preempt_stop_at: Timestamp | None = optional(
        "When the preempted pod is asked to stop and its billing ends: preemptAt minus its "
        "checkpoint's timeout, not before the notice. Set once the notice reached the pod's "
        "notice file and the webhook."
    )
    idle_since: Timestamp | None = optional(
        "Since when all the run's GPUs have been idle by its Account's spec.idle policy, "
        "once that lasted idleAfterMinutes (docs/idle.md); cleared by activity."
    )
    idle_seen_until: Timestamp | None = optional(
        "The latest second the agents reported for every GPU of the run (idle evidence "
        "runs to here)."
    )
    idle_noticed_for: Timestamp | None = optional(
        "The idleSince of the idle stretch the notice was sent for (once per stretch)."
    )
    reminder_sent_for: Timestamp | None = optional("Package expiry the reminder was sent for.")
    halted_generation: Int64 | None = optional(
        "Generation that was stopped by expiry/preemption/refusal."
    )
    package_terms: list[PackageTerm] | None = Field(
        default=None, description="Paid package terms [start, end), newest last.", max_length=1000
    )


DEFINITION = Definition(
    kind="GPUInstance",
    plural="gpuinstances",
    scope="Namespaced",
    short_names=["gi", "gpui"],
    description="A GPU instance: a container with GPUs and its own storage, billed per the "
    "chosen mode.",
    spec=GPUInstanceSpec,
    status=GPUInstanceStatus,
    columns=[
        Column("State", ".status.phase"),
        Column("GPU", ".status.gpuSummary"),
        Column("Node", ".status.node"),
        Column("Mode", ".spec.billing.mode"),
        Column("Cost", ".status.accruedCost"),
        Column("Idle", ".status.idleSince", type="date"),
        Column("Expires", ".status.packageExpiresAt", priority=1),
    ],
)
