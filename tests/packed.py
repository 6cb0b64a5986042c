"""A preprocess stage's output written straight from texts, without Ray or the pipeline.

For the checks that run where Ray is not installed (the GPU machine): the same layout the
preprocess stage commits (manifest.json, tokenizer/, data/train-*.bin), so `jobs.train` reads it
unchanged. Not a substitute for the preprocess stage: no cleaning, dedup or validation split.
"""

from __future__ import annotations

import json
import os

import numpy as np

from jobs.tokenizer import load_tokenizer, train_tokenizer


def write_packed_stage(out_dir: str, texts: list[str], *, vocab_size: int, seq_len: int,
                       random_tokens: int = 0, seed: int = 0) -> dict:
    """Train a tokenizer on `texts` and pack them into `out_dir`; returns the manifest.

    With `random_tokens`, the sequences are that many uniform random ids over `vocab_size`
    instead (for throughput, where the model's vocabulary size matters and the text does not).
    """
    tokenizer_dir = os.path.join(out_dir, "tokenizer")
    train_tokenizer(iter(texts), min(vocab_size, 8192), 2, tokenizer_dir)
    tokenizer, info = load_tokenizer(tokenizer_dir)
    if random_tokens:
        ids = np.random.default_rng(seed).integers(0, vocab_size, random_tokens)
    else:
        vocab_size = info["vocab_size"]
        ids = np.concatenate([np.array(e.ids + [info["eos_id"]]) for e in tokenizer.encode_batch(texts)])
    dtype = np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)
    sequences = ids[: len(ids) // seq_len * seq_len].astype(dtype).reshape(-1, seq_len)
    os.makedirs(os.path.join(out_dir, "data"), exist_ok=True)
    sequences.tofile(os.path.join(out_dir, "data", "train-00000.bin"))
    files = [{"key": "data/train-00000.bin", "num_sequences": len(sequences)}]
    manifest = {"format": "packed-tokens", "dtype": dtype.name, "seq_len": seq_len, "vocab_size": vocab_size,
                "eos_id": info["eos_id"], "tokenizer": "tokenizer/", "num_tokens": int(sequences.size),
                "splits": {"train": {"files": files, "num_sequences": len(sequences)},
                           "val": {"files": [], "num_sequences": 0}}}
    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    return manifest


def read_texts(paths: list[str], field: str = "text") -> list[str]:
    texts = []
    for path in paths:
        with open(path, "rb") as f:
            for line in f:
                try:
                    text = json.loads(line)[field]
                except (ValueError, KeyError, TypeError):  # UnicodeDecodeError is a ValueError
                    continue  # the demo corpus carries a few bad lines on purpose
                if isinstance(text, str) and text.strip():
                    texts.append(text)
    return texts
