"""The pipeline file: pydantic models are the single source of truth, YAML their serialization.

Every model forbids unknown keys, and `load_spec` reports every problem at once, each with its
field path (`stages.corpus.seq_len: ...`): pydantic's field errors plus the cross-stage checks
(names, references, cycles), which run on the raw document so they are reported even when some
field elsewhere is also wrong.

Each stage kind lists the fields that reference other stages in `REFERENCES` (field -> the kinds
it may name); the DAG is derived from them.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
import types
import typing
from typing import Annotated, ClassVar, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from jobs.preprocess import PreprocessSpec
from jobs.sources import SourceSpec
from jobs.text import NormalizeSpec
from jobs.train_spec import TrainSpec
from orchestrator.errors import SpecError

PIPELINE_NAME = re.compile(r"[a-z0-9]+(-[a-z0-9]+)*")
STAGE_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")


class LocalPath(BaseModel):
    """A directory on the driver's disk, instead of a stage's output."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str
    """Local directory (relative to the current directory)."""


class TokenizerStage(BaseModel):
    """Trains a byte-level BPE on a sample of `source`, or adopts the tokenizer at `path`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    REFERENCES: ClassVar[dict[str, tuple[str, ...]]] = {}

    kind: Literal["tokenizer"]
    source: SourceSpec | None = None
    """The corpus to train on (give this or `path`)."""
    path: str | None = None
    """A local Hugging Face tokenizer directory to adopt instead of training (give this or `source`)."""
    normalize: NormalizeSpec = NormalizeSpec()
    """Normalization of the training sample; keep it equal to the preprocess stage's."""
    vocab_size: int = Field(8192, ge=258, le=1 << 20)
    """Vocabulary size including the 256 byte tokens and the special tokens."""
    min_frequency: int = Field(2, ge=1)
    """Minimum count of a pair to be merged."""
    sample_mb: float = Field(64.0, gt=0)
    """MB of text sampled evenly across the corpus to train on."""

    @model_validator(mode="after")
    def _source_or_path(self):
        if (self.source is None) == (self.path is None):
            raise ValueError("give exactly one of `source` (train a tokenizer) or `path` (adopt a local one)")
        return self


class PreprocessStage(PreprocessSpec):
    """Cleans, dedups, tokenizes and packs `source` into fixed-length sequences on Ray workers."""

    REFERENCES: ClassVar[dict[str, tuple[str, ...]]] = {"tokenizer": ("tokenizer",)}

    kind: Literal["preprocess"]
    source: SourceSpec
    """The corpus."""
    tokenizer: str | LocalPath
    """A tokenizer stage's name, or {path: DIR} for a local Hugging Face tokenizer."""

    @field_validator("tokenizer", mode="before")
    @classmethod
    def _stage_or_path(cls, value):
        # Validated here rather than as a plain union, whose errors name pydantic's members.
        if isinstance(value, dict):
            return LocalPath.model_validate(value)
        if not isinstance(value, str):
            raise ValueError("give a tokenizer stage's name or {path: DIR}")
        return value


