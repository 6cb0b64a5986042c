"""Exact dedup's shuffle on real storage, without Ray: whatever the number of key ranges, the
documents dropped are exactly those a one-machine pass over the whole corpus in order drops."""

from __future__ import annotations

import numpy as np
import pytest

from jobs.dedup import document_digest, exact_drops_key, find_exact_duplicates, is_validation, key_records
from jobs.shuffle import NUM_SLOTS, num_listed, num_partitions, read_shard_positions, write_slotted
from jobs.storage import open_storage


def corpus(num_shards: int = 7, docs_per_shard: int = 300, seed: int = 0) -> list[list[str]]:
    """Shards of documents where about a fifth repeat an earlier or later one, within a shard or across."""
    rng = np.random.default_rng(seed)
    pool = [f"document {i}" for i in range(num_shards * docs_per_shard)]
    return [[pool[rng.integers(len(pool))] if rng.random() < 0.2 else pool[s * docs_per_shard + d]
             for d in range(docs_per_shard)] for s in range(num_shards)]


def reference_drops(shards: list[list[str]]) -> set[tuple[int, int]]:
    seen, drops = set(), set()
    for s, docs in enumerate(shards):
        for pos, doc in enumerate(docs):
            if doc in seen:
                drops.add((s, pos))
            seen.add(doc)
    return drops


@pytest.mark.parametrize("parts", [1, 4, 64])
def test_the_drops_are_the_one_machine_drops_whatever_the_number_of_key_ranges(tmp_path, parts):
    shards = corpus()
    storage = open_storage(f"file://{tmp_path}")
    scan_keys = [f"scan/{s}.keys" for s in range(len(shards))]
    for key, docs in zip(scan_keys, shards):
        write_slotted(storage, key, key_records([document_digest(d) for d in docs]))
    counts = [find_exact_duplicates(storage, scan_keys, p, parts) for p in range(parts)]
    drop_keys = [exact_drops_key(p, parts) for p in range(parts)]
    found = {(s, int(pos)) for s in range(len(shards))
             for pos in read_shard_positions(storage, drop_keys, s, len(shards))}
    expected = reference_drops(shards)
    assert found == expected and len(expected) > 100
    assert sum(counts) == sum(num_listed(storage, k, len(shards)) for k in drop_keys) == len(expected)
    if parts > 1:  # duplicates were decided in several ranges, each by its own task
        assert sum(1 for c in counts if c) > 1


def test_a_recomputed_key_range_is_byte_identical(tmp_path):
    shards = corpus(num_shards=3)
    storage = open_storage(f"file://{tmp_path}")
    scan_keys = [f"scan/{s}.keys" for s in range(3)]
    for key, docs in zip(scan_keys, shards):
        write_slotted(storage, key, key_records([document_digest(d) for d in docs]))
    find_exact_duplicates(storage, scan_keys, 1, 4)
    first = storage.read_bytes(exact_drops_key(1, 4))
    find_exact_duplicates(storage, scan_keys, 1, 4)
    assert storage.read_bytes(exact_drops_key(1, 4)) == first


def test_the_number_of_key_ranges_is_a_power_of_two_bounded_by_the_slots():
    assert num_partitions(0, 100) == 1
    assert num_partitions(100, 100) == 1
    assert num_partitions(101, 100) == 2
    assert num_partitions(1000, 100) == 16
    assert num_partitions(10**12, 1) == NUM_SLOTS


def test_keys_are_128_bit_and_stable():
    # Hard-coded: a change of hash function would silently change dedup and the validation split.
    assert len(document_digest("x")) == 16
    assert document_digest("hello world") != document_digest("hello world ")
    assert document_digest("hello world").hex() == HELLO_WORLD


HELLO_WORLD = "e9a804b2e527fd3601d2ffc0bb023cd6"  # b2sum -l 128 of the same bytes


def test_the_validation_split_is_deterministic_monotone_and_close_to_the_fraction():
    keys = key_records([document_digest(f"document {i}") for i in range(20_000)])["hash"]
    for fraction in (0.01, 0.1, 0.5):
        share = is_validation(keys, fraction).mean()
        assert abs(share - fraction) < max(0.15 * fraction, 0.004), (fraction, share)
        one_by_one = [is_validation(int.from_bytes(document_digest(f"document {i}")[:8], "little"), fraction)
                      for i in range(0, 20_000, 97)]
        assert one_by_one == is_validation(keys, fraction)[::97].tolist()  # a key's first 64 bits, little-endian
    assert not is_validation(keys, 0.0).any()
    assert is_validation(keys, 0.2)[is_validation(keys, 0.1)].all()
