"""Recharge: payment providers, signed callbacks, QR codes.

Online recharges create a payment order; the provider later calls back with an
HMAC-SHA256 signed notice (see :mod:`gpucloud.recharge.signing`) which the API
verifies before crediting. ``sandbox`` is a built-in provider for demos and tests.
QR codes are drawn by :mod:`gpucloud.recharge.qr` (the API's and the CLI's extra: the
operator's image has no qrcode).
"""

from gpucloud.recharge.provider import (
    CallbackError,
    PaymentNotice,
    PaymentProvider,
    PaymentRequest,
    ProviderRegistry,
)
from gpucloud.recharge.sandbox import SandboxProvider
from gpucloud.recharge.signing import (
    SIGNATURE_HEADER,
    SignatureError,
    sign_body,
    signature_header,
    verify_signature,
)

__all__ = [
    "SIGNATURE_HEADER",
    "CallbackError",
    "PaymentNotice",
    "PaymentProvider",
    "PaymentRequest",
    "ProviderRegistry",
    "SandboxProvider",
    "SignatureError",
    "sign_body",
    "signature_header",
    "verify_signature",
]
