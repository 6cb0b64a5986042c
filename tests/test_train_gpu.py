"""The same training loop on CUDA: NCCL, bf16, MFU against the device's stated peak.

Skipped where there is no GPU. It needs neither Ray nor S3, so that it also runs on a GPU
machine that has only torch, transformers and DeepSpeed: the data is packed straight from the
demo corpus (tests/packed.py) and the loop runs bare under torchrun, one process per GPU (at
most two). Run there with `pytest --noconftest tests/test_train_gpu.py`.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest
import torch

from packed import read_texts, write_packed_stage

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_bf16_nccl_training_learns_and_reports_mfu(tmp_path, zero_stage):
    texts = read_texts(sorted(glob.glob(os.path.join(REPO, "examples", "data", "*.jsonl"))))
    write_packed_stage(str(tmp_path / "corpus"), texts, vocab_size=4096, seq_len=256)
    job = {"spec": {"steps": 40, "micro_batch": 8, "zero_stage": zero_stage, "lr": 3e-3, "warmup_steps": 4,
                    "log_every": 10, "checkpoint_every": 20, "model": {"preset": "tiny", "max_position_embeddings": 256}},
           "data_uri": f"file://{tmp_path}/corpus", "out_uri": f"file://{tmp_path}/train"}
    (tmp_path / "job.json").write_text(json.dumps(job))
    num_gpus = min(torch.cuda.device_count(), 2)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={num_gpus}",
                             "-m", "jobs.train", str(tmp_path / "job.json")],
                            capture_output=True, text=True, timeout=900, env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    final = reports[-1]
    assert final["loss_history"][-1][1] < final["loss_history"][0][1] - 0.5
    assert final["export_max_logit_diff"] < 0.25  # bf16 engine vs fp32 reload
    assert os.path.exists(tmp_path / "train" / "hf" / "model.safetensors")
    assert os.path.exists(tmp_path / "train" / "ckpt" / "step-00000040" / "COMMIT.json")
    if any(name in torch.cuda.get_device_name(0) for name in ("H100", "H200", "A100")):
        assert 0 < final["mfu"] < 1
