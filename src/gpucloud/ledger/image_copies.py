"""Image copies: the durable queue of images a node's agent must make.

An instance's data is node-local, so the operator cannot copy it into an image itself:
it records a request here (``request_image_copy``), the agent of the node that holds the
instance's folder polls its pending copies through the API (``pending_image_copies``),
copies ``instances/<ns>/<name>`` into ``images/<ns>/<image>`` and reports the bytes the
copy uses (``complete_image_copy``) or why it could not (``fail_image_copy``). A copy
of a deleted Image is cancelled (``cancel_image_copy``) before its folder's wipe is
requested. Every step is idempotent, so a killed operator or agent repeats it safely.
A part of the ``Ledger`` facade.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import PurePosixPath
from typing import Any

from sqlalchemy import Row, insert, select, update
from sqlalchemy.exc import IntegrityError

from gpucloud.ledger import schema
from gpucloud.ledger import validate as v
from gpucloud.ledger.errors import IdempotencyConflict, InvalidInput, WrongNode
from gpucloud.ledger.store import Store
from gpucloud.ledger.types import ImageCopy

C = schema.image_copies
ACTOR = "gpucloud-operator"
OUTCOMES = ("copied", "failed", "cancelled")


def _copy(row: Row[Any], account: str) -> ImageCopy:
    return ImageCopy(
        row.id,
        row.node,
        row.source,
        row.path,
        row.subject,
        account,
        row.requested_at,
        row.done_at,
        row.outcome,
        row.bytes_used,
        row.message,
    )


def check_folder(path: object, folder: str, field: str) -> tuple[str, str]:
    """``<folder>/<namespace>/<name>``, relative, without ``.``/``..``: (ns, name)."""
    text = v.text(path, field, max_len=1024)
    parts = PurePosixPath(text).parts
    if (
        text.startswith("/")
        or len(parts) != 3
        or parts[0] != folder
        or {".", ".."} & set(parts)
        or parts[2].startswith(".")
    ):
        raise InvalidInput(f"{field}: {text!r} must be {folder}/<namespace>/<name>")
    return parts[1], parts[2]


class ImageCopies:
    """The queue of requests to copy instance folders into images, worked by the nodes' agents."""

    def __init__(self, store: Store) -> None:
        self._s = store

    def request_image_copy(
        self, node: str, source: str, path: str, subject: str, account: str, at: datetime
    ) -> ImageCopy:
        """Ask the agent of ``node`` to copy ``source`` into ``path`` (same namespace).
        The same ``subject`` again returns the existing request (which must match)."""
        v.text(node, "node")
        src_ns, _ = check_folder(source, "instances", "source")
        dst_ns, _ = check_folder(path, "images", "path")
        if src_ns != dst_ns:
            raise InvalidInput(f"path: {path!r} is not in the namespace of {source!r}")
        v.text(subject, "subject", max_len=255)
        v.instant(at, "at")
        existing = self.get_image_copy(subject)
        if existing is None:
            try:
                with self._s.engine.begin() as conn:
                    acct = self._s.account_row(conn, account)
                    conn.execute(
                        insert(C).values(
                            node=node,
                            source=source,
                            path=path,
                            subject=subject,
                            account_id=acct.id,
                            requested_at=at,
                        )
                    )
                    detail = {"node": node, "source": source, "path": path}
                    self._s.audit(conn, acct.id, ACTOR, "image.copy_requested", subject, detail, at)
            except IntegrityError:
                pass  # a concurrent request for the same subject won
            existing = self.get_image_copy(subject)
            assert existing is not None
        if (existing.node, existing.source, existing.path, existing.account) != (
            node,
            source,
            path,
            account,
        ):
            raise IdempotencyConflict(
                subject,
                f"requested for node {existing.node!r}, {existing.source!r} -> "
                f"{existing.path!r}, account {existing.account!r}",
            )
        return existing

    def get_image_copy(self, subject: str) -> ImageCopy | None:
        with self._s.read() as conn:
            row = conn.execute(select(C).where(C.c.subject == subject)).first()
            if row is None:
                return None
            return _copy(row, self._s.names(conn, {row.account_id})[row.account_id])

    def pending_image_copies(self, node: str, *, limit: int = 100) -> list[ImageCopy]:
        """The node's copies not done yet, oldest first."""
        with self._s.read() as conn:
            rows = conn.execute(
                select(C)
                .where(C.c.node == node, C.c.done_at.is_(None))
                .order_by(C.c.id)
                .limit(limit)
            ).all()
            names = self._s.names(conn, {r.account_id for r in rows})
        return [_copy(r, names[r.account_id]) for r in rows]

    def complete_image_copy(
        self, copy_id: int, node: str, bytes_used: int, at: datetime
    ) -> ImageCopy:
        """The agent of ``node`` made the copy, ``bytes_used`` as measured. Refuses
        another node's copy (WrongNode); a copy done, failed or cancelled already is
        returned unchanged (a retried report)."""
        if v.integer(bytes_used, "bytes_used") < 0:
            raise InvalidInput(f"bytes_used: must be >= 0, got {bytes_used}")
        return self._finish(copy_id, node, "copied", at, bytes_used=bytes_used)

    def fail_image_copy(self, copy_id: int, node: str, message: str, at: datetime) -> ImageCopy:
        """The agent of ``node`` could not make the copy (e.g. no such source folder)."""
        v.text(message, "message", max_len=1024)
        return self._finish(copy_id, node, "failed", at, message=message)

    def cancel_image_copy(self, subject: str, reason: str, at: datetime) -> ImageCopy | None:
        """The operator gives up a pending copy (its Image is being deleted). Returns the
        copy as it stands (done already: unchanged), None if there is none."""
        copy = self.get_image_copy(subject)
        if copy is None or copy.done_at is not None:
            return copy
        return self._finish(copy.id, copy.node, "cancelled", at, message=reason, actor=ACTOR)

    def _finish(
        self,
        copy_id: int,
        node: str,
        outcome: str,
        at: datetime,
        *,
        bytes_used: int | None = None,
        message: str | None = None,
        actor: str | None = None,
    ) -> ImageCopy:
        v.integer(copy_id, "copy_id")
        v.text(node, "node")
        v.instant(at, "at")
        assert outcome in OUTCOMES
        with self._s.engine.begin() as conn:
            row = self._s.row(conn, C.c.id, copy_id, "image copy", lock=True)
            if row.node != node:
                raise WrongNode(f"image copy {copy_id} belongs to node {row.node!r}, not {node!r}")
            if row.done_at is None:
                conn.execute(
                    update(C)
                    .where(C.c.id == copy_id)
                    .values(done_at=at, outcome=outcome, bytes_used=bytes_used, message=message)
                )
                detail = {"node": node, "path": row.path, "bytes_used": bytes_used}
                if message is not None:
                    detail["message"] = message
                self._s.audit(
                    conn, row.account_id, actor or node, f"image.{outcome}", row.subject, detail, at
                )
                row = conn.execute(select(C).where(C.c.id == copy_id)).one()
            account = self._s.names(conn, {row.account_id})[row.account_id]
        return _copy(row, account)


__all__ = ["ImageCopies", "check_folder"]
