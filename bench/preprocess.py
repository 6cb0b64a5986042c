#!/usr/bin/env python3
"""Benchmark: our preprocess stage vs. a bare tokenizer loop (the ideal) vs. `datasets` map.

On one generated jsonl corpus (kept under bench/.data/ and reused), side by side:

  ours      the real pipeline (`run_pipeline`: a tokenizer stage, then a preprocess stage) on an
            embedded Ray with `--workers` CPUs; seq_len 1024, dedup on, default filters, several
            shards per worker. Timed from the run record's stage started_at/finished_at (run 1,
            both stages), then on `--repeat` more runs that change only validation_fraction, so
            that only the preprocess stage reruns (also timed end to end around run_pipeline).
  ideal     `tokenizers.Tokenizer.encode_batch_fast` over the same documents, already in memory,
            with the same tokenizer.json, single-threaded (TOKENIZERS_PARALLELISM=false);
            single-core tokens/s x workers.
  datasets  `load_dataset("json", ...)` of the same files + `.map(batched=True, num_proc=workers)`
            with the same tokenizer (tokenize only; its load is included).

Tokens are counted the same way in all three: the token ids of every kept document plus one
end-of-text per document (what the stage's `num_tokens` metric counts, before packing drops the
remainder of each shard). Ray is shut down before the ideal and datasets runs, so its daemons do
not share the cores with them. Each contender is measured `--repeat` times and the best counts.

Besides wall clock, it records CPU seconds per process (from /proc: Ray workers, Ray's daemons,
the driver, child processes) and the CPU that the rest of the machine used meanwhile, and it times
the job code (`scan_shard`, `encode_shard`, their pieces, a bare tokenizer loop) on a slice of one
shard in this process, interleaved and best-of-N: on a shared machine that is the steadiest number.

    .venv/bin/python bench/preprocess.py [--mb 40] [--workers 2] [--repeat 2] [--profile] [--json FILE]
"""

from __future__ import annotations

import os

os.environ["TOKENIZERS_PARALLELISM"] = "false"  # before tokenizers is imported anywhere

import argparse
import contextlib
import cProfile
import glob
import importlib.util
import io
import json
import logging
import math
import pstats
import resource
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

DATA_ROOT = REPO / "bench" / ".data"
NUM_FILES = 4
SEED = 0
BATCH = 512  # the stage's _ENCODE_BATCH
BREAKDOWN_MB, BREAKDOWN_REPS = 1.0, 5  # the in-process breakdown: a 1 MB slice of shard 0, best of 5
from proc_cpu import CLOCK_TICKS as _CLK, process_table  # noqa: E402
_RAY_AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")


# --------------------------------------------------------------------------------------------
# CPU accounting: this machine is shared, so wall clock alone cannot tell our cost from others'
# --------------------------------------------------------------------------------------------

class CpuMeter:
    """CPU seconds used by this process, its live descendants (split into Ray workers and Ray's
    daemons) and its reaped children, and by everything else on the machine (/proc/stat)."""

    def __init__(self):
        self.root = os.getpid()
        self.workers: set[int] = set()

    def sample(self) -> dict:
        table = process_table()
        children: dict[int, list[int]] = {}
        for pid, (ppid, _) in table.items():
            children.setdefault(ppid, []).append(pid)
        procs = {}
        stack = list(children.get(self.root, []))
        while stack:
            pid = stack.pop()
            stack.extend(children.get(pid, []))
            if pid not in self.workers:
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        cmd = f.read().decode(errors="replace")
                except OSError:
                    cmd = ""
                if (cmd.startswith("ray::") and not cmd.startswith(_RAY_AGENTS)) or "default_worker.py" in cmd:
                    self.workers.add(pid)
            procs[pid] = table[pid][1]
        own, reaped = os.times(), resource.getrusage(resource.RUSAGE_CHILDREN)
        with open("/proc/stat") as f:
            cpu = [int(x) for x in f.readline().split()[1:]]
        busy = sum(cpu[i] for i in (0, 1, 2, 5, 6)) / _CLK  # user nice system irq softirq
        return {"t": time.perf_counter(), "procs": procs, "driver": own.user + own.system,
                "reaped": reaped.ru_utime + reaped.ru_stime, "busy": busy, "steal": cpu[7] / _CLK}

    def delta(self, a: dict, b: dict) -> dict:
        """Per-process differences; a process that exited in between loses its last CPU (a little)."""
        d = {k: b[k] - a[k] for k in ("t", "driver", "reaped", "busy", "steal")}
        d["workers"] = d["ray"] = 0.0
        for pid, cpu in b["procs"].items():
            d["workers" if pid in self.workers else "ray"] += cpu - a["procs"].get(pid, 0.0)
        d["ours"] = d["driver"] + d["workers"] + d["ray"] + d["reaped"]
        d["others"] = max(d["busy"] - d["ours"], 0.0)
        d["wall"] = d.pop("t")
        return d


