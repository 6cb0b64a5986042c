#!/usr/bin/env python3
"""Benchmark: what each published quality rule set costs per document, next to tokenizing it.

On the preprocess benchmark's kind of corpus (examples/make_corpus.py `generate_documents`, seed 0,
about `--mb` MB of text), single-threaded, in this process, documents already normalized:

  no rule set   `rejection_reason` with the default FilterSpec (what the stage does today)
  <rule set>    `rejection_reason` with only that rule set (plus `clean_lines` for c4)
  all four      all rule sets at once (they share the per-document statistics)
  tokenize      `Tokenizer.encode_batch_fast` in batches of 512 (the stage's batch), with a
                byte-level BPE trained on the first 4 MB of the same documents (vocab 8192)

Each is timed `--repeat` times, interleaved, and the best counts (the host is noisy).

    .venv/bin/python bench/quality_filters.py [--mb 20] [--repeat 3]
"""

from __future__ import annotations

import os

os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread: the stage runs one per worker

import argparse
import importlib.util
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from jobs.text import FilterSpec, NormalizeSpec, clean_lines, normalize, rejection_reason  # noqa: E402
from jobs.tokenizer import load_tokenizer, train_tokenizer  # noqa: E402

BATCH = 512
RULE_SETS = ("gopher_quality", "gopher_repetition", "c4", "fineweb")


def documents(mb: float) -> list[str]:
    spec = importlib.util.spec_from_file_location("make_corpus", REPO / "examples" / "make_corpus.py")
    make_corpus = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_corpus)
    sample = make_corpus.generate_documents(1000, 0)
    per_doc = sum(len(d.encode()) for d in sample) / len(sample)
    docs = make_corpus.generate_documents(round(mb * 1e6 / per_doc), 0)
    return [normalize(d, NormalizeSpec()) for d in docs]


def filter_pass(spec: FilterSpec):
    def run(docs):
        return Counter(rejection_reason(clean_lines(d, spec), spec) for d in docs)
    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mb", type=float, default=20.0)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)

    docs = documents(args.mb)
    num_bytes = sum(len(d.encode()) for d in docs)
    with tempfile.TemporaryDirectory() as tmp:
        sample, size = [], 0
        for d in docs:
            sample.append(d)
            size += len(d)
            if size > 4e6:
                break
        train_tokenizer(sample, 8192, 2, tmp)
        tokenizer, _ = load_tokenizer(tmp)

    def tokenize(docs):
        return sum(len(e.ids) for i in range(0, len(docs), BATCH)
                   for e in tokenizer.encode_batch_fast(docs[i:i + BATCH], add_special_tokens=False))

    contenders = {"no rule set": filter_pass(FilterSpec())}
    contenders |= {name: filter_pass(FilterSpec(rule_sets=[name])) for name in RULE_SETS}
    contenders["all four"] = filter_pass(FilterSpec(rule_sets=list(RULE_SETS)))
    contenders["tokenize (encode_batch_fast)"] = tokenize
    best = dict.fromkeys(contenders, float("inf"))
    results = {}
    for _ in range(args.repeat):
        for name, fn in contenders.items():
            t0 = time.perf_counter()
            results[name] = fn(docs)
            best[name] = min(best[name], time.perf_counter() - t0)

    print(f"{len(docs):,} documents, {num_bytes / 1e6:.1f} MB, best of {args.repeat}, one thread")
    tokenize_s = best["tokenize (encode_batch_fast)"]
    print(f"| measurement | seconds | docs/s | × tokenize time | dropped |")
    print(f"| --- | ---: | ---: | ---: | ---: |")
    for name, seconds in best.items():
        result = results[name]
        dropped = sum(v for k, v in result.items() if k) if isinstance(result, Counter) else ""
        print(f"| {name} | {seconds:.3f} | {len(docs) / seconds:,.0f} | {seconds / tokenize_s:.3f} | {dropped} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
