"""What sharded construction saves: each rank's parameter memory right after building the model,
ZeRO-2 (every rank builds the whole model) next to ZeRO-3 (built under deepspeed.zero.Init).

N CPU ranks (torchrun, gloo) build the same model with the training loop's own builder
(jobs.model_init.build_model, random weights), once per ZeRO stage. Per rank:

- param_bytes: the bytes of the parameter tensors the rank holds after construction (its
  partitions under ZeRO-3), from the tensors themselves;
- construct_rss_growth_bytes: its peak resident memory during construction minus its resident
  memory just before (the kernel's high-water mark, reset right before building).

    python bench/zero3_memory.py --workers 4 --json bench/.out/zero3_memory.json   # ~3 minutes
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

GOAL_PARAMS = 1.1  # ZeRO-3's local parameters at most this x model / N
GOAL_RSS = 0.5  # ZeRO-3's construction growth at most this x the model's bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--preset", default="350m")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--rank-out", help=argparse.SUPPRESS)  # set by the launcher: one rank's results
    parser.add_argument("--zero", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_out:
        measure_rank(args)
        return

    results = {"world_size": args.workers, "preset": args.preset, "vocab_size": args.vocab,
               "param_bytes_per_rank": {}, "construct_rss_growth_bytes_per_rank": {}}
    for zero in (2, 3):
        ranks = launch(args, zero)
        results["model_param_bytes"] = ranks[0]["model_param_bytes"]
        results["param_bytes_per_rank"][f"zero{zero}"] = [r["param_bytes"] for r in ranks]
        results["construct_rss_growth_bytes_per_rank"][f"zero{zero}"] = [r["construct_rss_growth_bytes"] for r in ranks]
    report(results)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


def launch(args, zero: int) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="zero3-memory-") as tmp:
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.workers}",
                   os.path.abspath(__file__), "--zero", str(zero), "--preset", args.preset, "--vocab", str(args.vocab),
                   "--rank-out", os.path.join(tmp, "rank-{rank}.json")]
        env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(command, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr[-4000:])
            raise SystemExit(f"ZeRO-{zero} ranks failed (exit {proc.returncode})")
        ranks = []
        for rank in range(args.workers):
            with open(os.path.join(tmp, f"rank-{rank}.json")) as f:
                ranks.append(json.load(f))
        return ranks


def measure_rank(args) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist

    from jobs.deepspeed_config import build_deepspeed_config
    from jobs.model import ModelSpec, llama_config
    from jobs.model_init import build_model, local_parameter_bytes, model_parameter_bytes

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    config = llama_config(ModelSpec(preset=args.preset), args.vocab, eos_id=0, pad_id=None)
    ds_config = build_deepspeed_config(zero_stage=args.zero, micro_batch=1, grad_accum=1, world_size=world,
                                       grad_clip=1.0, bf16=False)
    dist.barrier()
    before = _rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak (VmHWM) to the current resident memory
    model = build_model(config, ds_config=ds_config, zero3=args.zero == 3, seed=0, device=torch.device("cpu"))
    growth = (_rss_kib("VmHWM") - before) * 1024
    result = {"rank": rank, "param_bytes": local_parameter_bytes(model), "model_param_bytes": model_parameter_bytes(model),
              "construct_rss_growth_bytes": growth}
    with open(args.rank_out.format(rank=rank), "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def report(r: dict) -> None:
    model, n = r["model_param_bytes"], r["world_size"]
    gib = 2**30
    print(f"\n{r['preset']} Llama, vocab {r['vocab_size']}: {model / gib:.2f} GiB of fp32 parameters, {n} ranks")
    print(f"  {'':8}{'params per rank (GiB)':>24}{'x model/N':>11}{'RSS growth per rank (GiB)':>28}{'x model':>9}")
    for zero in ("zero2", "zero3"):
        params, growth = r["param_bytes_per_rank"][zero], r["construct_rss_growth_bytes_per_rank"][zero]
        print(f"  {zero:8}{max(params) / gib:>24.3f}{max(params) / (model / n):>11.2f}"
              f"{max(growth) / gib:>28.3f}{max(growth) / model:>9.2f}")
    params3 = max(r["param_bytes_per_rank"]["zero3"]) / (model / n)
    growth3 = max(r["construct_rss_growth_bytes_per_rank"]["zero3"]) / model
    print(f"  ZeRO-3 (largest rank): params {params3:.2f} x model/N (goal <= {GOAL_PARAMS}), "
          f"RSS growth {growth3:.2f} x model (goal <= {GOAL_RSS})")
    growth2 = max(r["construct_rss_growth_bytes_per_rank"]["zero2"])
    print(f"  ratio ZeRO-3 / ZeRO-2 RSS growth: {max(r['construct_rss_growth_bytes_per_rank']['zero3']) / growth2:.3f}")


if __name__ == "__main__":
    main()
