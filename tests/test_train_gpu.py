"""The same training loop on CUDA: NCCL, bf16, MFU against the device's stated peak.

Skipped where there is no GPU. The data comes from the CPU pipeline (tokenizer + preprocess on
an embedded Ray); the loop runs bare under torchrun, one process per GPU (at most two).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_bf16_nccl_training_learns_and_reports_mfu(tmp_path):
    import ray

    from jobs.storage import open_storage
    from orchestrator.console import Console
    from orchestrator.runner import run_pipeline
    from orchestrator.spec import parse_spec

    source = {"paths": [os.path.join(os.path.dirname(__file__), "..", "examples", "data", "*.jsonl")]}
    spec = parse_spec(json.dumps({"name": "gpu", "storage": f"file://{tmp_path}/store", "stages": {
        "tok": {"kind": "tokenizer", "source": source, "vocab_size": 4096},
        "corpus": {"kind": "preprocess", "source": source, "tokenizer": "tok", "seq_len": 256},
    }}))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        record = run_pipeline(spec, open_storage(spec.storage), console=Console(open(os.devnull, "w")))
    finally:
        ray.shutdown()
    job = {"spec": {"steps": 40, "micro_batch": 8, "zero_stage": 2, "lr": 3e-3, "warmup_steps": 4, "log_every": 10,
                    "checkpoint_every": 20, "model": {"preset": "tiny", "max_position_embeddings": 256}},
           "data_uri": record.stages["corpus"].output_uri, "out_uri": f"file://{tmp_path}/train"}
    (tmp_path / "job.json").write_text(json.dumps(job))
    num_gpus = min(torch.cuda.device_count(), 2)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={num_gpus}",
                             "-m", "jobs.train", str(tmp_path / "job.json")],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    final = reports[-1]
    assert final["loss_history"][-1][1] < final["loss_history"][0][1] - 0.5
    assert final["export_max_logit_diff"] < 0.25  # bf16 engine vs fp32 reload
    if any(name in torch.cuda.get_device_name(0) for name in ("H100", "H200", "A100")):
        assert 0 < final["mfu"] < 1
