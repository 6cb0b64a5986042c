"""Per-stage logs in storage (`runs/<run_id>/logs/<stage>.log`): what a stage printed, kept
beside the run record so that `orchestrator logs RUN` works from any machine that sees the
storage, whichever machine drove the run.

An object store cannot append, so a StageLog keeps the stage's whole log in memory and rewrites
the object atomically (`write_bytes`) on each flush; a background thread flushes at most every
`flush_interval_s` when there is something new, which bounds the cost to one PUT per interval per
running stage. A resumed run's new attempt first reads what earlier attempts left and appends to
it, so a stage's log is the history of all its attempts.

Every flush therefore writes an extension of the previous object: the same bytes, then more whole
lines. That is what lets `follow_log` read only the bytes past the offset it already printed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator

from jobs.storage import Storage
from orchestrator.records import RunRecord, load_record

log = logging.getLogger(__name__)

FLUSH_INTERVAL_S = 2.0
FOLLOW_POLL_S = 1.0


def log_key(run_id: str, stage: str) -> str:
    return f"runs/{run_id}/logs/{stage}.log"


class StageLog:
    """One stage's log; `write` from any thread, `close` when the stage ends (or use `with`)."""

    def __init__(self, storage: Storage, run_id: str, stage: str,
                 flush_interval_s: float = FLUSH_INTERVAL_S, clock: Callable[[], float] = time.time):
        self.storage, self.key, self._clock = storage, log_key(run_id, stage), clock
        try:
            earlier = storage.read_bytes(self.key)
        except FileNotFoundError:
            earlier = b""
        self._content = bytearray(earlier)
        self._flushed_size = len(earlier)
        self._lock = threading.Lock()  # guards _content
        # One flush at a time: a slow write of an older snapshot must not land after a newer one.
        self._flush_lock = threading.Lock()
        self._closed = threading.Event()
        self._flusher = threading.Thread(target=self._flush_periodically, args=(flush_interval_s,),
                                         name=f"stage-log-{stage}", daemon=True)
        self._flusher.start()

    def write(self, text: str) -> None:
        """Append `text` with a UTC timestamp on each of its lines (a traceback stays readable)."""
        t = self._clock()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"
        data = "".join(f"{stamp} {line}\n" for line in text.splitlines() or [""]).encode()
        with self._lock:
            if self._closed.is_set():
                raise ValueError(f"write to a closed stage log ({self.storage.url(self.key)})")
            self._content += data

    def flush(self) -> None:
        """Rewrite the object with everything written so far; nothing happens when nothing is new."""
        with self._flush_lock:
            with self._lock:
                if len(self._content) == self._flushed_size:
                    return
                snapshot = bytes(self._content)
            self.storage.write_bytes(self.key, snapshot)
            self._flushed_size = len(snapshot)

    def close(self) -> None:
        """Stop the background flusher and flush the rest; raises if that last flush fails."""
        self._closed.set()
        self._flusher.join()
        self.flush()

    def __enter__(self) -> StageLog:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        try:
            self.close()
        except Exception:  # the stage's own error is the one to raise; this one goes to our log
            log.exception("stage log %s: the last flush failed", self.storage.url(self.key))

    def _flush_periodically(self, interval_s: float) -> None:
        while not self._closed.wait(interval_s):
            try:
                self.flush()
            except Exception:  # the lines stay buffered: the next flush (or close) writes them
                log.warning("stage log %s: flush failed; retrying in %.0fs", self.storage.url(self.key),
                            interval_s, exc_info=True)


def read_log(storage: Storage, run_id: str, stage: str | None = None) -> str:
    """One stage's log ('' when it has none), or every stage's in stage order, each under a header."""
    if stage is not None:
        try:
            return storage.read_bytes(log_key(run_id, stage)).decode(errors="replace")
        except FileNotFoundError:
            return ""
    names = [name for name, _ in _log_sizes(storage, run_id, load_record(storage, run_id), None)]
    return "".join(stage_header(name, first=i == 0) + read_log(storage, run_id, name) for i, name in enumerate(names))


def follow_log(storage: Storage, run_id: str, stage: str | None = None, poll_s: float = FOLLOW_POLL_S,
               sleep: Callable[[float], None] = time.sleep) -> Iterator[str]:
    """Yield the log's text from the start and then as it grows (every stage's, with a header
    whenever the output moves to another stage, or one stage's), until the run is no longer running."""
    offsets: dict[str, int] = {}
    current = None
    while True:
        # Read the status before the logs: the logs read after seeing a finished run hold
        # everything that the run flushed before it finished.
        record = load_record(storage, run_id)
        finished = record is None or record.status != "running"
        for name, size in _log_sizes(storage, run_id, record, stage):
            start = offsets.get(name, 0)
            if size <= start:
                continue
            # [start, size) is whole lines: each flush extends the previous object by whole lines.
            text = storage.read_range(log_key(run_id, name), start, size).decode(errors="replace")
            offsets[name] = size
            if stage is None and name != current:
                yield stage_header(name, first=current is None)
                current = name
            yield text
        if finished:
            return
        sleep(poll_s)


def stage_header(stage: str, first: bool = False) -> str:
    return ("" if first else "\n") + f"==> {stage} <==\n"


def _log_sizes(storage: Storage, run_id: str, record: RunRecord | None, stage: str | None) -> list[tuple[str, int]]:
    """(stage, log size) of each stage that has a log: in the record's stage order (dependency
    order), then any the record does not name (a stage since removed from the pipeline)."""
    prefix = f"runs/{run_id}/logs/"
    sizes = {o.key[len(prefix):-len(".log")]: o.size for o in storage.list(prefix) if o.key.endswith(".log")}
    if stage is not None:
        return [(stage, sizes[stage])] if stage in sizes else []
    order = list(record.stages) if record else []
    return sorted(sizes.items(), key=lambda item: (order.index(item[0]) if item[0] in order else len(order), item[0]))
