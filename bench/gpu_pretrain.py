"""One GPU: our training loop (DeepSpeed ZeRO-2, bf16, no Ray) next to plain PyTorch.

Both train the same Llama on the same packed sequences (uniform random ids over a 32k
vocabulary: the throughput does not depend on the text, the LM head's size does):

- ours: `torchrun --nproc_per_node 1 -m jobs.train JOB.json`, the loop every training stage runs,
  with its final checkpoint and export; tokens/s and MFU are the loop's own reports, averaged
  over the windows after the first (warm-up) and before the last (which holds the checkpoint);
- plain: the same model with fp32 weights under `torch.autocast(bfloat16)`, torch AdamW, the same
  micro batches, no DeepSpeed, timed over the same steps with CUDA synchronised.

MFU = tokens/s x training FLOPs per token (jobs.model.flops_per_token) / the device's stated
dense bf16 peak (jobs.train.PEAK_FLOPS). Prints one table and the ratio ours / plain.

    python bench/gpu_pretrain.py --preset 350m --seq-len 2048 --micro-batch 8 --steps 50
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "tests")]

import torch  # noqa: E402

from jobs.model import ModelSpec, flops_per_token, llama_config, num_parameters  # noqa: E402
from jobs.train import PEAK_FLOPS  # noqa: E402
from packed import read_texts, write_packed_stage  # noqa: E402

LOG_EVERY = 10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="350m")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--json", help="append the results as one JSON line to this file")
    args = parser.parse_args()
    if args.steps < 4 * LOG_EVERY:
        parser.error(f"--steps must be at least {4 * LOG_EVERY}: the first and last report windows are left out")

    work = tempfile.mkdtemp(prefix="gpu-bench-")
    data_dir = os.path.join(work, "corpus")
    texts = read_texts([os.path.join(REPO, "examples", "data", name)
                        for name in sorted(os.listdir(os.path.join(REPO, "examples", "data")))])
    manifest = write_packed_stage(data_dir, texts, vocab_size=args.vocab, seq_len=args.seq_len,
                                  random_tokens=(args.steps + 1) * args.micro_batch * args.seq_len)
    model = ModelSpec(preset=args.preset, max_position_embeddings=args.seq_len)
    config = llama_config(model, manifest["vocab_size"], manifest["eos_id"], None)
    flops = flops_per_token(config, args.seq_len)
    name = torch.cuda.get_device_name(0)
    peak = next((p for key, p in PEAK_FLOPS.items() if key in name), None)

    ours = run_ours(args, model, data_dir, work)
    plain = run_plain(args, config, data_dir, flops, peak)
    result = {"device": name, "preset": args.preset, "seq_len": args.seq_len, "micro_batch": args.micro_batch,
              "steps": args.steps, "params": num_parameters(config),
              "flops_per_token": flops, "ours": ours, "plain": plain,
              "ratio": ours["tokens_per_s"] / plain["tokens_per_s"]}
    print(f"\n{name}  preset {args.preset} ({result['params'] / 1e6:,.0f}M parameters)  seq {args.seq_len}  "
          f"micro batch {args.micro_batch}")
    print(f"  {'':28}{'tokens/s':>12}{'MFU':>8}{'step s':>9}{'peak GiB':>10}")
    for label, r in (("ours (DeepSpeed ZeRO-2 bf16)", ours), ("plain PyTorch (AMP bf16)", plain)):
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") else "n/a"
        print(f"  {label:28}{r['tokens_per_s']:>12,.0f}{mfu:>8}{r['step_s']:>9.3f}{r.get('peak_gib', 0):>10.1f}")
    print(f"  ratio ours / plain tokens/s: {result['ratio']:.3f}   ours end to end {ours['wall_s']:.0f} s "
          f"(start-up, {args.steps} steps, checkpoint, export)")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(result) + "\n")


def run_ours(args, model: ModelSpec, data_dir: str, work: str) -> dict:
    spec = {"model": model.model_dump(), "steps": args.steps, "micro_batch": args.micro_batch, "zero_stage": 2,
            "precision": "bf16", "warmup_steps": LOG_EVERY, "log_every": LOG_EVERY, "checkpoint_every": args.steps}
    job_file = os.path.join(work, "job.json")
    with open(job_file, "w") as f:
        json.dump({"spec": spec, "data_uri": f"file://{data_dir}", "out_uri": f"file://{work}/train"}, f)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "-m", "jobs.train",
                           job_file], capture_output=True, text=True, env=env, cwd=REPO)
    wall = time.perf_counter() - start
    reports = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    windows = [r for r in reports if "tokens_per_s" in r and LOG_EVERY < r.get("step", 0) < args.steps]
    if proc.returncode != 0 or not windows:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"our loop failed (exit {proc.returncode})")
    tokens_per_s = statistics.mean(r["tokens_per_s"] for r in windows)
    mfu = [r["mfu"] for r in windows if r.get("mfu")]
    return {"tokens_per_s": tokens_per_s, "mfu": statistics.mean(mfu) if mfu else None, "wall_s": wall,
            "step_s": args.micro_batch * args.seq_len / tokens_per_s, "final_loss": reports[-1].get("final_loss"),
            "export_max_logit_diff": reports[-1].get("export_max_logit_diff")}


def run_plain(args, config, data_dir: str, flops: float, peak: float | None) -> dict:
    import numpy as np
    from transformers import LlamaForCausalLM

    with open(os.path.join(data_dir, "manifest.json")) as f:
        manifest = json.load(f)
    data = np.fromfile(os.path.join(data_dir, "data", "train-00000.bin"), dtype=manifest["dtype"])
    data = data.reshape(-1, args.seq_len)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    torch.cuda.reset_peak_memory_stats()
    timed_from, timed_to = LOG_EVERY, args.steps - LOG_EVERY  # the same steps as ours
    for step in range(timed_to):
        if step == timed_from:
            torch.cuda.synchronize()
            start = time.perf_counter()
        batch = data[step * args.micro_batch:(step + 1) * args.micro_batch].astype(np.int64)
        tokens = torch.from_numpy(batch).cuda(non_blocking=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    step_s = (time.perf_counter() - start) / (timed_to - timed_from)
    tokens_per_s = args.micro_batch * args.seq_len / step_s
    return {"tokens_per_s": tokens_per_s, "mfu": tokens_per_s * flops / peak if peak else None, "step_s": step_s,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "final_loss": float(loss)}


if __name__ == "__main__":
    main()
