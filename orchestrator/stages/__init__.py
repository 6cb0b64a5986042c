"""One module per stage kind's run function (named by its StageKind.run). Each exposes `run(ctx) -> StageOutput`: a function of its own spec
and its inputs' committed outputs that writes its output under `ctx.out`. The runner commits it;
caching, retries and records are the runner's, not the stage's."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from jobs.commit import FileEntry
from jobs.storage import Storage
from orchestrator.console import Console
from orchestrator.kinds.base import StageSpec


@dataclass
class StageContext:
    name: str
    hash: str  # the stage's content hash (a checkpoint resumes only under the same one)
    spec: StageSpec  # the stage's own spec (orchestrator/kinds), never the whole pipeline
    out: Storage  # the stage's output directory
    inputs: dict[str, str]  # reference field -> the referenced stage's output URI
    console: Console
    is_running: Callable[[str], bool] = lambda stage: False  # whether another stage of this run is running now
    on_step: Callable[[dict], None] = lambda metrics: None  # a training step's metrics message (tracking)


@dataclass
class StageOutput:
    files: dict[str, FileEntry]  # every file of the output, relative to ctx.out
    metrics: dict = field(default_factory=dict)
    attempts: int = 1  # times the stage's work started within this driver attempt (worker-group restarts)


