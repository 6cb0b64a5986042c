"""Training data: a preprocess stage's packed token files, memory-mapped, in a resumable order.

The order is a function of (seed, epoch) only: epoch e visits every sequence of the split once,
in the order of a pseudo-random bijection of [0, num_sequences) keyed by (seed, e). A global step
consumes the next `global_batch` positions of that order, and rank r's micro batch m of that step
takes a fixed, disjoint slice of them. So the data a rank sees depends only on (step, rank, world
size, batch shape): a run resumed at step s reads exactly the batches an uninterrupted run would
have, and the checkpoint only needs the step.

The bijection is computed per position, never stored: a materialized permutation costs 8 bytes
per sequence on every rank (390 MB for 49M sequences), and grows with the corpus. A Feistel
network is a bijection of [0, 2^k) whatever its round function, so with k the smallest width
that holds num_sequences, a few rounds of a keyed integer hash (splitmix64's finalizer, round
keys from (seed, epoch)) scramble a position in O(1) memory; a result >= num_sequences is
encrypted again ("cycle walking") until it falls inside, which keeps it a bijection of
[0, num_sequences) and takes under two passes through the network on average (2^k < 2 num_sequences).
A micro batch's positions go through it together as numpy uint64 arrays.

Token files are copied from storage into a node-local cache shared by the ranks of a node, once
per node and ahead of use (jobs/prefetch.py), and memory-mapped, so a rank touches only the
pages it reads. Training never waits for a whole file: `sequences` reads a sequence whose file
is not local yet with one ranged read of its bytes and has the file fetched in the background;
`prefetch` lets the reader of the order (jobs/batch_stream.py) ask for the files of micro
batches it will read soon. `sequence` is the plain path for reading a split in order (the
evaluation's validation sequences): it waits for the whole file.
"""

from __future__ import annotations

import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from jobs.prefetch import Prefetcher, fetch_once_per_node, is_complete
from jobs.storage import Storage, open_storage

NUM_RANGED_READS = 8  # a micro batch's sequences read from storage at once, while files are not local
NUM_FEISTEL_ROUNDS = 6
_UINT64 = 2**64


