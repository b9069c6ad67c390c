"""What a node may report: usage is charged only for what the reporting node ran.

A meter records what it was opened for: its ``node`` (the pod's node, given by the
operator, or else bound by the first report), the GPU UUIDs of its pod (``gpu_uuids``,
bound by the first reports of that node, at most ``gpus`` of them) and, for a volume, its
``max_bytes`` (quota or capacity). A usage record that touches a meter's window is
refused when it comes from another node, names a GPU beyond the pod's count, names another
GPU product than the meter's ``gpu_product`` or a device of another kind (a MIG slice for
a whole GPU, a whole GPU for a time-sliced share: gpucloud.gpu_kinds), or reports more
bytes than the volume holds. No two records of one GPU overlap (ingest), so a
meter's GPU-seconds in any window are at most ``gpus`` x its seconds.

Two places apply the same terms: ``Guard`` at ingestion (per record, with a reason, for
meters that exist), and ``bind_pending``/``terms_sql`` when a meter rates usage stored
before it was opened. Usage that breaks them is never charged.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Row, update

from gpucloud.gpu_kinds import device_kind, gpu_kind
from gpucloud.ledger import schema
from gpucloud.usage import UsageKind

M = schema.meters
_GPU = UsageKind.GPU_TIME.value
WRONG_NODE, UNBOUND_GPU, OVER_CAPACITY = "wrong_node", "unbound_gpu", "over_capacity"
WRONG_PRODUCT, WRONG_DEVICE = "wrong_product", "wrong_device"
RULES = (WRONG_NODE, UNBOUND_GPU, OVER_CAPACITY, WRONG_PRODUCT, WRONG_DEVICE)


def uuids_of(raw: str | None) -> list[str]:
    return list(json.loads(raw)) if raw else []


@dataclass
class Terms:
    """One meter's terms, with the bindings this transaction adds."""

    meter_id: str
    account_id: int
    kind: str
    opened: int  # window in whole POSIX seconds
    closed: int | None
    gpus: int
    node: str | None
    uuids: list[str]
    max_bytes: int | None
    product: str | None = None
    changed: bool = False

    @classmethod
    def of(cls, m: Row[Any]) -> Terms:
        opened = schema.to_us(m.opened_at) // 1_000_000
        closed = None if m.closed_at is None else schema.to_us(m.closed_at) // 1_000_000
        return cls(
            m.meter_id, m.account_id, m.kind, opened, closed, m.gpus, m.node,
            uuids_of(m.gpu_uuids), m.max_bytes, m.gpu_product,
        )  # fmt: skip

    def touches(self, start: int, end: int) -> bool:
        return end > self.opened and (self.closed is None or start < self.closed)

    def refusal(
        self, node: str, subject: str, quantity: int, product: str | None = None
    ) -> tuple[str, str] | None:
        """(rule, message) if this meter may not be charged for the record, binding the
        node and GPU UUIDs on first sight."""
        wrong = self._wrong_product(subject, product)
        if wrong is not None:
            return wrong
        if self.node is None:
            self.node, self.changed = node, True
        elif node != self.node:
            return WRONG_NODE, (
                f"node: meter {self.meter_id} is for node {self.node!r}, not {node!r}"
            )
        if self.kind == _GPU:
            if subject not in self.uuids:
                if len(self.uuids) >= self.gpus:
                    return UNBOUND_GPU, (
                        f"gpu.uuid: {subject!r} is not one of the {self.gpus} GPU(s) of meter "
                        f"{self.meter_id} ({', '.join(self.uuids)})"
                    )
                self.uuids.append(subject)
                self.changed = True
        elif self.max_bytes is not None and quantity > self.max_bytes:
            return OVER_CAPACITY, (
                f"quantity: {quantity} bytes is more than the {self.max_bytes} bytes of "
                f"meter {self.meter_id}'s volume"
            )
        return None

    def _wrong_product(self, subject: str, product: str | None) -> tuple[str, str] | None:
        """A GPU meter of a product takes that product's devices only: an agent cannot
        bill a 1g slice as a whole GPU, a share as a slice, or one profile as another."""
        if self.kind != _GPU or self.product is None:
            return None
        if product != self.product:
            return WRONG_PRODUCT, (
                f"gpu.product: meter {self.meter_id} is for {self.product!r}, not {product!r}"
            )
        want, got = gpu_kind(self.product), device_kind(subject)
        if want is not got:
            return WRONG_DEVICE, (
                f"gpu.uuid: {subject!r} names a {got.value} device; meter {self.meter_id} "
                f"({self.product}) takes {want.value} devices only"
            )
        return None


