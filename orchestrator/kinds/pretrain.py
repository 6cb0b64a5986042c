"""The pretrain kind: a model from random weights (or last run's, `init: previous`) with DeepSpeed
ZeRO on Ray Train workers."""

from __future__ import annotations

from typing import Literal

from jobs.fields import output
from orchestrator.kinds.base import StageKind
from orchestrator.kinds.training import TrainResults, TrainStage, training_summary


class PretrainStage(TrainStage):
    """Trains a model from scratch on a preprocess stage's sequences with DeepSpeed ZeRO on Ray Train."""

    kind: Literal["pretrain"] = output()
    data: str = output()
    """The preprocess stage whose train split to train on."""
    init: Literal["previous"] | None = output(None)
    """`previous`: start from the weights this stage ended with in the pipeline's newest successful
    run (nightly continued training); from random weights when there is none or `model` changed."""


KIND = StageKind("pretrain", PretrainStage, version=1, run="orchestrator.stages.pretrain:run",
                 references={"data": ("preprocess",)}, results=TrainResults, exports_model=True,
                 summarize=training_summary)
