"""The evaluate stage: every model of `models` on the same measures, one Ray task per model;
with `follow`, also every checkpoint of a training stage, as it gets committed, while it trains.

Task files and the starting models live on the driver's disk or in storage; the stage copies the
task files into its own output first so that a task on any node reads them: a native task's rows as
`tasks/<name>.jsonl`, a local lm-eval task as `tasks/<name>/task.yaml` (its includes merged in) with
its data files (local or s3://) under `tasks/<name>/data/`. Each model's results land in
`results/<label>.json`; the run record gets the comparison (`metrics.results`).
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import ray
import yaml

from jobs import lora
from jobs.checkpoint import committed_steps
from jobs.commit import FileEntry, bytes_entry, file_entry
from jobs.data import PackedTokens
from jobs.evaluate import TaskSpec, evaluate_model
from jobs.harness import LmEvalTaskSpec, map_data_files, read_task_yaml, run_harness
from jobs.storage import Storage, open_storage, split_uri
from orchestrator.kinds.evaluate import AdapterRef, evaluation_summary
from orchestrator.spec import ModelRef, model_label
from orchestrator.stages import StageContext, StageOutput
from orchestrator.stages.model_inputs import resolve_model

_FOLLOW_POLL_S = 2.0


def run(ctx: StageContext) -> StageOutput:
    spec = ctx.spec
    files: dict[str, FileEntry] = {}
    tasks_uri = None
    if spec.tasks:
        for task in spec.tasks:
            if isinstance(task, TaskSpec):
                ctx.out.upload_file(task.path, f"tasks/{task.name}.jsonl")
                files[f"tasks/{task.name}.jsonl"] = file_entry(task.path)
            elif task.yaml is not None:
                files.update(_stage_task_yaml(ctx.out, task))
        tasks_uri = ctx.out.url("tasks")
    results: dict[str, dict] = {}

    def evaluate(ref, stage_uri: str | None) -> None:
        label = model_label(ref)
        ctx.console.line(f"evaluating {label}")
        step = ref.step if isinstance(ref, ModelRef) else None
        if isinstance(ref, AdapterRef):
            model_uri, staged = open_storage(stage_uri).url(lora.ADAPTER_DIR), {}
        else:
            model_uri, staged = resolve_model(ctx.out, ref, stage_uri, step, f"models/{label}")
        files.update(staged)
        options = {"num_cpus": spec.cpus, "num_gpus": 1 if spec.use_gpu else 0}
        results[label] = ray.get(_evaluate.options(**options).remote(
            model_uri, list(spec.tasks), tasks_uri, ctx.inputs.get("data"), spec.max_val_sequences, spec.batch_size))
        body = json.dumps(results[label], indent=2, sort_keys=True).encode()
        ctx.out.write_bytes(f"results/{label}.json", body)
        files[f"results/{label}.json"] = bytes_entry(body)
        ctx.console.line(f"{label}: {evaluation_summary(results[label])}")

    if spec.follow:
        _follow(ctx, evaluate)
    for i, ref in enumerate(spec.models):
        evaluate(ref, ctx.inputs.get(f"models[{i}]"))
    return StageOutput(files, {"results": results})


def _stage_task_yaml(out: Storage, task: LmEvalTaskSpec) -> dict[str, FileEntry]:
    """Copy a local lm-eval task into the stage's output: its config (includes merged) naming its
    data files by their copies' paths relative to `tasks/<name>/`, and the copies."""
    prefix = f"tasks/{task.name}"
    copies: dict[str, str] = {}  # data file (path or s3:// URI) -> its copy, relative to prefix

    def copy_name(source: str) -> str:
        return copies.setdefault(source, f"data/{len(copies)}-{source.rstrip('/').rsplit('/', 1)[-1]}")

    config = map_data_files(read_task_yaml(task.yaml)[0], copy_name)
    files: dict[str, FileEntry] = {}
    with tempfile.TemporaryDirectory(prefix="orchestrator-task-") as tmp:
        for source, name in copies.items():
            local = source
            if source.startswith("s3://"):
                storage, key = split_uri(source)
                local = os.path.join(tmp, name)
                storage.download_file(key, local)
            out.upload_file(local, f"{prefix}/{name}")
            files[f"{prefix}/{name}"] = file_entry(local)
    body = yaml.safe_dump(config, sort_keys=False).encode()
    out.write_bytes(f"{prefix}/task.yaml", body)
    files[f"{prefix}/task.yaml"] = bytes_entry(body)
    return files


