"""The regression gate: after a run's evaluation, compare its metrics with the last promoted run of
the same pipeline and move the `latest` / `best` model aliases only when it did not regress.

Aliases are small JSON files in the pipeline's storage (a contract, read by the CLI and by
`init: previous`):

    aliases/<pipeline>/latest.json   the last promoted run: the baseline of the next gate
    aliases/<pipeline>/best.json     the promoted run with the best value of the gate's first metric

    {"run_id": "nightly-20261127-013000-ab12", "pipeline": "nightly", "model_stage": "sft_colors",
     "export_uri": "s3://bucket/nightly/stages/sft_colors-1a2b3c4d/hf/",
     "metrics": {"sft_colors/colors/exact_match": 0.52, ...}, "promoted_at": 1795743000.0}

Each alias is replaced whole with an atomic write, so a reader sees the old alias or the new one.
The decision (`GateResult`) is stored in the run record (`RunRecord.gate`). This module imports no
other orchestrator module at run time (records.py imports it), so there is no import cycle.
"""

from __future__ import annotations

import json
import math
import time
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, Field, ValidationError

from jobs.storage import Storage, validate_key
from orchestrator.kinds.evaluate import EvaluateResults, ModelEvaluation

if TYPE_CHECKING:
    from orchestrator.records import RunRecord
    from orchestrator.schedule_spec import GateMetric, GateSpec

ALIASES = ("latest", "best")
_TOLERANCE = 1e-9
"""Relative slack in threshold comparisons, so a value exactly at the limit in decimal
(0.46 against 0.48 - 0.02) passes despite float rounding."""


class GateCheck(BaseModel):
    name: str
    """`<model>/<task>/<metric>`, as in the gate spec."""
    value: float
    """This run's value."""
    baseline: float | None = None
    """The last promoted run's value; None when there is none to compare with."""
    limit: float | None = None
    """The worst value that passes: baseline - max_regression, or + for lower-is-better metrics."""
    passed: bool


class GateResult(BaseModel):
    status: Literal["promoted", "regressed", "error"]
    baseline_run: str | None = None
    """The run `latest` pointed to before this gate (the baseline); None on a first promotion."""
    checks: list[GateCheck] = Field(default_factory=list)
    moved: list[str] = Field(default_factory=list)
    """The aliases this gate moved to this run: [], ["latest"] or ["latest", "best"]."""
    reason: str = ""
    """One human line: why it was promoted, what regressed, or what went wrong."""
    export_uri: str | None = None
    """The gated model's export (`<model stage output>/hf/`), where the moved aliases now point."""


def alias_key(pipeline: str, name: str) -> str:
    return validate_key(f"aliases/{pipeline}/{name}.json")


def read_alias(storage: Storage, pipeline: str, name: str) -> dict | None:
    """The alias `name` ("latest" or "best") of `pipeline`, or None when no run was promoted yet.

    Raises ValueError when the file is there but is not an alias (not a JSON object)."""
    key = alias_key(pipeline, name)
    try:
        data = storage.read_bytes(key)
    except FileNotFoundError:
        return None
    try:
        alias = json.loads(data)
    except ValueError as e:
        raise ValueError(f"{storage.url(key)} is not valid JSON ({e}); delete it or restore it from the "
                         "run record it names") from None
    if not isinstance(alias, dict):
        raise ValueError(f"{storage.url(key)} is not a JSON object; delete it or restore it")
    return alias


def export_uri(output_uri: str) -> str:
    """The Hugging Face export of a training stage whose output is at `output_uri`."""
    return f"{output_uri.rstrip('/')}/hf/"


def metric_value(results: dict[str, ModelEvaluation], name: str) -> float:
    """`<model>/<task>/<metric>` in an evaluate stage's results; KeyError with a message saying
    what is missing when it is not there (or is not a finite number)."""
    model, task, metric = name.split("/")
    if model not in results:
        raise KeyError(f"{name}: the results have no model {model!r} (they have {sorted(results)})")
    result = results[model]
    if task == "perplexity":
        if result.perplexity is None:
            raise KeyError(f"{name}: {model} has no perplexity result (the evaluation had no data)")
        section = result.perplexity.model_dump()
    else:
        if task not in result.tasks:
            raise KeyError(f"{name}: {model} has no task {task!r} (it has {sorted(result.tasks)})")
        section = result.tasks[task]
    value = section.get(metric)
    if value is None:
        raise KeyError(f"{name}: {model}/{task} has no metric {metric!r} (it has {sorted(section)})")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise KeyError(f"{name}: {value!r} is not a finite number")
    return float(value)


def check(metric: GateMetric, value: float, baseline: float | None) -> GateCheck:
    if baseline is None:
        return GateCheck(name=metric.name, value=value, passed=True)
    slack = _TOLERANCE * max(1.0, abs(baseline))
    if metric.higher_is_better:
        limit = baseline - metric.max_regression
        passed = value >= limit - slack
    else:
        limit = baseline + metric.max_regression
        passed = value <= limit + slack
    return GateCheck(name=metric.name, value=value, baseline=baseline, limit=limit, passed=passed)


