"""Near-duplicate dedup's MinHash, LSH shuffle and clusters on real storage, without Ray: planted
near-duplicates are dropped, distinct documents kept, the threshold decides, clusters keep their
first document in corpus order, and what exact dedup drops is not counted twice."""

from __future__ import annotations

import re

import numpy as np
import pytest

from jobs.dedup import document_digest, exact_drops_key, find_exact_duplicates, key_records
from jobs.near_dedup import (NEAR_DROPS_KEY, NearDedupSpec, band_records, find_candidate_pairs, minhash,
                             near_duplicate_drops, near_edges_key, node_ids, permutations)
from jobs.shuffle import read_shard_positions, write_slotted
from jobs.storage import open_storage

VOCABULARY = [f"w{i}" for i in range(5000)]


def random_document(rng: np.random.Generator, words: int = 200) -> str:
    return " ".join(rng.choice(VOCABULARY, words))


def edited(document: str, rng: np.random.Generator, num_edits: int) -> str:
    words = document.split()
    for i in rng.choice(len(words), num_edits, replace=False):
        words[i] = "edit" + str(rng.integers(10**9))
    return " ".join(words)


def jaccard(a: str, b: str, n: int = 5) -> float:
    """Of word 5-gram sets, computed independently of the code under test."""
    def grams(text):
        words = re.findall(r"\w+", text.lower())
        return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}
    x, y = grams(a), grams(b)
    return len(x & y) / len(x | y)


def run_near_dedup(tmp_path, shards: list[list[str]], spec: NearDedupSpec, parts: int = 4,
                   exact: bool = False) -> set[tuple[int, int]]:
    """The scan, reduce and components tasks, as the stage runs them; the near-duplicate drops."""
    storage = open_storage(f"file://{tmp_path}")
    perms = permutations(spec)
    band_keys, signature_keys, key_files = [], [], []
    for s, docs in enumerate(shards):
        pairs = [minhash(d, spec, perms) for d in docs]
        signatures = np.stack([p[0] for p in pairs])
        band_keys.append(f"scan/{s}.bands")
        signature_keys.append(f"scan/{s}.minhash")
        key_files.append(f"scan/{s}.keys")
        write_slotted(storage, band_keys[-1], band_records(signatures, np.array([p[1] for p in pairs]), spec))
        storage.write_bytes(signature_keys[-1], signatures.tobytes())
        write_slotted(storage, key_files[-1], key_records([document_digest(d) for d in docs]))
    exact_keys = []
    if exact:
        exact_keys = [exact_drops_key(p, 2) for p in range(2)]
        for p in range(2):
            find_exact_duplicates(storage, key_files, p, 2)
    for p in range(parts):
        find_candidate_pairs(storage, band_keys, signature_keys if spec.threshold else None, spec, p, parts)
    count = near_duplicate_drops(storage, [near_edges_key(p, parts) for p in range(parts)], exact_keys, len(shards))
    drops = {(s, int(pos)) for s in range(len(shards))
             for pos in read_shard_positions(storage, [NEAR_DROPS_KEY], s, len(shards))}
    assert count == len(drops)
    return drops


@pytest.fixture(scope="module")
def planted():
    """Three shards of distinct documents; shard 2 also holds a one-word edit of 20 documents of
    shards 0 and 1 (Jaccard about 0.95) and a heavy edit (60 of 200 words) of 20 more (about 0.2)."""
    rng = np.random.default_rng(0)
    shards = [[random_document(rng) for _ in range(100)] for _ in range(3)]
    light = [(s, int(i)) for s in (0, 1) for i in rng.choice(100, 10, replace=False)]
    heavy = [(s, int(i)) for s in (0, 1) for i in rng.choice(100, 10, replace=False) if (s, int(i)) not in light]
    for s, i in light:
        shards[2].insert(int(rng.integers(len(shards[2]) + 1)), edited(shards[s][i], rng, 1))
    for s, i in heavy:
        shards[2].append(edited(shards[s][i], rng, 60))
    return shards, light, heavy


