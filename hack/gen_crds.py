"""Generates the CustomResourceDefinitions in crds/ from one Python description.

The schemas share pieces (decimal strings, conditions, GPU selectors), so they are
built here once and written as YAML; `make crds` regenerates, and a test fails when
crds/ (or the chart's copy) drifts from this file.

    python hack/gen_crds.py            # write crds/*.yaml
    python hack/gen_crds.py --check    # exit 1 if crds/ is out of date
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from gpucloud.billing.money import CURRENCY_EXPONENTS

GROUP = "gpucloud.dev"
VERSION = "v1alpha1"
ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "crds"

Schema = dict[str, Any]

# --- shared pieces -------------------------------------------------------------------

DECIMAL_PATTERN = r"^(0|[1-9][0-9]{0,11})(\.[0-9]{1,6})?$"
# DNS-1123 label, the rule for namespace and object names we reference.
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# GPU Feature Discovery writes the product name with spaces replaced by dashes.
GPU_PRODUCT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"


def obj(props: dict[str, Schema], required: list[str] | None = None, **extra: Any) -> Schema:
    out: Schema = {"type": "object", "properties": props}
    if required:
        out["required"] = required
    out.update(extra)
    return out


def string(desc: str, **extra: Any) -> Schema:
    return {"type": "string", "description": desc, **extra}


def integer(desc: str, **extra: Any) -> Schema:
    return {"type": "integer", "format": "int32", "description": desc, **extra}


def boolean(desc: str, default: bool) -> Schema:
    return {"type": "boolean", "description": desc, "default": default}


def enum(desc: str, values: list[str], **extra: Any) -> Schema:
    return {"type": "string", "description": desc, "enum": values, **extra}


def decimal(desc: str, positive: bool = False) -> Schema:
    """Money is an exact decimal string, never a YAML float."""
    s = string(
        desc + ' An exact decimal string such as "9.80".', pattern=DECIMAL_PATTERN, maxLength=20
    )
    if positive:
        s["x-kubernetes-validations"] = [
            {"rule": "double(self) > 0.0", "message": "must be greater than zero"}
        ]
    return s


def timestamp(desc: str) -> Schema:
    return string(desc, format="date-time")


def currency(desc: str) -> Schema:
    """Exactly the currencies the billing core knows how to round (its minor units):
    any other is refused at admission, not at the first charge."""
    known = sorted(CURRENCY_EXPONENTS)
    return enum(f"{desc} One of {', '.join(known)}.", known, default="CNY")


def immutable(schema: Schema, what: str) -> Schema:
    rules = schema.setdefault("x-kubernetes-validations", [])
    rules.append({"rule": "self == oldSelf", "message": f"{what} is immutable"})
    return schema


CONDITIONS: Schema = {
    "type": "array",
    "description": "Conditions in the Kubernetes style, one per type.",
    "x-kubernetes-list-type": "map",
    "x-kubernetes-list-map-keys": ["type"],
    "items": obj(
        {
            "type": string(
                "Condition type, e.g. Ready.",
                maxLength=316,
                pattern=r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$",
            ),
            "status": enum("True, False or Unknown.", ["True", "False", "Unknown"]),
            "observedGeneration": {"type": "integer", "format": "int64", "minimum": 0},
            "lastTransitionTime": timestamp("When the status last changed."),
            "reason": string(
                "CamelCase reason.",
                maxLength=1024,
                minLength=1,
                pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$",
            ),
            "message": string("Human-readable detail.", maxLength=32768),
        },
        ["type", "status", "lastTransitionTime", "reason", "message"],
    ),
}


def status_base(extra: dict[str, Schema]) -> Schema:
    return obj(
        {
            "observedGeneration": {"type": "integer", "format": "int64", "minimum": 0},
            "conditions": CONDITIONS,
            **extra,
        }
    )


def gpu_selector(desc: str, max_count: int) -> Schema:
    return obj(
        {
            "product": immutable(
                string(
                    "GPU product as GPU Feature Discovery labels it "
                    "(nvidia.com/gpu.product), e.g. NVIDIA-A100-SXM4-80GB.",
                    pattern=GPU_PRODUCT_PATTERN,
                ),
                "gpu.product",
            ),
            "count": integer(f"GPUs {desc}.", minimum=1, maximum=max_count, default=1),
        },
        ["product"],
        description=f"Which GPUs and how many {desc}.",
    )


def column(name: str, path: str, type_: str = "string", **extra: Any) -> Schema:
    return {"name": name, "type": type_, "jsonPath": path, **extra}


AGE = column("Age", ".metadata.creationTimestamp", "date")


def crd(
    kind: str,
    plural: str,
    scope: str,
    short: list[str],
    spec: Schema,
    status: Schema,
    columns: list[Schema],
    desc: str,
    spec_required: bool = True,
) -> Schema:
    root = obj(
        {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
        ["spec"] if spec_required else None,
        description=desc,
    )
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{plural}.{GROUP}",
            "labels": {"app.kubernetes.io/part-of": "gpucloud"},
        },
        "spec": {
            "group": GROUP,
            "scope": scope,
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": short,
                "categories": ["gpucloud"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [*columns, AGE],
                    "schema": {"openAPIV3Schema": root},
                }
            ],
        },
    }


# --- the kinds -----------------------------------------------------------------------


def price_book() -> Schema:
    gpu = obj(
        {
            "product": string(
                "GPU product (nvidia.com/gpu.product label value).", pattern=GPU_PRODUCT_PATTERN
            ),
            "payAsYouGoPerHour": decimal("Pay-as-you-go price per GPU-hour.", positive=True),
            "spotPerHour": decimal(
                "Spot price per GPU-hour; omitted: no spot instances of this product.",
                positive=True,
            ),
            "packages": obj(
                {
                    p: decimal(
                        f"Price of one {p} package per GPU; omitted: no {p} package.",
                        positive=True,
                    )
                    for p in ("day", "week", "month")
                },
                description="Prepaid package prices per GPU (day 24 h, week 7x24 h, "
                "month 30x24 h); they include the instance storage. Omitted: the product "
                "is sold by the hour only.",
            ),
            "modelOnlinePerHour": decimal(
                "Private model / deployment price per GPU-hour online; omitted: payAsYouGoPerHour.",
                positive=True,
            ),
        },
        # what the billing core requires (docs/billing.md): spot, packages and the model
        # price are optional ("not offered", or the pay-as-you-go price for models)
        ["product", "payAsYouGoPerHour"],
        **{
            "x-kubernetes-validations": [
                {
                    "rule": "!has(self.spotPerHour) || "
                    "double(self.spotPerHour) <= double(self.payAsYouGoPerHour)",
                    "message": "spotPerHour must not exceed payAsYouGoPerHour",
                    "fieldPath": ".spotPerHour",
                }
            ]
        },
    )
    spec = obj(
        {
            "currency": currency("ISO 4217 currency code of every price."),
            "gpus": {
                "type": "array",
                "minItems": 1,
                "maxItems": 64,
                "items": gpu,
                "x-kubernetes-list-type": "map",
                "x-kubernetes-list-map-keys": ["product"],
                "description": "One entry per GPU product offered.",
            },
            "storage": obj(
                {
                    "instancePerGBHour": decimal("Instance storage per GiB-hour of quota."),
                    "cloudDiskPerGBHour": decimal("Cloud disk per GiB-hour used."),
                    "imagePerGBHour": decimal("Image storage per GiB-hour used."),
                },
                ["instancePerGBHour", "cloudDiskPerGBHour", "imagePerGBHour"],
            ),
            "models": obj(
                {
                    "per1KTokens": decimal("Official models: per 1000 tokens."),
                    "perImage": decimal("Official models: per generated image."),
                    "perVideo": decimal("Official models: per generated video."),
                    "personalPerRequestSecond": decimal(
                        "Personal public models: per second of request runtime."
                    ),
                },
                ["per1KTokens", "perImage", "perVideo", "personalPerRequestSecond"],
            ),
        },
        ["currency", "gpus", "storage", "models"],
    )
    status = status_base({"products": integer("GPU products priced.", minimum=0)})
    return crd(
        "PriceBook",
        "pricebooks",
        "Cluster",
        ["pb"],
        spec,
        status,
        [column("Currency", ".spec.currency"), column("Products", ".status.products", "integer")],
        "Prices of GPU time, storage and models (cluster-wide, set by admins).",
    )


def account() -> Schema:
    spec = obj(
        {
            "displayName": string("Human-readable tenant name.", maxLength=128),
            "namespaces": {
                "type": "array",
                "maxItems": 256,
                "x-kubernetes-list-type": "set",
                "description": "Namespaces whose resources bill to this account.",
                "items": string("Namespace name.", pattern=DNS_LABEL, maxLength=63),
            },
            "currency": immutable(currency("Currency of the balance."), "currency"),
            "instanceLimit": integer(
                "Most instances that may run at once.", minimum=0, maximum=10000, default=5
            ),
            "lowBalanceWarningHours": integer(
                "Warn when the balance lasts less than this many hours at the current burn rate.",
                minimum=1,
                maximum=8760,
                default=24,
            ),
            "webhook": obj(
                {
                    "url": string(
                        "Notifications are POSTed here as JSON.",
                        pattern=r"^https?://[^\s]+$",
                        maxLength=2048,
                    )
                },
                ["url"],
            ),
        },
        ["namespaces"],
    )
    status = status_base(
        {
            "state": enum("Account state.", ["Active", "LowBalance", "Arrears"]),
            "balance": string("Balance in the account currency."),
            "available": string(
                "Balance minus what running resources accrued and stopped runs still owe."
            ),
            "currency": string("Currency."),
            "runningInstances": integer("Instances running now.", minimum=0),
            "arrearsSince": timestamp("Start of the current arrears."),
            "dataDeletionAt": timestamp("When data is deleted if arrears go on."),
        }
    )
    return crd(
        "Account",
        "accounts",
        "Cluster",
        ["acct"],
        spec,
        status,
        [
            column("State", ".status.state"),
            column("Balance", ".status.balance"),
            column("Available", ".status.available"),
            column("Currency", ".status.currency"),
            column("Running", ".status.runningInstances", "integer"),
        ],
        "A tenant: its namespaces bill to one prepaid balance.",
    )


def recharge() -> Schema:
    spec = obj(
        {
            "account": string("Account to credit.", pattern=DNS_LABEL, maxLength=63),
            "method": enum(
                "Online payment or corporate bank transfer.", ["Online", "BankTransfer"]
            ),
            "amount": decimal("Amount to credit, in the account currency.", positive=True),
            "online": obj(
                {"provider": string("Payment provider.", pattern=DNS_LABEL, default="sandbox")}
            ),
            "bankTransfer": obj(
                {
                    "payer": string("Paying company.", minLength=1, maxLength=256),
                    "bank": string("Paying bank.", minLength=1, maxLength=256),
                    "transferNumber": string(
                        "Bank transfer reference number.", minLength=1, maxLength=128
                    ),
                    "voucherRef": string(
                        "Reference of the uploaded transfer voucher (sha256:<hex> of the "
                        "file): required, the admin reviews it before crediting.",
                        pattern=r"^sha256:[0-9a-f]{64}$",
                    ),
                },
                ["payer", "bank", "transferNumber", "voucherRef"],
            ),
        },
        ["account", "method", "amount"],
        **{
            "x-kubernetes-validations": [
                {"rule": "self == oldSelf", "message": "spec is immutable once submitted"},
                {
                    "rule": "self.method != 'BankTransfer' || has(self.bankTransfer)",
                    "message": "bankTransfer is required when method is BankTransfer",
                    "fieldPath": ".bankTransfer",
                },
                {
                    "rule": "self.method != 'Online' || !has(self.bankTransfer)",
                    "message": "bankTransfer is only allowed when method is BankTransfer",
                    "fieldPath": ".bankTransfer",
                },
                {
                    "rule": "self.method != 'BankTransfer' || !has(self.online)",
                    "message": "online is only allowed when method is Online",
                    "fieldPath": ".online",
                },
            ]
        },
    )
    spec["properties"]["amount"]["x-kubernetes-validations"] += [
        {"rule": "double(self) <= 1000000.0", "message": "must be at most 1000000"},
        {
            # the finest minor unit of the supported currencies (a fen, a cent); the
            # operator refuses amounts finer than the account currency's own (JPY: 0)
            "rule": "self.matches('^[0-9]+([.][0-9]{1,2})?$')",
            "message": "must not be finer than the currency's minor unit: at most 2 decimal "
            "places (0.01 CNY); amounts are never rounded",
        },
    ]
    status = status_base(
        {
            "phase": enum(
                "Where the recharge stands.",
                [
                    "Pending",
                    "AwaitingPayment",
                    "AwaitingReview",
                    "Credited",
                    "Rejected",
                    "Expired",
                    "Failed",
                ],
            ),
            "orderId": string("Payment order or voucher id."),
            "paymentURL": string("URL the QR code encodes."),
            "expiresAt": timestamp("When an unpaid order expires."),
            "creditedAt": timestamp("When the amount was credited."),
            "reason": string("Why it was rejected or failed."),
        }
    )
    return crd(
        "Recharge",
        "recharges",
        "Namespaced",
        ["rch"],
        spec,
        status,
        [
            column("Account", ".spec.account"),
            column("Method", ".spec.method"),
            column("Amount", ".spec.amount"),
            column("Phase", ".status.phase"),
        ],
        "A request to add money to an account: online payment or bank transfer.",
    )


def recharge_review() -> Schema:
    spec = obj(
        {
            "rechargeRef": obj(
                {
                    "namespace": string("Namespace of the Recharge.", pattern=DNS_LABEL),
                    "name": string("Name of the Recharge.", maxLength=253),
                    "uid": string(
                        "metadata.uid of the Recharge the admin looked at: a Recharge "
                        "deleted and created again under the same name is refused.",
                        minLength=1,
                        maxLength=64,
                    ),
                },
                ["namespace", "name", "uid"],
            ),
            "amount": decimal(
                "The Recharge's amount as the admin saw it (refused if it differs).",
                positive=True,
            ),
            "voucherId": string(
                "The voucher the admin checked (the Recharge's status.orderId).",
                minLength=1,
                maxLength=64,
            ),
            "decision": enum(
                "Approve credits the amount once; Reject needs a reason.", ["Approve", "Reject"]
            ),
            "reason": string("Why (required to reject).", maxLength=1024),
        },
        ["rechargeRef", "amount", "voucherId", "decision"],
        **{
            "x-kubernetes-validations": [
                {"rule": "self == oldSelf", "message": "a review is final: spec is immutable"},
                {
                    "rule": "self.decision != 'Reject' || (has(self.reason) && size(self.reason) > 0)",  # noqa: E501
                    "message": "reason is required when decision is Reject",
                    "fieldPath": ".reason",
                },
            ]
        },
    )
    status = status_base(
        {
            "applied": boolean("Whether the decision was carried out.", False),
            "appliedAt": timestamp("When it was carried out."),
            "reviewer": string("Who reviewed it."),
            "voucherRef": string("The voucher file the decision was made on (sha256:<hex>)."),
        }
    )
    return crd(
        "RechargeReview",
        "rechargereviews",
        "Cluster",
        ["rcr"],
        spec,
        status,
        [
            column("Namespace", ".spec.rechargeRef.namespace"),
            column("Recharge", ".spec.rechargeRef.name"),
            column("Amount", ".spec.amount"),
            column("Decision", ".spec.decision"),
            column("Applied", ".status.applied", "boolean"),
        ],
        "An admin's approval or rejection of a bank-transfer recharge.",
    )


def operator_bookkeeping() -> dict[str, Schema]:
    """GPUInstance status fields the operator persists so that a restart (even after
    SIGKILL) repeats every posting with the same idempotency key and amount."""
    return {
        "account": string("Account the instance bills to."),
        "runs": integer("Runs started so far (numbers the pods and meters).", minimum=0),
        "meterId": string("Ledger meter of the current run's GPU time."),
        "meterSince": timestamp("Start of the current meter (run start or mode switch)."),
        "unsettledMeters": {
            "type": "array",
            "items": {"type": "string"},
            "description": "Closed meters whose missing agent usage is still to be billed.",
        },
        "podCreatedAt": timestamp(
            "Operator's clock just before the current run's pod was created: the anchor "
            "its billed start is measured from (docs/billing.md)."
        ),
        "podWaitingAt": timestamp(
            "Last instant the operator saw the current run's pod unscheduled: billing "
            "does not start before it."
        ),
        "volumeNode": string("Node holding the instance's local volume."),
        "storageSince": timestamp("Start of storage billing (the first run of the pod)."),
        "storageBilledUntil": timestamp("End of the last settled storage window."),
        "storageExact": string(
            "Exact storage charge up to storageBilledUntil, a fraction num/den in currency "
            "units: the postings are its delta of rounded cumulative totals.",
            pattern=r"^[0-9]+/[1-9][0-9]*$",
        ),
        "storagePostedMinor": {
            "type": "integer",
            "format": "int64",
            "minimum": 0,
            "description": "Minor units posted for storage up to storageBilledUntil.",
        },
        "releasedAt": timestamp("When the release began."),
        "stopTarget": string("Phase an interrupted stop ends in."),
        "preemptAt": timestamp("When a preempted spot instance is stopped."),
        "preemptedFor": string("Instance (namespace/name) the preemption frees GPUs for."),
        "reminderSentFor": timestamp("Package expiry the reminder was sent for."),
        "haltedGeneration": {
            "type": "integer",
            "format": "int64",
            "description": "Generation that was stopped by expiry/preemption/refusal.",
        },
        "packageTerms": {
            "type": "array",
            "maxItems": 1000,
            "description": "Paid package terms [start, end), newest last.",
            "items": obj(
                {
                    "seq": integer("Term number.", minimum=1),
                    "period": string("Day, Week or Month."),
                    "start": timestamp("Term start."),
                    "end": timestamp("Expiry, or when the term was left early."),
                    "prepaidMinor": {"type": "integer", "format": "int64", "minimum": 0},
                },
                ["seq", "period", "start", "end", "prepaidMinor"],
            ),
        },
    }


def gpu_instance() -> Schema:
    billing = obj(
        {
            "mode": enum(
                "How the instance is billed.",
                ["PayAsYouGo", "Package", "Spot"],
                default="PayAsYouGo",
            ),
            "period": enum(
                "Package length: Day 24 h, Week 7x24 h, Month 30x24 h.", ["Day", "Week", "Month"]
            ),
            "autoRenew": boolean(
                "Charge the next period at expiry instead of shutting down.", False
            ),
        },
        ["mode"],
        **{
            "x-kubernetes-validations": [
                {
                    "rule": "(self.mode == 'Package') == has(self.period)",
                    "message": "period is required when mode is Package and forbidden otherwise",
                    "fieldPath": ".period",
                },
                {
                    "rule": "self.mode == 'Package' || !self.autoRenew",
                    "message": "autoRenew is only allowed when mode is Package",
                    "fieldPath": ".autoRenew",
                },
            ]
        },
    )
    storage = obj(
        {
            "quotaGi": integer(
                "Instance storage quota in GiB (billed by quota).",
                minimum=1,
                maximum=10240,
                default=50,
                **{
                    "x-kubernetes-validations": [
                        {"rule": "self >= oldSelf", "message": "quotaGi cannot shrink"}
                    ]
                },
            )
        },
    )
    spec = obj(
        {
            "gpu": gpu_selector("for the instance", 8),
            "image": string(
                "Container image.",
                minLength=1,
                maxLength=512,
                default="nvcr.io/nvidia/pytorch:24.08-py3",
            ),
            "command": {
                "type": "array",
                "maxItems": 64,
                "items": {"type": "string", "maxLength": 4096},
                "description": "Entrypoint override.",
            },
            "billing": billing,
            "storage": storage,
            "state": enum(
                "Desired state; deleting the instance releases it.",
                ["Running", "Stopped"],
                default="Running",
            ),
            "cloudDisks": {
                "type": "array",
                "maxItems": 16,
                "x-kubernetes-list-type": "set",
                "items": string(
                    "CloudDisk name in this namespace.", pattern=DNS_LABEL, maxLength=63
                ),
                "description": (
                    "Cloud disks to attach, mounted at /root/disks/<name>; each must exist "
                    "and be Ready when the instance starts (changes apply at the next start)."
                ),
            },
        },
        ["gpu", "billing"],
    )
    status = status_base(
        {
            "phase": enum(
                "Lifecycle phase.",
                [
                    "Pending",
                    "Starting",
                    "Running",
                    "Stopping",
                    "Stopped",
                    "Preempted",
                    "Expired",
                    "Refused",
                    "Released",
                ],
            ),
            "node": string("Node the instance runs on."),
            "gpus": {
                "type": "array",
                "items": {"type": "string"},
                "description": "UUIDs of the GPUs the node agents reported for the "
                "current run's pod (empty until the first usage arrives).",
            },
            "gpuSummary": string("Product x count, for kubectl get."),
            "billingMode": string("Billing mode in force."),
            "startedAt": timestamp("Start of the current run."),
            "stoppedAt": timestamp("End of the last run."),
            "accruedCost": string("Cost so far, in the account currency."),
            "currency": string("Currency."),
            "packageExpiresAt": timestamp("End of the prepaid package period."),
            "message": string("Latest human-readable detail."),
            **operator_bookkeeping(),
        }
    )
    return crd(
        "GPUInstance",
        "gpuinstances",
        "Namespaced",
        ["gi", "gpui"],
        spec,
        status,
        [
            column("State", ".status.phase"),
            column("GPU", ".status.gpuSummary"),
            column("Node", ".status.node"),
            column("Mode", ".spec.billing.mode"),
            column("Cost", ".status.accruedCost"),
            column("Expires", ".status.packageExpiresAt", priority=1),
        ],
        "A GPU instance: a container with GPUs and its own storage, billed per the chosen mode.",
    )


def model_deployment() -> Schema:
    pricing = obj(
        {
            "publisher": enum(
                "Official models bill per token/image/video; personal "
                "models per second of request runtime.",
                ["Official", "Personal"],
            ),
            "task": enum(
                "Task type: what an official model bills by.",
                ["TextGeneration", "ImageGeneration", "VideoGeneration"],
            ),
        },
        ["publisher"],
        **{
            "x-kubernetes-validations": [
                {
                    "rule": "self.publisher != 'Official' || has(self.task)",
                    "message": "task is required for official models",
                    "fieldPath": ".task",
                },
            ]
        },
    )
    spec = obj(
        {
            "model": string("Model name served.", minLength=1, maxLength=256),
            "image": string("Model server image.", minLength=1, maxLength=512),
            "gpu": gpu_selector("per replica", 8),
            "visibility": enum(
                "Private (billed by online time) or Public (billed per use).",
                ["Private", "Public"],
                default="Private",
            ),
            "pricing": pricing,
            "minReplicas": integer(
                "Fewest replicas; 0 lets the model go cold.", minimum=0, maximum=100, default=0
            ),
            "maxReplicas": integer("Most replicas.", minimum=1, maximum=100, default=1),
            "scaling": obj(
                {
                    "targetRequestsPerReplica": integer(
                        "Requests per replica per window the scaler aims for.",
                        minimum=1,
                        maximum=1000000,
                        default=600,
                    ),
                    "windowSeconds": integer(
                        "Scaling window.", minimum=60, maximum=3600, default=600
                    ),
                    "coldAfterSeconds": integer(
                        "Idle time before a private model goes cold.",
                        minimum=60,
                        maximum=86400,
                        default=600,
                    ),
                }
            ),
        },
        ["model", "image", "gpu"],
        **{
            "x-kubernetes-validations": [
                {
                    "rule": "self.minReplicas <= self.maxReplicas",
                    "message": "minReplicas must not exceed maxReplicas",
                    "fieldPath": ".minReplicas",
                },
                {
                    "rule": "(self.visibility == 'Public') == has(self.pricing)",
                    "message": "pricing is required for public models and forbidden for private ones",  # noqa: E501
                    "fieldPath": ".pricing",
                },
            ]
        },
    )
    status = status_base(
        {
            "state": enum("Serving state.", ["Cold", "Starting", "Serving", "Scaling"]),
            "replicas": integer("Replicas wanted.", minimum=0),
            "readyReplicas": integer("Replicas ready.", minimum=0),
            "requestsLastWindow": integer("Requests in the last scaling window.", minimum=0),
            "lastRequestAt": timestamp("Last request seen by the gateway."),
            "cost": string("Cost so far, in the account currency."),
            "currency": string("Currency."),
        }
    )
    return crd(
        "ModelDeployment",
        "modeldeployments",
        "Namespaced",
        ["md"],
        spec,
        status,
        [
            column("State", ".status.state"),
            column("Model", ".spec.model"),
            column("Visibility", ".spec.visibility"),
            column("Ready", ".status.readyReplicas", "integer"),
            column("Replicas", ".status.replicas", "integer"),
            column("Min", ".spec.minReplicas", "integer", priority=1),
            column("Max", ".spec.maxReplicas", "integer", priority=1),
            column("Cost", ".status.cost"),
        ],
        "A model served on GPUs, scaled between min and max replicas.",
    )


# --- cloud disks and images (docs/arrears.md) -----------------------------------------
def storage_item_status(extra: dict[str, Schema]) -> Schema:
    return status_base(
        {
            "phase": enum("Lifecycle phase.", ["Creating", "Ready", "Failed", "Deleted"]),
            "message": string("Human-readable detail.", maxLength=4096),
            "account": string("Account billed."),
            "volumeId": string("Volume id the agent reports: <namespace>/<name>."),
            "meterId": string("Ledger meter rating the agent's usage."),
            "usedBytes": {
                "type": "integer",
                "format": "int64",
                "minimum": 0,
                "description": "Used capacity last measured (a cloud disk: by the operator; "
                "an image: by the agent that copied it).",
            },
            "billedSince": timestamp("Start of billing."),
            "dataDeletedAt": timestamp("When the data was deleted after arrears."),
            **extra,
        }
    )


def cloud_disk() -> Schema:
    spec = obj(
        {
            "capacityGi": integer(
                "Capacity limit in GiB; billed by the used capacity, not this limit.",
                minimum=1,
                maximum=65536,
            ),
        },
        ["capacityGi"],
    )
    return crd(
        "CloudDisk",
        "clouddisks",
        "Namespaced",
        ["cdisk", "cd"],
        spec,
        storage_item_status(
            {
                "claimName": string(
                    "ReadWriteMany PersistentVolumeClaim of the disk in its namespace, "
                    "mounted at /root/disks/<name> in the pods of instances that attach it."
                )
            }
        ),
        [
            column("Phase", ".status.phase"),
            column("Capacity", ".spec.capacityGi", "integer"),
            column("Used", ".status.usedBytes", "integer"),
            column("Account", ".status.account", priority=1),
        ],
        "A cloud disk attachable to GPUInstances (spec.cloudDisks), billed per GiB-hour used.",
    )


def image() -> Schema:
    spec = obj(
        {
            "sourceInstance": immutable(
                string(
                    "GPUInstance in this namespace whose storage is backed up.",
                    pattern=DNS_LABEL,
                    maxLength=63,
                ),
                "sourceInstance",
            ),
        },
        ["sourceInstance"],
    )
    return crd(
        "Image",
        "images",
        "Namespaced",
        ["img"],
        spec,
        storage_item_status(
            {
                "readyAt": timestamp("When the copy was complete."),
                "sourceUID": string("UID of the source instance when copied."),
                "node": string(
                    "Node holding the image: the one that held the source instance's data, "
                    "whose agent copied it."
                ),
            }
        ),
        [
            column("Phase", ".status.phase"),
            column("Source", ".spec.sourceInstance"),
            column("Used", ".status.usedBytes", "integer"),
            column("Account", ".status.account", priority=1),
        ],
        "A backup image of a GPUInstance's storage, billed per GiB-hour used.",
    )


KINDS = {
    "pricebooks": price_book,
    "accounts": account,
    "recharges": recharge,
    "rechargereviews": recharge_review,
    "gpuinstances": gpu_instance,
    "modeldeployments": model_deployment,
    "clouddisks": cloud_disk,
    "images": image,
}


def render() -> dict[Path, str]:
    header = "# Generated by hack/gen_crds.py; edit that file, then run `make crds`.\n"
    return {
        OUT / f"{GROUP}_{plural}.yaml": header + yaml.safe_dump(build(), sort_keys=False, width=100)
        for plural, build in KINDS.items()
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if crds/ is stale")
    args = parser.parse_args()
    stale = []
    for path, text in render().items():
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(path.name)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if stale:
        print(f"crds/ is out of date ({', '.join(stale)}): run `make crds`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
