"""The scheduler over simulated days: a fake clock and a fake launcher whose runs take as long as a
test says, on real (file://) storage, so claims are the real create-only writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace
from zoneinfo import ZoneInfo

import pytest
import yaml

from jobs.storage import open_storage
from orchestrator.cli import main
from orchestrator.launchers import LocalLauncher
from orchestrator.scheduler import POLL_S, Scheduler, fire_times, next_fire, run_id_for
from orchestrator.spec import parse_spec

UTC = timezone.utc
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def spec(tmp_path, **schedule):
    raw = {"name": "nightly", "storage": f"file://{tmp_path}/store", "schedule": schedule, "stages": {
        "tok": {"kind": "tokenizer", "source": {"paths": [os.path.join(REPO, "examples", "data", "*.jsonl")]}}}}
    return parse_spec(yaml.safe_dump(raw))


class Clock:
    def __init__(self, start: datetime):
        self.now = start

    def __call__(self) -> float:
        return self.now.timestamp()


class FakeLauncher:
    """Runs that last `duration` of fake time; every launch call is counted, so a double start shows."""

    def __init__(self, clock: Clock, duration: timedelta):
        self.clock, self.duration = clock, duration
        self.started: dict[str, datetime] = {}
        self.stopped: set[str] = set()
        self.launch_calls: list[str] = []
        self.fail_next_launch = False

    def launch(self, run_id: str) -> bool:
        if self.fail_next_launch:  # the scheduler dies between claiming and starting
            self.fail_next_launch = False
            raise SystemExit("killed")
        self.launch_calls.append(run_id)
        if run_id in self.started:
            return False
        self.started[run_id] = self.clock.now
        return True

    def state(self, run_id: str):
        if run_id not in self.started:
            return None
        if run_id in self.stopped:
            return "stopped"
        return "succeeded" if self.clock.now >= self.started[run_id] + self.duration else "active"

    def stop(self, run_id: str) -> None:
        self.stopped.add(run_id)

    def follow_hint(self, run_id: str) -> str:
        return "a fake run"

    def overlapping(self) -> int:
        """The most runs active at once."""
        spans = [(t, t + self.duration if r not in self.stopped else t) for r, t in self.started.items()]
        return max((sum(1 for a, b in spans if a <= t < b) for t, _ in spans), default=0)


def simulate(scheduler: Scheduler, clock: Clock, until: datetime, step=timedelta(minutes=10)) -> None:
    while clock.now < until:
        scheduler.fire_due(clock.now)
        clock.now += step


def make(tmp_path, start: datetime, duration=timedelta(hours=1), **schedule):
    clock = Clock(start)
    s = spec(tmp_path, **schedule)
    launcher = FakeLauncher(clock, duration)
    lines: list[str] = []
    return Scheduler(s, open_storage(s.storage), launcher, clock=clock, say=lines.append), launcher, clock, lines


# --- one run per tick ---------------------------------------------------------------------------

def test_five_simulated_days_start_five_runs_each_at_its_tick(tmp_path):
    start = datetime(2026, 11, 20, 0, 0, tzinfo=UTC)
    scheduler, launcher, clock, lines = make(tmp_path, start, cron="30 2 * * *")
    simulate(scheduler, clock, start + timedelta(days=5))
    assert list(launcher.started) == [f"nightly-202611{d}T0230Z" for d in range(20, 25)]
    # each start and each end said once, the end at the first look after the hour it took
    assert [line for line in lines if line.startswith(("started", "nightly-"))] == [
        line for d in range(20, 25) for line in (f"started nightly-202611{d}T0230Z: a fake run",
                                                 f"nightly-202611{d}T0230Z succeeded")]
    assert all(t.time().isoformat() == "02:30:00" for t in launcher.started.values())  # on the 10-minute step
    assert launcher.launch_calls == list(launcher.started)  # each started once, never retried
    assert [c.action for c in scheduler.claims()] == ["run"] * 5


def test_the_run_id_is_the_pipeline_and_the_ticks_utc_time():
    tick = datetime(2026, 11, 26, 2, 30, tzinfo=ZoneInfo("Europe/Berlin"))
    assert run_id_for("nightly", tick) == "nightly-20261126T0130Z"


def test_a_first_scheduler_does_not_backfill(tmp_path):
    start = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
    scheduler, launcher, _, _ = make(tmp_path, start, cron="30 2 * * *", catchup="all")
    assert scheduler.fire_due(start) == [] and launcher.started == {}


# --- catchup ------------------------------------------------------------------------------------

def down_for_three_days(tmp_path, **schedule):
    """A scheduler that ran day 1's tick, then was down until day 4, 04:00."""
    start = datetime(2026, 11, 20, 2, 0, tzinfo=UTC)
    scheduler, launcher, clock, lines = make(tmp_path, start, cron="30 2 * * *", **schedule)
    simulate(scheduler, clock, start + timedelta(hours=1))
    clock.now = datetime(2026, 11, 23, 4, 0, tzinfo=UTC)
    scheduler.fire_due(clock.now)
    return scheduler, launcher, lines


