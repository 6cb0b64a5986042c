"""Unit tests of the training input path: the data order's bijection (jobs/data.py BatchOrder),
token files read before they are local and fetched once per node (PackedTokens,
jobs/prefetch.py), and the background batch stream (jobs/batch_stream.py). CPU, no Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import tracemalloc

import numpy as np
import pytest
import torch

from jobs.batch_stream import PREFETCH_AHEAD, BatchStream
from jobs.data import BatchOrder, PackedTokens
from jobs.prefetch import NUM_FETCH_THREADS
from jobs.sft import SFTExamples, write_examples
from jobs.storage import open_storage
from jobs.storage_local import LocalStorage
from jobs.storage_s3 import S3Storage
from packed import write_packed_stage

WAIT_S = 30  # the most a test waits for a background thread before it fails
ANY_NUMBER = 1000

# --- BatchOrder: a bijection per (seed, epoch), computed per position --------------------------


def _epoch(n: int, seed: int, epoch: int = 0) -> list[int]:
    """Epoch `epoch` of the order, in one micro batch of n positions."""
    return BatchOrder(n, n, 1, 1, seed).indices(epoch, 0, 0).tolist()


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4097, 100_003])
def test_each_epoch_is_a_permutation_of_every_sequence(n):
    for seed, epoch in [(0, 0), (0, 1), (5, 0), (-3, 2)]:
        assert sorted(_epoch(n, seed, epoch)) == list(range(n))


@pytest.mark.parametrize("n", [7, 1000, 100_003])
def test_epochs_and_seeds_give_different_orders(n):
    orders = [_epoch(n, seed, epoch) for seed in (0, 1) for epoch in (0, 1, 2)]
    assert len({tuple(o) for o in orders}) == len(orders)


def test_micro_batches_of_every_rank_read_each_sequence_once_per_epoch():
    n = 1000
    order = BatchOrder(n, 5, 2, 4, seed=9)  # global batch 40: 25 steps an epoch
    epoch = [i for step in range(25) for micro in range(2) for rank in range(4)
             for i in order.indices(step, micro, rank).tolist()]
    assert sorted(epoch) == list(range(n))
    assert epoch == _epoch(n, seed=9)  # and in the order's positions: micro-major, then rank


def test_the_order_is_the_same_in_a_new_instance_and_in_another_process():
    order = BatchOrder(100_003, 8, 2, 3, seed=42)
    wanted = [(0, 0, 0), (5, 1, 2), (12_500, 0, 1), (10**6, 1, 0)]  # the last ones in later epochs
    here = [order.indices(*where).tolist() for where in wanted]
    resumed = BatchOrder(100_003, 8, 2, 3, seed=42)  # a run resumed at a later step
    assert [resumed.indices(*where).tolist() for where in reversed(wanted)] == here[::-1]
    script = ("import json, sys; from jobs.data import BatchOrder; o = BatchOrder(100_003, 8, 2, 3, seed=42); "
              f"print(json.dumps([o.indices(*w).tolist() for w in {wanted!r}]))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert json.loads(out.stdout) == here


def test_a_huge_corpus_needs_no_memory_per_sequence():
    n = 10**12
    order = BatchOrder(n, 64, 8, 64, seed=1)
    tracemalloc.start()
    try:
        batches = [order.indices(step, 7, 63) for step in (0, 1, 10**6, 10**8)]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20  # a permutation of 10^12 sequences would be 8 TB
    together = np.concatenate(batches)
    assert together.dtype == np.int64 and len(set(together.tolist())) == len(together)
    assert together.min() >= 0 and together.max() < n
    assert together.max() > n // 2  # drawn from the whole range, not near the positions


def test_the_order_looks_shuffled():
    n = 10**6
    order = BatchOrder(n, 1000, 1, 1, seed=3)
    stream = np.concatenate([order.indices(step, 0, 0) for step in range(10)])
    steps = np.abs(np.diff(stream))
    assert np.mean(steps == 1) < 0.01  # neighbours in the order are not neighbours in the corpus
    assert abs(np.corrcoef(np.arange(len(stream)), stream)[0, 1]) < 0.05
    # Files of 1000 sequences: one rank's micro batch of 64 draws from many of the 1000 files.
    files = BatchOrder(n, 64, 4, 8, seed=3).indices(5, 2, 3) // 1000
    assert len(set(files.tolist())) >= 60


# --- PackedTokens: ranged reads before a file is local, one download per node ----------------

SEQ_LEN = 4
STAGE = "corpus-0123abcd"
FILE_SIZES = [3, 0, 4, 5, 2, 6, 1, 3]  # sequences per file; the empty one holds none


def _expected(indices) -> np.ndarray:
    """Sequence i holds the tokens i*SEQ_LEN .. i*SEQ_LEN+SEQ_LEN-1 (see _write_stage)."""
    return (np.asarray(indices)[:, None] * SEQ_LEN + np.arange(SEQ_LEN)).astype(np.int64)


def _write_stage(storage) -> None:
    """A preprocess stage's output: a manifest and one raw uint32 file per FILE_SIZES entry."""
    entries, first = [], 0
    for number, count in enumerate(FILE_SIZES):
        key = f"data/train-{number:05d}.bin"
        storage.write_bytes(key, _expected(np.arange(first, first + count)).astype("<u4").tobytes())
        entries.append({"key": key, "num_sequences": count})
        first += count
    manifest = {"format": "packed-tokens", "dtype": "uint32", "seq_len": SEQ_LEN, "vocab_size": 1 << 20,
                "eos_id": 0, "tokenizer": "tokenizer/",
                "splits": {"train": {"files": entries, "num_sequences": first}}}
    storage.write_bytes("manifest.json", json.dumps(manifest).encode())


