"""The price book the model-billing tests share (gateway and ledger): prices chosen so
that single requests cost fractions of a fen, so that rounding is exercised."""

from __future__ import annotations

from typing import Any

PRODUCT = "NVIDIA-A100-SXM4-80GB"

PRICEBOOK_SPEC: dict[str, Any] = {
    "currency": "CNY",
    "gpus": [{"product": PRODUCT, "payAsYouGoPerHour": "9.80", "modelOnlinePerHour": "7.21"}],
    "storage": {
        "instancePerGBHour": "0.0004",
        "cloudDiskPerGBHour": "0.0003",
        "imagePerGBHour": "0.0002",
    },
    "models": {
        "per1KTokens": "0.0137",
        "perImage": "0.0815",
        "perVideo": "1.2345",
        "personalPerRequestSecond": "0.0031",
    },
}
