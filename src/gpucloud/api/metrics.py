"""Prometheus metrics of one API app, in its own CollectorRegistry (tests run many apps)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram


class ApiMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.ingested = Counter(
            "gpucloud_usage_records_ingested",
            "Usage records stored (new, not duplicates)",
            registry=self.registry,
        )
        self.duplicates = Counter(
            "gpucloud_usage_records_duplicate",
            "Usage records re-sent with identical content (no-ops)",
            registry=self.registry,
        )
        self.rejected = Counter(
            "gpucloud_usage_records_rejected",
            "Usage records refused (validation, conflict)",
            ["reason"],
            registry=self.registry,
        )
        self.rating_lag = Histogram(
            "gpucloud_rating_lag_seconds",
            "Time from a batch's ingestion to the rating pass that covered it",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
            registry=self.registry,
        )
        self.rating_errors = Counter(
            "gpucloud_rating_errors", "Rating passes that failed", registry=self.registry
        )
        self.ingest_batches = Histogram(
            "gpucloud_api_ingest_group_batches",
            "Usage batches (requests) written per transaction (group commit)",
            buckets=(1, 2, 3, 4, 6, 8, 16, 32),
            registry=self.registry,
        )
        self.stage_seconds = Histogram(
            "gpucloud_api_stage_seconds",
            "Time spent per stage of ingestion and rating (validate, gate_wait, write_wait, "
            "ingest, rate)",
            ["stage"],
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5),
            registry=self.registry,
        )
        self.request_latency = Histogram(
            "gpucloud_api_request_seconds",
            "HTTP request latency by route template",
            ["method", "route", "status"],
            registry=self.registry,
        )