def _file_of(index: int) -> str:
    return f"data/train-{int(np.searchsorted(np.cumsum(FILE_SIZES), index, side='right')):05d}.bin"


def _first(index: int) -> int:
    """The index of the first sequence of `index`'s file."""
    bounds = np.cumsum([0] + FILE_SIZES)
    return int(bounds[np.searchsorted(bounds, index, side="right") - 1])


class _Counting:
    """A storage that records its ranged reads and downloads. A download ends when it can take
    `downloads_may_end` (a semaphore): a test holds them with Semaphore(0), then releases them."""

    def __init__(self, *args):
        super().__init__(*args)
        self.ranges: list[tuple[str, int, int]] = []
        self.downloads: list[str] = []
        self.downloads_started = threading.Semaphore(0)
        self.downloads_may_end = threading.Semaphore(ANY_NUMBER)
        self.download_error: Exception | None = None

    def read_range(self, key, start, end):
        self.ranges.append((key, start, end))
        return super().read_range(key, start, end)

    def download_file(self, key, local_path):
        self.downloads.append(key)
        self.downloads_started.release()
        assert self.downloads_may_end.acquire(timeout=WAIT_S)
        if self.download_error:
            raise self.download_error
        super().download_file(key, local_path)


class CountingLocalStorage(_Counting, LocalStorage):
    pass


class CountingS3Storage(_Counting, S3Storage):
    pass


@pytest.fixture(params=["local", "s3"])
def counting_storage(request, tmp_path):
    """A written stage, read through a counting storage: on disk, and on the moto S3 server."""
    if request.param == "local":
        storage = CountingLocalStorage(str(tmp_path / "store" / "stages" / STAGE))
    else:
        bucket = request.getfixturevalue("s3_bucket").removeprefix("s3://")
        storage = CountingS3Storage(bucket, f"stages/{STAGE}")
    _write_stage(storage)
    return storage


def _open(storage, cache) -> PackedTokens:
    return PackedTokens(storage.uri, "train", str(cache), storage=storage)


def _wait_for_downloads(storage, count: int) -> None:
    for _ in range(count):
        assert storage.downloads_started.acquire(timeout=WAIT_S)


def test_a_first_batch_reads_only_its_sequences_while_their_files_download(counting_storage, tmp_path):
    storage = counting_storage
    storage.downloads_may_end = threading.Semaphore(0)  # no file becomes local until the test says so
    indices = np.array([9, 0, 14, 4, 2])  # files 3, 0, 4, 2, 0
    with _open(storage, tmp_path / "cache") as data:
        tokens, labels = data.batch(indices)
        assert tokens.dtype == np.int64 and tokens.tolist() == _expected(indices).tolist()
        assert labels is tokens
        row_bytes = SEQ_LEN * 4
        sequence_ranges = sorted((_file_of(i), (i - _first(i)) * row_bytes, (i - _first(i) + 1) * row_bytes)
                                 for i in indices.tolist())
        assert sorted(storage.ranges) == sequence_ranges  # one ranged read per sequence, nothing more
        touched = {_file_of(i) for i in indices.tolist()}
        _wait_for_downloads(storage, len(touched))  # the whole files, in the background
        assert sorted(storage.downloads) == sorted(touched)
        assert not any(os.path.exists(tmp_path / "cache" / STAGE / key) for key in touched)

        storage.downloads_may_end.release(ANY_NUMBER)
        for i in indices.tolist():  # waits for each whole file, which is then local
            assert data.sequence(i).tolist() == _expected([i])[0].tolist()
        storage.ranges.clear()
        assert data.batch(indices)[0].tolist() == _expected(indices).tolist()
        assert storage.ranges == []  # now from the memory maps
        assert sorted(storage.downloads) == sorted(touched)  # each file downloaded once


