"""``gpucloud-api``: run the API with uvicorn. Every flag has an environment variable.

Authentication: ``--kubeconfig``/``GPUCLOUD_KUBECONFIG`` (or in-cluster config when
``KUBERNETES_SERVICE_HOST`` is set) selects TokenReview; ``--static-tokens`` selects
the demo/test-only static token table (a YAML mapping token -> {username, groups,
node, accounts}). With TokenReview, a tenant's accounts are those whose
``spec.namespaces`` include one where RBAC lets them create Recharges
(``gpucloud.api.membership``).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import yaml

from gpucloud.api.app import create_app, ops_app
from gpucloud.api.auth import (
    DEFAULT_AGENT_SA,
    Authenticator,
    AuthPolicy,
    ClusterAccess,
    Principal,
    StaticTokenAuthenticator,
    TokenReviewAuthenticator,
)
from gpucloud.api.kube import ClusterReader, KubeReader, NoCluster
from gpucloud.api.membership import ClusterMembership, Membership, NoMembership
from gpucloud.api.settings import Settings
from gpucloud.clock import clock_from_env
from gpucloud.recharge import ProviderRegistry, SandboxProvider
from gpucloud.serving import serve


def _csv(value: str | None) -> frozenset[str]:
    return frozenset(v.strip() for v in (value or "").split(",") if v.strip())


def _pairs(value: str | None, what: str) -> dict[str, str]:
    """``a=b,c=d`` -> {a: b, c: d}."""
    out = {}
    for item in _csv(value):
        key, sep, val = item.rpartition("=")
        if not sep or not key or not val:
            raise SystemExit(f"{what}: {item!r} is not KEY=VALUE")
        out[key] = val
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="gpucloud-api", description=__doc__)
    p.add_argument("--host", default=env("GPUCLOUD_API_HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(env("GPUCLOUD_API_PORT", "8080")))
    p.add_argument(
        "--ops-host",
        default=env("GPUCLOUD_API_OPS_HOST"),
        help="address of /metrics, /healthz, /readyz (default: --host)",
    )
    p.add_argument("--ops-port", type=int, default=int(env("GPUCLOUD_API_OPS_PORT", "9090")))
    p.add_argument("--database-url", default=env("GPUCLOUD_DATABASE_URL", "sqlite:///ledger.db"))
    p.add_argument("--clock", default=env("GPUCLOUD_CLOCK", "system"), help="system | file:PATH")
    p.add_argument("--kubeconfig", default=env("GPUCLOUD_KUBECONFIG"))
    p.add_argument(
        "--static-tokens",
        default=env("GPUCLOUD_STATIC_TOKENS"),
        help="DEMO/TESTS ONLY: YAML file of static bearer tokens",
    )
    p.add_argument("--token-audiences", default=env("GPUCLOUD_TOKEN_AUDIENCES", ""))
    p.add_argument(
        "--agent-sa",
        default=env("GPUCLOUD_AGENT_SA", DEFAULT_AGENT_SA),
        help="comma-separated usernames allowed to post usage",
    )
    p.add_argument(
        "--sa-node-map",
        default=env("GPUCLOUD_SA_NODE_MAP", ""),
        help="test bed: USERNAME=NODE,... for tokens without a node claim",
    )
    p.add_argument("--admin-groups", default=env("GPUCLOUD_ADMIN_GROUPS", "gpucloud:admins"))
    p.add_argument("--admin-users", default=env("GPUCLOUD_ADMIN_USERS", ""))
    p.add_argument(
        "--membership-cache-s",
        type=float,
        default=float(env("GPUCLOUD_MEMBERSHIP_CACHE_S", "10")),
        help="how long an account-membership verdict is kept (RBAC changes wait this long)",
    )
    p.add_argument(
        "--sandbox-secret-file",
        default=env("GPUCLOUD_SANDBOX_SECRET_FILE"),
        help="enables the sandbox payment provider with the HMAC secret in this file "
        "(or in GPUCLOUD_SANDBOX_SECRET); never on the command line",
    )
    # the old flag, kept only to refuse it with a clear message: arguments show in ps
    p.add_argument("--sandbox-secret", help=argparse.SUPPRESS)
    p.add_argument("--currency", default=env("GPUCLOUD_CURRENCY", "CNY"))
    p.add_argument("--order-ttl", type=int, default=int(env("GPUCLOUD_ORDER_TTL_S", "900")))
    p.add_argument("--voucher-dir", default=env("GPUCLOUD_VOUCHER_DIR"))
    p.add_argument("--pricebook", default=env("GPUCLOUD_PRICEBOOK"))
    p.add_argument(
        "--console-poll-s",
        type=float,
        default=float(env("GPUCLOUD_CONSOLE_POLL_S", "5")),
        help="how often an open console page refreshes its figures",
    )
    p.add_argument("--log-level", default=env("GPUCLOUD_LOG_LEVEL", "warning"))
    args = p.parse_args(argv)
    if not args.console_poll_s > 0:
        p.error(f"--console-poll-s: must be > 0 seconds, got {args.console_poll_s}")
    if args.sandbox_secret is not None:
        p.error(
            "--sandbox-secret: secrets are not accepted on the command line (visible in ps); "
            "use --sandbox-secret-file or the GPUCLOUD_SANDBOX_SECRET variable"
        )
    return args


def sandbox_secret(args: argparse.Namespace) -> str | None:
    """The sandbox HMAC secret: --sandbox-secret-file, else GPUCLOUD_SANDBOX_SECRET."""
    if args.sandbox_secret_file:
        try:
            secret = Path(args.sandbox_secret_file).read_text().strip()
        except OSError as exc:
            raise SystemExit(f"--sandbox-secret-file: cannot read it: {exc}") from None
        if not secret:
            raise SystemExit(f"--sandbox-secret-file: {args.sandbox_secret_file} is empty")
        return secret
    return os.environ.get("GPUCLOUD_SANDBOX_SECRET") or None


def load_static_tokens(path: str) -> StaticTokenAuthenticator:
    data: dict[str, Any] = yaml.safe_load(Path(path).read_text()) or {}
    table = {
        token: Principal(
            username=spec["username"],
            groups=frozenset(spec.get("groups", [])),
            node=spec.get("node"),
            accounts=frozenset(spec.get("accounts", [])),
        )
        for token, spec in data.items()
    }
    return StaticTokenAuthenticator(table)


def _cluster_access(args: argparse.Namespace) -> ClusterAccess | None:
    """The API server to ask about tokens and accounts (none with static tokens)."""
    if args.static_tokens:
        return None
    if args.kubeconfig:
        return ClusterAccess.from_kubeconfig(args.kubeconfig)
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        return ClusterAccess.in_cluster()
    raise SystemExit("no authentication configured: give --kubeconfig or --static-tokens")


def _authenticator(args: argparse.Namespace, access: ClusterAccess | None) -> Authenticator:
    if access is None:
        return load_static_tokens(args.static_tokens)
    return TokenReviewAuthenticator(access, sorted(_csv(args.token_audiences)))


def _membership(args: argparse.Namespace, access: ClusterAccess | None) -> Membership:
    if access is None:
        return NoMembership()
    return ClusterMembership(access, cache_ttl_s=args.membership_cache_s)


def _cluster(access: ClusterAccess | None) -> ClusterReader:
    return NoCluster() if access is None else KubeReader(access)


def settings_from_args(args: argparse.Namespace) -> Settings:
    access = _cluster_access(args)
    policy = AuthPolicy(
        agent_users=_csv(args.agent_sa),
        sa_node_map=_pairs(args.sa_node_map, "--sa-node-map"),
        admin_groups=_csv(args.admin_groups),
        admin_users=_csv(args.admin_users),
    )
    providers = ProviderRegistry()
    secret = sandbox_secret(args)
    if secret:
        providers.add(SandboxProvider(secret.encode()))
    return Settings(
        database_url=args.database_url,
        authenticator=_authenticator(args, access),
        membership=_membership(args, access),
        policy=policy,
        clock=clock_from_env(args.clock),
        providers=providers,
        currency=args.currency,
        order_ttl_s=args.order_ttl,
        voucher_dir=Path(args.voucher_dir) if args.voucher_dir else None,
        pricebook_path=Path(args.pricebook) if args.pricebook else None,
        cluster=_cluster(access),
        console_poll_s=args.console_poll_s,
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    app = create_app(settings_from_args(args))
    serve(
        app, args.host, args.port, ops_app(app), args.ops_host or args.host, args.ops_port,
        args.log_level,
    )  # fmt: skip


if __name__ == "__main__":
    main()
