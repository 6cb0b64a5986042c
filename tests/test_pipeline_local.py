"""The whole pipeline end to end on S3 (a moto server on 127.0.0.1): tokenizer → preprocess →
pretrain → two fine-tunes side by side → evaluate; a cached rerun; a driver killed with SIGKILL
mid-pretraining and resumed under the same run id (after an operational change).

Outcomes are checked independently of the stages' own reports: the task loss is recomputed
from the exported models with transformers, the schedule from the record's timestamps.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from jobs.checkpoint import committed_steps
from jobs.storage import open_storage
from orchestrator import ray_runtime
from orchestrator.console import Console
from orchestrator.records import load_record
from orchestrator.runner import run_pipeline
from orchestrator.spec import parse_spec

pytestmark = pytest.mark.local

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def demo_spec(storage: str) -> str:
    """examples/demo.yaml with fewer steps: the same stages, kinds and wiring."""
    with open(os.path.join(REPO, "examples", "demo.yaml")) as f:
        raw = yaml.safe_load(f)
    raw["storage"] = storage
    raw["stages"]["pretrain"].update(steps=40, checkpoint_every=20)
    for name in ("sft_plurals", "sft_colors"):
        raw["stages"][name].update(steps=30, checkpoint_every=30)
    return yaml.safe_dump(raw)


def run(spec_text: str, run_id: str | None = None):
    spec = parse_spec(spec_text)
    return run_pipeline(spec, open_storage(spec.storage), run_id=run_id, console=Console(open(os.devnull, "w")))


def task_log_likelihood(hf_uri: str, task_file: str, tmp_path) -> float:
    """Summed log-likelihood of every response given its prompt, straight from the export."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jobs.evaluate import log_likelihood

    local = tmp_path / hf_uri.rstrip("/").replace("/", "_").replace(":", "")
    open_storage(hf_uri).download_prefix("", str(local))
    model = AutoModelForCausalLM.from_pretrained(str(local))
    tokenizer = AutoTokenizer.from_pretrained(str(local))
    with open(task_file) as f:
        rows = [json.loads(line) for line in f]
    return sum(log_likelihood(model, tokenizer, [(r["prompt"], r["response"]) for r in rows]))


def test_the_demo_pipeline_on_s3_trains_fine_tunes_evaluates_and_reruns_from_cache(
        s3_bucket, start_ray, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the pipeline's task files are relative to the repository
    start_ray()
    spec = demo_spec(f"{s3_bucket}/demo")
    record = run(spec, run_id="demo-s3")
    stages = record.stages
    assert record.status == "succeeded" and all(s.status == "succeeded" for s in stages.values())

    # Scheduling: the two fine-tunes (one CPU each on a 2-CPU cluster) ran side by side, and
    # evaluation started only once every model it reads was committed.
    a, b = stages["sft_plurals"], stages["sft_colors"]
    assert a.started_at < b.finished_at and b.started_at < a.finished_at
    assert stages["eval"].started_at >= max(a.finished_at, b.finished_at, stages["pretrain"].finished_at)

    # Fine-tuning taught each task: the response loss on its own data is lower than the pretrained model's.
    pretrain_hf = stages["pretrain"].output_uri + "/hf"
    for name, task in (("sft_plurals", "plurals"), ("sft_colors", "colors")):
        task_file = os.path.join(REPO, "examples", "tasks", f"{task}.jsonl")
        tuned = task_log_likelihood(stages[name].output_uri + "/hf", task_file, tmp_path)
        assert tuned > task_log_likelihood(pretrain_hf, task_file, tmp_path), name

    # Evaluation: finite numbers for every model, and the pretrained model beats a uniform one.
    results = stages["eval"].metrics["results"]
    assert set(results) == {"pretrain", "sft_plurals", "sft_colors"}
    for label, result in results.items():
        assert math.isfinite(result["perplexity"]["perplexity"])
        assert 0 <= result["tasks"]["plurals"]["acc"] <= 1 and 0 <= result["tasks"]["colors"]["exact_match"] <= 1
    assert results["pretrain"]["perplexity"]["perplexity"] < stages["tok"].metrics["vocab_size"]
    eval_dir = open_storage(stages["eval"].output_uri)
    assert json.loads(eval_dir.read_bytes("results/sft_colors.json")) == results["sft_colors"]

    # The run's logs and report are in storage beside its record.
    root = open_storage(f"{s3_bucket}/demo")
    assert "step     40" in root.read_bytes("runs/demo-s3/logs/pretrain.log").decode()
    report = root.read_bytes("runs/demo-s3/report.md").decode()
    assert "sft_colors" in report and root.exists("runs/demo-s3/loss.png")

    # An unchanged pipeline again: every stage a cache hit, and Ray is not even connected to.
    def no_ray(*args, **kwargs):
        raise AssertionError("a cached rerun must not start or connect to Ray")
    monkeypatch.setattr(ray_runtime, "connect", no_ray)
    again = run(spec)
    assert again.status == "succeeded" and all(s.cached for s in again.stages.values())
    assert again.stages["eval"].metrics == stages["eval"].metrics


def test_a_driver_killed_mid_pretraining_resumes_under_the_same_run_id(s3_bucket, start_ray, tmp_path):
    storage = f"{s3_bucket}/kill"
    with open(os.path.join(REPO, "examples", "demo.yaml")) as f:
        raw = yaml.safe_load(f)
    source = {"paths": [os.path.join(REPO, "examples", "data", "*.jsonl")], "format": "jsonl"}
    raw["stages"] = {name: raw["stages"][name] for name in ("tok", "corpus", "pretrain")}
    raw["stages"]["tok"]["source"] = raw["stages"]["corpus"]["source"] = source
    raw["stages"]["pretrain"].update(steps=60, checkpoint_every=10, log_every=10)
    spec_file = tmp_path / "pipeline.yaml"
    spec_file.write_text(yaml.safe_dump(raw))

    driver = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "run", str(spec_file), "--run-id", "kill",
                               "--storage", storage], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ckpt = None
        deadline = time.time() + 300
        while time.time() < deadline and driver.poll() is None:
            record = load_record(open_storage(storage), "kill")
            stage = record.stages.get("pretrain") if record else None
            if stage and stage.status == "running":
                ckpt = ckpt or open_storage(stage.output_uri).sub("ckpt")
                if committed_steps(ckpt)[0]:
                    break
            time.sleep(0.5)
        assert driver.poll() is None, "the driver ended before its first checkpoint"
        assert ckpt is not None and committed_steps(ckpt)[0], "no checkpoint was committed in time"
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()

    killed = load_record(open_storage(storage), "kill")
    assert killed.status == "running" and killed.stages["pretrain"].status == "running"  # what kill -9 leaves
    # Resumed with operational changes only (another log interval, more restarts allowed): the
    # same run and the same checkpoints, and the new interval takes effect.
    start_ray()
    raw["stages"]["pretrain"].update(log_every=5, max_failures=2)
    resumed = run(yaml.safe_dump({**raw, "storage": storage}), run_id="kill")
    stage = resumed.stages["pretrain"]
    assert resumed.status == "succeeded" and resumed.attempts == 2
    assert stage.attempts == 2 and stage.metrics["resumed_from"] >= 10
    assert "step     55" in open_storage(storage).read_bytes("runs/kill/logs/pretrain.log").decode()
    assert resumed.stages["tok"].cached and resumed.stages["corpus"].cached
    assert committed_steps(open_storage(stage.output_uri).sub("ckpt"))[0][0] == 60