def test_catchup_all_runs_every_missed_tick_oldest_first_one_after_another(tmp_path):
    scheduler, launcher, _ = down_for_three_days(tmp_path, catchup="all")
    assert list(launcher.started) == ["nightly-20261120T0230Z", "nightly-20261121T0230Z"]  # the others wait
    simulate(scheduler, launcher.clock, launcher.clock.now + timedelta(hours=4))
    assert list(launcher.started) == [f"nightly-202611{d}T0230Z" for d in (20, 21, 22, 23)]
    assert launcher.overlapping() == 1


def test_catchup_all_stops_at_the_window(tmp_path):
    scheduler, launcher, _ = down_for_three_days(tmp_path, catchup="all", catchup_window="2d")
    simulate(scheduler, launcher.clock, launcher.clock.now + timedelta(hours=4))
    assert list(launcher.started) == ["nightly-20261120T0230Z", "nightly-20261122T0230Z", "nightly-20261123T0230Z"]


def test_catchup_latest_runs_the_newest_missed_tick_and_records_the_rest_skipped(tmp_path):
    scheduler, launcher, lines = down_for_three_days(tmp_path, catchup="latest")
    assert list(launcher.started) == ["nightly-20261120T0230Z", "nightly-20261123T0230Z"]
    skipped = [c for c in scheduler.claims() if c.action == "skip"]
    assert len(skipped) == 1 and "missed 2 tick(s)" in skipped[0].reason
    assert any("skipped nightly-20261122T0230Z" in line for line in lines)


def test_catchup_none_runs_only_ticks_on_time(tmp_path):
    scheduler, launcher, _ = down_for_three_days(tmp_path, catchup="none")
    assert list(launcher.started) == ["nightly-20261120T0230Z"]  # 02:30 on day 4 is 90 minutes late
    assert "missed 3 tick(s)" in scheduler.claims()[-1].reason
    scheduler.fire_due(datetime(2026, 11, 24, 2, 31, tzinfo=UTC))  # back on time
    assert list(launcher.started)[-1] == "nightly-20261124T0230Z"


# --- overlap ------------------------------------------------------------------------------------

HOURLY = dict(cron="0 * * * *")
LONG = timedelta(minutes=150)  # each run outlasts two ticks


def test_overlap_skip_skips_ticks_while_a_run_is_active(tmp_path):
    start = datetime(2026, 11, 20, 0, 0, tzinfo=UTC)
    scheduler, launcher, clock, _ = make(tmp_path, start, LONG, overlap="skip", **HOURLY)
    simulate(scheduler, clock, start + timedelta(hours=6))
    # ticks 00, 03 run (01, 02 skipped while 00 runs until 02:30), 04, 05 skipped
    assert [r[-5:-1] for r in launcher.started] == ["0000", "0300"]
    assert launcher.overlapping() == 1
    skipped = [c for c in scheduler.claims() if c.action == "skip"]
    assert len(skipped) == 4 and "still active: nightly-20261120T0000Z" in skipped[0].reason