class PretrainStage(TrainSpec):
    """Trains a model from scratch on a preprocess stage's sequences with DeepSpeed ZeRO on Ray Train."""

    REFERENCES: ClassVar[dict[str, tuple[str, ...]]] = {"data": ("preprocess",)}
    NOT_HASHED: ClassVar[set[str]] = {"max_failures"}

    kind: Literal["pretrain"]
    data: str
    """The preprocess stage whose train split to train on."""
    num_workers: int = Field(2, ge=1)
    """Training workers (one per GPU, or CPU processes with gloo)."""
    use_gpu: bool = False
    """One GPU per worker, NCCL and bf16; otherwise CPU workers with gloo and fp32."""
    cpus_per_worker: float = Field(1.0, gt=0)
    """CPUs reserved for each worker."""
    max_failures: int = Field(2, ge=0)
    """Worker-group restarts allowed; each resumes from the newest committed checkpoint."""
    global_batch: int | None = Field(None, ge=1)
    """Sequences per optimizer step; sets grad_accum = global_batch / (micro_batch x num_workers)."""

    @model_validator(mode="after")
    def _batch_divides(self):
        if self.global_batch is not None:
            per_pass = self.micro_batch * self.num_workers
            if self.global_batch % per_pass:
                raise ValueError(f"global_batch {self.global_batch} does not divide by micro_batch {self.micro_batch} x "
                                 f"num_workers {self.num_workers} = {per_pass}; use a multiple of {per_pass}")
            if "grad_accum" in self.model_fields_set and self.grad_accum != self.global_batch // per_pass:
                raise ValueError(f"grad_accum {self.grad_accum} contradicts global_batch {self.global_batch} "
                                 f"(= {self.global_batch // per_pass} x {per_pass}); give one of them")
            object.__setattr__(self, "grad_accum", self.global_batch // per_pass)  # frozen: derived once, here
        return self


Stage = Annotated[Union[TokenizerStage, PreprocessStage, PretrainStage], Field(discriminator="kind")]
KINDS: dict[str, type[BaseModel]] = {"tokenizer": TokenizerStage, "preprocess": PreprocessStage,
                                     "pretrain": PretrainStage}


class PipelineSpec(BaseModel):
    """One pipeline: named stages whose references form a DAG."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    """Pipeline name: lowercase letters, digits and dashes."""
    storage: str = "file://./.orchestrator"
    """Where outputs go: file://DIR or s3://bucket/prefix. `--storage` overrides it."""
    stages: dict[str, Stage] = Field(min_length=1)
    """The stages by name; order does not matter, references decide it."""

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
        """field -> referenced stage name, for the references that name a stage."""
        stage = self.stages[name]
        refs = {field: getattr(stage, field) for field in type(stage).REFERENCES}
        return {field: value for field, value in refs.items() if isinstance(value, str)}

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
        """Identifies the pipeline's content (not where it is stored)."""
        body = json.dumps(self.model_dump(mode="json", exclude={"storage"}), sort_keys=True)
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
    if problems:
        raise SpecError(source, problems)
    return spec


def _valid_stages(stages) -> dict[str, BaseModel]:
    """The stages that validate on their own, when the file as a whole does not."""
    valid = {}
    for name, raw in (stages.items() if isinstance(stages, dict) else ()):
        model = KINDS.get(raw.get("kind")) if isinstance(raw, dict) else None
        try:
            valid[name] = model.model_validate(raw) if model else None
        except ValidationError:
            continue
    return {name: stage for name, stage in valid.items() if stage is not None}


def _cross_stage_problems(stages: dict[str, BaseModel]) -> list[str]:
    """Checks that need two stages at once, so that they fail at validate, before any GPU time."""
    problems = []
    for name, stage in stages.items():
        data = stages.get(getattr(stage, "data", None) or "")
        if isinstance(stage, PretrainStage) and isinstance(data, PreprocessStage):
            if data.seq_len > stage.model.max_position_embeddings:
                problems.append(f"stages.{name}.model.max_position_embeddings: {stage.model.max_position_embeddings} is "
                                f"shorter than stages.{stage.data}.seq_len {data.seq_len}; raise it or shorten seq_len")
    return problems


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
        model = KINDS.get(raw.get("kind")) if isinstance(raw, dict) else None
        for field, kinds in (model.REFERENCES if model else {}).items():
            target = raw.get(field)
            if not isinstance(target, str):
                continue
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
    path = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in loc).replace(".[", "[") or "<top>"
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
    shown = "" if isinstance(value, (dict, list)) else f" (got {value!r})"
    return f"{path}: {message}{shown}"


def _model_at(loc: list) -> type[BaseModel] | None:
    """The model class that holds the last element of `loc` (for listing its valid fields)."""
    model: type[BaseModel] | None = PipelineSpec
    i = 0
    while model is not None and i < len(loc) - 1:
        if model is PipelineSpec and loc[i] == "stages":
            model = KINDS.get(loc[i + 2]) if len(loc) > i + 3 else None
            i += 3
            continue
        field = model.model_fields.get(loc[i])
        model = _first_model(field.annotation) if field else None
        i += 1
    return model


def _first_model(annotation) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (Union, types.UnionType):
        for arg in typing.get_args(annotation):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                return arg
    return None
