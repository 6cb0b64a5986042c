"""Token files copied into a node-local cache: once per node, in the background, ahead of use.

Why: the ranks of a node share one cache directory, and with a shuffled order the first steps
touch nearly every file. Two rules keep that cheap:

- One download per file per node. `fetch_once_per_node` takes an exclusive lock (`flock`) on
  `<file>.lock` beside the cached copy around "is it complete? else download": the first rank
  downloads, the others wait on the lock (no polling) and then find the copy complete. The copy
  itself appears atomically (`Storage.download_file` writes a temp file and renames it), so a
  reader that only checks the size (`is_complete`) never sees a torn file.
- Downloads run ahead of use, off the training thread. `Prefetcher` takes requests in order of
  first use and works through them with a few daemon threads; each file is requested at most
  once per process, and `close()` cancels what has not started.
"""

from __future__ import annotations

import fcntl
import os
import queue
import threading
from concurrent.futures import Future

from jobs.storage import Storage

NUM_FETCH_THREADS = 4  # whole-file downloads at once per process; S3 splits each into parts too


def is_complete(local_path: str, size: int) -> bool:
    """Whether `local_path` is a whole copy: downloads land by rename, so the size tells."""
    try:
        return os.path.getsize(local_path) == size
    except FileNotFoundError:
        return False


def fetch_once_per_node(storage: Storage, key: str, local_path: str, size: int) -> None:
    """Make `local_path` a complete copy of `key` (`size` bytes), downloading it only if no
    process of this node has already: the lock beside it makes them take turns."""
    os.makedirs(os.path.dirname(local_path), exist_ok=True)
    with open(local_path + ".lock", "ab") as lock:  # "ab": create it without truncating
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not is_complete(local_path, size):
            storage.download_file(key, local_path)


class Prefetcher:
    """Downloads files into the node cache in the background: in the order they are requested,
    at most `NUM_FETCH_THREADS` at a time, each at most once per process."""

    def __init__(self, storage: Storage):
        self.storage = storage
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()  # (future, key, path, size); None: stop
        self._fetches: dict[str, Future] = {}  # key -> its one fetch, in flight or done
        self._workers: list[threading.Thread] = []
        self._closed = False

    def request(self, key: str, local_path: str, size: int) -> Future:
        """The fetch of `key` into `local_path`, queued behind the earlier requests the first time
        it is asked for; its result is the path, or the download's error."""
        with self._lock:
            if self._closed:
                raise RuntimeError(f"the prefetcher of {self.storage.uri} is closed")
            if key not in self._fetches:
                self._fetches[key] = Future()
                self._jobs.put((self._fetches[key], key, local_path, size))
                if len(self._workers) < NUM_FETCH_THREADS:  # threads only once there is work
                    worker = threading.Thread(target=self._work, name="shard-prefetch", daemon=True)
                    worker.start()
                    self._workers.append(worker)
            return self._fetches[key]

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            future, key, local_path, size = job
            if not future.set_running_or_notify_cancel():  # cancelled by close()
                continue
            try:
                fetch_once_per_node(self.storage, key, local_path, size)
            except BaseException as e:  # handed to whoever reads the file
                future.set_exception(e)
            else:
                future.set_result(local_path)

    def close(self) -> None:
        """Cancel the fetches not started and let the threads end after those in flight."""
        with self._lock:
            self._closed = True
            for future in self._fetches.values():
                future.cancel()  # a no-op for those running or done
            for _ in self._workers:
                self._jobs.put(None)
