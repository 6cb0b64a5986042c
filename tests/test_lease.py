"""Stage leases (orchestrator/lease.py) on local disk and on the S3 protocol (a moto server):
real storage throughout; a fake clock where time matters, real threads where races do."""

import socket
import subprocess
import sys
import threading
import time

import pytest

from jobs.storage import open_storage
from orchestrator.lease import (Free, HeldBy, Lease, LeaseRecord, Stale, WaitStopped, acquire,
                                break_lease, decide, read_latest, wait_for)

HOST = socket.gethostname()


class FakeClock:
    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["file", "s3"])
def stage_dir(request, tmp_path):
    root = request.getfixturevalue("s3_bucket") if request.param == "s3" else f"file://{tmp_path}"
    return open_storage(root).sub("stages/tok-1a2b3c4d")


def _take(storage, run_id, clock, **kwargs) -> Lease:
    lease = acquire(storage, run_id, "tok", clock=clock, **kwargs)
    assert isinstance(lease, Lease), lease
    return lease


# --- the decision, without storage ---------------------------------------------------------

def _record(**fields) -> LeaseRecord:
    return LeaseRecord(**{"generation": 3, "run_id": "run-a", "host": "h1", "pid": 42,
                          "stage": "tok", "acquired_at": 900.0, "heartbeat_at": 990.0,
                          "timeout_s": 60.0, "token": "t", **fields})


def alive(pid):
    return True


def dead(pid):
    return False


def test_decide_no_lease_or_a_released_one_is_free():
    assert decide(None, 1000.0, "run-b", "h2", alive) == Free(None)
    released = _record(released=True)
    assert decide(released, 1000.0, "run-b", "h2", alive) == Free(released)
    broken = _record(released=True, broken_by="alice")
    assert decide(broken, 1000.0, "run-a", "h1", alive) == Free(broken)


def test_decide_a_fresh_heartbeat_is_held_and_an_old_one_stale():
    record = _record()
    assert decide(record, 1000.0, "run-b", "h2", dead) == HeldBy(record, 10.0)
    assert decide(record, 1050.0, "run-b", "h2", dead) == HeldBy(record, 60.0)  # at the limit
    stale = decide(record, 1050.5, "run-b", "h2", alive)
    assert isinstance(stale, Stale) and stale.record == record
    assert stale.why == "no heartbeat for 60 s (timeout 60 s)"
    assert isinstance(decide(_record(timeout_s=5.0), 1000.0, "run-b", "h2", alive), Stale)


def test_decide_our_own_runs_dead_driver_on_this_host_is_stale_at_once():
    record = _record()
    stale = decide(record, 1000.0, "run-a", "h1", dead)
    assert isinstance(stale, Stale) and stale.why == "its driver (pid 42 on h1) is gone"
    assert decide(record, 1000.0, "run-a", "h1", alive) == HeldBy(record, 10.0)
    # Another host's pid, or another run's driver, says nothing we can check from here.
    assert decide(record, 1000.0, "run-a", "h2", dead) == HeldBy(record, 10.0)
    assert decide(record, 1000.0, "run-b", "h1", dead) == HeldBy(record, 10.0)


# --- on storage ------------------------------------------------------------------------------

def test_a_second_run_sees_who_holds_the_lease(stage_dir):
    clock = FakeClock()
    lease = _take(stage_dir, "run-a", clock, timeout_s=30.0)
    assert [o.key for o in stage_dir.list("_LEASE/")] == ["_LEASE/00000001.json"]
    clock.now += 7
    held = acquire(stage_dir, "run-b", "tok", clock=clock)
    assert isinstance(held, HeldBy) and held.age_s == 7.0
    assert (held.record.run_id, held.record.host, held.record.stage) == ("run-a", HOST, "tok")
    assert (held.record.acquired_at, held.record.timeout_s) == (clock.now - 7, 30.0)
    assert read_latest(stage_dir) == lease.record
    assert lease.still_held()


def test_a_heartbeat_keeps_the_lease_alive_past_its_timeout(stage_dir):
    clock = FakeClock()
    lease = _take(stage_dir, "run-a", clock)
    for _ in range(3):  # 120 s after acquiring, 40 s after the last heartbeat
        clock.now += 40
        assert lease.heartbeat()
    assert read_latest(stage_dir).heartbeat_at == clock.now
    clock.now += 40
    assert isinstance(acquire(stage_dir, "run-b", "tok", clock=clock), HeldBy)


