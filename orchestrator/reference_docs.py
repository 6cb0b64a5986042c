"""The pipeline file's reference, generated from the pydantic models: every field of the file and of
every stage kind, with its type, default, whether it is part of the stage's hash, and the
docstring under it. README.md holds the output between two markers, and a test fails when they
differ, so the reference cannot drift from the code.

    python -m orchestrator.reference_docs                   # print it
    python -m orchestrator.reference_docs --write README.md # replace the README's copy
"""

from __future__ import annotations

import argparse
import json
import sys
import types
import typing
from typing import Any, Literal, Union

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined, to_jsonable_python

from jobs.fields import hashing_of
from orchestrator.kinds import KINDS
from orchestrator.spec import PipelineSpec

START = "<!-- pipeline-reference:start -->"
END = "<!-- pipeline-reference:end -->"
REGENERATE = "python -m orchestrator.reference_docs --write README.md"
_HASHING = {"output": "hashed", "operational": "operational", None: "-"}
_BOUNDS = ((annotated_types.Ge, "≥"), (annotated_types.Gt, ">"), (annotated_types.Le, "≤"), (annotated_types.Lt, "<"))


def pipeline_reference() -> str:
    """The reference as markdown: the file's top level, each stage kind, then the models they use."""
    sections = [_section("The pipeline file", PipelineSpec, "pipeline-file", stage=False)]
    nested: dict[str, type[BaseModel]] = {}
    _collect(PipelineSpec, nested, skip_stages=True)
    for name, kind in KINDS.items():
        sections.append(_section(f"`kind: {name}`", kind.spec, f"kind-{name}", stage=True))
        _collect(kind.spec, nested)
    for model in sorted(nested.values(), key=lambda m: m.__name__):
        sections.append(_section(f"`{model.__name__}`", model, _anchor(model), stage=_in_a_stage(model)))
    intro = ("Every field, generated from the models (`" + REGENERATE + "`). **hashed** fields are part of "
             "the stage's hash: changing one computes the stage (and those that read it) again; "
             "**operational** ones only change how it runs, and its committed output is reused.")
    return "\n\n".join([intro, *sections]) + "\n"


def missing_descriptions() -> list[str]:
    """`Model.field` of every field without a docstring: the reference would leave it unexplained."""
    models: dict[str, type[BaseModel]] = {"PipelineSpec": PipelineSpec}
    _collect(PipelineSpec, models, skip_stages=True)
    for kind in KINDS.values():
        models[kind.spec.__name__] = kind.spec
        _collect(kind.spec, models)
    return [f"{m.__name__}.{name}" for m in models.values() for name, info in m.model_fields.items()
            if not info.description and name != "kind"]


def _section(title: str, model: type[BaseModel], anchor: str, stage: bool) -> str:
    doc = " ".join((model.__doc__ or "").split())
    header = "| field | type | default | hash | description |\n| --- | --- | --- | --- | --- |" if stage else \
        "| field | type | default | description |\n| --- | --- | --- | --- |"
    rows = [_row(name, info, stage) for name, info in model.model_fields.items()
            if not (stage and name == "kind")]  # a kind's section title says it
    return "\n".join([f'<a id="{anchor}"></a>', f"#### {title}", "", doc, "", header, *rows])


def _row(name: str, info: FieldInfo, stage: bool) -> str:
    cells = [f"`{name}`", _type(info.annotation) + _bounds(info), _default(info)]
    if stage:
        cells.append(_HASHING[hashing_of(info)])
    cells.append(" ".join((info.description or "").split()).replace("|", "\\|"))
    return "| " + " | ".join(cells) + " |"


def _type(annotation) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is type(None):
        return "null"
    if origin is Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin is typing.Annotated:
        return _type(args[0])
    if origin in (Union, types.UnionType):
        return " \\| ".join(_type(a) for a in args)
    if origin in (list, tuple):
        return f"list[{', '.join(_type(a) for a in args if a is not Ellipsis)}]"
    if origin is dict:
        return f"map[{_type(args[0])}, {_type(args[1])}]"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return f"[{annotation.__name__}](#{_anchor(annotation)})"
    return getattr(annotation, "__name__", str(annotation))


def _bounds(info: FieldInfo) -> str:
    found = [f"{sign} {getattr(m, type(m).__name__.lower())}" for m in info.metadata
             for cls, sign in _BOUNDS if isinstance(m, cls)]
    return f" ({', '.join(found)})" if found else ""


def _default(info: FieldInfo) -> str:
    if info.is_required():
        return "required"
    value: Any = info.get_default(call_default_factory=True)
    if value is PydanticUndefined:
        return "required"
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    return "`" + json.dumps(to_jsonable_python(value)) + "`"


def _collect(model: type[BaseModel], found: dict[str, type[BaseModel]], skip_stages: bool = False) -> None:
    """Every model nested in `model`'s fields, recursively (the stages themselves have sections)."""
    for name, info in model.model_fields.items():
        if skip_stages and name == "stages":
            continue
        for nested in _models_in(info.annotation):
            if nested.__name__ not in found:
                found[nested.__name__] = nested
                _collect(nested, found)


def _models_in(annotation) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _in_a_stage(model: type[BaseModel]) -> bool:
    """Whether the model's fields are classified (a stage's part), so its table has the hash column."""
    return any(hashing_of(info) for info in model.model_fields.values())


def _anchor(model: type[BaseModel]) -> str:
    return f"model-{model.__name__.lower()}"


def readme_with_reference(readme: str) -> str:
    """`readme` with the text between the markers replaced by the generated reference."""
    if START not in readme or END not in readme:
        raise ValueError(f"README has no {START} ... {END} markers to write the reference between")
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{pipeline_reference()}{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", metavar="README", help="replace the reference between the markers in this file")
    args = parser.parse_args(argv)
    if not args.write:
        sys.stdout.write(pipeline_reference())
        return 0
    with open(args.write) as f:
        text = f.read()
    with open(args.write, "w") as f:
        f.write(readme_with_reference(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
