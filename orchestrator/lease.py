"""Stage leases: while one run computes `stages/<name>-<hash>/`, other runs wait for its commit.

Protocol. A lease is a sequence of generations under the stage output,
`<stage dir>/_LEASE/<generation:08d>.json`, each written create-only (`Storage.create_bytes`:
`If-None-Match: *` on S3, `os.link` on disk). The latest generation decides the state:
- none, or released (`released: true`, also what a break writes): free, take generation n+1;
- heartbeat older than the timeout its holder stated, or our own run's driver that is gone from
  this host (a resume after a crash): stale, take it over by creating generation n+1;
- otherwise held: wait, saying by which run and since when.
Only the holder ever rewrites its own generation (heartbeat every timeout/6; `released: true`
at the end); nobody deletes one. Before each heartbeat the holder checks for generation n+1: its
presence means that the lease was broken or taken over, so the holder sets `lost`, stops beating,
and the runner, which asks `still_held()` before it commits, abandons the stage.

Why it is safe. Of two runs racing to take generation n+1, exactly one creates it, so a takeover
needs no delete-then-create (which two takers could both win). An operator's break is one more
generation, so a holder that is alive learns of it the same way as of a takeover. Staleness is
the waiter's clock minus the holder's heartbeat_at: this assumes clocks agree within a few
seconds (NTP), far below the default 60 s timeout with beats every 10 s. The lease is what keeps
two runs from computing a stage at once; what keeps one commit is that the commit file is
create-only too (jobs/commit.py), so a holder that loses its lease between `still_held()` and
its commit still cannot add a second one. Left to the runner: a holder judged stale while alive
(a partition, a long pause) writes into the same dir until its next look, so it must stop
writing once `lost` is set; its files may otherwise differ from what the commit lists.

A record holds run id, host and pid, never a credential. Its `token` makes two takers' bytes
differ: S3Storage.create_bytes counts a precondition failure on identical bytes as its own
retried write, and two takers could otherwise write the same bytes (same run id and second).
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Callable

from pydantic import BaseModel, ConfigDict, Field

from jobs.storage import Storage

DEFAULT_TIMEOUT_S = 60.0
LEASE_DIR = "_LEASE"
_GENERATION_FILE = re.compile(rf"{LEASE_DIR}/(\d{{8,}})\.json")
_BEATS_PER_TIMEOUT = 6  # a holder may miss several beats (a slow PUT, a GC pause) and stay live
log = logging.getLogger(__name__)


class LeaseRecord(BaseModel):
    model_config = ConfigDict(frozen=True)

    generation: int = Field(exclude=True)
    """The number in the file name (the name is the truth; the body does not repeat it)."""
    run_id: str
    """The run that holds (or held) this generation."""
    host: str
    pid: int
    """The holding driver's process id on `host`."""
    stage: str
    acquired_at: float
    heartbeat_at: float
    """Last time the holder said it is alive, by its clock (seconds since the epoch)."""
    timeout_s: float
    """Others may take the lease over once the heartbeat is older than this (the holder's say)."""
    released: bool = False
    """The holder ended (or an operator broke the lease): it is free at once."""
    broken_by: str | None = None
    """Who broke the lease; a break record repeats the broken holder's other fields."""
    token: str
    """Random, one per generation; see the module docstring."""


@dataclass(frozen=True)
class Free:
    """No lease, or the latest generation is released: take the next one."""
    latest: LeaseRecord | None


@dataclass(frozen=True)
class HeldBy:
    """A live holder: wait for its commit."""
    record: LeaseRecord
    age_s: float
    """Seconds since its last heartbeat, by our clock."""


@dataclass(frozen=True)
class Stale:
    """A holder that is gone: take its lease over."""
    record: LeaseRecord
    why: str


class WaitStopped(Exception):
    """`wait_for` was told to stop waiting (the run is stopping)."""


