"""The `tracking:` section of a pipeline file: where a run's metrics also go (MLflow, Weights &
Biases). Off when absent. Tracking only watches a run: it is in no stage's hash nor the spec
hash, so adding or changing it reuses every committed output and a run resumes under it.

```yaml
tracking:
  mlflow: {tracking_uri: "http://mlflow.internal:5000", experiment: nightly-llm}
  wandb: {project: llm, entity: my-team, mode: online}
  required: false     # true: a tracking server that cannot be reached fails the run
```

Credentials come only from the environment, as each tool reads them (MLFLOW_TRACKING_USERNAME /
MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN; WANDB_API_KEY), never from this file.
"""

from __future__ import annotations

import importlib.util
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

INSTALL = {"mlflow": "pip install 'ray-llm-orchestrator[mlflow]'", "wandb": "pip install 'ray-llm-orchestrator[wandb]'"}
"""The extra that brings each tracker's client."""


class MlflowSpec(BaseModel):
    """An MLflow tracking server: one MLflow run per pipeline run, a nested run per stage."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    tracking_uri: str | None = None
    """The server, e.g. http://mlflow.internal:5000; unset: MLFLOW_TRACKING_URI, else MLflow's own
    default (a local store in the current directory)."""
    experiment: str | None = None
    """The MLflow experiment (created when missing); unset: the pipeline's name."""

    @field_validator("tracking_uri")
    @classmethod
    def _no_credentials(cls, uri: str | None) -> str | None:
        if uri is not None and (urlsplit(uri).username or urlsplit(uri).password):
            raise ValueError("holds credentials; give the URI without them and set MLFLOW_TRACKING_USERNAME / "
                             "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) in the environment")
        return uri


class WandbSpec(BaseModel):
    """A Weights & Biases project: one W&B run per pipeline run, each stage's metrics under its name."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    project: str
    """The W&B project."""
    entity: str | None = None
    """The W&B team or user; unset: the API key's default entity."""
    mode: Literal["online", "offline"] = "online"
    """online: stream to W&B (WANDB_API_KEY from the environment); offline: write the run under
    WANDB_DIR only, for `wandb sync` later (no network needed)."""


class TrackingSpec(BaseModel):
    """Experiment tracking: where a run's parameters, metrics by step, results and report also go."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    mlflow: MlflowSpec | None = None
    """Track to MLflow (needs the `mlflow` extra)."""
    wandb: WandbSpec | None = None
    """Track to Weights & Biases (needs the `wandb` extra)."""
    required: bool = False
    """false: a tracker that fails (its server cannot be reached) gives one warning and is off for the
    rest of the run, which goes on; true: it fails the run."""

    @model_validator(mode="after")
    def _something_to_track_to(self):
        if self.mlflow is None and self.wandb is None:
            raise ValueError("nothing to track to: give `mlflow: {}` and/or `wandb: {project: NAME}`, or remove `tracking`")
        return self


def tracking_problems(tracking: TrackingSpec) -> list[str]:
    """The trackers the file names whose client package is not installed (checked at validate)."""
    named = [tool for tool in ("mlflow", "wandb") if getattr(tracking, tool) is not None]
    return [f"tracking.{tool}: the {tool} package is not installed; {INSTALL[tool]}, or remove tracking.{tool}"
            for tool in named if importlib.util.find_spec(tool) is None]
