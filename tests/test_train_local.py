"""Pretraining end to end: real Ray Train, real DeepSpeed (CPU, gloo, 2 workers), tiny Llama.

Outcomes are checked against independent computations: the loss curve, checkpoints listed and
checksummed in storage, the export reloaded with transformers, weights of an interrupted run
compared bit for bit with those of an uninterrupted one, and Ray Train's own record of the run
read back with Ray's `Result.from_path`.
"""

from __future__ import annotations

import json
import os
import uuid

import pytest
import torch

from jobs.checkpoint import committed_steps, step_key
from jobs.commit import verify_commit
from jobs.storage import open_storage
from orchestrator.cli import main as cli
from orchestrator.console import Console
from orchestrator.errors import UserError
from orchestrator.ray_runtime import WORKER_ENV
from orchestrator.records import load_record
from orchestrator.runner import run_pipeline
from orchestrator.spec import parse_spec

pytestmark = pytest.mark.local

STEPS, EVERY = 12, 4


def pipeline(storage: str, **train) -> str:
    source = {"paths": [os.path.join(os.path.dirname(__file__), "..", "examples", "data", "*.jsonl")]}
    options = {"steps": STEPS, "checkpoint_every": EVERY, "log_every": EVERY, "micro_batch": 4, "lr": 0.003,
               "warmup_steps": 2, "zero_stage": 2, "model": {"preset": "tiny", "max_position_embeddings": 128},
               **train}
    return json.dumps({"name": "train-test", "storage": storage, "stages": {
        "tok": {"kind": "tokenizer", "source": source, "vocab_size": 1024, "sample_mb": 0.5},
        "corpus": {"kind": "preprocess", "source": source, "tokenizer": "tok", "seq_len": 64, "shard_mb": 1},
        "pretrain": {"kind": "pretrain", "data": "corpus", **options},
    }})


def run(spec_text: str, run_id: str | None = None):
    spec = parse_spec(spec_text)
    return run_pipeline(spec, open_storage(spec.storage), run_id=run_id, console=Console(open(os.devnull, "w")))


def ray_train_record(stage_uri: str):
    """Ray Train's record of a training stage's last fit, as Ray's tooling reads it back, and the
    path it should name for the stage's checkpoint at a step."""
    import pyarrow.fs
    from ray.train import Result

    scheme, path = stage_uri.split("://", 1)
    filesystem = pyarrow.fs.S3FileSystem(endpoint_override=os.environ["AWS_ENDPOINT_URL"]) if scheme == "s3" else None
    return Result.from_path(path, storage_filesystem=filesystem), lambda step: f"{path}/ckpt/{step_key(step)}"


def assert_ray_train_has_the_kept_checkpoints(stage, steps: list[int]):
    """Ray Train registered the checkpoints the stage keeps, in place (its record names our
    committed directories: nothing was uploaded again), each with the metrics of its step."""
    result, path_of = ray_train_record(stage.output_uri)
    assert [(c.path, m["step"]) for c, m in result.best_checkpoints] == [(path_of(s), s) for s in steps]
    assert result.checkpoint.path == path_of(steps[-1]) and result.metrics["step"] == steps[-1]
    assert result.metrics["loss"] == stage.metrics["final_loss"]
    assert list(result.metrics_dataframe["step"]) == steps
    stage_dir = open_storage(stage.output_uri)
    assert {o.key.split("/")[0] for o in stage_dir.list("") if "/" in o.key} == {"ckpt", "hf", "tb", "_LEASE"}
    assert {o.key.split("/")[1] for o in stage_dir.list("ckpt/")} == {step_key(s) for s in steps}


def weights(record) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(open_storage(record.stages["pretrain"].output_uri).read_bytes("hf/model.safetensors"))


@pytest.fixture(scope="module")
def trained(s3_server):
    """One uninterrupted run per ZeRO stage, on S3; later tests compare against them."""
    import boto3
    import ray

    bucket = f"train-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
             runtime_env={"env_vars": WORKER_ENV})
    try:
        yield {zero: run(pipeline(f"s3://{bucket}/p", zero_stage=zero)) for zero in (1, 2, 3)}
    finally:
        ray.shutdown()