def test_prefetch_fetches_files_in_order_of_first_use_a_few_at_a_time_each_once(tmp_path):
    storage = CountingLocalStorage(str(tmp_path / "store" / STAGE))
    _write_stage(storage)
    storage.downloads_may_end = threading.Semaphore(0)
    first_use = [7, 5, 2, 0, 3, 6, 4]  # the non-empty files, in the order the indices reach them
    indices = np.array([sum(FILE_SIZES[:f]) for f in first_use])
    with _open(storage, tmp_path / "cache") as data:
        data.prefetch(indices[:3])
        data.prefetch(indices)  # the first three again: asked for once already
        _wait_for_downloads(storage, NUM_FETCH_THREADS)
        time.sleep(0.2)  # room for a wrong extra download to start
        keys = [f"data/train-{f:05d}.bin" for f in first_use]
        assert sorted(storage.downloads) == sorted(keys[:NUM_FETCH_THREADS])
        for key in keys[NUM_FETCH_THREADS:]:
            storage.downloads_may_end.release()  # one download ends: its thread takes the next file
            _wait_for_downloads(storage, 1)
            assert storage.downloads[-1] == key
        storage.downloads_may_end.release(ANY_NUMBER)
        for i in indices.tolist():
            data.sequence(i)  # waits for the background download of its file
        assert sorted(storage.downloads) == sorted(keys)  # each once


def test_ranks_sharing_a_cache_download_each_file_once(tmp_path):
    storage = CountingLocalStorage(str(tmp_path / "store" / STAGE))
    _write_stage(storage)
    slow = storage.download_file

    def download_slowly(key, local_path):  # a window in which an unlocked second rank would download too
        time.sleep(0.2)
        slow(key, local_path)

    storage.download_file = download_slowly
    num_ranks, everything = 3, np.arange(sum(FILE_SIZES))
    start = threading.Barrier(num_ranks)
    results, errors = {}, []

    def rank(r: int) -> None:
        try:
            with _open(storage, tmp_path / "cache") as data:  # the ranks of one node: one cache
                start.wait(WAIT_S)
                data.batch(everything[::-1])  # asks for the files in the background
                results[r] = np.stack([data.sequence(i) for i in everything.tolist()])
        except Exception as e:  # noqa: BLE001 (test): reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(num_ranks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S)
    assert errors == []
    assert all(results[r].tolist() == _expected(everything).tolist() for r in range(num_ranks))
    nonempty = [f"data/train-{f:05d}.bin" for f, count in enumerate(FILE_SIZES) if count]
    assert sorted(storage.downloads) == nonempty


def test_a_failed_background_download_is_raised_by_a_later_read(tmp_path):
    storage = CountingLocalStorage(str(tmp_path / "store" / STAGE))
    _write_stage(storage)
    storage.download_error = OSError("the network is down")
    storage.downloads_may_end = threading.Semaphore(0)  # it fails only after the first read
    with _open(storage, tmp_path / "cache") as data:
        assert data.batch(np.array([0]))[0].tolist() == _expected([0]).tolist()  # by a ranged read
        _wait_for_downloads(storage, 1)
        storage.downloads_may_end.release()
        deadline = time.monotonic() + WAIT_S
        with pytest.raises(OSError, match="the network is down"):
            while time.monotonic() < deadline:  # until the failure has been recorded
                data.batch(np.array([1]))


def test_close_ends_the_prefetch_threads(tmp_path):
    storage = CountingLocalStorage(str(tmp_path / "store" / STAGE))
    _write_stage(storage)
    data = _open(storage, tmp_path / "cache")
    before = set(threading.enumerate())  # a thread of another test's data is not this one's
    data.prefetch(np.arange(sum(FILE_SIZES)))
    workers = [t for t in set(threading.enumerate()) - before if t.name == "shard-prefetch"]
    assert workers
    data.close()
    for t in workers:
        t.join(WAIT_S)
        assert not t.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        data.prefetch(np.array([0]))


# --- BatchStream -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def packed_uri(tmp_path_factory):
    out = tmp_path_factory.mktemp("packed") / "stages" / "corpus-feedf00d"
    write_packed_stage(str(out), [f"text number {i}" for i in range(40)], vocab_size=300, seq_len=16,
                       random_tokens=16 * 200)
    return "file://" + str(out)


