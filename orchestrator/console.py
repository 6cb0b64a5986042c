"""What the user sees: one line per stage, a progress bar for long work, a summary at the end.

Lines go to stdout; progress bars to stderr (and only on a terminal, so CI logs stay clean).
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Callable

from tqdm import tqdm

from orchestrator.gate import GateResult
from orchestrator.kinds import KINDS
from orchestrator.records import RunRecord, StageRecord


class Console:
    def __init__(self, out=None):
        self.out = out or sys.stdout

    def line(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def stage_started(self, name: str, kind: str, reason: str) -> None:
        self.line(f"▶ {name:<12} {kind:<11} running ({reason})")

    def stage_finished(self, name: str, stage: StageRecord) -> None:
        mark = {"succeeded": "✓", "failed": "✗", "stopped": "■"}.get(stage.status, "·")
        how = "cached" if stage.cached else f"{_elapsed(stage):>7}"
        detail = stage.error if stage.error else key_metrics(stage)
        self.line(f"{mark} {name:<12} {stage.kind:<11} {how:<8} {detail}")

    @contextlib.contextmanager
    def progress(self, total: int, label: str):
        bar = tqdm(total=total, desc=f"  {label}", leave=False, file=sys.stderr, disable=None)
        try:
            yield bar.update
        finally:
            bar.close()

    def summary(self, record: RunRecord, log_path: str | None = None) -> None:
        elapsed = (record.finished_at or time.time()) - record.started_at
        self.line(f"\nrun {record.run_id}: {record.status} in {elapsed:.1f}s")
        for name, stage in record.stages.items():
            how = "cached" if stage.cached else _elapsed(stage)
            self.line(f"  {name:<12} {stage.kind:<11} {stage.status:<10} {how:>7}  {key_metrics(stage)}")
        exports = [(name, s.output_uri) for name, s in record.stages.items()
                   if KINDS[s.kind].exports_model and s.status == "succeeded"]
        for name, uri in exports:
            self.line(f"model:  {name} → {uri.rstrip('/')}/hf/")
        if record.gate is not None:
            self.line(f"gate:   {gate_summary(record.gate)}")
        base = f"{record.storage.rstrip('/')}/runs/{record.run_id}"
        self.line(f"record: {base}/run.json\nreport: {base}/report.md")
        if log_path:
            self.line(f"log:    {log_path}")


class StageConsole:
    """One stage's view of the console: stages run side by side, so its lines carry its name."""

    def __init__(self, console: Console, name: str, log: Callable[[str], None]):
        self.console, self.name, self.log = console, name, log  # log: the stage's log in storage

    def line(self, text: str) -> None:
        self.console.line(f"  {self.name}: {text.strip()}")
        self.log(text.strip())

    def progress(self, total: int, label: str):
        return self.console.progress(total, f"{self.name} {label}")


def gate_summary(gate: GateResult) -> str:
    """The gate's decision in one line, e.g. 'promoted (latest, best → s3://b/p/stages/sft-1a2b/hf/)'."""
    if gate.status == "promoted":
        return f"promoted ({', '.join(gate.moved)} → {gate.export_uri})"
    if gate.status == "regressed":
        return f"REGRESSED — {gate.reason}; latest stays at run {gate.baseline_run}"
    return f"ERROR — {gate.reason}"


def key_metrics(stage: StageRecord) -> str:
    """The stage's key metrics in a few words, as its kind summarizes them."""
    kind = KINDS.get(stage.kind)
    results = kind.results_of(stage.metrics) if kind else None
    return kind.summarize(results) if results else ""


def _elapsed(stage: StageRecord) -> str:
    if stage.started_at is None or stage.finished_at is None:
        return "-"
    return f"{stage.finished_at - stage.started_at:.1f}s"
