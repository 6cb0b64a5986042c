"""A run's report (`runs/<run_id>/report.md`, with `loss-<stage>.png` per training stage and
`loss.png` when there are several): what ran, how long it took, the loss curves, each data
mixture's tokens and perplexity per source, the evaluation compared across models, and where the
exported models are. Written beside the run record, so the images are linked relatively and the
report reads the same on disk, in an S3 console or a copy.

The stage table and the key metric per stage are shared with `orchestrator status`.
matplotlib is imported only where a curve is drawn: it is slow to import, and `validate` and
`status` must not pay for it.
"""

from __future__ import annotations

import io
import time

from jobs.storage import Storage
from orchestrator.console import key_metrics
from orchestrator.kinds import KINDS
from orchestrator.kinds.base import StageResults
from orchestrator.kinds.evaluate import EvaluateResults, ModelEvaluation, main_metric
from orchestrator.kinds.training import TrainResults
from orchestrator.records import RunRecord

TASK_METRICS = ("acc", "exact_match", "acc_norm")
"""A task's main metric: the first of these that its results have (multiple-choice tasks report
acc and acc_norm, generation tasks exact_match), as the evaluate stage's own summary picks it; an
lm-eval task with none of them shows its first metric (kinds.evaluate.main_metric)."""
STAGE_COLUMNS = ["stage", "kind", "status", "cached", "attempts", "time", "key metric"]


def write_report(storage: Storage, record: RunRecord) -> str:
    """Write the report and its images under `runs/<run_id>/`; returns the report's URL."""
    base = f"runs/{record.run_id}"
    curves = {name: [list(point) for point in results.loss_history] for name, results in _results(record, TrainResults)
              if results.loss_history}
    images = {}
    for name, history in curves.items():
        images[f"loss-{name}.png"] = f"{name} training loss"
        storage.write_bytes(f"{base}/loss-{name}.png", _loss_png({name: history}, f"{name}: training loss"))
    if len(curves) >= 2:
        images["loss.png"] = "all training stages"
        storage.write_bytes(f"{base}/loss.png", _loss_png(curves, "training loss"))
    key = f"{base}/report.md"
    storage.write_bytes(key, report_markdown(record, images).encode())
    return storage.url(key)


def report_markdown(record: RunRecord, images: dict[str, str]) -> str:
    """The report's text; `images` maps a file name beside the report to its caption."""
    lines = [f"# Run {record.run_id}", "",
             f"- pipeline: `{record.pipeline}`",
             f"- status: **{record.status}** (driver attempt {record.attempts})",
             f"- started: {format_time(record.started_at)}"]
    if record.finished_at is not None:
        lines.append(f"- finished: {format_time(record.finished_at)} "
                     f"({format_duration(record.finished_at - record.started_at)})")
    lines += [f"- storage: `{record.storage}`", "", "## Stages", "", *_markdown_table(stage_rows(record))]
    failed = [(name, s.error) for name, s in record.stages.items() if s.error]
    if failed:
        lines += ["", "Errors:", ""] + [f"- `{name}`: {_cell(error)}" for name, error in failed]
    if images:
        lines += ["", "## Training loss"]
        for name, caption in images.items():
            lines += ["", f"![{caption}]({name})"]
    for name, results in _results(record, TrainResults):
        if results.tokens_per_source:
            lines += ["", f"## Data mixture: {name}", "", *_markdown_table(mixture_table(results))]
    for name, results in _results(record, EvaluateResults):
        if results.results:
            lines += ["", f"## Evaluation: {name}", "", *_markdown_table(evaluation_table(results.results))]
    models = [(name, s.output_uri) for name, s in record.stages.items()
              if KINDS[s.kind].exports_model and s.status == "succeeded"]
    if models:
        lines += ["", "## Models", "", "Hugging Face format (`transformers.AutoModelForCausalLM.from_pretrained`):", ""]
        lines += [f"- `{name}`: `{uri.rstrip('/')}/hf/`" for name, uri in models]
    return "\n".join(lines) + "\n"


