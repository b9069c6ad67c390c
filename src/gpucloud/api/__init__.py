"""The metering/billing HTTP API (FastAPI). See docs/api.md.

The package exports what other components share (authentication, settings); the FastAPI
app is ``gpucloud.api.app.create_app``, imported only where the API runs: the gateway's
image authenticates callers with ``gpucloud.api.auth`` and carries no FastAPI.
"""

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
]
