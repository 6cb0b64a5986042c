#!/usr/bin/env python3
"""Benchmark: how well near-dedup finds planted near-duplicates, ours vs datasketch's MinHashLSH.

Corpus (generated here, seeded): `--docs` distinct documents of 150-400 words drawn from a
Zipf-distributed vocabulary (independent draws: any two share almost no word 5-gram), then, for
each edit rate, `--copies` copies of distinct source documents with that share of their words
substituted by new words. The distinct documents come first (two files), the copies after them
(two more files, shuffled), so the copy is the later document of each pair: the one to drop.

Truth: a document is a near-duplicate iff it is a planted copy whose Jaccard similarity of word
5-gram sets (words: `\\w+` of the lowercased text, as our shingles) with its source is >= `--truth`
(0.8), computed exactly. Precision and recall of each method's drops against that, per edit rate
and overall. Expected Jaccard for substitution rate r: (1-r)^5 / (2 - (1-r)^5), so 0.8 falls
between 2% and 3% of words; the rates straddle it.

Methods, all on the same documents, MinHash over word 5-grams, num_perm = bands x rows = 112:
  ours       the preprocess stage end to end (`run_pipeline`, embedded Ray, 2 CPUs) with
             `near_dedup: {}` (datatrove's 14 x 8, no verification: every candidate pair counts)
             and with `near_dedup: {threshold: <truth>}` (candidate pairs verified against the
             signatures); exact dedup off. Drops read from the stage's committed drop list.
  datasketch `MinHashLSH`, documents in corpus order, each queried then inserted if it has no
             match (the usual way to dedup with it); once with `params=(14, 8)` (our banding) and
             once with `threshold` = our banding's implied threshold (1/14)^(1/8) = 0.72, where it
             chooses its own bands and rows.

    .venv/bin/python bench/near_dedup_quality.py [--docs 2000] [--copies 100] [--json FILE]
"""

from __future__ import annotations

import os

os.environ["TOKENIZERS_PARALLELISM"] = "false"

import argparse
import json
import logging
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

EDIT_RATES = (0.01, 0.02, 0.03, 0.05, 0.10, 0.20, 0.40)
BANDS, ROWS, SHINGLE = 14, 8, 5
VOCABULARY_SIZE = 30_000
_WORD = re.compile(r"\w+")

PIPELINE = """
name: bench-near-dedup
storage: file://{storage}
stages:
  tok:
    kind: tokenizer
    source: {{paths: ["{data}/*.jsonl"], format: jsonl, text_field: text}}
    vocab_size: 4096
  near:
    kind: preprocess
    source: {{paths: ["{data}/*.jsonl"], format: jsonl, text_field: text}}
    tokenizer: tok
    seq_len: 256
    dedup: false
    near_dedup: {{}}
  near_verified:
    kind: preprocess
    source: {{paths: ["{data}/*.jsonl"], format: jsonl, text_field: text}}
    tokenizer: tok
    seq_len: 256
    dedup: false
    near_dedup: {{threshold: {truth}}}
"""


# --------------------------------------------------------------------------------------------
# Corpus and truth
# --------------------------------------------------------------------------------------------

