"""Weights & Biases: one W&B run per pipeline run, its id the orchestrator's run id, so that a
resumed run continues it (`resume="allow"`; offline, each attempt writes its part and `wandb sync`
joins them).

Stages are metric prefixes rather than runs of a group: `<stage>/loss` and the like, each stage on
its own step axis `<stage>/step` (`define_metric`), since stages train side by side with their own
step counts while W&B's own step must only grow. Each stage's final results go to the summary
(`<stage>/<result>`), its kind, hash, output URI and output fields to the config under `stages`,
and the report with its loss plots to the run's files.
"""

from __future__ import annotations

import os

from orchestrator.tracking import RunInfo, StageInfo
from orchestrator.tracking_spec import WandbSpec


class WandbBackend:
    name = "wandb"

    def __init__(self, spec: WandbSpec, pipeline: str):
        import wandb

        self.wandb, self.spec, self.pipeline = wandb, spec, pipeline
        self.where = f"project {spec.entity + '/' if spec.entity else ''}{spec.project}, {spec.mode}"
        self.stages: dict[str, dict] = {}

    def run_started(self, run: RunInfo) -> None:
        self.run = self.wandb.init(
            project=self.spec.project, entity=self.spec.entity, mode=self.spec.mode, id=run.run_id, name=run.run_id,
            resume="allow", reinit="create_new", tags=[run.pipeline], config={"orchestrator": {
                "run_id": run.run_id, "pipeline": run.pipeline, "spec_hash": run.spec_hash, "storage": run.storage}},
            # Not the driver's terminal output: stage logs are kept in storage, and capturing would
            # wrap this process's stdout for every thread.
            settings=self.wandb.Settings(console="off", silent=True))
        self.run.summary["attempts"] = run.attempt

    def stage_started(self, stage: StageInfo) -> None:
        self.run.define_metric(f"{stage.name}/step", hidden=True)
        self.run.define_metric(f"{stage.name}/*", step_metric=f"{stage.name}/step")
        self.stages[stage.name] = {"kind": stage.kind, "hash": stage.hash, "output_uri": stage.output_uri,
                                   "params": stage.params}
        self.run.config.update({"stages": dict(self.stages)}, allow_val_change=True)

    def step(self, stage: str, step: int, metrics: dict[str, float]) -> None:
        self.run.log({f"{stage}/step": step, **{f"{stage}/{k}": v for k, v in metrics.items()}})

    def stage_finished(self, stage: StageInfo, status: str, results: dict[str, float]) -> None:
        self.run.summary.update({f"{stage.name}/status": status, f"{stage.name}/cached": stage.cached,
                                 **{f"{stage.name}/{k}": v for k, v in results.items()}})

    def run_finished(self, status: str, files: dict[str, bytes]) -> None:
        for name, data in files.items():
            path = os.path.join(self.run.dir, name)
            with open(path, "wb") as f:
                f.write(data)
            self.run.save(path, base_path=self.run.dir, policy="now")
        self.run.summary["status"] = status
        self.run.finish(exit_code=0 if status == "succeeded" else 1)
