"""Errors the ledger raises. All derive from LedgerError; bad input is also a ValueError,
a missing thing also a LookupError, so an HTTP layer can map them to 4xx in one place."""

from __future__ import annotations


class LedgerError(Exception):
    """Base of every error the ledger raises on purpose."""


class InvalidInput(LedgerError, ValueError):
    """An argument that breaks a rule; the message names the field and the rule."""


class NotFound(LedgerError, LookupError):
    """An account, meter, order or voucher that does not exist."""

    def __str__(self) -> str:  # LookupError would otherwise repr() the message
        return str(self.args[0]) if self.args else ""


class IdempotencyConflict(LedgerError):
    """The idempotency key was already used for different content."""

    def __init__(self, key: str, detail: str) -> None:
        self.key = key
        super().__init__(f"idempotency key {key!r} was already used with other content: {detail}")


class OrderRefused(LedgerError):
    """A payment order cannot be settled: ``reason`` is one of ``expired``,
    ``amount_mismatch``, ``already_settled`` (by another provider transaction),
    ``not_pending``."""

    def __init__(self, order_id: str, reason: str, detail: str) -> None:
        self.order_id = order_id
        self.reason = reason
        super().__init__(f"order {order_id!r} refused ({reason}): {detail}")


class ReviewRefused(LedgerError):
    """A voucher review that is not allowed (already reviewed, rejection without reason)."""

    def __init__(self, voucher_id: str, reason: str, detail: str) -> None:
        self.voucher_id = voucher_id
        self.reason = reason
        super().__init__(f"voucher {voucher_id!r} review refused ({reason}): {detail}")


class WrongNode(LedgerError, PermissionError):
    """A node's agent reported a wipe or an image copy that belongs to another node."""