def test_overlap_queue_runs_every_tick_one_after_another(tmp_path):
    start = datetime(2026, 11, 20, 0, 0, tzinfo=UTC)
    scheduler, launcher, clock, _ = make(tmp_path, start, LONG, overlap="queue", **HOURLY)
    simulate(scheduler, clock, start + timedelta(hours=16))
    started = list(launcher.started.items())
    assert [r[-5:-1] for r, _ in started][:4] == ["0000", "0100", "0200", "0300"]
    assert launcher.overlapping() == 1
    for (_, a), (_, b) in zip(started, started[1:]):
        assert b >= a + LONG  # each starts when the one before has ended


def test_overlap_cancel_stops_the_active_run_for_the_new_tick(tmp_path):
    start = datetime(2026, 11, 20, 0, 0, tzinfo=UTC)
    scheduler, launcher, clock, lines = make(tmp_path, start, LONG, overlap="cancel", **HOURLY)
    simulate(scheduler, clock, start + timedelta(hours=3, minutes=5))
    assert [r[-5:-1] for r in launcher.started] == ["0000", "0100", "0200", "0300"]
    assert launcher.stopped == {"nightly-20261120T0000Z", "nightly-20261120T0100Z", "nightly-20261120T0200Z"}
    assert any("stopping nightly-20261120T0000Z (overlap: cancel)" in line for line in lines)


def test_max_active_runs_two(tmp_path):
    start = datetime(2026, 11, 20, 0, 0, tzinfo=UTC)
    scheduler, launcher, clock, _ = make(tmp_path, start, LONG, overlap="skip", max_active_runs=2, **HOURLY)
    simulate(scheduler, clock, start + timedelta(hours=6))
    assert launcher.overlapping() == 2
    assert [r[-5:-1] for r in launcher.started] == ["0000", "0100", "0300", "0400"]


# --- time zones ---------------------------------------------------------------------------------

NEW_YORK = ZoneInfo("America/New_York")


def test_spring_forward_fires_a_skipped_wall_time_right_after_the_gap(tmp_path):
    s = spec(tmp_path, cron="30 2 * * *", timezone="America/New_York").schedule
    ticks = fire_times(s, datetime(2026, 3, 7, 0, 0, tzinfo=NEW_YORK), datetime(2026, 3, 10, 0, 0, tzinfo=NEW_YORK))
    # 2026-03-08 02:30 does not exist in New York: it fires at 03:00 EDT, 23 hours after the day before
    assert [t.isoformat() for t in ticks] == ["2026-03-07T02:30:00-05:00", "2026-03-08T03:00:00-04:00",
                                              "2026-03-09T02:30:00-04:00"]


def test_fall_back_fires_a_repeated_wall_time_once(tmp_path):
    s = spec(tmp_path, cron="30 1 * * *", timezone="America/New_York").schedule
    ticks = fire_times(s, datetime(2026, 10, 31, 0, 0, tzinfo=NEW_YORK), datetime(2026, 11, 3, 0, 0, tzinfo=NEW_YORK))
    assert [t.isoformat() for t in ticks] == ["2026-10-31T01:30:00-04:00", "2026-11-01T01:30:00-04:00",
                                              "2026-11-02T01:30:00-05:00"]
    assert next_fire(s, ticks[1]).isoformat() == "2026-11-02T01:30:00-05:00"


def test_fall_back_a_wildcard_hour_keeps_elapsed_time(tmp_path):
    s = spec(tmp_path, cron="*/30 * * * *", timezone="America/New_York").schedule
    ticks = fire_times(s, datetime(2026, 11, 1, 0, 45, tzinfo=NEW_YORK), datetime(2026, 11, 1, 2, 0, tzinfo=NEW_YORK))
    assert len(ticks) == 5  # 01:00, 01:30 EDT, 01:00, 01:30 EST, 02:00 EST: 2 h 15 min elapsed
    assert len({run_id_for("p", t) for t in ticks}) == 5


