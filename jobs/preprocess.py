"""Preprocessing job core: two passes over each shard, each a plain function of (shard, spec).

1. `scan_shard` reads, normalizes and filters the shard and saves the 64-bit dedup key of every
   surviving document, with drop counts and bad records (one atomic object per shard).
2. The driver turns all keys into one global keep-mask (first occurrence in corpus order wins),
   which is how exact dedup spans the whole corpus and not just a shard.
3. `encode_shard` reads the shard again, tokenizes the kept documents, appends end-of-text, packs
   train and validation streams into fixed-length sequences, and commits its token files.

Re-reading beats carrying text between the passes: reading and cleaning cost a fraction of
tokenizing, and nothing large crosses the object store. Every output name is derived from the
shard index and every step is deterministic, so a retried or re-run shard rewrites the same bytes
under the same names, and a committed shard is never redone.

Token files are raw little-endian uint16 (uint32 for vocabularies over 65,536): num_sequences ×
seq_len tokens, which training memory-maps with `numpy.memmap`.
"""

from __future__ import annotations

import functools
import hashlib
import io
import itertools
import json
import os
import tempfile
from collections import Counter

import numpy as np
from pydantic import BaseModel, ConfigDict

from jobs.commit import read_commit, upload_and_commit, verify_commit
from jobs.faults import crash_point, journal_task
from jobs.fields import output
from jobs.sources import BadRecord, Shard, ShardReader
from jobs.storage import Storage, open_storage
from jobs.text import FilterSpec, NormalizeSpec, dedup_key, is_validation, normalize, rejection_reason
from jobs.tokenizer import load_tokenizer

MAX_BAD_RECORDS_KEPT = 1000  # per shard; all are counted, the first ones are quarantined verbatim
_ENCODE_BATCH = 512


class PreprocessSpec(BaseModel):
    """How a corpus becomes packed token sequences."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    seq_len: int = output(1024, ge=8, le=1 << 20)
    """Tokens per packed training sequence."""
    normalize: NormalizeSpec = output(NormalizeSpec())
    """Text normalization applied before filtering, dedup and tokenization."""
    filters: FilterSpec = output(FilterSpec())
    """Quality filters; drops are counted per rule in the manifest."""
    dedup: bool = output(True)
    """Drop exact duplicates (after normalization) across the whole corpus, keeping the first."""
    validation_fraction: float = output(0.01, ge=0.0, lt=1.0)
    """Share of documents (chosen by content hash, so stable) held out for validation."""
    shard_mb: float = output(64.0, gt=0.0)
    """Target shard size in MB of source data; one Ray task per shard and pass."""


def scan_key(index: int) -> str:
    return f"scan/shard-{index:05d}.npz"


def shard_commit_key(index: int) -> str:
    return f"data/shard-{index:05d}.commit.json"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def _clean_documents(reader: ShardReader, spec: PreprocessSpec, drops: Counter, bad: list):
    """Yields the normalized text of each document that passes the filters, in shard order."""
    for item in reader:
        if isinstance(item, BadRecord):
            drops[item.reason] += 1
            if len(bad) < MAX_BAD_RECORDS_KEPT:
                bad.append(item)
            continue
        text = normalize(item[1], spec.normalize)
        reason = rejection_reason(text, spec.filters)
        if reason:
            drops[reason] += 1
        else:
            yield text


def scan_shard(shard: Shard, spec: PreprocessSpec, text_field: str, out: Storage) -> None:
    journal_task("scan", shard.index)
    reader = ShardReader(shard, text_field)
    drops: Counter = Counter()
    bad: list[BadRecord] = []
    keys = np.fromiter((dedup_key(t) for t in _clean_documents(reader, spec, drops, bad)), dtype=np.uint64)
    meta = {
        "num_lines": reader.num_lines,
        "drops": dict(drops),
        "bad": [vars(b) for b in bad],
    }
    buffer = io.BytesIO()
    np.savez(buffer, keys=keys, meta=np.array(json.dumps(meta)))
    out.write_bytes(scan_key(shard.index), buffer.getvalue())  # one atomic object: its own commit


def load_scan(out: Storage, index: int) -> tuple[np.ndarray, dict] | None:
    try:
        data = out.read_bytes(scan_key(index))
    except FileNotFoundError:
        return None
    with np.load(io.BytesIO(data)) as npz:
        return npz["keys"], json.loads(str(npz["meta"]))


def encode_shard(shard: Shard, spec: PreprocessSpec, text_field: str, keys: np.ndarray, keep: np.ndarray,
                 tokenizer_uri: str, out: Storage) -> dict:
    """Tokenize and pack the shard's kept documents; returns the shard commit's counts.

    `keys` are the scan's dedup keys of the shard's documents, `keep` the global dedup decision.
    """
    commit_key = shard_commit_key(shard.index)
    already_committed = not verify_commit(out, commit_key)
    if already_committed:  # a retry of a shard whose first attempt committed before it died
        return read_commit(out, commit_key)["counts"]
    journal_task("encode", shard.index)
    tokenizer, info = _tokenizer(tokenizer_uri)
    eos_id, dtype = info["eos_id"], token_dtype(info["vocab_size"])
    documents = _clean_documents(ShardReader(shard, text_field), spec, Counter(), [])
    kept = ((text, int(key)) for text, key, keep_it in zip(documents, keys, keep) if keep_it)
    streams: dict[str, list[int]] = {"train": [], "val": []}
    num_documents = 0
    for batch in iter(lambda: list(itertools.islice(kept, _ENCODE_BATCH)), []):
        num_documents += len(batch)
        encodings = tokenizer.encode_batch_fast([text for text, _ in batch], add_special_tokens=False)
        for (_, key), encoding in zip(batch, encodings):
            stream = streams["val" if is_validation(key, spec.validation_fraction) else "train"]
            stream.extend(encoding.ids)
            stream.append(eos_id)
    counts: dict = {"num_documents": num_documents, "num_tokens": 0}
    with tempfile.TemporaryDirectory(prefix="orchestrator-encode-") as tmp:
        files = {}
        for split, stream in streams.items():
            tokens = np.array(stream, dtype=dtype)
            num_sequences = len(tokens) // spec.seq_len
            key = f"data/{split}-{shard.index:05d}.bin"
            files[key] = os.path.join(tmp, os.path.basename(key))
            tokens[: num_sequences * spec.seq_len].tofile(files[key])
            counts["num_tokens"] += len(tokens)
            counts[split] = {"key": key, "num_sequences": num_sequences, "num_tokens_dropped": len(tokens) % spec.seq_len}
            crash_point("encode", shard.index)  # a kill here leaves a written, uncommitted shard
        upload_and_commit(out, files, commit_key, {"shard": shard.index, "counts": counts})
    return counts


@functools.lru_cache(maxsize=4)
def _tokenizer(tokenizer_uri: str):
    """Fetched once per worker process; a worker encodes many shards with the same tokenizer."""
    digest = hashlib.sha256(tokenizer_uri.encode()).hexdigest()[:16]
    local_dir = os.path.join(tempfile.gettempdir(), "orchestrator-cache", "tokenizers", digest)
    storage = open_storage(tokenizer_uri)
    for name in ("tokenizer.json", "info.json"):
        storage.download_file(name, os.path.join(local_dir, name))
    return load_tokenizer(local_dir)
