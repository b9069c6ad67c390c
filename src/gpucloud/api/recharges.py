"""Recharge operations shared by the JSON routes (``routes_recharge``) and the console:
one rule each for opening an online order, keeping a bank-transfer voucher, reading a
kept voucher file back and reviewing a voucher. Refusals are HTTPExceptions (or the
ledger's errors) whose detail names the field and the rule."""

from __future__ import annotations

import hashlib
from datetime import timedelta

from fastapi import HTTPException

from gpucloud.api.auth import Principal
from gpucloud.api.deps import AppState
from gpucloud.api.schemas import MAX_AMOUNT_MINOR
from gpucloud.billing.money import format_money, parse_amount
from gpucloud.ledger import NotFound, Order, Voucher


def account_currency(state: AppState, account: str) -> str:
    """The ledger account's currency; an account paid into for the first time is
    created in the configured currency."""
    try:
        return state.ledger.get_account(account).currency
    except NotFound:
        return state.ledger.ensure_account(account, state.settings.currency).currency


def amount_minor(amount: str | None, minor: int | None, currency: str) -> int:
    """The amount in minor units: ``minor`` as given, or ``amount`` checked against the
    currency (a 422 naming the field when it is finer than the minor unit: never
    rounded)."""
    if minor is not None:
        return minor
    assert amount is not None
    value = parse_amount(amount, currency, "amount")
    if value > MAX_AMOUNT_MINOR:
        raise HTTPException(422, f"amount: at most {format_money(MAX_AMOUNT_MINOR, currency)}")
    return value


def payment_url(state: AppState, order: Order, currency: str) -> str:
    provider = state.settings.providers.get(order.provider)
    if provider is None:
        raise HTTPException(409, f"provider {order.provider!r} is no longer configured")
    # Providers derive the URL purely from the order, so it is never stored.
    return provider.create_payment(
        order.order_id, order.amount_minor, currency, order.expires_at
    ).url


def open_order(
    state: AppState,
    account: str,
    amount: str | None,
    minor: int | None,
    provider: str,
    caller: Principal,
    client_ref: str | None = None,
) -> Order:
    """A pending payment order for ``account``, expiring after the configured TTL."""
    if state.settings.providers.get(provider) is None:
        known = ", ".join(state.settings.providers.names()) or "none"
        raise HTTPException(422, f"provider: {provider!r} is not configured (known: {known})")
    value = amount_minor(amount, minor, account_currency(state, account))
    expires_at = state.settings.clock.now() + timedelta(seconds=state.settings.order_ttl_s)
    return state.ledger.create_order(
        account, value, provider, expires_at, client_ref=client_ref, actor=caller.username
    )


def account_order(state: AppState, account: str, order_id: str) -> Order:
    order = state.ledger.get_order(order_id)
    if order.account != account:  # do not reveal other accounts' orders
        raise NotFound(f"order {order_id!r} not found")
    return order


def keep_voucher(
    state: AppState,
    account: str,
    amount: str | None,
    minor: int | None,
    payer: str,
    bank: str,
    transfer_no: str,
    content: bytes,
    caller: Principal,
) -> Voucher:
    """Submit a bank-transfer voucher for review. The amount is checked before the file
    is kept; only the file's SHA-256 goes into the ledger, the file itself under the
    configured voucher directory, named by that hash."""
    value = amount_minor(amount, minor, account_currency(state, account))
    if not content:
        raise HTTPException(422, "file: the voucher file is empty")
    if len(content) > state.settings.max_voucher_bytes:
        raise HTTPException(413, f"file: larger than {state.settings.max_voucher_bytes} bytes")
    digest = hashlib.sha256(content).hexdigest()
    if state.settings.voucher_dir is not None:
        state.settings.voucher_dir.mkdir(parents=True, exist_ok=True)
        (state.settings.voucher_dir / digest).write_bytes(content)
    return state.ledger.submit_voucher(
        account,
        value,
        payer,
        bank,
        transfer_no,
        digest,
        state.settings.clock.now(),
        submitter=caller.username,
    )


def voucher_file(state: AppState, voucher_id: str) -> bytes:
    """The kept voucher file, checked against the SHA-256 the ledger recorded (for
    admins only: the callers check that)."""
    voucher = state.ledger.get_voucher(voucher_id)
    folder = state.settings.voucher_dir
    if not voucher.file_sha256 or folder is None:
        raise NotFound(f"voucher {voucher_id!r} has no file kept by this API")
    path = folder / voucher.file_sha256
    if not path.is_file():
        raise NotFound(f"voucher {voucher_id!r}: file {voucher.file_sha256} is not kept here")
    content = path.read_bytes()
    if hashlib.sha256(content).hexdigest() != voucher.file_sha256:
        raise HTTPException(409, f"voucher {voucher_id!r}: the kept file does not match its hash")
    return content


def review(
    state: AppState,
    voucher_id: str,
    approve: bool,
    admin: Principal,
    reason: str,
    expect_amount: int | None = None,
) -> Voucher:
    """Approve (credits exactly once) or reject (a reason is required); ``expect_amount``
    is what the reviewer saw (the ledger refuses another)."""
    if not approve and not reason.strip():
        raise HTTPException(422, "reason: required when rejecting a voucher")
    return state.ledger.review_voucher(
        voucher_id,
        approve,
        admin.username,
        reason.strip(),
        state.settings.clock.now(),
        expect_amount=expect_amount,
    )
