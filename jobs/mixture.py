"""Training data from several preprocess stages, mixed by weight, in a resumable order.

Which source a sequence comes from is a function of its stream position only (the position
BatchOrder gives it: step, micro batch, rank and place in the micro batch), by an exact-quota
rule rather than by drawing: the sources are split off one after the other, source k taking
its share p_k = w_k / (w_k + ... + w_K) of the positions that the sources before it left, by
rounding. Position m of what is left goes to source k when round((m + 1) p_k) > round(m p_k),
and is then that source's round(m p_k)-th sequence; otherwise it is position m - round(m p_k)
of what source k leaves. Each split is within half a sequence of its share, so among the first
n positions every source has within (K - 1) / 2 sequences of n x its normalized weight, at any
n: over a run the shares are the weights, and each micro batch holds its share to the rounding.
O(K) per position and no state, so a resumed run continues the same mixture bitwise.

Within a source, its i-th sequence is position i of its own BatchOrder-like stream (jobs.data
epoch_order): a keyed bijection per epoch, each source counting its own epochs as it wraps.
Source 0 is keyed as a lone source is, so a one-source mixture reads exactly the plain order.

A batch's indices address the sources as one concatenation (source k's sequence i is
offsets[k] + i), so the batch stream and the loop read a mixture like a single source.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from jobs.data import BatchOrder, PackedTokens, epoch_order


@dataclass(frozen=True)
class MixtureSource:
    name: str  # the preprocess stage: names the source in metrics
    uri: str  # its output
    weight: float  # > 0; the shares are the weights over their sum


class MixtureOrder(BatchOrder):
    """Which sequences of which source rank `rank` reads for each micro batch of each step."""

    def __init__(self, sizes: list[int], weights: list[float], micro_batch: int, grad_accum: int,
                 world_size: int, seed: int):
        if any(not w > 0 for w in weights):
            raise ValueError(f"mixture weights must be > 0, got {weights}")
        if any(n < 1 for n in sizes):
            raise ValueError(f"every source of a mixture needs a training sequence; sources hold {sizes}")
        super().__init__(sum(sizes), micro_batch, grad_accum, world_size, seed)
        self.sizes = list(sizes)
        self.offsets = np.cumsum([0] + self.sizes[:-1]).astype(np.int64)
        # p_k: source k's share of what the sources before it left; the last takes all the rest.
        left = np.cumsum(np.asarray(weights, dtype=np.float64)[::-1])[::-1]
        self._splits = [float(w / rest) for w, rest in zip(weights[:-1], left[:-1])]

    def indices(self, step: int, micro: int, rank: int) -> np.ndarray:
        sources, ranks = self.assign(self.positions(step, micro, rank))
        out = np.empty(len(sources), dtype=np.int64)
        for k in np.unique(sources).tolist():
            here = sources == k
            out[here] = self.offsets[k] + epoch_order(ranks[here], self.sizes[k], self.seed, k or None)
        return out

    def assign(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source, index in that source's stream) of each stream position (uint64)."""
        sources = np.full(len(positions), len(self.sizes) - 1, dtype=np.int64)
        ranks = np.asarray(positions, dtype=np.uint64).copy()  # the last source: what all others left
        undecided = np.arange(len(positions))
        for k, share in enumerate(self._splits):
            m = ranks[undecided]
            taken_before, taken_through = _taken(m, share), _taken(m + np.uint64(1), share)
            mine = taken_through > taken_before
            sources[undecided[mine]] = k
            ranks[undecided] = np.where(mine, taken_before, m - taken_before)
            undecided = undecided[~mine]
        return sources, ranks

    def sequences_per_source(self, num_positions: int) -> list[int]:
        """How many of the first `num_positions` stream positions each source holds."""
        counts, left = [], num_positions
        for share in self._splits:
            taken = int(_taken(np.array([left], dtype=np.uint64), share)[0])
            counts.append(taken)
            left -= taken
        return counts + [left]


def _taken(m: np.ndarray, share: float) -> np.ndarray:
    """How many of the first m positions a split with this share takes: m x share, rounded
    half up. Plain float64 products, so every machine computes the same."""
    return np.floor(m.astype(np.float64) * share + 0.5).astype(np.uint64)


class MixtureData:
    """The training splits of several preprocess stages as one indexable concatenation, read
    through each source's PackedTokens; the sources must agree on seq_len and vocabulary."""

    def __init__(self, sources: list[MixtureSource], cache_dir: str):
        self.names = [s.name for s in sources]
        self.parts = [PackedTokens(s.uri, "train", cache_dir) for s in sources]
        first = self.parts[0]
        for source, part in zip(sources[1:], self.parts[1:]):
            for what in ("seq_len", "vocab_size", "eos_id"):
                if getattr(part, what) != getattr(first, what):
                    raise ValueError(f"mixture sources {sources[0].name} and {source.name} differ in {what} "
                                     f"({getattr(first, what)} vs {getattr(part, what)}): they must share a "
                                     "tokenizer and seq_len")
        self.seq_len, self.vocab_size, self.eos_id = first.seq_len, first.vocab_size, first.eos_id
        self.sizes = [len(p) for p in self.parts]
        self.offsets = np.cumsum([0] + self.sizes[:-1])

    def __len__(self) -> int:
        return sum(self.sizes)

    def batch(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(input ids, labels) of a micro batch: every token is a label, as in PackedTokens."""
        tokens = np.empty((len(indices), self.seq_len), dtype=np.int64)
        for k, here, local in self._split(indices):
            tokens[here] = self.parts[k].sequences(local)
        return tokens, tokens

    def prefetch(self, indices: np.ndarray) -> None:
        for k, _, local in self._split(indices):
            self.parts[k].prefetch(local)

    def close(self) -> None:
        for part in self.parts:
            part.close()

    def _split(self, indices: np.ndarray):
        """(source, mask into indices, indices within the source) for each source indices touch."""
        sources = np.searchsorted(self.offsets, indices, side="right") - 1
        for k in np.unique(sources).tolist():
            here = sources == k
            yield k, here, np.asarray(indices)[here] - self.offsets[k]
