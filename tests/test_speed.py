"""The speed levers on CPU (jobs/speed.py): the real training loop, bare under torchrun with two
gloo ranks, once per lever setting on the same data and seed.

Activation checkpointing recomputes the same operations in the same order, so the losses must be
equal bit for bit (that is why it is an operational field, outside the cache key); compilation
fuses operations differently, so its losses need only agree closely.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest

from packed import read_texts, write_packed_stage

pytestmark = pytest.mark.local

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_variants(tmp_path, variants: dict[str, dict]) -> dict[str, dict]:
    texts = read_texts(sorted(glob.glob(os.path.join(REPO, "examples", "data", "*.jsonl"))))
    write_packed_stage(str(tmp_path / "corpus"), texts, vocab_size=512, seq_len=64)
    jobs = {name: {"spec": {"steps": 6, "micro_batch": 2, "lr": 3e-3, "warmup_steps": 2, "log_every": 2,
                            "checkpoint_every": 6, "model": {"preset": "tiny", "max_position_embeddings": 64},
                            **spec},
                   "data_uri": f"file://{tmp_path}/corpus", "out_uri": f"file://{tmp_path}/{name}"}
            for name, spec in variants.items()}
    (tmp_path / "variants.json").write_text(json.dumps(jobs))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": REPO}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             os.path.join(REPO, "tests", "train_variants.py"), str(tmp_path / "variants.json")],
                            capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith('{"variant"')]
    return {line["variant"]: line["metrics"] for line in lines}


def losses(metrics: dict) -> list[float]:
    return [loss for _, loss in metrics["loss_history"]]


def test_activation_checkpointing_keeps_every_loss_under_zero3(tmp_path):
    runs = run_variants(tmp_path, {mode: {"zero_stage": 3, "speed": {"activation_checkpointing": mode}}
                                   for mode in ("none", "full", "selective")})
    assert losses(runs["none"])[-1] < losses(runs["none"])[0]  # it trains
    assert losses(runs["full"]) == losses(runs["none"])
    assert losses(runs["selective"]) == losses(runs["none"])
    assert runs["selective"]["speed"]["activation_checkpointing"] == "selective"


def test_compiled_layers_train_like_eager_ones(tmp_path):
    runs = run_variants(tmp_path, {"eager": {"speed": {"compile": "off"}}, "compiled": {"speed": {"compile": "layers"}}})
    assert runs["compiled"]["speed"]["compile"] == "layers"
    assert runs["eager"]["speed"]["compile"] == "off"
    assert losses(runs["compiled"]) == pytest.approx(losses(runs["eager"]), rel=1e-4)
    assert runs["compiled"]["export_max_logit_diff"] < 1e-3  # the compiled model exports the same weights
