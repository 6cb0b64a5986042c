#!/usr/bin/env python3
"""Benchmark: our preprocess stage vs. a bare tokenizer loop (the ideal) vs. `datasets` map.

On one generated jsonl corpus (kept under bench/.data/ and reused), side by side:

  ours      the real pipeline (`run_pipeline`: a tokenizer stage, then a preprocess stage) on an
            embedded Ray with `--workers` CPUs; seq_len 1024, dedup on, default filters, several
            shards per worker. Timed from the run record's stage started_at/finished_at (run 1,
            both stages), and again end to end on a second run that changes only
            validation_fraction, so that only the preprocess stage reruns (run 2).
  ideal     `tokenizers.Tokenizer.encode_batch_fast` over the same documents, already in memory,
            with the same tokenizer.json, single-threaded (TOKENIZERS_PARALLELISM=false);
            single-core tokens/s x workers.
  datasets  `load_dataset("json", ...)` of the same files + `.map(batched=True, num_proc=workers)`
            with the same tokenizer (tokenize only; its load is included).

Tokens are counted the same way in all three: the token ids of every kept document plus one
end-of-text per document (what the stage's `num_tokens` metric counts, before packing drops the
remainder of each shard). Ray is shut down before the ideal and datasets runs, so its daemons do
not share the cores with them.

    .venv/bin/python bench/preprocess.py [--mb 40] [--workers 2] [--profile]
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
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=DATA_ROOT if DATA_ROOT.exists() else None))
    DATA_ROOT.mkdir(parents=True, exist_ok=True)
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


def make_console():
    """A Console that also timestamps its lines and each pass's progress (the scan / encode split)."""
    from orchestrator.console import Console

    class TimingConsole(Console):
        def __init__(self):
            super().__init__(sys.stdout)
            self.passes: dict[str, dict] = {}

        def line(self, text: str) -> None:
            super().line("    | " + text)

        @contextlib.contextmanager
        def progress(self, total: int, label: str):
            record = {"start": time.time(), "done": [], "end": None, "total": total}
            self.passes[label] = record
            try:
                yield lambda n=1: record["done"].append(time.time())
            finally:
                record["end"] = time.time()

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
    try:
        for run, vf in (("run1", 0.01), ("run2", 0.02)):
            console = make_console()
            print(f"  ours {run}: {'tokenizer + preprocess' if run == 'run1' else 'preprocess only (validation_fraction changed)'}")
            spec = parse_spec(PIPELINE.format(validation_fraction=vf, **fields))
            t0 = time.perf_counter()
            record = run_pipeline(spec, open_storage(f"file://{storage_dir}"), console=console)
            wall = time.perf_counter() - t0
            stage = record.stages["corpus"]
            assert stage.status == "succeeded" and not stage.cached, stage
            if run == "run2":
                assert record.stages["tok"].cached, "run 2 should reuse the tokenizer stage"
            passes = {label: {"wall_s": p["end"] - p["start"], "shards": p["total"],
                              "first_done_s": (p["done"][0] - p["start"]) if p["done"] else None,
                              "offset_s": p["start"] - stage.started_at}
                      for label, p in console.passes.items() if label != "training tokenizer"}
            results[run] = {
                "stage_s": stage.finished_at - stage.started_at,
                "pipeline_wall_s": wall,
                "metrics": stage.metrics,
                "passes": passes,
                "output_uri": stage.output_uri,
                "tok_output_uri": record.stages["tok"].output_uri,
            }
    finally:
        ray.shutdown()
    return results


# --------------------------------------------------------------------------------------------
# Ideal: bare encode_batch_fast, one thread
# --------------------------------------------------------------------------------------------

