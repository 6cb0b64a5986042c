"""The pretrain kind: a model from random weights (or last run's, `init: previous`) with DeepSpeed
ZeRO on Ray Train workers."""

from __future__ import annotations

from typing import Literal, Mapping

from pydantic import field_validator

from jobs.fields import output
from orchestrator.kinds.base import StageKind, StageSpec, StartsFromPreviousRun
from orchestrator.kinds.preprocess import PreprocessStage
from orchestrator.kinds.training import (
    DataSource,
    TrainResults,
    TrainStage,
    data_stages,
    mixture_problems,
    stage_or_mixture,
    training_summary,
)


class PretrainStage(TrainStage):
    """Trains a model from scratch on a preprocess stage's sequences with DeepSpeed ZeRO on Ray Train."""

    kind: Literal["pretrain"] = output()
    data: str | list[DataSource] = output()
    """The preprocess stage whose train split to train on, or a mixture: a list of {stage, weight},
    each step's sequences drawn from the stages in proportion to the weights (they must share a
    tokenizer and seq_len)."""
    init: Literal["previous"] | None = output(None)
    """`previous`: start from the weights this stage ended with in the pipeline's newest successful
    run (nightly continued training); from random weights when there is none or `model` changed."""

    _stage_or_mixture = field_validator("data", mode="before")(lambda cls, v: stage_or_mixture(v))

    def starts_from_previous_run(self, stages: Mapping[str, StageSpec]) -> StartsFromPreviousRun | None:
        # A mixture's sources share one tokenizer (mixture_problems): the first one's is theirs.
        tokenizer = stages[data_stages(self.data)[0]].tokenizer
        return StartsFromPreviousRun(tokenizer) if self.init == "previous" else None

    def max_positions(self, stages: Mapping[str, StageSpec], seen: frozenset) -> int | None:
        return self.model.max_position_embeddings

    def problems(self, name: str, stages: Mapping[str, StageSpec]) -> list[str]:
        problems = super().problems(name, stages) + mixture_problems(name, stages, self.data)
        for source in data_stages(self.data):
            data = stages.get(source)
            if isinstance(data, PreprocessStage) and data.seq_len > self.model.max_position_embeddings:
                problems.append(f"stages.{name}.model.max_position_embeddings: {self.model.max_position_embeddings} "
                                f"is shorter than stages.{source}.seq_len {data.seq_len}; raise it or shorten seq_len")
                break  # the sources share seq_len: once is enough
        return problems


KIND = StageKind("pretrain", PretrainStage, version=2, run="orchestrator.stages.pretrain:run",
                 references={"data": ("preprocess",)}, results=TrainResults, exports_model=True,
                 summarize=training_summary)
