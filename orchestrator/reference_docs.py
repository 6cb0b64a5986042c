"""The pipeline file's reference, generated from the pydantic models so that it cannot drift.

    python -m orchestrator.reference_docs                    # print it (markdown)
    python -m orchestrator.reference_docs --write README.md  # replace README's marked region

One section for the file's top level, one per stage kind (from the registry), then one per model
nested in them, found by walking the fields' annotations. Each field's row comes from the model:
its type and constraints, its default, whether it is hashed (`jobs.fields`: an output field changes
the stage's output and hash; an operational one does not), and the docstring under it. A field
without a docstring is listed by `undocumented()`; a test keeps that list empty.
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
import types
import typing
from typing import Any, Literal, Union

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from jobs.fields import hashing_of, local_kind

START = "<!-- pipeline-reference:start -->"
END = "<!-- pipeline-reference:end -->"
REGENERATE = "python -m orchestrator.reference_docs --write README.md"


def _sources() -> tuple[type[BaseModel], dict[str, tuple[type[BaseModel], dict[str, tuple[str, ...]]]]]:
    """The top-level model and the stage kinds: kind name -> (spec model, reference fields -> the
    kinds they may name). The one place that knows where they come from."""
    from orchestrator.kinds import KINDS
    from orchestrator.spec import PipelineSpec

    return PipelineSpec, {name: (kind.spec, dict(kind.references)) for name, kind in KINDS.items()}


# --- which models, in which order --------------------------------------------------------------

def _models_in(annotation) -> list[type[BaseModel]]:
    """The BaseModel classes an annotation names, at any depth, in order."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found = []
    for arg in typing.get_args(annotation):
        for model in _models_in(arg):
            if model not in found:
                found.append(model)
    return found


def _nested_models(roots: list[type[BaseModel]], skip: set[type[BaseModel]]) -> list[type[BaseModel]]:
    """Every model nested in `roots` (depth first, in field order), except those in `skip`."""
    found: list[type[BaseModel]] = []

    def visit(model: type[BaseModel]) -> None:
        for info in model.model_fields.values():
            for inner in _models_in(info.annotation):
                if inner not in skip and inner not in found:
                    found.append(inner)
                    visit(inner)

    for root in roots:
        visit(root)
    return found


def _field_order(model: type[BaseModel]) -> list[str]:
    """`kind` first, then the fields the class itself declares, then those it inherits."""
    names = list(model.model_fields)
    own = [n for n in inspect.get_annotations(model) if n in model.model_fields]  # as declared
    first = ["kind"] if "kind" in names else []
    return first + [n for n in own if n not in first] + [n for n in names if n not in own and n not in first]


# --- rendering ----------------------------------------------------------------------------------

# Explicit anchors, prefixed so that they never collide with the ids of the README's headings.
FILE_ANCHOR = "ref-file"


def _kind_anchor(kind: str) -> str:
    return f"ref-kind-{kind}"


def _model_anchor(model: type[BaseModel]) -> str:
    return f"ref-{model.__name__.lower()}"


def _heading(anchor: str, title: str) -> list[str]:
    return [f'<a id="{anchor}"></a>', f"#### {title}", ""]


def _code(text: str) -> str:
    return f"`{text}`"


def _render_type(annotation, links: dict[type, str], stage_kinds: tuple[str, ...] | None) -> str:
    """A readable type: `int`, `str` \\| `null`, list[[`TaskSpec`](#taskspec)], `jsonl` \\| `json`;
    in a reference field, `str` is the name of a stage of the kinds it may name."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _render_type(args[0], links, stage_kinds)
    if origin in (Union, types.UnionType):
        return " \\| ".join(_render_type(arg, links, stage_kinds) for arg in args)
    if origin is Literal:
        return " \\| ".join(_code(_flow(arg)) for arg in args)
    if annotation is type(None):
        return _code("null")
    if isinstance(annotation, type) and annotation in links:
        return links[annotation]
    if annotation is str and stage_kinds:
        return f"a {' or '.join(_code(k) for k in stage_kinds)} stage's name"
    if origin in (list, tuple, dict):
        inner = ", ".join("..." if arg is Ellipsis else _render_type(arg, links, stage_kinds) for arg in args)
        return f"{origin.__name__}[{inner}]"
    if isinstance(annotation, type):
        return _code(annotation.__name__)
    return _code(str(annotation).replace("typing.", ""))


_BOUNDS = ((annotated_types.Ge, "ge", "≥"), (annotated_types.Gt, "gt", ">"),
           (annotated_types.Le, "le", "≤"), (annotated_types.Lt, "lt", "<"))


def _constraints(info: FieldInfo) -> list[str]:
    shown = []
    for meta in info.metadata:
        for cls, attr, sign in _BOUNDS:
            if isinstance(meta, cls):
                shown.append(f"{sign} {_flow(getattr(meta, attr))}")
        if isinstance(meta, annotated_types.MinLen):
            shown.append(f"at least {meta.min_length}")
        if isinstance(meta, annotated_types.MaxLen):
            shown.append(f"at most {meta.max_length}")
        pattern = getattr(meta, "pattern", None)
        if isinstance(pattern, str):
            shown.append(f"matching {_code(pattern)}")
    return shown


def _flow(value: Any) -> str:
    """A value as YAML flow style: null, true, 8192, auto, [0.9, 0.95], {H100: 1}."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_flow(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_flow(v)}" for k, v in value.items()) + "}"
    if isinstance(value, str):
        return value if value and re.fullmatch(r"[A-Za-z0-9_./:*+-]+", value) else repr(value)
    return repr(value) if isinstance(value, float) else str(value)


