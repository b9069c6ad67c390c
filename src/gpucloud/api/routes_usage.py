"""POST /v1/usage: usage records from the node agents."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from gpucloud.api.deps import Caller, State, agent_node
from gpucloud.api.gate import FairLock, GroupCommit
from gpucloud.api.guard import StrictRoute
from gpucloud.api.ingest import MAX_RECORDS, BatchShapeError, NotJSON, RecordError, validate_body
from gpucloud.api.metrics import ApiMetrics
from gpucloud.api.schemas import IngestOut, Problem
from gpucloud.api.settings import Settings
from gpucloud.ledger import Ledger, admission
from gpucloud.ledger.admission import WRONG_NODE
from gpucloud.ledger.types import IngestResult
from gpucloud.ledger.wire import WireBatch, parse_batch
from gpucloud.usage import UsageRecord

router = APIRouter(route_class=StrictRoute, prefix="/v1", tags=["usage"])
MAX_BODY_BYTES = 16 * 1024 * 1024  # 10,000 records fit in a few MB

_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/UsageBatch"}}},
    }
}


@router.post(
    "/usage",
    response_model=IngestOut,
    openapi_extra=_BODY,
    responses={
        207: {"model": IngestOut, "description": "some records stored, some refused"},
        400: {"model": Problem, "description": "body is not JSON"},
        401: {"model": Problem},
        403: {"model": Problem, "description": "not the agent of a node"},
        413: {"model": Problem, "description": "body larger than 16 MiB"},
        422: {"model": IngestOut, "description": "no record stored; errors per record"},
    },
)
async def post_usage(request: Request, caller: Caller, state: State) -> Any:
    """Store a batch of usage records; each record is validated and stored on its own.

    200: every record stored or already stored (duplicate). 207: some stored, some
    refused (see ``errors``: index, field, rule). 422: nothing stored. Re-sending a
    batch is a no-op for the records already stored.
    """
    node = agent_node(caller, state)
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise HTTPException(413, f"body: larger than {MAX_BODY_BYTES} bytes; send smaller batches")
    out = await run_in_threadpool(_ingest, state, node, raw)
    state.rating.notify()
    status = 200
    if out.errors:
        status = 207 if out.accepted + out.duplicates > 0 else 422
    return JSONResponse(out.model_dump(), status_code=status)


def _validate(raw: bytes) -> tuple[WireBatch | list[UsageRecord], list[int], list[RecordError]]:
    """(records to store, their indexes in the body, errors of the others). The fast path
    (every record valid) checks the JSON straight into dicts; otherwise each record is
    validated on its own so that every error is reported."""
    fast = parse_batch(raw)
    if fast is not None:
        return fast, list(range(len(fast))), []
    try:
        valid, errors = validate_body(raw)
    except NotJSON as exc:
        raise HTTPException(400, str(exc)) from None
    except BatchShapeError as exc:
        raise HTTPException(422, str(exc)) from None
    return [r for _, r in valid], [i for i, _ in valid], errors


def _own_records(
    records: WireBatch | list[UsageRecord], indexes: list[int], node: str
) -> tuple[WireBatch | list[UsageRecord], list[int], list[RecordError]]:
    """The records of the caller's node; each record naming another node is refused on
    its own (a node reports only for what it ran)."""
    nodes = records.nodes if isinstance(records, WireBatch) else [r.node for r in records]
    keep = [pos for pos, other in enumerate(nodes) if other == node]
    if len(keep) == len(nodes):
        return records, indexes, []
    errors = [
        RecordError(
            indexes[pos], "node", WRONG_NODE, f"{nodes[pos]!r} is not the caller's node {node!r}"
        )
        for pos in range(len(nodes))
        if nodes[pos] != node
    ]
    if isinstance(records, WireBatch):
        return records.subset(keep), [indexes[p] for p in keep], errors
    return [records[p] for p in keep], [indexes[p] for p in keep], errors


def ingest_group(
    ledger: Ledger, settings: Settings, metrics: ApiMetrics, gate: FairLock
) -> GroupCommit[WireBatch | list[UsageRecord], IngestResult]:
    """The batches of concurrent requests, written together: one transaction and one
    durable commit per group; each request still gets its own batch's result, after the
    commit."""

    def write(batches: list[WireBatch | list[UsageRecord]]) -> list[IngestResult]:
        metrics.ingest_batches.observe(len(batches))
        with metrics.stage_seconds.labels("ingest").time():
            now = settings.clock.now()
            return ledger.ingest_batches(batches, received_at=now, rate_at=now)

    return GroupCommit(gate, write, size=len, max_size=MAX_RECORDS)


def _ingest(state: State, node: str, raw: bytes) -> IngestOut:
    stage = state.metrics.stage_seconds
    with stage.labels("validate").time():
        records, indexes, errors = _validate(raw)
        records, indexes, foreign = _own_records(records, indexes, node)
    metrics = state.metrics
    metrics.rejected.labels("invalid").inc(len({e.index for e in errors}))
    metrics.rejected.labels(WRONG_NODE).inc(len(foreign))
    errors += foreign
    accepted = duplicates = 0
    if len(records):
        queued = time.perf_counter()
        # Rated in the same transaction where possible (no second write of each row);
        # the rating loop takes the rest (records straddling meters, ...).
        result = state.ingest_group.submit(records)
        stage.labels("write_wait").observe(time.perf_counter() - queued)
        accepted, duplicates = result.accepted, result.duplicates
        for pos, reason in result.rejected:
            rule = result.rules.get(pos, "conflict")
            field = reason.split(":", 1)[0] if rule in admission.RULES else ""
            errors.append(RecordError(indexes[pos], field, rule, reason))
            metrics.rejected.labels(rule).inc()
    metrics.ingested.inc(accepted)
    metrics.duplicates.inc(duplicates)
    errors.sort(key=lambda e: e.index)
    return IngestOut(
        accepted=accepted,
        duplicates=duplicates,
        rejected=len({e.index for e in errors}),
        errors=[e.as_dict() for e in errors],
    )
