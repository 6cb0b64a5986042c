"""A hash-partitioned shuffle through storage, the way dedup scales out.

Map side: each shard task writes ONE object of fixed-size records (numpy structured arrays whose
first field, `hash`, is a uniform 64-bit hash), grouped by the hash's top SLOT_BITS bits, behind
a header of NUM_SLOTS + 1 record offsets. Because records are grouped by a fixed, fine slot
partition, the reduce side can pick any power-of-two number of partitions after the map side
has run (from the counts it reported), and partition p of P is one contiguous byte range of each
map object: two ranged reads per (map object, partition), whatever P is.

Reduce side: each partition's decisions (which records to drop) go back to the shards the same
way, one object per partition listing each shard's positions behind a header of per-shard
offsets, so a shard's encode task reads only its own slice of each partition.

Every object is written whole with one atomic `write_bytes`, and is a pure function of its
inputs: a retried task rewrites the same bytes under the same name.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from jobs.storage import Storage

SLOT_BITS = 12
NUM_SLOTS = 1 << SLOT_BITS
_OFFSET = np.dtype("<u8")
_POSITION = np.dtype("<u4")
_HEADER_BYTES = (NUM_SLOTS + 1) * _OFFSET.itemsize
READ_THREADS = 8  # ranged reads in flight per reduce or encode task (S3 latency, not bandwidth, bounds them)


def num_partitions(num_records: int, records_per_partition: int) -> int:
    """The fewest power-of-two partitions holding at most `records_per_partition` records each on
    average (the hash spreads records evenly), up to NUM_SLOTS: past NUM_SLOTS × records_per_partition
    records (16 billion at dedup_keys_per_task's default) each partition holds more."""
    wanted = max(1, -(-num_records // max(records_per_partition, 1)))
    return min(NUM_SLOTS, 1 << (wanted - 1).bit_length())


def write_slotted(out: Storage, key: str, records: np.ndarray) -> None:
    """Write `records` (a structured array with a uint64 `hash` field) grouped by slot; the
    order within a slot is kept (stable sort), so it stays the shard's document order."""
    records = records[np.argsort(records["hash"] >> np.uint64(64 - SLOT_BITS), kind="stable")]
    slots = (records["hash"] >> np.uint64(64 - SLOT_BITS)).astype(np.int64)
    offsets = np.searchsorted(slots, np.arange(NUM_SLOTS + 1), side="left").astype(_OFFSET)
    out.write_bytes(key, offsets.tobytes() + records.tobytes())


def read_partition(storage: Storage, keys: list[str], dtype: np.dtype, part: int,
                   parts: int) -> tuple[np.ndarray, np.ndarray]:
    """Partition `part` of `parts` (a power of two) of the slotted objects `keys`, one per shard:
    (the records, concatenated in shard order; each record's shard index)."""
    per_part = NUM_SLOTS // parts

    def read(key: str) -> np.ndarray:
        first_slot = part * per_part
        bounds = np.frombuffer(storage.read_range(key, first_slot * _OFFSET.itemsize,
                                                  (first_slot + per_part + 1) * _OFFSET.itemsize), _OFFSET)
        start, end = (_HEADER_BYTES + int(b) * dtype.itemsize for b in (bounds[0], bounds[-1]))
        return np.frombuffer(storage.read_range(key, start, end), dtype) if end > start else np.zeros(0, dtype)

    with ThreadPoolExecutor(READ_THREADS) as pool:
        ranges = list(pool.map(read, keys))
    records = np.concatenate(ranges) if ranges else np.zeros(0, dtype)
    return records, np.repeat(np.arange(len(ranges), dtype=np.uint32), [len(r) for r in ranges])


def write_by_shard(out: Storage, key: str, shards: np.ndarray, positions: np.ndarray, num_shards: int) -> None:
    """Write positions grouped by shard (each shard's in increasing order) behind per-shard offsets."""
    order = np.lexsort((positions, shards))
    offsets = np.searchsorted(shards[order], np.arange(num_shards + 1), side="left").astype(_OFFSET)
    out.write_bytes(key, offsets.tobytes() + positions[order].astype(_POSITION).tobytes())


def read_shard_positions(storage: Storage, keys: list[str], shard: int, num_shards: int) -> np.ndarray:
    """The positions listed for `shard` across the objects `keys` (written by write_by_shard), sorted."""
    header_bytes = (num_shards + 1) * _OFFSET.itemsize

    def read(key: str) -> np.ndarray:
        start, end = np.frombuffer(storage.read_range(key, shard * _OFFSET.itemsize, (shard + 2) * _OFFSET.itemsize),
                                   _OFFSET)
        if end == start:
            return np.zeros(0, _POSITION)
        data = storage.read_range(key, header_bytes + int(start) * _POSITION.itemsize,
                                  header_bytes + int(end) * _POSITION.itemsize)
        return np.frombuffer(data, _POSITION)

    with ThreadPoolExecutor(READ_THREADS) as pool:
        parts = list(pool.map(read, keys))
    return np.sort(np.concatenate(parts)) if parts else np.zeros(0, _POSITION)


def num_listed(storage: Storage, key: str, num_shards: int) -> int:
    """How many positions an object written by write_by_shard lists (its header's last offset)."""
    end = (num_shards + 1) * _OFFSET.itemsize
    return int(np.frombuffer(storage.read_range(key, end - _OFFSET.itemsize, end), _OFFSET)[0])