def _follow(ctx: StageContext, evaluate) -> None:
    """Evaluate each checkpoint of the followed stage once it is committed, until that stage has
    ended and every checkpoint it kept has been evaluated."""
    name, stage_uri = ctx.spec.follow, ctx.inputs["follow"]
    ckpt = open_storage(stage_uri).sub("ckpt")
    done: set[int] = set()
    while True:
        running = ctx.is_running(name)  # read before listing: a final checkpoint is never missed
        for step in sorted(set(committed_steps(ckpt)[0]) - done):
            done.add(step)
            try:
                evaluate(ModelRef(stage=name, step=step), stage_uri)
            except Exception as e:
                # Retention may delete a checkpoint while another one is evaluated: that one is
                # skipped. Storage decides, not the exception's class: Ray re-raises a remote
                # failure as its original class, so a ValueError may be any bug in the evaluation.
                if step in committed_steps(ckpt)[0]:
                    raise
                ctx.console.line(f"skipped {name}@{step}: retention deleted it before it was evaluated ({e})")
        if not running:
            return
        time.sleep(_FOLLOW_POLL_S)


@ray.remote
def _evaluate(model_uri: str, tasks: list[TaskSpec | LmEvalTaskSpec], tasks_uri: str | None, data_uri: str | None,
              max_val_sequences: int, batch_size: int) -> dict:
    import torch

    with tempfile.TemporaryDirectory(prefix="orchestrator-eval-") as tmp:
        model_dir = os.path.join(tmp, "model")
        open_storage(model_uri).download_prefix("", model_dir)
        lora.localize_adapter(model_dir, os.path.join(tmp, "base"))  # an adapter: its base model beside it
        local_tasks, harness_tasks = [], []
        for task in tasks:
            if isinstance(task, LmEvalTaskSpec):
                harness_tasks.append((task, task.task if task.yaml is None else _local_config(tasks_uri, task, tmp)))
                continue
            path = os.path.join(tmp, "tasks", f"{task.name}.jsonl")
            open_storage(tasks_uri).download_file(f"{task.name}.jsonl", path)
            local_tasks.append(task.model_copy(update={"path": path}))
        val = None
        if data_uri:
            val = _validation_sequences(data_uri, max_val_sequences, os.path.join(tmp, "cache"))
            if val is None:
                raise ValueError(f"{data_uri} has no validation sequences; raise its validation_fraction")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        results = {"tasks": {}}
        if local_tasks or val is not None:
            results = evaluate_model(model_dir, local_tasks, val_sequences=val, batch_size=batch_size, device=device)
        if harness_tasks:
            results["tasks"].update(run_harness(model_dir, harness_tasks, batch_size, device))
        results["tasks"] = {task.name: results["tasks"][task.name] for task in tasks}  # in the spec's order
        return results


def _local_config(tasks_uri: str, task: LmEvalTaskSpec, tmp: str) -> dict:
    """A staged lm-eval task's config, downloaded with its data files, which it names by path."""
    task_dir = os.path.join(tmp, "tasks", task.name)
    open_storage(tasks_uri).sub(task.name).download_prefix("", task_dir)
    with open(os.path.join(task_dir, "task.yaml")) as f:
        config = yaml.safe_load(f)
    return map_data_files(config, lambda name: os.path.join(task_dir, name))


@ray.remote
def source_perplexities(model_uri: str, data_uris: dict[str, str], max_val_sequences: int,
                        batch_size: int) -> dict[str, float]:
    """A data mixture's model on each source's validation split: source -> perplexity; a source
    without validation sequences is left out."""
    import torch
    from transformers import AutoModelForCausalLM

    from jobs.evaluate import perplexity

    with tempfile.TemporaryDirectory(prefix="orchestrator-eval-") as tmp:
        open_storage(model_uri).download_prefix("", os.path.join(tmp, "model"))
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if device == "cuda" else torch.float32  # as evaluate_model
        model = AutoModelForCausalLM.from_pretrained(os.path.join(tmp, "model"), dtype=dtype).to(device).eval()
        out = {}
        for source, data_uri in data_uris.items():
            val = _validation_sequences(data_uri, max_val_sequences, os.path.join(tmp, "cache"))
            if val is not None:
                out[source] = perplexity(model, val, batch_size)["perplexity"]
        return out


def _validation_sequences(data_uri: str, max_sequences: int, cache_dir: str):
    """The first `max_sequences` sequences of a preprocess stage's validation split, (n, seq_len)
    int64; None when the split is empty."""
    import numpy as np

    data = PackedTokens(data_uri, "val", cache_dir)
    if len(data) == 0:
        return None
    return np.stack([data.sequence(i) for i in range(min(len(data), max_sequences))]).astype(np.int64)
