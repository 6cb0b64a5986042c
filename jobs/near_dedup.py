"""Near-duplicate dedup: MinHash signatures, LSH bands shuffled by hash, clusters by connected components.

1. Scan: each surviving document's shingles (word or character n-grams of its lowercased text)
   get a MinHash signature of bands × rows values; each band hashes to one 64-bit record, slotted
   by hash (jobs/shuffle.py) like exact dedup's keys.
2. Reduce, one task per hash range: documents whose band hashes are equal in some band are
   candidate pairs (an edge from the band's first document in corpus order to each other one);
   with a `threshold`, a pair stays only if its signatures agree in at least that share of values
   (the MinHash estimate of their Jaccard similarity).
3. Components, one task: the edges' connected components; the first document of each cluster in
   corpus order is kept, every other one is dropped as `near_duplicate` unless exact dedup
   dropped it already. Its memory grows with the duplicates (near and exact: 16 bytes a pair, one
   pair per duplicate in each hash range that holds one of its bands), not with the corpus.

Two documents with Jaccard similarity s share a band with probability 1 - (1 - s^rows)^bands: for
the defaults (14 × 8, datatrove's) about 0.92 at s = 0.8 and 0.01 at s = 0.5.
"""

from __future__ import annotations

import re
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from jobs.faults import crash_point, journal_task
from jobs.fields import output
from jobs.shuffle import READ_THREADS, read_partition, read_shard_positions, write_by_shard
from jobs.storage import Storage


class NearDedupSpec(BaseModel):
    """MinHash near-duplicate removal; the defaults are datatrove's (FineWeb's) MinHash settings."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    shingle: Literal["words", "chars"] = output("words")
    """What a shingle is made of: `words` (word n-grams of the lowercased text without punctuation) or `chars`."""
    shingle_size: int = output(5, ge=1, le=64)
    """Words (or characters) per shingle."""
    bands: int = output(14, ge=1, le=64)
    """LSH bands: two documents are candidates when all rows of any one band agree."""
    rows: int = output(8, ge=1, le=64)
    """MinHash values per band; bands × rows values make a signature."""
    threshold: float | None = output(None, gt=0.0, le=1.0)
    """Keep a candidate pair only if its signatures agree in at least this share of values (an
    estimate of Jaccard similarity); null keeps every candidate pair, as datatrove does."""
    seed: int = output(1, ge=0)
    """Seed of the MinHash permutations (≥ 0)."""


BAND_RECORD = np.dtype([("hash", "<u8"), ("pos", "<u4"), ("band", "<u2")])
_SIGNATURE = np.dtype("<u4")
_PRIME = np.uint64((1 << 61) - 1)
_MASK32 = np.uint64(0xFFFFFFFF)
_WORD = re.compile(r"\w+")
_BLOCK = 4096  # shingles per step when taking minima: bounds a huge document's temporary memory
_GAP_ROWS = 64  # signature rows between two wanted ones below which one ranged read covers both


def shingle_hashes(text: str, spec: NearDedupSpec) -> np.ndarray:
    """32-bit hashes (as uint64) of the document's shingles; empty when it has none."""
    n = spec.shingle_size
    if spec.shingle == "words":
        words = _WORD.findall(text.lower())
        units = np.fromiter((zlib.crc32(w.encode()) for w in words), np.uint64, len(words))
        if 0 < len(units) < n:  # a document shorter than one shingle is one shingle
            n = len(units)
        count = len(units) - n + 1
        hashes = np.zeros(max(count, 0), np.uint64)
        for k in range(n):  # a polynomial hash of n consecutive word hashes, mod 2^32
            hashes = (hashes * np.uint64(1_000_003) + units[k:k + count]) & _MASK32
        return hashes
    flat = " ".join(text.lower().split())
    count = max(len(flat) - n + 1, 1 if flat else 0)
    return np.fromiter((zlib.crc32(flat[i:i + n].encode()) for i in range(count)), np.uint64, count)


