"""Cron schedules: each tick of a pipeline's `schedule:` becomes exactly one run.

A tick is identified by its logical time; the run id is the pipeline's name and that time in UTC
(`nightly-20261126T0130Z`), the same for every scheduler. Before anything starts, the tick is
claimed with a create-only write in storage (`schedules/<pipeline>/ticks/<UTC time>.json`) that
also records the decision (run, or skip and why). Whoever loses the race reads the winner's
decision. Starting the run is idempotent as well: on a cluster the run id is the Ray submission id,
locally a create-only launch marker guards the driver's start. So a scheduler restarted between
claiming and starting, or two schedulers at once, start one run per tick.

Time zones: cron fields are wall-clock times in the schedule's zone. A time that a
spring-forward skips fires at the first instant after the gap (03:00 for 02:30); a time that a
fall-back repeats fires once, at its first occurrence, when the hour field names hours (`30 1 * *
*`); a wildcard hour (`*/30 * * * *`) fires in both passes, as elapsed time does.

The clock and the launcher are parameters: tests drive days of ticks in milliseconds.
"""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from itertools import takewhile
from typing import Callable, Iterator, Literal, Protocol

from pydantic import BaseModel

from jobs.faults import crash_point
from jobs.storage import Storage
from orchestrator.records import load_record
from orchestrator.schedule_spec import ScheduleSpec
from orchestrator.spec import PipelineSpec

log = logging.getLogger(__name__)

ON_TIME = timedelta(minutes=5)  # how late a tick may fire and still be "on time" (catchup: none)
POLL_S = 30.0  # between ticks: how often queued ticks and active runs are looked at
RunState = Literal["active", "succeeded", "failed", "stopped"]


class Launcher(Protocol):
    """Starts runs and reports on them; every call is keyed by run id and safe to repeat."""

    def launch(self, run_id: str) -> bool:
        """Start the run unless it was already started (by anyone); True if this call started it."""

    def state(self, run_id: str) -> RunState | None:
        """None: never started."""

    def stop(self, run_id: str) -> None: ...

    def follow_hint(self, run_id: str) -> str:
        """Where the run's output goes, for the 'started' line."""


class Claim(BaseModel):
    tick: str  # ISO 8601, UTC
    local: str  # the tick in the schedule's time zone, for people
    run_id: str
    action: Literal["run", "skip"]
    reason: str
    claimed_at: float
    claimed_by: str


def run_id_for(pipeline: str, tick: datetime) -> str:
    return f"{pipeline}-{tick.astimezone(timezone.utc):%Y%m%dT%H%MZ}"


def ticks_after(schedule: ScheduleSpec, after: datetime) -> Iterator[datetime]:
    """The schedule's ticks after `after`, in its zone, forever."""
    from croniter import croniter

    fixed_hours = not schedule.cron.split()[1].startswith("*")
    it = croniter(schedule.cron, after.astimezone(schedule.zone))
    while True:
        tick = it.get_next(datetime)
        if not (fixed_hours and _second_pass(tick)):
            yield tick


def _second_pass(tick: datetime) -> bool:
    """Whether `tick` is the second occurrence of a wall-clock time repeated by a fall-back."""
    return tick.fold == 1 and tick.replace(fold=0).utcoffset() != tick.utcoffset()


def fire_times(schedule: ScheduleSpec, after: datetime, until: datetime) -> list[datetime]:
    """The ticks in (after, until]."""
    return list(takewhile(lambda tick: tick <= until, ticks_after(schedule, after)))


def next_fire(schedule: ScheduleSpec, after: datetime) -> datetime:
    return next(ticks_after(schedule, after))


