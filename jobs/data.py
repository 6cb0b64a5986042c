"""Training data: a preprocess stage's packed token files, memory-mapped, in a resumable order.

The order is a function of (seed, epoch) only: a seeded permutation of every sequence of the
split, one per epoch. A global step consumes the next `global_batch` positions of that order,
and rank r's micro batch m of that step takes a fixed, disjoint slice of them. So the data a
rank sees depends only on (step, rank, world size, batch shape): a run resumed at step s reads
exactly the batches an uninterrupted run would have, and the checkpoint only needs the step.

Token files are fetched from storage on first use into a node-local cache (atomic downloads,
shared by the ranks of a node) and memory-mapped, so a rank touches only the pages it reads.
"""

from __future__ import annotations

import json
import os

import numpy as np

from jobs.storage import open_storage


class PackedTokens:
    """The sequences of one split of a preprocess stage's output, as one indexable array."""

    def __init__(self, stage_uri: str, split: str, cache_dir: str):
        self.storage = open_storage(stage_uri)
        manifest = json.loads(self.storage.read_bytes("manifest.json"))
        self.seq_len = manifest["seq_len"]
        self.dtype = np.dtype(manifest["dtype"])
        self.vocab_size = manifest["vocab_size"]
        self.eos_id = manifest["eos_id"]
        self.files = [f for f in manifest["splits"][split]["files"] if f["num_sequences"] > 0]
        self.bounds = np.cumsum([0] + [f["num_sequences"] for f in self.files])
        # Keyed by the stage URI's last segment (`corpus-<hash8>`): content-addressed, never stale.
        self.cache_dir = os.path.join(cache_dir, stage_uri.rstrip("/").rsplit("/", 1)[-1])
        self._maps: dict[int, np.memmap] = {}

    def __len__(self) -> int:
        return int(self.bounds[-1])

    def batch(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(input ids, labels) of a micro batch: in pretraining every token is a label."""
        tokens = micro_batch_tokens(self, indices)
        return tokens, tokens

    def sequence(self, index: int) -> np.ndarray:
        file_index = int(np.searchsorted(self.bounds, index, side="right")) - 1
        return self._map(file_index)[index - self.bounds[file_index]]

    def _map(self, file_index: int) -> np.memmap:
        if file_index not in self._maps:
            entry = self.files[file_index]
            local = os.path.join(self.cache_dir, entry["key"])
            expected = entry["num_sequences"] * self.seq_len * self.dtype.itemsize
            if not os.path.exists(local) or os.path.getsize(local) != expected:
                self.storage.download_file(entry["key"], local)
            self._maps[file_index] = np.memmap(local, dtype=self.dtype, mode="r",
                                               shape=(entry["num_sequences"], self.seq_len))
        return self._maps[file_index]


class BatchOrder:
    """Which sequences rank `rank` reads for each micro batch of each global step."""

    def __init__(self, num_sequences: int, micro_batch: int, grad_accum: int, world_size: int, seed: int):
        self.num_sequences = num_sequences
        self.micro_batch, self.grad_accum, self.world_size = micro_batch, grad_accum, world_size
        self.global_batch = micro_batch * grad_accum * world_size
        self.seed = seed
        self._epoch, self._permutation = -1, None
        if num_sequences < self.global_batch:
            raise ValueError(f"{num_sequences} training sequences cannot fill one global batch of {self.global_batch}")

    def indices(self, step: int, micro: int, rank: int) -> np.ndarray:
        start = step * self.global_batch + (micro * self.world_size + rank) * self.micro_batch
        positions = np.arange(start, start + self.micro_batch)
        epochs, offsets = np.divmod(positions, self.num_sequences)
        return np.array([self._order(int(e))[o] for e, o in zip(epochs, offsets)])

    def _order(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch = epoch
            self._permutation = np.random.default_rng([self.seed, epoch]).permutation(self.num_sequences)
        return self._permutation


def micro_batch_tokens(data: PackedTokens, indices: np.ndarray) -> np.ndarray:
    """(micro_batch, seq_len) int64 token ids, as the model's embedding wants them."""
    return np.stack([data.sequence(int(i)) for i in indices]).astype(np.int64)