def decide(latest: LeaseRecord | None, now: float, run_id: str, host: str,
           pid_alive: Callable[[int], bool]) -> Free | HeldBy | Stale:
    """What a run `run_id` on `host` may do about the lease whose latest generation is `latest`."""
    if latest is None or latest.released:
        return Free(latest)
    age_s = now - latest.heartbeat_at
    if age_s > latest.timeout_s:
        return Stale(latest, f"no heartbeat for {age_s:.0f} s (timeout {latest.timeout_s:.0f} s)")
    # Our own run's earlier driver on this host that has died (resume after kill -9 or a crash):
    # nobody else can be computing for it, so waiting out its timeout would only waste a minute.
    if latest.run_id == run_id and latest.host == host and not pid_alive(latest.pid):
        return Stale(latest, f"its driver (pid {latest.pid} on {host}) is gone")
    return HeldBy(latest, age_s)


def read_latest(storage: Storage) -> LeaseRecord | None:
    """The latest generation's record in the stage dir `storage`, released or not; None if none."""
    generations = [int(m.group(1)) for o in storage.list(f"{LEASE_DIR}/")
                   if (m := _GENERATION_FILE.fullmatch(o.key))]
    if not generations:
        return None
    return _read(storage, max(generations))


def _key(generation: int) -> str:
    return f"{LEASE_DIR}/{generation:08d}.json"


def _read(storage: Storage, generation: int) -> LeaseRecord:
    key = _key(generation)
    try:
        body = json.loads(storage.read_bytes(key))
        if not isinstance(body, dict):
            raise ValueError("not a JSON object")
        return LeaseRecord.model_validate({**body, "generation": generation})
    except ValueError as e:  # pydantic's ValidationError and json's errors are ValueErrors
        raise ValueError(f"{storage.url(key)} is not a lease record ({e}); delete it, "
                         "since only orchestrator runs write there") from e


def _body(record: LeaseRecord) -> bytes:
    return record.model_dump_json(indent=1).encode()


def _pid_alive(pid: int) -> bool:
    if pid <= 0:  # not a process: os.kill would signal a whole process group
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class Lease:
    """A lease this process holds on one stage dir. `with lease:` heartbeats while the stage runs
    and releases it at the end, on failure too, so that a waiter computes the stage at once."""

    def __init__(self, storage: Storage, record: LeaseRecord, clock: Callable[[], float],
                 took_over: Stale | None):
        self.storage = storage
        self.record = record
        """This generation as last written."""
        self.took_over = took_over
        """The stale lease this one replaced, so the runner can say whose work it redoes."""
        self.lost = threading.Event()
        """Set once a later generation exists: someone broke this lease or took it over."""
        self._clock = clock
        self._lock = threading.Lock()  # a heartbeat must not overwrite the release
        self._ended = threading.Event()  # released: no more writes; wakes the heartbeat thread

    def __enter__(self) -> Lease:
        self.start_heartbeat()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

    def still_held(self) -> bool:
        """Re-check storage; False once the lease is lost or released. Ask it before committing."""
        # Generation n+2 is only ever created by someone who saw n+1, and no generation is
        # deleted: looking for n+1 (one HEAD) covers every later one.
        if not self.lost.is_set() and self.storage.exists(_key(self.record.generation + 1)):
            self.lost.set()
        return not self.lost.is_set() and not self._ended.is_set()

    def heartbeat(self) -> bool:
        """Rewrite this generation with a fresh heartbeat_at; False (and nothing written) once
        the lease is lost or released."""
        with self._lock:
            if not self.still_held():
                return False
            self.record = self.record.model_copy(update={"heartbeat_at": self._clock()})
            self.storage.write_bytes(_key(self.record.generation), _body(self.record))
            return True

    def start_heartbeat(self) -> None:
        """Heartbeat from a daemon thread, every timeout/6, until the lease is lost or released."""
        interval_s = self.record.timeout_s / _BEATS_PER_TIMEOUT

        def beat_until_ended() -> None:
            while not self._ended.wait(interval_s):
                try:
                    if not self.heartbeat():
                        return
                except Exception as e:
                    # Storage unreachable: try again at the next beat. Past the timeout others
                    # may take over; we then find their generation, and still_held() says so.
                    log.warning("stage %s: lease heartbeat failed, retrying: %s",
                                self.record.stage, e)

        threading.Thread(target=beat_until_ended, name=f"lease-{self.record.stage}",
                         daemon=True).start()

    def release(self) -> None:
        """End the lease (released: true) so that waiters go on at once. A lost lease is its
        new holder's: nothing is written then. Releasing twice is fine."""
        with self._lock:
            held = self.still_held()
            self._ended.set()
            if held:
                self.record = self.record.model_copy(
                    update={"released": True, "heartbeat_at": self._clock()})
                self.storage.write_bytes(_key(self.record.generation), _body(self.record))


