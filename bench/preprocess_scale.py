#!/usr/bin/env python3
"""Benchmark: does the preprocess stage's driver stay flat as the corpus grows?

The same kind of corpus (`examples/make_corpus.py`'s short stories, ~1 KB each, with a share of
planted exact duplicates placed in other files) at x1, x4 and x16 documents, each scale run as a
tokenizer + preprocess pipeline through `run_pipeline` on an embedded Ray (`--workers` CPUs), in
a fresh process per scale so that the peaks do not mix. Exact dedup is on, with
`dedup_keys_per_task` set to the x1 record count, so that x1, x4 and x16 use 1, 4 and 16 reduce tasks;
`shard_mb` is fixed, so every scale has several shards per worker.

Per scale, twice in the same process (cold: its Ray's workers start during the stage; warm: a
rerun with another validation_fraction on the same workers), it reports the preprocess stage's
wall time (run record: started_at to finished_at) and time per document, and the driver process's
resident memory: sampled every 20 ms from
/proc/self/status (VmRSS) in a thread, its peak inside the stage's window and the growth from
just before the stage started, and each process's ru_maxrss. The goals (issue 14): driver peak
RSS at x16 < 1.10 x that at x1; time per document flat within 15%. It also checks the dedup
against the truth: the stage's `duplicate` drops equal the planted copies.

The tokenizer stage trains once on the x1 corpus, in a process of its own before the scales, in a
storage directory that all scales share: every scale's process finds it cached and runs the same
code before its preprocess stage, so their "RSS before" compare. Fixed costs per stage (cold
workers, the barriers between passes) weigh most on x1, so the marginal time per document between
scales is printed too.

    .venv/bin/python bench/preprocess_scale.py [--docs 16000] [--scales 1,4,16] [--workers 2] [--json FILE]
"""

from __future__ import annotations

import os

os.environ["TOKENIZERS_PARALLELISM"] = "false"

import argparse
import importlib.util
import json
import logging
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DATA_ROOT = REPO / "bench" / ".data"
SEED = 0
DOCS_PER_FILE = 4000  # files of ~4 MB at every scale: a scale has more files, not bigger ones
RSS_INTERVAL_S = 0.02

TOKENIZER_STAGE = """
name: bench-preprocess-scale
storage: file://{storage}
stages:
  tok:
    kind: tokenizer
    source: {{paths: ["{tok_data}/*.jsonl"], format: jsonl, text_field: text}}
    vocab_size: {vocab_size}
    sample_mb: 4
"""
PIPELINE = TOKENIZER_STAGE + """  {stage}:
    kind: preprocess
    source: {{paths: ["{data}/*.jsonl"], format: jsonl, text_field: text}}
    tokenizer: tok
    seq_len: 1024
    dedup: true
    dedup_keys_per_task: {keys_per_task}
    shard_mb: {shard_mb}
    validation_fraction: {validation_fraction}
"""