def run_ideal(docs: list[str], tokenizer_file: str) -> dict:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tokenizer_file)
    tok.encode_batch_fast(docs[:BATCH], add_special_tokens=False)  # warm-up
    tokens = 0
    c0, t0 = time.process_time(), time.perf_counter()
    for i in range(0, len(docs), BATCH):
        batch = docs[i:i + BATCH]
        tokens += sum(len(e) for e in tok.encode_batch_fast(batch, add_special_tokens=False)) + len(batch)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"tokens": tokens, "docs": len(docs), "wall_s": wall, "cpu_s": cpu}


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
    try:
        t0 = time.perf_counter()
        ds = datasets.load_dataset("json", data_files=files, split="train", cache_dir=cache)
        t_load = time.perf_counter() - t0
        out = ds.map(_ds_tokenize, batched=True, batch_size=BATCH, num_proc=workers,
                     remove_columns=ds.column_names, fn_kwargs={"tokenizer_file": tokenizer_file, "eos_id": eos_id})
        wall = time.perf_counter() - t0
        tokens = int(pc.sum(pc.list_value_length(out.data.column("input_ids"))).as_py())
        return {"tokens": tokens, "docs": len(out), "wall_s": wall, "load_s": t_load}
    finally:
        shutil.rmtree(cache, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Breakdown: one shard's passes called directly, without Ray
# --------------------------------------------------------------------------------------------

def breakdown(data_dir: Path, corpus_uri: str, args) -> dict:
    """Times one shard's scan_shard and encode_shard in this process, and the pieces they share."""
    from jobs.preprocess import PreprocessSpec, _clean_documents, encode_shard, load_scan, scan_shard
    from jobs.sources import ShardReader, list_source_files, plan_shards, SourceSpec
    from jobs.storage import open_storage

    spec = PreprocessSpec(seq_len=1024, dedup=True, validation_fraction=0.01, shard_mb=args.shard_mb)
    files = list_source_files(SourceSpec(paths=[f"{data_dir}/*.jsonl"]))
    shard = plan_shards(files, "jsonl", int(args.shard_mb * 1e6))[0]
    tokenizer_uri = corpus_uri.rstrip("/") + "/tokenizer"
    tmp = tempfile.mkdtemp(prefix="bench-shard-")
    try:
        out = open_storage(f"file://{tmp}")

        def timed(fn, *a):
            t0 = time.perf_counter()
            result = fn(*a)
            return time.perf_counter() - t0, result

        t_read, lines = timed(lambda: sum(1 for _ in ShardReader(shard, "text")))
        t_clean, texts = timed(lambda: list(_clean_documents(ShardReader(shard, "text"), spec, Counter(), [])))
        t_scan, _ = timed(scan_shard, shard, spec, "text", out)
        keep = np.ones(len(load_scan(out, shard.index)[0]), dtype=bool)
        from jobs.preprocess import _tokenizer
        _tokenizer(tokenizer_uri)  # the worker's once-per-process load, not counted
        t_encode, counts = timed(encode_shard, shard, spec, "text", keep, tokenizer_uri, out)
        tok, _ = _tokenizer(tokenizer_uri)
        t_tok, _ = timed(lambda: [tok.encode_batch_fast(texts[i:i + BATCH], add_special_tokens=False)
                                  for i in range(0, len(texts), BATCH)])
        result = {
            "shard_mb": (shard.end - shard.start) / 1e6, "docs": len(texts), "tokens": counts["num_tokens"],
            "read_parse_s": t_read, "read_parse_clean_s": t_clean, "scan_s": t_scan, "encode_s": t_encode,
            "bare_tokenize_s": t_tok,
        }
        if args.profile:
            result["profiles"] = {}
            for name, fn, fargs in (("scan_shard", scan_shard, (shard, spec, "text", out)),
                                    ("encode_shard", encode_shard, (shard, spec, "text", keep, tokenizer_uri, out))):
                for key in list(out.list("")):
                    out.delete(key.key)
                profiler = cProfile.Profile()
                profiler.runcall(fn, *fargs)
                buffer = io.StringIO()
                pstats.Stats(profiler, stream=buffer).sort_stats("tottime").print_stats(14)
                result["profiles"][name] = buffer.getvalue()
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

        print("  ideal: bare encode_batch_fast, one thread")
        docs = read_documents(files)
        ideal = run_ideal(docs, tokenizer_file)
        del docs
        print(f"  datasets: load_dataset('json') + map(batched=True, num_proc={args.workers})")
        ds = run_datasets(files, tokenizer_file, eos_id, args.workers)
        print("  breakdown: one shard's passes, in process, no Ray")
        shard = breakdown(data_dir, ours["run1"]["output_uri"], args)
    finally:
        if args.keep:
            print(f"storage kept at {storage_dir}")
        else:
            shutil.rmtree(storage_dir, ignore_errors=True)

    # ---- report ----
    m1, m2 = ours["run1"]["metrics"], ours["run2"]["metrics"]
    ours_tokens = m1["num_tokens"]
    assert m2["num_tokens"] == ours_tokens
    rate = lambda tokens, s: tokens / s  # noqa: E731
    single = rate(ideal["tokens"], ideal["wall_s"])
    ideal_rate = single * args.workers
    ours1 = rate(ours_tokens, ours["run1"]["stage_s"])
    ours2_stage = rate(ours_tokens, ours["run2"]["stage_s"])
    ours2_e2e = rate(ours_tokens, ours["run2"]["pipeline_wall_s"])
    ds_rate = rate(ds["tokens"], ds["wall_s"])

    print()
    print(f"tokens (ids + 1 end-of-text per kept doc): ours {ours_tokens:,} ({m1['num_documents']:,} docs, "
          f"drops {m1['drops']}), ideal {ideal['tokens']:,} ({ideal['docs']:,} docs), "
          f"datasets {ds['tokens']:,} ({ds['docs']:,} docs)")
    for name, n in (("ideal", ideal["tokens"]), ("datasets", ds["tokens"])):
        assert abs(n - ours_tokens) <= 1e-3 * ours_tokens, f"token counts disagree: ours {ours_tokens}, {name} {n}"
    print(f"{'':44} {'seconds':>8} {'tokens/s':>12} {'ours/this':>9}")
    rows = [
        (f"ours, run 1 stage ({m1['num_shards']} shards)", ours["run1"]["stage_s"], ours1),
        ("ours, run 2 stage (only preprocess reruns)", ours["run2"]["stage_s"], ours2_stage),
        ("ours, run 2 run_pipeline end to end", ours["run2"]["pipeline_wall_s"], ours2_e2e),
        (f"ideal, 1 thread (cpu/wall {ideal['cpu_s'] / ideal['wall_s']:.2f})", ideal["wall_s"], single),
        (f"ideal x {args.workers}", ideal["wall_s"] / args.workers, ideal_rate),
        (f"datasets load + map(num_proc={args.workers}) (load {ds['load_s']:.1f}s)", ds["wall_s"], ds_rate),
    ]
    for label, seconds, r in rows:
        print(f"{label:44} {seconds:8.2f} {r:12,.0f} {ours1 / r:9.2f}")
    print(f"ours / ideal    = {ours1 / ideal_rate:.3f}  (run 2 stage: {ours2_stage / ideal_rate:.3f}, "
          f"run 2 end to end: {ours2_e2e / ideal_rate:.3f}; aim >= 0.85)")
    print(f"ours / datasets = {ours1 / ds_rate:.3f}  (run 2 stage: {ours2_stage / ds_rate:.3f}, "
          f"run 2 end to end: {ours2_e2e / ds_rate:.3f}; aim > 1)")

    print("\nwhere our stage's time goes (run 1 | run 2), from the console's progress hooks:")
    for run in ("run1", "run2"):
        r = ours[run]
        passes = r["passes"]
        scan, enc = passes.get("scan"), passes.get("tokenize + pack")
        before = scan["offset_s"]
        between = enc["offset_s"] - scan["offset_s"] - scan["wall_s"]
        after = r["stage_s"] - enc["offset_s"] - enc["wall_s"]
        print(f"  {run}: stage {r['stage_s']:.2f}s = setup {before:.2f} + scan pass {scan['wall_s']:.2f} + "
              f"dedup/keep-mask {between:.2f} + encode pass {enc['wall_s']:.2f} + manifest/commit {after:.2f}")
    n_shards = m1["num_shards"]
    per_worker = math.ceil(n_shards / args.workers)
    print(f"one shard in process, no Ray ({shard['shard_mb']:.2f} MB, {shard['docs']:,} docs, {shard['tokens']:,} tokens):")
    print(f"  read+parse {shard['read_parse_s']:.2f}s, read+parse+normalize+filter {shard['read_parse_clean_s']:.2f}s, "
          f"scan_shard {shard['scan_s']:.2f}s, encode_shard {shard['encode_s']:.2f}s "
          f"(its bare encode_batch_fast {shard['bare_tokenize_s']:.2f}s)")
    print(f"  x {per_worker} shards per worker: scan ~{shard['scan_s'] * per_worker:.2f}s, "
          f"encode ~{shard['encode_s'] * per_worker:.2f}s per pass if Ray cost nothing and 2 tasks ran at full speed")
    for name, text in shard.get("profiles", {}).items():
        print(f"\ncProfile of {name} on shard 0 (tottime):\n{text}")
    print(f"total bench time {time.perf_counter() - t_start:.0f}s")

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "corpus": meta, "ours": ours, "ideal": ideal, "datasets": ds,
                       "shard": shard, "rates": {"ours_run1": ours1, "ours_run2_stage": ours2_stage,
                                                 "ours_run2_e2e": ours2_e2e, "ideal": ideal_rate,
                                                 "ideal_single": single, "datasets": ds_rate}}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
