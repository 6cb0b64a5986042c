"""A data mixture end to end: real Ray, real Ray Train and DeepSpeed (CPU, gloo), tiny Llama.

Two preprocess stages of one tokenizer feed two identical mixture pretrain stages that train at
once; a worker of whichever reaches step 7 first dies there, and its group resumes from the step-4
checkpoint. The two must end bit for bit alike (the resumed run read the same batches), and the
record's tokens per source must be the weights' exact quotas.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from jobs.storage import open_storage
from orchestrator.console import Console
from orchestrator.runner import run_pipeline
from orchestrator.spec import parse_spec

pytestmark = pytest.mark.local

DATA = os.path.join(os.path.dirname(__file__), "..", "examples", "data")
STEPS, EVERY, MICRO, SEQ_LEN = 12, 4, 4, 64


def _pipeline(storage: str) -> str:
    def corpus(*parts):
        return {"kind": "preprocess", "source": {"paths": [os.path.join(DATA, f"part-0000{p}.jsonl") for p in parts]},
                "tokenizer": "tok", "seq_len": SEQ_LEN, "validation_fraction": 0.05}

    train = {"kind": "pretrain", "data": [{"stage": "web", "weight": 3}, {"stage": "code", "weight": 1}],
             "steps": STEPS, "checkpoint_every": EVERY, "log_every": EVERY, "micro_batch": MICRO, "lr": 0.003,
             "warmup_steps": 2, "num_workers": 1, "model": {"preset": "tiny", "max_position_embeddings": 128}}
    return json.dumps({"name": "mixture-test", "storage": storage, "stages": {
        "tok": {"kind": "tokenizer", "source": {"paths": [os.path.join(DATA, "part-00000.jsonl")]},
                "vocab_size": 1024, "sample_mb": 0.3},
        "web": corpus(0), "code": corpus(1), "mix": train, "mix_again": train}})


def _weights(stage) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(open_storage(stage.output_uri).read_bytes("hf/model.safetensors"))


def test_a_mixture_trains_in_its_weights_and_a_crashed_worker_resumes_to_the_same_batches(start_ray, tmp_path):
    start_ray(ORCHESTRATOR_CRASH_AT="train:7", ORCHESTRATOR_CRASH_ONCE_DIR=str(tmp_path / "once"))
    spec = parse_spec(_pipeline(f"file://{tmp_path}/store"))
    record = run_pipeline(spec, open_storage(spec.storage), console=Console(open(os.devnull, "w")))
    assert record.status == "succeeded"
    assert os.path.exists(tmp_path / "once" / "crashed-train-7")  # a worker really died at step 7
    stages = [record.stages["mix"], record.stages["mix_again"]]
    crashed = [s for s in stages if s.metrics["restarts"] == 1]
    assert len(crashed) == 1 and crashed[0].metrics["resumed_from"] == 4 and crashed[0].attempts == 2
    # 12 steps x 4 sequences, 3:1 by weight: exactly 36 and 12 sequences of 64 tokens.
    for stage in stages:
        assert stage.metrics["tokens_per_source"] == {"web": 36 * SEQ_LEN, "code": 12 * SEQ_LEN}
        assert set(stage.metrics["val_perplexity"]) == {"web", "code"}
        assert all(1 < p < 1024 for p in stage.metrics["val_perplexity"].values())  # learned: below uniform
    # The resumed run read the batches the uninterrupted one did: the same losses, the same weights.
    crashed_history = dict(map(tuple, crashed[0].metrics["loss_history"]))
    other = next(s for s in stages if s is not crashed[0])
    assert crashed_history == {step: loss for step, loss in other.metrics["loss_history"] if step > 4}
    expected, actual = _weights(other), _weights(crashed[0])
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name
    report = open_storage(spec.storage).read_bytes(f"runs/{record.run_id}/report.md").decode()
    assert "## Data mixture: mix" in report and f"| web | {36 * SEQ_LEN:,} | 75.0% |" in report
