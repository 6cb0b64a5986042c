#!/usr/bin/env python3
"""Benchmark: LoRA vs full fine-tuning of the same model on CPU: trainable parameters, peak
memory, step time, checkpoint size, and their ratios.

The job core without Ray: `torchrun --nproc_per_node N -m jobs.train JOB.json` (DeepSpeed ZeRO,
gloo, fp32), once per variant in a fresh launch, so that each rank's peak resident memory is its
own. Both variants start from the same Hugging Face model (a preset with random weights, written
once with jobs.export.save_hf) and train on the same packed sequences (tests/packed.py: the
shipped corpus tokenized with a BPE trained on it), with the same batches, schedule and seed;
`lora` adds `lora: {r, target_modules}` (all seven projections by default, as the stage does).

- trainable parameters: full = every weight of the starting model (its safetensors); LoRA = the
  weights of the adapter the run exported (hf-adapter/adapter_model.safetensors), counted here;
- peak memory: the largest resident set of any rank over its life up to the last report (the
  loop's `peak_memory_gib`: ru_maxrss, all ranks' maximum; it includes building the model, when the
  weights read from the starting model's safetensors are resident beside the model's own); and
  the largest resident set of any rank while it trains, sampled here every 20 ms from /proc
  between the rank's first line (printed once its engine is built) and its last report;
- step time: global batch x seq_len / tokens_per_s of each report window after the first
  (warm-up), median;
- checkpoint: bytes of the last committed checkpoint (the frozen weights are in LoRA's too: it
  resumes and exports alone; its optimizer states hold the adapters only).

    .venv/bin/python bench/lora.py                     # 125m preset, 2 ranks, 10 steps: ~5 minutes on 2 cores
    .venv/bin/python bench/lora.py --preset tiny --steps 4   # a quick smoke run
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "tests")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="125m", help="jobs.model preset of the model fine-tuned")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--zero", type=int, default=2, choices=(1, 2, 3))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--log-every", type=int, default=2)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-lora-") as tmp:
        data_dir, base_dir = os.path.join(tmp, "data"), os.path.join(tmp, "base")
        vocab = prepare(args, data_dir, base_dir)
        results = {"preset": args.preset, "vocab_size": vocab, "workers": args.workers, "zero_stage": args.zero,
                   "steps": args.steps, "micro_batch": args.micro_batch, "seq_len": args.seq_len, "r": args.r,
                   "variants": {}}
        for variant in ("full", "lora"):
            results["variants"][variant] = run_variant(args, variant, data_dir, base_dir, tmp)
    report(results)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


def prepare(args, data_dir: str, base_dir: str) -> int:
    """The packed data and the starting model; returns the vocabulary size."""
    import torch
    from transformers import LlamaForCausalLM

    from jobs.export import save_hf
    from jobs.model import ModelSpec, llama_config
    from jobs.tokenizer import load_tokenizer
    from packed import read_texts, write_packed_stage

    texts = read_texts(sorted(glob.glob(os.path.join(REPO, "examples", "data", "*.jsonl"))))
    manifest = write_packed_stage(data_dir, texts, vocab_size=args.vocab, seq_len=args.seq_len)
    _, info = load_tokenizer(os.path.join(data_dir, "tokenizer"))
    config = llama_config(ModelSpec(preset=args.preset, max_position_embeddings=args.seq_len),
                          manifest["vocab_size"], info["eos_id"], info.get("pad_id"))
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    save_hf(dict(model.named_parameters()), config, os.path.join(data_dir, "tokenizer"), base_dir)
    return manifest["vocab_size"]


def run_variant(args, variant: str, data_dir: str, base_dir: str, tmp: str) -> dict:
    out_dir = os.path.join(tmp, variant)
    spec = {"steps": args.steps, "log_every": args.log_every, "checkpoint_every": args.steps,
            "micro_batch": args.micro_batch, "zero_stage": args.zero, "lr": 1e-4, "warmup_steps": 1, "seed": 0}
    job = {"spec": spec, "out_uri": f"file://{out_dir}", "data_uri": f"file://{data_dir}",
           "init_uri": f"file://{base_dir}", **({"lora": {"r": args.r}} if variant == "lora" else {})}
    job_path = os.path.join(tmp, f"{variant}.json")
    with open(job_path, "w") as f:
        json.dump(job, f)
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.workers}", "-m", "jobs.train",
               job_path]
    print(f"{variant}: {' '.join(command[2:])}", flush=True)
    with tempfile.TemporaryFile("w+") as stderr:
        proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=stderr, text=True,
                                env={**os.environ, "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"})
        lines, training_peak = _read_while_sampling(proc, args.steps)
        if proc.wait():
            stderr.seek(0)
            sys.exit(f"{variant} failed:\n{stderr.read()[-4000:]}")
    windows = [m for m in lines if "tokens_per_s" in m and "loss_history" not in m]
    final = lines[-1]
    tokens_per_step = args.micro_batch * args.workers * args.seq_len
    step_times = [tokens_per_step / m["tokens_per_s"] for m in windows[1:]]  # the first window warms up
    weights = os.path.join(out_dir, "hf-adapter", "adapter_model.safetensors") if variant == "lora" else None
    return {"trainable_params": count_params(weights or os.path.join(base_dir, "model.safetensors")),
            "peak_memory_gib": final["peak_memory_gib"],
            "training_peak_rss_gib": training_peak / 2**30,
            "step_time_s": statistics.median(step_times),
            "step_times_s": step_times,
            "checkpoint_bytes": dir_bytes(os.path.join(out_dir, "ckpt", f"step-{args.steps:08d}")),
            "final_loss": final["final_loss"],
            "model_param_bytes": final["model_param_bytes"]}


def _read_while_sampling(proc: subprocess.Popen, steps: int) -> tuple[list[dict], int]:
    """Rank 0's JSON lines, and the largest resident set of any rank from the first line (the
    engine is built) to the report of the last step, sampled every 20 ms."""
    import psutil

    peak, sampling, done = [0], threading.Event(), threading.Event()

    def sample() -> None:
        launcher = psutil.Process(proc.pid)
        while not done.wait(0.02):
            if sampling.is_set():
                for rank in launcher.children(recursive=True):
                    try:
                        peak[0] = max(peak[0], rank.memory_info().rss)
                    except psutil.NoSuchProcess:
                        pass

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    lines = []
    for line in proc.stdout:
        if not line.startswith("{"):
            continue
        lines.append(json.loads(line))
        sampling.set()
        if lines[-1].get("step") == steps and "loss_history" not in lines[-1]:
            done.set()
    done.set()
    sampler.join()
    return lines, peak[0]


def count_params(path: str) -> int:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())


def dir_bytes(directory: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(directory) for f in files)


def report(r: dict) -> None:
    full, lora = r["variants"]["full"], r["variants"]["lora"]
    print(f"\n{r['preset']} (vocab {r['vocab_size']}), {r['workers']} ranks, ZeRO-{r['zero_stage']}, fp32 on CPU, "
          f"micro batch {r['micro_batch']} x seq {r['seq_len']}, {r['steps']} steps; LoRA r {r['r']} on all 7 projections")
    rows = [("trainable parameters", "trainable_params", "{:,.0f}"),
            ("peak memory per rank, whole run (GiB)", "peak_memory_gib", "{:.3f}"),
            ("peak memory per rank, training (GiB)", "training_peak_rss_gib", "{:.3f}"),
            ("step time (s, median)", "step_time_s", "{:.3f}"),
            ("last checkpoint (MiB)", "checkpoint_bytes", "{:.1f}")]
    print(f"| measure | full | LoRA | LoRA / full |\n| --- | ---: | ---: | ---: |")
    for label, key, fmt in rows:
        scale = 2**20 if key == "checkpoint_bytes" else 1
        a, b = full[key] / scale, lora[key] / scale
        print(f"| {label} | {fmt.format(a)} | {fmt.format(b)} | {b / a:.4f} |")
    print(f"final loss: full {full['final_loss']:.4f}, LoRA {lora['final_loss']:.4f}; "
          f"step times full {[round(t, 3) for t in full['step_times_s']]}, LoRA {[round(t, 3) for t in lora['step_times_s']]}")


if __name__ == "__main__":
    main()