def test_planted_near_duplicates_are_dropped_and_distinct_documents_kept(tmp_path, planted):
    shards, light, heavy = planted
    drops = run_near_dedup(tmp_path, shards, NearDedupSpec())
    assert all(s == 2 for s, _ in drops)  # the originals come first in corpus order: they are kept
    dropped_texts = {shards[s][p] for s, p in drops}
    light_copies = {d for d in shards[2] if any(jaccard(d, shards[s][i]) > 0.9 for s, i in light)}
    assert len(light_copies) == len(light) and dropped_texts == light_copies


def test_the_threshold_decides_on_the_estimated_similarity(tmp_path, planted):
    shards, light, _ = planted
    assert run_near_dedup(tmp_path / "loose", shards, NearDedupSpec(threshold=0.8)) == \
        run_near_dedup(tmp_path / "none", shards, NearDedupSpec())
    assert run_near_dedup(tmp_path / "strict", shards, NearDedupSpec(threshold=0.995)) == set()


def test_a_chain_of_near_duplicates_is_one_cluster_that_keeps_its_first(tmp_path):
    rng = np.random.default_rng(1)
    a = random_document(rng, 400)
    b = edited(a, rng, 2)
    c = edited(b, rng, 2)
    shards = [[c, random_document(rng)], [b], [a]]  # corpus order: c first
    assert run_near_dedup(tmp_path, shards, NearDedupSpec()) == {(1, 0), (2, 0)}


def test_what_exact_dedup_drops_is_not_a_near_duplicate_too(tmp_path):
    rng = np.random.default_rng(2)
    a = random_document(rng)
    shards = [[a, random_document(rng)], [a, edited(a, rng, 1)]]
    assert run_near_dedup(tmp_path / "exact", shards, NearDedupSpec(), exact=True) == {(1, 1)}
    assert run_near_dedup(tmp_path / "alone", shards, NearDedupSpec()) == {(1, 0), (1, 1)}


def test_signatures_estimate_jaccard():
    rng = np.random.default_rng(3)
    spec = NearDedupSpec(bands=32, rows=8)
    perms = permutations(spec)
    for edits in (5, 20, 60):
        a = random_document(rng, 300)
        b = edited(a, rng, edits)
        estimate = float((minhash(a, spec, perms)[0] == minhash(b, spec, perms)[0]).mean())
        assert abs(estimate - jaccard(a, b)) < 0.1, (edits, estimate, jaccard(a, b))


def test_a_document_without_shingles_is_never_a_near_duplicate():
    spec = NearDedupSpec()
    assert minhash("... !!! ...", spec, permutations(spec))[1] is False
    assert minhash("two words", spec, permutations(spec))[1] is True  # shorter than a shingle: one shingle


def test_clusters_are_connected_components_that_keep_their_first_document(tmp_path):
    storage = open_storage(f"file://{tmp_path}")
    node = lambda shard, pos: int(node_ids(np.array([shard]), np.array([pos]))[0])  # noqa: E731
    chain = [node(2, 5), node(0, 9), node(1, 0), node(0, 3), node(2, 1)]  # first in corpus order: (0, 3)
    pairs = [(chain[i], chain[i + 1]) for i in range(len(chain) - 1)]  # only neighbours are linked
    pairs += [(node(1, 7), node(1, 8)), (node(1, 8), node(1, 7))]  # a second cluster, the pair twice
    halves = [pairs[:3], pairs[3:]]  # as two hash ranges wrote them
    for p, half in enumerate(halves):
        storage.write_bytes(near_edges_key(p, 2), np.array(half, dtype="<u8").tobytes())
    assert near_duplicate_drops(storage, [near_edges_key(p, 2) for p in range(2)], [], 3) == 5
    drops = {(s, int(pos)) for s in range(3) for pos in read_shard_positions(storage, [NEAR_DROPS_KEY], s, 3)}
    assert drops == {(2, 5), (0, 9), (1, 0), (2, 1), (1, 8)}


def test_the_seed_must_not_be_negative():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="seed"):
        NearDedupSpec(seed=-1)
