"""The pretrain stage: a model from random weights on a preprocess stage's packed sequences."""

from __future__ import annotations

from orchestrator.stages import StageContext, StageOutput
from orchestrator.stages.training import run_training


def run(ctx: StageContext) -> StageOutput:
    return run_training(ctx, {"data_uri": ctx.inputs["data"]})
