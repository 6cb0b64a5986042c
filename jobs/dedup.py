"""Exact dedup across the whole corpus, scaled out as a hash-partitioned shuffle (jobs/shuffle.py).

1. The scan task of each shard writes one 128-bit key per surviving document (with the document's
   position among the shard's surviving documents), slotted by the key's top bits.
2. One reduce task per key range reads that range from every shard, sorts it by (key, shard,
   position) and drops every document but the first in corpus order: the same documents a
   one-machine `np.unique` over the whole corpus keeps. A duplicate and its original always share
   a key, so they always meet in the same task.
3. The encode task of each shard reads its own dropped positions from every reduce output.

The driver only chooses the number of reduce tasks from the scans' counts and adds up the
reduce tasks' drop counts: its memory does not grow with the corpus. 128-bit keys: among 10^12
distinct documents a false collision has a probability of about 10^-15 (64-bit keys start
colliding at a few billion documents).
"""

from __future__ import annotations

import hashlib

import numpy as np

from jobs.faults import crash_point, journal_task
from jobs.shuffle import read_partition, write_by_shard
from jobs.storage import Storage

KEY_RECORD = np.dtype([("hash", "<u8"), ("low", "<u8"), ("pos", "<u4")])
_DIGEST = np.dtype([("hash", "<u8"), ("low", "<u8")])


def document_digest(text: str) -> bytes:
    """The 128-bit key of a normalized document: exact dedup compares these, never the texts."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def is_validation(key_hash, validation_fraction: float):
    """Deterministic train/validation split by document content (its key's first 64 bits, KEY_RECORD's
    `hash`; an int, or an array of them for a bool array), independent of sharding; monotone: a
    document held out at a fraction stays held out at a larger one."""
    return (key_hash >> 40) / float(1 << 24) < validation_fraction


def key_records(digests: list[bytes]) -> np.ndarray:
    """KEY_RECORDs of a shard's surviving documents, in document order (`pos` = index)."""
    parts = np.frombuffer(b"".join(digests), _DIGEST)
    records = np.zeros(len(parts), KEY_RECORD)
    records["hash"], records["low"] = parts["hash"], parts["low"]
    records["pos"] = np.arange(len(parts), dtype=np.uint32)
    return records


def exact_drops_key(part: int, parts: int) -> str:
    """The object listing, by shard, the positions of the duplicates in key range `part` of `parts`."""
    return f"dedup/exact-{parts:04d}-{part:04d}.bin"


def find_exact_duplicates(storage: Storage, scan_keys: list[str], part: int, parts: int) -> int:
    """Reduce task `part` of `parts`: write the positions of every duplicate in its key range,
    by shard; returns how many there are. `scan_keys[s]` is shard s's key file."""
    journal_task("dedup", part)
    records, shards = read_partition(storage, scan_keys, KEY_RECORD, part, parts)
    # Equal keys sort together, first in corpus (shard, position) order: every later one is a duplicate.
    order = np.lexsort((records["pos"], shards, records["low"], records["hash"]))
    hashes, lows = records["hash"][order], records["low"][order]
    repeat = np.zeros(len(order), dtype=bool)
    repeat[1:] = (hashes[1:] == hashes[:-1]) & (lows[1:] == lows[:-1])
    dropped = order[repeat]
    crash_point("dedup", part)  # a kill here: the retry computes and writes the same bytes
    write_by_shard(storage, exact_drops_key(part, parts), shards[dropped], records["pos"][dropped], len(scan_keys))
    return int(repeat.sum())
