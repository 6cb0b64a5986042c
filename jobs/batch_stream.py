"""A rank's micro batches, read and staged in a background thread so the device never waits.

Why: reading a micro batch (a BatchOrder lookup, memory-mapped rows or ranged reads, int64
conversion, a copy into pinned memory) takes host time that would otherwise sit between two
device steps. A thread does it for the next `depth` micro batches while the device computes;
the training loop only starts an asynchronous host-to-device copy (`non_blocking=True`, which is
asynchronous only from pinned memory). The thread also tells the data, when it can `prefetch`,
which sequences come `PREFETCH_AHEAD` micro batches later, so that their token files are fetched
before their first use (jobs/prefetch.py).

The stream yields exactly `data.batch(order.indices(step, micro, rank))` for each (step, micro)
in order, so it changes when batches are read, never which: resuming stays exact.
"""

from __future__ import annotations

import collections
import itertools
import queue
import threading
from typing import Iterator

import numpy as np
import torch

from jobs.data import BatchOrder

PREFETCH_AHEAD = 32  # micro batches: a file's download (seconds) ends before the reads reach it


class _Failure:
    """What the thread hands over instead of a batch when reading one raised."""

    def __init__(self, error: BaseException):
        self.error = error


class BatchStream:
    """Rank `rank`'s micro batches of steps [start_step, num_steps), grad_accum per step in
    order, as (tokens, labels) int64 tensors on `device`; a background thread reads up to
    `depth` micro batches ahead.

    `data` has `.batch(indices)` -> (tokens, labels) numpy arrays (jobs.data.PackedTokens,
    jobs.sft.SFTExamples) and may have `.prefetch(indices)`. Use it as a context manager, or call
    `close()`: it stops the thread. An error in the thread is raised by `next()`."""

    def __init__(self, data, order: BatchOrder, rank: int, start_step: int, num_steps: int,
                 device: torch.device | str, depth: int = 4):
        self.data, self.order, self.rank = data, order, rank
        self.start_step, self.num_steps = start_step, num_steps
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:  # the thread sets it: see _read_ahead
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._num_left = max(num_steps - start_step, 0) * order.grad_accum
        self._ready: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._failure: _Failure | None = None
        self._thread = threading.Thread(target=self._read_ahead, name="batch-stream", daemon=True)
        self._thread.start()

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next micro batch's (tokens, labels) on the device; the copy is asynchronous."""
        if self._stop.is_set():
            raise RuntimeError("the batch stream is closed")
        if self._failure is not None:
            raise self._failure.error
        if self._num_left == 0:
            raise StopIteration
        item = self._ready.get()
        if isinstance(item, _Failure):
            self._failure = item  # raised again by any later call: the thread has ended
            raise item.error
        self._num_left -= 1
        return tuple(t.to(self.device, non_blocking=True) for t in item)

    def close(self) -> None:
        """Stop the thread: it ends once the micro batch it is reading, if any, is read."""
        self._stop.set()
        self._drain()  # unblocks a thread waiting for room in the queue: see _hand_over
        self._thread.join()

    def __enter__(self) -> BatchStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _micro_batches(self) -> Iterator[np.ndarray]:
        for step in range(self.start_step, self.num_steps):
            for micro in range(self.order.grad_accum):
                yield self.order.indices(step, micro, self.rank)

    def _read_ahead(self) -> None:
        try:
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)  # else pinning makes a context on GPU 0
            prefetch = getattr(self.data, "prefetch", None)  # SFTExamples: local from the start
            upcoming, ahead = self._micro_batches(), collections.deque()
            while not self._stop.is_set():
                # The order is looked up PREFETCH_AHEAD micro batches before they are read, and
                # their files are asked for then.
                for indices in itertools.islice(upcoming, PREFETCH_AHEAD - len(ahead)):
                    if prefetch:
                        prefetch(indices)
                    ahead.append(indices)
                if not ahead or not self._hand_over(self._on_host(*self.data.batch(ahead.popleft()))):
                    return
        except BaseException as e:  # raised by the consumer's next()
            self._hand_over(_Failure(e))

    def _hand_over(self, item) -> bool:
        """Queue `item` for the consumer unless the stream is closed. close() empties the queue
        after setting _stop, and every put follows a check of _stop, so at most one put comes
        after that emptying: it finds room, and the thread cannot block for ever."""
        if self._stop.is_set():
            return False
        self._ready.put(item)
        return True

    def _on_host(self, tokens: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """int64 tensors the device copy can read asynchronously: pinned memory on CUDA."""
        def host(a: np.ndarray) -> torch.Tensor:
            t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))
            return t.pin_memory() if self.device.type == "cuda" else t

        return host(tokens), host(labels)

    def _drain(self) -> None:
        try:
            while True:
                self._ready.get_nowait()
        except queue.Empty:
            pass
