"""Models -> the structural OpenAPI v3 schema the API server needs.

Structural means: every node has a ``type``; no ``$ref``, no ``anyOf`` (an Optional
field is its inner type, left out of ``required``). pydantic's own JSON schema has
both, hence this small walker. Keys come out in one fixed order per type, so that a
field's schema does not depend on the order its constraints were written in."""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from gpucloud.crd.k8s import Cel, Format, Listed, ListType

Schema = dict[str, Any]

ORDER = {
    "string": [
        "type", "description", "format", "enum", "minLength", "pattern", "maxLength",
        "default", "x-kubernetes-validations",
    ],
    "integer": [
        "type", "format", "description", "minimum", "maximum", "default",
        "x-kubernetes-validations",
    ],
    "boolean": ["type", "description", "default"],
    "array": [
        "type", "minItems", "maxItems", "description", "x-kubernetes-list-type",
        "x-kubernetes-list-map-keys", "default", "items",
    ],
    "object": ["type", "properties", "required", "description", "x-kubernetes-validations"],
}  # fmt: skip


def _strip_optional(tp: Any) -> Any:
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def model_of(tp: Any) -> type[BaseModel] | None:
    """The model a field holds (itself, in a list, or Optional), for error paths."""
    tp = _strip_optional(tp)
    if get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    if get_origin(tp) is list:
        return model_of(get_args(tp)[0])
    return tp if isinstance(tp, type) and issubclass(tp, BaseModel) else None


def field_schema(tp: Any, info: FieldInfo) -> Schema:
    """The schema of one value of type ``tp`` with the constraints in ``info``."""
    tp = _strip_optional(tp)
    meta = list(info.metadata)
    if get_origin(tp) is Annotated:  # e.g. Optional[Int64]: the union hid its metadata
        inner = FieldInfo.from_annotation(tp)
        tp, meta = inner.annotation, [*inner.metadata, *meta]
    out: Schema = {}
    fmt = next((m.name for m in meta if isinstance(m, Format)), None)
    origin = get_origin(tp)
    if origin is Literal:
        out.update(type="string", enum=list(get_args(tp)))
    elif tp is str:
        out["type"] = "string"
    elif tp is bool:
        out["type"] = "boolean"
    elif tp is int:
        out.update(type="integer", format=fmt or "int32")
        fmt = None
    elif origin is list:
        item = FieldInfo.from_annotation(get_args(tp)[0])
        out.update(type="array", items=field_schema(item.annotation, item))
    elif origin is dict:
        out["type"] = "object"  # opaque (metadata): the API server checks it itself
    elif isinstance(tp, type) and issubclass(tp, BaseModel):
        out.update(object_schema(tp))
    else:
        raise TypeError(f"no structural schema for {tp!r}")
    if fmt:
        out["format"] = fmt
    if info.description:
        out["description"] = info.description
    _constraints(out, meta)
    if info.default is not PydanticUndefined and info.default is not None:
        out["default"] = info.default
    rules = out.get("x-kubernetes-validations", []) + [m.emit() for m in meta if isinstance(m, Cel)]
    if rules:
        out["x-kubernetes-validations"] = rules
    return _ordered(out)


def _constraints(out: Schema, meta: list[Any]) -> None:
    array = out["type"] == "array"
    for m in meta:
        if getattr(m, "pattern", None) is not None:
            out["pattern"] = m.pattern
        if getattr(m, "min_length", None) is not None:
            out["minItems" if array else "minLength"] = m.min_length
        if getattr(m, "max_length", None) is not None:
            out["maxItems" if array else "maxLength"] = m.max_length
        if getattr(m, "ge", None) is not None:
            out["minimum"] = m.ge
        if getattr(m, "le", None) is not None:
            out["maximum"] = m.le
        if isinstance(m, ListType):
            out["x-kubernetes-list-type"] = m.kind
            if m.keys:
                out["x-kubernetes-list-map-keys"] = list(m.keys)


def object_schema(model: type[BaseModel]) -> Schema:
    props: Schema = {}
    required: list[str] = []
    for name, info in model.model_fields.items():
        key = info.alias or name
        props[key] = field_schema(info.annotation, info)
        if info.is_required() or any(isinstance(m, Listed) for m in info.metadata):
            required.append(key)
    out: Schema = {"type": "object", "properties": props}
    if required:
        out["required"] = required
    rules = [c.emit() for c in getattr(model, "cel", ())]
    if rules:
        out["x-kubernetes-validations"] = rules
    return out


def _ordered(s: Schema) -> Schema:
    order = ORDER[s["type"]]
    extra = set(s) - set(order)
    if extra:
        raise ValueError(f"unordered schema keys {sorted(extra)}")
    return {k: s[k] for k in order if k in s}


# --- the CustomResourceDefinition around the schema -------------------------------


@dataclass(frozen=True)
class Column:
    name: str
    path: str
    type: str = "string"
    priority: int | None = None

    def emit(self) -> Schema:
        out: Schema = {"name": self.name, "type": self.type, "jsonPath": self.path}
        if self.priority is not None:
            out["priority"] = self.priority
        return out


AGE = Column("Age", ".metadata.creationTimestamp", "date")


@dataclass(frozen=True)
class Definition:
    """What a CRD says besides its schema: names, scope, printer columns."""

    kind: str
    plural: str
    scope: str
    short_names: list[str]
    description: str
    spec: type[BaseModel]
    status: type[BaseModel]
    columns: list[Column] = field(default_factory=list)
    categories: tuple[str, ...] = ("gpucloud",)


def crd_manifest(d: Definition, group: str, version: str) -> Schema:
    root = {
        "type": "object",
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": object_schema(d.spec),
            "status": object_schema(d.status),
        },
        "required": ["spec"],
        "description": d.description,
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{d.plural}.{group}",
            "labels": {"app.kubernetes.io/part-of": "gpucloud"},
        },
        "spec": {
            "group": group,
            "scope": d.scope,
            "names": {
                "kind": d.kind,
                "listKind": f"{d.kind}List",
                "plural": d.plural,
                "singular": d.kind.lower(),
                "shortNames": d.short_names,
                "categories": list(d.categories),
            },
            "versions": [
                {
                    "name": version,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [c.emit() for c in [*d.columns, AGE]],
                    "schema": {"openAPIV3Schema": root},
                }
            ],
        },
    }