class PackedTokens:
    """The sequences of one split of a preprocess stage's output, as one indexable array.

    `storage` is where the stage's files are read from: `stage_uri`'s storage unless given
    (tests pass one that counts what is read)."""

    def __init__(self, stage_uri: str, split: str, cache_dir: str, storage: Storage | None = None):
        self.storage = storage or open_storage(stage_uri)
        manifest = json.loads(self.storage.read_bytes("manifest.json"))
        self.seq_len = manifest["seq_len"]
        self.dtype = np.dtype(manifest["dtype"])
        self.vocab_size = manifest["vocab_size"]
        self.eos_id = manifest["eos_id"]
        self.files = [f for f in manifest["splits"][split]["files"] if f["num_sequences"] > 0]
        self.bounds = np.cumsum([0] + [f["num_sequences"] for f in self.files])
        # Keyed by the stage URI's last segment (`corpus-<hash8>`): content-addressed, never stale.
        self.cache_dir = os.path.join(cache_dir, stage_uri.rstrip("/").rsplit("/", 1)[-1])
        self._sequence_bytes = self.seq_len * self.dtype.itemsize
        self._lock = threading.Lock()  # guards _maps: the batch stream's thread reads too
        self._maps: dict[int, np.memmap] = {}
        self._prefetcher = Prefetcher(self.storage)
        self._ranged_reads = ThreadPoolExecutor(NUM_RANGED_READS, thread_name_prefix="ranged-read")

    def __len__(self) -> int:
        return int(self.bounds[-1])

    def batch(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(input ids, labels) of a micro batch: in pretraining every token is a label."""
        tokens = micro_batch_tokens(self, indices)
        return tokens, tokens

    def sequences(self, indices: np.ndarray) -> np.ndarray:
        """The sequences at `indices`, (len(indices), seq_len) in the files' dtype, without waiting
        for a file: from the memory map where the file is local, else by one ranged read each,
        while the file is fetched in the background. A failed fetch is raised here."""
        files, rows = self._locate(indices)
        out = np.empty((len(files), self.seq_len), self.dtype)
        remote = []
        for file_index in _in_order_of_first_use(files):
            here = np.flatnonzero(files == file_index)
            mapped = self._map_if_local(file_index)
            if mapped is None:
                remote.extend(here)
            else:
                out[here] = mapped[rows[here]]
        for i, row in zip(remote, self._ranged_reads.map(lambda i: self._read_sequence(files[i], rows[i]), remote)):
            out[i] = row
        return out

    def prefetch(self, indices: np.ndarray) -> None:
        """Have the files holding `indices` fetched in the background, in order of first use,
        behind those asked for earlier."""
        files, _ = self._locate(indices)
        for file_index in _in_order_of_first_use(files):
            if file_index not in self._maps:
                self._request(file_index)

    def sequence(self, index: int) -> np.ndarray:
        """One sequence, waiting for its whole file: for reading a split in order."""
        files, rows = self._locate(np.array([index]))
        return self._map(int(files[0]))[rows[0]]

    def close(self) -> None:
        """Cancel the background fetches not started. Then `sequence` still reads (waiting for whole
        files); `sequences`, `batch` and `prefetch` raise."""
        self._prefetcher.close()
        self._ranged_reads.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> PackedTokens:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _locate(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(file index, row in that file) of each sequence index."""
        files = np.searchsorted(self.bounds, indices, side="right") - 1
        return files, np.asarray(indices) - self.bounds[files]

    def _local_path(self, file_index: int) -> str:
        return os.path.join(self.cache_dir, self.files[file_index]["key"])

    def _file_size(self, file_index: int) -> int:
        return self.files[file_index]["num_sequences"] * self._sequence_bytes

    def _request(self, file_index: int):
        return self._prefetcher.request(self.files[file_index]["key"], self._local_path(file_index),
                                        self._file_size(file_index))

    def _map(self, file_index: int) -> np.memmap:
        """The file's memory map, fetching the file first if no rank of the node has."""
        if file_index not in self._maps:
            fetch_once_per_node(self.storage, self.files[file_index]["key"], self._local_path(file_index),
                                self._file_size(file_index))
        return self._open_map(file_index)

    def _map_if_local(self, file_index: int) -> np.memmap | None:
        """The file's memory map if the file is local; else None, with its fetch requested."""
        if file_index in self._maps:
            return self._maps[file_index]
        fetch = self._request(file_index)
        if fetch.done():
            fetch.result()  # raises the download's error
        elif not is_complete(self._local_path(file_index), self._file_size(file_index)):
            return None  # (a complete copy may also come from another rank of the node)
        return self._open_map(file_index)

    def _open_map(self, file_index: int) -> np.memmap:
        with self._lock:
            if file_index not in self._maps:
                self._maps[file_index] = np.memmap(
                    self._local_path(file_index), dtype=self.dtype, mode="r",
                    shape=(self.files[file_index]["num_sequences"], self.seq_len))
            return self._maps[file_index]

    def _read_sequence(self, file_index: int, row: int) -> np.ndarray:
        key, start = self.files[file_index]["key"], int(row) * self._sequence_bytes
        data = self.storage.read_range(key, start, start + self._sequence_bytes)
        if len(data) != self._sequence_bytes:
            raise ValueError(f"{self.storage.url(key)} ends at byte {start + len(data)}, inside sequence {row}: "
                             f"the manifest promises {self.files[file_index]['num_sequences']} sequences")
        return np.frombuffer(data, dtype=self.dtype)


def _in_order_of_first_use(files: np.ndarray) -> list[int]:
    """The distinct values of `files`, in the order they first appear."""
    distinct, first = np.unique(files, return_index=True)
    return distinct[np.argsort(first)].tolist()


class BatchOrder:
    """Which sequences rank `rank` reads for each micro batch of each global step."""

    def __init__(self, num_sequences: int, micro_batch: int, grad_accum: int, world_size: int, seed: int):
        self.num_sequences = num_sequences
        self.micro_batch, self.grad_accum, self.world_size = micro_batch, grad_accum, world_size
        self.global_batch = micro_batch * grad_accum * world_size
        self.seed = seed
        if num_sequences < self.global_batch:
            raise ValueError(f"{num_sequences} training sequences cannot fill one global batch of {self.global_batch}")

    def positions(self, step: int, micro: int, rank: int) -> np.ndarray:
        """The stream positions (uint64) of rank `rank`'s micro batch `micro` of global step `step`:
        step s consumes positions [s * global_batch, (s + 1) * global_batch)."""
        start = step * self.global_batch + (micro * self.world_size + rank) * self.micro_batch
        return np.arange(start, start + self.micro_batch, dtype=np.uint64)

    def indices(self, step: int, micro: int, rank: int) -> np.ndarray:
        """The sequence indices (int64) of rank `rank`'s micro batch `micro` of global step `step`."""
        return epoch_order(self.positions(step, micro, rank), self.num_sequences, self.seed)


def epoch_order(positions: np.ndarray, num_sequences: int, seed: int, stream: int | None = None) -> np.ndarray:
    """The sequence index (int64) at each stream position (uint64): position p is visited in epoch
    p // num_sequences, at offset p % num_sequences of that epoch's bijection keyed by (seed,
    epoch) and, where given, `stream` (a mixture's other sources: each shuffles differently)."""
    bits = (num_sequences - 1).bit_length()  # the Feistel domain: [0, 2^bits)
    epochs, offsets = np.divmod(positions, np.uint64(num_sequences))
    out = np.empty(len(positions), dtype=np.int64)
    for epoch in np.unique(epochs).tolist():  # one, or two where a micro batch ends an epoch
        here = epochs == epoch
        out[here] = _shuffle(offsets[here], _round_keys(seed, epoch, stream), bits, num_sequences)
    return out


def _shuffle(offsets: np.ndarray, keys: np.ndarray, bits: int, num_sequences: int) -> np.ndarray:
    """The bijection of [0, num_sequences): the Feistel network, cycle-walked back inside."""
    out = _feistel(offsets, keys, bits)
    outside = np.flatnonzero(out >= num_sequences)
    while outside.size:
        out[outside] = _feistel(out[outside], keys, bits)
        outside = outside[out[outside] >= num_sequences]
    return out


def _round_keys(seed: int, epoch: int, stream: int | None = None) -> np.ndarray:
    """One uint64 key per Feistel round, a function of (seed, epoch[, stream]) only. The seed is
    taken modulo 2^64: SeedSequence refuses negative numbers, and a spec's seed may be one."""
    entropy = [seed % _UINT64, epoch] + ([stream] if stream is not None else [])
    return np.random.SeedSequence(entropy).generate_state(NUM_FEISTEL_ROUNDS, np.uint64)


def _feistel(x: np.ndarray, keys: np.ndarray, bits: int) -> np.ndarray:
    """A bijection of [0, 2^bits) on uint64 values: each round swaps the two halves and XORs one
    with a keyed hash of the other, which the same XOR undoes. With an odd width the halves differ
    by a bit and trade places each round, so every width works, not only even ones."""
    high, low = bits // 2, bits - bits // 2
    for key in keys:
        left, right = x >> low, x & ((1 << low) - 1)
        x = (right << high) | (left ^ (_mix(right ^ key) & ((1 << high) - 1)))
        high, low = low, high
    return x


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: every input bit flips about half the output bits (uint64, wrapping)."""
    z = (z ^ (z >> 30)) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> 27)) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> 31)


def micro_batch_tokens(data: PackedTokens, indices: np.ndarray) -> np.ndarray:
    """(micro_batch, seq_len) int64 token ids, as the model's embedding wants them."""
    return data.sequences(indices).astype(np.int64)
