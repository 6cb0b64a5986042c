"""The same training loop on CUDA: NCCL, bf16, MFU against the device's stated peak; the speed
levers (activation checkpointing, Liger's fused kernels) against the loop without them; and the
GPU benchmark's smallest configuration.

Skipped where there is no GPU. It needs neither Ray nor S3, so that it also runs on a GPU
machine that has only torch, transformers and DeepSpeed (and liger-kernel for the fused
kernels' test): the data is packed straight from the demo corpus (tests/packed.py) and the loop
runs bare under torchrun, one process per GPU (at most two). Run there with
`pytest --noconftest tests/test_train_gpu.py` (bench/gpu_pretrain.sh does).
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from packed import read_texts, write_packed_stage

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}
HAS_LIGER = importlib.util.find_spec("liger_kernel") is not None


def write_corpus(path) -> None:
    texts = read_texts(sorted(glob.glob(os.path.join(REPO, "examples", "data", "*.jsonl"))))
    write_packed_stage(str(path), texts, vocab_size=4096, seq_len=256)


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_bf16_nccl_training_learns_and_reports_mfu(tmp_path, zero_stage):
    write_corpus(tmp_path / "corpus")
    job = {"spec": {"steps": 40, "micro_batch": 8, "zero_stage": zero_stage, "lr": 3e-3, "warmup_steps": 4,
                    "log_every": 10, "checkpoint_every": 20, "model": {"preset": "tiny", "max_position_embeddings": 256}},
           "data_uri": f"file://{tmp_path}/corpus", "out_uri": f"file://{tmp_path}/train"}
    (tmp_path / "job.json").write_text(json.dumps(job))
    num_gpus = min(torch.cuda.device_count(), 2)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={num_gpus}",
                             "-m", "jobs.train", str(tmp_path / "job.json")],
                            capture_output=True, text=True, timeout=900, env=ENV, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    final = reports[-1]
    assert final["loss_history"][-1][1] < final["loss_history"][0][1] - 0.5
    assert final["export_max_logit_diff"] < 0.25  # bf16 engine vs fp32 reload
    assert os.path.exists(tmp_path / "train" / "hf" / "model.safetensors")
    assert os.path.exists(tmp_path / "train" / "ckpt" / "step-00000040" / "COMMIT.json")
    if any(name in torch.cuda.get_device_name(0) for name in ("H100", "H200", "A100")):
        assert 0 < final["mfu"] < 1


@pytest.fixture(scope="module")
def lever_runs(tmp_path_factory) -> dict:
    """Our loop on one GPU, ZeRO-2 bf16, once per speed setting on the same data and seed, in one
    torchrun launch (tests/train_variants.py): activation checkpointing none, selective, full,
    then Liger's fused kernels where installed. Liger patches transformers' Llama classes for the
    rest of the process, so its variant comes last; a variant that fails leaves those before it
    reported. Compile is off in all of them: each compares one lever with the loop without it.
    Returns {"runs": {variant: metrics}, "stderr": the launch's last output}."""
    tmp = tmp_path_factory.mktemp("levers")
    write_corpus(tmp / "corpus")
    speeds = {mode: {"activation_checkpointing": mode} for mode in ("none", "selective", "full")}
    if HAS_LIGER:
        speeds["liger"] = {"fused_kernels": "liger"}
    jobs = {name: {"spec": {"steps": 12, "micro_batch": 8, "lr": 3e-3, "warmup_steps": 2, "log_every": 1,
                            "checkpoint_every": 12, "model": {"preset": "tiny", "max_position_embeddings": 256},
                            "speed": {"compile": "off", "fused_kernels": "off", **speed}},
                   "data_uri": f"file://{tmp}/corpus", "out_uri": f"file://{tmp}/{name}"}
            for name, speed in speeds.items()}
    (tmp / "variants.json").write_text(json.dumps(jobs))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1",
                             os.path.join(REPO, "tests", "train_variants.py"), str(tmp / "variants.json")],
                            capture_output=True, text=True, timeout=900, env=ENV, cwd=tmp)
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith('{"variant"')]
    return {"runs": {line["variant"]: line["metrics"] for line in lines}, "stderr": result.stderr[-4000:]}


