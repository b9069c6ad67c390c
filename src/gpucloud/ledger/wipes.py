"""Node wipes: the durable queue of folders a node's agent must remove.

Instance volumes are node-local, so the operator cannot remove their folders itself: it
records a request here (``request_wipe``), the agent of that node polls its pending
requests through the API (``pending_wipes``), removes the folder and reports the bytes
freed (``complete_wipe``). Both ends are idempotent, so a killed operator or agent
repeats its step safely. A part of the ``Ledger`` facade.
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
from gpucloud.ledger.types import NodeWipe

W, A = schema.node_wipes, schema.accounts
ACTOR = "gpucloud-operator"


def _wipe(row: Row[Any], account: str) -> NodeWipe:
    return NodeWipe(
        row.id,
        row.node,
        row.path,
        row.subject,
        account,
        row.requested_at,
        row.done_at,
        row.bytes_freed,
    )


def check_path(path: object) -> str:
    """A relative path without ``..``: the agent resolves it under its own data root."""
    text = v.text(path, "path", max_len=1024)
    parts = PurePosixPath(text).parts
    if text.startswith("/") or ".." in parts or not parts:
        raise InvalidInput(f"path: {text!r} must be relative to the node's data root, without '..'")
    return text


class Wipes:
    """The queue of requests to remove node folders, worked by the nodes' agents."""

    def __init__(self, store: Store) -> None:
        self._s = store

    def request_wipe(
        self, node: str, path: str, subject: str, account: str, at: datetime
    ) -> NodeWipe:
        """Ask the agent of ``node`` to remove ``path``. The same ``subject`` again returns
        the existing request (its node and path must match)."""
        v.text(node, "node")
        check_path(path)
        v.text(subject, "subject", max_len=255)
        v.instant(at, "at")
        existing = self.get_wipe(subject)
        if existing is None:
            try:
                with self._s.engine.begin() as conn:
                    acct = self._s.account_row(conn, account)
                    conn.execute(
                        insert(W).values(
                            node=node,
                            path=path,
                            subject=subject,
                            account_id=acct.id,
                            requested_at=at,
                        )
                    )
                    detail = {"node": node, "path": path}
                    self._s.audit(conn, acct.id, ACTOR, "data.wipe_requested", subject, detail, at)
            except IntegrityError:
                pass  # a concurrent request for the same subject won
            existing = self.get_wipe(subject)
            assert existing is not None
        if (existing.node, existing.path, existing.account) != (node, path, account):
            raise IdempotencyConflict(
                subject,
                f"requested for node {existing.node!r}, path {existing.path!r}, "
                f"account {existing.account!r}",
            )
        return existing

    def get_wipe(self, subject: str) -> NodeWipe | None:
        """The request for ``subject``, or None if there is none."""
        with self._s.read() as conn:
            row = conn.execute(select(W).where(W.c.subject == subject)).first()
            if row is None:
                return None
            return _wipe(row, self._s.names(conn, {row.account_id})[row.account_id])

    def pending_wipes(self, node: str, *, limit: int = 100) -> list[NodeWipe]:
        """The node's requests not done yet, oldest first."""
        with self._s.read() as conn:
            rows = conn.execute(
                select(W)
                .where(W.c.node == node, W.c.done_at.is_(None))
                .order_by(W.c.id)
                .limit(limit)
            ).all()
            names = self._s.names(conn, {r.account_id for r in rows})
        return [_wipe(r, names[r.account_id]) for r in rows]

    def pending_wipe_at(self, path: str) -> NodeWipe | None:
        """A pending wipe of ``path`` on any node (the oldest), or None: a new volume must
        not be placed where a folder is about to be removed."""
        with self._s.read() as conn:
            row = conn.execute(
                select(W).where(W.c.path == path, W.c.done_at.is_(None)).order_by(W.c.id).limit(1)
            ).first()
            if row is None:
                return None
            return _wipe(row, self._s.names(conn, {row.account_id})[row.account_id])

    def complete_wipe(self, wipe_id: int, node: str, bytes_freed: int, at: datetime) -> NodeWipe:
        """Mark a wipe done by the agent of ``node``. Refuses another node's wipe
        (WrongNode); done already: returns it unchanged (a retried report)."""
        v.integer(wipe_id, "wipe_id")
        v.text(node, "node")
        if v.integer(bytes_freed, "bytes_freed") < 0:
            raise InvalidInput(f"bytes_freed: must be >= 0, got {bytes_freed}")
        v.instant(at, "at")
        with self._s.engine.begin() as conn:
            row = self._s.row(conn, W.c.id, wipe_id, "wipe", lock=True)
            if row.node != node:
                raise WrongNode(f"wipe {wipe_id} belongs to node {row.node!r}, not {node!r}")
            if row.done_at is None:
                conn.execute(
                    update(W).where(W.c.id == wipe_id).values(done_at=at, bytes_freed=bytes_freed)
                )
                detail = {"node": node, "path": row.path, "bytes_freed": bytes_freed}
                self._s.audit(conn, row.account_id, node, "data.wiped", row.subject, detail, at)
                row = conn.execute(select(W).where(W.c.id == wipe_id)).one()
            account = self._s.names(conn, {row.account_id})[row.account_id]
        return _wipe(row, account)


__all__ = ["Wipes", "check_path"]