def make_corpus(num_docs: int, copies_per_rate: int, seed: int) -> tuple[list[list[str]], list[dict]]:
    """Files of documents, and per document (in corpus order) its kind, edit rate and source."""
    rng = np.random.default_rng(seed)
    words = np.array([f"{_syllables(i)}" for i in range(VOCABULARY_SIZE)])
    weights = 1.0 / np.arange(1, VOCABULARY_SIZE + 1)  # Zipf: a few frequent words, a long tail
    weights /= weights.sum()
    bases = [" ".join(rng.choice(words, int(rng.integers(150, 401)), p=weights)) for _ in range(num_docs)]
    sources = rng.choice(num_docs, copies_per_rate * len(EDIT_RATES), replace=False)
    copies = []
    for k, source in enumerate(sources.tolist()):
        rate = EDIT_RATES[k // copies_per_rate]
        tokens = bases[source].split()
        for i in rng.choice(len(tokens), max(1, round(rate * len(tokens))), replace=False):
            tokens[i] = f"new{rng.integers(10**9)}"
        copies.append((" ".join(tokens), {"kind": "copy", "rate": rate, "source": source}))
    order = rng.permutation(len(copies))
    copies = [copies[i] for i in order]
    half, half_copies = num_docs // 2, len(copies) // 2
    files = [bases[:half], bases[half:], [c[0] for c in copies[:half_copies]], [c[0] for c in copies[half_copies:]]]
    info = [{"kind": "distinct"} for _ in bases] + [c[1] for c in copies]
    return files, info


def _syllables(i: int) -> str:
    """A pronounceable word per index (so that tokenizers and \\w+ treat it as one word)."""
    consonants, vowels = "bcdfghklmnprstvz", "aeiou"
    out = ""
    while True:
        out += consonants[i % 16] + vowels[(i // 16) % 5]
        i //= 80
        if not i:
            return out


def shingles(text: str) -> set[tuple[str, ...]]:
    words = _WORD.findall(text.lower())
    return {tuple(words[i:i + SHINGLE]) for i in range(max(len(words) - SHINGLE + 1, 1))}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b)


# --------------------------------------------------------------------------------------------
# Methods: each returns the set of corpus indices it drops
# --------------------------------------------------------------------------------------------

def run_ours(data_dir: str, files: list[list[str]], truth: float, workers: int) -> dict:
    import ray

    from jobs.near_dedup import NEAR_DROPS_KEY
    from jobs.shuffle import read_shard_positions
    from jobs.sources import SourceSpec, list_source_files, plan_shards
    from jobs.storage import open_storage
    from orchestrator.console import Console
    from orchestrator.ray_runtime import WORKER_ENV
    from orchestrator.runner import run_pipeline
    from orchestrator.spec import parse_spec

    storage = tempfile.mkdtemp(prefix="bench-near-dedup-")
    ray.init(num_cpus=workers, log_to_driver=False, logging_level=logging.ERROR, include_dashboard=False,
             runtime_env={"env_vars": WORKER_ENV})
    try:
        record = run_pipeline(parse_spec(PIPELINE.format(storage=storage, data=data_dir, truth=truth)),
                              open_storage(f"file://{storage}"), console=Console(open(os.devnull, "w")))
        # one shard per file (the files are far below shard_mb): shard index -> the file's first document
        shards = plan_shards(list_source_files(SourceSpec(paths=[f"{data_dir}/*.jsonl"])), "jsonl", 64_000_000)
        assert [s.uri.rsplit("/", 1)[1] for s in shards] == [f"part-{i}.jsonl" for i in range(len(files))], shards
        first = np.cumsum([0] + [len(f) for f in files])
        results = {}
        for name in ("near", "near_verified"):
            stage = record.stages[name]
            assert stage.status == "succeeded", stage
            other = {k: v for k, v in stage.metrics["drops"].items() if k != "near_duplicate" and v}
            assert not other, f"{name}: documents dropped for other reasons, positions would not be lines: {other}"
            out = open_storage(stage.output_uri)
            dropped = {int(first[s] + pos) for s in range(len(shards))
                       for pos in read_shard_positions(out, [NEAR_DROPS_KEY], s, len(shards))}
            assert len(dropped) == stage.metrics["drops"].get("near_duplicate", 0)
            results[name] = {"dropped": dropped, "wall_s": stage.finished_at - stage.started_at}
        return results
    finally:
        ray.shutdown()
        shutil.rmtree(storage, ignore_errors=True)


def run_datasketch(docs: list[str], **lsh_args) -> dict:
    from datasketch import MinHash, MinHashLSH

    t0 = time.perf_counter()
    lsh = MinHashLSH(num_perm=BANDS * ROWS, **lsh_args)
    dropped = set()
    for i, text in enumerate(docs):
        m = MinHash(num_perm=BANDS * ROWS, seed=1)
        m.update_batch([" ".join(g).encode() for g in shingles(text)])
        if lsh.query(m):
            dropped.add(i)
        else:
            lsh.insert(str(i), m)
    return {"dropped": dropped, "wall_s": time.perf_counter() - t0, "bands_rows": (lsh.b, lsh.r)}


# --------------------------------------------------------------------------------------------

def score(dropped: set[int], positive: set[int], members: set[int]) -> tuple[int, float, float]:
    """Drops among `members`, and their precision and recall against `positive`."""
    d = dropped & members
    p = positive & members
    hit = len(d & p)
    return len(d), (hit / len(d) if d else float("nan")), (hit / len(p) if p else float("nan"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--docs", type=int, default=2000, help="distinct documents (default 2000)")
    p.add_argument("--copies", type=int, default=100, help="near-duplicates planted per edit rate (default 100)")
    p.add_argument("--truth", type=float, default=0.8, help="Jaccard of word 5-grams at or above which a copy "
                                                             "is a near-duplicate (default 0.8)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write all numbers to this JSON file")
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    try:
        import datasketch  # noqa: F401
    except ImportError:
        print("datasketch is not installed (.venv/bin/pip install datasketch): this benchmark compares with it")
        return 1

    files, info = make_corpus(args.docs, args.copies, args.seed)
    docs = [d for f in files for d in f]
    grams = [shingles(d) for d in docs]
    for k, i in enumerate(info):
        if i["kind"] == "copy":
            i["jaccard"] = jaccard(grams[k], grams[i["source"]])
    positive = {k for k, i in enumerate(info) if i["kind"] == "copy" and i["jaccard"] >= args.truth}
    data_dir = tempfile.mkdtemp(prefix="bench-near-dedup-data-")
    try:
        for n, f in enumerate(files):
            Path(data_dir, f"part-{n}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in f))
        print(f"corpus: {args.docs:,} distinct documents + {args.copies} copies at each of the edit rates "
              f"{', '.join(f'{r:.0%}' for r in EDIT_RATES)}; {len(positive)} copies with Jaccard >= {args.truth}")
        print("  ours: the preprocess stage on Ray, near_dedup {} and {threshold: %g}" % args.truth)
        ours = run_ours(data_dir, files, args.truth, args.workers)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    implied = (1 / BANDS) ** (1 / ROWS)
    print(f"  datasketch: MinHashLSH params=({BANDS}, {ROWS}), then threshold={implied:.2f}")
    methods = {
        "ours {}": ours["near"],
        f"ours threshold {args.truth:g}": ours["near_verified"],
        f"datasketch ({BANDS}, {ROWS})": run_datasketch(docs, params=(BANDS, ROWS)),
        f"datasketch t={implied:.2f}": run_datasketch(docs, threshold=implied),
    }

    names = list(methods)
    print(f"\n{'group':>22} {'docs':>5} {'truth':>5} {'mean J':>6} | " +
          " | ".join(f"{n:^24}" for n in names))
    print(f"{'':>22} {'':>5} {'':>5} {'':>6} | " + " | ".join(f"{'drops':>6} {'prec':>8} {'recall':>8}" for _ in names))
    groups = [(f"copies, {r:.0%} of words", {k for k, i in enumerate(info) if i.get("rate") == r}) for r in EDIT_RATES]
    groups += [("distinct documents", {k for k, i in enumerate(info) if i["kind"] == "distinct"}),
               ("all", set(range(len(docs))))]
    table = {}
    for label, members in groups:
        js = [info[k]["jaccard"] for k in members if info[k]["kind"] == "copy"]
        mean_j = f"{np.mean(js):.3f}" if js else ""
        cells, table[label] = [], {}
        for n in names:
            num, prec, rec = score(methods[n]["dropped"], positive, members)
            table[label][n] = {"drops": num, "precision": prec, "recall": rec}
            cells.append(f"{num:6} {prec:8.3f} {rec:8.3f}")
        print(f"{label:>22} {len(members):5} {len(positive & members):5} {mean_j:>6} | " + " | ".join(cells))
    print("  (prec: drops that are true near-duplicates / drops; recall: true near-duplicates dropped / true; "
          "nan: nothing to divide)")
    for n in names:
        chosen = methods[n].get("bands_rows")
        print(f"  {n}: {methods[n]['wall_s']:.2f}s" + (f" (bands x rows {chosen[0]} x {chosen[1]})" if chosen else "") +
              (" (the stage end to end: read, tokenize, pack too)" if n.startswith("ours") else ""))
    print(f"total bench time {time.perf_counter() - t_start:.0f}s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "table": table,
                       "wall_s": {n: m["wall_s"] for n, m in methods.items()}}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