def test_exactly_one_of_racing_runs_takes_over_a_stale_lease(stage_dir):
    clock = FakeClock()
    stale = _take(stage_dir, "run-a", clock)
    clock.now += 61
    num_takers = 8
    start, results = threading.Barrier(num_takers), [None] * num_takers

    def take(i):
        start.wait()
        results[i] = acquire(stage_dir, f"run-{i}", "tok", clock=clock)

    threads = [threading.Thread(target=take, args=(i,)) for i in range(num_takers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [r for r in results if isinstance(r, Lease)]
    assert len(winners) == 1, results
    winner = winners[0]
    assert winner.record.generation == 2 and winner.took_over.record.run_id == "run-a"
    assert all(r.record == winner.record for r in results if isinstance(r, HeldBy))
    assert read_latest(stage_dir) == winner.record
    assert not stale.heartbeat() and stale.lost.is_set()  # the old holder finds out


def test_a_released_lease_is_taken_at_once(stage_dir):
    clock = FakeClock()
    lease = _take(stage_dir, "run-a", clock)
    lease.release()
    lease.release()  # twice is fine
    assert read_latest(stage_dir).released and not lease.still_held()
    assert not lease.heartbeat()
    taken = _take(stage_dir, "run-b", clock)
    assert (taken.record.generation, taken.took_over) == (2, None)


def test_a_resumed_run_takes_over_its_dead_drivers_lease_at_once(stage_dir):
    # A driver of run-a takes the lease and dies without releasing it (as after kill -9).
    subprocess.run([sys.executable, "-c", "import sys; from jobs.storage import open_storage; "
                    "from orchestrator.lease import acquire; "
                    "acquire(open_storage(sys.argv[1]), 'run-a', 'tok')", stage_dir.uri],
                   check=True)
    assert isinstance(acquire(stage_dir, "run-b", "tok"), HeldBy)  # another run waits
    lease = _take(stage_dir, "run-a", FakeClock(read_latest(stage_dir).heartbeat_at))
    assert lease.took_over.why.startswith("its driver (pid ")


def test_breaking_a_lease_makes_its_holder_lose_it(stage_dir):
    clock = FakeClock()
    assert break_lease(stage_dir, by="alice") is None  # nobody holds it
    lease = _take(stage_dir, "run-a", clock)
    broken = break_lease(stage_dir, by="alice", clock=clock)
    assert broken == lease.record
    latest = read_latest(stage_dir)
    assert (latest.generation, latest.run_id, latest.released, latest.broken_by) == (
        2, "run-a", True, "alice")
    assert not lease.lost.is_set()  # nobody told it: it finds out at its next look
    assert not lease.heartbeat() and lease.lost.is_set() and not lease.still_held()
    lease.release()
    assert read_latest(stage_dir) == latest  # a lost lease is not written to
    assert _take(stage_dir, "run-b", clock).record.generation == 3
    assert break_lease(stage_dir, by="alice") is not None


def test_the_heartbeat_thread_notices_a_break(stage_dir):
    with _take(stage_dir, "run-a", clock=time.time, timeout_s=0.3) as lease:
        break_lease(stage_dir, by="alice")
        assert lease.lost.wait(timeout=30)
    assert read_latest(stage_dir).broken_by == "alice"


def test_wait_for_waits_for_the_holders_commit(stage_dir):
    clock = FakeClock()
    holder = _take(stage_dir, "run-a", clock)
    heard, num_waits = [], 0

    def wait(seconds):
        nonlocal num_waits
        num_waits += 1
        clock.now += seconds
        holder.heartbeat()
        if num_waits == 3:
            stage_dir.write_bytes("_COMMIT.json", b"{}")
            holder.release()

    got = wait_for(stage_dir, "run-b", "tok", lambda: stage_dir.exists("_COMMIT.json"),
                   heard.append, poll_s=5.0, clock=clock, wait=wait)
    assert got is None and num_waits == 3
    assert [h.record.run_id for h in heard] == ["run-a"]  # said once, not at every look


def test_wait_for_takes_over_from_a_holder_that_stopped_heartbeating(stage_dir):
    clock = FakeClock()
    _take(stage_dir, "run-a", clock)

    def wait(seconds):
        clock.now += seconds

    got = wait_for(stage_dir, "run-b", "tok", lambda: False, lambda held: None, poll_s=20.0,
                   clock=clock, wait=wait)
    assert isinstance(got, Lease) and got.record.run_id == "run-b"
    assert got.took_over.record.run_id == "run-a"
    assert clock.now == 1_000_080.0  # the first look past the holder's 60 s


def test_wait_for_stops_when_told_to(stage_dir):
    _take(stage_dir, "run-a", FakeClock())
    stop = threading.Event()
    stop.set()
    with pytest.raises(WaitStopped, match="run run-a's lease on tok"):
        wait_for(stage_dir, "run-b", "tok", lambda: False, lambda held: None,
                 clock=FakeClock(), wait=stop.wait)


def test_an_unreadable_lease_file_is_named(stage_dir):
    stage_dir.write_bytes("_LEASE/00000001.json", b"[1, 2]")
    with pytest.raises(ValueError, match=r"_LEASE/00000001\.json is not a lease record"):
        read_latest(stage_dir)