def stage_rows(record: RunRecord, now: float | None = None) -> list[list[str]]:
    """One row per stage under a header row (STAGE_COLUMNS); a running stage's time runs to `now`."""
    now = time.time() if now is None else now
    rows = [STAGE_COLUMNS]
    for name, s in record.stages.items():
        end = s.finished_at if s.finished_at is not None else (now if s.status == "running" else None)
        took = "-" if s.cached or s.started_at is None or end is None else format_duration(end - s.started_at)
        rows.append([name, s.kind, s.status, "yes" if s.cached else "no", str(s.attempts), took, key_metrics(s)])
    return rows


def _results(record: RunRecord, of: type[StageResults]) -> list[tuple[str, StageResults]]:
    """(stage, typed results) of the record's stages whose results are `of`'s."""
    found = [(name, KINDS[s.kind].results_of(s.metrics)) for name, s in record.stages.items() if s.kind in KINDS]
    return [(name, r) for name, r in found if isinstance(r, of)]


def mixture_table(results: TrainResults) -> list[list[str]]:
    """A mixture's sources as rows under a header row: tokens trained on, their share, and the
    model's perplexity on the source's validation split."""
    total = sum(results.tokens_per_source.values())
    perplexity = results.val_perplexity or {}
    rows = [["source", "tokens", "share", "validation perplexity"]]
    for source, tokens in results.tokens_per_source.items():
        shown = f"{perplexity[source]:.2f}" if source in perplexity else "-"
        rows.append([source, f"{tokens:,}", f"{tokens / total:.1%}", shown])
    return rows


def evaluation_table(results: dict[str, ModelEvaluation]) -> list[list[str]]:
    """An evaluate stage's `metrics.results` as rows = models under a header row; columns =
    perplexity (when any model has it), then each task's main metric (TASK_METRICS)."""
    has_perplexity = any(r.perplexity for r in results.values())
    tasks: dict[str, str] = {}  # task -> its main metric, in order of first appearance
    for r in results.values():
        for task, scores in r.tasks.items():
            metric = next((k for k in TASK_METRICS if scores.get(k) is not None), None) or main_metric(scores)
            if metric and (task not in tasks or _rank(metric) < _rank(tasks[task])):
                tasks[task] = metric
    rows = [["model"] + (["perplexity"] if has_perplexity else []) + [f"{t} ({m})" for t, m in tasks.items()]]
    for label, r in results.items():
        row = [label]
        if has_perplexity:
            row.append(f"{r.perplexity.perplexity:.2f}" if r.perplexity else "-")
        for task, metric in tasks.items():
            value = r.tasks.get(task, {}).get(metric)
            row.append("-" if value is None else f"{value:.3f}")
        rows.append(row)
    return rows


def _rank(metric: str) -> int:
    return TASK_METRICS.index(metric) if metric in TASK_METRICS else len(TASK_METRICS)


def format_time(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def format_duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m {secs:02d}s" if minutes < 60 else f"{minutes // 60}h {minutes % 60:02d}m"


def _markdown_table(rows: list[list[str]]) -> list[str]:
    header, *body = rows
    return [_row(header), _row(["---"] * len(header)), *(_row(r) for r in body)]


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")  # one line, and no column break


def _loss_png(curves: dict[str, list], title: str) -> bytes:
    """Loss against step, one line per stage, as PNG bytes. The object API with the Agg canvas:
    no pyplot, so no global figure state and no display backend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for name, history in curves.items():
        steps, losses = zip(*history)
        axes.plot(steps, losses, label=name, marker="." if len(steps) < 30 else None)
    axes.set(title=title, xlabel="step", ylabel="loss")
    axes.grid(True, alpha=0.3)
    if len(curves) > 1:
        axes.legend()
    figure.tight_layout()
    out = io.BytesIO()
    figure.savefig(out, format="png")
    return out.getvalue()