def save(conn: Connection, terms: Iterable[Terms]) -> None:
    """Persist the bindings added (in the caller's transaction, meter rows locked)."""
    for t in terms:
        if t.changed:
            conn.execute(
                update(M)
                .where(M.c.meter_id == t.meter_id)
                .values(node=t.node, gpu_uuids=json.dumps(t.uuids) if t.uuids else None)
            )
            t.changed = False


@dataclass
class Guard:
    """The meters of one batch, by (kind, owner), and what it refused."""

    meters: dict[tuple[str, str], list[Terms]]
    # meter -> [(rule, message, reporting node)]
    refused: dict[str, list[tuple[str, str, str]]] = field(default_factory=dict)

    def check(self, kind: str, owner: str, node: str, subject: str, start: int, end: int,
              quantity: int, product: str | None = None) -> tuple[str, str] | None:  # fmt: skip
        for t in self.meters.get((kind, owner), ()):
            if t.touches(start, end):
                refusal = t.refusal(node, subject, quantity, product)
                if refusal is not None:
                    self.refused.setdefault(t.meter_id, []).append((*refusal, node))
                    return refusal
        return None

    def all_terms(self) -> list[Terms]:
        return [t for ts in self.meters.values() for t in ts]

    def account_of(self, meter_id: str) -> int:
        return next(t.account_id for t in self.all_terms() if t.meter_id == meter_id)


def bind_pending(conn: Connection, m: Row[Any], pending_cond: str, params: dict[str, Any]) -> Terms:
    """The meter's terms, binding node and GPUs from its pending usage (stored before the
    meter opened) when the first reports did not: the earliest report wins."""
    t = Terms.of(m)
    if t.node is not None and (t.kind != _GPU or len(t.uuids) >= t.gpus):
        return t
    from sqlalchemy import text  # local: the hot path above needs only update()

    if t.node is None:
        first = conn.execute(
            text(f"SELECT node FROM ledger_usage WHERE {pending_cond} ORDER BY start_s LIMIT 1"),
            params,
        ).first()
        if first is None:
            return t
        t.node, t.changed = first[0], True
    if t.kind == _GPU:
        product_cond, product_params = _product_sql(t)
        rows = conn.execute(
            text(
                f"SELECT subject, min(start_s) AS s FROM ledger_usage WHERE {pending_cond} "
                f"AND node = :bind_node{product_cond} GROUP BY subject ORDER BY s, subject"
            ),
            {**params, **product_params, "bind_node": t.node},
        ).all()
        for subject, _ in rows:
            if t._wrong_product(subject, t.product) is not None:
                continue  # a device of another kind: never charged to this meter
            if len(t.uuids) >= t.gpus:
                break
            if subject not in t.uuids:
                t.uuids.append(subject)
                t.changed = True
    save(conn, [t])
    return t


def _product_sql(t: Terms) -> tuple[str, dict[str, Any]]:
    if t.product is None:
        return "", {}
    return " AND gpu_product = :t_product", {"t_product": t.product}


def terms_sql(t: Terms) -> tuple[str, dict[str, Any]]:
    """The SQL condition (and its parameters) of the usage this meter may charge."""
    cond, params = "", {}
    if t.node is not None:
        cond += " AND node = :t_node"
        params["t_node"] = t.node
    if t.kind == _GPU:
        if not t.uuids:
            return " AND 1 = 0", {}
        names = [f"t_u{i}" for i in range(len(t.uuids))]
        cond += f" AND subject IN ({', '.join(':' + n for n in names)})"
        params.update(zip(names, t.uuids, strict=True))
        product_cond, product_params = _product_sql(t)
        cond += product_cond
        params.update(product_params)
    elif t.max_bytes is not None:
        cond += " AND quantity <= :t_max_bytes"
        params["t_max_bytes"] = t.max_bytes
    return cond, params
