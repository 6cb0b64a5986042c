"""The evaluate kind: models (stages, checkpoints, local directories) on the same measures, and
with `follow` every checkpoint of a training stage while it trains."""

from __future__ import annotations

import os
from typing import Annotated, Literal, Mapping, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Tag, model_validator

from jobs.evaluate import TaskSpec
from jobs.fields import operational, output
from jobs.harness import LmEvalTaskSpec, task_problems
from orchestrator.kinds.base import LocalPath, StageKind, StageResults, StageSpec, file_problems
from orchestrator.kinds.preprocess import PreprocessStage
from orchestrator.kinds.training import TrainStage, checkpoint_problems, max_positions_of


class ModelRef(BaseModel):
    """One committed checkpoint of a training stage."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    stage: str = output()
    """The training stage."""
    step: int = output(ge=1)
    """The checkpoint's step (it must be committed and kept by retention)."""


class AdapterRef(BaseModel):
    """A LoRA fine-tuning stage's adapter, loaded unmerged on the model the stage started from, as
    a server would load it (the stage's own name evaluates its merged export)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    stage: str = output()
    """A finetune stage with `lora`."""
    adapter: Literal[True] = output()
    """`true`: its `hf-adapter/` export."""


def _model_entry_kind(value) -> str:
    if isinstance(value, dict):
        return "path" if value.get("path") else "adapter" if "adapter" in value else "checkpoint"
    if isinstance(value, BaseModel):
        return {LocalPath: "path", AdapterRef: "adapter"}.get(type(value), "checkpoint")
    return "stage"  # anything else is validated as a stage name, whose error says it wants a string


# An evaluate stage's model: dispatched on its shape, so that a mistake is reported against the one
# form the user meant, at its list index, rather than against every member of a union.
ModelEntry = Annotated[Union[Annotated[str, Tag("stage")], Annotated[ModelRef, Tag("checkpoint")],
                             Annotated[LocalPath, Tag("path")], Annotated[AdapterRef, Tag("adapter")]],
                       Discriminator(_model_entry_kind)]


def _task_kind(value) -> str | None:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return {"multiple_choice": "native", "exact_match": "native", "lm_eval": "lm_eval"}.get(str(kind))


# An evaluate stage's task, dispatched on `type`: the light native tasks of jobs.evaluate, or
# lm-evaluation-harness run by lm-eval itself (jobs.harness); a bad `type` is one error naming all.
EvalTask = Annotated[Union[Annotated[TaskSpec, Tag("native")], Annotated[LmEvalTaskSpec, Tag("lm_eval")]],
                     Discriminator(_task_kind, custom_error_type="task_type",
                                   custom_error_message="give each task a `type`: multiple_choice, exact_match "
                                                        "(native, from a JSON-lines file) or lm_eval "
                                                        "(lm-evaluation-harness)")]
UNION_MEMBERS = {"checkpoint": ModelRef, "path": LocalPath, "adapter": AdapterRef, "native": TaskSpec,
                 "lm_eval": LmEvalTaskSpec}
"""The tags of the evaluate stage's tagged unions -> their model members (a stage name is a str)."""
UNION_TAGS = {"stage", *UNION_MEMBERS}
"""Every tag: error paths leave them out."""