def acquire(storage: Storage, run_id: str, stage: str, *, timeout_s: float = DEFAULT_TIMEOUT_S,
            clock: Callable[[], float] = time.time) -> Lease | HeldBy:
    """Take the lease on the stage dir `storage` for `run_id`: free, released and stale leases
    are taken; a live holder's is not, and then the answer says who holds it."""
    host = socket.gethostname()
    while True:
        latest = read_latest(storage)
        state = decide(latest, clock(), run_id, host, _pid_alive)
        if isinstance(state, HeldBy):
            return state
        now = clock()
        record = LeaseRecord(
            generation=1 if latest is None else latest.generation + 1, run_id=run_id, host=host,
            pid=os.getpid(), stage=stage, acquired_at=now, heartbeat_at=now, timeout_s=timeout_s,
            token=uuid.uuid4().hex)
        if storage.create_bytes(_key(record.generation), _body(record)):
            return Lease(storage, record, clock, state if isinstance(state, Stale) else None)
        # Another run created this generation first: judge its record on the next pass.


def wait_for(storage: Storage, run_id: str, stage: str, commit_exists: Callable[[], bool],
             on_wait: Callable[[HeldBy], None], *, timeout_s: float = DEFAULT_TIMEOUT_S,
             poll_s: float = 5.0, clock: Callable[[], float] = time.time,
             wait: Callable[[float], bool | None] = time.sleep) -> Lease | None:
    """Before computing the stage dir `storage`: None when its output is (or gets) committed by
    whoever held the lease, or the Lease to compute it under. `on_wait` hears of each new holder
    once. `wait(poll_s)` pauses between looks; when it returns True (a stop Event's `wait`),
    this raises WaitStopped."""
    announced = None
    while not commit_exists():
        got = acquire(storage, run_id, stage, timeout_s=timeout_s, clock=clock)
        if isinstance(got, Lease):
            if commit_exists():  # the holder committed and released between our two looks
                got.release()
                return None
            return got
        if got.record.generation != announced:
            on_wait(got)
            announced = got.record.generation
        if wait(poll_s):
            raise WaitStopped(f"stopped waiting for run {got.record.run_id}'s lease on {stage}")
    return None


def break_lease(storage: Storage, by: str, clock: Callable[[], float] = time.time
                ) -> LeaseRecord | None:
    """Break the lease on the stage dir `storage` (operator action): its holder loses it at its
    next heartbeat, and the next run to look takes it. `by` says who broke it, e.g. 'alice via
    the CLI'. Returns the broken record; None when nobody held the lease."""
    while True:
        latest = read_latest(storage)
        if latest is None or latest.released:
            return None
        broken = latest.model_copy(update={
            "generation": latest.generation + 1, "released": True, "broken_by": by,
            "heartbeat_at": clock(), "token": uuid.uuid4().hex})
        if storage.create_bytes(_key(broken.generation), _body(broken)):
            return latest
        # The lease changed hands meanwhile: break whoever holds it now.