@pytest.mark.parametrize("zero_stage", [1, 2, 3])
def test_zero_stage_trains_and_commits_checkpoints_to_s3(trained, zero_stage):
    record = trained[zero_stage]
    stage = record.stages["pretrain"]
    assert record.status == "succeeded" and stage.status == "succeeded"
    losses = [loss for _, loss in stage.metrics["loss_history"]]
    assert [step for step, _ in stage.metrics["loss_history"]] == [4, 8, 12]
    assert losses[-1] < losses[0] - 0.5  # it learns: ~1 nat in 12 steps on this corpus
    assert stage.metrics["final_loss"] == losses[-1]
    # Checkpoints: the last two kept (keep_last=2), each committed with every rank's files.
    ckpt = open_storage(stage.output_uri).sub("ckpt")
    steps, ignored = committed_steps(ckpt)
    assert steps == [12, 8] and ignored == []
    for step in steps:
        step_dir = ckpt.sub(step_key(step))
        assert verify_commit(step_dir, "COMMIT.json", deep=True) == []
        commit = json.loads(step_dir.read_bytes("COMMIT.json"))
        assert commit["step"] == step and commit["data_position"] == step * 4 * 2
        ranks = {"zero_pp_rank_0", "zero_pp_rank_1"}
        assert all(any(r in name for name in commit["files"]) for r in ranks)
    assert not ckpt.list(step_key(4))  # retention removed the oldest
    assert stage.metrics["export_max_logit_diff"] < 1e-4
    assert stage.metrics["last_checkpoint"] == ckpt.url(step_key(12))
    assert_ray_train_has_the_kept_checkpoints(stage, [8, 12])
    # The honest numbers: achieved FLOP/s and peak memory (a CPU worker's resident memory); no MFU
    # without a stated peak; what each speed lever did on this CPU.
    assert stage.metrics["tflops_per_device"] > 0 and stage.metrics["mfu"] is None
    assert 0.1 < stage.metrics["peak_memory_gib"] < 24
    assert stage.metrics["speed"]["attention"] == "sdpa (flash)"
    assert stage.metrics["speed"]["compile"].startswith("off (auto")


def test_export_reproduces_the_trained_model(trained, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    record = trained[3]
    stage_dir = open_storage(record.stages["pretrain"].output_uri)
    stage_dir.download_prefix("hf", str(tmp_path / "hf"))
    # The CLI consolidates the ZeRO-3 shards of the last checkpoint independently of the engine.
    assert cli(["export", record.run_id, "--storage", record.storage, "--out", str(tmp_path / "cli")]) == 0
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    batch = tokenizer(["Once upon a time, a little fox", "The sun was warm and"], return_tensors="pt",
                      padding=True).input_ids
    trained = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))(batch).logits
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "cli"))(batch).logits
    assert torch.equal(trained, exported)
    assert AutoTokenizer.from_pretrained(str(tmp_path / "cli")).eos_token == "<|endoftext|>"


def losses(metrics: dict) -> list[float]:
    return [loss for _, loss in metrics["loss_history"]]


def test_zero3_shards_the_model_from_its_construction_and_trains_like_zero2(trained):
    z2, z3 = (trained[zero].stages["pretrain"].metrics for zero in (2, 3))
    model = z3["model_param_bytes"]
    assert model == z2["model_param_bytes"] > 0
    assert z2["param_bytes_per_rank"] == [model, model]  # ZeRO-2: every rank builds the whole model
    # ZeRO-3: each rank's partitions, right after construction: half, plus at most a padding element
    # per parameter for the odd sizes.
    assert all(model / 2 <= b <= model / 2 + 4 * 64 for b in z3["param_bytes_per_rank"]), z3["param_bytes_per_rank"]
    # The same seed gives the same initial weights whatever the stage, so the same losses.
    assert losses(z3) == pytest.approx(losses(z2), rel=1e-4)
    assert losses(trained[1].stages["pretrain"].metrics) == pytest.approx(losses(z2), rel=1e-4)