def test_a_simulated_dst_week_in_berlin_runs_once_a_night(tmp_path):
    start = datetime(2026, 3, 26, 0, 0, tzinfo=UTC)  # Europe/Berlin springs forward on 2026-03-29
    scheduler, launcher, clock, _ = make(tmp_path, start, cron="30 2 * * *", timezone="Europe/Berlin")
    simulate(scheduler, clock, start + timedelta(days=6))
    local = [t.astimezone(ZoneInfo("Europe/Berlin")).strftime("%d %H:%M") for t in launcher.started.values()]
    assert local == ["26 02:30", "27 02:30", "28 02:30", "29 03:00", "30 02:30", "31 02:30"]


# --- exactly one run per tick -------------------------------------------------------------------

def test_two_schedulers_firing_the_same_tick_start_one_run(tmp_path):
    start = datetime(2026, 11, 20, 2, 30, tzinfo=UTC)
    a, launcher, clock, _ = make(tmp_path, start, cron="30 2 * * *")
    b = Scheduler(a.spec, a.storage, launcher, clock=clock, say=lambda line: None)
    a.fire_due(start)
    b.fire_due(start)
    assert launcher.launch_calls == ["nightly-20261120T0230Z"]
    assert len(a.claims()) == 1


def test_a_scheduler_killed_between_claim_and_start_starts_the_run_once_on_restart(tmp_path):
    start = datetime(2026, 11, 20, 2, 30, tzinfo=UTC)
    first, launcher, clock, _ = make(tmp_path, start, cron="30 2 * * *")
    launcher.fail_next_launch = True
    with pytest.raises(SystemExit):
        first.fire_due(start)
    assert [c.run_id for c in first.claims()] == ["nightly-20261120T0230Z"] and launcher.started == {}
    clock.now = start + timedelta(minutes=3)
    restarted = Scheduler(first.spec, first.storage, launcher, clock=clock, say=lambda line: None)
    restarted.fire_due(clock.now)
    restarted.fire_due(clock.now + timedelta(minutes=1))
    assert launcher.launch_calls == ["nightly-20261120T0230Z"]


def test_the_local_launcher_starts_a_run_once(tmp_path, monkeypatch):
    s = spec(tmp_path, cron="30 2 * * *")
    storage = open_storage(s.storage)
    started = []
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: started.append(a) or SimpleNamespace(pid=4242, poll=lambda: None))
    first = LocalLauncher("p.yaml", s, storage, str(tmp_path / "logs"))
    second = LocalLauncher("p.yaml", s, storage, str(tmp_path / "logs"))
    assert first.launch("nightly-x") is True
    assert second.launch("nightly-x") is False
    assert len(started) == 1


# --- the CLI ------------------------------------------------------------------------------------

def write(tmp_path, **schedule) -> str:
    path = tmp_path / "nightly.yaml"
    raw = {"name": "nightly", "storage": f"file://{tmp_path}/store", "schedule": schedule, "stages": {
        "tok": {"kind": "tokenizer", "source": {"paths": [os.path.join(REPO, "examples", "data", "*.jsonl")]}}}}
    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.mark.parametrize("schedule, fragment", [
    ({"cron": "61 2 * * *"}, "schedule.cron: '61 2 * * *' is not a valid cron expression"),
    ({"cron": "30 2 * *"}, "schedule.cron: '30 2 * *' has 4 fields; use five"),
    ({"cron": "30 2 * * *", "timezone": "Europe/Berln"}, "did you mean 'Europe/Berlin'?"),
    ({"cron": "30 2 * * *", "overlap": "wait"}, "schedule.overlap"),
    ({"cron": "30 2 * * *", "catchup_window": "3 days"}, "use a number and a unit"),
])
def test_bad_schedules_exit_2_naming_the_field(tmp_path, capsys, schedule, fragment):
    assert main(["schedule", write(tmp_path, **schedule), "--list"]) == 2
    err = capsys.readouterr().err
    assert fragment in err
    assert err.count(repr(schedule.get("timezone", schedule["cron"]))) <= 1  # the value is named once


