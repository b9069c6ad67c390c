"""The metering/billing HTTP API (FastAPI). See docs/api.md."""

from gpucloud.api.app import create_app
from gpucloud.api.auth import (
    Authenticator,
    AuthPolicy,
    ClusterAccess,
    Principal,
    StaticTokenAuthenticator,
    TokenReviewAuthenticator,
)
from gpucloud.api.settings import Settings

__all__ = [
    "AuthPolicy",
    "Authenticator",
    "ClusterAccess",
    "Principal",
    "Settings",
    "StaticTokenAuthenticator",
    "TokenReviewAuthenticator",
    "create_app",
]