def test_init_from_an_export_under_zero3_loads_sharded_and_starts_where_zero2_does(trained):
    spec = json.loads(pipeline(trained[2].storage))  # the pretrain stage is cached
    spec["stages"].update({f"ft{zero}": {"kind": "finetune", "init": "pretrain", "data": "corpus", "steps": 4,
                                         "log_every": 1, "checkpoint_every": 4, "micro_batch": 4, "lr": 1e-3,
                                         "warmup_steps": 1, "zero_stage": zero} for zero in (2, 3)})
    record = run(json.dumps(spec))
    assert record.stages["pretrain"].cached
    ft2, ft3 = (record.stages[f"ft{zero}"].metrics for zero in (2, 3))
    assert all(b <= ft3["model_param_bytes"] / 2 + 4 * 64 for b in ft3["param_bytes_per_rank"])
    assert losses(ft3) == pytest.approx(losses(ft2), rel=1e-4)
    # It starts from the trained weights: its first loss is near where pretraining ended.
    assert losses(ft2)[0] < losses(trained[2].stages["pretrain"].metrics)[0] - 0.5


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_worker_crash_resumes_to_identical_weights(trained, start_ray, tmp_path, zero_stage):
    baseline = trained[zero_stage]  # the same pipeline, uninterrupted
    start_ray(ORCHESTRATOR_CRASH_AT="train:11", ORCHESTRATOR_CRASH_ONCE_DIR=str(tmp_path / "once"))
    crashed = run(pipeline(f"file://{tmp_path}/crashed", zero_stage=zero_stage))
    stage = crashed.stages["pretrain"]
    assert os.path.exists(tmp_path / "once" / "crashed-train-11")  # a worker really died at step 11
    assert stage.status == "succeeded" and stage.attempts == 2
    assert stage.metrics["resumed_from"] == 8 and stage.metrics["restarts"] == 1
    # The second worker group registered the step it resumed from, which the first had no save left to.
    assert_ray_train_has_the_kept_checkpoints(stage, [8, 12])
    expected, actual = weights(baseline), weights(crashed)
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name


def test_torn_checkpoint_is_skipped_and_the_driver_resumes(start_ray, monkeypatch, tmp_path):
    storage = f"file://{tmp_path}/store"
    start_ray(ORCHESTRATOR_CRASH_AT="train:11")  # every attempt dies: the stage fails
    with pytest.raises(Exception):
        run(pipeline(storage, max_failures=0), run_id="torn")
    failed = load_record(open_storage(storage), "torn")
    assert failed.stages["pretrain"].status == "failed"
    ckpt = open_storage(failed.stages["pretrain"].output_uri).sub("ckpt")
    assert committed_steps(ckpt)[0] == [8, 4]
    # Flip one byte of one rank's file of the newest checkpoint: sizes still match, checksums do not.
    victim = next(o.key for o in ckpt.list(step_key(8)) if "optim_states" in o.key)
    data = bytearray(ckpt.read_bytes(victim))
    data[len(data) // 2] ^= 0xFF
    ckpt.write_bytes(victim, bytes(data))

    monkeypatch.delenv("ORCHESTRATOR_CRASH_AT")
    start_ray()
    resumed = run(pipeline(storage, max_failures=0), run_id="torn")
    stage = resumed.stages["pretrain"]
    assert resumed.status == "succeeded" and resumed.attempts == 2
    assert stage.attempts == 2 and stage.metrics["resumed_from"] == 4
    assert resumed.stages["corpus"].cached and resumed.stages["tok"].cached


def test_more_workers_than_the_cluster_holds_fails_before_training(start_ray, tmp_path):
    start_ray()
    with pytest.raises(UserError, match=r"stages.pretrain: needs 2 GPU in all \(2 x \{CPU: 1, GPU: 1\}\), but the cluster has 0 GPU"):
        run(pipeline(f"file://{tmp_path}/store", use_gpu=True))