def test_schedule_without_a_schedule_section_exits_2(tmp_path, capsys):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"name": "p", "stages": {"tok": {"kind": "tokenizer", "source": {"paths": ["x"]}}}}))
    assert main(["schedule", str(path), "--once"]) == 2
    assert "has no `schedule:`" in capsys.readouterr().err


def test_a_bad_now_exits_2(tmp_path, capsys):
    assert main(["schedule", write(tmp_path, cron="30 2 * * *"), "--once", "--now", "tonight"]) == 2
    assert "--now 'tonight': not an ISO 8601 time" in capsys.readouterr().err


def test_list_shows_the_next_fire_times_in_the_schedules_zone(tmp_path, capsys):
    path = write(tmp_path, cron="30 2 * * *", timezone="Europe/Berlin")
    assert main(["schedule", path, "--list", "--json", "--now", "2026-03-28T12:00:00"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert listing["next"][:2] == ["2026-03-29T03:00:00+02:00", "2026-03-30T02:30:00+02:00"]
    assert listing["recent"] == []


def test_list_shows_the_newest_ticks_with_their_runs_states(tmp_path):
    start = datetime(2026, 11, 20, 0, 0, tzinfo=UTC)
    scheduler, _, clock, _ = make(tmp_path, start, duration=timedelta(hours=3), cron="30 2 * * *")
    simulate(scheduler, clock, start + timedelta(days=5, hours=3))  # the sixth night runs
    listing = scheduler.listing(clock.now, upcoming=2, recent=3)
    assert [t["run_id"] for t in listing["recent"]] == [f"nightly-202611{d}T0230Z" for d in (23, 24, 25)]
    assert [t["state"] for t in listing["recent"]] == ["succeeded", "succeeded", "active"]
    assert listing["next"] == ["2026-11-26T02:30:00+00:00", "2026-11-27T02:30:00+00:00"]


def test_two_scheduler_processes_on_one_storage_start_one_run(tmp_path):
    """Real processes, real runs (a tokenizer-only pipeline on an embedded Ray each)."""
    path = write(tmp_path, cron="30 2 * * *")
    env = {**os.environ, "ORCHESTRATOR_LOG_DIR": str(tmp_path / "logs")}
    cmd = [sys.executable, "-m", "orchestrator.cli", "schedule", path, "--once", "--now", "2026-11-20T02:30:00+00:00"]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert sum("started nightly-20261120T0230Z: its driver's output goes to" in out for out in outputs) == 1, outputs
    assert any("\nnightly-20261120T0230Z succeeded" in out for out in outputs), outputs
    storage = open_storage(f"file://{tmp_path}/store")
    record = json.loads(storage.read_bytes("runs/nightly-20261120T0230Z/run.json"))
    assert record["status"] == "succeeded" and record["attempts"] == 1
    assert [o.key for o in storage.list("runs/") if o.key.endswith("run.json")] == ["runs/nightly-20261120T0230Z/run.json"]
    # the listing shows the tick with its finished run
    out = subprocess.run([*cmd[:5], "--list", "--now", "2026-11-20T03:00:00+00:00"], env=env, capture_output=True,
                         text=True, timeout=60).stdout
    assert "nightly-20261120T0230Z  succeeded" in out


def test_run_forever_sleeps_until_each_tick_and_polls_between(tmp_path):
    start = datetime(2026, 11, 20, 0, 0, tzinfo=UTC)
    scheduler, launcher, clock, _ = make(tmp_path, start, cron="30 2 * * *")
    naps: list[float] = []

    def sleep(seconds: float) -> None:
        naps.append(seconds)
        clock.now += timedelta(seconds=seconds)

    scheduler.run_forever(sleep=sleep, stop=lambda: clock.now >= start + timedelta(days=3))
    assert list(launcher.started) == ["nightly-20261120T0230Z", "nightly-20261121T0230Z", "nightly-20261122T0230Z"]
    assert all(t.time().isoformat() == "02:30:00" for t in launcher.started.values())  # woke exactly at the tick
    assert max(naps) <= POLL_S
