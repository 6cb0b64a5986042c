"""The pipeline file: pydantic models are the single source of truth, YAML their serialization.

Every model forbids unknown keys, and `load_spec` reports every problem at once, each with its
field path (`stages.corpus.seq_len: ...`): pydantic's field errors plus the cross-stage checks
(names, references, cycles), which run on the raw document so they are reported even when some
field elsewhere is also wrong.

The stage kinds are in orchestrator/kinds (the registry); each declares the fields that reference
other stages (field -> the kinds it may name), and the DAG is derived from them.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
import types
import typing
from typing import Annotated, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from jobs.fields import output_fields
from orchestrator.errors import SpecError
from orchestrator.kinds import KINDS
from orchestrator.kinds.base import LocalPath, StageKind, StageSpec
from orchestrator.kinds.evaluate import UNION_MEMBERS, UNION_TAGS, EvaluateStage, ModelRef, model_label
from orchestrator.kinds.finetune import FinetuneStage
from orchestrator.kinds.preprocess import PreprocessStage
from orchestrator.kinds.pretrain import PretrainStage
from orchestrator.kinds.tokenizer import TokenizerStage
from orchestrator.kinds.training import TrainStage, checkpoint_steps
from orchestrator.lease import DEFAULT_TIMEOUT_S as DEFAULT_LEASE_TIMEOUT_S
from orchestrator.schedule_spec import GateSpec, ScheduleSpec
from orchestrator.tracking_spec import TrackingSpec, tracking_problems

__all__ = ["EvaluateStage", "FinetuneStage", "LocalPath", "ModelRef", "PipelineSpec", "PreprocessStage",
           "PretrainStage", "TokenizerStage", "TrainStage", "checkpoint_steps", "load_spec", "model_label", "parse_spec"]

PIPELINE_NAME = re.compile(r"[a-z0-9]+(-[a-z0-9]+)*")
STAGE_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")


# Every stage kind's spec, dispatched on `kind:`; the kinds themselves live in orchestrator/kinds.
Stage = Annotated[Union[tuple(kind.spec for kind in KINDS.values())], Field(discriminator="kind")]


def references(kind: StageKind, raw_or_stage) -> list[tuple[str, str]]:
    """(field path, stage name) of every reference to another stage, e.g. ("models[1]", "sft").

    Works on a validated stage and on its raw mapping alike, so that the graph is checked even
    when some field elsewhere does not validate.
    """
    get = raw_or_stage.get if isinstance(raw_or_stage, dict) else lambda f: getattr(raw_or_stage, f, None)
    refs = []
    for field in kind.references:
        value = get(field)
        items = [(f"{field}[{i}]", v) for i, v in enumerate(value)] if isinstance(value, list) else [(field, value)]
        for path, item in items:
            if isinstance(item, (dict, BaseModel)):  # {stage, step} of evaluate, {stage, weight} of a mixture
                item = item.get("stage") if isinstance(item, dict) else getattr(item, "stage", None)
            if isinstance(item, str):
                refs.append((path, item))
    return refs


class PipelineSpec(BaseModel):
    """One pipeline: named stages whose references form a DAG."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    name: str
    """Pipeline name: lowercase letters, digits and dashes."""
    storage: str = "file://./.orchestrator"
    """Where outputs go: file://DIR or s3://bucket/prefix. `--storage` overrides it."""
    stages: dict[str, Stage] = Field(min_length=1)
    """The stages by name; order does not matter, references decide it."""
    schedule: ScheduleSpec | None = None
    """When `orchestrator schedule` runs it (cron); see orchestrator/schedule_spec.py."""
    gate: GateSpec | None = None
    """The regression gate: which runs move the `latest` / `best` model aliases."""
    lease_timeout_s: float = Field(DEFAULT_LEASE_TIMEOUT_S, ge=5)
    """While a run computes a stage it holds a lease on its output, so that another run of the same
    stage waits for it; after this many seconds without the holder's heartbeat (it died), a waiting
    run takes the stage over and resumes from its commits. Not part of any hash."""
    tracking: TrackingSpec | None = None
    """Where runs are also tracked (MLflow, Weights & Biases); off when absent. Not part of any hash."""

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        if not PIPELINE_NAME.fullmatch(name):
            raise ValueError("use lowercase letters, digits and single dashes, e.g. nightly-llm")
        return name

    @field_validator("storage")
    @classmethod
    def _storage_scheme(cls, uri: str) -> str:
        if not uri.startswith(("file://", "s3://")):
            raise ValueError("not a storage URI; use file://DIR or s3://bucket/prefix")
        return uri

    def upstream(self, name: str) -> dict[str, str]:
        """field path -> referenced stage name, for the references that name a stage."""
        stage = self.stages[name]
        return dict(references(KINDS[stage.kind], stage))

    def topological_order(self) -> list[str]:
        order: list[str] = []
        def visit(name: str) -> None:
            if name not in order:
                for ref in self.upstream(name).values():
                    visit(ref)
                order.append(name)
        for name in sorted(self.stages):
            visit(name)
        return order

    def spec_hash(self) -> str:
        """Identifies what the pipeline computes: not where it is stored, when it is scheduled, or
        its stages' operational fields, so that a run resumed after such a change is accepted."""
        body = json.dumps({"name": self.name, "stages": {n: output_fields(s) for n, s in self.stages.items()},
                           "gate": self.gate.model_dump(mode="json") if self.gate else None}, sort_keys=True)
        return hashlib.sha256(body.encode()).hexdigest()