def test_evaluation_follows_training_and_continued_pretraining_starts_from_a_checkpoint(s3_bucket, start_ray):
    source = {"paths": [os.path.join(REPO, "examples", "data", "*.jsonl")], "format": "jsonl"}
    spec = json.dumps({"name": "follow", "storage": f"{s3_bucket}/follow", "stages": {
        "tok": {"kind": "tokenizer", "source": source, "vocab_size": 1024, "sample_mb": 0.5},
        "corpus": {"kind": "preprocess", "source": source, "tokenizer": "tok", "seq_len": 64, "shard_mb": 1},
        "pretrain": {"kind": "pretrain", "data": "corpus", "steps": 30, "checkpoint_every": 10, "keep_last": 3,
                     "micro_batch": 8, "lr": 0.003, "warmup_steps": 2, "num_workers": 1,
                     "model": {"preset": "tiny", "max_position_embeddings": 64}},
        "watch": {"kind": "evaluate", "follow": "pretrain", "data": "corpus", "max_val_sequences": 16},
        "more": {"kind": "finetune", "init": "pretrain", "init_step": 20, "data": "corpus", "steps": 10,
                 "log_every": 5, "checkpoint_every": 10, "micro_batch": 8, "num_workers": 1},
    }})
    start_ray()
    record = run(spec)
    watch, pretrain = record.stages["watch"], record.stages["pretrain"]
    assert record.status == "succeeded"
    assert watch.started_at < pretrain.finished_at  # it ran beside training (1 CPU each on 2)
    results = watch.metrics["results"]
    assert set(results) == {"pretrain@10", "pretrain@20", "pretrain@30"}
    perplexity = [results[f"pretrain@{step}"]["perplexity"]["perplexity"] for step in (10, 20, 30)]
    assert perplexity[2] < perplexity[0]

    # Continued pretraining from the step-20 checkpoint (exported for it): it starts where that
    # checkpoint was, below pretraining's mean loss over steps 11-20 (a fresh model starts at
    # about ln(vocab_size)).
    more = record.stages["more"]
    assert open_storage(more.output_uri).exists("init/model.safetensors")
    first_loss = more.metrics["loss_history"][0][1]
    assert pretrain.metrics["loss_history"][1][0] == 20
    assert first_loss < pretrain.metrics["loss_history"][1][1]
    assert math.isfinite(more.metrics["final_loss"])
