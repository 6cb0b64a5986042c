"""The tokenizer stage: one Ray task trains the tokenizer into the stage directory; adopting a
local tokenizer happens on the driver, the only machine where that directory exists.

A source whose files do not hold what its format says is refused on the driver, before the task;
a sample without any usable text fails the task with a SourceError, which is the user's to fix
too (exit 2) rather than a tokenizer trained on nothing.
"""

from __future__ import annotations

import ray
from ray.exceptions import RayTaskError

from jobs.sources import SourceError, check_source_content, list_source_files
from jobs.tokenizer import build_tokenizer
from orchestrator.errors import UserError
from orchestrator.stages import StageContext, StageOutput


def run(ctx: StageContext) -> StageOutput:
    spec = ctx.spec
    if spec.path is not None:
        try:
            info, files = build_tokenizer(ctx.out, path=spec.path)
        except ValueError as e:
            raise UserError(f"stages.{ctx.name}.path: {e}") from None
    else:
        try:
            check_source_content(list_source_files(spec.source), spec.source)
        except SourceError as e:
            raise UserError(f"stages.{ctx.name}.source: {e}") from None
        task = ray.remote(num_cpus=1, max_retries=2)(build_tokenizer)
        with ctx.console.progress(1, "training tokenizer") as advance:
            try:
                info, files = ray.get(task.remote(
                    ctx.out,
                    source=spec.source,
                    normalization=spec.normalize,
                    vocab_size=spec.vocab_size,
                    min_frequency=spec.min_frequency,
                    sample_bytes=int(spec.sample_mb * 1e6),
                ))
            except RayTaskError as e:
                if isinstance(e.cause, SourceError):
                    raise UserError(f"stages.{ctx.name}.source: {e.cause}") from None
                raise
            advance()
    return StageOutput(files, {"vocab_size": info["vocab_size"], "eos_id": info["eos_id"]})