def load_spec(path: str) -> PipelineSpec:
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise SpecError(path, [f"cannot read the pipeline file: {e.strerror}"]) from None
    return parse_spec(text, path)


def parse_spec(text: str, source: str = "<pipeline>") -> PipelineSpec:
    try:
        duplicates = _duplicate_keys(yaml.compose(text, Loader=yaml.SafeLoader))
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SpecError(source, [f"not valid YAML: {e}"]) from None
    if not isinstance(raw, dict):
        raise SpecError(source, ["the pipeline file must be a mapping with `name`, `storage` and `stages`"])
    problems = duplicates + _graph_problems(raw.get("stages"))
    try:
        spec = PipelineSpec.model_validate(raw)
    except ValidationError as e:
        problems = [_describe(err) for err in e.errors()] + problems
        spec = None
    problems += _cross_stage_problems(spec.stages if spec else _valid_stages(raw.get("stages")))
    if spec is not None and spec.gate is not None:
        problems += _gate_problems(spec.gate, spec.stages)
    if spec is not None and spec.tracking is not None:
        problems += tracking_problems(spec.tracking)
    if problems:
        raise SpecError(source, problems)
    return spec


def _gate_problems(gate: GateSpec, stages: dict[str, BaseModel]) -> list[str]:
    evaluated = stages.get(gate.stage)
    if not isinstance(evaluated, EvaluateStage):
        kinds = sorted(n for n, s in stages.items() if isinstance(s, EvaluateStage))
        return [f"gate.stage: {gate.stage!r} is not an evaluate stage; use one of {kinds}"]
    labels = [model_label(m) for m in evaluated.models]
    problems = []
    if gate.model not in labels or not isinstance(stages.get(gate.model), TrainStage):
        trained = [label for label in labels if isinstance(stages.get(label), TrainStage)]
        problems.append(f"gate.model: {gate.model!r} is not a training stage that {gate.stage} evaluates; use one of {trained}")
    for i, metric in enumerate(gate.metrics):
        model, task, _ = metric.name.split("/")
        tasks = ["perplexity"] * (evaluated.data is not None) + [t.name for t in evaluated.tasks]
        if model not in labels:
            problems.append(f"gate.metrics[{i}].name: {gate.stage} evaluates no model {model!r}; it evaluates {labels}")
        elif task not in tasks:
            problems.append(f"gate.metrics[{i}].name: {gate.stage} has no task {task!r}; it has {tasks}")
    return problems


def _valid_stages(stages) -> dict[str, BaseModel]:
    """The stages that validate on their own, when the file as a whole does not."""
    valid = {}
    for name, raw in (stages.items() if isinstance(stages, dict) else ()):
        kind = KINDS.get(raw.get("kind")) if isinstance(raw, dict) else None
        try:
            valid[name] = kind.spec.model_validate(raw) if kind else None
        except ValidationError:
            continue
    return {name: stage for name, stage in valid.items() if stage is not None}


def _cross_stage_problems(stages: dict[str, StageSpec]) -> list[str]:
    """Each stage's checks against the others and its files (each kind's `problems`)."""
    return [problem for name, stage in stages.items() for problem in stage.problems(name, stages)]


def _duplicate_keys(node, path: str = "") -> list[str]:
    """Keys given twice in one mapping, by field path (plain YAML silently keeps the last one)."""
    problems = []
    if isinstance(node, yaml.MappingNode):
        seen = set()
        for key_node, value_node in node.value:
            key = key_node.value
            where = f"{path}.{key}" if path else str(key)
            if key in seen:
                problems.append(f"{where}: duplicate key (line {key_node.start_mark.line + 1}); keep one")
            seen.add(key)
            problems += _duplicate_keys(value_node, where)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            problems += _duplicate_keys(item, f"{path}[{i}]")
    return problems