def describe(metric: GateMetric, c: GateCheck) -> str:
    """'sft_colors/colors/exact_match 0.41 < 0.48 - 0.02'"""
    if c.baseline is None:
        return f"{c.name} {c.value:g} (no baseline value)"
    if metric.higher_is_better:
        op, sign = (">=" if c.passed else "<"), "-"
    else:
        op, sign = ("<=" if c.passed else ">"), "+"
    return f"{c.name} {c.value:g} {op} {c.baseline:g} {sign} {metric.max_regression:g}"


def _better(metric: GateMetric, value: float, best: float) -> bool:
    return value > best if metric.higher_is_better else value < best


def apply_gate(gate: GateSpec, record: RunRecord, storage: Storage, now: float | None = None) -> GateResult:
    """Compare the run's gate metrics with `latest` and promote it (move `latest`, and `best` when
    the first metric is strictly better than best's) when every metric is within its threshold.

    A metric that `latest` has no value for (the gate gained a metric since) passes unchecked, and
    `best` moves when it has no value for the first metric. `now`: the `promoted_at` time (tests).
    Never raises for a problem with the run, the aliases or storage: it returns status "error" with
    the reason, and moves nothing (a write failing after `latest` moved says so in the reason)."""
    def error(reason: str, **fields) -> GateResult:
        return GateResult(status="error", reason=f"{reason}; nothing promoted", **fields)

    stage = record.stages.get(gate.stage)
    if stage is None:
        return error(f"gate stage {gate.stage!r} is not in run {record.run_id}")
    if stage.status != "succeeded":
        return error(f"gate stage {gate.stage} did not succeed (it is {stage.status})")
    model = record.stages.get(gate.model)
    if model is None or model.status != "succeeded":
        state = "is not in the run" if model is None else f"is {model.status}"
        return error(f"gate model stage {gate.model} {state}, so there is no export")
    uri = export_uri(model.output_uri)

    try:
        results = EvaluateResults.model_validate(stage.metrics).results
    except ValidationError as e:
        return error(f"{gate.stage}'s results do not read as an evaluation's: {e}", export_uri=uri)
    values: dict[str, float] = {}
    for metric in gate.metrics:
        try:
            values[metric.name] = metric_value(results, metric.name)
        except KeyError as e:
            return error(f"missing metric in {gate.stage}'s results: {e.args[0]}", export_uri=uri)

    try:
        latest = read_alias(storage, record.pipeline, "latest")
        best = read_alias(storage, record.pipeline, "best")
    except ValueError as e:
        return error(f"{e}", export_uri=uri)
    except Exception as e:  # storage unreachable: report it in the record, keep the run's status
        return error(f"could not read the aliases of {record.pipeline}: {type(e).__name__}: {e}",
                     export_uri=uri)

    baseline_run = latest.get("run_id") if latest else None
    if latest is None:
        checks = [check(m, values[m.name], None) for m in gate.metrics]
        reason = "first promoted run"
    else:
        base_metrics = _metrics(latest)
        checks = [check(m, values[m.name], _number(base_metrics.get(m.name))) for m in gate.metrics]
        failed = [describe(m, c) for m, c in zip(gate.metrics, checks) if not c.passed]
        if failed:
            return GateResult(status="regressed", baseline_run=baseline_run, checks=checks, export_uri=uri,
                              reason=f"{'; '.join(failed)} (baseline run {baseline_run})")
        reason = f"within thresholds of baseline run {baseline_run}: " + "; ".join(
            describe(m, c) for m, c in zip(gate.metrics, checks))

    alias = {"run_id": record.run_id, "pipeline": record.pipeline, "model_stage": gate.model,
             "export_uri": uri, "metrics": values, "promoted_at": time.time() if now is None else now}
    data = json.dumps(alias, indent=2).encode()
    first = gate.metrics[0]
    best_value = _number(_metrics(best).get(first.name))
    to_move = ["latest"]
    if best_value is None or _better(first, values[first.name], best_value):
        to_move.append("best")
    moved: list[str] = []
    for name in to_move:
        try:
            storage.write_bytes(alias_key(record.pipeline, name), data)
        except Exception as e:  # a storage failure must not turn a finished run into a failed one
            return GateResult(status="error", baseline_run=baseline_run, checks=checks, moved=moved, export_uri=uri,
                              reason=f"could not write {storage.url(alias_key(record.pipeline, name))}: "
                                     f"{type(e).__name__}: {e}; "
                                     + (f"moved {', '.join(moved)} only" if moved else "nothing promoted"))
        moved.append(name)
    return GateResult(status="promoted", baseline_run=baseline_run, checks=checks, moved=moved,
                      reason=reason, export_uri=uri)


def _metrics(alias: dict | None) -> dict:
    metrics = (alias or {}).get("metrics")
    return metrics if isinstance(metrics, dict) else {}


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)