# --------------------------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------------------------

def _make_corpus_module():
    spec = importlib.util.spec_from_file_location("make_corpus", REPO / "examples" / "make_corpus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ensure_corpus(mb: float) -> tuple[Path, dict]:
    """bench/.data/corpus-<mb>mb-seed<seed>/part-*.jsonl, generated once and reused."""
    out = DATA_ROOT / f"corpus-{mb:g}mb-seed{SEED}"
    done = out / "_DONE.json"
    if done.exists():
        return out, json.loads(done.read_text())
    make_corpus = _make_corpus_module()
    t0 = time.perf_counter()
    sample = make_corpus.generate_documents(2000, SEED)  # a prefix of the real list: sizes the corpus
    per_doc = sum(len(json.dumps({"id": "doc-00000000", "text": d}, ensure_ascii=False).encode()) + 1
                  for d in sample) / len(sample)
    docs_per_file = max(1, round(mb * 1e6 / per_doc / NUM_FILES))
    DATA_ROOT.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=DATA_ROOT))  # renamed into place when complete
    paths, num_docs, _, nbytes = make_corpus.write_corpus(str(tmp), NUM_FILES, docs_per_file, SEED, "jsonl")
    meta = {"num_docs": num_docs, "bytes": nbytes, "files": NUM_FILES, "seed": SEED}
    (tmp / "_DONE.json").write_text(json.dumps(meta))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    print(f"corpus: generated {num_docs:,} docs, {nbytes / 1e6:.1f} MB in {time.perf_counter() - t0:.1f}s -> {out}")
    return out, meta


def read_documents(files: list[str]) -> list[str]:
    docs = []
    for path in files:
        with open(path, "rb") as f:
            docs.extend(json.loads(line)["text"] for line in f if line.strip())
    return docs


# --------------------------------------------------------------------------------------------
# Ours: the real pipeline on embedded Ray
# --------------------------------------------------------------------------------------------

PIPELINE = """
name: bench-preprocess
storage: file://{storage}
stages:
  tok:
    kind: tokenizer
    source: {{paths: ["{data}/*.jsonl"], format: jsonl, text_field: text}}
    vocab_size: {vocab_size}
    sample_mb: {sample_mb}
  corpus:
    kind: preprocess
    source: {{paths: ["{data}/*.jsonl"], format: jsonl, text_field: text}}
    tokenizer: tok
    seq_len: 1024
    dedup: true
    validation_fraction: {validation_fraction}
    shard_mb: {shard_mb}
"""


def make_console(meter: CpuMeter, stage_name: str):
    """A Console that also timestamps each pass's progress (the scan / encode split) and samples
    CPU use at the stage's and the passes' edges."""
    from orchestrator.console import Console

    class TimingConsole(Console):
        def __init__(self):
            super().__init__(sys.stdout)
            self.passes: dict[str, dict] = {}
            self.stage_cpu: list[dict] = []

        def line(self, text: str) -> None:
            super().line("    | " + text)

        def stage_started(self, name, kind, reason):
            if name == stage_name:
                self.stage_cpu = [meter.sample()]
            super().stage_started(name, kind, reason)

        def stage_finished(self, name, stage):
            if name == stage_name and self.stage_cpu:
                self.stage_cpu.append(meter.sample())
            super().stage_finished(name, stage)

        @contextlib.contextmanager
        def progress(self, total: int, label: str):
            record = {"start": time.time(), "done": [], "end": None, "total": total, "cpu": [meter.sample()]}
            self.passes[label] = record
            try:
                yield lambda n=1: record["done"].append(time.time())
            finally:
                record["end"] = time.time()
                record["cpu"].append(meter.sample())

    return TimingConsole()


