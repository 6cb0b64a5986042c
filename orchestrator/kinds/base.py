"""What a stage kind is: one declaration (StageKind) that the control plane reads instead of
naming kinds, plus the pieces the kinds share.

A kind module (orchestrator/kinds/<kind>.py) holds the kind's spec model and its `KIND`; its run
function is named as "module:function" and imported only when a stage of the kind runs, so that
validating or planning a pipeline never imports Ray, torch or DeepSpeed.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable, Mapping

from pydantic import BaseModel, ConfigDict, ValidationError

from jobs.fields import output
from orchestrator.resources import DEFAULT_BUNDLES


class StageResults(BaseModel):
    """A stage's results, as its commit and the run record keep them (`metrics`). Each kind has its
    own subclass; readers (console, report, gate, `status`) read its fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class StageKind:
    name: str
    """The `kind:` value in the pipeline file."""
    spec: type[BaseModel]
    """The stage's spec model (pydantic; every field declared output or operational)."""
    version: int
    """Part of every stage hash of the kind: bump it when the kind's code changes its output."""
    run: str | Callable
    """The function computing a stage, StageContext -> StageOutput: "module:function", imported only
    when a stage of the kind runs (a callable: a test's stand-in)."""
    references: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Spec fields that name other stages -> the kinds they may name; the DAG comes from them."""
    beside: frozenset[str] = frozenset()
    """Of `references`, those that let the stage start once the other one has started (it reads
    the other's output while it is being written, like evaluate's `follow`), not once it ended."""
    results: type[StageResults] = StageResults
    """What a stage of the kind reports; the runner checks a stage's results against it before
    committing, so that what the record keeps always reads back."""
    exports_model: bool = False
    """Its output holds a Hugging Face export under hf/ (the summary prints it, the report lists it)."""
    summarize: Callable[[StageResults], str] = lambda results: ""
    """The stage's key metrics in a few words: the console line, `status`, the report's table."""

    def results_of(self, metrics: dict) -> StageResults | None:
        """The typed results of a record's `metrics`; None when there are none yet (a stage that did
        not finish) or they do not read as this kind's (a record written by another version)."""
        try:
            return self.results.model_validate(metrics) if metrics else None
        except ValidationError:
            return None

    def run_function(self) -> Callable:
        if callable(self.run):
            return self.run
        module, function = self.run.split(":")
        return getattr(importlib.import_module(module), function)


@dataclass(frozen=True)
class StartsFromPreviousRun:
    tokenizer: str | LocalPath
    """Its tokenizer: the previous run's weights are used only if they were trained on the same ids."""


class StageSpec(BaseModel):
    """What every stage spec has: the resources the runner reserves while the stage runs."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    def bundles(self) -> list[dict[str, float]]:
        """The resources to reserve while it runs, one dict per Ray worker or task."""
        return list(DEFAULT_BUNDLES)

    def starts_from_previous_run(self, stages: Mapping[str, StageSpec]) -> StartsFromPreviousRun | None:
        """Whether the stage starts from what it ended with in the pipeline's newest successful run
        (the plan then finds that run, and a new one is a new input); None: it does not."""
        return None

    def problems(self, name: str, stages: Mapping[str, StageSpec]) -> list[str]:
        """What is wrong with stage `name` given the pipeline's other stages (those that validate)
        and the files it names: checks that need more than its own fields, run at validate so
        that they fail before any GPU time."""
        return []


def file_problems(where: str, load: Callable, value) -> list[str]:
    """`load(value)`'s complaint about a file the spec names, as a problem at field path `where`."""
    try:
        load(value)
    except ValueError as e:
        return [f"{where}: {e}"]
    return []


class LocalPath(BaseModel):
    """A directory on the driver's disk, instead of a stage's output."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    path: str = output(local="dir")
    """Local directory (relative to the current directory)."""


def stage_or_path(value, what: str):
    """A stage's name or {path: DIR}; validated by hand because a plain union's errors name
    pydantic's members instead of what the user can write."""
    if isinstance(value, dict):
        return LocalPath.model_validate(value)
    if not isinstance(value, str):
        raise ValueError(f"give {what} stage's name or {{path: DIR}}")
    return value
