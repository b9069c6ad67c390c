"""ModelDeployment: a model served on GPUs, scaled between min and max replicas."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from gpucloud.crd.common import GPUSelector, StatusBase, Timestamp, optional
from gpucloud.crd.k8s import Cel, Spec
from gpucloud.crd.schema import Column, Definition


class ReplicaGPU(GPUSelector):
    count: int = Field(default=1, description="GPUs per replica.", ge=1, le=8)


class Pricing(Spec):
    cel = (
        Cel(
            "self.publisher != 'Official' || has(self.task)",
            "task is required for official models",
            ".task",
            lambda s: s.publisher != "Official" or s.task is not None,
        ),
    )
    publisher: Literal["Official", "Personal"] = Field(
        description="Official models bill per token/image/video; personal models per second "
        "of request runtime."
    )
    task: Literal["TextGeneration", "ImageGeneration", "VideoGeneration"] | None = Field(
        default=None, description="Task type: what an official model bills by."
    )


class Scaling(Spec):
    target_requests_per_replica: int = Field(
        default=600,
        description="Requests per replica per window the scaler aims for.",
        ge=1,
        le=1000000,
    )
    window_seconds: int = Field(default=600, description="Scaling window.", ge=60, le=3600)
    cold_after_seconds: int = Field(
        default=600, description="Idle time before a private model goes cold.", ge=60, le=86400
    )


class ModelDeploymentSpec(Spec):
    cel = (
        Cel(
            "self.minReplicas <= self.maxReplicas",
            "minReplicas must not exceed maxReplicas",
            ".minReplicas",
            lambda s: s.min_replicas <= s.max_replicas,
        ),
        Cel(
            "(self.visibility == 'Public') == has(self.pricing)",
            "pricing is required for public models and forbidden for private ones",
            ".pricing",
            lambda s: (s.visibility == "Public") == (s.pricing is not None),
        ),
    )
    model: str = Field(description="Model name served.", min_length=1, max_length=256)
    image: str = Field(description="Model server image.", min_length=1, max_length=512)
    gpu: ReplicaGPU = Field(description="Which GPUs and how many per replica.")
    visibility: Literal["Private", "Public"] = Field(
        default="Private", description="Private (billed by online time) or Public (billed per use)."
    )
    pricing: Pricing | None = None
    min_replicas: int = Field(
        default=0, description="Fewest replicas; 0 lets the model go cold.", ge=0, le=100
    )
    max_replicas: int = Field(default=1, description="Most replicas.", ge=1, le=100)
    scaling: Scaling | None = None


class ModelDeploymentStatus(StatusBase):
    state: Literal["Cold", "Starting", "Serving", "Scaling"] | None = optional("Serving state.")
    replicas: int | None = Field(default=None, description="Replicas wanted.", ge=0)
    ready_replicas: int | None = Field(default=None, description="Replicas ready.", ge=0)
    requests_last_window: int | None = Field(
        default=None, description="Requests in the last scaling window.", ge=0
    )
    last_request_at: Timestamp | None = optional("Last request seen by the gateway.")
    cost: str | None = optional("Cost so far, in the account currency.")
    currency: str | None = optional("Currency.")


DEFINITION = Definition(
    kind="ModelDeployment",
    plural="modeldeployments",
    scope="Namespaced",
    short_names=["md"],
    description="A model served on GPUs, scaled between min and max replicas.",
    spec=ModelDeploymentSpec,
    status=ModelDeploymentStatus,
    columns=[
        Column("State", ".status.state"),
        Column("Model", ".spec.model"),
        Column("Visibility", ".spec.visibility"),
        Column("Ready", ".status.readyReplicas", "integer"),
        Column("Replicas", ".status.replicas", "integer"),
        Column("Min", ".spec.minReplicas", "integer", priority=1),
        Column("Max", ".spec.maxReplicas", "integer", priority=1),
        Column("Cost", ".status.cost"),
    ],
)
