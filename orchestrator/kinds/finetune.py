"""The finetune kind: the training loop again, from a trained model: supervised on prompt/response
pairs, or continued pretraining on a preprocess stage's sequences."""

from __future__ import annotations

import json
import os
from typing import Literal, Mapping

from pydantic import field_validator, model_validator

from jobs.fields import output
from jobs.lora import LoraSpec
from jobs.model import ModelSpec
from jobs.sft import SFTTaskSpec
from orchestrator.kinds.base import LocalPath, StageKind, StageSpec, file_problems, stage_or_path
from orchestrator.kinds.preprocess import PreprocessStage
from orchestrator.kinds.training import (
    DataSource,
    TrainResults,
    TrainStage,
    checkpoint_problems,
    data_stages,
    max_positions_of,
    mixture_problems,
    stage_or_mixture,
    training_summary,
)


class FinetuneStage(TrainStage):
    """Fine-tunes a trained model: supervised on prompt/response pairs (`task`), or continued
    pretraining on a preprocess stage's sequences (`data`); the same loop, checkpoints and export."""

    kind: Literal["finetune"] = output()
    init: str | LocalPath = output()
    """A training stage to start from (its export, or its checkpoint at `init_step`), or {path: HF_DIR}."""
    init_step: int | None = output(None, ge=1)
    """Start from this committed checkpoint step of `init` instead of its final export."""
    task: SFTTaskSpec | None = output(None)
    """Supervised fine-tuning data: a prompt/response JSON-lines file (give this or `data`)."""
    data: str | list[DataSource] | None = output(None)
    """Continued pretraining: a preprocess stage's sequences, or a mixture of them as a list of
    {stage, weight} (as pretrain's `data`; give this or `task`)."""
    lora: LoraSpec | None = output(None)
    """Train low-rank adapters (peft's LoRA) on the frozen `init` model instead of every weight
    (`lora: {}` takes the defaults); the stage exports the merged model under `hf/` as always, and
    the adapter alone under `hf-adapter/` (`PeftModel.from_pretrained` on the `init` model)."""
    steps: int = output(200, ge=1)
    """Optimizer steps in all."""
    lr: float = output(1e-4, gt=0)
    """Peak learning rate (lower than pretraining's: the weights are already trained)."""
    warmup_steps: int = output(10, ge=0)
    """Linear warmup from 0 to lr."""
    model: ModelSpec = output(ModelSpec())
    """Not set here: the model and its shape come from `init` (giving it is an error)."""

    _init_or_path = field_validator("init", mode="before")(lambda cls, v: stage_or_path(v, "a training"))
    _stage_or_mixture = field_validator("data", mode="before")(lambda cls, v: stage_or_mixture(v))

    @model_validator(mode="after")
    def _one_data_source(self):
        if (self.task is None) == (self.data is None):
            raise ValueError("give exactly one of `task` (prompt/response file) or `data` (a preprocess stage)")
        if "model" in self.model_fields_set:
            raise ValueError("`model` is not set here: the model and its shape come from `init`; remove `model`")
        if self.init_step is not None and isinstance(self.init, LocalPath):
            raise ValueError("`init_step` picks a checkpoint of a training stage; it does not apply to {path: DIR}")
        return self

    def max_positions(self, stages: Mapping[str, StageSpec], seen: frozenset) -> int | None:
        if isinstance(self.init, LocalPath):
            try:
                with open(os.path.join(self.init.path, "config.json")) as f:
                    return json.load(f).get("max_position_embeddings")
            except (OSError, ValueError):
                return None  # reported by the plan, which fingerprints the directory
        return max_positions_of(stages, self.init, seen)

    def problems(self, name: str, stages: Mapping[str, StageSpec]) -> list[str]:
        from jobs.sft import load_sft_rows  # reads the file: only when validating a whole pipeline

        problems = super().problems(name, stages) + mixture_problems(name, stages, self.data)
        positions = self.max_positions(stages, frozenset({name}))
        for source in data_stages(self.data):
            data = stages.get(source)
            if positions is not None and isinstance(data, PreprocessStage) and data.seq_len > positions:
                problems.append(f"stages.{name}.data: stages.{source}.seq_len {data.seq_len} exceeds the starting "
                                f"model's max_position_embeddings {positions}; shorten seq_len")
                break  # the sources share seq_len: once is enough
        if self.task and positions is not None and self.task.seq_len > positions:
            problems.append(f"stages.{name}.task.seq_len: {self.task.seq_len} exceeds the model's "
                            f"max_position_embeddings {positions}; shorten it")
        if self.init_step is not None and isinstance(self.init, str):
            problems += checkpoint_problems(f"stages.{name}.init_step", stages, self.init, self.init_step)
        if self.task:
            problems += file_problems(f"stages.{name}.task", load_sft_rows, self.task)
        return problems


class FinetuneResults(TrainResults):
    sft_num_examples: int | None = None
    """Supervised fine-tuning: prompt/response examples in the task file."""
    sft_num_truncated: int | None = None
    """Examples cut at the task's seq_len."""
    sft_num_response_tokens: int | None = None
    """Response tokens trained on (the prompts' tokens carry no loss)."""
    sft_num_without_response: int | None = None
    """Examples with no response token left within seq_len: they teach nothing."""


KIND = StageKind("finetune", FinetuneStage, version=2, run="orchestrator.stages.finetune:run",
                 references={"init": ("pretrain", "finetune"), "data": ("preprocess",)}, results=FinetuneResults,
                 exports_model=True, summarize=training_summary)