def permutations(spec: NearDedupSpec) -> tuple[np.ndarray, np.ndarray]:
    """The (a, b) of h -> (a·h + b) mod (2^61 - 1), one pair per signature value."""
    # SeedSequence's output is fixed across NumPy versions (a Generator's streams are not): the
    # same seed must give the same signatures on every worker, in every future run.
    size = spec.bands * spec.rows
    state = np.random.SeedSequence(spec.seed).generate_state(2 * size, np.uint32).astype(np.uint64)
    return np.maximum(state[:size], np.uint64(1)), state[size:]


def signature(hashes: np.ndarray, perms: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """MinHash signature (uint32 values): per permutation, the least permuted shingle hash.
    a·h + b stays below 2^64 (all three are below 2^32), so uint64 arithmetic is exact."""
    a, b = perms
    lowest = np.full(len(a), _MASK32, np.uint64)
    for start in range(0, len(hashes), _BLOCK):
        block = hashes[start:start + _BLOCK, None]
        lowest = np.minimum(lowest, ((block * a + b) % _PRIME & _MASK32).min(axis=0))
    return lowest.astype(_SIGNATURE)


def minhash(text: str, spec: NearDedupSpec, perms: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, bool]:
    """The document's signature, and whether it has any shingle (one without never matches)."""
    hashes = shingle_hashes(text, spec)
    return signature(hashes, perms), len(hashes) > 0


def band_records(signatures: np.ndarray, has_shingles: np.ndarray, spec: NearDedupSpec) -> np.ndarray:
    """One BAND_RECORD per (document with shingles, band): the band's rows hashed to 64 bits."""
    num_docs = len(signatures)
    rows = signatures.reshape(num_docs, spec.bands, spec.rows).astype(np.uint64)
    hashes = np.broadcast_to(np.arange(1, spec.bands + 1, dtype=np.uint64), (num_docs, spec.bands)).copy()
    for r in range(spec.rows):
        hashes = _mix(hashes ^ rows[:, :, r])
    records = np.zeros((num_docs, spec.bands), BAND_RECORD)
    records["hash"] = hashes
    records["pos"] = np.arange(num_docs, dtype=np.uint32)[:, None]
    records["band"] = np.arange(spec.bands, dtype=np.uint16)[None, :]
    return records[has_shingles].reshape(-1)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: every input bit affects every output bit (uint64 arithmetic wraps)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def node_ids(shards: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """A document's id, ordered as the corpus is: shard, then position."""
    return (shards.astype(np.uint64) << np.uint64(32)) | positions.astype(np.uint64)


def near_edges_key(part: int, parts: int) -> str:
    """The object holding hash range `part` of `parts`'s candidate pairs (uint64 node id pairs)."""
    return f"dedup/near-edges-{parts:04d}-{part:04d}.bin"


NEAR_DROPS_KEY = "dedup/near-drops.bin"


def find_candidate_pairs(storage: Storage, band_keys: list[str], signature_keys: list[str] | None,
                         spec: NearDedupSpec, part: int, parts: int) -> int:
    """Reduce task `part` of `parts`: write the candidate pairs (node id pairs) of its hash range,
    verified against `threshold` when there is one; returns how many there are. A band bucket's
    pairs are its first document with each other one, and with a threshold also each member with
    the one before it (not all pairs: a bucket of exact copies can hold thousands)."""
    journal_task("near", part)
    records, shards = read_partition(storage, band_keys, BAND_RECORD, part, parts)
    order = np.lexsort((records["pos"], shards, records["hash"], records["band"]))
    band, hashes = records["band"][order], records["hash"][order]
    nodes = node_ids(shards[order], records["pos"][order])
    same = np.zeros(len(order), dtype=bool)
    same[1:] = (band[1:] == band[:-1]) & (hashes[1:] == hashes[:-1])
    first = np.maximum.accumulate(np.where(same, 0, np.arange(len(order))))  # each bucket's first member
    members = np.flatnonzero(same)
    pairs = [np.stack([nodes[first[members]], nodes[members]], axis=1)]  # a star: enough to connect a bucket
    if spec.threshold is not None:  # ...unless a pair fails the check: a chain too, so a pair
        pairs.append(np.stack([nodes[members - 1], nodes[members]], axis=1))  # of later members meets
    edges = np.unique(np.concatenate(pairs), axis=0)
    if spec.threshold is not None and len(edges):
        edges = edges[_agreement(storage, signature_keys, edges, spec) >= spec.threshold]
    crash_point("near", part)
    storage.write_bytes(near_edges_key(part, parts), edges.astype("<u8").tobytes())
    return len(edges)


def _agreement(storage: Storage, signature_keys: list[str], edges: np.ndarray, spec: NearDedupSpec) -> np.ndarray:
    """The share of equal signature values of each edge's two documents."""
    nodes = np.unique(edges)
    width = spec.bands * spec.rows
    signatures = np.zeros((len(nodes), width), _SIGNATURE)
    shard_of = (nodes >> np.uint64(32)).astype(np.int64)

    def read(shard: int) -> None:
        where = np.flatnonzero(shard_of == shard)
        positions = (nodes[where] & _MASK32).astype(np.int64)
        breaks = np.flatnonzero(np.diff(positions) > _GAP_ROWS) + 1  # one ranged read per run of close rows
        for run in np.split(np.arange(len(positions)), breaks):
            lo, hi = positions[run[0]], positions[run[-1]] + 1
            rows = np.frombuffer(storage.read_range(signature_keys[shard], lo * width * 4, hi * width * 4),
                                 _SIGNATURE).reshape(-1, width)
            signatures[where[run]] = rows[positions[run] - lo]

    with ThreadPoolExecutor(READ_THREADS) as pool:
        list(pool.map(read, np.unique(shard_of).tolist()))
    index = np.searchsorted(nodes, edges)
    return (signatures[index[:, 0]] == signatures[index[:, 1]]).mean(axis=1)


def near_duplicate_drops(storage: Storage, edge_keys: list[str], exact_drop_keys: list[str], num_shards: int) -> int:
    """The components task: drop every document of a cluster but its first (in corpus order),
    except those exact dedup drops already; returns how many it drops."""
    journal_task("clusters", 0)
    # A pair is written once for each band it shares (in other hash ranges): unique per file keeps
    # the peak near one copy of each pair.
    edges = np.unique(np.concatenate([np.unique(np.frombuffer(storage.read_bytes(k), "<u8").reshape(-1, 2), axis=0)
                                      for k in edge_keys]), axis=0)
    nodes, index = np.unique(edges, return_inverse=True)
    u, v = index.reshape(-1, 2).T
    labels = np.arange(len(nodes))
    while True:  # min-label propagation with pointer jumping: each node ends at its component's least node
        lowest = np.minimum(labels[u], labels[v])
        updated = labels.copy()
        np.minimum.at(updated, u, lowest)
        np.minimum.at(updated, v, lowest)
        updated = updated[updated]
        if np.array_equal(updated, labels):
            break
        labels = updated
    dropped = nodes[labels != np.arange(len(nodes))]
    shards, positions = (dropped >> np.uint64(32)).astype(np.uint32), (dropped & _MASK32).astype(np.uint32)
    if exact_drop_keys:
        already = np.zeros(len(dropped), dtype=bool)
        for shard in np.unique(shards).tolist():
            where = np.flatnonzero(shards == shard)
            already[where] = np.isin(positions[where],
                                     read_shard_positions(storage, exact_drop_keys, shard, num_shards))
        shards, positions = shards[~already], positions[~already]
    crash_point("clusters", 0)
    write_by_shard(storage, NEAR_DROPS_KEY, shards, positions, num_shards)
    return len(positions)
