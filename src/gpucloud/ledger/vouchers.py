"""Bank-transfer vouchers and their review.

A payer submits a voucher (the transfer's details and the SHA-256 of its receipt); a
reviewer other than the submitter approves it, which posts the recharge with key
``voucher:{voucher_id}`` in the review's transaction, or rejects it. Approvals of one
transfer (bank, transfer_no) in any accounts are serialised by locking all its vouchers
in one order, so a transfer is credited once. Refusals are committed to the audit trail
before ReviewRefused is raised.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Row, insert, select, update

from gpucloud.ledger import schema
from gpucloud.ledger import validate as v
from gpucloud.ledger.entries import Entries
from gpucloud.ledger.errors import IdempotencyConflict, InvalidInput, ReviewRefused
from gpucloud.ledger.store import Store
from gpucloud.ledger.types import EntryKind, Voucher, VoucherStatus

A, VO = schema.accounts, schema.vouchers


def voucher_of(row: Row[Any], account: str) -> Voucher:
    return Voucher(
        voucher_id=row.voucher_id,
        account=account,
        amount_minor=row.amount_minor,
        payer=row.payer,
        bank=row.bank,
        transfer_no=row.transfer_no,
        file_sha256=row.file_sha256,
        status=VoucherStatus(row.status),
        submitted_at=row.submitted_at,
        reviewer=row.reviewer,
        reason=row.reason,
        reviewed_at=row.reviewed_at,
        entry_id=row.entry_id,
        submitter=row.submitter,
    )


class Vouchers:
    """Submitting, reading and reviewing bank-transfer vouchers."""

    def __init__(self, store: Store, entries: Entries) -> None:
        self._s = store
        self._entries = entries

    def submit_voucher(
        self,
        account: str,
        amount_minor: int,
        payer: str,
        bank: str,
        transfer_no: str,
        file_sha256: str,
        at: datetime,
        *,
        submitter: str | None = None,
    ) -> Voucher:
        """A bank-transfer voucher pending review. The seed has the payer upload the
        voucher: ``file_sha256`` (the uploaded file's SHA-256) is required, and it is
        what the reviewer checks. (bank, transfer_no) is unique per account: the same
        submission again returns the voucher; other content raises IdempotencyConflict
        (naming nothing of any other account: another account's voucher for the same
        transfer is a voucher of its own, and approval credits a transfer once).
        ``submitter``: who submitted it (the audit trail's actor; they may never review
        it)."""
        amount = v.positive(amount_minor, "amount_minor")
        v.text(payer, "payer")
        v.text(bank, "bank")
        v.text(transfer_no, "transfer_no", max_len=128)
        if file_sha256 is None:
            raise InvalidInput(
                "file_sha256: a bank transfer needs its voucher (the SHA-256 of the uploaded "
                "transfer receipt); the seed has the payer upload it for review"
            )
        v.sha256_hex(file_sha256, "file_sha256")
        v.instant(at, "at")
        submitter = v.text(submitter, "submitter") if submitter is not None else None
        with self._s.engine.begin() as conn:
            acct = self._s.account_row(conn, account, lock=True)
            row = conn.execute(
                select(VO).where(
                    VO.c.account_id == acct.id, VO.c.bank == bank, VO.c.transfer_no == transfer_no
                )
            ).first()
            if row is not None:
                if (row.amount_minor, row.payer) != (amount, payer):
                    raise IdempotencyConflict(
                        f"voucher:{bank}:{transfer_no}",
                        f"transfer {transfer_no!r} at {bank!r} was already submitted as voucher "
                        f"{row.voucher_id!r} with other details",
                    )
                return voucher_of(row, account)
            voucher_id = uuid.uuid4().hex
            conn.execute(
                insert(VO).values(
                    voucher_id=voucher_id,
                    account_id=acct.id,
                    amount_minor=amount,
                    payer=payer,
                    bank=bank,
                    transfer_no=transfer_no,
                    file_sha256=file_sha256,
                    status=VoucherStatus.PENDING.value,
                    submitted_at=at,
                    submitter=submitter,
                )
            )
            detail = {
                "amount_minor": amount,
                "bank": bank,
                "transfer_no": transfer_no,
                "file_sha256": file_sha256,
            }
            actor = submitter or f"user:{account}"
            self._s.audit(conn, acct.id, actor, "voucher.submitted", voucher_id, detail, at)
            row = conn.execute(select(VO).where(VO.c.voucher_id == voucher_id)).one()
        return voucher_of(row, account)

    def get_voucher(self, voucher_id: str) -> Voucher:
        with self._s.read() as conn:
            row = self._s.row(conn, VO.c.voucher_id, voucher_id, "voucher")
            name = self._s.names(conn, {row.account_id})[row.account_id]
        return voucher_of(row, name)

    def vouchers(self, *, status: str | None = None, account: str | None = None) -> list[Voucher]:
        with self._s.read() as conn:
            query = select(VO).order_by(VO.c.submitted_at, VO.c.voucher_id)
            if status is not None:
                query = query.where(VO.c.status == v.choice(status, VoucherStatus, "status").value)
            if account is not None:
                query = query.where(VO.c.account_id == self._s.account_row(conn, account).id)
            rows = conn.execute(query).all()
            names = self._s.names(conn, {r.account_id for r in rows})
        return [voucher_of(r, names[r.account_id]) for r in rows]

    def review_voucher(
        self,
        voucher_id: str,
        approve: bool,
        reviewer: str,
        reason: str,
        at: datetime,
        *,
        expect_amount: int | None = None,
    ) -> Voucher:
        """Approve (credits exactly once, key ``voucher:{voucher_id}``) or reject (needs
        a non-empty reason). ReviewRefused: a second review (``already_reviewed``), the
        voucher's submitter reviewing it (``own_voucher``), an approval of a transfer
        already credited to any account (``transfer_credited``), or ``expect_amount``
        (what the reviewer saw) other than the voucher's (``amount_mismatch``). Every
        refusal is in the audit trail."""
        if not isinstance(approve, bool):
            raise InvalidInput(f"approve: must be a bool, got {type(approve).__name__}")
        v.text(reviewer, "reviewer")
        v.text(reason, "reason", max_len=4000, empty=approve)
        v.instant(at, "at")
        refusal: ReviewRefused | None = None
        with self._s.engine.begin() as conn:
            row = self._s.row(conn, VO.c.voucher_id, voucher_id, "voucher")
            # Every voucher of the same transfer, in one order (this one among them): two
            # approvals of one transfer in two accounts run one after the other.
            conn.execute(
                select(VO.c.voucher_id)
                .where(VO.c.bank == row.bank, VO.c.transfer_no == row.transfer_no)
                .order_by(VO.c.voucher_id)
                .with_for_update()
            ).all()
            row = conn.execute(select(VO).where(VO.c.voucher_id == voucher_id)).one()
            if row.status != VoucherStatus.PENDING.value:
                raise ReviewRefused(
                    voucher_id,
                    "already_reviewed",
                    f"{row.status} by {row.reviewer} at {row.reviewed_at.isoformat()}",
                )
            if approve and not row.file_sha256:
                raise ReviewRefused(
                    voucher_id,
                    "no_voucher_file",
                    "the voucher has no uploaded file to check (submitted before vouchers "
                    "were required); reject it and ask the payer to submit it with the file",
                )
            acct = conn.execute(select(A).where(A.c.id == row.account_id).with_for_update()).one()
            refusal = self._review_refusal(conn, row, approve, reviewer, expect_amount)
            if refusal is not None:
                detail = {"reason": refusal.reason, "amount_minor": row.amount_minor}
                self._s.audit(conn, acct.id, reviewer, "voucher.review_refused", voucher_id,
                            detail, at)  # fmt: skip
            else:
                row = self._apply_review(conn, row, acct, approve, reviewer, reason, at)
        if refusal is not None:
            raise refusal  # after the commit, so the refusal stays in the audit trail
        return voucher_of(row, acct.name)

    def _apply_review(
        self,
        conn: Connection,
        row: Row[Any],
        acct: Row[Any],
        approve: bool,
        reviewer: str,
        reason: str,
        at: datetime,
    ) -> Row[Any]:
        voucher_id = row.voucher_id
        entry_id = None
        if approve:
            entry, _, _ = self._entries.post(
                conn,
                acct,
                EntryKind.RECHARGE,
                row.amount_minor,
                f"voucher:{voucher_id}",
                None,
                f"bank transfer {row.transfer_no} from {row.payer}",
                at,
                {"voucher_id": voucher_id, "reviewer": reviewer},
            )
            entry_id = entry.id
        status = VoucherStatus.APPROVED if approve else VoucherStatus.REJECTED
        conn.execute(
            update(VO)
            .where(VO.c.voucher_id == voucher_id)
            .values(
                status=status.value,
                reviewer=reviewer,
                reason=reason,
                reviewed_at=at,
                entry_id=entry_id,
            )
        )
        detail = {
            "reason": reason,
            "amount_minor": row.amount_minor,
            "file_sha256": row.file_sha256,  # what the reviewer saw
        }
        self._s.audit(conn, acct.id, reviewer, f"voucher.{status.value}", voucher_id, detail, at)
        return conn.execute(select(VO).where(VO.c.voucher_id == voucher_id)).one()

    def _review_refusal(
        self,
        conn: Connection,
        row: Row[Any],
        approve: bool,
        reviewer: str,
        expect_amount: int | None,
    ) -> ReviewRefused | None:
        if row.submitter is not None and row.submitter == reviewer:
            return ReviewRefused(
                row.voucher_id, "own_voucher", f"{reviewer!r} submitted it: another must review"
            )
        if expect_amount is not None and expect_amount != row.amount_minor:
            return ReviewRefused(
                row.voucher_id,
                "amount_mismatch",
                f"the review is for {expect_amount}, the voucher is for {row.amount_minor}",
            )
        if approve:
            credited = conn.execute(
                select(VO.c.voucher_id).where(
                    VO.c.bank == row.bank,
                    VO.c.transfer_no == row.transfer_no,
                    VO.c.status == VoucherStatus.APPROVED.value,
                )
            ).first()
            if credited is not None:
                return ReviewRefused(
                    row.voucher_id,
                    "transfer_credited",
                    f"transfer {row.transfer_no!r} at {row.bank!r} was already credited "
                    f"(voucher {credited[0]!r})",
                )
        return None
