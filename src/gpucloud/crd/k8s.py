"""Kubernetes extensions carried on the CRD models, and the parse that reports refusals.

The markers below sit in a field's ``Annotated`` metadata (or, for rules on a whole
object, in its ``cel`` class variable). The schema emitter (``schema.py``) writes them
out as OpenAPI; pydantic runs the ones it can check, so the operator refuses what the
API server would have refused, with the same message."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError, core_schema


@dataclass(frozen=True)
class Cel:
    """An ``x-kubernetes-validations`` rule. ``check`` is the same rule in Python, run on
    parse; None for transition rules (``oldSelf``), which only the API server can check."""

    rule: str
    message: str
    field_path: str | None = None
    check: Callable[[Any], bool] | None = None

    def emit(self) -> dict[str, str]:
        out = {"rule": self.rule, "message": self.message}
        if self.field_path:
            out["fieldPath"] = self.field_path
        return out

    def error(self) -> PydanticCustomError:
        return PydanticCustomError(
            "cel", "{message} (rule: {rule})", {"message": self.message, "rule": self.rule}
        )

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> Any:
        schema = handler(source)
        if self.check is None:
            return schema

        def run(value: Any) -> Any:
            if value is not None and not self.check(value):  # type: ignore[misc]
                raise self.error()
            return value

        return core_schema.no_info_after_validator_function(run, schema)


def immutable(what: str) -> Cel:
    return Cel("self == oldSelf", f"{what} is immutable")


@dataclass(frozen=True)
class ListType:
    """``x-kubernetes-list-type`` (and the map keys of a map list). A set's items and a
    map's keys are unique: the API server refuses a duplicate, and so does the parse."""

    kind: str
    keys: tuple[str, ...] = ()

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> Any:
        schema = handler(source)
        if self.kind not in ("set", "map"):
            return schema

        def run(value: Any) -> Any:
            seen: set[Any] = set()
            for item in value or ():
                key = item if self.kind == "set" else tuple(_by_alias(item, k) for k in self.keys)
                if key in seen:
                    what = repr(item) if self.kind == "set" else _describe_key(self.keys, key)
                    raise PydanticCustomError(
                        "list_unique",
                        "{what} is listed twice (x-kubernetes-list-type: {kind})",
                        {"what": what, "kind": self.kind},
                    )
                seen.add(key)
            return value

        return core_schema.no_info_after_validator_function(run, schema)


def _by_alias(item: BaseModel, alias: str) -> Any:
    for name, f in type(item).model_fields.items():
        if (f.alias or name) == alias:
            return getattr(item, name)
    raise KeyError(alias)


def _describe_key(keys: tuple[str, ...], values: tuple[Any, ...]) -> str:
    return ", ".join(f"{k} {v!r}" for k, v in zip(keys, values, strict=True))


@dataclass(frozen=True)
class Format:
    """An OpenAPI ``format`` (int32 is the default for integers)."""

    name: str


@dataclass(frozen=True)
class Listed:
    """List the field in ``required`` although it has a default (the API server applies
    the default first, so the listing only documents that the field is always there)."""


LISTED = Listed()
INT64 = Format("int64")
DATE_TIME = Format("date-time")


class Spec(BaseModel):
    """Base of every CRD object model: camelCase on the wire; unknown fields ignored,
    as the API server prunes them from a structural schema."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="ignore", frozen=True
    )
    cel: ClassVar[tuple[Cel, ...]] = ()

    @model_validator(mode="after")
    def _object_rules(self) -> Any:
        for rule in type(self).cel:
            if rule.check is not None and not rule.check(self):
                raise rule.error()
        return self

    def dump(self) -> dict[str, Any]:
        """Back to the wire form (fields that were absent stay absent)."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class SpecError(ValueError):
    """A spec the models refuse: ``str()`` names each field and the rule it breaks."""


M = TypeVar("M", bound=BaseModel)


def parse(model: type[M], data: Any, root: str = "spec") -> M:
    try:
        return model.model_validate(data if data is not None else {})
    except ValidationError as exc:
        raise SpecError("; ".join(_describe(e, model, root) for e in exc.errors())) from None


def _describe(err: Any, model: type[BaseModel], root: str) -> str:
    path = root
    for part in err["loc"]:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    # an object rule names the field it is about in fieldPath
    fp = _field_path(model, err)
    if fp:
        path += fp
    return f"{path}: {err['msg']}"


def _field_path(model: type[BaseModel], err: Any) -> str:
    if err["type"] != "cel":
        return ""
    rule = (err.get("ctx") or {}).get("rule")
    owner: Any = model
    for part in err["loc"]:
        if isinstance(part, int) or owner is None:
            continue
        owner = _nested_model(owner, part)
    for c in getattr(owner, "cel", ()):
        if c.rule == rule and c.field_path:
            return c.field_path
    return ""


def _nested_model(model: type[BaseModel], alias: str) -> type[BaseModel] | None:
    from gpucloud.crd.schema import model_of  # the emitter unwraps the same way

    for name, f in model.model_fields.items():
        if (f.alias or name) == alias:
            return model_of(f.annotation)
    return None
