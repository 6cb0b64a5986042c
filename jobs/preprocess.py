"""Preprocessing job core: each pass a plain function of (shard or partition, spec).

1. `scan_shard` reads, normalizes and filters the shard and writes the 128-bit dedup key of every
   surviving document (slotted by key range, jobs/shuffle.py), then its counts and bad records.
2. Exact dedup's reduce tasks (jobs/dedup.py) each decide the first occurrences in one key range
   of the whole corpus, which is how dedup spans the corpus and not just a shard.
3. `encode_shard` reads the shard again, skips the records the scan's filters rejected (one bit
   each: nothing is judged twice) and the positions the reduce tasks dropped, tokenizes the rest,
   appends end-of-text, packs train and validation streams into fixed-length sequences, and
   commits its token files.

Re-reading beats carrying text between the passes: reading and cleaning cost a fraction of
tokenizing, and nothing large crosses the object store. Every output name is derived from the
shard or partition index and every step is deterministic, so a retried or re-run task rewrites
the same bytes under the same names, and a committed shard is never redone.

Token files are raw little-endian uint16 (uint32 for vocabularies over 65,536): num_sequences ×
seq_len tokens, which training memory-maps with `numpy.memmap`.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
import tempfile
from collections import Counter

import numpy as np
from pydantic import BaseModel, ConfigDict

from jobs.commit import read_commit, upload_and_commit, verify_commit
from jobs.dedup import document_digest, is_validation, key_records
from jobs.faults import crash_point, journal_task
from jobs.fields import operational, output
from jobs.near_dedup import NearDedupSpec, band_records, minhash, permutations
from jobs.shuffle import read_shard_positions, write_slotted
from jobs.sources import BadRecord, Shard, ShardReader
from jobs.storage import Storage, open_storage
from jobs.text import FilterSpec, NormalizeSpec, clean_lines, normalize, rejection_reason
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
    near_dedup: NearDedupSpec | None = output(None)
    """Drop near-duplicates too (MinHash LSH over the whole corpus), keeping the first of each
    cluster; null (the default) for off, {} for datatrove's settings."""
    validation_fraction: float = output(0.01, ge=0.0, lt=1.0)
    """Share of documents (chosen by content hash, so stable) held out for validation."""
    shard_mb: float = output(64.0, gt=0.0)
    """Target shard size in MB of source data; one Ray task per shard and pass."""
    dedup_keys_per_task: int = operational(4_000_000, ge=1)
    """Dedup's reduce tasks hold about this many keys each (exact dedup: one per document, 20
    bytes; near_dedup: one per document and band, 14 bytes): the corpus decides how many tasks
    there are (a power of two), not one machine's memory."""


def scan_keys_key(index: int) -> str:
    return f"scan/shard-{index:05d}.keys"


def scan_bands_key(index: int) -> str:
    return f"scan/shard-{index:05d}.bands"


def scan_signatures_key(index: int) -> str:
    return f"scan/shard-{index:05d}.minhash"


def scan_kept_key(index: int) -> str:
    """One bit per record of the shard: whether it passed the filters."""
    return f"scan/shard-{index:05d}.kept"


def scan_validation_key(index: int) -> str:
    """One bit per surviving document of the shard: whether it is held out for validation."""
    return f"scan/shard-{index:05d}.val"


def scan_meta_key(index: int) -> str:
    """Written after the shard's other scan files: its presence means the scan is done. (Named
    `.meta.json` since the scan writes `.val` too: an older scan's `.json` is not taken as done.)"""
    return f"scan/shard-{index:05d}.meta.json"


def shard_commit_key(index: int) -> str:
    return f"data/shard-{index:05d}.commit.json"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def _judged_documents(reader: ShardReader, spec: PreprocessSpec, drops: Counter, bad: list, kept: list[bool]):
    """Yields the cleaned text (normalized, without the lines that line-level rules such as C4's
    remove) of each document that passes the filters, in shard order; `kept` gets one verdict per
    record (bad records included), which the encode pass replays instead of judging again."""
    for item in reader:
        if isinstance(item, BadRecord):
            drops[item.reason] += 1
            if len(bad) < MAX_BAD_RECORDS_KEPT:
                bad.append(item)
            kept.append(False)
            continue
        text = normalize(item[1], spec.normalize)
        reason = rejection_reason(text, spec.filters)  # the rules judge the whole document
        kept.append(reason is None)
        if reason:
            drops[reason] += 1
        else:
            yield clean_lines(text, spec.filters)  # what is deduplicated and tokenized


def _kept_documents(reader: ShardReader, spec: PreprocessSpec, kept: np.ndarray):
    """The cleaned text of the documents the scan kept, in shard order."""
    for item in itertools.compress(reader, kept):
        yield clean_lines(normalize(item[1], spec.normalize), spec.filters)


