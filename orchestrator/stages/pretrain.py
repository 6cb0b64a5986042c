"""The pretrain stage: a model from random weights on a preprocess stage's packed sequences (or a
weighted mixture of several stages'), or, with `init: previous`, from the weights it ended with in
the pipeline's last successful run."""

from __future__ import annotations

from orchestrator.stages import StageContext, StageOutput
from orchestrator.stages.training import data_fields, run_training


def run(ctx: StageContext) -> StageOutput:
    return run_training(ctx, {**data_fields(ctx, ctx.spec.data), "init_uri": ctx.inputs.get("init")})
