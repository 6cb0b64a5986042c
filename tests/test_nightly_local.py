"""Three simulated nights of a real pipeline: the scheduler on a fake clock fires each tick, the
runner runs it for real (embedded Ray, DeepSpeed, file:// storage). Night 2 finds nothing new:
preprocessing is a cache hit and pretraining continues from night 1's weights; night 3 finds a new
corpus file: preprocessing reruns. Each night the regression gate moves the aliases."""

from __future__ import annotations

import json
import os
import shutil
from datetime import datetime, timedelta, timezone

import pytest
import yaml

from jobs.storage import open_storage
from orchestrator.console import Console
from orchestrator.gate import read_alias
from orchestrator.records import load_record
from orchestrator.runner import run_pipeline
from orchestrator.scheduler import Scheduler
from orchestrator.spec import parse_spec

pytestmark = pytest.mark.local

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "data")


class InProcessLauncher:
    """Runs each tick's pipeline right here, to the end, before the scheduler goes on."""

    def __init__(self, spec, storage):
        self.spec, self.storage = spec, storage

    def launch(self, run_id: str) -> bool:
        if load_record(self.storage, run_id) is not None:
            return False
        run_pipeline(self.spec, self.storage, run_id=run_id, console=Console())
        return True

    def state(self, run_id: str):
        record = load_record(self.storage, run_id)
        return None if record is None else ("active" if record.status in ("pending", "running") else record.status)

    def stop(self, run_id: str) -> None:
        raise AssertionError("no run should overlap another here")

    def follow_hint(self, run_id: str) -> str:
        return "ran in this process"


def pipeline(tmp_path, corpus_dir) -> str:
    return yaml.safe_dump({"name": "nightly", "storage": f"file://{tmp_path}/store",
                           "schedule": {"cron": "30 2 * * *", "timezone": "Europe/Berlin"},
                           "gate": {"stage": "eval", "model": "pretrain", "metrics": [
                               {"name": "pretrain/perplexity/perplexity", "higher_is_better": False,
                                "max_regression": 1000.0}]},
                           "stages": {
        # the tokenizer reads a file that does not change, so the token ids stay the same
        "tok": {"kind": "tokenizer", "source": {"paths": [f"{corpus_dir}/part-00000.jsonl"]}, "vocab_size": 1024,
                "sample_mb": 0.5},
        "corpus": {"kind": "preprocess", "source": {"paths": [f"{corpus_dir}/*.jsonl"]}, "tokenizer": "tok",
                   "seq_len": 64, "shard_mb": 1},
        "pretrain": {"kind": "pretrain", "init": "previous", "data": "corpus", "steps": 10, "checkpoint_every": 10,
                     "log_every": 5, "micro_batch": 8, "lr": 0.003, "warmup_steps": 2, "num_workers": 1,
                     "model": {"preset": "tiny", "max_position_embeddings": 64}},
        "eval": {"kind": "evaluate", "models": ["pretrain"], "data": "corpus", "max_val_sequences": 16},
    }})


def test_three_nights_reuse_what_did_not_change_and_continue_training(tmp_path, start_ray):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("part-00000.jsonl", "part-00001.jsonl"):
        shutil.copy(os.path.join(DATA, name), corpus / name)
    spec = parse_spec(pipeline(tmp_path, corpus))
    storage = open_storage(spec.storage)
    start_ray()
    now = [datetime(2026, 11, 24, 1, 25, tzinfo=timezone.utc)]  # 02:25 in Berlin
    said: list[str] = []
    scheduler = Scheduler(spec, storage, InProcessLauncher(spec, storage), clock=lambda: now[0].timestamp(),
                          say=said.append)

    def night(n: int):
        now[0] += timedelta(minutes=10)  # 02:35 Berlin: the tick is due
        (claim,) = scheduler.fire_due(now[0])
        now[0] += timedelta(days=1, minutes=-10)
        record = load_record(storage, claim.run_id)
        assert record.status == "succeeded", record
        return record

    first = night(1)
    assert first.run_id == "nightly-20261124T0130Z"
    assert not any(stage.cached for stage in first.stages.values())
    assert first.gate.status == "promoted" and set(first.gate.moved) == {"latest", "best"}
    assert said[-1] == f"{first.run_id} succeeded; gate: promoted (first promoted run)"

    second = night(2)
    assert second.stages["tok"].cached and second.stages["corpus"].cached  # nothing new: reused
    pretrain = second.stages["pretrain"]
    assert not pretrain.cached and pretrain.reason == f"changed: continues from run {first.run_id}"
    # warm start: night 2's first logged loss is below night 1's at the same step
    assert pretrain.metrics["loss_history"][0][1] < first.stages["pretrain"].metrics["loss_history"][0][1]
    assert second.gate.status == "promoted" and second.gate.baseline_run == first.run_id
    assert read_alias(storage, "nightly", "latest")["run_id"] == second.run_id
    assert read_alias(storage, "nightly", "latest")["export_uri"].startswith(pretrain.output_uri.rstrip("/"))

    shutil.copy(os.path.join(DATA, "part-00002.jsonl"), corpus / "part-00002.jsonl")  # new data arrives
    third = night(3)
    assert third.stages["tok"].cached
    assert not third.stages["corpus"].cached and "input files changed" in third.stages["corpus"].reason
    assert third.stages["corpus"].metrics["num_documents"] > second.stages["corpus"].metrics["num_documents"]
    assert f"continues from run {second.run_id}" in third.stages["pretrain"].reason
    assert [c.action for c in scheduler.claims()] == ["run"] * 3
    assert json.loads(storage.read_bytes(f"runs/{third.run_id}/run.json"))["gate"]["status"] == "promoted"