def _direct(data, order: BatchOrder, rank: int, steps: range) -> list[tuple[list, list]]:
    return [tuple(a.tolist() for a in data.batch(order.indices(step, micro, rank)))
            for step in steps for micro in range(order.grad_accum)]


def test_the_stream_gives_the_batches_a_direct_read_gives(packed_uri, tmp_path):
    with PackedTokens(packed_uri, "train", str(tmp_path / "cache")) as data:
        order = BatchOrder(len(data), 4, 3, 2, seed=7)
        with BatchStream(data, order, rank=1, start_step=5, num_steps=40, device=torch.device("cpu"), depth=2) as stream:
            streamed = list(stream)  # steps 5..39: 35 steps x 3 micro batches, several epochs
            with pytest.raises(StopIteration):
                next(stream)
        assert all(t.dtype == torch.int64 and t.device.type == "cpu" for pair in streamed for t in pair)
        assert [tuple(t.tolist() for t in pair) for pair in streamed] == _direct(data, order, 1, range(5, 40))


def test_the_stream_reads_fine_tuning_rows_with_their_labels(tmp_path):
    rng = np.random.default_rng(0)
    inputs = rng.integers(0, 500, (30, 8)).astype(np.int32)
    labels = np.where(rng.random((30, 8)) < 0.5, -100, inputs).astype(np.int32)
    write_examples(inputs, labels, str(tmp_path / "store" / "stages" / "sft-00aa11bb" / "sft"))
    data = SFTExamples("file://" + str(tmp_path / "store" / "stages" / "sft-00aa11bb" / "sft"), str(tmp_path / "cache"))
    order = BatchOrder(len(data), 2, 2, 2, seed=1)
    with BatchStream(data, order, rank=0, start_step=0, num_steps=12, device="cpu") as stream:
        streamed = [tuple(t.tolist() for t in pair) for pair in stream]
    assert streamed == _direct(data, order, 0, range(12))
    assert any(-100 in row for _, batch_labels in streamed for row in batch_labels)


class _Recording:
    """Data that records its reads and prefetches; reading batch number `fail_at` raises."""

    def __init__(self, fail_at: int | None = None):
        self.events: list[tuple[str, list[int]]] = []
        self.fail_at = fail_at

    def prefetch(self, indices):
        self.events.append(("prefetch", indices.tolist()))

    def batch(self, indices):
        if len([e for e in self.events if e[0] == "batch"]) == self.fail_at:
            raise ValueError("a torn token file")
        self.events.append(("batch", indices.tolist()))
        return indices[:, None] + np.zeros((1, 3), np.int64), indices[:, None] + 1


def test_the_stream_asks_for_files_prefetch_ahead_micro_batches_before_reading_them():
    data, order = _Recording(), BatchOrder(10**6, 2, 2, 1, seed=0)
    with BatchStream(data, order, rank=0, start_step=0, num_steps=40, device="cpu") as stream:
        for _ in stream:
            pass
    prefetched = [indices for kind, indices in data.events if kind == "prefetch"]
    read = [indices for kind, indices in data.events if kind == "batch"]
    assert read == [order.indices(s, m, 0).tolist() for s in range(40) for m in range(2)]
    assert prefetched == read  # each micro batch once, in order
    for number, indices in enumerate(read):
        at = data.events.index(("batch", indices))
        last_asked = min(number + PREFETCH_AHEAD - 1, len(read) - 1)
        assert data.events.index(("prefetch", read[last_asked])) < at


def test_an_error_in_the_thread_is_raised_by_next():
    data = _Recording(fail_at=2)
    with BatchStream(data, BatchOrder(100, 2, 1, 1, seed=0), 0, 0, 10, "cpu") as stream:
        next(stream)
        next(stream)
        with pytest.raises(ValueError, match="a torn token file"):
            next(stream)
        with pytest.raises(ValueError, match="a torn token file"):  # and again: nothing more comes
            next(stream)


def test_close_stops_the_thread_and_bounds_the_read_ahead():
    data = _Recording()
    stream = BatchStream(data, BatchOrder(10**6, 2, 1, 1, seed=0), 0, 0, 10**5, "cpu", depth=3)
    next(stream)
    thread = next(t for t in threading.enumerate() if t.name == "batch-stream")
    stream.close()
    assert not thread.is_alive()
    num_read = len([e for e in data.events if e[0] == "batch"])
    assert num_read <= 1 + 3 + 1  # the one taken, a full queue, the one in hand at close
    with pytest.raises(RuntimeError, match="closed"):
        next(stream)