def run_ours(data_dir: Path, storage_dir: str, args) -> dict:
    import ray

    from jobs.storage import open_storage
    from orchestrator.ray_runtime import WORKER_ENV
    from orchestrator.runner import run_pipeline
    from orchestrator.spec import parse_spec

    init = dict(num_cpus=args.workers, log_to_driver=False, logging_level=logging.ERROR,
                runtime_env={"env_vars": WORKER_ENV})
    if args.no_dashboard:
        init["include_dashboard"] = False
    else:
        init["dashboard_host"] = "127.0.0.1"  # as orchestrator.ray_runtime.connect does
    t0 = time.perf_counter()
    ray.init(**init)
    ray_start = time.perf_counter() - t0

    fields = dict(storage=storage_dir, data=data_dir, vocab_size=args.vocab_size, sample_mb=args.sample_mb,
                  shard_mb=args.shard_mb)
    results = {"ray_init_s": ray_start}
    meter = CpuMeter()
    try:
        for k in range(1 + args.repeat):
            run, vf = f"run{k + 1}", round(0.01 * (k + 1), 2)
            console = make_console(meter, "corpus")
            print(f"  ours {run}: " + ("tokenizer + preprocess" if k == 0 else
                                       f"preprocess only (validation_fraction {vf}; the tokenizer stage is cached)"))
            spec = parse_spec(PIPELINE.format(validation_fraction=vf, **fields))
            t0 = time.perf_counter()
            record = run_pipeline(spec, open_storage(f"file://{storage_dir}"), console=console)
            wall = time.perf_counter() - t0
            stage = record.stages["corpus"]
            assert stage.status == "succeeded" and not stage.cached, stage
            if k:
                assert record.stages["tok"].cached, "reruns should reuse the tokenizer stage"
            passes = {label: {"wall_s": p["end"] - p["start"], "shards": p["total"],
                              "done_s": [t - p["start"] for t in p["done"]],
                              "offset_s": p["start"] - stage.started_at,
                              "cpu": meter.delta(*p["cpu"])}
                      for label, p in console.passes.items() if label != "training tokenizer"}
            results[run] = {
                "stage_s": stage.finished_at - stage.started_at,
                "pipeline_wall_s": wall,
                "metrics": stage.metrics,
                "passes": passes,
                "cpu": meter.delta(*console.stage_cpu),
                "output_uri": stage.output_uri,
                "tok_output_uri": record.stages["tok"].output_uri,
            }
    finally:
        ray.shutdown()
    return results


# --------------------------------------------------------------------------------------------
# Ideal: bare encode_batch_fast, one thread
# --------------------------------------------------------------------------------------------

def run_ideal(docs: list[str], tokenizer_file: str, method: str = "encode_batch_fast") -> dict:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tokenizer_file)
    encode = getattr(tok, method)
    encode(docs[:BATCH], add_special_tokens=False)  # warm-up
    tokens = 0
    meter = CpuMeter()
    a = meter.sample()
    for i in range(0, len(docs), BATCH):
        batch = docs[i:i + BATCH]
        tokens += sum(len(e) for e in encode(batch, add_special_tokens=False)) + len(batch)
    cpu = meter.delta(a, meter.sample())
    return {"tokens": tokens, "docs": len(docs), "wall_s": cpu["wall"], "cpu": cpu}


# --------------------------------------------------------------------------------------------
# datasets: load_dataset("json") + map(batched, num_proc)
# --------------------------------------------------------------------------------------------

_DS_TOKENIZER = {}


