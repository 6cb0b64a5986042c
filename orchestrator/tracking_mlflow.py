"""MLflow: one MLflow run per pipeline run, a nested run per stage (tagged `mlflow.parentRunId`).

- parent run: tags orchestrator.run_id / pipeline / spec_hash / storage; metrics `<stage>.<result>`
  (each stage's final results, so that MLflow's run table compares pipeline runs); artifacts: the
  report and its loss plots.
- stage run: tags orchestrator.stage / kind / hash / output_uri / cached; params: the stage's
  output fields, flattened; metrics: a training stage's step metrics by step, and its final results.

A resumed run finds its MLflow runs by their tags (the run id and storage; a stage's name and hash)
instead of keeping MLflow's ids anywhere: nothing in storage or the run record changes, and a
driver on another machine finds them as well. A stage whose nested run exists from an earlier
attempt appends to it; one that this run's earlier attempt already finished is left as it is.
"""

from __future__ import annotations

import os
import re
import tempfile
import time

from orchestrator.tracking import RunInfo, StageInfo, redact
from orchestrator.tracking_spec import MlflowSpec

# MLflow's client retries a failed request 7 times with exponential backoff, about 4 minutes;
# a run would wait that long on a lost server before going on without it. And it prints two
# "View run" lines on stdout whenever a run ends, one pair per stage, amid the run's own lines.
# The user's own settings win.
CLIENT_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                   "MLFLOW_HTTP_REQUEST_TIMEOUT": "30", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}
STATUS = {"succeeded": "FINISHED", "failed": "FAILED", "stopped": "KILLED"}
BATCH = {"params": 100, "metrics": 1000}  # MLflow's log_batch limits per request
_INVALID_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-. /]")


class MlflowBackend:
    name = "mlflow"

    def __init__(self, spec: MlflowSpec, pipeline: str):
        import mlflow

        for variable, value in CLIENT_DEFAULTS.items():
            os.environ.setdefault(variable, value)
        self.tracking_uri = spec.tracking_uri
        self.where = redact(spec.tracking_uri or mlflow.get_tracking_uri())
        self.experiment_name = spec.experiment or pipeline
        self.parent: str | None = None
        self.stage_runs: dict[tuple[str, str], str] = {}  # (stage, hash) -> MLflow run id
        self.earlier: set[tuple[str, str]] = set()  # of those, the ones an earlier attempt created
        self.current: dict[str, str] = {}  # stage -> its MLflow run in this attempt
        self.stepped: dict[str, set[str]] = {}  # stage -> the metrics it logged by step

    def run_started(self, run: RunInfo) -> None:
        from mlflow import MlflowClient

        self.client = MlflowClient(self.tracking_uri)  # here: a URI it refuses is a tracking failure like any other
        self.run_id, self.experiment_id = run.run_id, self._experiment_id()
        mine = self.client.search_runs([self.experiment_id], f"tags.`orchestrator.run_id` = '{run.run_id}'")
        parents = [r for r in mine if "mlflow.parentRunId" not in r.data.tags
                   and r.data.tags.get("orchestrator.storage") == run.storage]
        if parents:
            self.parent = parents[0].info.run_id
            self.client.update_run(self.parent, status="RUNNING")
            for r in mine:
                if r.data.tags.get("mlflow.parentRunId") == self.parent:
                    self.stage_runs[(r.data.tags["orchestrator.stage"], r.data.tags["orchestrator.hash"])] = r.info.run_id
            self.earlier = set(self.stage_runs)
        else:
            tags = {"orchestrator.run_id": run.run_id, "orchestrator.pipeline": run.pipeline,
                    "orchestrator.spec_hash": run.spec_hash, "orchestrator.storage": run.storage}
            self.parent = self.client.create_run(self.experiment_id, tags=tags, run_name=run.run_id).info.run_id
        self.client.set_tag(self.parent, "orchestrator.attempts", str(run.attempt))

    def stage_started(self, stage: StageInfo) -> None:
        key = (stage.name, stage.hash)
        if key in self.stage_runs:
            self.current[stage.name] = self.stage_runs[key]
            if not stage.cached:  # an earlier attempt's stage that runs again: its run goes on
                self.client.update_run(self.stage_runs[key], status="RUNNING")
            return
        tags = {"mlflow.parentRunId": self.parent, "orchestrator.run_id": self.run_id, "orchestrator.stage": stage.name,
                "orchestrator.kind": stage.kind, "orchestrator.hash": stage.hash,
                "orchestrator.output_uri": stage.output_uri}
        run_id = self.client.create_run(self.experiment_id, tags=tags, run_name=stage.name).info.run_id
        self.stage_runs[key] = self.current[stage.name] = run_id
        self._log(run_id, params=[self._param(k, v) for k, v in stage.params.items()])

    def step(self, stage: str, step: int, metrics: dict[str, float]) -> None:
        self.stepped.setdefault(stage, set()).update(metrics)
        self._log(self.current[stage], metrics=self._metrics(metrics, step))

    def stage_finished(self, stage: StageInfo, status: str, results: dict[str, float]) -> None:
        key = (stage.name, stage.hash)
        if stage.cached and key in self.earlier:
            return  # this run finished it in an earlier attempt: its results are there
        run_id = self.current[stage.name]
        self.client.set_tag(run_id, "orchestrator.cached", str(stage.cached).lower())
        # A result that is also a step metric (tokens/s) is its last step's value: logged again at
        # step 0, it would end the metric's history with a point back at the start.
        stepped = self.stepped.get(stage.name, set())
        self._log(run_id, metrics=self._metrics({k: v for k, v in results.items() if k not in stepped}, 0))
        self._log(self.parent, metrics=self._metrics({f"{stage.name}.{k}": v for k, v in results.items()}, 0))
        self.client.set_terminated(run_id, STATUS.get(status, "FAILED"))

    def run_finished(self, status: str, files: dict[str, bytes]) -> None:
        with tempfile.TemporaryDirectory(prefix="orchestrator-mlflow-") as local:
            for name, data in files.items():
                with open(os.path.join(local, name), "wb") as f:
                    f.write(data)
            if files:
                self.client.log_artifacts(self.parent, local)
        self.client.set_terminated(self.parent, STATUS.get(status, "FAILED"))

    def _experiment_id(self) -> str:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(self.experiment_name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(self.experiment_name)
        except MlflowException:  # another run created it meanwhile
            found = self.client.get_experiment_by_name(self.experiment_name)
            if found is None:
                raise
            return found.experiment_id

    def _log(self, run_id: str, params=(), metrics=()) -> None:
        params, metrics = list(params), list(metrics)
        for i in range(0, len(params), BATCH["params"]):
            self.client.log_batch(run_id, params=params[i:i + BATCH["params"]])
        for i in range(0, len(metrics), BATCH["metrics"]):
            self.client.log_batch(run_id, metrics=metrics[i:i + BATCH["metrics"]])

    @staticmethod
    def _param(key: str, value: str):
        from mlflow.entities import Param

        return Param(_key(key), value)

    @staticmethod
    def _metrics(values: dict[str, float], step: int) -> list:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        return [Metric(_key(k), v, now, step) for k, v in values.items()]


def _key(key: str) -> str:
    """MLflow's keys allow letters, digits, `_ - . /` and spaces: `pretrain@40` -> `pretrain_40`."""
    return _INVALID_KEY_CHARS.sub("_", key)
