"""Everything an API app needs, built in one place (from env/flags in ``main``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from gpucloud.api.auth import Authenticator, AuthPolicy
from gpucloud.api.kube import ClusterReader, NoCluster
from gpucloud.api.membership import Membership, NoMembership
from gpucloud.clock import Clock, SystemClock
from gpucloud.recharge.provider import ProviderRegistry


@dataclass
class Settings:
    database_url: str
    authenticator: Authenticator
    policy: AuthPolicy = field(default_factory=AuthPolicy)
    # Tenants' accounts: from Account.spec.namespaces and the cluster's RBAC.
    membership: Membership = field(default_factory=NoMembership)
    clock: Clock = field(default_factory=SystemClock)
    providers: ProviderRegistry = field(default_factory=ProviderRegistry)
    currency: str = "CNY"
    order_ttl_s: int = 15 * 60
    # The rating loop runs when woken by an ingestion, and at least this often
    # (running meters and order expiry need passes without new usage too).
    rating_interval_s: float = 1.0
    # Where uploaded bank-transfer voucher files are kept, named by their SHA-256.
    voucher_dir: Path | None = None
    max_voucher_bytes: int = 10 * 1024 * 1024
    # A PriceBook resource YAML served at GET /v1/pricebook (for `gpucloud estimate`).
    pricebook_path: Path | None = None
    # The console's reads of Accounts, GPUInstances and ModelDeployments (gpucloud.api.kube).
    cluster: ClusterReader = field(default_factory=NoCluster)
    # How often an open console page asks for fresh figures (seconds).
    console_poll_s: float = 5.0
