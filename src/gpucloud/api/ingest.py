"""Per-record validation of a usage batch (the slow path).

POST /v1/usage first tries ``gpucloud.ledger.wire.parse_batch`` (strict, straight into
dicts: the common, all-valid case). Only a batch it refuses comes here: the whole batch
is validated in one pass through the models first; only when that fails is each record
validated on its own, so that the valid rest can be stored and every malformed record
reported by index, field and rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pydantic_core
from pydantic import TypeAdapter, ValidationError

from gpucloud.usage import UsageBatch, UsageRecord

MAX_RECORDS = 10000

_records_adapter = TypeAdapter(list[UsageRecord])
_record_adapter = TypeAdapter(UsageRecord)


@dataclass(frozen=True)
class RecordError:
    index: int
    field: str  # dotted path inside the record, "" for the record as a whole
    rule: str  # pydantic's error type (e.g. "missing", "greater_than_equal") or ours
    message: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "field": self.field,
            "rule": self.rule,
            "message": self.message,
        }


class BatchShapeError(ValueError):
    """The body is not ``{"records": [...]}`` at all."""


class NotJSON(ValueError):
    """The body is not JSON."""


def validate_body(raw: bytes) -> tuple[list[tuple[int, UsageRecord]], list[RecordError]]:
    """Like validate_batch, from the raw body: pydantic parses the JSON itself when the
    whole batch is valid (the hot path: no intermediate Python objects)."""
    try:
        batch = UsageBatch.model_validate_json(raw)
        return list(enumerate(batch.records)), []
    except ValidationError:
        pass
    try:  # strict: no NaN or Infinity, bounded nesting (json.loads recursed into a 500)
        payload = pydantic_core.from_json(raw, allow_inf_nan=False)
    except ValueError as exc:
        raise NotJSON(f"body: not valid JSON ({exc})") from None
    return validate_batch(payload, whole_first=False)


def _errors_of(index: int, exc: ValidationError) -> list[RecordError]:
    out = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err.get("loc", ()))
        rule = err.get("type", "invalid")
        message = err.get("msg", "invalid")
        if rule == "value_error":  # model-level rules: name the rule by its message
            message = message.removeprefix("Value error, ")
        out.append(RecordError(index, loc, rule, message))
    return out


def validate_batch(
    payload: Any, whole_first: bool = True
) -> tuple[list[tuple[int, UsageRecord]], list[RecordError]]:
    """Return (valid records with their batch index, errors of the invalid ones)."""
    if not isinstance(payload, dict):
        raise BatchShapeError('body: must be a JSON object {"records": [...]}')
    extra = sorted(set(payload) - {"records"})
    if extra:
        raise BatchShapeError(f"body.{extra[0]}: unknown field (only 'records' is allowed)")
    raw = payload.get("records")
    if not isinstance(raw, list):
        raise BatchShapeError("body.records: required, must be an array of usage records")
    if len(raw) > MAX_RECORDS:
        raise BatchShapeError(f"body.records: at most {MAX_RECORDS} records per batch")
    if whole_first:
        try:
            records = _records_adapter.validate_python(raw)
            return list(enumerate(records)), []
        except ValidationError:
            pass
    valid: list[tuple[int, UsageRecord]] = []
    errors: list[RecordError] = []
    for i, item in enumerate(raw):
        try:
            valid.append((i, _record_adapter.validate_python(item)))
        except ValidationError as exc:
            errors.extend(_errors_of(i, exc))
    return valid, errors
