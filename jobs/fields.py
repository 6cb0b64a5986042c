"""What a spec field means for the cache key, declared next to the field itself.

Every field of a stage's spec (and of the models nested in it) is one of:
- `output(...)`: it changes what the stage computes, so it is part of the stage's hash;
- `operational(...)`: it changes only how the stage runs (progress intervals, CPUs per worker,
  restarts allowed), so changing it keeps the hash and reuses the committed output;
- a reference to another stage (orchestrator.stages.kind.reference), hashed through the
  referenced stage's own hash.

A field declared with plain pydantic `Field` is unclassified, and a unit test fails on it: a new
field cannot land on the wrong side of the cache key by accident. `local=` says the field names
files on the driver's disk ("file", "dir", or "glob" for source paths), which the plan
fingerprints and `submit` ships with the job.

This module is pydantic only: the jobs' specs (jobs/) and the control plane's both use it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined, to_jsonable_python

Hashing = Literal["output", "operational", "reference"]
LocalKind = Literal["file", "dir", "glob"]


def output(default: Any = PydanticUndefined, *, local: LocalKind | None = None, **kwargs) -> Any:
    """A field that changes the stage's output: hashed."""
    return _field(default, "output", local, kwargs)


def operational(default: Any = PydanticUndefined, **kwargs) -> Any:
    """A field that changes only how the stage runs, never its output: not hashed."""
    return _field(default, "operational", None, kwargs)


def _field(default: Any, hashing: Hashing, local: LocalKind | None, kwargs: dict) -> Any:
    extra = {"hashing": hashing, **({"local": local} if local else {}), **kwargs.pop("json_schema_extra", {})}
    return Field(default, json_schema_extra=extra, **kwargs)


def hashing_of(info: FieldInfo) -> Hashing | None:
    """How a field is classified; None when it is not (a plain `Field`)."""
    extra = info.json_schema_extra
    return extra.get("hashing") if isinstance(extra, dict) else None


def local_kind(info: FieldInfo) -> LocalKind | None:
    extra = info.json_schema_extra
    return extra.get("local") if isinstance(extra, dict) else None


def output_fields(model: BaseModel) -> dict:
    """The model's fields as JSON values, without its operational fields (at any depth): what the
    stage's hash covers."""
    return {name: _output_value(getattr(model, name)) for name, info in type(model).model_fields.items()
            if hashing_of(info) != "operational"}


def _output_value(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return output_fields(value)
    if isinstance(value, (list, tuple)):
        return [_output_value(v) for v in value]
    if isinstance(value, dict):
        # JSON keys are strings: an int key must equal the same key read back from a commit.
        return {str(k): _output_value(v) for k, v in value.items()}
    return to_jsonable_python(value)


def local_fields(model: BaseModel, where: str = "") -> list[tuple[str, BaseModel, LocalKind, Any]]:
    """(field path, the model holding it, its local kind, its value) of every set field declared
    `local=`, at any depth: the files on the driver's disk that the model names. A model whose local
    files name more local files (a task YAML's data files) lists those with `local_files_inside()`
    -> [(field, path)]; they count as files of that field."""
    found = []
    inside = getattr(model, "local_files_inside", None)
    if inside is not None:
        found += [(f"{where}.{name}" if where else name, model, "file", path) for name, path in inside()]
    for name, info in type(model).model_fields.items():
        value, path = getattr(model, name), f"{where}.{name}" if where else name
        kind = local_kind(info)
        if kind and value:
            found.append((path, model, kind, value))
        elif isinstance(value, BaseModel):
            found += local_fields(value, path)
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                if isinstance(item, BaseModel):
                    found += local_fields(item, f"{path}[{i}]")
    return found
