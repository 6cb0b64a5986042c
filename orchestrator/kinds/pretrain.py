"""The pretrain kind: a model from random weights (or last run's, `init: previous`) with DeepSpeed
ZeRO on Ray Train workers."""

from __future__ import annotations

from typing import Literal, Mapping

from jobs.fields import output
from orchestrator.kinds.base import StageKind, StageSpec, StartsFromPreviousRun
from orchestrator.kinds.preprocess import PreprocessStage
from orchestrator.kinds.training import TrainResults, TrainStage, training_summary


class PretrainStage(TrainStage):
    """Trains a model from scratch on a preprocess stage's sequences with DeepSpeed ZeRO on Ray Train."""

    kind: Literal["pretrain"] = output()
    data: str = output()
    """The preprocess stage whose train split to train on."""
    init: Literal["previous"] | None = output(None)
    """`previous`: start from the weights this stage ended with in the pipeline's newest successful
    run (nightly continued training); from random weights when there is none or `model` changed."""

    def starts_from_previous_run(self, stages: Mapping[str, StageSpec]) -> StartsFromPreviousRun | None:
        return StartsFromPreviousRun(stages[self.data].tokenizer) if self.init == "previous" else None

    def max_positions(self, stages: Mapping[str, StageSpec], seen: frozenset) -> int | None:
        return self.model.max_position_embeddings

    def problems(self, name: str, stages: Mapping[str, StageSpec]) -> list[str]:
        problems = super().problems(name, stages)
        data = stages.get(self.data)
        if isinstance(data, PreprocessStage) and data.seq_len > self.model.max_position_embeddings:
            problems.append(f"stages.{name}.model.max_position_embeddings: {self.model.max_position_embeddings} is "
                            f"shorter than stages.{self.data}.seq_len {data.seq_len}; raise it or shorten seq_len")
        return problems


KIND = StageKind("pretrain", PretrainStage, version=2, run="orchestrator.stages.pretrain:run",
                 references={"data": ("preprocess",)}, results=TrainResults, exports_model=True,
                 summarize=training_summary)