def ensure_corpus(num_docs: int, duplicate_fraction: float) -> tuple[Path, dict]:
    """bench/.data/scale-<docs>-dup<fraction>/part-*.jsonl, generated once and reused."""
    out = DATA_ROOT / f"scale-{num_docs}-dup{duplicate_fraction:g}-seed{SEED}"
    done = out / "_DONE.json"
    if done.exists():
        return out, json.loads(done.read_text())
    spec = importlib.util.spec_from_file_location("make_corpus", REPO / "examples" / "make_corpus.py")
    make_corpus = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_corpus)
    t0 = time.perf_counter()
    DATA_ROOT.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=DATA_ROOT))
    num_files = max(2, num_docs // DOCS_PER_FILE)
    _, n, n_dup, nbytes = make_corpus.write_corpus(str(tmp), num_files, num_docs // num_files, SEED, "jsonl",
                                                   duplicate_fraction=duplicate_fraction)
    meta = {"num_docs": n + n_dup, "num_planted_duplicates": n_dup, "bytes": nbytes, "files": num_files}
    (tmp / "_DONE.json").write_text(json.dumps(meta))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    print(f"corpus: generated {n + n_dup:,} docs ({n_dup:,} planted duplicates), {nbytes / 1e6:.1f} MB "
          f"in {time.perf_counter() - t0:.1f}s -> {out}", flush=True)
    return out, meta


class RssSampler(threading.Thread):
    """This process's VmRSS (bytes) every RSS_INTERVAL_S, with the time of each sample."""

    def __init__(self):
        super().__init__(daemon=True)
        self.samples: list[tuple[float, int]] = []
        self._done = threading.Event()

    def run(self):
        while not self._done.is_set():
            self.samples.append((time.time(), rss_bytes()))
            self._done.wait(RSS_INTERVAL_S)

    def stop(self):
        self._done.set()
        self.join()
        self.samples.append((time.time(), rss_bytes()))


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def run_one_scale(args) -> dict:
    """In a fresh process, at one scale: the pipeline twice, cold (its Ray's workers start during
    the stage) then warm (validation_fraction changed: only the preprocess stage reruns, on the
    same workers); each preprocess run's time and the driver's RSS. Scale 0: the tokenizer alone."""
    import ray

    from jobs.storage import open_storage
    from orchestrator.console import Console
    from orchestrator.ray_runtime import WORKER_ENV
    from orchestrator.runner import run_pipeline
    from orchestrator.spec import parse_spec

    ray.init(num_cpus=args.workers, log_to_driver=False, logging_level=logging.ERROR, include_dashboard=False,
             runtime_env={"env_vars": WORKER_ENV})
    stage_name = f"corpus-x{args.one_scale}"
    template = PIPELINE if args.one_scale != "0" else TOKENIZER_STAGE
    storage = open_storage(f"file://{args.storage}")
    sampler = RssSampler()
    sampler.start()
    records = []
    try:
        for validation_fraction in ((0.01,) if args.one_scale == "0" else (0.01, 0.02)):
            spec = parse_spec(template.format(storage=args.storage, tok_data=args.tok_data, data=args.data,
                                              vocab_size=args.vocab_size, stage=stage_name,
                                              keys_per_task=args.keys_per_task, shard_mb=args.shard_mb,
                                              validation_fraction=validation_fraction))
            records.append(run_pipeline(spec, storage, console=Console(open(os.devnull, "w"))))
    finally:
        sampler.stop()
        ray.shutdown()
    if args.one_scale == "0":
        assert records[0].stages["tok"].status == "succeeded", records[0].stages["tok"]
        return {}
    result = {"ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    for name, record in zip(("cold", "warm"), records):
        stage = record.stages[stage_name]
        assert stage.status == "succeeded" and not stage.cached, stage
        before = [rss for t, rss in sampler.samples if t <= stage.started_at]
        during = [rss for t, rss in sampler.samples if stage.started_at <= t <= stage.finished_at]
        result[name] = {"stage_s": stage.finished_at - stage.started_at, "metrics": stage.metrics,
                        "rss_before": before[-1], "rss_peak": max(during), "rss_samples": len(during)}
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--docs", type=int, default=16000, help="documents at x1 (default 16000, ~16 MB)")
    p.add_argument("--scales", default="1,4,16", help="multiples of --docs (default 1,4,16)")
    p.add_argument("--duplicate-fraction", type=float, default=0.1, help="planted exact copies, as a share of docs")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--shard-mb", type=float, default=2.0, help="preprocess shard_mb, the same at every scale")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--json", help="also write all numbers to this JSON file")
    for hidden in ("--one-scale", "--storage", "--tok-data", "--data", "--keys-per-task", "--out"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one_scale:  # the child process of one scale
        Path(args.out).write_text(json.dumps(run_one_scale(args)))
        return 0

    from jobs.shuffle import num_partitions

    t_start = time.perf_counter()
    scales = [int(s) for s in args.scales.split(",")]
    corpora = {s: ensure_corpus(args.docs * s, args.duplicate_fraction) for s in scales}
    keys_per_task = corpora[scales[0]][1]["num_docs"]  # x1's records: 1 reduce task at x1, 16 at x16
    storage = tempfile.mkdtemp(prefix="bench-preprocess-scale-")
    results = {}

    def run_child(scale: int, data: Path) -> dict:
        out = os.path.join(storage, f"result-x{scale}.json")
        subprocess.run([sys.executable, __file__, "--one-scale", str(scale), "--storage", storage,
                        "--tok-data", str(corpora[scales[0]][0]), "--data", str(data),
                        "--keys-per-task", str(keys_per_task), "--workers", str(args.workers),
                        "--shard-mb", str(args.shard_mb), "--vocab-size", str(args.vocab_size), "--out", out],
                       check=True)
        return json.loads(Path(out).read_text())

    try:
        print("tokenizer stage (its own process, not timed)", flush=True)
        run_child(0, corpora[scales[0]][0])
        for s in scales:
            data, meta = corpora[s]
            print(f"x{s}: {meta['num_docs']:,} docs ({meta['num_planted_duplicates']:,} planted duplicates), "
                  f"{meta['bytes'] / 1e6:.1f} MB in {meta['files']} files", flush=True)
            results[s] = {**run_child(s, data), "corpus": meta}
    finally:
        shutil.rmtree(storage, ignore_errors=True)

    mib = 1 << 20
    base = results[scales[0]]
    for s in scales:
        r = results[s]
        for run in ("cold", "warm"):
            m = r[run]["metrics"]
            assert m["drops"].get("duplicate", 0) == r["corpus"]["num_planted_duplicates"], (
                f"x{s} {run}: dedup dropped {m['drops'].get('duplicate', 0)}, "
                f"planted {r['corpus']['num_planted_duplicates']}")
            r[run]["us_per_doc"] = r[run]["stage_s"] / m["num_records"] * 1e6
    for run, what in (("cold", "first run in a fresh process: Ray's workers start during the stage"),
                      ("warm", "a rerun on the same workers (validation_fraction changed)")):
        print(f"\n{run}: {what}")
        print(f"{'scale':>5} {'docs':>9} {'shards':>6} {'dedup tasks':>11} {'dup drops':>9} {'stage s':>8} "
              f"{'us/doc':>7} {'/x1':>5} {'RSS before':>10} {'RSS peak':>9} {'growth':>8} {'peak/x1':>7}")
        for s in scales:
            r, m = results[s][run], results[s][run]["metrics"]
            num_keys = m["num_records"] - sum(n for k, n in m["drops"].items() if k != "duplicate")
            tasks = num_partitions(num_keys, keys_per_task)  # the stage's own rule for dedup_keys_per_task
            print(f"x{s:<4} {m['num_records']:9,} {m['num_shards']:6} {tasks:11} {m['drops'].get('duplicate', 0):9,} "
                  f"{r['stage_s']:8.2f} {r['us_per_doc']:7.1f} {r['us_per_doc'] / base[run]['us_per_doc']:5.2f} "
                  f"{r['rss_before'] / mib:9.1f}M {r['rss_peak'] / mib:8.1f}M "
                  f"{(r['rss_peak'] - r['rss_before']) / mib:7.1f}M {r['rss_peak'] / base[run]['rss_peak']:7.3f}")
    print(f"\nru_maxrss of each scale's process: "
          + ", ".join(f"x{s} {results[s]['ru_maxrss'] / mib:.1f} MiB" for s in scales))
    last = results[scales[-1]]
    for run in ("cold", "warm"):
        rss_ratio = last[run]["rss_peak"] / base[run]["rss_peak"]
        per_doc = [results[s][run]["us_per_doc"] for s in scales]
        spread = max(per_doc) / min(per_doc)
        print(f"{run}: driver peak RSS x{scales[-1]} / x{scales[0]} = {rss_ratio:.3f} (goal < 1.10: "
              f"{'met' if rss_ratio < 1.10 else 'NOT met'}); time per document x{scales[-1]} / x{scales[0]} = "
              f"{per_doc[-1] / per_doc[0]:.3f}, max / min over the scales {spread:.3f} (goal: flat within 15%: "
              f"{'met' if spread <= 1.15 else 'NOT met'})")
        for a, b in zip(scales, scales[1:]):  # what each added document cost: the fixed costs cancel out
            ra, rb = results[a][run], results[b][run]
            added = rb["metrics"]["num_records"] - ra["metrics"]["num_records"]
            marginal = (rb["stage_s"] - ra["stage_s"]) / added
            print(f"  marginal time per document x{a} -> x{b}: {marginal * 1e6:.1f} us "
                  f"(fixed cost implied: {ra['stage_s'] - ra['metrics']['num_records'] * marginal:.2f} s)")
    print(f"total bench time {time.perf_counter() - t_start:.0f}s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