def _ds_tokenize(batch, tokenizer_file: str, eos_id: int):
    tok = _DS_TOKENIZER.get(tokenizer_file)
    if tok is None:
        from tokenizers import Tokenizer
        tok = _DS_TOKENIZER[tokenizer_file] = Tokenizer.from_file(tokenizer_file)
    encodings = tok.encode_batch_fast(batch["text"], add_special_tokens=False)
    return {"input_ids": [e.ids + [eos_id] for e in encodings]}


def run_datasets(files: list[str], tokenizer_file: str, eos_id: int, workers: int) -> dict:
    import datasets
    import pyarrow.compute as pc

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    cache = tempfile.mkdtemp(prefix="bench-datasets-")
    meter = CpuMeter()
    try:
        a = meter.sample()
        t0 = time.perf_counter()
        ds = datasets.load_dataset("json", data_files=files, split="train", cache_dir=cache)
        t_load = time.perf_counter() - t0
        out = ds.map(_ds_tokenize, batched=True, batch_size=BATCH, num_proc=workers,
                     remove_columns=ds.column_names, fn_kwargs={"tokenizer_file": tokenizer_file, "eos_id": eos_id})
        cpu = meter.delta(a, meter.sample())
        tokens = int(pc.sum(pc.list_value_length(out.data.column("input_ids"))).as_py())
        return {"tokens": tokens, "docs": len(out), "wall_s": cpu["wall"], "load_s": t_load, "cpu": cpu}
    finally:
        shutil.rmtree(cache, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Breakdown: one shard's passes called directly, without Ray
# --------------------------------------------------------------------------------------------

def breakdown(data_dir: Path, corpus_uri: str, args) -> dict:
    """CPU cost of the job code on a slice of one shard, in this process, without Ray.

    The pieces are measured interleaved, `BREAKDOWN_REPS` times, keeping each one's minimum: on
    a machine that others share, that is the estimate least inflated by their load.
    """
    from jobs.dedup import document_digest
    from jobs.preprocess import PreprocessSpec, _clean_documents, _tokenizer, encode_shard, scan_shard
    from jobs.sources import Shard, ShardReader, SourceSpec, list_source_files, plan_shards
    from jobs.storage import open_storage
    from jobs.text import normalize

    spec = PreprocessSpec(seq_len=1024, dedup=True, validation_fraction=0.01, shard_mb=args.shard_mb)
    files = list_source_files(SourceSpec(paths=[f"{data_dir}/*.jsonl"]))
    shard = plan_shards(files, "jsonl", int(args.shard_mb * 1e6))[0]
    piece = Shard(0, shard.uri, shard.format, 0, min(shard.end, int(BREAKDOWN_MB * 1e6)))
    tokenizer_uri = corpus_uri.rstrip("/") + "/tokenizer"
    tok, _ = _tokenizer(tokenizer_uri)  # the worker's once-per-process load, not counted
    tmp = tempfile.mkdtemp(prefix="bench-shard-")
    try:
        out = open_storage(f"file://{tmp}")
        raw = [item[1] for item in ShardReader(piece, "text")]
        texts = list(_clean_documents(ShardReader(piece, "text"), spec, Counter(), []))

        def encode():  # keeping every document: no dedup reduce ran
            for info in out.list("data/"):  # encode_shard skips a shard that is already committed
                out.delete(info.key)
            return encode_shard(piece, spec, "text", 1, [], tokenizer_uri, out)

        pieces = {
            "read_parse_s": lambda: [item for item in ShardReader(piece, "text")],
            "normalize_s": lambda: [normalize(t, spec.normalize) for t in raw],
            "read_parse_clean_s": lambda: list(_clean_documents(ShardReader(piece, "text"), spec, Counter(), [])),
            "dedup_key_s": lambda: [document_digest(t) for t in texts],
            "scan_s": lambda: scan_shard(piece, spec, "text", out),
            "encode_s": encode,
            "bare_tokenize_s": lambda: [tok.encode_batch_fast(texts[i:i + BATCH], add_special_tokens=False)
                                        for i in range(0, len(texts), BATCH)],
        }
        best = dict.fromkeys(pieces, float("inf"))
        for _ in range(BREAKDOWN_REPS):
            for name, fn in pieces.items():
                t0 = time.process_time()
                fn()
                best[name] = min(best[name], time.process_time() - t0)
        result = {"shard_mb": (piece.end - piece.start) / 1e6, "docs": len(texts),
                  "tokens": encode()["num_tokens"], **best}
        if args.profile:  # the whole first shard, once, as a Ray worker would run it
            result["profiles"] = {}
            for name, fn, fargs in (("scan_shard", scan_shard, (shard, spec, "text", out)),
                                    ("encode_shard", encode_shard,
                                     (shard, spec, "text", 1, [], tokenizer_uri, out))):
                for info in out.list(""):
                    out.delete(info.key)
                profiler = cProfile.Profile()
                profiler.runcall(fn, *fargs)
                buffer = io.StringIO()
                pstats.Stats(profiler, stream=buffer).sort_stats("tottime").print_stats(14)
                result["profiles"][name] = f"({(shard.end - shard.start) / 1e6:.2f} MB)\n" + buffer.getvalue()
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=float, default=40.0, help="corpus size in MB (default 40)")
    p.add_argument("--workers", type=int, default=2, help="Ray CPUs for our stage, num_proc for datasets, x for the ideal")
    p.add_argument("--shard-mb", type=float, default=None,
                   help="preprocess shard_mb (default: about 4 shards per worker, cut evenly from the files)")
    p.add_argument("--repeat", type=int, default=2,
                   help="measurements of each contender (ours: preprocess-only reruns after run 1); the best counts")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--sample-mb", type=float, default=4.0, help="tokenizer stage training sample (not timed)")
    p.add_argument("--no-dashboard", action="store_true", help="start Ray without its dashboard (the CLI starts it)")
    p.add_argument("--profile", action="store_true", help="cProfile scan_shard and encode_shard on one shard")
    p.add_argument("--keep", action="store_true", help="keep the pipeline's storage directory")
    p.add_argument("--json", help="also write all numbers to this JSON file")
    args = p.parse_args(argv)
    t_start = time.perf_counter()

    data_dir, meta = ensure_corpus(args.mb)
    files = sorted(glob.glob(str(data_dir / "*.jsonl")))
    if args.shard_mb is None:
        per_file = math.ceil(4 * args.workers / len(files))
        args.shard_mb = math.ceil(max(os.path.getsize(f) for f in files) / per_file / 1e4) / 100  # MB, 2 decimals
    print(f"corpus: {meta['num_docs']:,} docs, {meta['bytes'] / 1e6:.1f} MB in {len(files)} files ({data_dir}); "
          f"shard_mb {args.shard_mb}, workers {args.workers}")

    storage_dir = tempfile.mkdtemp(prefix="bench-preprocess-")
    try:
        ours = run_ours(data_dir, storage_dir, args)
        tok_dir = ours["run1"]["tok_output_uri"].removeprefix("file://")
        tokenizer_file = os.path.join(tok_dir, "tokenizer.json")
        eos_id = json.load(open(os.path.join(tok_dir, "info.json")))["eos_id"]

        docs = read_documents(files)
        ideals, dss = [], []
        for k in range(max(args.repeat, 1)):
            print(f"  ideal #{k + 1}: bare encode_batch_fast, one thread")
            ideals.append(run_ideal(docs, tokenizer_file))
            print(f"  datasets #{k + 1}: load_dataset('json') + map(batched=True, num_proc={args.workers})")
            dss.append(run_datasets(files, tokenizer_file, eos_id, args.workers))
        print("  ideal (as the issue words it): bare encode_batch (with offsets), one thread")
        ideal_offsets = run_ideal(docs, tokenizer_file, "encode_batch")
        del docs
        print("  breakdown: the job code on a slice of shard 0, in process, no Ray")
        shard = breakdown(data_dir, ours["run1"]["output_uri"], args)
    finally:
        if args.keep:
            print(f"storage kept at {storage_dir}")
        else:
            shutil.rmtree(storage_dir, ignore_errors=True)

    # ---- report ----
    w = args.workers
    runs = {k: v for k, v in ours.items() if k.startswith("run")}
    ours_tokens = runs["run1"]["metrics"]["num_tokens"]
    m1 = runs["run1"]["metrics"]
    print()
    print(f"tokens (ids + 1 end-of-text per kept doc): ours {ours_tokens:,} ({m1['num_documents']:,} docs, "
          f"drops {m1['drops']}), ideal {ideals[0]['tokens']:,} ({ideals[0]['docs']:,} docs), "
          f"datasets {dss[0]['tokens']:,} ({dss[0]['docs']:,} docs)")
    for name, n in [("ours " + k, r["metrics"]["num_tokens"]) for k, r in runs.items()] + \
                   [("ideal", i["tokens"]) for i in ideals] + [("datasets", d["tokens"]) for d in dss]:
        assert abs(n - ours_tokens) <= 1e-3 * ours_tokens, f"token counts disagree: ours {ours_tokens}, {name} {n}"

    ideal_best = min(ideals, key=lambda r: r["wall_s"])
    ideal_rate = ideal_best["tokens"] / ideal_best["wall_s"] * w
    print(f"\n{'measurement (wall clock)':58} {'seconds':>8} {'tokens/s':>11} {'/ideal':>7} {'others load':>11}")
    def row(label, seconds, c=None):
        rate = ours_tokens / seconds
        load = f"{c['others'] / c['wall']:.2f}" if c else ""
        print(f"{label:58} {seconds:8.2f} {rate:11,.0f} {rate / ideal_rate:7.2f} {load:>11}")
        return rate
    stage_rates, e2e_rates = {}, {}
    for k, r in runs.items():
        what = "after the tokenizer stage" if k == "run1" else "only preprocess reruns"
        stage_rates[k] = row(f"ours {k}: preprocess stage ({what})", r["stage_s"], r["cpu"])
        if k != "run1":
            e2e_rates[k] = row(f"ours {k}: run_pipeline end to end", r["pipeline_wall_s"])
    for i, r in enumerate(ideals, 1):
        row(f"ideal #{i}: encode_batch_fast, 1 thread", r["wall_s"], r["cpu"])
        row(f"ideal #{i} x {w}", r["wall_s"] / w)
    ds_rates = [row(f"datasets #{i}: load_dataset + map(num_proc={w})", r["wall_s"], r["cpu"])
                for i, r in enumerate(dss, 1)]
    print("  (others load: average number of cores busy with processes outside this benchmark meanwhile)")
    loads = ", ".join(f"{r['load_s']:.1f}" for r in dss)
    print(f"  (ray.init took {ours['ray_init_s']:.1f}s, outside every number above; datasets' load_dataset took "
          f"{loads}s, inside its numbers)")
    ours_rate, ds_rate = max(stage_rates.values()), max(ds_rates)
    e2e_rate = max(e2e_rates.values()) if e2e_rates else float("nan")
    print(f"\nbest of each: ours {ours_rate:,.0f} tokens/s (stage; {e2e_rate:,.0f} end to end), "
          f"ideal {ideal_rate:,.0f}, datasets {ds_rate:,.0f}")
    print(f"ours / ideal    = {ours_rate / ideal_rate:.3f}   (end to end {e2e_rate / ideal_rate:.3f}; "
          f"run 1 {stage_rates['run1'] / ideal_rate:.3f}; aim >= 0.85)")
    offsets_rate = ideal_offsets["tokens"] / ideal_offsets["wall_s"] * w
    print(f"ours / ideal with encode_batch (the issue's wording; it also computes offsets, which we "
          f"skip) = {ours_rate / offsets_rate:.3f}   ({offsets_rate:,.0f} tokens/s)")
    print(f"ours / datasets = {ours_rate / ds_rate:.3f}   (end to end {e2e_rate / ds_rate:.3f}; "
          f"run 1 {stage_rates['run1'] / ds_rate:.3f}; aim > 1)")

    # CPU view: tokens per CPU-second of everything each contender ran (ours: workers + Ray's
    # daemons + driver). Less sensitive to others' load than wall clock, though not immune to it
    # (2 vCPUs that others share also slow each other down).
    print(f"\n{'CPU seconds (best of each)':58} {'cpu s':>8} {'tok/cpu-s':>11} {'/ideal':>7}  split")
    best_cpu = {
        "ours, preprocess stage": min((r["cpu"] for r in runs.values()), key=lambda c: c["ours"]),
        "ideal, 1 thread": min((r["cpu"] for r in ideals), key=lambda c: c["ours"]),
        f"datasets, load + map(num_proc={w})": min((r["cpu"] for r in dss), key=lambda c: c["ours"]),
    }
    ideal_cpu = best_cpu["ideal, 1 thread"]["ours"]
    for label, c in best_cpu.items():
        split = (f"workers {c['workers']:.1f}, Ray daemons {c['ray']:.1f}, driver {c['driver']:.1f}" if label.startswith("ours")
                 else f"main process {c['driver']:.1f}, child processes {c['reaped'] + c['workers'] + c['ray']:.1f}")
        print(f"{label:58} {c['ours']:8.2f} {ours_tokens / c['ours']:11,.0f} {ideal_cpu / c['ours']:7.2f}  {split}")

    print("\nour stage, pass by pass (console progress hooks; wall s; busy = worker CPU / (wall x workers)):")
    for k, r in runs.items():
        scan, enc = r["passes"]["scan"], r["passes"]["tokenize + pack"]
        between = enc["offset_s"] - scan["offset_s"] - scan["wall_s"]
        after = r["stage_s"] - enc["offset_s"] - enc["wall_s"]
        print(f"  {k}: stage {r['stage_s']:.2f} = setup {scan['offset_s']:.2f} + scan pass {scan['wall_s']:.2f} + "
              f"keep-mask {between:.2f} + encode pass {enc['wall_s']:.2f} + manifest {after:.2f}")
        for label, p in (("scan", scan), ("encode", enc)):
            c = p["cpu"]
            print(f"    {label:6} worker CPU {c['workers']:6.2f}s, busy {c['workers'] / (c['wall'] * w):4.0%}, "
                  f"Ray daemons {c['ray']:.2f}s, driver {c['driver']:.2f}s, others load {c['others'] / c['wall']:.2f}; "
                  f"shards done at {', '.join(f'{t:.1f}' for t in p['done_s'])}s")
    sh = shard
    print(f"job code in process, no Ray, on a {sh['shard_mb']:.2f} MB slice of shard 0 ({sh['docs']:,} docs, {sh['tokens']:,} tokens), "
          f"best-of-{BREAKDOWN_REPS} CPU s:")
    print(f"  read+parse {sh['read_parse_s']:.3f} | normalize alone {sh['normalize_s']:.3f} | read+parse+normalize+filter "
          f"{sh['read_parse_clean_s']:.3f} | dedup_key {sh['dedup_key_s']:.3f}")
    print(f"  scan_shard {sh['scan_s']:.3f} + encode_shard {sh['encode_s']:.3f} = {sh['scan_s'] + sh['encode_s']:.3f} "
          f"vs bare encode_batch_fast of its docs {sh['bare_tokenize_s']:.3f}: job code alone reaches "
          f"{sh['bare_tokenize_s'] / (sh['scan_s'] + sh['encode_s']):.2f} of the ideal before any Ray cost")
    scale = ours_tokens / sh["tokens"] / w
    print(f"  scaled to the corpus on {w} otherwise idle cores: scan pass ~{sh['scan_s'] * scale:.1f}s + encode pass "
          f"~{sh['encode_s'] * scale:.1f}s, of which bare tokenizing ~{sh['bare_tokenize_s'] * scale:.1f}s and "
          f"normalize ~{sh['normalize_s'] * scale:.1f}s per pass")
    for name, text in shard.get("profiles", {}).items():
        print(f"\ncProfile of {name} on shard 0 (tottime):\n{text}")
    print(f"total bench time {time.perf_counter() - t_start:.0f}s")

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "corpus": meta, "ours": ours, "ideal": ideals, "datasets": dss,
                       "shard": shard, "best": {"ours": ours_rate, "ours_e2e": e2e_rate, "ideal": ideal_rate,
                                                "datasets": ds_rate}}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