@dataclass
class Scheduler:
    spec: PipelineSpec
    storage: Storage
    launcher: Launcher
    clock: Callable[[], float] = time.time
    say: Callable[[str], None] = print

    def __post_init__(self):
        if self.spec.schedule is None:
            raise ValueError("the pipeline has no schedule")
        self.schedule = self.spec.schedule
        self.who = f"{socket.gethostname()}:{id(self):x}"
        self.watched: set[str] = set()  # runs seen active, to say when each ends

    # --- what storage says -----------------------------------------------------------------
    def _prefix(self) -> str:
        return f"schedules/{self.spec.name}/ticks/"

    def _key(self, tick: datetime) -> str:
        return f"{self._prefix()}{tick.astimezone(timezone.utc):%Y%m%dT%H%M%SZ}.json"

    def claims(self, since: datetime | None = None, last: int | None = None) -> list[Claim]:
        """The ticks claimed so far (since `since`; only the `last` ones), oldest first. Keys sort
        by time, so claims outside those bounds are never read."""
        first = self._key(since) if since else ""
        keys = sorted(o.key for o in self.storage.list(self._prefix()) if o.key.endswith(".json") and o.key >= first)
        if last is not None:
            keys = keys[max(0, len(keys) - last):]
        return [Claim.model_validate_json(self.storage.read_bytes(k)) for k in keys]

    def _claim(self, tick: datetime, action: str, reason: str) -> Claim:
        """Create the tick's claim, or read the one another scheduler created first."""
        claim = Claim(tick=tick.astimezone(timezone.utc).isoformat(), local=tick.isoformat(),
                      run_id=run_id_for(self.spec.name, tick), action=action, reason=reason,
                      claimed_at=self.clock(), claimed_by=self.who)
        if self.storage.create_bytes(self._key(tick), claim.model_dump_json(indent=2).encode()):
            return claim
        return Claim.model_validate_json(self.storage.read_bytes(self._key(tick)))

    # --- one pass --------------------------------------------------------------------------
    def fire_due(self, now: datetime | None = None) -> list[Claim]:
        """Claim the ticks due at `now` (by the catchup policy), decide each by the overlap policy,
        and start what may start. Returns the claims made or found for those ticks."""
        now = now or datetime.fromtimestamp(self.clock(), timezone.utc)
        made = [self._decide(tick, why_skip, late=now - tick > ON_TIME) for tick, why_skip in self._due(now)]
        crash_point("schedule-claimed", 1)  # tests: die between claiming a tick and starting its run
        self._start_pending()
        self.say_ended()
        return made

    def _due(self, now: datetime) -> list[tuple[datetime, str | None]]:
        """(tick, None) to run, (tick, reason) to record as skipped: only the newest of the ticks
        a policy skips is recorded, which is enough to never look at them again."""
        s = self.schedule
        recent = self.claims(since=now - s.window)
        newest = datetime.fromisoformat(recent[-1].tick) if recent else None
        # A schedule's first scheduler does not backfill: it starts with the tick due now.
        first_ever = not any(o.key.endswith(".json") for o in self.storage.list(self._prefix()))
        # (fire_times excludes `after`: a tick exactly ON_TIME late is still on time)
        after = newest or (now - ON_TIME - timedelta(microseconds=1) if first_ever else now - s.window)
        ticks = fire_times(s, after, now)
        if s.catchup == "all":
            return [(t, None) for t in ticks]
        late = [t for t in ticks if now - t > ON_TIME] if s.catchup == "none" else ticks[:-1]
        run = [t for t in ticks if t not in late]
        skipped = [(late[-1], f"missed {len(late)} tick(s) from {late[0].isoformat()}; catchup: {s.catchup}")] if late else []
        return skipped + [(t, None) for t in run]

    def _decide(self, tick: datetime, why_skip: str | None, late: bool) -> Claim:
        """Run or skip the tick. Missed ticks that the catchup policy runs are queued: they were
        asked for, and are not overlapping newer work."""
        s = self.schedule
        if why_skip:
            return self._report(self._claim(tick, "skip", why_skip))
        active = self.active_runs()
        if len(active) < s.max_active_runs or s.overlap == "queue" or late:
            reason = "on schedule" if len(active) < s.max_active_runs else f"queued behind {', '.join(active)}"
            return self._report(self._claim(tick, "run", reason))
        if s.overlap == "skip":
            return self._report(self._claim(tick, "skip", f"{len(active)} run(s) still active: {', '.join(active)}"))
        # cancel: the newest tick wins; the oldest active runs make room for it
        claim = self._report(self._claim(tick, "run", f"cancelling {', '.join(active[:len(active) - s.max_active_runs + 1])}"))
        if claim.claimed_by == self.who:
            for run_id in active[:len(active) - s.max_active_runs + 1]:
                self.say(f"stopping {run_id} (overlap: cancel)")
                self.launcher.stop(run_id)
        return claim

    def _report(self, claim: Claim) -> Claim:
        mine = claim.claimed_by == self.who
        verb = {"run": "run", "skip": "skipped"}[claim.action]
        self.say(f"tick {claim.local}: {verb} {claim.run_id} — {claim.reason}" + ("" if mine else " (claimed by another scheduler)"))
        return claim

    def active_runs(self) -> list[str]:
        """Runs of claimed ticks that are running or not yet started, oldest first."""
        return [c.run_id for c in self._run_claims() if self.launcher.state(c.run_id) in (None, "active")]

    def _run_claims(self) -> list[Claim]:
        """Claimed runs recent enough to still matter (a run older than the catchup window is
        not started any more, and its scheduler's decisions are long made)."""
        horizon = datetime.fromtimestamp(self.clock(), timezone.utc) - self.schedule.window - ON_TIME
        return [c for c in self.claims(since=horizon) if c.action == "run"]

    def _start_pending(self) -> None:
        """Start claimed runs not started yet: a tick claimed just now, one whose scheduler died
        before starting it, or queued ones as active runs end (oldest first)."""
        claims = self._run_claims()
        states = {c.run_id: self.launcher.state(c.run_id) for c in claims}
        self.watched.update(run_id for run_id, state in states.items() if state == "active")
        slots = self.schedule.max_active_runs - list(states.values()).count("active")
        for claim in claims:
            if states[claim.run_id] is not None:
                continue
            if slots <= 0 and (self.schedule.overlap == "queue" or self._late(claim)):
                break  # waits for a run to end
            if self.launcher.launch(claim.run_id):
                self.say(f"started {claim.run_id}: {self.launcher.follow_hint(claim.run_id)}")
            self.watched.add(claim.run_id)
            slots -= 1

    def say_ended(self) -> None:
        """One line for each watched run that has ended since the last look: how, and what the
        regression gate decided."""
        for run_id in sorted(self.watched):
            state = self.launcher.state(run_id)
            if state in (None, "active"):
                continue
            self.watched.discard(run_id)
            record = load_record(self.storage, run_id)
            gate = f"; gate: {record.gate.status} ({record.gate.reason})" if record and record.gate else ""
            self.say(f"{run_id} {state}{gate}")

    def _late(self, claim: Claim) -> bool:
        return claim.claimed_at - datetime.fromisoformat(claim.tick).timestamp() > ON_TIME.total_seconds()

    # --- forever ---------------------------------------------------------------------------
    def run_forever(self, sleep: Callable[[float], None] = time.sleep, stop: Callable[[], bool] = lambda: False) -> None:
        while not stop():
            now = datetime.fromtimestamp(self.clock(), timezone.utc)
            self.fire_due(now)
            wake = next_fire(self.schedule, now)
            sleep(max(0.0, min((wake - now).total_seconds(), POLL_S)))

    def listing(self, now: datetime, upcoming: int = 5, recent: int = 10) -> dict:
        """The next fire times and the recent ticks with their runs' states."""
        times = [t.isoformat() for _, t in zip(range(upcoming), ticks_after(self.schedule, now))]
        ticks = [{**c.model_dump(include={"local", "run_id", "action", "reason"}),
                  "state": self.launcher.state(c.run_id) if c.action == "run" else None}
                 for c in self.claims(last=recent)]
        return {"pipeline": self.spec.name, "cron": self.schedule.cron, "timezone": self.schedule.timezone,
                "next": times, "recent": ticks}


def format_listing(listing: dict) -> str:
    lines = [f"{listing['pipeline']}: '{listing['cron']}' in {listing['timezone']}", "next:"]
    lines += [f"  {t}" for t in listing["next"]]
    lines.append("recent ticks:" if listing["recent"] else "recent ticks: none yet")
    for t in listing["recent"]:
        state = t["state"] or ("not started" if t["action"] == "run" else "")
        lines.append(f"  {t['local']}  {t['action']:<4}  {t['run_id']}  {state}  {t['reason']}")
    return "\n".join(lines)

