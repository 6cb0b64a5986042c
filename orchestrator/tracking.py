"""Experiment tracking, on the driver: the runner tells its tracker what happens (the run started,
a stage started, a training step's metrics, a stage finished, the run finished) and the tracker
sends it to MLflow and/or Weights & Biases (the `tracking:` section, orchestrator/tracking_spec.py).

- `Tracker` itself tracks nothing: what the runner gets when the pipeline has no `tracking:`.
- `Tracking` turns the runner's objects into plain data (flattened params, numeric metrics, the
  report's files) and hands them to its backends (orchestrator/tracking_mlflow.py,
  tracking_wandb.py), one call at a time since stages run on threads. A backend that raises is
  off for the rest of the run after one warning (with `required: true`, the run fails instead):
  a lost tracking server costs the run its tracking, never its training.

Backends find the run they continue by the orchestrator's run id, so a resumed run (`--run-id`)
appends to the same MLflow / W&B run without keeping any state of its own.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from dataclasses import dataclass
from typing import Any, Mapping, Protocol

from jobs.fields import output_fields
from jobs.storage import Storage
from orchestrator.plan import PlannedStage
from orchestrator.records import RunRecord, StageRecord
from orchestrator.tracking_spec import TrackingSpec

log = logging.getLogger(__name__)

REPORT_FILE = re.compile(r"report\.md|loss(-[a-z0-9_-]+)?\.png")
"""The report and its loss plots, beside the run record (orchestrator/report.py writes them)."""
NOT_STEP_METRICS = ("step", "resumed_from")
"""Numbers in a training step's message that are not metrics of that step."""


class TrackingError(RuntimeError):
    """A tracker failed and the pipeline file says that tracking is required."""


@dataclass(frozen=True)
class RunInfo:
    run_id: str
    pipeline: str
    spec_hash: str
    storage: str
    attempt: int


@dataclass(frozen=True)
class StageInfo:
    name: str
    kind: str
    hash: str
    output_uri: str
    cached: bool
    params: dict[str, str]
    """The stage's output (hashed) fields, flattened to dotted keys."""


class Backend(Protocol):
    name: str
    where: str
    """The server or project, for messages (never credentials)."""

    def run_started(self, run: RunInfo) -> None: ...
    def stage_started(self, stage: StageInfo) -> None: ...
    def step(self, stage: str, step: int, metrics: dict[str, float]) -> None: ...
    def stage_finished(self, stage: StageInfo, status: str, results: dict[str, float]) -> None: ...
    def run_finished(self, status: str, files: dict[str, bytes]) -> None: ...


class Tracker:
    """Tracks nothing: the runner's default."""

    def run_started(self, record: RunRecord) -> None:
        pass

    def stage_started(self, p: PlannedStage) -> None:
        pass

    def step(self, stage: str, metrics: dict) -> None:
        """One training step's metrics message (StageContext.on_step)."""

    def stage_finished(self, p: PlannedStage, stage: StageRecord) -> None:
        """A stage that ran, or was cached, is final (succeeded, failed or stopped)."""

    def run_finished(self, record: RunRecord, storage: Storage) -> None:
        """After the record and report are final."""


class Tracking(Tracker):
    def __init__(self, backends: list[Backend], required: bool, say):
        self.backends, self.required, self.say = backends, required, say  # say: a line for the user
        self._off: set[str] = set()
        self._started: set[str] = set()  # stages whose backends' stage_started ran in this attempt
        self._lock = threading.Lock()

    def run_started(self, record: RunRecord) -> None:
        self._send("run_started", RunInfo(record.run_id, record.pipeline, record.spec_hash, record.storage,
                                          record.attempts))
        for backend in self.backends:
            if backend.name not in self._off:
                self.say(f"tracking to {backend.name} ({backend.where})")

    def stage_started(self, p: PlannedStage) -> None:
        self._started.add(p.name)
        self._send("stage_started", _stage_info(p, cached=False))

    def step(self, stage: str, metrics: dict) -> None:
        values = numbers(metrics, skip=NOT_STEP_METRICS)
        if "step" in metrics and values:
            self._send("step", stage, int(metrics["step"]), values)

    def stage_finished(self, p: PlannedStage, stage: StageRecord) -> None:
        info = _stage_info(p, stage.cached)
        if p.name not in self._started:  # cached: it never started in this attempt
            self._started.add(p.name)
            self._send("stage_started", info)
        self._send("stage_finished", info, stage.status, numbers(stage.metrics))

    def run_finished(self, record: RunRecord, storage: Storage) -> None:
        base = f"runs/{record.run_id}/"
        files = {o.key.removeprefix(base): storage.read_bytes(o.key) for o in storage.list(base)
                 if REPORT_FILE.fullmatch(o.key.removeprefix(base))}
        self._send("run_finished", record.status, files)

    def _send(self, method: str, *args) -> None:
        with self._lock:
            for backend in self.backends:
                if backend.name in self._off:
                    continue
                try:
                    getattr(backend, method)(*args)
                except Exception as e:
                    self._off.add(backend.name)  # also when required: finishing must not wait on it again
                    why = redact(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")[:300]
                    if self.required:
                        raise TrackingError(f"tracking.{backend.name} ({backend.where}) failed: {why}; "
                                            "tracking.required is true, so the run fails. Once it is back, the "
                                            "same --run-id resumes the run and its tracking") from e
                    log.warning("tracking to %s (%s) failed; it is off for the rest of run", backend.name,
                                backend.where, exc_info=True)
                    self.say(f"warning: tracking to {backend.name} ({backend.where}) failed: {why}; it is off "
                              "for the rest of this run (tracking.required: true would fail the run instead)")


def open_tracker(tracking: TrackingSpec | None, pipeline: str, say) -> Tracker:
    """The tracker for a pipeline's `tracking:` section; `say` prints a line for the user."""
    if tracking is None:
        return Tracker()
    backends: list[Backend] = []
    if tracking.mlflow is not None:
        from orchestrator.tracking_mlflow import MlflowBackend

        backends.append(MlflowBackend(tracking.mlflow, pipeline))
    if tracking.wandb is not None:
        from orchestrator.tracking_wandb import WandbBackend

        backends.append(WandbBackend(tracking.wandb, pipeline))
    return Tracking(backends, tracking.required, say)


def _stage_info(p: PlannedStage, cached: bool) -> StageInfo:
    params = {key: value if isinstance(value, str) else json.dumps(value)
              for key, value in flatten(output_fields(p.spec)).items()}
    return StageInfo(p.name, p.kind, p.hash, p.uri, cached, params)


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings (and lists of them) as one level of dotted keys:
    {"a": {"b": [{"c": 1}], "d": [1, 2]}} -> {"a.b.0.c": 1, "a.d": [1, 2]}."""
    if isinstance(value, Mapping):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    if isinstance(value, (list, tuple)) and any(isinstance(item, Mapping) for item in value):
        return {key: item for i, entry in enumerate(value) for key, item in flatten(entry, f"{prefix}.{i}").items()}
    return {prefix: value}


def numbers(values: Mapping, skip: tuple[str, ...] = ()) -> dict[str, float]:
    """The numeric leaves of `values`, flattened (lists such as a loss history are left out)."""
    return {key: float(value) for key, value in flatten(values).items()
            if key not in skip and isinstance(value, (int, float)) and not isinstance(value, bool)}


def redact(text: str) -> str:
    """`scheme://user:secret@host` -> `scheme://***@host`: a URI from the environment may hold credentials."""
    return re.sub(r"(\w+://)[^/@\s]+@", r"\1***@", text)
