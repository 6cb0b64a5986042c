"""The pretrain stage: a model from random weights on a preprocess stage's packed sequences, or,
with `init: previous`, from the weights it ended with in the pipeline's last successful run."""

from __future__ import annotations

from orchestrator.stages import StageContext, StageOutput
from orchestrator.stages.training import run_training


def run(ctx: StageContext) -> StageOutput:
    return run_training(ctx, {"data_uri": ctx.inputs["data"], "init_uri": ctx.inputs.get("init")})