def _graph_problems(stages) -> list[str]:
    """Names, references and cycles, checked on the raw mapping."""
    if not isinstance(stages, dict):
        return []
    problems = []
    edges: dict[str, list[str]] = {}
    for name, raw in stages.items():
        if not isinstance(name, str) or not STAGE_NAME.fullmatch(name):
            problems.append(f"stages.{name}: invalid stage name; use lowercase letters, digits, '-' and '_'")
        kind = KINDS.get(raw.get("kind")) if isinstance(raw, dict) else None
        for field, target in (references(kind, raw) if kind else []):
            kinds = kind.references[field.split("[")[0]]
            target_kind = stages[target].get("kind") if isinstance(stages.get(target), dict) else None
            if target not in stages:
                problems.append(f"stages.{name}.{field}: {target!r} is not a stage; stages are: {', '.join(stages)}")
            elif target_kind not in kinds:
                problems.append(f"stages.{name}.{field}: {target!r} is a {target_kind} stage; it must name a {' or '.join(kinds)} stage")
            else:
                edges.setdefault(name, []).append(target)
    cycle = _find_cycle(edges)
    if cycle:
        problems.append(f"stages: a cycle {' -> '.join(cycle)}; a stage cannot depend on its own output")
    return problems


def _find_cycle(edges: dict[str, list[str]]) -> list[str] | None:
    state: dict[str, str] = {}
    def visit(node: str, path: list[str]) -> list[str] | None:
        if state.get(node) == "open":
            return path[path.index(node):] + [node]
        if state.get(node) == "done":
            return None
        state[node] = "open"
        for nxt in edges.get(node, []):
            found = visit(nxt, path + [node])
            if found:
                return found
        state[node] = "done"
        return None
    for node in sorted(edges):
        found = visit(node, [])
        if found:
            return found
    return None


def _describe(err: dict) -> str:
    loc = list(err["loc"])
    model = _model_at(loc)
    if len(loc) >= 3 and loc[0] == "stages" and loc[2] in KINDS:
        del loc[2]  # pydantic's discriminator tag: noise in a path the user reads
    tags = [p for i, p in enumerate(loc) if p in UNION_TAGS and i > 0 and isinstance(loc[i - 1], int)]
    loc = [p for i, p in enumerate(loc) if not (p in UNION_TAGS and i > 0 and isinstance(loc[i - 1], int))]
    if tags == ["stage"] and err["type"] == "string_type":
        return f"{_path(loc)}: give a training stage's name, {{stage: NAME, step: N}} or {{path: DIR}} (got {err.get('input')!r})"
    path = _path(loc)
    kind, value = err["type"], err.get("input")
    if kind == "extra_forbidden":
        fields = sorted(f for f in model.model_fields) if model else []
        close = difflib.get_close_matches(str(loc[-1]), fields, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ";"
        return f"{path}: unknown field{hint} valid fields: {', '.join(fields)}"
    if kind == "union_tag_invalid":
        return f"{path}.kind: {err['ctx']['tag']!r} is not a stage kind; choose one of: {', '.join(KINDS)}"
    if kind == "union_tag_not_found":
        return f"{path}: missing `kind`; choose one of: {', '.join(KINDS)}"
    if kind == "missing":
        return f"{path}: required field missing"
    message = err["msg"].removeprefix("Value error, ")
    quoted = isinstance(value, str) and repr(value) in message  # the validator already names it
    shown = "" if isinstance(value, (dict, list)) or quoted else f" (got {value!r})"
    return f"{path}: {message}{shown}"


def _path(loc: list) -> str:
    return ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in loc).replace(".[", "[") or "<top>"


def _model_at(loc: list) -> type[BaseModel] | None:
    """The model class that holds the last element of `loc` (for listing its valid fields)."""
    model: type[BaseModel] | None = PipelineSpec
    i = 0
    while model is not None and i < len(loc) - 1:
        if model is PipelineSpec and loc[i] == "stages":
            kind = KINDS.get(loc[i + 2]) if len(loc) > i + 3 else None
            model = kind.spec if kind else None
            i += 3
            continue
        if isinstance(loc[i], int):  # a list index: the same model
            i += 1
            continue
        if loc[i] in UNION_TAGS:  # the member of a tagged union that was validated
            model = UNION_MEMBERS.get(loc[i])
            i += 1
            continue
        field = model.model_fields.get(loc[i])
        model = _first_model(field.annotation) if field else None
        i += 1
    return model


def _first_model(annotation) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (Union, types.UnionType, list, typing.Annotated):
        for arg in typing.get_args(annotation):
            found = _first_model(arg)
            if found:
                return found
    return None