def _default(info: FieldInfo) -> str:
    if info.is_required():
        return "required"
    value = info.get_default(call_default_factory=True)
    if isinstance(value, BaseModel) and value == type(value)():
        return "`{}` (its defaults)"
    return _code(_flow(value))


def _hashed(info: FieldInfo) -> str:
    return {"output": "hashed", "operational": "operational", "reference": "hashed (via the stage)"}.get(
        hashing_of(info), "-")


def _one_line(text: str | None) -> str:
    return " ".join((text or "").split()).replace("|", "\\|")


def _description(name: str, info: FieldInfo, kind: str | None) -> str:
    if name == "kind" and kind is not None and not info.description:
        return f"Selects this kind: `kind: {kind}`."
    return _one_line(info.description)


def _table(model: type[BaseModel], links: dict[type, str], kind: str | None = None,
           references: dict[str, tuple[str, ...]] | None = None) -> list[str]:
    infos = model.model_fields
    with_hashing = any(hashing_of(info) for info in infos.values())
    header = ["field", "type", "default"] + (["hashed?"] if with_hashing else []) + ["description"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for name in _field_order(model):
        info = infos[name]
        shown = _render_type(info.annotation, links, (references or {}).get(name))
        local = local_kind(info)
        if local:
            shown += f" (local {local})"
        bounds = _constraints(info)
        if bounds:
            shown += ", " + ", ".join(bounds)
        cells = [_code(name), shown, _default(info)] + ([_hashed(info)] if with_hashing else []) \
            + [_description(name, info, kind)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _class_doc(model: type[BaseModel]) -> str | None:
    doc = model.__dict__.get("__doc__")
    return " ".join(doc.split()) if doc else None


# --- the reference ------------------------------------------------------------------------------

def _layout():
    top, kinds = _sources()
    specs = {spec: name for name, (spec, _) in kinds.items()}
    nested = _nested_models([top] + list(specs), skip={top, *specs})
    links: dict[type, str] = {top: f"[`{top.__name__}`](#{FILE_ANCHOR})"}
    links.update({spec: f"[`{name}`](#{_kind_anchor(name)})" for spec, name in specs.items()})
    links.update({m: f"[`{m.__name__}`](#{_model_anchor(m)})" for m in nested})
    return top, kinds, nested, links


def pipeline_reference() -> str:
    """The markdown reference of every field of the pipeline file (deterministic)."""
    top, kinds, nested, links = _layout()
    out = [f"<!-- Generated from the pydantic models; do not edit by hand. Regenerate: {REGENERATE} -->",
           "",
           ("Every field of the pipeline file, from the models that validate it. *hashed*: part of the "
            "stage's hash, so changing it reruns the stage (and the stages after it); *operational*: only "
            "how the stage runs, so changing it reuses the committed output. A model-typed field takes a "
            "mapping of that model's fields."),
           "", *_heading(FILE_ANCHOR, "The file (top level)")]
    out += [_class_doc(top) or "", "", *_table(top, links), ""]
    for name, (spec, references) in kinds.items():
        out += [*_heading(_kind_anchor(name), f"`kind: {name}`"), _class_doc(spec) or "", "",
                *_table(spec, links, name, references), ""]
    for model in nested:
        out += [*_heading(_model_anchor(model), f"`{model.__name__}`"), _class_doc(model) or "", "",
                *_table(model, links), ""]
    text = "\n".join(out)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def undocumented() -> list[str]:
    """`Model.field` of every field without a docstring, and `Model` of every model without one,
    among the models the reference shows (a kind's `kind:` field is described by the reference)."""
    top, kinds, nested, _ = _layout()
    entries: list[tuple[type[BaseModel], str | None]] = [(top, None)]
    entries += [(spec, name) for name, (spec, _) in kinds.items()] + [(m, None) for m in nested]
    return missing_docs(entries)


def missing_docs(entries: list[tuple[type[BaseModel], str | None]]) -> list[str]:
    """What `undocumented` reports, for (model, its kind name or None) entries."""
    missing = []
    for model, kind in entries:
        if not _class_doc(model):
            missing.append(model.__name__)
        missing += [f"{model.__name__}.{name}" for name, info in model.model_fields.items()
                    if not _description(name, info, kind)]
    return missing


missing_descriptions = undocumented  # the name the first version had


# --- README --------------------------------------------------------------------------------------

def marked_region(text: str) -> str:
    """What README holds between the markers (raises ValueError without them)."""
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"no {START} ... {END} region")
    return text[start + len(START):end].strip("\n") + "\n"


def replace_region(text: str, reference: str) -> str:
    marked_region(text)
    start, end = text.find(START) + len(START), text.find(END)
    return text[:start] + "\n" + reference + text[end:]


def readme_with_reference(readme: str) -> str:
    """`readme` with the region between the markers replaced by the generated reference."""
    return replace_region(readme, pipeline_reference())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.reference_docs", description=__doc__.splitlines()[0])
    parser.add_argument("--write", metavar="FILE", help=f"replace the region between {START} and {END} in FILE")
    args = parser.parse_args(argv)
    reference = pipeline_reference()
    if not args.write:
        sys.stdout.write(reference)
        return 0
    with open(args.write, encoding="utf-8") as f:
        text = f.read()
    try:
        updated = replace_region(text, reference)
    except ValueError as e:
        print(f"{args.write}: {e}", file=sys.stderr)
        return 2
    if updated != text:
        with open(args.write, "w", encoding="utf-8") as f:
            f.write(updated)
    print(f"{args.write}: pipeline reference {'updated' if updated != text else 'already up to date'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