class EvaluateStage(StageSpec):
    """Evaluates models: perplexity on a preprocess stage's held-out split, multiple-choice tasks by
    log-likelihood, exact match on short generations; a comparison table in the run record."""

    kind: Literal["evaluate"] = output()
    models: list[ModelEntry] = output([])
    """Training stages (their exports), {stage, step} checkpoints, {path: HF_DIR} directories, or
    {stage, adapter: true}: a LoRA stage's adapter on its base model."""
    follow: str | None = output(None)
    """A training stage whose every checkpoint is evaluated as it gets committed, while it trains."""
    data: str | None = output(None)
    """A preprocess stage: perplexity on its validation split."""
    tasks: list[EvalTask] = output([])
    """Native multiple-choice and exact-match tasks from local JSON-lines files (the light default),
    and lm-evaluation-harness tasks (`type: lm_eval`), all in `results` under their names."""
    max_val_sequences: int = output(256, ge=1)
    """Validation sequences scored for perplexity, at most."""
    batch_size: int = output(8, ge=1)
    """Sequences per forward pass."""
    cpus: float = operational(1.0, gt=0)
    """CPUs reserved while evaluating."""
    use_gpu: bool = output(False)
    """Evaluate on one GPU."""

    @model_validator(mode="after")
    def _something_to_measure(self):
        if self.data is None and not self.tasks:
            raise ValueError("nothing to evaluate: give `data` (perplexity) and/or `tasks`")
        if not self.models and self.follow is None:
            raise ValueError("no model to evaluate: give `models` and/or `follow` (a training stage)")
        names = [t.name for t in self.tasks]
        if len(set(names)) < len(names):
            raise ValueError(f"task names must differ: {names}")
        labels = [model_label(m) for m in self.models]
        if len(set(labels)) < len(labels):
            raise ValueError(f"two models would share a results label: {labels}; rename a directory or list each model once")
        return self

    def bundles(self) -> list[dict[str, float]]:
        return [{"CPU": self.cpus, **({"GPU": 1.0} if self.use_gpu else {})}]

    def problems(self, name: str, stages: Mapping[str, StageSpec]) -> list[str]:
        from jobs.evaluate import load_task  # reads the files: only when validating a whole pipeline

        problems = []
        data = stages.get(self.data or "")
        if isinstance(data, PreprocessStage):
            targets = {ref.stage if isinstance(ref, (ModelRef, AdapterRef)) else ref for ref in self.models}
            targets.add(self.follow)
            short = sorted(f"{t} ({max_positions_of(stages, t)})" for t in targets if isinstance(t, str)
                           and (max_positions_of(stages, t) or data.seq_len) < data.seq_len)
            if short:
                problems.append(f"stages.{name}.data: stages.{self.data}.seq_len {data.seq_len} exceeds the "
                                f"max_position_embeddings of {', '.join(short)}; evaluate on a preprocess stage "
                                "with shorter sequences")
        for i, m in enumerate(self.models):
            if isinstance(m, ModelRef):
                problems += checkpoint_problems(f"stages.{name}.models[{i}].step", stages, m.stage, m.step)
            target = stages.get(m.stage) if isinstance(m, AdapterRef) else None
            if isinstance(target, TrainStage) and getattr(target, "lora", None) is None:  # a pretrain stage has none
                problems.append(f"stages.{name}.models[{i}].adapter: {m.stage} trains no adapter (it has no `lora`); "
                                f"name the stage itself ({m.stage}) to evaluate its model")
        for i, task in enumerate(self.tasks):
            if isinstance(task, LmEvalTaskSpec):
                problems += task_problems(f"stages.{name}.tasks[{i}]", task)
            else:
                problems += file_problems(f"stages.{name}.tasks[{i}]", load_task, task)
        return problems


def model_label(ref) -> str:
    """How an evaluated model is named in results: `stage`, `stage@step`, `stage.adapter`, or a
    directory's name."""
    if isinstance(ref, ModelRef):
        return f"{ref.stage}@{ref.step}"
    if isinstance(ref, AdapterRef):
        return f"{ref.stage}.adapter"
    if isinstance(ref, LocalPath):
        return os.path.basename(os.path.abspath(ref.path))
    return ref


class Perplexity(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    loss: float
    """Mean next-token loss over the scored validation tokens."""
    perplexity: float
    """exp(loss)."""
    num_tokens: int
    """Validation tokens scored."""


class ModelEvaluation(BaseModel):
    """One model's results (`results/<label>.json`, and under `results` in the record)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    perplexity: Perplexity | None = None
    """On the `data` stage's validation split; None without `data`."""
    tasks: dict[str, dict[str, int | float]] = {}
    """Task name -> its metrics (acc and acc_norm, or exact_match; num_examples)."""


class EvaluateResults(StageResults):
    results: dict[str, ModelEvaluation] = {}
    """Model label (`stage`, `stage@step`, `stage.adapter`, a directory's name) -> its evaluation."""


def evaluation_summary(result: ModelEvaluation | dict) -> str:
    """One model's evaluation in a few words: perplexity and each task's main metric."""
    result = ModelEvaluation.model_validate(result) if isinstance(result, dict) else result
    parts = [f"perplexity {result.perplexity.perplexity:.2f}"] if result.perplexity else []
    for name, metrics in result.tasks.items():
        main = main_metric(metrics)
        if main:
            parts.append(f"{name} {main} {metrics[main]:.3f}")
    return ", ".join(parts)


def main_metric(metrics: Mapping[str, int | float]) -> str | None:
    """A task's headline metric: acc, else exact_match, else (an lm-eval task's) its first metric
    that is not a standard error, e.g. `exact_match,strict-match`; None when it has none."""
    return next((k for k in ("acc", "exact_match") if k in metrics), None) or next(
        (k for k in metrics if k != "num_examples" and "_stderr" not in k), None)


def _summary(r: EvaluateResults) -> str:
    return "; ".join(f"{label}: {evaluation_summary(result)}" for label, result in r.results.items())


KIND = StageKind("evaluate", EvaluateStage, version=1, run="orchestrator.stages.evaluate:run",
                 references={"models": ("pretrain", "finetune"), "data": ("preprocess",),
                             "follow": ("pretrain", "finetune")},
                 beside=frozenset({"follow"}), results=EvaluateResults, summarize=_summary)
