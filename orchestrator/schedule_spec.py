"""The `schedule:` and `gate:` sections of a pipeline file: when the pipeline runs by itself, and
which of its runs may move the `latest` / `best` model aliases.

```yaml
schedule:
  cron: "30 2 * * *"          # five fields: minute hour day-of-month month day-of-week
  timezone: Europe/Berlin     # an IANA name; the cron fields are wall-clock times there
  catchup: latest             # ticks missed while no scheduler ran: none | latest | all
  catchup_window: 3d          # how far back missed ticks count (s, m, h, d)
  overlap: skip               # a tick while runs are active: skip | queue | cancel
  max_active_runs: 1
gate:
  stage: eval                 # an evaluate stage of this pipeline
  model: sft_colors           # the training stage whose export is promoted
  metrics:                    # <model>/<task or perplexity>/<metric> in the evaluation results
    - {name: sft_colors/colors/exact_match, higher_is_better: true, max_regression: 0.02}
```
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

from pydantic import BaseModel, ConfigDict, Field, field_validator

_DURATION = re.compile(r"(\d+)([smhd])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_duration(text: str) -> timedelta:
    match = _DURATION.fullmatch(text.strip())
    if not match:
        raise ValueError(f"{text!r} is not a duration; use a number and a unit: 90s, 30m, 12h, 3d")
    return timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})


class ScheduleSpec(BaseModel):
    """When the pipeline runs by itself (`orchestrator schedule`): one run per cron tick."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    cron: str
    """Five cron fields (minute hour day-of-month month day-of-week), in `timezone`'s wall-clock time."""
    timezone: str = "UTC"
    """An IANA time zone name (Europe/Berlin, America/New_York); daylight-saving changes follow it."""
    catchup: Literal["none", "latest", "all"] = "latest"
    """Ticks missed while no scheduler ran: none (only ticks on time), latest (the newest missed
    one), all (every missed one, oldest first), within `catchup_window`."""
    catchup_window: str = "3d"
    """How far back a missed tick still counts."""
    overlap: Literal["skip", "queue", "cancel"] = "skip"
    """A tick while `max_active_runs` runs are active: skip it, queue it until one ends, or cancel
    the oldest active run and start."""
    max_active_runs: int = Field(1, ge=1)
    """Runs of this pipeline active at once, at most; see `overlap` for a tick beyond it."""

    @field_validator("cron")
    @classmethod
    def _cron(cls, cron: str) -> str:
        from croniter import croniter

        fields = cron.split()
        if len(fields) != 5:
            raise ValueError(f"{cron!r} has {len(fields)} fields; use five: minute hour day-of-month month "
                             "day-of-week, e.g. '30 2 * * *' for 02:30 every day")
        if not croniter.is_valid(cron):
            raise ValueError(f"{cron!r} is not a valid cron expression; e.g. '30 2 * * *' (02:30 daily), "
                             "'0 */6 * * *' (every 6 hours), '0 3 * * 1-5' (03:00 on weekdays)")
        return " ".join(fields)

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, name: str) -> str:
        try:
            ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            import difflib

            close = difflib.get_close_matches(name, sorted(available_timezones()), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(f"{name!r} is not a known time zone; {hint}use an IANA name such as "
                             "'UTC', 'Europe/Berlin' or 'America/New_York'") from None
        return name

    @field_validator("catchup_window")
    @classmethod
    def _window(cls, text: str) -> str:
        parse_duration(text)
        return text

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    @property
    def window(self) -> timedelta:
        return parse_duration(self.catchup_window)


class GateMetric(BaseModel):
    """One metric the gate compares with the last promoted run."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    name: str
    """`<model>/<task>/<metric>` in the gate stage's results; `<model>/perplexity/perplexity` for perplexity."""
    higher_is_better: bool = True
    """Whether a larger value is better (accuracy) or a smaller one (perplexity)."""
    max_regression: float = Field(0.0, ge=0)
    """How much worse than the last promoted run it may be (absolute)."""

    @field_validator("name")
    @classmethod
    def _three_parts(cls, name: str) -> str:
        if len(name.split("/")) != 3 or not all(name.split("/")):
            raise ValueError(f"{name!r}: use <model>/<task>/<metric>, e.g. sft_colors/colors/exact_match or "
                             "pretrain/perplexity/perplexity")
        return name


class GateSpec(BaseModel):
    """The regression gate: a successful run whose metrics are within their thresholds of the last
    promoted run's is promoted (the `latest` / `best` aliases point to its export)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    stage: str
    """The evaluate stage whose results are compared."""
    model: str
    """The training stage whose export the aliases point to when the run is promoted."""
    metrics: list[GateMetric] = Field(min_length=1)
    """Every one must be within its threshold; the first decides `best`."""