def scan_shard(shard: Shard, spec: PreprocessSpec, text_field: str, out: Storage) -> dict:
    """The scan pass; returns the shard's counts: `num_lines`, `num_kept` and `drops` by reason."""
    journal_task("scan", shard.index)
    reader = ShardReader(shard, text_field)
    drops: Counter = Counter()
    bad: list[BadRecord] = []
    near = spec.near_dedup
    perms = permutations(near) if near else None
    digests, signatures, has_shingles, kept = [], [], [], []
    for text in _judged_documents(reader, spec, drops, bad, kept):
        digests.append(document_digest(text))
        if near:
            signature, has = minhash(text, near, perms)
            signatures.append(signature)
            has_shingles.append(has)
    out.write_bytes(scan_kept_key(shard.index), np.packbits(np.array(kept, dtype=bool)).tobytes())
    keys = key_records(digests)
    # The split is decided here, where the keys are, so that the encode pass hashes nothing.
    out.write_bytes(scan_validation_key(shard.index), np.packbits(is_validation(keys["hash"], spec.validation_fraction)).tobytes())
    write_slotted(out, scan_keys_key(shard.index), keys)
    if near:
        signatures = np.stack(signatures) if signatures else np.zeros((0, near.bands * near.rows), np.uint32)
        write_slotted(out, scan_bands_key(shard.index), band_records(signatures, np.array(has_shingles, bool), near))
        if near.threshold is not None:
            out.write_bytes(scan_signatures_key(shard.index), signatures.tobytes())
    meta = {"num_lines": reader.num_lines, "num_kept": len(digests), "drops": dict(drops), "bad": [vars(b) for b in bad]}
    out.write_bytes(scan_meta_key(shard.index), json.dumps(meta).encode())
    return meta


def load_scan_meta(out: Storage, index: int) -> dict:
    return json.loads(out.read_bytes(scan_meta_key(index)))


def encode_shard(shard: Shard, spec: PreprocessSpec, text_field: str, num_shards: int, drop_keys: list[str],
                 tokenizer_uri: str, out: Storage) -> dict:
    """Tokenize and pack the shard's kept documents; returns the shard commit's counts.

    `drop_keys` are the dedup reduce outputs that list the positions (among the shard's surviving
    documents, as the scan numbered them) to drop.
    """
    commit_key = shard_commit_key(shard.index)
    already_committed = not verify_commit(out, commit_key)
    if already_committed:  # a retry of a shard whose first attempt committed before it died
        return read_commit(out, commit_key)["counts"]
    journal_task("encode", shard.index)
    tokenizer, info = _tokenizer(tokenizer_uri)
    eos_id, dtype = info["eos_id"], token_dtype(info["vocab_size"])
    # Each document the scan kept goes to a stream: 0 none (a duplicate), 1 train, 2 validation.
    streams = np.where(_bits(out.read_bytes(scan_validation_key(shard.index))), 2, 1).astype(np.int8)
    streams[read_shard_positions(out, drop_keys, shard.index, num_shards)] = 0
    kept_records = _bits(out.read_bytes(scan_kept_key(shard.index)))
    documents = _kept_documents(ShardReader(shard, text_field), spec, kept_records)
    # Each stream is tokenized in batches of its own documents, in shard order, so a batch's ids
    # become one array in one go. Arrays, not one list per shard: a shard's ids as a Python list
    # would take ~36 bytes a token (a 64 MB shard: ~600 MB), as arrays 2 or 4.
    batches: tuple[list[str], ...] = ([], [], [])
    parts: tuple[list[np.ndarray], ...] = ([], [], [])
    num_documents = 0

    def encode_batch(stream: int) -> None:
        nonlocal num_documents
        parts[stream].append(_token_array(tokenizer, batches[stream], eos_id, dtype))
        num_documents += len(batches[stream])
        batches[stream].clear()

    for text, stream in zip(documents, streams.tolist()):
        if stream:
            batches[stream].append(text)
            if len(batches[stream]) == _ENCODE_BATCH:
                encode_batch(stream)
    for stream in (1, 2):
        if batches[stream]:
            encode_batch(stream)
    counts: dict = {"num_documents": num_documents, "num_tokens": 0}
    with tempfile.TemporaryDirectory(prefix="orchestrator-encode-") as tmp:
        files = {}
        for split, arrays in (("train", parts[1]), ("val", parts[2])):
            tokens = np.concatenate(arrays) if arrays else np.zeros(0, dtype)
            num_sequences = len(tokens) // spec.seq_len
            key = f"data/{split}-{shard.index:05d}.bin"
            files[key] = os.path.join(tmp, os.path.basename(key))
            tokens[: num_sequences * spec.seq_len].tofile(files[key])
            counts["num_tokens"] += len(tokens)
            counts[split] = {"key": key, "num_sequences": num_sequences, "num_tokens_dropped": len(tokens) % spec.seq_len}
            crash_point("encode", shard.index)  # a kill here leaves a written, uncommitted shard
        upload_and_commit(out, files, commit_key, {"shard": shard.index, "counts": counts})
    return counts


def _token_array(tokenizer, texts: list[str], eos_id: int, dtype: np.dtype) -> np.ndarray:
    """The documents' ids, each followed by end-of-text. One np.fromiter over the chained ids lists
    costs 1.5% of the tokenizing; extending a list per batch and converting it, 5%."""
    encodings = tokenizer.encode_batch_fast(texts, add_special_tokens=False)
    eos = (eos_id,)
    ids = itertools.chain.from_iterable(itertools.chain.from_iterable((e.ids, eos) for e in encodings))
    return np.fromiter(ids, dtype, sum(map(len, encodings)) + len(encodings))


def _bits(data: bytes) -> np.ndarray:
    return np.unpackbits(np.frombuffer(data, np.uint8)).astype(bool)


@functools.lru_cache(maxsize=4)
def _tokenizer(tokenizer_uri: str):
    """Fetched once per worker process; a worker encodes many shards with the same tokenizer."""
    digest = hashlib.sha256(tokenizer_uri.encode()).hexdigest()[:16]
    local_dir = os.path.join(tempfile.gettempdir(), "orchestrator-cache", "tokenizers", digest)
    storage = open_storage(tokenizer_uri)
    for name in ("tokenizer.json", "info.json"):
        storage.download_file(name, os.path.join(local_dir, name))
    return load_tokenizer(local_dir)