def variant(lever_runs: dict, name: str) -> dict:
    assert name in lever_runs["runs"], f"variant {name} did not finish:\n{lever_runs['stderr']}"
    return lever_runs["runs"][name]


def losses(metrics: dict) -> list[float]:
    return [loss for _, loss in metrics["loss_history"]]


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_activation_checkpointing_keeps_the_loss(lever_runs, mode):
    plain, checkpointed = losses(variant(lever_runs, "none")), losses(variant(lever_runs, mode))
    assert variant(lever_runs, mode)["speed"]["activation_checkpointing"] == mode
    assert plain[-1] < plain[0]  # it trains
    # The first step's forward runs the same kernels on the same weights: the same loss. Later
    # steps may differ in the last bits (flash attention's backward accumulates atomically), so
    # they only agree closely; the CPU test (tests/test_speed.py) asserts them bit for bit.
    assert checkpointed[0] == pytest.approx(plain[0], rel=1e-4)
    assert checkpointed == pytest.approx(plain, rel=2e-2)


@pytest.mark.skipif(not HAS_LIGER, reason="liger-kernel is not installed")
def test_fused_kernels_train_like_plain_ones(lever_runs):
    fused, plain = losses(variant(lever_runs, "liger")), losses(variant(lever_runs, "none"))
    assert variant(lever_runs, "liger")["speed"]["fused_kernels"] == "liger"
    # Other kernels in bf16 (8 bits of mantissa): the same model's loss within bf16's rounding at
    # the start, and the same curve within a few percent after 12 steps at a high learning rate.
    assert fused[0] == pytest.approx(plain[0], rel=1e-2)
    assert fused == pytest.approx(plain, rel=3e-2)
    assert fused[-1] < fused[0]
    assert variant(lever_runs, "liger")["export_max_logit_diff"] < 0.25  # what was trained is what is exported


def test_bench_smallest_configuration(tmp_path):
    """bench/gpu_pretrain.py end to end on the GPU, in its smallest configuration: the eager lever
    set, tiny model, seq 256, the micro batch search capped at 8."""
    out = tmp_path / "bench.jsonl"
    result = subprocess.run([sys.executable, os.path.join(REPO, "bench", "gpu_pretrain.py"), "--presets", "tiny",
                             "--seq-len", "256", "--vocab", "4096", "--levers", "eager", "--ac", "none",
                             "--max-micro-batch", "8", "--warmup", "2", "--steps", "5", "--budget", "200",
                             "--json", str(out), "--log", str(tmp_path / "workers.log")],
                            capture_output=True, text=True, timeout=400, env=ENV, cwd=REPO)
    log = (tmp_path / "workers.log").read_text(errors="replace") if (tmp_path / "workers.log").exists() else ""
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:] + log[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    search = next(r for r in records if r["kind"] == "search")
    assert search["micro_batch"] == 8 and all(t["fits"] for t in search["trials"])  # tiny fits the cap
    rows = {r["contender"]: r for r in records if r["kind"] == "measurement"}
    assert set(rows) == {"ours", "plain"}
    for row in rows.values():
        assert row["status"] == "ok" and row["micro_batch"] == 8 and row["steps"] == 5
        assert row["tokens_per_s"] > 0 and 0 < row["peak_gib"] < 200
        assert row["freed"] and row["ran"]["compile"] == "off" and row["ran"]["fused_kernels"] == "off"
        if any(name in records[0]["device"] for name in ("H100", "H200", "A100")):
            assert 0 < row["mfu"] < 1
    # The same initial weights and batches: bf16 ZeRO-2 and fp32 weights under autocast agree.
    assert rows["ours"]["loss"] == pytest.approx(rows["plain"]["loss"], rel=1e-2)
    assert next(r for r in records if r["kind"] == "pair")["ratio"] > 0
    summary = records[-1]
    assert summary["kind"] == "summary" and summary["failures"] == [] and summary["skipped"] == []
