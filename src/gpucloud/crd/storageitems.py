"""CloudDisk and Image: storage billed per GiB-hour used (docs/arrears.md)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from gpucloud.crd.common import DNS_LABEL, Int64, StatusBase, Timestamp, optional
from gpucloud.crd.k8s import Spec, immutable
from gpucloud.crd.schema import Column, Definition


class StorageItemStatus(StatusBase):
    phase: Literal["Creating", "Ready", "Failed", "Deleted"] | None = optional("Lifecycle phase.")
    message: str | None = Field(default=None, description="Human-readable detail.", max_length=4096)
    account: str | None = optional("Account billed.")
    volume_id: str | None = optional("Volume id the agent reports: <namespace>/<name>.")
    meter_id: str | None = optional("Ledger meter rating the agent's usage.")
    used_bytes: Annotated[Int64 | None, Field(ge=0)] = optional(
        "Used capacity last measured (a cloud disk: by the operator; an image: by the agent "
        "that copied it)."
    )
    billed_since: Timestamp | None = optional("Start of billing.")
    data_deleted_at: Timestamp | None = optional("When the data was deleted after arrears.")


class CloudDiskSpec(Spec):
    capacity_gi: int = Field(
        description="Capacity limit in GiB; billed by the used capacity, not this limit.",
        ge=1,
        le=65536,
    )


class CloudDiskStatus(StorageItemStatus):
    claim_name: str | None = optional(
        "ReadWriteMany PersistentVolumeClaim of the disk in its namespace, mounted at "
        "/root/disks/<name> in the pods of instances that attach it."
    )


class ImageSpec(Spec):
    source_instance: Annotated[str, immutable("sourceInstance")] = Field(
        description="GPUInstance in this namespace whose storage is backed up.",
        pattern=DNS_LABEL,
        max_length=63,
    )


class ImageStatus(StorageItemStatus):
    ready_at: Timestamp | None = optional("When the copy was complete.")
    source_uid: str | None = Field(
        default=None, alias="sourceUID", description="UID of the source instance when copied."
    )
    node: str | None = optional(
        "Node holding the image: the one that held the source instance's data, whose agent "
        "copied it."
    )


CLOUD_DISK = Definition(
    kind="CloudDisk",
    plural="clouddisks",
    scope="Namespaced",
    short_names=["cdisk", "cd"],
    description="A cloud disk attachable to GPUInstances (spec.cloudDisks), billed per GiB-hour "
    "used.",
    spec=CloudDiskSpec,
    status=CloudDiskStatus,
    columns=[
        Column("Phase", ".status.phase"),
        Column("Capacity", ".spec.capacityGi", "integer"),
        Column("Used", ".status.usedBytes", "integer"),
        Column("Account", ".status.account", priority=1),
    ],
)

IMAGE = Definition(
    kind="Image",
    plural="images",
    scope="Namespaced",
    short_names=["img"],
    description="A backup image of a GPUInstance's storage, billed per GiB-hour used.",
    spec=ImageSpec,
    status=ImageStatus,
    columns=[
        Column("Phase", ".status.phase"),
        Column("Source", ".spec.sourceInstance"),
        Column("Used", ".status.usedBytes", "integer"),
        Column("Account", ".status.account", priority=1),
    ],
)
