"""HMAC-SHA256 signatures for payment callbacks.

Header: ``X-Gpucloud-Signature: t=<POSIX seconds>,v1=<hex HMAC-SHA256>`` where the MAC
is computed with the provider's secret over ``b"<t>." + raw_body``. Binding the
timestamp into the MAC lets the receiver reject stale callbacks (replay-window
abuse) without trusting an unsigned clock value; crediting itself is idempotent per
order, so a replay inside the window credits nothing twice.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from datetime import datetime

SIGNATURE_HEADER = "X-Gpucloud-Signature"
DEFAULT_TOLERANCE_S = 300


class SignatureError(ValueError):
    """The callback's signature header is missing, malformed, stale or wrong."""


def sign_body(secret: bytes, timestamp: int, body: bytes) -> str:
    return hmac.new(secret, str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()


def signature_header(secret: bytes, timestamp: int, body: bytes) -> str:
    return f"t={timestamp},v1={sign_body(secret, timestamp, body)}"


_T = re.compile(r"[0-9]{1,12}")  # ASCII digits only: str.isdigit() also takes "²"
_MAC = re.compile(r"[0-9a-f]{64}")
MAX_HEADER = 1024


def _parse(header: str) -> tuple[int, list[str]]:
    if len(header) > MAX_HEADER or not header.isascii():
        raise SignatureError(f"{SIGNATURE_HEADER}: at most {MAX_HEADER} ASCII characters")
    timestamp: int | None = None
    macs: list[str] = []
    for part in header.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep:
            raise SignatureError(f"{SIGNATURE_HEADER}: element {part[:40]!r} is not key=value")
        if key == "t":
            if not _T.fullmatch(value):
                raise SignatureError(
                    f"{SIGNATURE_HEADER}: t must be integer POSIX seconds (at most 12 digits)"
                )
            timestamp = int(value)
        elif key == "v1":
            if not _MAC.fullmatch(value):
                raise SignatureError(f"{SIGNATURE_HEADER}: v1 must be 64 lowercase hex digits")
            macs.append(value)
    if timestamp is None:
        raise SignatureError(f"{SIGNATURE_HEADER}: missing t=")
    if not macs:
        raise SignatureError(f"{SIGNATURE_HEADER}: missing v1=")
    return timestamp, macs


def check_header(header: str | None, now: datetime, tolerance_s: int = DEFAULT_TOLERANCE_S) -> int:
    """The header's shape and freshness, before the body is read: the signed timestamp,
    or SignatureError."""
    if not header:
        raise SignatureError(f"{SIGNATURE_HEADER}: header is required")
    timestamp, _ = _parse(header)
    if abs(now.timestamp() - timestamp) > tolerance_s:
        raise SignatureError(
            f"{SIGNATURE_HEADER}: timestamp outside the {tolerance_s} s tolerance window"
        )
    return timestamp


def verify_signature(
    secret: bytes,
    header: str | None,
    body: bytes,
    now: datetime,
    tolerance_s: int = DEFAULT_TOLERANCE_S,
) -> int:
    """Check ``header`` against ``body``; return the signed timestamp or raise SignatureError."""
    timestamp = check_header(header, now, tolerance_s)
    assert header is not None
    _, macs = _parse(header)
    expected = sign_body(secret, timestamp, body)
    # Constant-time comparison of every candidate (several v1= allow secret rotation).
    if not any(hmac.compare_digest(expected.encode(), mac.encode()) for mac in macs):
        raise SignatureError(f"{SIGNATURE_HEADER}: signature does not match")
    return timestamp
