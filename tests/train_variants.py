"""`torchrun --nproc_per_node N tests/train_variants.py VARIANTS.json`: the training loop
(jobs.train, no Ray) once per variant in one launch, so that comparing levers pays the start-up
(imports, process group, DeepSpeed) once. VARIANTS.json: {name: job} as `python -m jobs.train`
reads a job; rank 0 prints one JSON line {"variant": name, "metrics": ...} per variant."""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch.distributed as dist  # noqa: E402

from jobs.train import TrainJob, train  # noqa: E402
from jobs.train_spec import TrainSpec  # noqa: E402


def main(path: str) -> None:
    with open(path) as f:
        variants = json.load(f)
    for name, raw in variants.items():
        job = TrainJob(spec=TrainSpec.model_validate(raw["spec"]), out_uri=raw["out_uri"], config_hash=name,
                       data_uri=raw.get("data_uri"), init_uri=raw.get("init_uri"), report=lambda metrics: None)
        result = train(job)
        if dist.get_rank() == 0:
            print(json.dumps({"variant": name, "metrics": result.metrics}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
