"""The callback signature scheme and QR rendering, as pure functions."""

from __future__ import annotations

import hashlib
import hmac
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpucloud.recharge import (
    SignatureError,
    sign_body,
    signature_header,
    verify_signature,
)
from gpucloud.recharge.provider import CallbackError, parse_notice
from gpucloud.recharge.qr import qr_png, qr_text

NOW = datetime(2026, 3, 1, tzinfo=UTC)
T = int(NOW.timestamp())
SECRET = b"s3cret"
MAC0 = "0" * 64  # well-formed, never the right MAC


def test_signature_is_hmac_sha256_over_timestamp_dot_body() -> None:
    body = b'{"order_id":"o1"}'
    expected = hmac.new(SECRET, f"{T}.".encode() + body, hashlib.sha256).hexdigest()
    assert sign_body(SECRET, T, body) == expected
    assert signature_header(SECRET, T, body) == f"t={T},v1={expected}"
    assert verify_signature(SECRET, f"t={T},v1={expected}", body, NOW) == T


@settings(max_examples=200)
@given(body=st.binary(max_size=200), flip=st.integers(min_value=0, max_value=199))
def test_any_change_to_the_body_breaks_the_signature(body: bytes, flip: int) -> None:
    header = signature_header(SECRET, T, body)
    verify_signature(SECRET, header, body, NOW)
    if body:
        i = flip % len(body)
        tampered = body[:i] + bytes([body[i] ^ 1]) + body[i + 1 :]
        with pytest.raises(SignatureError, match="does not match"):
            verify_signature(SECRET, header, tampered, NOW)


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (None, "required"),
        ("", "required"),
        ("garbage", "not key=value"),
        (f"v1={MAC0}", "missing t="),
        (f"t={T}", "missing v1="),
        ("t=-5,v1={MAC0}", "integer"),
        (f"t={T - 301},v1={MAC0}", "tolerance"),
        (f"t={T + 301},v1={MAC0}", "tolerance"),
    ],
)
def test_malformed_or_stale_headers(header: str | None, message: str) -> None:
    with pytest.raises(SignatureError, match=message):
        verify_signature(SECRET, header, b"{}", NOW)


def test_rotated_secrets_any_v1_may_match() -> None:
    good = sign_body(SECRET, T, b"x")
    verify_signature(SECRET, f"t={T},v1={MAC0},v1={good}", b"x", NOW)
    with pytest.raises(SignatureError):
        verify_signature(b"other", f"t={T},v1={good}", b"x", NOW + timedelta(seconds=1))


def test_notice_fields_are_checked_by_name() -> None:
    with pytest.raises(CallbackError, match="amount_minor"):
        parse_notice(
            b'{"order_id":"o","status":"paid","amount_minor":"1","currency":"CNY","provider_txn_id":"t"}'
        )
    with pytest.raises(CallbackError, match="status"):
        parse_notice(
            b'{"order_id":"o","status":"maybe","amount_minor":1,"currency":"CNY","provider_txn_id":"t"}'
        )
    with pytest.raises(CallbackError, match="not JSON"):
        parse_notice(b"{")


def test_qr_renderings() -> None:
    png = qr_png("https://pay.example/o1")
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    text = qr_text("https://pay.example/o1")
    lines = text.splitlines()
    assert len(lines) > 10 and len({len(line) for line in lines}) == 1  # a square block
    assert set(text) <= set("█▀▄ \xa0\n")  # qrcode draws blanks as no-break spaces
